//! Numbered UDP streams for failover measurements: a client sends
//! datagrams `[client port: u16][seq: u32]` at a fixed pace on one flow,
//! and a sink on the internet host records, per datagram, when it arrived
//! and from which address (the NAT source, so the uplink it took).
//!
//! Used by the failover tests and by `cargo xtask bench`'s failover times.
//! It only sends and watches; failing links is the caller's business.

use std::{
    collections::{BTreeMap, HashSet},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};

use crate::{in_netns, Lab};

/// Where the streams go: the internet host's server address.
pub const SINK: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 10), 9000);
/// The client's address in the lab (`default`).
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 2);
/// A UDP socket on the client's `port`. A port just closed by this
/// process can still be held for a moment by a child that another test
/// thread is starting (forked, not yet exec'd: close-on-exec has not run),
/// so "in use" is retried for a bounded while.
fn client_socket(lab: &Lab, port: u16) -> Result<UdpSocket> {
    let ns = lab.ns("client")?;
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match in_netns(ns, || Ok(UdpSocket::bind((CLIENT, port)))) {
            Ok(Ok(socket)) => return Ok(socket),
            Ok(Err(e))
                if e.kind() == std::io::ErrorKind::AddrInUse && Instant::now() < deadline =>
            {
                thread::sleep(Duration::from_millis(20));
            }
            Ok(Err(e)) => {
                return Err(anyhow::Error::new(e).context(format!("binding client port {port}")))
            }
            Err(e) => return Err(e),
        }
    }
}

/// Sequence number of the one-datagram probes that find a port's uplink.
const PROBE_SEQ: u32 = u32::MAX;
/// Datagrams at the end of a stream not counted as lost: they may still be
/// on their way when the count is taken.
const IN_FLIGHT: u32 = 10;

/// What the sink saw: per (client port, sequence number), when and from
/// which address.
type Arrivals = Arc<Mutex<BTreeMap<(u16, u32), (Instant, [u8; 4])>>>;

/// Receives the streams' datagrams on the lab's `inet` host; stops when
/// dropped.
pub struct Sink {
    arrivals: Arrivals,
    stop: Arc<AtomicBool>,
    echo: Arc<AtomicBool>,
}

impl Sink {
    pub fn start(lab: &Lab) -> Result<Sink> {
        Self::start_with(lab, false)
    }

    /// A sink that also answers every datagram (echoes it back): the
    /// streams are then two-way, as a call is.
    pub fn start_echoing(lab: &Lab) -> Result<Sink> {
        Self::start_with(lab, true)
    }

    fn start_with(lab: &Lab, echo: bool) -> Result<Sink> {
        let socket = in_netns(lab.ns("inet")?, || Ok(UdpSocket::bind(SINK)?))?;
        socket.set_read_timeout(Some(Duration::from_millis(50)))?;
        let arrivals: Arrivals = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let echo = Arc::new(AtomicBool::new(echo));
        let (a, s, e) = (arrivals.clone(), stop.clone(), echo.clone());
        thread::spawn(move || {
            let mut buf = [0u8; 64];
            while !s.load(Ordering::Relaxed) {
                let Ok((n, from)) = socket.recv_from(&mut buf) else {
                    continue;
                };
                // Stamped before the lock: a reader holding it must not
                // delay the arrival time.
                let at = Instant::now();
                // Anything but a stream's datagram is not ours: ignore it.
                let (SocketAddr::V4(from), 6) = (from, n) else {
                    continue;
                };
                if e.load(Ordering::Relaxed) {
                    let _ = socket.send_to(&buf[..n], from);
                }
                let port = u16::from_be_bytes([buf[0], buf[1]]);
                let seq = u32::from_be_bytes([buf[2], buf[3], buf[4], buf[5]]);
                if let Ok(mut m) = a.lock() {
                    m.insert((port, seq), (at, from.ip().octets()));
                }
            }
        });
        Ok(Sink {
            arrivals,
            stop,
            echo,
        })
    }

    /// (sequence number, arrival, source address) of every datagram of the
    /// stream from client port `port`, in sequence order.
    pub fn stream(&self, port: u16) -> Vec<(u32, Instant, [u8; 4])> {
        let Ok(m) = self.arrivals.lock() else {
            return Vec::new();
        };
        m.range((port, 0)..(port, PROBE_SEQ))
            .map(|(&(_, seq), &(t, a))| (seq, t, a))
            .collect()
    }

    /// When the first datagram from `port` that arrived after `since` with
    /// source address `via` arrived.
    pub fn first_via(&self, port: u16, via: [u8; 4], since: Instant) -> Option<Instant> {
        self.stream(port)
            .into_iter()
            .filter(|&(_, t, a)| a == via && t >= since)
            .map(|(_, t, _)| t)
            .min()
    }

    /// The source address the probe datagram from `port` arrived with.
    fn probe_via(&self, port: u16) -> Option<[u8; 4]> {
        self.arrivals
            .lock()
            .ok()?
            .get(&(port, PROBE_SEQ))
            .map(|&(_, a)| a)
    }
}

impl Sink {
    /// Answer (or stop answering) the streams: a far end that goes quiet.
    pub fn set_echo(&self, on: bool) {
        self.echo.store(on, Ordering::Relaxed);
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Where a stream's datagrams leave from.
enum Source {
    /// One socket: one flow.
    Fixed(UdpSocket),
    /// A new socket per datagram, in this namespace: a new flow each.
    Fresh(String),
}

/// A client stream from one source port at one datagram per `pace`; stops
/// when dropped.
pub struct Stream {
    port: u16,
    sent: Arc<Mutex<Vec<Instant>>>,
    stop: Arc<AtomicBool>,
}

impl Stream {
    pub fn start(lab: &Lab, port: u16, pace: Duration) -> Result<Stream> {
        let socket = client_socket(lab, port)?;
        Self::spawn(port, pace, Source::Fixed(socket))
    }

    /// A stream of new connections: each datagram from a socket of its own,
    /// on a port the client's kernel picks, so that each one is a new flow
    /// for whoever forwards it. `id` stands in for the port in the
    /// datagrams, for the sink to tell the stream apart.
    pub fn start_fresh(lab: &Lab, id: u16, pace: Duration) -> Result<Stream> {
        Self::spawn(id, pace, Source::Fresh(lab.ns("client")?.to_owned()))
    }

    fn spawn(port: u16, pace: Duration, source: Source) -> Result<Stream> {
        let sent: Arc<Mutex<Vec<Instant>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (sent2, stop2) = (sent.clone(), stop.clone());
        let (ready_tx, ready) = std::sync::mpsc::channel();
        thread::spawn(move || {
            let fixed = match source {
                Source::Fixed(socket) => Some(socket),
                Source::Fresh(ns) => {
                    // This thread is the stream's alone and ends with it.
                    if let Err(e) = crate::netns::enter_for_good(&ns) {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                    None
                }
            };
            let _ = ready_tx.send(Ok(()));
            let start = Instant::now();
            let mut seq: u32 = 0;
            while !stop2.load(Ordering::Relaxed) {
                let mut msg = [0u8; 6];
                msg[..2].copy_from_slice(&port.to_be_bytes());
                msg[2..].copy_from_slice(&seq.to_be_bytes());
                // Stamped before the send: a datagram stamped after a
                // moment reached the router after it, which is what the
                // failover tests' causal bounds rely on.
                let at = Instant::now();
                // A send that fails (an ICMP error from a dead path) is a
                // datagram lost, which is what the caller measures.
                match &fixed {
                    Some(socket) => {
                        let _ = socket.send_to(&msg, SINK);
                    }
                    None => {
                        if let Ok(socket) = UdpSocket::bind((CLIENT, 0)) {
                            let _ = socket.send_to(&msg, SINK);
                        }
                    }
                }
                if let Ok(mut s) = sent2.lock() {
                    s.push(at);
                }
                seq += 1;
                // Paced against the start, so a late wake-up does not slow
                // the stream down.
                let next = start + pace * seq;
                thread::sleep(next.saturating_duration_since(Instant::now()));
            }
        });
        match ready.recv_timeout(Duration::from_secs(5)) {
            Ok(Ok(())) => Ok(Stream { port, sent, stop }),
            Ok(Err(e)) => Err(e.context("starting a stream")),
            Err(_) => bail!("the stream's thread did not start"),
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Send time of datagram `seq` (taken just before it was sent).
    pub fn sent_at(&self, seq: u32) -> Option<Instant> {
        self.sent.lock().ok()?.get(seq as usize).copied()
    }

    /// Datagrams sent so far.
    pub fn sent(&self) -> u32 {
        self.sent.lock().map(|s| s.len() as u32).unwrap_or(0)
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// What a stream went through.
#[derive(Clone, Copy, Debug)]
pub struct Outage {
    /// Datagrams sent that never arrived (the last few, maybe still in
    /// flight, not counted).
    pub lost: u32,
    /// From the send time of the first lost datagram to the first arrival
    /// from the address the stream moved to; `None` if none was lost or it
    /// never arrived that way.
    pub gap: Option<Duration>,
}

/// The outage of `stream` as the sink saw it, `now_via` being the source
/// address it should arrive from after a failover.
pub fn outage(sink: &Sink, stream: &Stream, now_via: [u8; 4]) -> Outage {
    let got = sink.stream(stream.port);
    let arrived: HashSet<u32> = got.iter().map(|&(s, _, _)| s).collect();
    let lost: Vec<u32> = (0..stream.sent().saturating_sub(IN_FLIGHT))
        .filter(|s| !arrived.contains(s))
        .collect();
    let resumed = got
        .iter()
        .find(|&&(_, _, a)| a == now_via)
        .map(|&(_, t, _)| t);
    let gap = match (lost.first().and_then(|&s| stream.sent_at(s)), resumed) {
        (Some(cut), Some(back)) => Some(back.saturating_duration_since(cut)),
        _ => None,
    };
    Outage {
        lost: lost.len() as u32,
        gap,
    }
}

/// The datagrams of `stream` numbered below `upto` that never arrived, with
/// their send times. Waits (bounded) until the sink has a datagram of the
/// stream numbered `upto` or later, so that none of those counted can still
/// be on its way: a stream takes one path at a time and is not reordered.
pub fn lost_before(sink: &Sink, stream: &Stream, upto: u32) -> Result<Vec<(u32, Instant)>> {
    wait_for(
        "the stream to run past the datagrams counted",
        Duration::from_secs(10),
        || {
            Ok(sink
                .stream(stream.port)
                .last()
                .is_some_and(|&(seq, _, _)| seq >= upto))
        },
    )?;
    let arrived: HashSet<u32> = sink
        .stream(stream.port)
        .iter()
        .map(|&(s, _, _)| s)
        .collect();
    Ok((0..upto)
        .filter(|s| !arrived.contains(s))
        .filter_map(|s| stream.sent_at(s).map(|t| (s, t)))
        .collect())
}

/// The `Instant` of a reading of the machine's monotonic clock in ns (as lbd
/// reports when it changed the data plane): `Instant` reads the same clock.
pub fn instant_of_monotonic_ns(ns: u64) -> Instant {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    let now = Instant::now();
    // SAFETY: a valid pointer to a timespec for the kernel to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    let now_ns = (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64);
    if ns <= now_ns {
        now - Duration::from_nanos(now_ns - ns)
    } else {
        now + Duration::from_nanos(ns - now_ns)
    }
}

/// Find a client port in `from..from + 64` whose flow leaves through the
/// uplink with NAT address `want`, using one-datagram probes the sink
/// records. Ports outside the router's own ephemeral range keep their
/// number through NAT, which is how the sink tells the streams apart.
pub fn port_on(lab: &Lab, sink: &Sink, want: [u8; 4], from: u16) -> Result<u16> {
    for port in from..from.saturating_add(64) {
        if probe_via(lab, sink, port)? == want {
            return Ok(port);
        }
    }
    bail!(
        "no port in {from}..{} left through {want:?}",
        from.saturating_add(64)
    )
}

/// The NAT address through which a one-datagram probe from client port
/// `port` reached the sink.
pub fn probe_via(lab: &Lab, sink: &Sink, port: u16) -> Result<[u8; 4]> {
    let socket = client_socket(lab, port)?;
    let mut msg = [0u8; 6];
    msg[..2].copy_from_slice(&port.to_be_bytes());
    msg[2..].copy_from_slice(&PROBE_SEQ.to_be_bytes());
    socket.send_to(&msg, SINK)?;
    let mut via = None;
    wait_for(
        "a probe datagram at the sink",
        Duration::from_secs(10),
        || {
            via = sink.probe_via(port);
            Ok(via.is_some())
        },
    )?;
    via.context("the sink forgot a probe it had")
}

/// Wait until `f` holds, polling every 10 ms, for at most `limit`.
pub fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + limit;
    while !f()? {
        ensure!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}
