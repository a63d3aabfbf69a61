//! lb's NAT under real applications (issue: NAT in the fast path).
//!
//! The ISPs of the default lab have no route to the LAN, so every reply
//! that reaches a client came back through lb's translation: an HTTP
//! download and an iperf3 run, UDP and ping, two clients behind one uplink
//! with the same source port, traceroute (ICMP time exceeded), path MTU
//! discovery (ICMP fragmentation needed), and the router's own connections
//! beside NATed ones. Where the test forces one uplink, counters on the ISP
//! side (interface bytes and nftables flow witnesses) say that the traffic
//! really crossed that one.
//!
//! The tests share two cores, and two of them measure throughput: they run
//! one at a time ([`serial`]), each on its own lab.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Mutex, MutexGuard,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use lb_tests::{
    daemon::{LabConfig, Lbd},
    require_root,
    traffic::{
        http_download, tcp_connect_from, tcp_flows, tcp_upload, udp_flows, udp_seen_by, udp_socket,
        udp_socket_without_df, wait_tcp_listener, HttpFileServer, Proto, TcpEchoServer,
        TcpSinkServer, UdpEchoServer, UdpPeerServer,
    },
    unique_prefix, watch_echo_ids, watch_flows, FlowWatch, Lab, LabDesc, LanLeaks,
};
use serde_json::Value;

/// The internet server's address (inet's `srv0`).
const SERVER_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
const ECHO_PORT: u16 = 7000;
const HTTP_PORT: u16 = 8080;
const IPERF_PORT: u16 = 5201;
const SINK_PORT: u16 = 9000;
/// lbd's default NAT port range (lb-daemon/examples/lbd.toml).
const NAT_PORTS: std::ops::RangeInclusive<u16> = 20000..=29999;
/// The kernel's default `ip_local_port_range`, which the router's own
/// sockets use and NAT keeps clear of.
const LOCAL_PORTS: std::ops::RangeInclusive<u16> = 32768..=60999;
const FLOW_TIMEOUT: Duration = Duration::from_secs(5);

/// One uplink of the default lab: lbd's name, the router's interface, the
/// gateway, and the ISP host whose `down0` faces the router.
struct Uplink {
    /// Its number in the lab's address plan (ispN on wanN).
    n: u8,
    name: &'static str,
    gateway: &'static str,
    isp: &'static str,
}

const ISP1: Uplink = Uplink {
    n: 1,
    name: "isp1",
    gateway: "100.64.1.1",
    isp: "isp1",
};
const ISP2: Uplink = Uplink {
    n: 2,
    name: "isp2",
    gateway: "100.64.2.1",
    isp: "isp2",
};
const BOTH: [&Uplink; 2] = [&ISP1, &ISP2];

/// An lbd configuration with these uplinks (weight 1 each, no probes:
/// health follows the link) and LAN interfaces.
fn config(uplinks: &[&Uplink], lans: &[&str]) -> String {
    let uplinks: Vec<(u8, &str)> = uplinks.iter().map(|u| (u.n, "weight = 1")).collect();
    LabConfig {
        lans,
        uplinks: &uplinks,
        ..LabConfig::default()
    }
    .render()
}

/// One test at a time: two cores, and throughput figures to keep honest.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    // A test that failed while holding the lock leaves nothing behind that
    // matters to the next one: its lab is gone with it.
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn lab_up() -> Result<Lab> {
    Lab::up(&LabDesc::shipped("default")?, &unique_prefix())
}

fn server(port: u16) -> SocketAddr {
    (SERVER_IP, port).into()
}

/// A directory for a test's files, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(lab: &Lab) -> Result<Scratch> {
        let dir = std::env::temp_dir().join(format!("{}files", lab.prefix()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Scratch(dir))
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            eprintln!("warning: removing {}: {e}", self.0.display());
        }
    }
}

/// `sha256sum FILE` on `host`: the hex digest.
fn sha256(lab: &Lab, host: &str, file: &Path) -> Result<String> {
    let file = file.to_str().context("scratch path is not UTF-8")?;
    let out = lab.exec(host, &["sha256sum", file])?;
    out.split_whitespace()
        .next()
        .map(str::to_owned)
        .with_context(|| format!("sha256sum printed nothing for {file}"))
}

/// Bytes the ISP's router-facing interface (`down0`) sent and received.
fn isp_bytes(lab: &Lab, uplink: &Uplink) -> Result<(u64, u64)> {
    let s = lab.link_stats(uplink.isp, "down0")?;
    Ok((s.tx_bytes, s.rx_bytes))
}

/// Flow witnesses on both ISPs' router-facing interfaces.
fn watch_isps(lab: &Lab) -> Result<[FlowWatch; 2]> {
    Ok([
        watch_flows(lab, ISP1.isp, "down0")?,
        watch_flows(lab, ISP2.isp, "down0")?,
    ])
}

/// Source ports of `proto` flows a witness saw.
fn ports(watch: &FlowWatch, proto: Proto) -> Result<Vec<u16>> {
    Ok(watch
        .seen_flows()?
        .into_iter()
        .filter(|(p, _)| *p == proto.number())
        .map(|(_, port)| port)
        .collect())
}

/// 1. A 50 MB HTTP download arrives byte-exact over each uplink alone, and
///    the ISP on that uplink, and only that one, carried its bytes.
#[test]
fn http_download_is_exact_over_each_uplink() -> Result<()> {
    const SIZE: u64 = 50 * 1024 * 1024;
    if !require_root("http_download_is_exact_over_each_uplink") {
        return Ok(());
    }
    let _serial = serial();
    let mut lab = lab_up()?;
    let leaks = LanLeaks::install(&lab)?;
    let scratch = Scratch::new(&lab)?;
    let blob = scratch.path("blob");
    let mut random = std::fs::File::open("/dev/urandom")?;
    let mut file = std::fs::File::create(&blob)?;
    std::io::copy(&mut std::io::Read::take(&mut random, SIZE), &mut file)?;
    drop(file);
    let expected = sha256(&lab, "inet", &blob)?;
    let _http = HttpFileServer::start(lab.ns("inet")?, server(HTTP_PORT), &blob)?;

    for (used, idle) in [(&ISP1, &ISP2), (&ISP2, &ISP1)] {
        let lbd = Lbd::start(&mut lab, &config(&[used], &["lan0"]))?;
        let watches = watch_isps(&lab)?;
        let (used_watch, idle_watch) = if used.name == ISP1.name {
            (&watches[0], &watches[1])
        } else {
            (&watches[1], &watches[0])
        };
        let used_before = isp_bytes(&lab, used)?;
        let idle_before = isp_bytes(&lab, idle)?;

        let got = scratch.path(&format!("got-{}", used.name));
        let start = Instant::now();
        let length = http_download(
            lab.ns("client")?,
            server(HTTP_PORT),
            "/blob",
            &got,
            Duration::from_secs(30),
        )
        .with_context(|| format!("downloading over {} alone", used.name))?;
        let elapsed = start.elapsed();
        ensure!(length == SIZE, "{length} bytes arrived, {SIZE} were sent");
        let digest = sha256(&lab, "client", &got)?;
        ensure!(
            digest == expected,
            "over {}: the download's sha256 is {digest}, the file's {expected}",
            used.name
        );
        std::fs::remove_file(&got)?;

        let used_after = isp_bytes(&lab, used)?;
        let idle_after = isp_bytes(&lab, idle)?;
        let carried = used_after.0 - used_before.0;
        let stray = (idle_after.0 - idle_before.0) + (idle_after.1 - idle_before.1);
        eprintln!(
            "over {}: {SIZE} bytes in {elapsed:.2?} = {:.0} MB/s, sha256 {digest}; \
             {} down0 sent {carried} bytes to the router, {} down0 moved {stray}",
            used.name,
            SIZE as f64 / 1e6 / elapsed.as_secs_f64(),
            used.isp,
            idle.isp
        );
        ensure!(
            carried >= SIZE,
            "{} sent only {carried} bytes towards the router for a {SIZE}-byte download",
            used.isp
        );
        ensure!(
            stray < 64 * 1024,
            "{} moved {stray} bytes although lbd had only {}",
            idle.isp,
            used.name
        );
        let used_tcp = ports(used_watch, Proto::Tcp)?;
        let idle_tcp = ports(idle_watch, Proto::Tcp)?;
        ensure!(
            used_tcp.len() == 1 && idle_tcp.is_empty(),
            "TCP source ports seen: {} {used_tcp:?}, {} {idle_tcp:?}; expected one connection on {}",
            used.isp,
            idle.isp,
            used.isp
        );
        let rx = lbd.uplink_counter(used.name, "rx_bytes")?;
        ensure!(
            rx >= SIZE,
            "lbctl says {} received {rx} bytes; status: {}",
            used.name,
            lbd.status()?
        );
        leaks.check()?;
        lbd.stop(&mut lab)?;
    }
    Ok(())
}

/// 2. iperf3 with 8 parallel TCP streams for 5 s over both uplinks:
///    completes, moves data, and both uplinks carry some of it.
#[test]
fn iperf3_tcp_over_both_uplinks() -> Result<()> {
    /// Each connection lands on one uplink, by a hash with a random seed:
    /// all 8 streams on one of two uplinks happens once in 128 runs. Only
    /// then is the run repeated.
    const ATTEMPTS: usize = 3;
    if !require_root("iperf3_tcp_over_both_uplinks") {
        return Ok(());
    }
    let _serial = serial();
    let mut lab = lab_up()?;
    let leaks = LanLeaks::install(&lab)?;
    let lbd = Lbd::start(&mut lab, &config(&BOTH, &["lan0"]))?;
    let port = IPERF_PORT.to_string();
    let scratch = Scratch::new(&lab)?;
    let log = scratch.path("iperf3-server.log");
    let log = log.to_str().context("scratch path is not UTF-8")?;
    lab.spawn("inet", &["iperf3", "-s", "-p", &port, "--logfile", log])?;
    wait_tcp_listener(lab.ns("inet")?, IPERF_PORT, Duration::from_secs(5))?;

    for attempt in 1..=ATTEMPTS {
        let watches = watch_isps(&lab)?;
        let before = [isp_bytes(&lab, &ISP1)?, isp_bytes(&lab, &ISP2)?];
        let out = lab.output(
            "client",
            &[
                "timeout",
                "30",
                "iperf3",
                "-c",
                &SERVER_IP.to_string(),
                "-p",
                &port,
                "-P",
                "8",
                "-t",
                "5",
                "-J",
            ],
        )?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success(),
            "iperf3 client failed ({}): {}{}; status: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            stdout,
            lbd.status()?
        );
        let report: Value = serde_json::from_str(&stdout).context("parsing iperf3 -J")?;
        let received = report["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .with_context(|| format!("no end.sum_received in iperf3's report: {stdout}"))?;
        let streams = report["end"]["streams"].as_array().map_or(0, Vec::len);
        let after = [isp_bytes(&lab, &ISP1)?, isp_bytes(&lab, &ISP2)?];
        // The client uploads: data goes into the ISPs' down0.
        let uploaded = [after[0].1 - before[0].1, after[1].1 - before[1].1];
        let flows = [
            ports(&watches[0], Proto::Tcp)?.len(),
            ports(&watches[1], Proto::Tcp)?.len(),
        ];
        eprintln!(
            "iperf3 -P 8 -t 5: {:.2} Gbit/s received, {streams} streams; \
             ISPs received {uploaded:?} bytes in {flows:?} TCP connections",
            received / 1e9
        );
        ensure!(streams == 8, "iperf3 reports {streams} streams, not 8");
        ensure!(received > 0.0, "iperf3 moved nothing: {stdout}");
        ensure!(
            flows.iter().sum::<usize>() == 9,
            "the ISPs saw {flows:?} TCP connections, iperf3 made 9"
        );
        // A stream's share of 5 s, even at a slow 100 Mbit/s, is megabytes;
        // the control connection alone moves kilobytes.
        let idle: Vec<usize> = (0..2).filter(|&i| uploaded[i] < 1_000_000).collect();
        if idle.iter().any(|&i| flows[i] <= 1) && attempt < ATTEMPTS {
            eprintln!("every stream hashed to one uplink; running again");
            continue;
        }
        if let Some(&i) = idle.first() {
            bail!(
                "{} carried {} connections but received only {} bytes; status: {}",
                BOTH[i].isp,
                flows[i],
                uploaded[i],
                lbd.status()?
            );
        }
        leaks.check()?;
        return lbd.stop(&mut lab);
    }
    bail!("every attempt hashed all connections to one uplink")
}

/// 3. UDP request/reply and ping from the client: replies come back, so
///    ports and ICMP echo identifiers are translated both ways. A ping
///    whose identifier lies in the router's own port range must leave with
///    another one, from the NAT range, and its replies still reach it.
#[test]
fn udp_and_ping_through_nat() -> Result<()> {
    /// In the router's `ip_local_port_range`: NAT may not keep it.
    const ROUTER_RANGE_ID: u16 = 40000;
    if !require_root("udp_and_ping_through_nat") {
        return Ok(());
    }
    let _serial = serial();
    let mut lab = lab_up()?;
    let leaks = LanLeaks::install(&lab)?;
    let lbd = Lbd::start(&mut lab, &config(&BOTH, &["lan0"]))?;
    let _udp = UdpEchoServer::start(lab.ns("inet")?, server(ECHO_PORT))?;

    for flow in udp_flows(lab.ns("client")?, server(ECHO_PORT), 4, FLOW_TIMEOUT)? {
        flow.outcome?;
    }
    let text = ping(&lab, "client", &[]).with_context(|| format!("status: {:?}", lbd.status()))?;
    eprintln!("{}", text.trim());

    let watches = [
        watch_echo_ids(&lab, ISP1.isp, "down0")?,
        watch_echo_ids(&lab, ISP2.isp, "down0")?,
    ];
    let id = ROUTER_RANGE_ID.to_string();
    ping(&lab, "client", &["-e", &id])
        .with_context(|| format!("ping -e {id}; status: {:?}", lbd.status()))?;
    let mut seen = watches[0].seen_ids()?;
    seen.extend(watches[1].seen_ids()?);
    eprintln!("ping -e {id}: the ISPs saw echo identifiers {seen:?}");
    ensure!(
        seen.len() == 1 && seen.iter().all(|i| NAT_PORTS.contains(i)),
        "ping -e {id} left with identifiers {seen:?}; expected one in {NAT_PORTS:?}"
    );

    let replies = lbd.uplink_counter("isp1", "replies")? + lbd.uplink_counter("isp2", "replies")?;
    ensure!(
        replies >= 4 + 6,
        "lbctl counts {replies} replies translated, expected at least 10 (4 UDP, 6 ICMP)"
    );
    leaks.check()?;
    lbd.stop(&mut lab)
}

/// `ping -c 3 [EXTRA]` from `host` to the server: all three must be
/// answered. Returns ping's report.
fn ping(lab: &Lab, host: &str, extra: &[&str]) -> Result<String> {
    let target = SERVER_IP.to_string();
    let mut args = vec!["ping", "-n", "-c", "3", "-i", "0.2", "-W", "2"];
    args.extend(extra);
    args.push(&target);
    let out = lab.output(host, &args)?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success() && text.contains("3 packets transmitted, 3 received"),
        "ping from {host}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(text)
}

/// Sends `message` on a connected UDP socket until its echo comes back
/// (three tries within `FLOW_TIMEOUT`); fails on any other datagram.
fn udp_exchange(socket: &std::net::UdpSocket, message: &str) -> Result<()> {
    const TRIES: u32 = 3;
    socket.set_read_timeout(Some(FLOW_TIMEOUT / TRIES))?;
    let mut buf = [0u8; 1500];
    for _ in 0..TRIES {
        socket.send(message.as_bytes())?;
        match socket.recv(&mut buf) {
            Ok(n) => {
                let got = String::from_utf8_lossy(&buf[..n]);
                ensure!(got == message, "sent {message:?}, got back {got:?}");
                return Ok(());
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e).context("waiting for the echo"),
        }
    }
    bail!("no echo of {message:?} in {FLOW_TIMEOUT:?}")
}

/// Receives one datagram and checks that it is `message`.
fn udp_expect(socket: &std::net::UdpSocket, message: &str) -> Result<()> {
    socket.set_read_timeout(Some(FLOW_TIMEOUT))?;
    let mut buf = [0u8; 1500];
    let n = socket
        .recv(&mut buf)
        .with_context(|| format!("waiting for the echo of {message:?}"))?;
    let got = String::from_utf8_lossy(&buf[..n]);
    ensure!(got == message, "expected {message:?}, got {got:?}");
    Ok(())
}

fn tcp_exchange(stream: &mut std::net::TcpStream, message: &str) -> Result<()> {
    use std::io::{Read, Write};
    stream.write_all(message.as_bytes())?;
    let mut echo = vec![0u8; message.len()];
    stream
        .read_exact(&mut echo)
        .with_context(|| format!("waiting for the echo of {message:?}"))?;
    let got = String::from_utf8_lossy(&echo);
    ensure!(got == message, "sent {message:?}, got back {got:?}");
    Ok(())
}

/// 4. Two clients on two LANs, both from source port 5555 to the same
///    server, behind the one uplink: each gets its own replies, over UDP
///    and TCP, with both mappings alive at once.
#[test]
fn two_clients_with_one_source_port() -> Result<()> {
    const PORT: u16 = 5555;
    if !require_root("two_clients_with_one_source_port") {
        return Ok(());
    }
    let _serial = serial();
    let mut lab = lab_up()?;
    let leaks = LanLeaks::install(&lab)?;
    // One uplink, so that the two flows must share its address.
    let lbd = Lbd::start(&mut lab, &config(&[&ISP1], &["lan0", "lan1"]))?;
    let _udp = UdpEchoServer::start(lab.ns("inet")?, server(ECHO_PORT))?;
    let _tcp = TcpEchoServer::start(lab.ns("inet")?, server(ECHO_PORT))?;
    let watch = watch_flows(&lab, ISP1.isp, "down0")?;
    let local: SocketAddr = (Ipv4Addr::UNSPECIFIED, PORT).into();
    let clients = ["client", "client2"];

    let udp: Vec<_> = clients
        .iter()
        .map(|c| {
            let s = udp_socket(lab.ns(c)?, local)?;
            s.connect(server(ECHO_PORT))?;
            Ok(s)
        })
        .collect::<Result<_>>()?;
    // One after the other, then both in flight at once.
    for (c, s) in clients.iter().zip(&udp) {
        udp_exchange(s, &format!("udp from {c}, first"))
            .with_context(|| format!("UDP from {c}"))?;
    }
    for (c, s) in clients.iter().zip(&udp) {
        s.send(format!("udp from {c}, second").as_bytes())?;
    }
    for (c, s) in clients.iter().zip(&udp) {
        udp_expect(s, &format!("udp from {c}, second")).with_context(|| format!("UDP to {c}"))?;
    }

    let mut tcp: Vec<_> = clients
        .iter()
        .map(|c| {
            tcp_connect_from(lab.ns(c)?, local, server(ECHO_PORT), FLOW_TIMEOUT)
                .with_context(|| format!("TCP from {c}"))
        })
        .collect::<Result<_>>()?;
    for round in ["first", "second"] {
        for (c, s) in clients.iter().zip(&mut tcp) {
            tcp_exchange(s, &format!("tcp from {c}, {round}"))
                .with_context(|| format!("TCP from {c}"))?;
        }
    }

    // Behind NAT: one flow keeps port 5555, the other gets a port from the
    // NAT range.
    for proto in [Proto::Udp, Proto::Tcp] {
        let seen = ports(&watch, proto)?;
        eprintln!("{proto:?}: isp1 saw source ports {seen:?}");
        ensure!(
            seen.len() == 2 && seen.contains(&PORT) && seen.iter().any(|p| NAT_PORTS.contains(p)),
            "{proto:?}: isp1 saw source ports {seen:?}; expected {PORT} and one in {NAT_PORTS:?}"
        );
    }
    let failures = lbd.uplink_counter("isp1", "nat_failures")?;
    ensure!(failures == 0, "{failures} NAT failures");
    leaks.check()?;
    lbd.stop(&mut lab)
}

/// One hop of `traceroute -n -q1`: its number and who answered (`None` for
/// a `*`).
fn parse_traceroute(text: &str) -> Vec<(u32, Option<Ipv4Addr>)> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let hop = words.next()?.parse().ok()?;
            Some((hop, words.next().and_then(|w| w.parse().ok())))
        })
        .collect()
}

/// 5. traceroute (UDP probes) lists the router, the ISP's gateway and the
///    server: ICMP time exceeded and port unreachable from beyond the
///    router reach the client through NAT.
#[test]
fn traceroute_lists_every_hop() -> Result<()> {
    if !require_root("traceroute_lists_every_hop") {
        return Ok(());
    }
    let _serial = serial();
    let mut lab = lab_up()?;
    let leaks = LanLeaks::install(&lab)?;
    let lbd = Lbd::start(&mut lab, &config(&BOTH, &["lan0"]))?;
    let target = SERVER_IP.to_string();
    let out = lab.output(
        "client",
        &["timeout", "30", "traceroute", "-n", "-q1", "-w1", &target],
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{}", text.trim_end());
    ensure!(
        out.status.success(),
        "traceroute failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let hops = parse_traceroute(&text);
    let gateways = [ISP1.gateway.parse::<Ipv4Addr>()?, ISP2.gateway.parse()?];
    let ok = matches!(
        hops.as_slice(),
        [(1, Some(router)), (2, Some(gw)), (3, Some(dst))]
            if *router == Ipv4Addr::new(10, 10, 0, 1) && gateways.contains(gw) && *dst == SERVER_IP
    );
    ensure!(
        ok,
        "expected hops 10.10.0.1, 100.64.N.1, {SERVER_IP}; got {hops:?}; status: {}",
        lbd.status()?
    );
    leaks.check()?;
    lbd.stop(&mut lab)
}

/// 6. Path MTU discovery: with a 1400-byte link between isp1 and inet, a
///    2 MB upload from the client (DF set, as Linux does) completes, and
///    the client has learnt the path MTU: isp1's "fragmentation needed"
///    came back through NAT.
#[test]
fn path_mtu_discovery_through_nat() -> Result<()> {
    const SIZE: usize = 2 * 1024 * 1024;
    if !require_root("path_mtu_discovery_through_nat") {
        return Ok(());
    }
    let _serial = serial();
    let mut lab = lab_up()?;
    let leaks = LanLeaks::install(&lab)?;
    lab.exec("isp1", &["ip", "link", "set", "dev", "up0", "mtu", "1400"])?;
    lab.exec("inet", &["ip", "link", "set", "dev", "isp1", "mtu", "1400"])?;
    // inet would advertise an MSS that fits its 1400-byte link, and the
    // client would never send a packet too big for it. A server on a
    // 1500-byte network behind the narrow link advertises 1460: so does
    // inet, and only the ISP's ICMP can tell the client the truth.
    lab.exec(
        "inet",
        &[
            "ip",
            "route",
            "replace",
            "100.64.1.0/30",
            "via",
            "100.65.1.1",
            "advmss",
            "1460",
        ],
    )?;
    let target = SERVER_IP.to_string();
    let route = lab.exec("client", &["ip", "route", "get", &target])?;
    ensure!(
        !route.contains("mtu"),
        "the client knows a path MTU before any traffic: {route}"
    );

    let lbd = Lbd::start(&mut lab, &config(&[&ISP1], &["lan0"]))?;
    let _sink = TcpSinkServer::start(lab.ns("inet")?, server(SINK_PORT))?;
    let start = Instant::now();
    let received = tcp_upload(
        lab.ns("client")?,
        server(SINK_PORT),
        SIZE,
        Duration::from_secs(15),
    )
    .with_context(|| {
        format!(
            "uploading through a 1400-byte link; status: {:?}",
            lbd.status()
        )
    })?;
    let elapsed = start.elapsed();
    ensure!(
        received == SIZE as u64,
        "the server read {received} bytes of {SIZE}"
    );
    let route = lab.exec("client", &["ip", "route", "get", &target])?;
    eprintln!(
        "2 MB upload through a 1400-byte link in {elapsed:.2?}; client route: {}",
        route.split_whitespace().collect::<Vec<_>>().join(" ")
    );
    ensure!(
        route.contains("mtu 1400"),
        "the client did not learn the path MTU: {route}"
    );
    leaks.check()?;
    lbd.stop(&mut lab)
}

/// 6b. A UDP datagram too big for its uplink, without DF (as Windows sends
///    UDP): XDP cannot fragment it, the kernel does, and the datagram
///    leaves as its flow's others do: from the same address and port, out
///    of the same uplink. Both uplinks are narrower than the LAN (1400
///    bytes), and flows are opened until some leave by isp2, which the
///    main table's default route does not name.
#[test]
fn a_datagram_too_big_without_df_leaves_as_its_flow_does() -> Result<()> {
    /// A datagram of 1472 bytes is a 1500-byte packet: the LAN's MTU.
    const BIG: usize = 1472;
    const SMALL: usize = 100;
    if !require_root("a_datagram_too_big_without_df_leaves_as_its_flow_does") {
        return Ok(());
    }
    let _serial = serial();
    let mut lab = lab_up()?;
    let leaks = LanLeaks::install(&lab)?;
    for uplink in BOTH {
        let wan = format!("wan{}", uplink.n);
        lab.exec("router", &["ip", "link", "set", "dev", &wan, "mtu", "1400"])?;
        lab.exec(
            uplink.isp,
            &["ip", "link", "set", "dev", "down0", "mtu", "1400"],
        )?;
    }
    let lbd = Lbd::start(&mut lab, &config(&BOTH, &["lan0"]))?;
    let status = lbd.status()?;
    ensure!(
        status["no_hand_over"].is_null(),
        "lbd cannot hand a datagram over on this kernel: {}",
        status["no_hand_over"]
    );
    let peer = UdpPeerServer::start(lab.ns("inet")?, server(ECHO_PORT))?;
    let client = lab.ns("client")?.to_owned();
    let mut sources = std::collections::BTreeSet::new();
    let mut flows = 0;
    while sources.len() < 2 {
        ensure!(
            flows < 64,
            "{flows} flows all left by {sources:?}: none took the other uplink"
        );
        let socket = udp_socket_without_df(&client)?;
        let (_, small) = udp_seen_by(&socket, peer.local_addr(), SMALL, FLOW_TIMEOUT)?;
        let (_, big) = udp_seen_by(&socket, peer.local_addr(), BIG, FLOW_TIMEOUT)
            .with_context(|| format!("flow {flows}; status: {:?}", lbd.status()))?;
        ensure!(
            big == small,
            "flow {flows}: its small datagram left from {small}, its big one from {big}"
        );
        // And the flow goes on as it was.
        let (_, again) = udp_seen_by(&socket, peer.local_addr(), SMALL, FLOW_TIMEOUT)?;
        ensure!(again == small, "flow {flows}: from {small}, then {again}");
        ensure!(
            NAT_PORTS.contains(&small.port()) || small.port() == socket.local_addr()?.port(),
            "flow {flows} left from {small}: not the fast path's translation"
        );
        sources.insert(small.ip());
        flows += 1;
    }
    let handed = lbd.reason("handed_too_big")?;
    eprintln!("{flows} flows, by {sources:?}: each big datagram left as its flow's small ones ({handed} handed over)");
    ensure!(
        handed >= flows,
        "lbd counts {handed} datagrams handed over, for {flows} flows' big ones"
    );
    leaks.check()?;
    lbd.stop(&mut lab)
}

/// 7. While lbd NATs the client's flows, the router's own TCP connections
///    and ping to the internet work: their replies are not mistaken for
///    NATed ones, and their ports never collide with NAT ports.
#[test]
fn router_own_connections_beside_nat() -> Result<()> {
    if !require_root("router_own_connections_beside_nat") {
        return Ok(());
    }
    let _serial = serial();
    let mut lab = lab_up()?;
    let leaks = LanLeaks::install(&lab)?;
    let lbd = Lbd::start(&mut lab, &config(&BOTH, &["lan0"]))?;
    let _tcp = TcpEchoServer::start(lab.ns("inet")?, server(ECHO_PORT))?;
    let _udp = UdpEchoServer::start(lab.ns("inet")?, server(ECHO_PORT))?;
    let watch = watch_flows(&lab, ISP1.isp, "down0")?;
    let client = lab.ns("client")?.to_owned();
    let router = lab.ns("router")?.to_owned();

    let stop = AtomicBool::new(false);
    let client_flows = AtomicUsize::new(0);
    thread::scope(|s| -> Result<()> {
        // The client keeps opening flows until the router is done.
        let background = s.spawn(|| -> Result<()> {
            while !stop.load(Ordering::Relaxed) {
                let mut flows = tcp_flows(&client, server(ECHO_PORT), 20, FLOW_TIMEOUT)?;
                flows.extend(udp_flows(&client, server(ECHO_PORT), 20, FLOW_TIMEOUT)?);
                for flow in flows {
                    flow.outcome.context("a client flow beside the router's")?;
                    client_flows.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(())
        });
        let result = (|| -> Result<()> {
            let deadline = Instant::now() + FLOW_TIMEOUT;
            while client_flows.load(Ordering::Relaxed) == 0 {
                ensure!(
                    Instant::now() < deadline && !background.is_finished(),
                    "the client's flows did not start"
                );
                thread::sleep(Duration::from_millis(20));
            }
            let passed_before = lbd.reason("pass_no_mapping")?;
            let mut own = tcp_flows(&router, server(ECHO_PORT), 20, FLOW_TIMEOUT)?;
            own.extend(udp_flows(&router, server(ECHO_PORT), 20, FLOW_TIMEOUT)?);
            for flow in &own {
                if let Err(e) = &flow.outcome {
                    bail!("the router's own flow: {e:#}; status: {}", lbd.status()?);
                }
                ensure!(
                    LOCAL_PORTS.contains(&flow.local_port),
                    "the router used port {}",
                    flow.local_port
                );
            }
            ping(&lab, "router", &[])?;
            // The router's own traffic leaves by its default route, isp1,
            // untranslated: isp1 saw its very ports.
            let seen = watch.seen_flows()?;
            for flow in &own {
                ensure!(
                    seen.contains(&flow.flow()),
                    "isp1 did not see the router's {:?} flow from port {}",
                    flow.proto,
                    flow.local_port
                );
            }
            let passed = lbd.reason("pass_no_mapping")? - passed_before;
            eprintln!(
                "router: {} own flows and 3 pings answered while the client ran {} flows; \
                 {passed} replies passed to the kernel as the router's own",
                own.len(),
                client_flows.load(Ordering::Relaxed)
            );
            // At least a SYN-ACK and an echo per TCP flow, an echo per UDP
            // flow, and the three echo replies.
            let least: u64 = own
                .iter()
                .map(|f| if f.proto == Proto::Tcp { 2 } else { 1 })
                .sum::<u64>()
                + 3;
            ensure!(
                passed >= least,
                "only {passed} replies were passed to the router's stack, expected at least {least}"
            );
            Ok(())
        })();
        stop.store(true, Ordering::Relaxed);
        let background = background
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        result?;
        background
    })?;
    ensure!(
        client_flows.load(Ordering::Relaxed) >= 40,
        "the client completed only {} flows",
        client_flows.load(Ordering::Relaxed)
    );
    leaks.check()?;
    lbd.stop(&mut lab)
}
