//! Inbound traffic and the router's own traffic on the right uplink (issue
//! "traffic lb did not open"), on the router shaped like the ones lb is
//! for (lab `dhcp`: leases from the ISPs' dnsmasq, one default route in
//! main, through wan1).
//!
//! - An operator's port forwards (DNAT in an nftables table of their own)
//!   are answered from the address and port the request was sent to, out
//!   of the uplink it came in on, while the LAN's own flows are balanced.
//! - The router's own services answer through the uplink they were
//!   reached on.
//! - The router's own unbound traffic (its DNS forwarder) follows the best
//!   uplink in service when the main table's uplink fails upstream.
//! - The guard: a LAN given as a bridge port is refused; a LAN without
//!   addresses leaks nothing; a `routed` prefix that is the LAN's is
//!   refused.
//!
//! Besides what the servers and clients see, every ISP counts the packets
//! that reach it with another uplink's address as source: there must be
//! none (an answer sent out of the wrong uplink shows up there, unless lb's
//! guard dropped it, and then no answer arrives). Nothing is added by hand
//! that an operator would not add: what makes it work is lbd's.

use std::{
    mem::MaybeUninit,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket},
    sync::atomic::{AtomicBool, AtomicU16, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use lb_tests::{
    daemon::{check_refusal, refusals, LabConfig, Lbd},
    dhcp, in_netns, require_root,
    stream::wait_for,
    traffic::{tcp_flows, udp_flows, wait_tcp_listener, FlowResult, TcpEchoServer, UdpEchoServer},
    unique_prefix, watch_destinations, watch_flows, watch_sources, FlowWatch, Lab, LabDesc,
    LanLeaks,
};
use socket2::{Domain, Protocol, Socket, Type};

/// How long to wait for something that must happen: a bound for a test
/// that must end, not a speed target.
const BOUND: Duration = Duration::from_secs(15);
/// Bound on an uplink's return to service after its upstream comes back:
/// a hold-down and `rise` good probe rounds come first.
const RETURN: Duration = Duration::from_secs(40);
/// Bound on one flow's connect and echo.
const FLOW: Duration = Duration::from_secs(3);
const PROBE: &str = "[[uplink.probe]]\nkind = \"icmp\"\ntarget = \"198.51.100.10\"";
const SERVER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 2);
/// A host of the branch network, behind the router's vpn0 (static route).
const BRANCH: Ipv4Addr = Ipv4Addr::new(10, 21, 0, 1);
const GRE: i32 = 47;
const ESP: i32 = 50;

/// The operator's port forwards, in a table of their own as an operator
/// writes them: UDP 9090 and TCP 8080 of wan2 and wan3 to the client's
/// echo servers; UDP 9091 and TCP 8081 to the branch host's, outside every
/// LAN, reached by the router's static route through vpn0.
const FORWARDS: &str = r#"
table ip operator {
    chain pre {
        type nat hook prerouting priority dstnat; policy accept;
        iifname "wan2" udp dport 9090 dnat to 10.10.0.2:9000
        iifname "wan2" tcp dport 8080 dnat to 10.10.0.2:8000
        iifname "wan3" udp dport 9090 dnat to 10.10.0.2:9000
        iifname "wan3" tcp dport 8080 dnat to 10.10.0.2:8000
        iifname "wan2" udp dport 9091 dnat to 10.21.0.1:9000
        iifname "wan2" tcp dport 8081 dnat to 10.21.0.1:8000
        iifname "wan3" udp dport 9091 dnat to 10.21.0.1:9000
        iifname "wan3" tcp dport 8081 dnat to 10.21.0.1:8000
    }
}
"#;

/// Uplink `n`'s address in the dhcp lab (its lease, 100.64.n.2).
fn uplink_addr(n: u8) -> Ipv4Addr {
    dhcp::uplink_addr(n, 2)
}

/// lbd on all three uplinks, gateways `auto`, an ICMP probe each, with
/// `extra2` in isp2's table; the LANs are `lans`.
fn config_with(lans: &[&str], extra2: &str) -> String {
    let isp2 = format!("{extra2}\n{PROBE}");
    LabConfig {
        lans,
        uplinks: &[(1, PROBE), (2, &isp2), (3, PROBE)],
        auto_gateway: true,
        ..LabConfig::default()
    }
    .render()
}

/// Counters, on each ISP's side of its uplink, of the packets that arrive
/// with another uplink's address as source: an answer that left through
/// the wrong uplink.
struct ForeignSources(Vec<(String, Ipv4Addr, FlowWatch)>);

impl ForeignSources {
    fn install(lab: &Lab) -> Result<ForeignSources> {
        let mut watches = Vec::new();
        for isp in 1..=3u8 {
            for other in (1..=3u8).filter(|&o| o != isp) {
                let (host, addr) = (format!("isp{isp}"), uplink_addr(other));
                let label = format!("wan{other}");
                let watch = watch_sources(lab, &host, "down0", &label, &format!("{addr}/32"))?;
                watches.push((host, addr, watch));
            }
        }
        Ok(ForeignSources(watches))
    }

    /// Fails if any ISP saw another uplink's address.
    fn check(&self) -> Result<()> {
        let mut seen = Vec::new();
        for (isp, addr, watch) in &self.0 {
            let packets = watch.packets()?;
            if packets > 0 {
                seen.push(format!("{packets} packets from {addr} at {isp}"));
            }
        }
        ensure!(
            seen.is_empty(),
            "packets left through an uplink with another uplink's address: {}",
            seen.join(", ")
        );
        Ok(())
    }
}

/// The dhcp lab with its leases, lbd on it with every uplink in service,
/// and the witnesses every test here is judged by.
struct Router {
    // Dropped first: the lab stops lbd and every process spawned in it
    // before `lbd` removes its directory and pins.
    lab: Lab,
    leaks: LanLeaks,
    foreign: ForeignSources,
    lbd: Lbd,
}

impl Router {
    fn start() -> Result<Router> {
        let mut lab = Lab::up(&LabDesc::shipped("dhcp")?, &unique_prefix())?;
        let leaks = LanLeaks::install(&lab)?;
        let foreign = ForeignSources::install(&lab)?;
        dhcp::start(&mut lab, &[1, 2, 3])?;
        let lbd = Lbd::start(&mut lab, &config_with(&["br-lan"], ""))?;
        for n in 1..=3 {
            lbd.wait_lifecycle(&format!("isp{n}"), "in service", BOUND)?;
        }
        Ok(Router {
            lab,
            leaks,
            foreign,
            lbd,
        })
    }

    /// What every test ends with: no LAN address and no other uplink's
    /// address reached an ISP; lbd stops and removes what it made.
    fn finish(self) -> Result<()> {
        let Router {
            mut lab,
            leaks,
            foreign,
            lbd,
        } = self;
        leaks.check()?;
        foreign.check()?;
        lbd.stop(&mut lab)
    }

    /// Loads the operator's port forwards ([`FORWARDS`]) as an operator
    /// does, from a file with `nft -f`.
    fn forward_ports(&self) -> Result<()> {
        let file = std::env::temp_dir().join(format!("{}operator.nft", self.lab.prefix()));
        std::fs::write(&file, FORWARDS).with_context(|| format!("writing {}", file.display()))?;
        let path = file.display().to_string();
        let loaded = self.lab.exec("router", &["nft", "-f", &path]);
        let _ = std::fs::remove_file(&file);
        loaded.context("loading the operator's port forwards")?;
        Ok(())
    }

    /// `counter` of every uplink, isp1 to isp3.
    fn counters(&self, counter: &str) -> Result<[u64; 3]> {
        let mut values = [0; 3];
        for (n, value) in values.iter_mut().enumerate() {
            *value = self.lbd.uplink_counter(&format!("isp{}", n + 1), counter)?;
        }
        Ok(values)
    }
}

/// The failures among `flows`, one line each.
fn failures(flows: &[FlowResult]) -> Vec<String> {
    flows
        .iter()
        .filter_map(|f| f.outcome.as_ref().err().map(|e| format!("{e:#}")))
        .collect()
}

fn udp_inbound(lab: &Lab, target: SocketAddrV4, count: usize) -> Result<Vec<String>> {
    lb_tests::traffic::udp_answered(lab.ns("inet")?, SERVER, target, count, FLOW)
}

/// `count` TCP connections from the internet host to `target`, each
/// echoing a message. A connect completes only when the SYN-ACK comes from
/// `target` itself (one from any other address is answered with a reset),
/// so each success is an answer from the address and port the connection
/// was opened to. Returns the failures.
fn tcp_inbound(lab: &Lab, target: SocketAddrV4, count: usize) -> Result<Vec<String>> {
    let flows = tcp_flows(lab.ns("inet")?, SocketAddr::V4(target), count, FLOW)?;
    Ok(failures(&flows))
}

/// Rounds of `count` flows of `udp` (else TCP) from the client to
/// `server`, until `stop` is set (at least one round): the LAN's own
/// traffic, balanced by the data plane, while something else goes on.
/// Returns how many flows ran and the failures.
fn outbound_until(
    lab: &Lab,
    udp: bool,
    server: SocketAddr,
    count: usize,
    stop: &AtomicBool,
) -> Result<(usize, Vec<String>)> {
    let client = lab.ns("client")?;
    let (mut ran, mut failed) = (0, Vec::new());
    loop {
        let flows = if udp {
            udp_flows(client, server, count, FLOW)?
        } else {
            tcp_flows(client, server, count, FLOW)?
        };
        ran += flows.len();
        failed.extend(failures(&flows));
        if stop.load(Ordering::Relaxed) {
            return Ok((ran, failed));
        }
    }
}

#[test]
fn port_forwards_are_answered_from_the_uplink_they_came_in_on_while_the_lan_is_balanced(
) -> Result<()> {
    if !require_root(
        "port_forwards_are_answered_from_the_uplink_they_came_in_on_while_the_lan_is_balanced",
    ) {
        return Ok(());
    }
    let router = Router::start()?;
    let lab = &router.lab;
    // The forwarded services, on the client; the LAN's own destination on
    // the internet host.
    let _udp_service = UdpEchoServer::start(lab.ns("client")?, (CLIENT, 9000).into())?;
    let _tcp_service = TcpEchoServer::start(lab.ns("client")?, (CLIENT, 8000).into())?;
    let outside: SocketAddr = (SERVER, 7000).into();
    let _udp_outside = UdpEchoServer::start(lab.ns("inet")?, outside)?;
    let _tcp_outside = TcpEchoServer::start(lab.ns("inet")?, outside)?;
    router.forward_ports()?;
    let new_before = router.counters("new_flows")?;
    let kernel_before = router.lbd.reason("pass_kernel_connection").ok();

    // The inbound exchanges run while the client opens 100 flows at a
    // time (UDP and TCP, round after round), so that the answers of the
    // forwards meet a data plane busy balancing new flows.
    let stop = AtomicBool::new(false);
    let (inbound, outbound) = thread::scope(|s| {
        let udp = s.spawn(|| outbound_until(lab, true, outside, 100, &stop));
        let tcp = s.spawn(|| outbound_until(lab, false, outside, 100, &stop));
        let inbound = (|| -> Result<Vec<String>> {
            let mut failed = Vec::new();
            for n in [2, 3] {
                let addr = uplink_addr(n);
                failed.extend(udp_inbound(lab, SocketAddrV4::new(addr, 9090), 20)?);
                failed.extend(tcp_inbound(lab, SocketAddrV4::new(addr, 8080), 20)?);
            }
            Ok(failed)
        })();
        stop.store(true, Ordering::Relaxed);
        let join = |h: thread::ScopedJoinHandle<'_, Result<(usize, Vec<String>)>>| {
            h.join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        };
        (inbound, [join(udp), join(tcp)])
    });
    let inbound = inbound?;
    let mut ran = 0;
    let mut out_failed = Vec::new();
    for result in outbound {
        let (n, failed) = result?;
        ran += n;
        out_failed.extend(failed);
    }
    let new_flows: Vec<u64> = router
        .counters("new_flows")?
        .iter()
        .zip(new_before)
        .map(|(after, before)| after.saturating_sub(before))
        .collect();
    eprintln!(
        "80 inbound exchanges on isp2 and isp3: {} failed; {ran} outbound flows meanwhile, \
         new flows per uplink {new_flows:?}, {} failed",
        inbound.len(),
        out_failed.len()
    );
    ensure!(
        inbound.is_empty(),
        "{} of 80 forwarded exchanges were not answered from their forwarded address: {inbound:?}",
        inbound.len()
    );
    ensure!(
        out_failed.is_empty(),
        "{} of {ran} outbound flows failed meanwhile: {out_failed:?}",
        out_failed.len()
    );
    ensure!(
        new_flows.iter().filter(|&&n| n > 0).count() >= 2,
        "the outbound flows were not balanced: new flows per uplink {new_flows:?}"
    );

    // lbd counts the connections that came in on each uplink.
    wait_for("lbd to count the inbound connections", BOUND, || {
        let inbound = router.counters("inbound")?;
        Ok(inbound[1] > 0 && inbound[2] > 0)
    })?;
    eprintln!(
        "inbound per uplink {:?}; pass_kernel_connection {kernel_before:?} -> {:?}",
        router.counters("inbound")?,
        router.lbd.reason("pass_kernel_connection").ok()
    );
    router.finish()
}

#[test]
fn a_port_forward_beyond_the_lan_is_answered_through_the_uplink_it_came_in_on() -> Result<()> {
    if !require_root("a_port_forward_beyond_the_lan_is_answered_through_the_uplink_it_came_in_on") {
        return Ok(());
    }
    let router = Router::start()?;
    let lab = &router.lab;
    // The branch host answers through the router's vpn0: the kernel's
    // path both ways, no LAN and no data plane on it.
    let _udp_service = UdpEchoServer::start(lab.ns("branch")?, (BRANCH, 9000).into())?;
    let _tcp_service = TcpEchoServer::start(lab.ns("branch")?, (BRANCH, 8000).into())?;
    // The branch sees the internet's own addresses (the UDP exchanges come
    // from the server's address, the TCP connections from the internet
    // host's address towards each ISP): the forward is a DNAT alone.
    let reached = [
        watch_sources(lab, "branch", "eth0", "inet", &format!("{SERVER}/32"))?,
        watch_sources(lab, "branch", "eth0", "isps", "100.65.0.0/16")?,
    ];
    router.forward_ports()?;
    let mut failed = Vec::new();
    for n in [2, 3] {
        let addr = uplink_addr(n);
        failed.extend(udp_inbound(lab, SocketAddrV4::new(addr, 9091), 10)?);
        failed.extend(tcp_inbound(lab, SocketAddrV4::new(addr, 8081), 10)?);
    }
    let at_branch = reached[0].packets()? + reached[1].packets()?;
    eprintln!(
        "40 exchanges forwarded to the branch: {} failed; the branch saw {at_branch} packets from the internet",
        failed.len()
    );
    ensure!(
        failed.is_empty(),
        "{} of 40 exchanges forwarded to the branch were not answered from their forwarded address: {failed:?}",
        failed.len()
    );
    ensure!(
        at_branch >= 40,
        "the branch saw {at_branch} packets from the internet: the forwards did not reach it"
    );
    router.finish()
}

#[test]
fn the_routers_own_services_answer_through_the_uplink_they_were_reached_on() -> Result<()> {
    if !require_root("the_routers_own_services_answer_through_the_uplink_they_were_reached_on") {
        return Ok(());
    }
    let router = Router::start()?;
    let lab = &router.lab;
    // A service of the router on every address, as sshd is.
    const PORT: u16 = 2222;
    let _service = TcpEchoServer::start(lab.ns("router")?, (Ipv4Addr::UNSPECIFIED, PORT).into())?;
    let at_isp: Vec<FlowWatch> = (1..=3)
        .map(|n| watch_flows(lab, &format!("isp{n}"), "down0"))
        .collect::<Result<_>>()?;
    let mut failed = Vec::new();
    for n in [2, 3] {
        failed.extend(tcp_inbound(
            lab,
            SocketAddrV4::new(uplink_addr(n), PORT),
            10,
        )?);
    }
    ensure!(
        failed.is_empty(),
        "{} of 20 connections to the router's own service failed: {failed:?}",
        failed.len()
    );
    // The answers (source port PORT) left through wan2 and wan3, never
    // through wan1, whose default route is the main table's.
    let answered: Vec<bool> = at_isp
        .iter()
        .map(|w| Ok(w.seen_flows()?.contains(&(6, PORT))))
        .collect::<Result<_>>()?;
    eprintln!("the service's answers reached isp1..isp3: {answered:?}");
    ensure!(
        answered == [false, true, true],
        "the answers of the router's service to isp2 and isp3 reached isp1..isp3 as {answered:?}"
    );
    router.finish()
}

#[test]
fn the_lan_reaches_the_routers_own_services_at_every_uplinks_address() -> Result<()> {
    if !require_root("the_lan_reaches_the_routers_own_services_at_every_uplinks_address") {
        return Ok(());
    }
    // A laptop in the office opens the router's WireGuard server, web page
    // or SSH by the public name, which resolves to an uplink's address:
    // the answer goes back into the LAN, not to that uplink's ISP.
    let router = Router::start()?;
    let lab = &router.lab;
    const PORT: u16 = 2222;
    let _service = TcpEchoServer::start(lab.ns("router")?, (Ipv4Addr::UNSPECIFIED, PORT).into())?;
    let mut failed = Vec::new();
    for n in 1..=3 {
        let addr = uplink_addr(n);
        let flows = tcp_flows(
            lab.ns("client")?,
            SocketAddrV4::new(addr, PORT).into(),
            5,
            FLOW,
        )?;
        failed.extend(failures(&flows));
        let target = addr.to_string();
        if let Err(e) = lab.exec("client", &["ping", "-c", "1", "-W", "2", &target]) {
            failed.push(format!("ping {target}: {e:#}"));
        }
    }
    ensure!(
        failed.is_empty(),
        "the client could not reach the router's own service at its uplinks' addresses: {failed:?}"
    );
    router.finish()
}

/// Sends `msg` from `socket` to `to` until the same comes back, for at
/// most `limit`: whether it did.
fn echoed(socket: &UdpSocket, to: SocketAddr, msg: &[u8], limit: Duration) -> Result<bool> {
    socket.set_read_timeout(Some(Duration::from_millis(200)))?;
    let until = Instant::now() + limit;
    let mut buf = [0u8; 256];
    while Instant::now() < until {
        socket.send_to(msg, to)?;
        while let Ok(n) = socket.recv(&mut buf) {
            if &buf[..n] == msg {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

#[test]
fn the_routers_own_sockets_on_a_nat_port_never_take_a_clients_answers() -> Result<()> {
    if !require_root("the_routers_own_sockets_on_a_nat_port_never_take_a_clients_answers") {
        return Ok(());
    }
    // A DNS forwarder (dnsmasq, unbound) picks its upstream source ports
    // at random from 1024-65535, lb's NAT range among them. A client's
    // flow to the same server, mapped to that port, must keep its
    // answers, and the forwarder its own.
    let router = Router::start()?;
    let lab = &router.lab;
    let server = SocketAddr::from((SERVER, 7000));
    let _echo = UdpEchoServer::start(lab.ns("inet")?, server)?;
    const PORT: u16 = 20005;
    let client = in_netns(lab.ns("client")?, || Ok(UdpSocket::bind((CLIENT, PORT))?))?;
    ensure!(
        echoed(&client, server, b"client, first", BOUND)?,
        "the client's flow from port {PORT} got no answer"
    );
    // The router's own socket on the same port, from every uplink's
    // address: one of them is where the client's flow is mapped.
    let mut unanswered = Vec::new();
    for n in 1..=3 {
        let addr = uplink_addr(n);
        let own = in_netns(lab.ns("router")?, || Ok(UdpSocket::bind((addr, PORT))?))?;
        let msg = format!("the router, from {addr}");
        if !echoed(&own, server, msg.as_bytes(), Duration::from_secs(3))? {
            unanswered.push(addr);
        }
    }
    ensure!(
        unanswered.is_empty(),
        "the router's own datagrams from port {PORT} of {unanswered:?} got no answer (a \
         client's flow holds that port there)"
    );
    ensure!(
        echoed(&client, server, b"client, again", BOUND)?,
        "the client's flow from port {PORT} got no answer after the router used the port"
    );
    router.finish()
}

#[test]
fn what_an_ipsec_policy_encrypts_is_the_kernels_and_never_leaves_in_the_clear() -> Result<()> {
    if !require_root("what_an_ipsec_policy_encrypts_is_the_kernels_and_never_leaves_in_the_clear") {
        return Ok(());
    }
    let router = Router::start()?;
    let lab = &router.lab;
    const HQ: &str = "10.50.0.0/16";
    let in_clear: Vec<FlowWatch> = (1..=3)
        .map(|n| watch_destinations(lab, &format!("isp{n}"), "down0", "hq", HQ))
        .collect::<Result<_>>()?;
    let verdict = |dst: &str| -> Result<String> {
        let said = router
            .lbd
            .lbctl(&["explain", "--json", "10.10.0.2:5000", dst, "udp"])?;
        let said: serde_json::Value = serde_json::from_str(&said)?;
        Ok(said["verdict"].as_str().unwrap_or_default().to_owned())
    };
    ensure!(
        verdict("10.50.0.5:443")? == "new",
        "before any IPsec policy, 10.50.0.5 is not balanced like the internet"
    );
    let in_clear_total =
        || -> Result<u64> { in_clear.iter().map(FlowWatch::packets).sum::<Result<u64>>() };
    // A client already sending to HQ before the tunnel is up (lbd started
    // before strongSwan): its flow is pinned, and leaves in the clear.
    let early = in_netns(lab.ns("client")?, || Ok(UdpSocket::bind((CLIENT, 0))?))?;
    let hq = SocketAddr::from((Ipv4Addr::new(10, 50, 0, 5), 443));
    early.send_to(b"early", hq)?;
    wait_for("the early datagram at an ISP", BOUND, || {
        Ok(in_clear_total()? >= 1)
    })?;
    let early_tuple = early.local_addr()?.to_string();
    // The site-to-site tunnel to the head office, as strongSwan installs
    // it: what the LAN sends to HQ's network goes through ESP to HQ's
    // gateway. (No routes: the default route carries it.)
    let policy = [
        "src",
        "10.10.0.0/24",
        "dst",
        HQ,
        "dir",
        "out",
        "tmpl",
        "src",
        "100.64.1.2",
        "dst",
        "198.51.100.20",
        "proto",
        "esp",
        "mode",
        "tunnel",
    ];
    let mut add = vec!["ip", "xfrm", "policy", "add"];
    add.extend_from_slice(&policy);
    lab.exec("router", &add)?;
    wait_for("lbd to leave HQ's network to the kernel", BOUND, || {
        Ok(verdict("10.50.0.5:443")? == "kernel")
    })?;
    // The early flow is let go too: its next packets are the kernel's.
    wait_for("lbd to let the early flow go", BOUND, || {
        let said =
            router
                .lbd
                .lbctl(&["explain", "--json", &early_tuple, "10.50.0.5:443", "udp"])?;
        let said: serde_json::Value = serde_json::from_str(&said)?;
        Ok(said["verdict"] == "kernel")
    })?;
    let before = in_clear_total()?;

    let (pinned, passed) = (
        router.counters("new_flows")?,
        router.lbd.reason("pass_local")?,
    );
    let client = in_netns(lab.ns("client")?, || Ok(UdpSocket::bind((CLIENT, 0))?))?;
    for _ in 0..10 {
        client.send_to(b"to HQ", hq)?;
        early.send_to(b"early, again", hq)?;
    }
    wait_for(
        "the data plane to hand the 20 datagrams to the kernel",
        BOUND,
        || Ok(router.lbd.reason("pass_local")? >= passed + 20),
    )?;
    let seen = in_clear_total()? - before;
    ensure!(
        router.counters("new_flows")? == pinned && seen == 0,
        "the LAN's datagrams to HQ were balanced ({:?} -> {:?} new flows) or {seen} reached the \
         ISPs in the clear",
        pinned,
        router.counters("new_flows")?
    );

    // The tunnel goes: HQ's network is the internet's again.
    let mut delete = vec!["ip", "xfrm", "policy", "delete"];
    delete.extend_from_slice(&policy[..6]);
    lab.exec("router", &delete)?;
    wait_for("lbd to balance HQ's network again", BOUND, || {
        Ok(verdict("10.50.0.5:443")? == "new")
    })?;
    router.finish()
}

/// DNS ids of the queries sent, so that an answer is told from a late one.
static DNS_ID: AtomicU16 = AtomicU16::new(1);

/// A DNS query for the A record of `name`, recursion desired.
fn dns_query(id: u16, name: &str) -> Vec<u8> {
    let mut q = Vec::new();
    q.extend(id.to_be_bytes());
    q.extend([0x01, 0x00]); // RD
    q.extend([0, 1, 0, 0, 0, 0, 0, 0]); // one question
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend(label.as_bytes());
    }
    q.extend([0, 0, 1, 0, 1]); // root, type A, class IN
    q
}

/// Past the (maybe compressed) name at `at`.
fn skip_name(msg: &[u8], mut at: usize) -> Option<usize> {
    loop {
        let len = *msg.get(at)?;
        match len {
            0 => return Some(at + 1),
            l if l & 0xc0 == 0xc0 => return Some(at + 2),
            l => at += 1 + usize::from(l),
        }
    }
}

/// The first A record of `msg` if it is a successful answer to query `id`.
fn dns_answer(msg: &[u8], id: u16) -> Option<Ipv4Addr> {
    let be = |i: usize| Some(u16::from_be_bytes([*msg.get(i)?, *msg.get(i + 1)?]));
    let flags = be(2)?;
    // Ours, a response, and RCODE 0.
    if be(0)? != id || flags & 0x8000 == 0 || flags & 0x000f != 0 {
        return None;
    }
    let mut at = 12;
    for _ in 0..be(4)? {
        at = skip_name(msg, at)? + 4;
    }
    for _ in 0..be(6)? {
        at = skip_name(msg, at)?;
        let (ty, len) = (be(at)?, usize::from(be(at + 8)?));
        let data = msg.get(at + 10..at + 10 + len)?;
        if ty == 1 && len == 4 {
            return Some(Ipv4Addr::new(data[0], data[1], data[2], data[3]));
        }
        at += 10 + len;
    }
    None
}

/// Asks the router's DNS forwarder (10.10.0.1) from the client for the A
/// record of `name`; `None` if no answer came within a second (or it was
/// an error).
fn resolve(lab: &Lab, name: &str) -> Result<Option<Ipv4Addr>> {
    let socket = in_netns(lab.ns("client")?, || {
        let s = UdpSocket::bind((CLIENT, 0)).context("binding a UDP socket on the client")?;
        s.set_read_timeout(Some(Duration::from_millis(200)))?;
        Ok(s)
    })?;
    let id = DNS_ID.fetch_add(1, Ordering::Relaxed);
    // Refused (no forwarder yet) is no answer.
    if socket
        .send_to(&dns_query(id, name), (Ipv4Addr::new(10, 10, 0, 1), 53))
        .is_err()
    {
        return Ok(None);
    }
    let deadline = Instant::now() + Duration::from_secs(1);
    let mut buf = [0u8; 1500];
    while Instant::now() < deadline {
        if let Ok((n, _)) = socket.recv_from(&mut buf) {
            if let Some(addr) = dns_answer(&buf[..n], id) {
                return Ok(Some(addr));
            }
        }
    }
    Ok(None)
}

/// Waits (bounded) until a fresh name under office.test resolves through
/// the router's forwarder; how long it took.
fn resolves(lab: &Lab, what: &str, limit: Duration) -> Result<Duration> {
    static NAME: AtomicU16 = AtomicU16::new(0);
    let start = Instant::now();
    let mut wrong = None;
    wait_for(what, limit, || {
        // A name never asked before: the answer cannot come from a cache.
        let name = format!("host{}.office.test", NAME.fetch_add(1, Ordering::Relaxed));
        let answer = resolve(lab, &name)?;
        if answer.is_some_and(|a| a != Ipv4Addr::new(192, 0, 2, 7)) {
            wrong = answer;
        }
        Ok(answer.is_some())
    })?;
    ensure!(wrong.is_none(), "office.test resolved to {wrong:?}");
    Ok(start.elapsed())
}

#[test]
fn the_routers_dns_forwarder_keeps_resolving_when_the_main_tables_uplink_fails() -> Result<()> {
    if !require_root("the_routers_dns_forwarder_keeps_resolving_when_the_main_tables_uplink_fails")
    {
        return Ok(());
    }
    let mut router = Router::start()?;
    // The ISP's resolver, on the internet host.
    let resolver = [
        "dnsmasq",
        "--keep-in-foreground",
        "--conf-file=/dev/null",
        "--no-resolv",
        "--no-hosts",
        "--bind-interfaces",
        "--listen-address=198.51.100.10",
        "--port=53",
        "--address=/office.test/192.0.2.7",
        "--pid-file",
        "--user=root",
        "--log-facility=-",
    ];
    router.lab.spawn("inet", &resolver)?;
    // The router's forwarder for the LAN, as OpenWrt runs it; no cache, so
    // that every answer took the path upstream.
    let forwarder = [
        "dnsmasq",
        "--keep-in-foreground",
        "--conf-file=/dev/null",
        "--no-resolv",
        "--no-hosts",
        "--bind-interfaces",
        "--listen-address=10.10.0.1",
        "--port=53",
        "--server=198.51.100.10",
        "--cache-size=0",
        "--pid-file",
        "--user=root",
        "--log-facility=-",
    ];
    router.lab.spawn("router", &forwarder)?;
    let lab = &router.lab;
    wait_tcp_listener(lab.ns("inet")?, 53, BOUND)?;
    wait_tcp_listener(lab.ns("router")?, 53, BOUND)?;
    resolves(lab, "a first answer through the router's forwarder", BOUND)?;

    // isp1, the uplink of the main table's only default route, fails
    // upstream while its gateway still answers.
    let cut = Instant::now();
    lab.set_link_up("isp1", "up0", false)?;
    resolves(lab, "an answer after isp1's upstream failed", BOUND)?;
    eprintln!(
        "the forwarder answered again {:?} after isp1's upstream failed (isp1: {}; slow path: {})",
        cut.elapsed(),
        router.lbd.uplink("isp1")?["lifecycle"],
        router.lbd.status()?["slow_path"]
    );

    lab.set_link_up("isp1", "up0", true)?;
    let back = router.lbd.wait_lifecycle("isp1", "in service", RETURN)?;
    let took = resolves(lab, "an answer after isp1 came back", BOUND)?;
    eprintln!(
        "isp1 in service again {back:?} after its upstream returned; an answer {took:?} later (slow path: {})",
        router.lbd.status()?["slow_path"]
    );
    router.finish()
}

#[test]
fn a_lan_given_as_a_bridge_port_is_refused_naming_the_bridge() -> Result<()> {
    if !require_root("a_lan_given_as_a_bridge_port_is_refused_naming_the_bridge") {
        return Ok(());
    }
    let lab = Lab::up(&LabDesc::shipped("dhcp")?, &unique_prefix())?;
    // lan0 is a port of br-lan: the LAN's address and routes are the
    // bridge's, so lbd given the port would judge the LAN by an interface
    // the kernel never routes for.
    let (checked, refused) = refusals(&lab, &config_with(&["lan0"], ""))?;
    for (what, said) in [("lbd --check", &checked), ("lbd", &refused)] {
        eprintln!("{what}: {said}");
        ensure!(
            said.contains("br-lan"),
            "{what} did not refuse the bridge port lan0 naming br-lan: {said:?}"
        );
    }
    Ok(())
}

/// A raw IP socket of protocol `proto` in namespace `ns`.
fn raw(ns: &str, proto: i32) -> Result<Socket> {
    in_netns(ns, || {
        let s = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::from(proto)))?;
        s.set_read_timeout(Some(Duration::from_millis(50)))?;
        Ok(s)
    })
}

/// The sources of the packets waiting on `socket`, read without blocking
/// longer than its timeout.
fn drain_sources(socket: &Socket, into: &mut Vec<Ipv4Addr>) {
    let mut buf = [MaybeUninit::<u8>::uninit(); 2048];
    while let Ok((_, from)) = socket.recv_from(&mut buf) {
        if let Some(SocketAddr::V4(from)) = from.as_socket() {
            into.push(*from.ip());
        }
    }
}

/// The ICMP errors waiting on raw socket `socket`, as (outer source,
/// type, code, quoted destination address and port), read without
/// blocking longer than its timeout.
fn drain_icmp_errors(socket: &Socket, into: &mut Vec<(Ipv4Addr, u8, u8, SocketAddrV4)>) {
    let mut buf = [MaybeUninit::<u8>::uninit(); 2048];
    while let Ok((n, _)) = socket.recv_from(&mut buf) {
        // SAFETY: the kernel wrote the first `n` bytes.
        let packet: Vec<u8> = buf[..n]
            .iter()
            .map(|b| unsafe { b.assume_init() })
            .collect();
        let ihl = usize::from(packet.first().copied().unwrap_or(0) & 0x0f) * 4;
        let Some(icmp) = packet.get(ihl..) else {
            continue;
        };
        let quoted_ihl = usize::from(icmp.get(8).copied().unwrap_or(0) & 0x0f) * 4;
        let (Some(src), Some(qdst), Some(qport)) = (
            packet.get(12..16),
            icmp.get(8 + 16..8 + 20),
            icmp.get(8 + quoted_ihl + 2..8 + quoted_ihl + 4),
        ) else {
            continue;
        };
        let addr = |b: &[u8]| Ipv4Addr::new(b[0], b[1], b[2], b[3]);
        into.push((
            addr(src),
            icmp[0],
            icmp[1],
            SocketAddrV4::new(addr(qdst), u16::from_be_bytes([qport[0], qport[1]])),
        ));
    }
}

#[test]
fn a_clients_port_unreachable_about_a_late_answer_reaches_the_server_from_the_flows_address(
) -> Result<()> {
    if !require_root(
        "a_clients_port_unreachable_about_a_late_answer_reaches_the_server_from_the_flows_address",
    ) {
        return Ok(());
    }
    let router = Router::start()?;
    let lab = &router.lab;
    let icmp = raw(lab.ns("inet")?, 1)?;
    let server = in_netns(lab.ns("inet")?, || {
        let s = UdpSocket::bind((SERVER, 7100))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        Ok(s)
    })?;
    // A DNS client that gave up: its query went out, its socket is gone
    // when the answer comes.
    let client = in_netns(lab.ns("client")?, || Ok(UdpSocket::bind((CLIENT, 0))?))?;
    client.send_to(b"query", (SERVER, 7100))?;
    let mut buf = [0u8; 64];
    let (_, mapping) = server.recv_from(&mut buf)?;
    let SocketAddr::V4(mapping) = mapping else {
        anyhow::bail!("the query came from {mapping}");
    };
    drop(client);
    server.send_to(b"a late answer", mapping)?;
    let mut seen = Vec::new();
    wait_for("the client's port unreachable at the server", BOUND, || {
        drain_icmp_errors(&icmp, &mut seen);
        Ok(seen
            .iter()
            .any(|&(_, kind, code, _)| (kind, code) == (3, 3)))
    })?;
    eprintln!("the query left as {mapping}; ICMP errors at the server: {seen:?}");
    ensure!(
        seen.iter()
            .filter(|&&(_, kind, code, _)| (kind, code) == (3, 3))
            .all(|&(from, _, _, quoted)| from == *mapping.ip() && quoted == mapping),
        "the port unreachable reached the server from another address than the flow's \
         mapping {mapping}, or quoting another: {seen:?}"
    );
    router.finish()
}

#[test]
fn esp_and_gre_from_a_lan_without_addresses_leave_natted_or_are_dropped_and_counted() -> Result<()>
{
    if !require_root(
        "esp_and_gre_from_a_lan_without_addresses_leave_natted_or_are_dropped_and_counted",
    ) {
        return Ok(());
    }
    let mut lab = Lab::up(&LabDesc::shipped("default")?, &unique_prefix())?;
    let leaks = LanLeaks::install(&lab)?;
    // The LAN interface without an address (nor its connected route): lbd
    // cannot learn the LAN's prefix from it, and whatever its nftables
    // table keys its masquerade on, the guard must hold. The client keeps
    // its route through 10.10.0.1 and knows the router's MAC for it (no
    // one answers ARP for an address nobody has): its packets do reach the
    // router.
    lab.exec("router", &["ip", "addr", "flush", "dev", "lan0"])?;
    let mac = dhcp::mac_of(&lab, "router", "lan0")?;
    lab.exec(
        "client",
        &[
            "ip",
            "neigh",
            "replace",
            "10.10.0.1",
            "lladdr",
            &mac,
            "dev",
            "eth0",
            "nud",
            "permanent",
        ],
    )?;
    let lbd = Lbd::start(&mut lab, &LabConfig::default().render())?;
    for name in ["isp1", "isp2"] {
        lbd.wait_lifecycle(name, "in service", BOUND)?;
    }
    let uplinks = [Ipv4Addr::new(100, 64, 1, 2), Ipv4Addr::new(100, 64, 2, 2)];
    const SENT: u64 = 5;
    for (proto, name) in [(ESP, "ESP"), (GRE, "GRE")] {
        let listener = raw(lab.ns("inet")?, proto)?;
        let dropped_before = lbd.status()?["guard_dropped"].as_u64().unwrap_or(0);
        let sender = raw(lab.ns("client")?, proto)?;
        // GRE: flags and protocol (IPv4), then a payload; ESP: SPI and
        // sequence number, then a payload. Neither is decoded here.
        let packet = b"\x00\x00\x08\x00lb inbound guard payload";
        for _ in 0..SENT {
            sender
                .send_to(packet, &SocketAddrV4::new(SERVER, 0).into())
                .with_context(|| format!("sending {name} from the client"))?;
        }
        // Every packet is accounted for: it reached the server, or the
        // guard counted it.
        let (mut seen, mut dropped) = (Vec::new(), 0);
        wait_for(
            &format!("the {name} packets to arrive or be counted"),
            BOUND,
            || {
                drain_sources(&listener, &mut seen);
                dropped = lbd.status()?["guard_dropped"]
                    .as_u64()
                    .unwrap_or(0)
                    .saturating_sub(dropped_before);
                Ok(seen.len() as u64 + dropped >= SENT)
            },
        )?;
        eprintln!("{name} from a LAN without addresses: arrived from {seen:?}, {dropped} dropped by the guard");
        ensure!(
            seen.iter().all(|s| uplinks.contains(s)),
            "{name} arrived from {seen:?}, not from an uplink's address"
        );
    }
    leaks.check()?;
    lbd.stop(&mut lab)
}

#[test]
fn a_routed_prefix_overlapping_the_lan_is_refused_with_file_line_and_key() -> Result<()> {
    if !require_root("a_routed_prefix_overlapping_the_lan_is_refused_with_file_line_and_key") {
        return Ok(());
    }
    let lab = Lab::up(&LabDesc::shipped("dhcp")?, &unique_prefix())?;
    // Half of the LAN's 10.10.0.0/24 declared routed through isp2: lb would
    // take the LAN's own addresses for the ISP's.
    let config = config_with(&["br-lan"], "routed = [\"10.10.0.0/25\"]");
    let line = config
        .lines()
        .position(|l| l.starts_with("routed"))
        .context("no routed key in the configuration")?
        + 1;
    let (checked, refused) = refusals(&lab, &config)?;
    for (what, said) in [("lbd --check", &checked), ("lbd", &refused)] {
        eprintln!("{what}: {said}");
        ensure!(
            said.contains(&format!("lbd.toml:{line}")) && said.contains("routed"),
            "{what} did not refuse the routed prefix at lbd.toml:{line} naming `routed`: {said:?}"
        );
    }
    // A prefix apart from the LAN passes the same check.
    let apart = config_with(&["br-lan"], "routed = [\"203.0.113.8/29\"]");
    let checked = check_refusal(&lab, &apart)?;
    ensure!(
        checked.is_empty(),
        "lbd --check refused a routed prefix apart from the LAN: {checked}"
    );
    Ok(())
}
