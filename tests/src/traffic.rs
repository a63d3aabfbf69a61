//! Test traffic from inside lab namespaces: echo servers and flow clients.
//!
//! Owns TCP and UDP echo servers (a thread each, stopped on drop) and
//! clients that open many distinct flows and check each one's echo; for NAT
//! tests also an HTTP file server and downloader, a TCP sink and uploader,
//! and sockets bound to chosen ports. Sockets are created in their namespace
//! through [`in_netns`] and used from ordinary threads after. Never waits
//! unbounded: every connect, read and write has a timeout, and server
//! threads wake up regularly to see whether they should stop.

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use socket2::{Domain, Protocol, Socket, Type};

use crate::netns::in_netns;

/// How often server threads look at their stop flag.
const TICK: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    /// The IP protocol number, as [`crate::observe::FlowWatch::seen_flows`] reports it.
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => 6,
            Proto::Udp => 17,
        }
    }
}

/// How one client flow went.
#[derive(Debug)]
pub struct FlowResult {
    pub proto: Proto,
    /// The client's source port.
    pub local_port: u16,
    pub outcome: Result<()>,
}

impl FlowResult {
    /// (protocol number, source port), comparable with `seen_flows`.
    pub fn flow(&self) -> (u8, u16) {
        (self.proto.number(), self.local_port)
    }
}

/// A running server thread and the flag that stops it.
#[derive(Debug)]
struct Stopper {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Stopper {
    fn start(body: impl FnOnce(Arc<AtomicBool>) + Send + 'static) -> Stopper {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        Stopper {
            stop,
            thread: Some(thread::spawn(move || body(flag))),
        }
    }
}

impl Drop for Stopper {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                eprintln!("warning: an echo server thread panicked");
            }
        }
    }
}

/// Echoes every TCP connection back to its sender until dropped.
#[derive(Debug)]
pub struct TcpEchoServer {
    addr: SocketAddr,
    _thread: Stopper,
}

impl TcpEchoServer {
    /// Listens on `addr` (port 0 picks one) in namespace `ns`.
    pub fn start(ns: &str, addr: SocketAddr) -> Result<TcpEchoServer> {
        let (addr, thread) = tcp_server(ns, addr, "TCP echo server", |stream, _, stop| {
            echo_tcp(stream, stop)
        })?;
        Ok(TcpEchoServer {
            addr,
            _thread: thread,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

/// Listens on `addr` in namespace `ns` and hands every connection to
/// `handle` on a thread of its own, until the returned [`Stopper`] is
/// dropped. `what` names the server in its error messages.
fn tcp_server<H>(
    ns: &str,
    addr: SocketAddr,
    what: &'static str,
    handle: H,
) -> Result<(SocketAddr, Stopper)>
where
    H: Fn(TcpStream, SocketAddr, &AtomicBool) + Clone + Send + 'static,
{
    let listener = in_netns(ns, || {
        TcpListener::bind(addr).with_context(|| format!("{what}: binding {addr} in {ns}"))
    })?;
    let addr = listener.local_addr()?;
    let thread = Stopper::start(move |stop| {
        let mut connections: Vec<JoinHandle<()>> = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            connections.retain(|c| !c.is_finished());
            match readable(&listener, TICK) {
                Ok(false) => continue,
                Ok(true) => {}
                Err(e) => {
                    eprintln!("{what}: poll failed: {e}");
                    break;
                }
            }
            match listener.accept() {
                Ok((stream, peer)) => {
                    let (handle, stop) = (handle.clone(), Arc::clone(&stop));
                    connections.push(thread::spawn(move || handle(stream, peer, &stop)));
                }
                Err(e) => eprintln!("{what}: accept failed: {e}"),
            }
        }
        for connection in connections {
            // A connection thread reports its own errors.
            let _ = connection.join();
        }
    });
    Ok((addr, thread))
}

fn echo_tcp(mut stream: TcpStream, stop: &AtomicBool) {
    if stream.set_read_timeout(Some(TICK)).is_err() {
        return;
    }
    let mut buf = [0u8; 16 * 1024];
    while !stop.load(Ordering::Relaxed) {
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if is_timeout(&e) => {}
            Err(_) => return,
        }
    }
}

/// Echoes every UDP datagram back to its sender until dropped.
#[derive(Debug)]
pub struct UdpEchoServer {
    addr: SocketAddr,
    _thread: Stopper,
}

impl UdpEchoServer {
    /// Binds `addr` (port 0 picks one) in namespace `ns`.
    pub fn start(ns: &str, addr: SocketAddr) -> Result<UdpEchoServer> {
        let (addr, thread) =
            serve_udp(ns, addr, "UDP echo server", |datagram, _| datagram.to_vec())?;
        Ok(UdpEchoServer {
            addr,
            _thread: thread,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

/// A UDP server on `addr` in namespace `ns` (`what`, for its messages),
/// on a thread of its own until the `Stopper` is dropped: each datagram
/// gets `answer(datagram, sender)` back. Its address (the port picked).
fn serve_udp(
    ns: &str,
    addr: SocketAddr,
    what: &'static str,
    answer: impl Fn(&[u8], SocketAddr) -> Vec<u8> + Send + 'static,
) -> Result<(SocketAddr, Stopper)> {
    let socket = in_netns(ns, || {
        UdpSocket::bind(addr).with_context(|| format!("{what}: binding {addr} in {ns}"))
    })?;
    socket.set_read_timeout(Some(TICK))?;
    let addr = socket.local_addr()?;
    let thread = Stopper::start(move |stop| {
        let mut buf = [0u8; 64 * 1024];
        while !stop.load(Ordering::Relaxed) {
            match socket.recv_from(&mut buf) {
                Ok((n, peer)) => {
                    if let Err(e) = socket.send_to(&answer(&buf[..n], peer), peer) {
                        eprintln!("{what}: replying to {peer}: {e}");
                    }
                }
                Err(e) if is_timeout(&e) => {}
                Err(e) => eprintln!("{what}: receive failed: {e}"),
            }
        }
    });
    Ok((addr, thread))
}

/// Answers every UDP datagram with what it saw of it: its length and the
/// address it came from (`"LEN ADDR:PORT"`), until dropped. A NAT test's
/// witness of the source each datagram of a flow left with.
#[derive(Debug)]
pub struct UdpPeerServer {
    addr: SocketAddr,
    _thread: Stopper,
}

impl UdpPeerServer {
    /// Binds `addr` (port 0 picks one) in namespace `ns`.
    pub fn start(ns: &str, addr: SocketAddr) -> Result<UdpPeerServer> {
        let (addr, thread) = serve_udp(ns, addr, "UDP peer server", |datagram, peer| {
            format!("{} {peer}", datagram.len()).into_bytes()
        })?;
        Ok(UdpPeerServer {
            addr,
            _thread: thread,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

/// Send a datagram of `len` bytes from `socket` to a [`UdpPeerServer`] at
/// `server` and return what it saw: the length and the source. Sent again
/// (the same size) until answered, `limit` in all.
pub fn udp_seen_by(
    socket: &UdpSocket,
    server: SocketAddr,
    len: usize,
    limit: Duration,
) -> Result<(usize, SocketAddr)> {
    let deadline = Instant::now() + limit;
    let datagram = vec![0x5a; len];
    let mut buf = [0u8; 128];
    socket.set_read_timeout(Some(Duration::from_millis(300)))?;
    loop {
        socket
            .send_to(&datagram, server)
            .with_context(|| format!("sending {len} bytes to {server}"))?;
        match socket.recv_from(&mut buf) {
            Ok((n, from)) if from == server => {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                let parsed = text
                    .split_once(' ')
                    .and_then(|(l, a)| Some((l.parse().ok()?, a.parse().ok()?)));
                // An answer to an earlier, smaller datagram is not this one's.
                match parsed {
                    Some((seen, source)) if seen == len => return Ok((seen, source)),
                    Some(_) => {}
                    None => anyhow::bail!("the peer server answered {text:?}"),
                }
            }
            Ok(_) => {}
            Err(e) if is_timeout(&e) => {}
            Err(e) => return Err(e).context("waiting for the peer server's answer"),
        }
        ensure!(
            Instant::now() < deadline,
            "no answer from {server} to a datagram of {len} bytes within {limit:?}"
        );
    }
}

/// A UDP socket in namespace `ns` whose datagrams never carry DF
/// (`IP_PMTUDISC_DONT`, as Windows sends UDP): one too big for a link on
/// the way is fragmented there, not refused.
pub fn udp_socket_without_df(ns: &str) -> Result<UdpSocket> {
    let socket = udp_socket(ns, (Ipv4Addr::UNSPECIFIED, 0).into())?;
    let dont: libc::c_int = libc::IP_PMTUDISC_DONT;
    // SAFETY: a valid socket, and an int option of the size given.
    let r = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            (&dont as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    ensure!(
        r == 0,
        "setting IP_MTU_DISCOVER: {}",
        std::io::Error::last_os_error()
    );
    Ok(socket)
}

/// Opens `count` TCP connections from `ns` to `server`, each from its own
/// kernel-chosen source port, and checks that a short message on each comes
/// back. All sockets are bound before the first connect and held open until
/// the end, so no port is used twice. `timeout` bounds each connect and echo.
pub fn tcp_flows(
    ns: &str,
    server: SocketAddr,
    count: usize,
    timeout: Duration,
) -> Result<Vec<FlowResult>> {
    let sockets = in_netns(ns, || {
        (0..count)
            .map(|_| bound_socket(server, Type::STREAM, Protocol::TCP))
            .collect::<Result<Vec<_>>>()
    })?;
    let mut open = Vec::new();
    let results = sockets
        .into_iter()
        .enumerate()
        .map(|(i, (socket, port))| FlowResult {
            proto: Proto::Tcp,
            local_port: port,
            outcome: tcp_echo(socket, server, i, timeout)
                .map(|stream| open.push(stream))
                .with_context(|| format!("TCP flow from port {port} to {server}")),
        })
        .collect();
    drop(open);
    Ok(results)
}

/// Connects, sends a message, checks its echo; returns the open stream.
fn tcp_echo(socket: Socket, server: SocketAddr, i: usize, timeout: Duration) -> Result<TcpStream> {
    socket
        .connect_timeout(&server.into(), timeout)
        .context("connecting")?;
    let mut stream = TcpStream::from(socket);
    let message = format!("lb-tests tcp flow {i}");
    stream.set_write_timeout(Some(timeout))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.write_all(message.as_bytes()).context("sending")?;
    let mut echo = vec![0u8; message.len()];
    stream.read_exact(&mut echo).context("reading the echo")?;
    ensure!(
        echo == message.as_bytes(),
        "the echo differs: {:?}",
        String::from_utf8_lossy(&echo)
    );
    Ok(stream)
}

/// Sends one request from each of `count` UDP sockets in `ns` (distinct
/// kernel-chosen source ports) to `server` and waits for its echo, sending
/// again up to three times within `timeout` per flow.
pub fn udp_flows(
    ns: &str,
    server: SocketAddr,
    count: usize,
    timeout: Duration,
) -> Result<Vec<FlowResult>> {
    let sockets = in_netns(ns, || {
        (0..count)
            .map(|_| bound_socket(server, Type::DGRAM, Protocol::UDP))
            .collect::<Result<Vec<_>>>()
    })?;
    Ok(sockets
        .into_iter()
        .enumerate()
        .map(|(i, (socket, port))| FlowResult {
            proto: Proto::Udp,
            local_port: port,
            outcome: udp_echo(UdpSocket::from(socket), server, i, timeout)
                .with_context(|| format!("UDP flow from port {port} to {server}")),
        })
        .collect())
}

fn udp_echo(socket: UdpSocket, server: SocketAddr, i: usize, timeout: Duration) -> Result<()> {
    const ATTEMPTS: u32 = 3;
    let message = format!("lb-tests udp flow {i}");
    socket.connect(server).context("connecting")?;
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 1024];
    let mut last_error = None;
    for _ in 0..ATTEMPTS {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        socket.set_read_timeout(Some((timeout / ATTEMPTS).min(left)))?;
        socket.send(message.as_bytes()).context("sending")?;
        match socket.recv(&mut buf) {
            Ok(n) if &buf[..n] == message.as_bytes() => return Ok(()),
            Ok(n) => {
                last_error = Some(anyhow::anyhow!(
                    "the echo differs: {:?}",
                    String::from_utf8_lossy(&buf[..n])
                ))
            }
            Err(e) if is_timeout(&e) => last_error = Some(anyhow::anyhow!("no echo in time")),
            // Includes ECONNREFUSED from an ICMP error, which may be transient.
            Err(e) => last_error = Some(anyhow::Error::new(e).context("waiting for the echo")),
        }
    }
    Err(last_error
        .unwrap_or_else(|| anyhow::anyhow!("no time left to send"))
        .context(format!("no echo after {ATTEMPTS} tries in {timeout:?}")))
}

/// UDP sockets of a client, each connected to `server` and held open, so
/// that a flow can be sent on again after its uplink changes.
pub struct HeldUdp {
    sockets: Vec<(u16, UdpSocket)>,
}

impl HeldUdp {
    /// `count` sockets in namespace `ns`, each from its own port.
    pub fn open(ns: &str, server: SocketAddr, count: usize) -> Result<HeldUdp> {
        let sockets = in_netns(ns, || {
            (0..count)
                .map(|_| -> Result<(u16, UdpSocket)> {
                    let any: SocketAddr = if server.is_ipv6() {
                        (Ipv6Addr::UNSPECIFIED, 0).into()
                    } else {
                        ([0, 0, 0, 0], 0).into()
                    };
                    let socket = UdpSocket::bind(any)?;
                    socket.connect(server)?;
                    Ok((socket.local_addr()?.port(), socket))
                })
                .collect::<Result<Vec<_>>>()
        })?;
        Ok(HeldUdp { sockets })
    }

    /// Sends on flow `i` until its echo comes back, within `limit`.
    pub fn echo(&self, i: usize, limit: Duration) -> Result<()> {
        let (port, socket) = &self.sockets[i];
        let deadline = Instant::now() + limit;
        let message = format!("held flow {port}");
        let mut buf = [0u8; 256];
        socket.set_read_timeout(Some(Duration::from_millis(200)))?;
        loop {
            // An ICMP error while the path changes is not the end.
            let _ = socket.send(message.as_bytes());
            if let Ok(n) = socket.recv(&mut buf) {
                if &buf[..n] == message.as_bytes() {
                    return Ok(());
                }
            }
            ensure!(
                Instant::now() < deadline,
                "flow from port {port}: no echo within {limit:?}"
            );
        }
    }

    pub fn echo_all(&self, limit: Duration) -> Result<()> {
        (0..self.sockets.len()).try_for_each(|i| self.echo(i, limit))
    }

    pub fn ids(&self) -> Vec<(u8, u16)> {
        self.sockets.iter().map(|(p, _)| (17, *p)).collect()
    }
}

/// `count` UDP exchanges from address `from` in namespace `ns` with
/// `target` (a port forward, a router's service), each from a port of its
/// own (a new connection for conntrack, and a new flow for the data plane
/// to judge on the way back). Each must be answered with its own message,
/// from `target` itself, within `timeout`. Returns the failures.
pub fn udp_answered(
    ns: &str,
    from: Ipv4Addr,
    target: SocketAddrV4,
    count: usize,
    timeout: Duration,
) -> Result<Vec<String>> {
    const ATTEMPTS: u32 = 3;
    let sockets = in_netns(ns, || {
        (0..count)
            .map(|_| {
                let s = UdpSocket::bind((from, 0)).context("binding a UDP socket")?;
                s.set_read_timeout(Some(timeout / ATTEMPTS))?;
                Ok(s)
            })
            .collect::<Result<Vec<_>>>()
    })?;
    let mut failed = Vec::new();
    for (i, socket) in sockets.iter().enumerate() {
        let message = format!("lb-tests inbound {i} to {target}");
        let port = socket.local_addr()?.port();
        let mut outcome = Err(format!("no answer in {ATTEMPTS} tries"));
        // Not a connected socket: an answer from any other address must be
        // seen (and reported), not filtered out by the kernel.
        'tries: for _ in 0..ATTEMPTS {
            socket.send_to(message.as_bytes(), target)?;
            let deadline = Instant::now() + timeout / ATTEMPTS;
            let mut buf = [0u8; 1024];
            while Instant::now() < deadline {
                let Ok((n, from)) = socket.recv_from(&mut buf) else {
                    break;
                };
                if &buf[..n] != message.as_bytes() {
                    outcome = Err(format!("a stray answer from {from}"));
                } else if from != SocketAddr::V4(target) {
                    outcome = Err(format!("answered from {from}"));
                    break 'tries;
                } else {
                    outcome = Ok(());
                    break 'tries;
                }
            }
        }
        if let Err(e) = outcome {
            failed.push(format!("UDP from port {port} to {target}: {e}"));
        }
    }
    Ok(failed)
}

/// A raw IPv4 socket of protocol `proto` (ESP, GRE: what the fast path
/// leaves to the kernel) in namespace `ns`.
pub fn raw_socket(ns: &str, proto: i32) -> Result<Socket> {
    in_netns(ns, || {
        let s = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::from(proto)))?;
        s.set_read_timeout(Some(Duration::from_millis(200)))?;
        Ok(s)
    })
}

/// The source addresses of the packets a raw `socket` receives, until one
/// arrives or `wait` passes.
pub fn raw_sources(socket: &Socket, wait: Duration) -> Result<Vec<Ipv4Addr>> {
    let mut seen = Vec::new();
    let deadline = Instant::now() + wait;
    while seen.is_empty() && Instant::now() < deadline {
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 2048];
        while let Ok((_, from)) = socket.recv_from(&mut buf) {
            if let Some(SocketAddr::V4(from)) = from.as_socket() {
                seen.push(*from.ip());
            }
        }
    }
    Ok(seen)
}

/// A few packets of protocol `proto` from namespace `ns` to `to`.
pub fn send_raw(ns: &str, proto: i32, to: Ipv4Addr) -> Result<()> {
    let socket = raw_socket(ns, proto)?;
    // GRE: flags and protocol (IPv4), then a payload; ESP: SPI and
    // sequence number, then a payload. Neither is ever decoded here.
    let packet = b"\x00\x00\x08\x00lb leak test payload";
    let to = SocketAddrV4::new(to, 0);
    for _ in 0..5 {
        socket
            .send_to(packet, &to.into())
            .with_context(|| format!("sending protocol {proto} from {ns}"))?;
    }
    Ok(())
}

/// A socket of `server`'s family bound to port 0, and the port it got.
fn bound_socket(server: SocketAddr, ty: Type, proto: Protocol) -> Result<(Socket, u16)> {
    let socket = Socket::new(Domain::for_address(server), ty, Some(proto))
        .context("creating a client socket")?;
    let any: SocketAddr = if server.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        ([0u16; 8], 0).into()
    };
    socket
        .bind(&any.into())
        .context("binding a client socket to port 0")?;
    let port = socket
        .local_addr()?
        .as_socket()
        .map(|a| a.port())
        .context("a client socket has no IP address")?;
    Ok((socket, port))
}

/// Whether a socket call returned only because its timeout expired.
fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
    )
}

/// Waits up to `timeout` for `fd` to become readable.
fn readable(fd: &impl AsRawFd, timeout: Duration) -> std::io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: `pfd` is a valid pollfd for the duration of the call, count 1.
    match unsafe { libc::poll(&mut pfd, 1, ms) } {
        -1 => {
            let err = std::io::Error::last_os_error();
            if err.kind() == ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(err)
            }
        }
        n => Ok(n > 0),
    }
}

/// Serves one file over HTTP/1.0 to every GET, whatever the path, until
/// dropped: a download source for tests that compare what arrives.
#[derive(Debug)]
pub struct HttpFileServer {
    addr: SocketAddr,
    _thread: Stopper,
}

impl HttpFileServer {
    /// Listens on `addr` (port 0 picks one) in namespace `ns`, serving `file`.
    pub fn start(ns: &str, addr: SocketAddr, file: &Path) -> Result<HttpFileServer> {
        let file = file.to_owned();
        let (addr, thread) = tcp_server(ns, addr, "HTTP server", move |stream, peer, _| {
            if let Err(e) = serve_http(stream, &file) {
                eprintln!("HTTP server: serving {peer}: {e:#}");
            }
        })?;
        Ok(HttpFileServer {
            addr,
            _thread: thread,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

/// How long an HTTP or sink connection may stay silent before it is given up.
const IDLE: Duration = Duration::from_secs(10);

fn serve_http(mut stream: TcpStream, file: &Path) -> Result<()> {
    stream.set_read_timeout(Some(IDLE))?;
    stream.set_write_timeout(Some(IDLE))?;
    let (head, _) = read_head(&mut stream).context("reading the request")?;
    ensure!(
        head.starts_with("GET "),
        "not a GET request: {:?}",
        head.lines().next()
    );
    let mut body = File::open(file).with_context(|| format!("opening {}", file.display()))?;
    let len = body.metadata()?.len();
    write!(
        stream,
        "HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
    )?;
    let sent = std::io::copy(&mut body, &mut stream).context("sending the body")?;
    ensure!(sent == len, "sent {sent} of {len} bytes");
    Ok(())
}

/// Reads up to the end of an HTTP head (`\r\n\r\n`); returns the head and
/// the bytes after it that arrived with it.
fn read_head(stream: &mut TcpStream) -> Result<(String, Vec<u8>)> {
    const MAX_HEAD: usize = 16 * 1024;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            return Ok((String::from_utf8_lossy(&buf).into_owned(), rest));
        }
        ensure!(
            buf.len() < MAX_HEAD,
            "no end of the HTTP head in {MAX_HEAD} bytes"
        );
        let n = stream.read(&mut chunk).context("reading")?;
        ensure!(n > 0, "the connection closed inside the HTTP head");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// `GET path` from `server`, from namespace `ns`, with the body written to
/// `dest`. Fails unless the status is 200 and exactly `Content-Length`
/// bytes arrive within `timeout`. Returns the body's length.
pub fn http_download(
    ns: &str,
    server: SocketAddr,
    path: &str,
    dest: &Path,
    timeout: Duration,
) -> Result<u64> {
    let deadline = Instant::now() + timeout;
    let mut stream = tcp_connect(ns, None, server, timeout)?;
    stream.set_read_timeout(Some(IDLE.min(timeout)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {server}\r\n\r\n")
        .context("sending the request")?;
    let (head, first) = read_head(&mut stream).context("reading the response head")?;
    let status = head.lines().next().unwrap_or_default();
    ensure!(
        status.split_whitespace().nth(1) == Some("200"),
        "GET {path} from {server}: {status}"
    );
    let length: u64 = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .with_context(|| format!("no Content-Length in the response: {head:?}"))?;
    let mut out = File::create(dest).with_context(|| format!("creating {}", dest.display()))?;
    out.write_all(&first)?;
    let mut got = first.len() as u64;
    let mut buf = vec![0u8; 256 * 1024];
    while got < length {
        ensure!(
            Instant::now() < deadline,
            "GET {path} from {server}: {got} of {length} bytes after {timeout:?}"
        );
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                out.write_all(&buf[..n])?;
                got += n as u64;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("GET {path} from {server}: reading after {got} of {length} bytes")
                })
            }
        }
    }
    ensure!(
        got == length,
        "GET {path} from {server}: {got} bytes arrived, Content-Length is {length}"
    );
    Ok(got)
}

/// Reads every TCP connection to its end and answers with the number of
/// bytes it read (8 bytes, big endian), until dropped: the far end of an
/// upload.
#[derive(Debug)]
pub struct TcpSinkServer {
    addr: SocketAddr,
    _thread: Stopper,
}

impl TcpSinkServer {
    /// Listens on `addr` (port 0 picks one) in namespace `ns`.
    pub fn start(ns: &str, addr: SocketAddr) -> Result<TcpSinkServer> {
        let (addr, thread) = tcp_server(ns, addr, "TCP sink", |mut stream, peer, _| {
            if let Err(e) = sink(&mut stream) {
                eprintln!("TCP sink: connection from {peer}: {e:#}");
            }
        })?;
        Ok(TcpSinkServer {
            addr,
            _thread: thread,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

fn sink(stream: &mut TcpStream) -> Result<()> {
    stream.set_read_timeout(Some(IDLE))?;
    stream.set_write_timeout(Some(IDLE))?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut total: u64 = 0;
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => total += n as u64,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e).with_context(|| format!("reading after {total} bytes")),
        }
    }
    stream.write_all(&total.to_be_bytes())?;
    Ok(())
}

/// Sends `bytes` bytes from namespace `ns` to a [`TcpSinkServer`] at
/// `server` and returns how many it says it read; everything within
/// `timeout`.
pub fn tcp_upload(ns: &str, server: SocketAddr, bytes: usize, timeout: Duration) -> Result<u64> {
    let deadline = Instant::now() + timeout;
    let mut stream = tcp_connect(ns, None, server, timeout)?;
    let chunk: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
    let mut sent = 0;
    while sent < bytes {
        let left = deadline.saturating_duration_since(Instant::now());
        ensure!(
            !left.is_zero(),
            "upload to {server}: {sent} of {bytes} bytes sent after {timeout:?}"
        );
        stream.set_write_timeout(Some(left))?;
        let n = chunk.len().min(bytes - sent);
        stream.write_all(&chunk[..n]).with_context(|| {
            format!("upload to {server}: sending after {sent} of {bytes} bytes")
        })?;
        sent += n;
    }
    stream.shutdown(std::net::Shutdown::Write)?;
    let left = deadline.saturating_duration_since(Instant::now());
    ensure!(
        !left.is_zero(),
        "upload to {server}: no time left for the answer"
    );
    stream.set_read_timeout(Some(left))?;
    let mut answer = [0u8; 8];
    stream
        .read_exact(&mut answer)
        .with_context(|| format!("upload to {server}: waiting for the byte count"))?;
    Ok(u64::from_be_bytes(answer))
}

/// A UDP socket in namespace `ns` bound to `local` (e.g. a fixed port).
pub fn udp_socket(ns: &str, local: SocketAddr) -> Result<UdpSocket> {
    in_netns(ns, || {
        UdpSocket::bind(local).with_context(|| format!("binding UDP {local} in {ns}"))
    })
}

/// A TCP connection from namespace `ns`, from `local` (e.g. a fixed port),
/// to `server`, with `timeout` on connect, reads and writes.
pub fn tcp_connect_from(
    ns: &str,
    local: SocketAddr,
    server: SocketAddr,
    timeout: Duration,
) -> Result<TcpStream> {
    tcp_connect(ns, Some(local), server, timeout)
}

/// A TCP connection from namespace `ns` to `server`, from `local` if given
/// (else the kernel picks the port), with `timeout` on connect, reads and
/// writes.
fn tcp_connect(
    ns: &str,
    local: Option<SocketAddr>,
    server: SocketAddr,
    timeout: Duration,
) -> Result<TcpStream> {
    let socket = in_netns(ns, || {
        let socket = Socket::new(
            Domain::for_address(server),
            Type::STREAM,
            Some(Protocol::TCP),
        )
        .context("creating a TCP socket")?;
        if let Some(local) = local {
            socket
                .bind(&local.into())
                .with_context(|| format!("binding TCP {local} in {ns}"))?;
        }
        Ok(socket)
    })?;
    socket
        .connect_timeout(&server.into(), timeout)
        .with_context(|| format!("connecting from {ns} to {server}"))?;
    let stream = TcpStream::from(socket);
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    Ok(stream)
}

/// Waits up to `timeout` until no TCP connection in namespace `ns` that
/// the server still holds has local port `port` (`ss -tn`, established
/// or closed by the client only): a one-test-at-a-time server such as
/// iperf3's has finished with its last client and takes the next.
/// Connections the server has closed itself (FIN-WAIT, LAST-ACK,
/// TIME-WAIT) do not count: it is done with them.
pub fn wait_tcp_idle(ns: &str, port: u16, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let filter = format!("sport = :{port}");
    loop {
        let out = crate::netns::exec(
            ns,
            &[
                "ss",
                "-Htn",
                "state",
                "established",
                "state",
                "close-wait",
                &filter,
            ],
        )?;
        if out.trim().is_empty() {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "TCP port {port} in {ns} still has connections after {timeout:?}:\n{out}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// Waits up to `timeout` until something in namespace `ns` listens on TCP
/// `port` (`ss -ltn`): for servers started as separate programs.
pub fn wait_tcp_listener(ns: &str, port: u16, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let filter = format!("sport = :{port}");
    loop {
        let out = crate::netns::exec(ns, &["ss", "-Hltn", &filter])?;
        if !out.trim().is_empty() {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "nothing listens on TCP port {port} in {ns} after {timeout:?}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}
