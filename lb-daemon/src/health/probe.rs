//! Health probes of one uplink, Netwatch style: ICMP echo, TCP connect,
//! HTTP GET and DNS query, over IPv4 or IPv6, each sent from a socket bound
//! to the uplink's interface (`SO_BINDTODEVICE`) and its source address of
//! that family, so that a probe tests the path through that ISP and
//! nothing else.
//!
//! Owns the probe sockets, the wire formats (ICMP and ICMPv6 echo, a
//! one-line HTTP/1.1 request, a DNS query for an A record) and the matching
//! of replies to the probes that caused them. One raw ICMP socket per
//! uplink and family ([`Pinger`]) is
//! shared by all of its ICMP targets; a receive task hands each echo reply to
//! the probe waiting for its (identifier, sequence) when the reply also comes
//! from that probe's target. Every probe is bounded by its timeout and returns
//! the round-trip time or a [`ProbeError`].
//!
//! It must never decide whether an uplink is healthy (that is `health`), never
//! let a probe leave by another interface or source address than its uplink's,
//! never resolve a name, never use an ICMP identifier it was not given (one
//! that NAT can never claim: see [`icmp_identifier`]), and
//! never panic or count as an answer anything the network sends that does not
//! match: a wrong, truncated or garbled reply is simply no answer.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream, UdpSocket};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::{ProbeConfig, ProbeKind};

/// Longest HTTP status line read; a server that sends more before the first
/// line break has not sent a status line.
const MAX_STATUS_LINE: usize = 512;
/// Largest DNS reply read (the classic UDP limit; longer replies are cut,
/// which does not matter: only the header is checked).
const MAX_DNS_REPLY: usize = 512;
/// Largest ICMP packet read, IP header included.
const MAX_ICMP_PACKET: usize = 1500;
/// Payload of our echo requests (targets send it back).
const ECHO_PAYLOAD: &[u8; 16] = b"lb health probe\0";
/// `ICMP_FILTER` from `<linux/icmp.h>` (not in libc): a bit mask of the ICMP
/// types a raw socket must not receive.
const ICMP_FILTER: libc::c_int = 1;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO_REQUEST: u8 = 8;
/// `ICMP6_FILTER` from `<netinet/icmp6.h>`: a 256-bit mask of the ICMPv6
/// types a raw socket must not receive (a set bit blocks).
const ICMP6_FILTER: libc::c_int = 1;
const ICMP6_ECHO_REQUEST: u8 = 128;
const ICMP6_ECHO_REPLY: u8 = 129;

/// Where an uplink's probes leave from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    /// The uplink's interface (`SO_BINDTODEVICE`).
    pub ifname: String,
    /// The uplink's address of the probes' family, the source of every
    /// probe.
    pub source: IpAddr,
}

impl fmt::Display for Binding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.ifname, self.source)
    }
}

/// Why a probe got no (acceptable) answer.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The socket could not be opened or bound: the interface or address is
    /// gone, or lbd lacks `CAP_NET_RAW`.
    #[error("cannot open a {what} probe socket on {binding}")]
    Socket {
        what: &'static str,
        binding: String,
        #[source]
        source: io::Error,
    },
    #[error("sending to {target} failed")]
    Send {
        target: String,
        #[source]
        source: io::Error,
    },
    #[error("connecting to {target} failed")]
    Connect {
        target: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("receiving from {target} failed")]
    Recv {
        target: String,
        #[source]
        source: io::Error,
    },
    #[error("{target} answered HTTP status {got}, expected {expected}")]
    HttpStatus {
        target: SocketAddr,
        got: u16,
        expected: u16,
    },
    #[error("{target} sent no HTTP status line")]
    HttpNoStatus { target: SocketAddr },
    #[error("DNS server {server} answered with RCODE {rcode}")]
    DnsRcode { server: SocketAddr, rcode: u8 },
    #[error("cannot put {name:?} in a DNS query: {reason}")]
    DnsName { name: String, reason: &'static str },
    #[error("probe {probe} is not of the family of {binding}")]
    Family { probe: String, binding: String },
    #[error("HTTP probe of {target}: host and path must not contain line breaks")]
    HttpRequest { target: SocketAddr },
    /// The [`Pinger`]'s receive task is gone (it only stops when the pinger
    /// is dropped).
    #[error("the ICMP receiver on {ifname} stopped")]
    ReceiverStopped { ifname: String },
}

/// One probe target of an uplink, as the health driver sees it.
///
/// Implemented by [`UplinkProbe`] and by test fakes. `Display` names the
/// target in logs and transition reasons, e.g. `icmp 198.51.100.10`.
pub trait Probe: fmt::Display + Send + Sync {
    /// Probe once; resolves within `timeout` with the round-trip time.
    fn probe(&self, timeout: Duration)
        -> impl Future<Output = Result<Duration, ProbeError>> + Send;
}

/// The ICMP echo identifier for the uplink at position `index`: counted down
/// from the top of `local_ports`, the kernel's `ip_local_port_range`; `None`
/// when the range has no room for it.
///
/// The data plane's NAT keeps a client's echo identifier unless it lies in
/// that range (the router's own), and otherwise picks one from the NAT port
/// range, which never overlaps it. So an identifier in the local range can
/// never be claimed by a client's ping, and replies to probes always reach
/// the kernel instead of being translated to a client.
pub fn icmp_identifier(index: usize, local_ports: (u16, u16)) -> Option<u16> {
    let (lo, hi) = (
        local_ports.0.min(local_ports.1).max(1),
        local_ports.0.max(local_ports.1),
    );
    hi.checked_sub(u16::try_from(index).ok()?)
        .filter(|id| *id >= lo)
}

/// A probe of one target through one uplink, built from its configuration.
#[derive(Debug)]
pub enum UplinkProbe {
    Icmp {
        pinger: Arc<Pinger>,
        target: IpAddr,
    },
    Tcp {
        binding: Arc<Binding>,
        target: SocketAddr,
    },
    Http {
        binding: Arc<Binding>,
        target: SocketAddr,
        host: String,
        path: String,
        expect_status: u16,
    },
    Dns {
        binding: Arc<Binding>,
        server: SocketAddr,
        query: String,
    },
}

impl UplinkProbe {
    /// The probes of one uplink, in configuration order. Opens the uplink's
    /// [`Pinger`] (with `icmp_ident`) when there is an ICMP probe, so this
    /// must run inside the tokio runtime.
    pub fn for_uplink(
        binding: Binding,
        icmp_ident: u16,
        probes: &[ProbeConfig],
    ) -> Result<Vec<UplinkProbe>, ProbeError> {
        let binding = Arc::new(binding);
        let mut pinger = None;
        let mut out = Vec::with_capacity(probes.len());
        for probe in probes {
            if probe.kind.is_ipv6() != binding.source.is_ipv6() {
                return Err(ProbeError::Family {
                    probe: probe.kind.to_string(),
                    binding: binding.to_string(),
                });
            }
            out.push(match &probe.kind {
                ProbeKind::Icmp { target } => {
                    let pinger = match &pinger {
                        Some(pinger) => Arc::clone(pinger),
                        None => {
                            let opened = Arc::new(Pinger::open(&binding, icmp_ident)?);
                            pinger = Some(Arc::clone(&opened));
                            opened
                        }
                    };
                    UplinkProbe::Icmp {
                        pinger,
                        target: *target,
                    }
                }
                ProbeKind::Tcp { target } => UplinkProbe::Tcp {
                    binding: Arc::clone(&binding),
                    target: *target,
                },
                ProbeKind::Http {
                    target,
                    host,
                    path,
                    expect_status,
                } => {
                    // Check host and path once, here, rather than on every probe.
                    http_request(*target, host, path)?;
                    UplinkProbe::Http {
                        binding: Arc::clone(&binding),
                        target: *target,
                        host: host.clone(),
                        path: path.clone(),
                        expect_status: *expect_status,
                    }
                }
                ProbeKind::Dns { server, query } => {
                    // Check the name once, here, rather than on every probe.
                    encode_query(0, query)?;
                    UplinkProbe::Dns {
                        binding: Arc::clone(&binding),
                        server: *server,
                        query: query.clone(),
                    }
                }
            });
        }
        Ok(out)
    }
}

impl fmt::Display for UplinkProbe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Icmp { target, .. } => write!(f, "icmp {target}"),
            Self::Tcp { target, .. } => write!(f, "tcp {target}"),
            Self::Http {
                host,
                path,
                expect_status,
                ..
            } => write!(f, "http http://{host}{path} (expect {expect_status})"),
            Self::Dns { server, query, .. } => write!(f, "dns {server} A {query}"),
        }
    }
}

impl Probe for UplinkProbe {
    async fn probe(&self, timeout: Duration) -> Result<Duration, ProbeError> {
        match self {
            Self::Icmp { pinger, target } => pinger.ping(*target, timeout).await,
            Self::Tcp { binding, target } => tcp_connect(binding, *target, timeout).await,
            Self::Http {
                binding,
                target,
                host,
                path,
                expect_status,
            } => http_get(binding, *target, host, path, *expect_status, timeout).await,
            Self::Dns {
                binding,
                server,
                query,
            } => dns_query(binding, *server, query, timeout).await,
        }
    }
}

/// Runs `work` against a deadline: the round-trip time since now, or
/// [`ProbeError::Timeout`].
async fn timed<F>(timeout: Duration, work: F) -> Result<Duration, ProbeError>
where
    F: Future<Output = Result<(), ProbeError>>,
{
    let start = Instant::now();
    match tokio::time::timeout(timeout, work).await {
        Ok(Ok(())) => Ok(start.elapsed()),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(ProbeError::Timeout(timeout)),
    }
}

// ---------------------------------------------------------------------------
// ICMP echo.

/// The uplink's raw ICMP socket, shared by all its ICMP probes, and the task
/// that receives echo replies on it. Dropping the pinger stops the task.
#[derive(Debug)]
pub struct Pinger {
    shared: Arc<PingShared>,
    receiver: JoinHandle<()>,
}

#[derive(Debug)]
struct PingShared {
    socket: AsyncFd<Socket>,
    /// ICMPv6 (on an IPv6 binding) rather than ICMP.
    v6: bool,
    ident: u16,
    ifname: String,
    next_seq: AtomicU16,
    /// Probes in flight by sequence number: who must answer, and where to
    /// report the time the answer arrived.
    waiting: Mutex<HashMap<u16, Waiter>>,
}

#[derive(Debug)]
struct Waiter {
    target: IpAddr,
    answered: oneshot::Sender<Instant>,
}

impl PingShared {
    fn waiting(&self) -> std::sync::MutexGuard<'_, HashMap<u16, Waiter>> {
        // The map stays consistent even if a holder panicked: every critical
        // section is a single insert or remove.
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Removes a probe's entry from the waiting map however the probe ends
/// (answer, error, timeout, or its future dropped).
struct Registration<'a> {
    shared: &'a PingShared,
    seq: u16,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.shared.waiting().remove(&self.seq);
    }
}

impl Pinger {
    /// Opens the raw ICMP socket of `binding` (needs `CAP_NET_RAW`) and
    /// starts its receive task; must run inside the tokio runtime. Every echo
    /// request carries the identifier `ident`.
    pub fn open(binding: &Binding, ident: u16) -> Result<Self, ProbeError> {
        let socket_error = |source| ProbeError::Socket {
            what: "raw ICMP",
            binding: binding.to_string(),
            source,
        };
        let socket = raw_icmp_socket(binding).map_err(socket_error)?;
        // SAFETY: the `Socket` owns its descriptor, keeps it open until the
        // `AsyncFd` drops it, and is never taken out of the `AsyncFd`.
        let socket =
            unsafe { AsyncFd::register(socket) }.map_err(|e| socket_error(e.into_parts().1))?;
        let shared = Arc::new(PingShared {
            socket,
            v6: binding.source.is_ipv6(),
            ident,
            ifname: binding.ifname.clone(),
            next_seq: AtomicU16::new(rand::random()),
            waiting: Mutex::new(HashMap::new()),
        });
        let receiver = tokio::spawn(receive_replies(Arc::clone(&shared)));
        Ok(Self { shared, receiver })
    }

    /// The identifier of this pinger's echo requests.
    pub fn ident(&self) -> u16 {
        self.shared.ident
    }

    /// One echo request to `target`; the round-trip time of its reply.
    pub async fn ping(&self, target: IpAddr, timeout: Duration) -> Result<Duration, ProbeError> {
        let (answered, reply) = oneshot::channel();
        let registration = self.register(target, answered);
        let request = if self.shared.v6 {
            echo_request6(self.shared.ident, registration.seq)
        } else {
            echo_request(self.shared.ident, registration.seq)
        };
        let start = Instant::now();
        let exchange = async {
            self.send(&request, target).await?;
            reply.await.map_err(|_| ProbeError::ReceiverStopped {
                ifname: self.shared.ifname.clone(),
            })
        };
        let result = match tokio::time::timeout(timeout, exchange).await {
            Ok(Ok(arrived)) => Ok(arrived.saturating_duration_since(start)),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(ProbeError::Timeout(timeout)),
        };
        drop(registration);
        result
    }

    /// Takes the next free sequence number for a probe of `target`.
    fn register(&self, target: IpAddr, answered: oneshot::Sender<Instant>) -> Registration<'_> {
        let mut waiting = self.shared.waiting();
        // Probes in flight are at most targets x timeout / interval (a few
        // dozen), far fewer than 65536 sequence numbers: this loop ends,
        // nearly always at the first try.
        let mut seq = self.shared.next_seq.fetch_add(1, Ordering::Relaxed);
        while waiting.contains_key(&seq) {
            seq = self.shared.next_seq.fetch_add(1, Ordering::Relaxed);
        }
        waiting.insert(seq, Waiter { target, answered });
        Registration {
            shared: &self.shared,
            seq,
        }
    }

    async fn send(&self, packet: &[u8], target: IpAddr) -> Result<(), ProbeError> {
        let to = SockAddr::from(SocketAddr::new(target, 0));
        loop {
            let mut ready = self
                .shared
                .socket
                .writable()
                .await
                .map_err(|source| send_error(target, source))?;
            match ready.try_io(|socket| socket.get_ref().send_to(packet, &to)) {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(source)) => return Err(send_error(target, source)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl Drop for Pinger {
    fn drop(&mut self) {
        self.receiver.abort();
    }
}

fn send_error(target: IpAddr, source: io::Error) -> ProbeError {
    ProbeError::Send {
        target: target.to_string(),
        source,
    }
}

/// Mark a probe socket's packets as lbd's own probes (`SO_MARK`): lb's
/// slow-path rules never classify them, so a probe always leaves by the
/// uplink it is bound to, whatever the operator's rules say.
fn mark_probe(socket: &impl std::os::fd::AsRawFd) -> io::Result<()> {
    let mark: u32 = crate::reconcile::nftables::PROBE_MARK;
    // SAFETY: `mark` is a live u32, the size the kernel expects for
    // SO_MARK, and the descriptor belongs to `socket`.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MARK,
            (&mark as *const u32).cast(),
            std::mem::size_of::<u32>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A raw ICMP (or ICMPv6, on an IPv6 binding) socket bound to the
/// uplink's interface and address, that receives echo replies only.
fn raw_icmp_socket(binding: &Binding) -> io::Result<Socket> {
    let socket = match binding.source {
        IpAddr::V4(_) => Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4))?,
        IpAddr::V6(_) => Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6))?,
    };
    mark_probe(&socket)?;
    socket.bind_device(Some(binding.ifname.as_bytes()))?;
    socket.bind(&SocketAddr::new(binding.source, 0).into())?;
    match binding.source {
        IpAddr::V4(_) => {
            let blocked: u32 = !(1 << ICMP_ECHO_REPLY);
            set_filter(&socket, libc::SOL_RAW, ICMP_FILTER, &blocked)?;
        }
        IpAddr::V6(_) => {
            let mut blocked = [u32::MAX; 8];
            let reply = usize::from(ICMP6_ECHO_REPLY);
            blocked[reply / 32] &= !(1 << (reply % 32));
            set_filter(&socket, libc::IPPROTO_ICMPV6, ICMP6_FILTER, &blocked)?;
        }
    }
    socket.set_nonblocking(true)?;
    Ok(socket)
}

/// Sets a raw socket's filter of ICMP types (`value`, as the kernel
/// lays it out).
fn set_filter<T>(
    socket: &Socket,
    level: libc::c_int,
    name: libc::c_int,
    value: &T,
) -> io::Result<()> {
    // SAFETY: `value` is live for the call and `size_of::<T>()` long, the
    // layout the kernel expects for this option (a u32 for ICMP_FILTER,
    // eight for ICMP6_FILTER), and the descriptor belongs to `socket`.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(socket),
            level,
            name,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The receive task: reads every ICMP packet of the socket and completes the
/// probe it answers, if any.
async fn receive_replies(shared: Arc<PingShared>) {
    let mut buf = [0u8; MAX_ICMP_PACKET];
    loop {
        let read = match shared.socket.readable().await {
            Ok(mut ready) => match ready.try_io(|socket| recv_from(socket.get_ref(), &mut buf)) {
                Ok(read) => read,
                Err(_would_block) => continue,
            },
            Err(e) => Err(e),
        };
        let (len, from) = match read {
            Ok(got) => got,
            Err(e) => {
                // Errors on a raw socket are rare and transient (the
                // interface went away for a moment); don't spin on them.
                log::debug!("ICMP probe socket on {}: {e}", shared.ifname);
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let arrived = Instant::now();
        let packet = buf.get(..len).unwrap_or_default();
        let reply = match from {
            // A raw ICMPv6 socket delivers the message alone, its checksum
            // checked by the kernel; the source comes with it.
            Some(IpAddr::V6(source)) if shared.v6 => parse_echo_reply6(packet, source),
            _ if shared.v6 => None,
            _ => parse_echo_reply(packet),
        };
        let Some(reply) = reply else {
            continue;
        };
        if reply.ident != shared.ident {
            continue;
        }
        let mut waiting = shared.waiting();
        if waiting
            .get(&reply.seq)
            .is_some_and(|w| w.target == reply.source)
        {
            if let Some(waiter) = waiting.remove(&reply.seq) {
                // The probe may have timed out this instant; nobody to tell.
                let _ = waiter.answered.send(arrived);
            }
        }
    }
}

/// One datagram of a raw socket, and the address it came from.
fn recv_from(socket: &Socket, buf: &mut [u8]) -> io::Result<(usize, Option<IpAddr>)> {
    // SAFETY: viewing initialised bytes as `MaybeUninit` is sound, and the
    // kernel writes only initialised bytes into them.
    let uninit = unsafe { &mut *(std::ptr::from_mut::<[u8]>(buf) as *mut [MaybeUninit<u8>]) };
    let (len, from) = socket.recv_from(uninit)?;
    Ok((len, from.as_socket().map(|a| a.ip())))
}

/// The internet checksum (RFC 1071) of `data`.
fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|pair| match pair {
            [hi, lo] => u32::from(u16::from_be_bytes([*hi, *lo])),
            [hi] => u32::from(u16::from_be_bytes([*hi, 0])),
            _ => 0,
        })
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An ICMP echo request (the kernel adds the IP header).
fn echo_request(ident: u16, seq: u16) -> Vec<u8> {
    let mut packet = Vec::with_capacity(8 + ECHO_PAYLOAD.len());
    packet.extend_from_slice(&[ICMP_ECHO_REQUEST, 0, 0, 0]);
    packet.extend_from_slice(&ident.to_be_bytes());
    packet.extend_from_slice(&seq.to_be_bytes());
    packet.extend_from_slice(ECHO_PAYLOAD);
    let sum = checksum(&packet);
    packet[2..4].copy_from_slice(&sum.to_be_bytes());
    packet
}

/// An ICMPv6 echo request; its checksum is the kernel's (it covers a
/// pseudo-header the kernel chooses: a raw ICMPv6 socket always fills it).
fn echo_request6(ident: u16, seq: u16) -> Vec<u8> {
    let mut packet = Vec::with_capacity(8 + ECHO_PAYLOAD.len());
    packet.extend_from_slice(&[ICMP6_ECHO_REQUEST, 0, 0, 0]);
    packet.extend_from_slice(&ident.to_be_bytes());
    packet.extend_from_slice(&seq.to_be_bytes());
    packet.extend_from_slice(ECHO_PAYLOAD);
    packet
}

/// The fields of an echo reply that matter for matching.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct EchoReply {
    source: IpAddr,
    ident: u16,
    seq: u16,
}

/// Reads an IPv4 packet as a raw ICMP socket delivers it (IP header
/// included); `None` unless it is a whole, unfragmented echo reply with a
/// correct checksum.
fn parse_echo_reply(packet: &[u8]) -> Option<EchoReply> {
    let header = packet.get(..20)?;
    let (version, ihl) = (header[0] >> 4, usize::from(header[0] & 0x0f) * 4);
    let total_len = usize::from(u16::from_be_bytes([header[2], header[3]]));
    let fragment = u16::from_be_bytes([header[6], header[7]]) & 0x3fff; // MF + offset
    if version != 4 || ihl < 20 || header[9] != 1 || fragment != 0 || total_len < ihl {
        return None;
    }
    let source = Ipv4Addr::new(header[12], header[13], header[14], header[15]).into();
    let icmp = packet.get(ihl..total_len)?;
    let (kind, code) = (*icmp.first()?, *icmp.get(1)?);
    if icmp.len() < 8 || kind != ICMP_ECHO_REPLY || code != 0 || checksum(icmp) != 0 {
        return None;
    }
    Some(EchoReply {
        source,
        ident: u16::from_be_bytes([icmp[4], icmp[5]]),
        seq: u16::from_be_bytes([icmp[6], icmp[7]]),
    })
}

/// Reads an ICMPv6 message as a raw ICMPv6 socket delivers it (no IPv6
/// header; the kernel has checked its checksum) from `source`; `None`
/// unless it is a whole echo reply.
fn parse_echo_reply6(icmp: &[u8], source: Ipv6Addr) -> Option<EchoReply> {
    let [kind, code, _, _, i0, i1, s0, s1, ..] = *icmp else {
        return None;
    };
    if kind != ICMP6_ECHO_REPLY || code != 0 {
        return None;
    }
    Some(EchoReply {
        source: source.into(),
        ident: u16::from_be_bytes([i0, i1]),
        seq: u16::from_be_bytes([s0, s1]),
    })
}

// ---------------------------------------------------------------------------
// TCP and HTTP.

/// A TCP socket bound to the uplink, not yet connected.
fn bound_tcp(binding: &Binding) -> Result<TcpSocket, ProbeError> {
    let open = || -> io::Result<TcpSocket> {
        let socket = match binding.source {
            IpAddr::V4(_) => TcpSocket::new_v4()?,
            IpAddr::V6(_) => TcpSocket::new_v6()?,
        };
        mark_probe(&socket)?;
        socket.bind_device(Some(binding.ifname.as_bytes()))?;
        socket.bind(SocketAddr::new(binding.source, 0))?;
        Ok(socket)
    };
    open().map_err(|source| ProbeError::Socket {
        what: "TCP",
        binding: binding.to_string(),
        source,
    })
}

async fn connect(binding: &Binding, target: SocketAddr) -> Result<TcpStream, ProbeError> {
    bound_tcp(binding)?
        .connect(target)
        .await
        .map_err(|source| ProbeError::Connect { target, source })
}

/// TCP connect: answered by a SYN-ACK or a RST (the path works either way).
/// The connection is then reset rather than closed, as load balancers' TCP
/// checks do, so that probing leaves no TIME_WAIT sockets behind.
pub async fn tcp_connect(
    binding: &Binding,
    target: SocketAddr,
    timeout: Duration,
) -> Result<Duration, ProbeError> {
    timed(timeout, async {
        match connect(binding, target).await {
            Ok(stream) => {
                // Without the reset the connection still closes normally.
                let _ = stream.set_zero_linger();
                Ok(())
            }
            Err(ProbeError::Connect { source, .. })
                if source.kind() == io::ErrorKind::ConnectionRefused =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    })
    .await
}

/// The request of an HTTP probe: a GET of `path` with `Host: host`.
fn http_request(target: SocketAddr, host: &str, path: &str) -> Result<Vec<u8>, ProbeError> {
    if [host, path].iter().any(|s| s.contains(['\r', '\n'])) {
        return Err(ProbeError::HttpRequest { target });
    }
    Ok(format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: lbd-health-probe\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    )
    .into_bytes())
}

/// HTTP GET of `path` with `Host: host`, HTTP/1.1 with `Connection:
/// close`: answered when the status line carries `expect_status`. Reads the
/// status line only, at most [`MAX_STATUS_LINE`] bytes.
pub async fn http_get(
    binding: &Binding,
    target: SocketAddr,
    host: &str,
    path: &str,
    expect_status: u16,
    timeout: Duration,
) -> Result<Duration, ProbeError> {
    let request = http_request(target, host, path)?;
    timed(timeout, async {
        let mut stream = connect(binding, target).await?;
        let recv_error = |source| ProbeError::Recv {
            target: target.to_string(),
            source,
        };
        stream
            .write_all(&request)
            .await
            .map_err(|source| ProbeError::Send {
                target: target.to_string(),
                source,
            })?;
        let mut buf = [0u8; MAX_STATUS_LINE];
        let mut len = 0;
        while len < buf.len() && !buf[..len].contains(&b'\n') {
            let read = stream.read(&mut buf[len..]).await.map_err(recv_error)?;
            if read == 0 {
                break;
            }
            len += read;
        }
        match parse_status_line(&buf[..len]) {
            Some(status) if status == expect_status => Ok(()),
            Some(got) => Err(ProbeError::HttpStatus {
                target,
                got,
                expected: expect_status,
            }),
            None => Err(ProbeError::HttpNoStatus { target }),
        }
    })
    .await
}

/// The status code of an HTTP/1.x status line (`HTTP/1.1 200 OK\r\n`) at the
/// start of `head`; `None` unless the line is complete and well formed.
fn parse_status_line(head: &[u8]) -> Option<u16> {
    let end = head.iter().position(|&b| b == b'\n')?;
    let line = head[..end].strip_suffix(b"\r").unwrap_or(&head[..end]);
    let rest = line.strip_prefix(b"HTTP/1.")?;
    let (minor, rest) = rest.split_first()?;
    let rest = rest.strip_prefix(b" ")?;
    let code = rest.get(..3)?;
    let after = rest.get(3..)?;
    if !minor.is_ascii_digit()
        || !code.iter().all(u8::is_ascii_digit)
        || !(after.is_empty() || after.starts_with(b" "))
    {
        return None;
    }
    let status = code.iter().fold(0u16, |n, d| n * 10 + u16::from(d - b'0'));
    (100..=599).contains(&status).then_some(status)
}

// ---------------------------------------------------------------------------
// DNS.

/// DNS query for the A record of `query`: answered by a reply with our id,
/// the response bit set and RCODE 0 (NOERROR; an empty answer counts, the
/// server did answer). Replies with another id or garbled ones are ignored;
/// an error RCODE fails the probe.
pub async fn dns_query(
    binding: &Binding,
    server: SocketAddr,
    query: &str,
    timeout: Duration,
) -> Result<Duration, ProbeError> {
    let id: u16 = rand::random();
    let packet = encode_query(id, query)?;
    timed(timeout, async {
        let socket = bound_udp(binding).await?;
        socket
            .connect(server)
            .await
            .map_err(|source| ProbeError::Connect {
                target: server,
                source,
            })?;
        socket
            .send(&packet)
            .await
            .map_err(|source| ProbeError::Send {
                target: server.to_string(),
                source,
            })?;
        let mut buf = [0u8; MAX_DNS_REPLY];
        loop {
            let len = socket
                .recv(&mut buf)
                .await
                .map_err(|source| ProbeError::Recv {
                    target: server.to_string(),
                    source,
                })?;
            match check_reply(&buf[..len], id) {
                Ok(()) => return Ok(()),
                Err(ReplyError::Rcode(rcode)) => {
                    return Err(ProbeError::DnsRcode { server, rcode })
                }
                Err(other) => {
                    log::trace!("DNS probe of {server}: ignoring a reply: {other:?}");
                }
            }
        }
    })
    .await
}

/// A UDP socket bound to the uplink.
async fn bound_udp(binding: &Binding) -> Result<UdpSocket, ProbeError> {
    let socket_error = |source| ProbeError::Socket {
        what: "UDP",
        binding: binding.to_string(),
        source,
    };
    let socket = UdpSocket::bind(SocketAddr::new(binding.source, 0))
        .await
        .map_err(socket_error)?;
    mark_probe(&socket).map_err(socket_error)?;
    socket
        .bind_device(Some(binding.ifname.as_bytes()))
        .map_err(socket_error)?;
    Ok(socket)
}

/// A standard query (recursion desired) for the A record of `name`.
fn encode_query(id: u16, name: &str) -> Result<Vec<u8>, ProbeError> {
    let bad = |reason| ProbeError::DnsName {
        name: name.to_owned(),
        reason,
    };
    let mut packet = Vec::with_capacity(12 + name.len() + 6);
    packet.extend_from_slice(&id.to_be_bytes());
    packet.extend_from_slice(&[0x01, 0x00]); // QR=0, opcode QUERY, RD=1
    packet.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]); // QD=1, AN=NS=AR=0
    let trimmed = name.strip_suffix('.').unwrap_or(name);
    if trimmed.is_empty() {
        return Err(bad("the name is empty"));
    }
    let mut encoded_len = 1; // the root label
    for label in trimmed.split('.') {
        let len = u8::try_from(label.len())
            .ok()
            .filter(|len| (1..=63).contains(len))
            .ok_or_else(|| bad("labels have 1 to 63 bytes"))?;
        encoded_len += 1 + label.len();
        packet.push(len);
        packet.extend_from_slice(label.as_bytes());
    }
    if encoded_len > 255 {
        return Err(bad("a name has at most 255 bytes"));
    }
    packet.push(0);
    packet.extend_from_slice(&[0, 1, 0, 1]); // QTYPE A, QCLASS IN
    Ok(packet)
}

/// Why a datagram is not the answer to our query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReplyError {
    /// Shorter than a DNS header.
    Truncated,
    /// Another query's id.
    OtherId(u16),
    /// The QR bit is clear: a query, not a response.
    NotAResponse,
    /// Our response, with an error code (2 SERVFAIL, 3 NXDOMAIN, ...).
    Rcode(u8),
}

/// Checks the header of a DNS reply to the query with `id`.
fn check_reply(reply: &[u8], id: u16) -> Result<(), ReplyError> {
    let [id_hi, id_lo, flags_hi, flags_lo, ..] = *reply else {
        return Err(ReplyError::Truncated);
    };
    if reply.len() < 12 {
        return Err(ReplyError::Truncated);
    }
    let got = u16::from_be_bytes([id_hi, id_lo]);
    if got != id {
        return Err(ReplyError::OtherId(got));
    }
    if flags_hi & 0x80 == 0 {
        return Err(ReplyError::NotAResponse);
    }
    match flags_lo & 0x0f {
        0 => Ok(()),
        rcode => Err(ReplyError::Rcode(rcode)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An IPv4 packet from `source` around an ICMP message.
    fn ipv4(source: Ipv4Addr, icmp: &[u8]) -> Vec<u8> {
        let total = (20 + icmp.len()) as u16;
        let mut packet = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 1, 0, 0];
        packet[2..4].copy_from_slice(&total.to_be_bytes());
        packet.extend_from_slice(&source.octets());
        packet.extend_from_slice(&[100, 64, 1, 2]);
        packet.extend_from_slice(icmp);
        packet
    }

    /// An echo reply as a target sends it: our request with type 0.
    fn echo_reply(ident: u16, seq: u16) -> Vec<u8> {
        let mut icmp = echo_request(ident, seq);
        icmp[0] = ICMP_ECHO_REPLY;
        icmp[2..4].copy_from_slice(&[0, 0]);
        let sum = checksum(&icmp);
        icmp[2..4].copy_from_slice(&sum.to_be_bytes());
        icmp
    }

    const TARGET: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);

    #[test]
    fn echo_request_has_a_valid_checksum() {
        let request = echo_request(0xfff0, 7);
        assert_eq!(request[0], ICMP_ECHO_REQUEST);
        assert_eq!(&request[4..8], &[0xff, 0xf0, 0, 7]);
        assert_eq!(checksum(&request), 0);
        // RFC 1071's example.
        assert_eq!(
            checksum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]),
            !0xddf2
        );
        assert_eq!(checksum(&[0xff]), !0xff00);
    }

    #[test]
    fn parses_echo_replies() {
        let packet = ipv4(TARGET, &echo_reply(0xfff0, 7));
        assert_eq!(
            parse_echo_reply(&packet),
            Some(EchoReply {
                source: TARGET.into(),
                ident: 0xfff0,
                seq: 7
            })
        );
        // IP options move the ICMP header.
        let mut with_options = packet.clone();
        with_options[0] = 0x46;
        with_options.splice(20..20, [1, 1, 1, 0]);
        let total = with_options.len() as u16;
        with_options[2..4].copy_from_slice(&total.to_be_bytes());
        assert_eq!(parse_echo_reply(&with_options).map(|r| r.seq), Some(7));
        // Trailing bytes beyond the IP total length (Ethernet padding) are
        // ignored.
        let mut padded = packet.clone();
        padded.extend_from_slice(&[0; 6]);
        assert!(parse_echo_reply(&padded).is_some());
    }

    #[test]
    fn icmpv6_echo_requests_and_replies() {
        let request = echo_request6(0xfff0, 7);
        assert_eq!(&request[..8], &[128, 0, 0, 0, 0xff, 0xf0, 0, 7]);
        assert_eq!(&request[8..], ECHO_PAYLOAD);
        let from: Ipv6Addr = "2001:db8:ff::10".parse().expect("address");
        let mut reply = request.clone();
        reply[0] = ICMP6_ECHO_REPLY;
        assert_eq!(
            parse_echo_reply6(&reply, from),
            Some(EchoReply {
                source: from.into(),
                ident: 0xfff0,
                seq: 7
            })
        );
        assert_eq!(parse_echo_reply6(&request, from), None, "a request");
        assert_eq!(parse_echo_reply6(&reply[..7], from), None, "cut short");
        reply[1] = 1;
        assert_eq!(parse_echo_reply6(&reply, from), None, "a code");
    }

    #[test]
    fn refuses_everything_that_is_not_a_whole_echo_reply() {
        let good = ipv4(TARGET, &echo_reply(0xfff0, 7));
        assert!(parse_echo_reply(&[]).is_none());
        for len in 0..good.len() {
            assert!(parse_echo_reply(&good[..len]).is_none(), "cut at {len}");
        }
        type Damage = fn(&mut Vec<u8>);
        let broken: [(&str, Damage); 9] = [
            ("IPv6", |p| p[0] = 0x65),
            ("IHL below 5", |p| p[0] = 0x44),
            ("UDP", |p| p[9] = 17),
            ("a fragment", |p| p[6] = 0x20),
            ("total length below the header", |p| {
                p[2..4].copy_from_slice(&[0, 12])
            }),
            ("an echo request", |p| p[20] = ICMP_ECHO_REQUEST),
            ("a code", |p| p[21] = 1),
            ("a bad checksum", |p| p[22] ^= 1),
            ("garbled payload", |p| p[30] ^= 0x55),
        ];
        for (what, damage) in broken {
            let mut packet = good.clone();
            damage(&mut packet);
            assert!(parse_echo_reply(&packet).is_none(), "{what}");
        }
        // An ICMP message shorter than an echo header.
        assert!(parse_echo_reply(&ipv4(TARGET, &[0, 0, 0xff, 0xff])).is_none());
    }

    #[test]
    fn identifiers_come_from_the_routers_own_range() {
        assert_eq!(icmp_identifier(0, (32768, 60999)), Some(60999));
        assert_eq!(icmp_identifier(15, (32768, 60999)), Some(60984));
        assert_eq!(icmp_identifier(0, (60999, 32768)), Some(60999), "reversed");
        assert_eq!(icmp_identifier(1, (100, 101)), Some(100));
        assert_eq!(icmp_identifier(2, (100, 101)), None);
        assert_eq!(icmp_identifier(0, (0, 0)), None, "identifier 0 is not used");
        assert_eq!(icmp_identifier(70000, (1, 65535)), None);
    }

    #[test]
    fn http_status_lines() {
        assert_eq!(parse_status_line(b"HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(
            parse_status_line(b"HTTP/1.0 503 Busy\r\nServer: x\r\n"),
            Some(503)
        );
        assert_eq!(parse_status_line(b"HTTP/1.1 204\r\n"), Some(204));
        assert_eq!(parse_status_line(b"HTTP/1.1 301 Moved\n"), Some(301));
        for bad in [
            &b""[..],
            b"HTTP/1.1 200 OK",         // no line end yet
            b"HTTP/2 200\r\n",          // not HTTP/1.x
            b"HTTP/1.1 20\r\n",         // two digits
            b"HTTP/1.1 2000 OK\r\n",    // four digits
            b"HTTP/1.1 abc OK\r\n",     // not digits
            b"HTTP/1.1  200 OK\r\n",    // two spaces
            b"HTTP/1.x 200 OK\r\n",     // minor not a digit
            b"HTTP/1.1 099 Odd\r\n",    // out of range
            b"http/1.1 200 OK\r\n",     // case matters
            b"SSH-2.0-OpenSSH_9.6\r\n", // another protocol
            b"\xff\xfe\x00\n",
        ] {
            assert_eq!(
                parse_status_line(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn http_request_shape() {
        let target = SocketAddr::from((TARGET, 80));
        let request = http_request(target, "example.net", "/health?x=1").expect("valid");
        let text = String::from_utf8(request).expect("ASCII");
        assert!(text.starts_with("GET /health?x=1 HTTP/1.1\r\nHost: example.net\r\n"));
        assert!(text.contains("\r\nConnection: close\r\n"));
        assert!(text.ends_with("\r\n\r\n"));
        assert!(http_request(target, "a\r\nX-Evil: 1", "/").is_err());
        assert!(http_request(target, "a", "/\n").is_err());
    }

    #[test]
    fn dns_query_encoding() {
        let packet = encode_query(0xbeef, "example.net").expect("valid");
        let mut expected = vec![0xbe, 0xef, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        expected.extend_from_slice(b"\x07example\x03net\x00\x00\x01\x00\x01");
        assert_eq!(packet, expected);
        assert_eq!(
            encode_query(0xbeef, "example.net.").expect("valid"),
            expected
        );
        for bad in ["", ".", "a..b", ".a", &"a".repeat(64)] {
            assert!(encode_query(1, bad).is_err(), "{bad:?}");
        }
        let long = vec!["a".repeat(63); 4].join(".");
        assert!(encode_query(1, &long).is_err(), "256 bytes encoded");
        let longest = format!("{}.{}", vec!["a".repeat(63); 3].join("."), "a".repeat(61));
        assert!(encode_query(1, &longest).is_ok(), "255 bytes encoded");
    }

    /// A reply header: `id`, flags, and the counts of a one-question reply.
    fn reply(id: u16, flags: [u8; 2]) -> Vec<u8> {
        let mut packet = id.to_be_bytes().to_vec();
        packet.extend_from_slice(&flags);
        packet.extend_from_slice(&[0, 1, 0, 1, 0, 0, 0, 0]);
        packet
    }

    #[test]
    fn dns_reply_checks() {
        assert_eq!(check_reply(&reply(7, [0x81, 0x80]), 7), Ok(()));
        // NOERROR without answers still shows that the server answered.
        let mut empty = reply(7, [0x81, 0x80]);
        empty[7] = 0;
        assert_eq!(check_reply(&empty, 7), Ok(()));
        assert_eq!(
            check_reply(&reply(8, [0x81, 0x80]), 7),
            Err(ReplyError::OtherId(8))
        );
        assert_eq!(
            check_reply(&reply(7, [0x01, 0x00]), 7),
            Err(ReplyError::NotAResponse)
        );
        assert_eq!(
            check_reply(&reply(7, [0x81, 0x83]), 7),
            Err(ReplyError::Rcode(3))
        );
        assert_eq!(
            check_reply(&reply(7, [0x81, 0x82]), 7),
            Err(ReplyError::Rcode(2))
        );
        let whole = reply(7, [0x81, 0x80]);
        for len in 0..12 {
            assert_eq!(
                check_reply(&whole[..len], 7),
                Err(ReplyError::Truncated),
                "{len} bytes"
            );
        }
        // Our own query echoed back is not an answer.
        let query = encode_query(7, "example.net").expect("valid");
        assert_eq!(check_reply(&query, 7), Err(ReplyError::NotAResponse));
    }

    /// Real probes through veth pairs between namespaces of their own:
    ///
    /// ```text
    /// router: r0 10.201.1.2 -- a0 10.201.1.1 :far (10.201.9.9 on lo: TCP,
    ///         r1 10.201.2.2 -- b0 10.201.2.1 :other     HTTP and DNS servers)
    /// ```
    ///
    /// The router's only route to 10.201.9.9 is its default via r0; probes
    /// bound to r1 must never reach it.
    mod lab {
        use std::sync::mpsc as std_mpsc;
        use std::thread;

        use tokio::net::{TcpListener, UdpSocket};

        use super::*;
        use crate::observe::linkwatch::testns::NetNs;

        const FAR: Ipv4Addr = Ipv4Addr::new(10, 201, 9, 9);
        const GATEWAY_A: Ipv4Addr = Ipv4Addr::new(10, 201, 1, 1);
        const NOBODY: Ipv4Addr = Ipv4Addr::new(10, 201, 9, 10);
        const TCP_PORT: u16 = 7001;
        const HTTP_PORT: u16 = 7002;
        const CLOSED_PORT: u16 = 7003;
        const DNS_PORT: u16 = 7053;
        // A bound for answers that do come, not a speed target: a busy
        // machine may take a while to schedule the far end's servers.
        const TIMEOUT: Duration = Duration::from_secs(2);

        fn wan_a() -> Binding {
            Binding {
                ifname: "r0".into(),
                source: Ipv4Addr::new(10, 201, 1, 2).into(),
            }
        }

        fn wan_b() -> Binding {
            Binding {
                ifname: "r1".into(),
                source: Ipv4Addr::new(10, 201, 2, 2).into(),
            }
        }

        fn at(port: u16) -> SocketAddr {
            SocketAddr::from((FAR, port))
        }

        /// The far end's servers, stopped (and their sockets closed) on drop.
        struct Servers {
            stop: Option<oneshot::Sender<()>>,
            thread: Option<thread::JoinHandle<()>>,
        }

        impl Drop for Servers {
            fn drop(&mut self) {
                if let Some(stop) = self.stop.take() {
                    let _ = stop.send(());
                }
                if let Some(thread) = self.thread.take() {
                    let _ = thread.join();
                }
            }
        }

        fn start_servers(far: &NetNs) -> Servers {
            let (stop, stopped) = oneshot::channel();
            let (ready_tx, ready) = std_mpsc::channel();
            let thread = far.spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime");
                runtime.block_on(serve(stopped, ready_tx));
            });
            ready
                .recv_timeout(Duration::from_secs(5))
                .expect("servers started");
            Servers {
                stop: Some(stop),
                thread: Some(thread),
            }
        }

        async fn serve(stopped: oneshot::Receiver<()>, ready: std_mpsc::Sender<()>) {
            let tcp = TcpListener::bind(at(TCP_PORT)).await.expect("TCP port");
            let http = TcpListener::bind(at(HTTP_PORT)).await.expect("HTTP port");
            let dns = UdpSocket::bind(at(DNS_PORT)).await.expect("DNS port");
            ready.send(()).expect("test waiting");
            let accept_tcp = async {
                loop {
                    let _ = tcp.accept().await;
                }
            };
            let accept_http = async {
                loop {
                    if let Ok((stream, _)) = http.accept().await {
                        tokio::spawn(answer_http(stream));
                    }
                }
            };
            let answer_dns = async {
                let mut buf = [0u8; 512];
                loop {
                    if let Ok((len, from)) = dns.recv_from(&mut buf).await {
                        for reply in dns_replies(&buf[..len]) {
                            let _ = dns.send_to(&reply, from).await;
                        }
                    }
                }
            };
            tokio::select! {
                _ = stopped => {}
                () = accept_tcp => {}
                () = accept_http => {}
                () = answer_dns => {}
            }
        }

        /// `/ok`: 200; `/slow`: 200 after ten probe timeouts; `/garbage`: not HTTP;
        /// anything else: 503.
        async fn answer_http(mut stream: TcpStream) {
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(len) => request.extend_from_slice(&buf[..len]),
                }
            }
            let reply: &[u8] = if request.starts_with(b"GET /ok ") {
                b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            } else if request.starts_with(b"GET /slow ") {
                // Far beyond any probe's timeout.
                tokio::time::sleep(TIMEOUT * 10).await;
                b"HTTP/1.1 200 OK\r\n\r\n"
            } else if request.starts_with(b"GET /garbage ") {
                b"SSH-2.0-OpenSSH_9.6\r\n"
            } else {
                b"HTTP/1.0 503 Service Unavailable\r\n\r\n"
            };
            let _ = stream.write_all(reply).await;
        }

        /// What the DNS server sends for a query: first junk and a reply to
        /// another id (which the probe must ignore), then the real reply;
        /// NXDOMAIN for names with an `nx` label, nothing for `silent`.
        fn dns_replies(query: &[u8]) -> Vec<Vec<u8>> {
            let has_label = |label: &[u8]| query.windows(label.len()).any(|w| w == label);
            if query.len() < 12 || has_label(b"\x06silent") {
                return Vec::new();
            }
            let rcode = if has_label(b"\x02nx") { 3 } else { 0 };
            let mut reply = query.to_vec();
            reply[2] = 0x81;
            reply[3] = 0x80 | rcode;
            let mut other = reply.clone();
            other[1] ^= 1;
            vec![vec![1, 2, 3, 4, 5], other, reply]
        }

        fn build() -> Option<(NetNs, NetNs, NetNs)> {
            let test = "probe::tests::lab";
            let router = NetNs::create(test)?;
            let far = NetNs::create(test)?;
            let other = NetNs::create(test)?;
            // Distinct indexes at both ends: the kernel reports the carrier
            // of a device whose index equals its link's (a physical NIC, or
            // a veth whose peer has the same index in another namespace)
            // without urgency, up to a second late when another link event
            // happened within the last second.
            router.ip(&[
                "link",
                "add",
                "r0",
                "index",
                "50",
                "type",
                "veth",
                "peer",
                "name",
                "a0",
                "index",
                "60",
                "netns",
                far.name(),
            ]);
            router.ip(&[
                "link",
                "add",
                "r1",
                "index",
                "51",
                "type",
                "veth",
                "peer",
                "name",
                "b0",
                "index",
                "61",
                "netns",
                other.name(),
            ]);
            for (ns, ifname, address) in [
                (&router, "r0", "10.201.1.2/24"),
                (&router, "r1", "10.201.2.2/24"),
                (&far, "a0", "10.201.1.1/24"),
                (&other, "b0", "10.201.2.1/24"),
            ] {
                ns.ip(&["addr", "add", address, "dev", ifname]);
                ns.ip(&["link", "set", ifname, "up"]);
            }
            far.ip(&["link", "set", "lo", "up"]);
            far.ip(&["addr", "add", "10.201.9.9/32", "dev", "lo"]);
            router.ip(&["route", "add", "default", "via", "10.201.1.1", "dev", "r0"]);
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while !(router.has_carrier("r0") && router.has_carrier("r1")) {
                assert!(std::time::Instant::now() < deadline, "no carrier on r0/r1");
                thread::yield_now();
            }
            Some((router, far, other))
        }

        #[test]
        fn probes_through_bound_sockets() {
            let Some((router, far, _other)) = build() else {
                return;
            };
            let _servers = start_servers(&far);
            let client = router.spawn(|| {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime");
                runtime.block_on(client_checks());
            });
            if let Err(panic) = client.join() {
                std::panic::resume_unwind(panic);
            }
        }

        async fn client_checks() {
            icmp_checks().await;
            tcp_and_http_checks().await;
            dns_checks().await;
            uplink_probe_checks().await;
        }

        async fn icmp_checks() {
            let pinger = Pinger::open(&wan_a(), 0xfff0).expect("raw socket on r0");
            assert_eq!(pinger.ident(), 0xfff0);
            // Targets of one socket, at once: each gets its own reply, and
            // the silent one times out.
            let (far, gateway, nobody) = tokio::join!(
                pinger.ping(FAR.into(), TIMEOUT),
                pinger.ping(GATEWAY_A.into(), TIMEOUT),
                pinger.ping(NOBODY.into(), TIMEOUT),
            );
            let rtt = far.expect("far end answers");
            assert!(rtt < TIMEOUT, "{rtt:?}");
            gateway.expect("gateway answers");
            assert!(matches!(nobody, Err(ProbeError::Timeout(_))), "{nobody:?}");
            // Many probes of one target in flight are told apart by sequence.
            let many =
                futures::future::join_all((0..20).map(|_| pinger.ping(FAR.into(), TIMEOUT))).await;
            assert!(many.iter().all(Result::is_ok), "{many:?}");
            // A second pinger on the same interface, with another identifier,
            // sees the same replies and takes only its own.
            let second = Pinger::open(&wan_a(), 0xfff1).expect("raw socket on r0");
            let (one, two) = tokio::join!(
                pinger.ping(FAR.into(), TIMEOUT),
                second.ping(FAR.into(), TIMEOUT)
            );
            one.expect("first pinger");
            two.expect("second pinger");
            assert!(pinger.shared.waiting().is_empty(), "no probe left behind");
            // Bound to r1, the far end is unreachable, although the router's
            // default route leads there through r0.
            let other = Pinger::open(&wan_b(), 0xfff2).expect("raw socket on r1");
            let leaked = other.ping(FAR.into(), TIMEOUT).await;
            assert!(leaked.is_err(), "{leaked:?}");
            // An address that is not the interface's is refused.
            let wrong = Binding {
                ifname: "r0".into(),
                source: Ipv4Addr::new(10, 201, 7, 7).into(),
            };
            assert!(matches!(
                Pinger::open(&wrong, 1),
                Err(ProbeError::Socket { .. })
            ));
        }

        async fn tcp_and_http_checks() {
            tcp_connect(&wan_a(), at(TCP_PORT), TIMEOUT)
                .await
                .expect("listener answers");
            tcp_connect(&wan_a(), at(CLOSED_PORT), TIMEOUT)
                .await
                .expect("a RST is an answer too");
            let leaked = tcp_connect(&wan_b(), at(TCP_PORT), TIMEOUT).await;
            assert!(leaked.is_err(), "{leaked:?}");

            let get = |path: &'static str| async move {
                http_get(&wan_a(), at(HTTP_PORT), "far.test", path, 200, TIMEOUT).await
            };
            get("/ok").await.expect("200");
            let (fail, garbage, slow) = tokio::join!(get("/fail"), get("/garbage"), get("/slow"));
            assert!(
                matches!(
                    fail,
                    Err(ProbeError::HttpStatus {
                        got: 503,
                        expected: 200,
                        ..
                    })
                ),
                "{fail:?}"
            );
            assert!(
                matches!(garbage, Err(ProbeError::HttpNoStatus { .. })),
                "{garbage:?}"
            );
            assert!(matches!(slow, Err(ProbeError::Timeout(_))), "{slow:?}");
            let closed = http_get(&wan_a(), at(CLOSED_PORT), "far.test", "/ok", 200, TIMEOUT).await;
            assert!(
                matches!(closed, Err(ProbeError::Connect { .. })),
                "{closed:?}"
            );
        }

        async fn dns_checks() {
            let server = at(DNS_PORT);
            dns_query(&wan_a(), server, "ok.test", TIMEOUT)
                .await
                .expect("answered after junk and another id");
            let nx = dns_query(&wan_a(), server, "nx.test", TIMEOUT).await;
            assert!(
                matches!(nx, Err(ProbeError::DnsRcode { rcode: 3, .. })),
                "{nx:?}"
            );
            let silent = dns_query(&wan_a(), server, "silent.test", TIMEOUT).await;
            assert!(matches!(silent, Err(ProbeError::Timeout(_))), "{silent:?}");
            let leaked = dns_query(&wan_b(), server, "ok.test", TIMEOUT).await;
            assert!(leaked.is_err(), "{leaked:?}");
        }

        async fn uplink_probe_checks() {
            let configs = [
                ProbeKind::Icmp { target: FAR.into() },
                ProbeKind::Icmp {
                    target: GATEWAY_A.into(),
                },
                ProbeKind::Tcp {
                    target: at(TCP_PORT),
                },
                ProbeKind::Http {
                    target: at(HTTP_PORT),
                    host: "far.test".into(),
                    path: "/ok".into(),
                    expect_status: 200,
                },
                ProbeKind::Dns {
                    server: at(DNS_PORT),
                    query: "ok.test".into(),
                },
            ]
            .map(|kind| ProbeConfig { kind });
            let probes = UplinkProbe::for_uplink(wan_a(), 0xfff3, &configs).expect("probes");
            let names: Vec<String> = probes.iter().map(ToString::to_string).collect();
            assert_eq!(
                names,
                [
                    "icmp 10.201.9.9",
                    "icmp 10.201.1.1",
                    "tcp 10.201.9.9:7001",
                    "http http://far.test/ok (expect 200)",
                    "dns 10.201.9.9:7053 A ok.test",
                ]
            );
            match (&probes[0], &probes[1]) {
                (UplinkProbe::Icmp { pinger: a, .. }, UplinkProbe::Icmp { pinger: b, .. }) => {
                    assert!(Arc::ptr_eq(a, b), "one raw socket per uplink");
                }
                other => panic!("{other:?}"),
            }
            let results = futures::future::join_all(probes.iter().map(|p| p.probe(TIMEOUT))).await;
            for (probe, result) in probes.iter().zip(&results) {
                assert!(result.is_ok(), "{probe}: {result:?}");
            }
        }

        /// The three modules together on real time: the health driver on
        /// real probes and link events. A path cut beyond the gateway is
        /// down in about 300 ms (fall 3 x interval 50 ms + timeout 150 ms);
        /// a carrier loss at once.
        #[test]
        fn health_driver_on_real_probes_and_link_events() {
            use crate::health::{self, HealthEvent, Monitor, Snapshot, State};
            use crate::observe::linkwatch::LinkWatch;

            let Some((router, far, _other)) = build() else {
                return;
            };
            let _servers = start_servers(&far);
            let (forward, events) = std_mpsc::channel::<HealthEvent>();
            let (ready_tx, ready) = std_mpsc::channel();
            let (stop, stopped) = oneshot::channel::<()>();
            let client = router.spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime");
                runtime.block_on(async move {
                    let links = LinkWatch::subscribe().expect("netlink");
                    let (link_tx, link_rx) = tokio::sync::mpsc::channel(8);
                    links.watchers().watch("r0", "r0", true, link_tx);
                    tokio::spawn(links.run());
                    let configs = [
                        ProbeKind::Icmp { target: FAR.into() },
                        ProbeKind::Tcp {
                            target: at(TCP_PORT),
                        },
                    ]
                    .map(|kind| ProbeConfig { kind });
                    let monitor = Monitor {
                        uplink: 0,
                        generation: 0,
                        name: "a".into(),
                        config: crate::config::HealthConfig {
                            interval: Duration::from_millis(50),
                            timeout: Duration::from_millis(150),
                            rise: 5,
                            ..crate::config::HealthConfig::default()
                        },
                        probes: UplinkProbe::for_uplink(wan_a(), 0xfff4, &configs).expect("probes"),
                        initial: State::Up,
                        bursts: None,
                        passive: crate::config::PassiveConfig::default(),
                        start: None,
                    };
                    let (events_tx, mut events_rx) = tokio::sync::mpsc::channel(8);
                    let (snapshots, _) = tokio::sync::watch::channel(Snapshot::new(State::Up));
                    tokio::spawn(health::run(monitor, link_rx, events_tx, snapshots));
                    ready_tx.send(()).expect("test waiting");
                    let forward_all = async {
                        while let Some(event) = events_rx.recv().await {
                            if forward.send(event).is_err() {
                                break;
                            }
                        }
                    };
                    tokio::select! {
                        () = forward_all => {}
                        _ = stopped => {}
                    }
                });
            });
            ready
                .recv_timeout(Duration::from_secs(5))
                .expect("driver started");
            let wait = |what: &str| {
                let event = events
                    .recv_timeout(Duration::from_secs(3))
                    .unwrap_or_else(|e| panic!("no event for {what}: {e}"));
                eprintln!("{what}: {}", event.transition);
                event
            };

            let quiet = events.recv_timeout(Duration::from_millis(500));
            assert!(quiet.is_err(), "steady: {quiet:?}");

            let cut = std::time::Instant::now();
            far.ip(&["addr", "del", "10.201.9.9/32", "dev", "lo"]);
            let event = wait("path cut");
            let took = cut.elapsed();
            eprintln!("path cut detected after {took:?}");
            assert_eq!(event.transition.to, State::Down);
            assert!(
                event
                    .transition
                    .reason
                    .starts_with("3 rounds without quorum (0/2 answered)"),
                "{}",
                event.transition.reason
            );
            // Its reason says the probes found it, round by round: how
            // soon is a figure (printed), not a test.

            far.ip(&["addr", "add", "10.201.9.9/32", "dev", "lo"]);
            let event = wait("path back");
            assert_eq!(
                (event.transition.to, event.transition.reason.as_str()),
                (State::Up, "5 good rounds")
            );

            let unplugged = std::time::Instant::now();
            far.ip(&["link", "set", "a0", "down"]);
            let event = wait("peer down");
            let took = unplugged.elapsed();
            eprintln!("carrier loss acted on after {took:?}");
            // The carrier's own event acted, not the probes' rounds (which
            // would say "rounds without quorum").
            assert_eq!(event.transition.reason, "carrier lost on r0");

            let _ = stop.send(());
            if let Err(panic) = client.join() {
                std::panic::resume_unwind(panic);
            }
        }
    }
}
