//! IPv6 balanced and failed over by lbd, in the DHCP lab with IPv6 as ISPs
//! give it (`lb_tests::dhcp6`): each uplink's address, next hop and /56
//! from Kea and radvd through dhcpcd, the LAN on a /64 of isp1's /56,
//! the client on SLAAC. Flows that leave by isp1 go untranslated; flows
//! that leave by isp2 take isp2's prefix (NPTv6) and come back.
//!
//! Every test checks, on each ISP's side, that no IPv6 packet came with a
//! source that ISP did not give the router (the LAN's prefix by the wrong
//! ISP, a ULA, an untranslated address), and that no IPv4 packet came
//! with a LAN source. How fast lbd follows is printed, not judged: a
//! bound here only says that a test must end.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv6Addr, SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use lb_tests::{
    daemon::{LabConfig, Lbd},
    dhcp,
    dhcp6::{self, Dhcp6},
    in_netns, require_root,
    traffic::{
        http_download, tcp_flows, tcp_upload, udp_flows, FlowResult, HeldUdp, HttpFileServer,
        TcpEchoServer, TcpSinkServer, UdpEchoServer,
    },
    unique_prefix, watch_flows, watch_sources, FlowWatch, Lab, LabDesc, LanLeaks, Leaks6,
};
use serde_json::Value;
use socket2::{Domain, Protocol, Socket, Type};

/// How long to wait for something that must happen: a bound for a test
/// that must end, not a speed target.
const BOUND: Duration = Duration::from_secs(20);
const FLOW_TIMEOUT: Duration = Duration::from_secs(5);
const PROBE: &str = "[[uplink.probe]]\nkind = \"icmp\"\ntarget = \"198.51.100.10\"";

/// A dual-stack router with lbd on isp1 and isp2, and its witnesses.
struct Router {
    lab: Lab,
    v6: Dhcp6,
    lbd: Lbd,
    leaks: LanLeaks,
    leaks6: Leaks6,
}

impl Router {
    /// The DHCP lab with IPv4 and IPv6 leases on wan1 and wan2, lbd on
    /// both with `extra` lines for each, waiting until lbd balances IPv6
    /// over both.
    fn up(extra: [&str; 2]) -> Result<Router> {
        Self::up_with(extra, "")
    }

    /// [`Router::up`], with whole `sections` (policies, rules) in lbd's
    /// configuration.
    fn up_with(extra: [&str; 2], sections: &str) -> Result<Router> {
        let mut lab = Lab::up(&LabDesc::shipped("dhcp")?, &unique_prefix())?;
        let leaks = LanLeaks::install(&lab)?;
        let leaks6 = Leaks6::install(&lab, |isp| {
            let n: u8 = isp
                .strip_prefix("isp")
                .and_then(|n| n.parse().ok())
                .with_context(|| format!("{isp} is not named ispN"))?;
            Ok(vec![dhcp6::isp_space(n).to_string()])
        })?;
        dhcp::start(&mut lab, &[1, 2])?;
        let v6 = dhcp6::start(&mut lab, &[1, 2])?;
        let (one, two) = (
            format!("{}\n{PROBE}", extra[0]),
            format!("{}\n{PROBE}", extra[1]),
        );
        let config = LabConfig {
            lans: &["br-lan"],
            uplinks: &[(1, &one), (2, &two)],
            auto_gateway: true,
            sections,
            ..LabConfig::default()
        }
        .render();
        let lbd = Lbd::start(&mut lab, &config)?;
        let router = Router {
            lab,
            v6,
            lbd,
            leaks,
            leaks6,
        };
        let took = router.wait_ipv6(&["isp1", "isp2"], BOUND)?;
        eprintln!("lbd balanced IPv6 {took:?} after it answered");
        Ok(router)
    }

    /// Waits until lbd balances IPv6 on the lab's LAN prefix with each of
    /// `active` active; how long it took.
    fn wait_ipv6(&self, active: &[&str], limit: Duration) -> Result<Duration> {
        let started = Instant::now();
        let lan = self.v6.lan.to_string();
        loop {
            let status = self.lbd.status()?;
            let ready = status["lan_prefix6"] == lan.as_str()
                && active.iter().all(|name| {
                    uplink_of(&status, name).is_some_and(|u| u["ipv6"]["state"] == "active")
                });
            if ready {
                return Ok(started.elapsed());
            }
            ensure!(
                started.elapsed() < limit,
                "lbd did not balance IPv6 on {lan} with {active:?} active within {limit:?}: {status}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn client(&self) -> Result<&str> {
        self.lab.ns("client")
    }

    /// The witnesses' verdict, then lbd stopped.
    fn finish(mut self) -> Result<()> {
        self.leaks.check()?;
        self.leaks6.check()?;
        self.lbd.stop(&mut self.lab)
    }
}

fn uplink_of<'a>(status: &'a Value, name: &str) -> Option<&'a Value> {
    status["uplinks"]
        .as_array()?
        .iter()
        .find(|u| u["name"] == name)
}

fn server(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V6(dhcp6::SERVER), port)
}

/// Watches of the flows that reach isp1 and isp2 from the router.
fn watch_isps(lab: &Lab) -> Result<[FlowWatch; 2]> {
    Ok([
        watch_flows(lab, "isp1", "down0")?,
        watch_flows(lab, "isp2", "down0")?,
    ])
}

/// Which of `flows` each ISP saw; fails unless every flow reached exactly
/// one. NPTv6 keeps ports, so an ISP sees the client's own (protocol,
/// port); what else reaches an ISP (the router's DHCP) is left out.
fn split(flows: &[(u8, u16)], watches: &[FlowWatch; 2]) -> Result<[BTreeSet<(u8, u16)>; 2]> {
    let ours: BTreeSet<(u8, u16)> = flows.iter().copied().collect();
    let seen = [
        &watches[0].seen_flows()? & &ours,
        &watches[1].seen_flows()? & &ours,
    ];
    let both: Vec<_> = seen[0].intersection(&seen[1]).collect();
    ensure!(both.is_empty(), "flows seen by both ISPs: {both:?}");
    let missing: Vec<_> = ours
        .iter()
        .filter(|f| !seen[0].contains(f) && !seen[1].contains(f))
        .collect();
    ensure!(missing.is_empty(), "flows no ISP saw: {missing:?}");
    Ok(seen)
}

fn all_ok(what: &str, flows: &[FlowResult]) -> Result<()> {
    let failed: Vec<String> = flows
        .iter()
        .filter_map(|f| f.outcome.as_ref().err().map(|e| format!("{e:#}")))
        .collect();
    ensure!(
        failed.is_empty(),
        "{what}: {} of {} flows failed, first: {:?}",
        failed.len(),
        flows.len(),
        failed.first()
    );
    Ok(())
}

#[test]
fn ipv6_flows_spread_by_weight_and_downloads_are_exact_through_a_translated_uplink() -> Result<()> {
    const PER_PROTO: usize = 300;
    const SIZE: usize = 20 * 1024 * 1024;
    const DOWNLOADS: usize = 4;
    const MOST_DOWNLOADS: usize = 16;
    if !require_root(
        "ipv6_flows_spread_by_weight_and_downloads_are_exact_through_a_translated_uplink",
    ) {
        return Ok(());
    }
    let router = Router::up(["", ""])?;
    // lbd's routes and rules of both families are read back as it made
    // them: no round changes them again.
    router.lbd.wait_steady(3, BOUND)?;
    let lab = &router.lab;
    let inet = lab.ns("inet")?;
    let tcp = TcpEchoServer::start(inet, server(0))?;
    let udp = UdpEchoServer::start(inet, server(0))?;
    let watches = watch_isps(lab)?;

    // Two clients, half the flows each. Their source ports may coincide,
    // so each ISP's view is read after each client's flows.
    let second = dhcp6::wait_slaac_on(lab, "client2", router.v6.lan)?;
    let client = router.client()?;
    let mut per_uplink = [0usize; 2];
    let mut total = 0;
    for (host, address) in [("client", router.v6.client_address), ("client2", second)] {
        watches[0].clear()?;
        watches[1].clear()?;
        let ns = lab.ns(host)?;
        let mut flows = tcp_flows(ns, tcp.local_addr(), PER_PROTO / 2, FLOW_TIMEOUT)?;
        all_ok(&format!("IPv6 TCP from {host} ({address})"), &flows)?;
        let udp_results = udp_flows(ns, udp.local_addr(), PER_PROTO / 2, FLOW_TIMEOUT)?;
        all_ok(&format!("IPv6 UDP from {host} ({address})"), &udp_results)?;
        flows.extend(udp_results);
        let these: Vec<(u8, u16)> = flows.iter().map(FlowResult::flow).collect();
        let by = split(&these, &watches)?;
        per_uplink[0] += by[0].len();
        per_uplink[1] += by[1].len();
        total += these.len();
    }
    let share = per_uplink[0] as f64 / total as f64;
    eprintln!(
        "{total} IPv6 flows from two clients: isp1 (untranslated) {}, isp2 (translated) {}; isp1 share {share:.3}",
        per_uplink[0],
        per_uplink[1]
    );
    ensure!(
        (share - 0.5).abs() <= 0.10,
        "isp1 carried {:.1}% of IPv6 flows, weights 1:1 ask for 50%",
        share * 100.0
    );

    // Downloads, byte-exact, until one went through the translated
    // uplink (each takes either with even odds: 16 all through isp1 would
    // be one chance in 65536).
    let dir = lab.files_dir()?;
    let blob = dir.join("blob6");
    let content: Vec<u8> = (0..SIZE).map(|i| (i * 7 + i / 4093) as u8).collect();
    std::fs::write(&blob, &content).context("writing the download")?;
    let http = HttpFileServer::start(inet, server(0), &blob)?;
    let mut through = [0usize; 2];
    for i in 0..MOST_DOWNLOADS {
        if i >= DOWNLOADS && through[1] > 0 {
            break;
        }
        watches[0].clear()?;
        watches[1].clear()?;
        let got = dir.join(format!("got6-{i}"));
        let started = Instant::now();
        let length = http_download(client, http.local_addr(), "/blob6", &got, BOUND)
            .with_context(|| format!("IPv6 download {i}"))?;
        let took = started.elapsed();
        let arrived = std::fs::read(&got).context("reading what arrived")?;
        ensure!(
            length == SIZE as u64 && arrived == content,
            "IPv6 download {i}: {} bytes arrived, not the {SIZE} served",
            arrived.len()
        );
        let by = [watches[0].packets()?, watches[1].packets()?];
        let uplink = usize::from(by[1] > by[0]);
        through[uplink] += 1;
        eprintln!(
            "IPv6 download {i}: {SIZE} bytes exact in {took:?} through isp{} (packets up: {by:?})",
            uplink + 1
        );
    }
    ensure!(
        through[1] > 0,
        "no download went through the translated uplink (isp2) in {MOST_DOWNLOADS}"
    );
    router.finish()
}

/// IPv6 has a program of its own, `lan_ingress6`, that `lan_ingress`
/// reaches by a tail call through a map. A program array forgets its
/// programs when the last file naming it closes, so this checks that
/// IPv6's fast path outlives lbd as IPv4's does: new IPv6 flows, with
/// lbd killed, are still balanced over both uplinks (the kernel would
/// send them all out of its one default route), and answered.
#[test]
fn ipv6_is_balanced_while_lbd_is_dead() -> Result<()> {
    const FLOWS: usize = 40;
    if !require_root("ipv6_is_balanced_while_lbd_is_dead") {
        return Ok(());
    }
    let mut router = Router::up(["", ""])?;
    let udp = UdpEchoServer::start(router.lab.ns("inet")?, server(0))?;
    let watches = watch_isps(&router.lab)?;
    router.lbd.kill(&mut router.lab)?;

    let flows = udp_flows(router.client()?, udp.local_addr(), FLOWS, FLOW_TIMEOUT)?;
    all_ok("IPv6 UDP with lbd killed", &flows)?;
    let these: Vec<(u8, u16)> = flows.iter().map(FlowResult::flow).collect();
    let by = split(&these, &watches)?;
    eprintln!(
        "{FLOWS} new IPv6 flows with lbd killed: isp1 {}, isp2 {}",
        by[0].len(),
        by[1].len()
    );
    ensure!(
        !by[0].is_empty() && !by[1].is_empty(),
        "with lbd killed, {FLOWS} new IPv6 flows all left by one uplink (isp1 {}, isp2 {}): \
         lan_ingress did not reach lan_ingress6, and the kernel routed them",
        by[0].len(),
        by[1].len()
    );
    router.lbd.restart(&mut router.lab)?;
    router.finish()
}

#[test]
fn carrier_loss_moves_ipv6_and_ipv4_flows_to_the_other_uplink() -> Result<()> {
    const FLOWS: usize = 40;
    if !require_root("carrier_loss_moves_ipv6_and_ipv4_flows_to_the_other_uplink") {
        return Ok(());
    }
    let router = Router::up(["", ""])?;
    let lab = &router.lab;
    let inet = lab.ns("inet")?;
    let udp6 = UdpEchoServer::start(inet, server(0))?;
    let udp4 = UdpEchoServer::start(inet, "198.51.100.10:0".parse()?)?;
    let watches = watch_isps(lab)?;
    let client = router.client()?;
    let six = HeldUdp::open(client, udp6.local_addr(), FLOWS)?;
    let four = HeldUdp::open(client, udp4.local_addr(), FLOWS)?;
    six.echo_all(FLOW_TIMEOUT)?;
    four.echo_all(FLOW_TIMEOUT)?;
    let before = split(&six.ids(), &watches)?;
    ensure!(
        !before[1].is_empty(),
        "no IPv6 flow of {FLOWS} took isp2: nothing to move"
    );
    let moving = before[1].len();

    // isp2's end goes away: the router's wan2 loses its carrier.
    watches[0].clear()?;
    watches[1].clear()?;
    let cut = Instant::now();
    lab.set_link_up("isp2", "down0", false)?;
    six.echo_all(BOUND)
        .context("IPv6 flows after isp2's carrier loss")?;
    let moved = cut.elapsed();
    four.echo_all(BOUND)
        .context("IPv4 flows after isp2's carrier loss")?;
    let after = split(&six.ids(), &watches)?;
    eprintln!("isp2's carrier lost: its {moving} IPv6 flows answered through isp1 {moved:?} later");
    ensure!(
        after[1].is_empty() && after[0].len() == FLOWS,
        "after isp2's carrier loss isp1 saw {} and isp2 {} of {FLOWS} IPv6 flows",
        after[0].len(),
        after[1].len()
    );
    let status = router.lbd.status()?;
    let isp2 = uplink_of(&status, "isp2").context("isp2 not in status")?;
    ensure!(
        isp2["ipv6"]["state"] != "active",
        "isp2's IPv6 is still active without a carrier: {isp2}"
    );
    lab.set_link_up("isp2", "down0", true)?;
    router.finish()
}

/// An IPv6 probe beside the IPv4 one: the uplink's IPv6 health is its own.
const PROBE6: &str = "[[uplink.probe]]\nkind = \"icmp\"\ntarget = \"2001:db8:ff::10\"";

/// The (protocol, port) pairs of `flows` that each ISP saw after `send`.
fn seen_after(
    watches: &[FlowWatch; 2],
    send: impl FnOnce() -> Result<()>,
) -> Result<[BTreeSet<(u8, u16)>; 2]> {
    watches[0].clear()?;
    watches[1].clear()?;
    send()?;
    Ok([watches[0].seen_flows()?, watches[1].seen_flows()?])
}

#[test]
fn an_upstream_cut_of_ipv6_alone_moves_ipv6_flows_and_leaves_ipv4_flows_be() -> Result<()> {
    const FLOWS: usize = 40;
    if !require_root("an_upstream_cut_of_ipv6_alone_moves_ipv6_flows_and_leaves_ipv4_flows_be") {
        return Ok(());
    }
    let router = Router::up([PROBE6, PROBE6])?;
    let lab = &router.lab;
    let inet = lab.ns("inet")?;
    let udp6 = UdpEchoServer::start(inet, server(0))?;
    let udp4 = UdpEchoServer::start(inet, "198.51.100.10:0".parse()?)?;
    let watches = watch_isps(lab)?;
    let client = router.client()?;
    let six = HeldUdp::open(client, udp6.local_addr(), FLOWS)?;
    let four = HeldUdp::open(client, udp4.local_addr(), FLOWS)?;
    let four_before = seen_after(&watches, || four.echo_all(FLOW_TIMEOUT))?;
    six.echo_all(FLOW_TIMEOUT)?;
    let before = split(&six.ids(), &watches)?;
    ensure!(
        !before[1].is_empty() && !four_before[1].is_empty(),
        "nothing to move or keep on isp2: IPv6 flows {:?}, IPv4 flows {:?} there",
        before[1].len(),
        four_before[1].len()
    );

    // isp2 stops forwarding IPv6, silently; its IPv4 goes on.
    lab.exec(
        "isp2",
        &[
            "nft",
            "add table ip6 cut; add chain ip6 cut forward { type filter hook forward priority 0; policy drop; }",
        ],
    )?;
    let cut = Instant::now();
    let after = seen_after(&watches, || six.echo_all(BOUND))?;
    let moved = cut.elapsed();
    let ours: BTreeSet<(u8, u16)> = six.ids().into_iter().collect();
    ensure!(
        ours.is_subset(&after[0]),
        "after isp2's IPv6 was cut, isp1 saw {} of the {FLOWS} IPv6 flows",
        (&after[0] & &ours).len()
    );
    let status = router.lbd.status()?;
    let isp2 = uplink_of(&status, "isp2").context("isp2 not in status")?;
    eprintln!(
        "isp2's IPv6 cut: its {} IPv6 flows answered through isp1 {moved:?} later; isp2 now: {} / IPv6 {}",
        before[1].len(),
        isp2["lifecycle"],
        isp2["ipv6"]["state"]
    );
    ensure!(
        isp2["lifecycle"] == "in service"
            && isp2["ipv6"]["state"] == "down"
            && isp2["ipv6"]["health"] == "down",
        "isp2 should be in service for IPv4 and down for IPv6: {isp2}"
    );
    let four_after = seen_after(&watches, || four.echo_all(FLOW_TIMEOUT))?;
    ensure!(
        four_after == four_before,
        "IPv4 flows moved when only IPv6 was cut: before {four_before:?}, after {four_after:?}"
    );

    // IPv6 comes back: isp2 takes IPv6 flows again once its probes say so.
    lab.exec("isp2", &["nft", "delete table ip6 cut"])?;
    // Rise good rounds after probes that waited out their timeouts: a
    // bound for a test that must end.
    let back = router.wait_ipv6(&["isp1", "isp2"], 3 * BOUND)?;
    eprintln!("isp2's IPv6 back in service {back:?} after the cut ended");
    router.finish()
}

#[test]
fn isp_renumbering_is_followed_and_the_old_prefix_never_leaves_again() -> Result<()> {
    const FLOWS: usize = 60;
    if !require_root("isp_renumbering_is_followed_and_the_old_prefix_never_leaves_again") {
        return Ok(());
    }
    let mut router = Router::up(["", ""])?;
    let old = router.v6.uplink(2)?.delegation;
    let renumbered = {
        let Router { lab, v6, .. } = &mut router;
        dhcp6::renumber(lab, v6, 2)?
    };
    let since = Instant::now();
    // lbd takes the new delegation (dhcpcd's reject route for it).
    loop {
        let status = router.lbd.status()?;
        let isp2 = uplink_of(&status, "isp2").context("isp2 not in status")?;
        if isp2["ipv6"]["delegated"] == renumbered.to_string().as_str()
            && isp2["ipv6"]["state"] == "active"
        {
            break;
        }
        ensure!(
            since.elapsed() < BOUND,
            "lbd did not take isp2's new delegation {renumbered} within {BOUND:?}: {isp2}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!(
        "isp2 renumbered {old} -> {renumbered}: lbd followed {:?} after the router held it",
        since.elapsed()
    );

    let lab = &router.lab;
    let stale = watch_sources(lab, "isp2", "down0", "old", &old.to_string())?;
    let inet = lab.ns("inet")?;
    let udp = UdpEchoServer::start(inet, server(0))?;
    let watches = watch_isps(lab)?;
    let flows = udp_flows(router.client()?, udp.local_addr(), FLOWS, FLOW_TIMEOUT)?;
    all_ok("IPv6 UDP after renumbering", &flows)?;
    let ids: Vec<(u8, u16)> = flows.iter().map(FlowResult::flow).collect();
    let seen = split(&ids, &watches)?;
    ensure!(
        !seen[1].is_empty(),
        "no flow of {FLOWS} took isp2 after it renumbered"
    );
    let leaked = stale.packets()?;
    ensure!(
        leaked == 0,
        "{leaked} packets left by isp2 with its old prefix {old}"
    );
    eprintln!(
        "after renumbering: {} of {FLOWS} flows through isp2, none with {old}",
        seen[1].len()
    );
    router.finish()
}

/// The Packet Too Big messages a namespace receives, read from a raw
/// ICMPv6 socket there (which gets a copy of each): (MTU, the source of
/// the packet it quotes). Stops reading when dropped.
struct TooBigWatch {
    got: std::sync::mpsc::Receiver<(u32, Ipv6Addr)>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl TooBigWatch {
    fn start(ns: &str) -> Result<TooBigWatch> {
        const PACKET_TOO_BIG: u8 = 2;
        let socket = in_netns(ns, || {
            Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6))
                .context("opening a raw ICMPv6 socket")
        })?;
        socket.set_read_timeout(Some(Duration::from_millis(100)))?;
        let socket = UdpSocket::from(socket); // for a plain `recv`
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (tell, got) = std::sync::mpsc::channel();
        let stopped = stop.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
                // The message without its IPv6 header: type, code,
                // checksum, MTU, then the quoted packet (its source at 8).
                let Ok(n) = socket.recv(&mut buf) else {
                    continue;
                };
                if n >= 8 + 40 && buf[0] == PACKET_TOO_BIG {
                    let mtu = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
                    let mut src = [0u8; 16];
                    src.copy_from_slice(&buf[16..32]);
                    if tell.send((mtu, Ipv6Addr::from(src))).is_err() {
                        return;
                    }
                }
            }
        });
        Ok(TooBigWatch { got, stop })
    }
}

impl TooBigWatch {
    /// Send datagrams of `size` bytes on `socket` until a Packet Too Big
    /// comes for one, for at most [`BOUND`]: the MTU it says and the
    /// source it quotes. `status` says what lbd shows, for a failure.
    fn wait(
        &self,
        socket: &UdpSocket,
        size: usize,
        status: impl Fn() -> String,
    ) -> Result<(u32, Ipv6Addr)> {
        let started = Instant::now();
        loop {
            match socket.send(&vec![0x5a; size]) {
                Ok(_) => {}
                // A connected socket that was told already (its error is
                // EMSGSIZE once a Packet Too Big came): the watch has it.
                Err(e) if e.raw_os_error() == Some(libc::EMSGSIZE) => {}
                Err(e) => return Err(e).context("sending a big datagram"),
            }
            match self.got.recv_timeout(Duration::from_millis(200)) {
                Ok((mtu, quoted)) => {
                    eprintln!(
                        "Packet Too Big at the client {:?} after its first big datagram: \
                         MTU {mtu}, quoting {quoted}",
                        started.elapsed()
                    );
                    return Ok((mtu, quoted));
                }
                Err(_) => ensure!(
                    started.elapsed() < BOUND,
                    "the client saw no Packet Too Big for its {size}-byte datagram within \
                     {BOUND:?}; {}",
                    status()
                ),
            }
        }
    }
}

impl Drop for TooBigWatch {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

#[test]
fn path_mtu_discovery_works_through_a_translated_uplink() -> Result<()> {
    const SIZE: usize = 4 * 1024 * 1024;
    const MTU: u32 = 1280;
    /// A datagram that fits the LAN's 1500 bytes and not isp2's line.
    const BIG: usize = 1400;
    if !require_root("path_mtu_discovery_works_through_a_translated_uplink") {
        return Ok(());
    }
    // isp1 is the backup: every new flow takes isp2, translated.
    let router = Router::up(["tier = 2", "tier = 1"])?;
    let lab = &router.lab;
    // isp2's line to the internet carries 1280 bytes at most.
    lab.exec("isp2", &["ip", "link", "set", "dev", "up0", "mtu", "1280"])?;
    lab.exec("inet", &["ip", "link", "set", "dev", "isp2", "mtu", "1280"])?;
    let inet = lab.ns("inet")?;
    let udp = UdpEchoServer::start(inet, server(0))?;
    let watches = watch_isps(lab)?;
    let client = router.client()?;
    let own = router.v6.client_address;

    // A big datagram from the client: isp2 cannot forward it and tells
    // the sender, whose address lb must give back to the client.
    let too_big = TooBigWatch::start(client)?;
    let socket = in_netns(client, || {
        let s = UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0))?;
        s.connect(udp.local_addr())?;
        Ok(s)
    })?;
    let (mtu, quoted) = too_big.wait(&socket, BIG, String::new)?;
    ensure!(
        mtu == MTU && quoted == own,
        "the client's Packet Too Big says MTU {mtu} and quotes {quoted}; expected {MTU} and its own address {own}"
    );
    ensure!(
        watches[1].packets()? > 0 && watches[0].packets()? == 0,
        "the big datagrams did not go through isp2 alone: packets isp1 {}, isp2 {}",
        watches[0].packets()?,
        watches[1].packets()?
    );

    // TCP both ways through the narrow line.
    let sink = TcpSinkServer::start(inet, server(0))?;
    let sent = tcp_upload(client, sink.local_addr(), SIZE, BOUND)?;
    ensure!(sent == SIZE as u64, "uploaded {sent} bytes of {SIZE}");
    let dir = lab.files_dir()?;
    let blob = dir.join("blob-mtu");
    let content: Vec<u8> = (0..SIZE).map(|i| (i % 253) as u8).collect();
    std::fs::write(&blob, &content).context("writing the download")?;
    let http = HttpFileServer::start(inet, server(0), &blob)?;
    let got = dir.join("got-mtu");
    http_download(client, http.local_addr(), "/blob-mtu", &got, BOUND)?;
    ensure!(
        std::fs::read(&got)? == content,
        "the download through isp2 (MTU {MTU}) arrived different"
    );
    ensure!(
        watches[0].packets()? == 0,
        "{} packets took isp1, the backup, while isp2 was in service",
        watches[0].packets()?
    );
    router.finish()
}

/// A router's own uplink narrower than the LAN (isp2's line, 1400 bytes):
/// an IPv6 packet too big for it is answered by the router with "Packet
/// Too Big" and that MTU, as IPv6 routers must. The flows go by isp2 (a
/// rule), the kernel's own IPv6 by isp1 (the tiers): a packet left to the
/// kernel would leave by isp1, under isp1's prefix, and the client would
/// never learn. A TCP upload through isp2 then completes.
#[test]
fn an_uplink_narrower_than_the_lan_tells_the_client_packet_too_big() -> Result<()> {
    if !require_root("an_uplink_narrower_than_the_lan_tells_the_client_packet_too_big") {
        return Ok(());
    }
    tells_packet_too_big(|lab| {
        lab.exec(
            "router",
            &["ip", "link", "set", "dev", "wan2", "mtu", "1400"],
        )?;
        lab.exec(
            "isp2",
            &["ip", "link", "set", "dev", "down0", "mtu", "1400"],
        )?;
        Ok(())
    })
}

/// The same where only isp2's IPv6 is narrower (its interface's IPv6 MTU,
/// as the kernel sets it from a router advertisement's MTU option; the
/// link stays at 1500): lb answers with the IPv6 MTU.
#[test]
fn an_uplinks_ipv6_mtu_below_its_links_tells_the_client_packet_too_big() -> Result<()> {
    if !require_root("an_uplinks_ipv6_mtu_below_its_links_tells_the_client_packet_too_big") {
        return Ok(());
    }
    tells_packet_too_big(|lab| {
        lab.exec("router", &["sysctl", "-qw", "net.ipv6.conf.wan2.mtu=1400"])?;
        Ok(())
    })
}

/// The same where a router advertisement's MTU option lands as dhcpcd
/// puts it: on the default route it installs, the interface's IPv6 MTU
/// left at 1500.
#[test]
fn an_mtu_on_an_uplinks_ipv6_default_route_tells_the_client_packet_too_big() -> Result<()> {
    if !require_root("an_mtu_on_an_uplinks_ipv6_default_route_tells_the_client_packet_too_big") {
        return Ok(());
    }
    tells_packet_too_big(|lab| {
        let route = lab.exec(
            "router",
            &["ip", "-6", "route", "show", "default", "dev", "wan2"],
        )?;
        let word_after = |key: &str| {
            let mut words = route.split_whitespace();
            words
                .find(|w| *w == key)
                .and(words.next())
                .map(str::to_owned)
        };
        let via = word_after("via").with_context(|| format!("no next hop in {route:?}"))?;
        let mut args = vec![
            "ip", "-6", "route", "change", "default", "via", &via, "dev", "wan2",
        ];
        let (proto, metric) = (word_after("proto"), word_after("metric"));
        if let Some(p) = &proto {
            args.extend(["proto", p]);
        }
        if let Some(m) = &metric {
            args.extend(["metric", m]);
        }
        args.extend(["mtu", "1400"]);
        lab.exec("router", &args)?;
        Ok(())
    })
}

/// The body of the three tests above: `narrow` makes isp2's IPv6 carry
/// 1400 bytes at most.
fn tells_packet_too_big(narrow: impl FnOnce(&Lab) -> Result<()>) -> Result<()> {
    const SIZE: usize = 2 * 1024 * 1024;
    const MTU: u32 = 1400;
    const RULED: u16 = 40200;
    /// A datagram that fits the LAN's 1500 bytes and not isp2's 1400.
    const BIG: usize = 1440;
    let sections = format!(
        "[[policy]]\nname = \"via-isp2\"\nuplinks = [\"isp2\"]\n\n\
         [[rule]]\nproto = \"udp\"\ndst_port = {RULED}\npolicy = \"via-isp2\"\n\n\
         [[rule]]\nproto = \"tcp\"\ndst_port = {RULED}\npolicy = \"via-isp2\"\n"
    );
    let router = Router::up_with(["tier = 1", "tier = 2"], &sections)?;
    let lab = &router.lab;
    narrow(lab)?;
    let inet = lab.ns("inet")?;
    let udp = UdpEchoServer::start(inet, server(RULED))?;
    let client = router.client()?;
    let own = router.v6.client_address;

    let too_big = TooBigWatch::start(client)?;
    let socket = in_netns(client, || {
        let s = UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0))?;
        s.connect(udp.local_addr())?;
        Ok(s)
    })?;
    // Until lbd has seen isp2's new MTU, a big datagram is sent by XDP
    // (and lost at wan2, or forwarded beyond): sent again until answered.
    let (mtu, quoted) = too_big.wait(&socket, BIG, || {
        router
            .lbd
            .status()
            .map_or_else(|e| format!("{e:#}"), |s| s.to_string())
    })?;
    ensure!(
        mtu == MTU && quoted == own,
        "the client's Packet Too Big says MTU {mtu} and quotes {quoted}; expected {MTU} and its own address {own}"
    );
    let told = router.lbd.reason("told_too_big")?;
    ensure!(told > 0, "lbd counts no told_too_big");

    // TCP learns it anew: the client forgets what the datagram taught it.
    lab.exec("client", &["ip", "-6", "route", "flush", "cache"])?;
    let target = udp.local_addr().ip().to_string();
    let route = lab.exec("client", &["ip", "-6", "route", "get", &target])?;
    ensure!(
        !route.contains(&format!("mtu {MTU}")),
        "flushing the client's route cache left the path MTU it learnt (Linux 5.3 and \
         iproute2 of its time flush IPv6 exceptions): {route}"
    );
    let sink = TcpSinkServer::start(inet, server(RULED))?;
    let sent = tcp_upload(client, sink.local_addr(), SIZE, BOUND)
        .with_context(|| format!("uploading through isp2 (MTU {MTU})"))?;
    ensure!(sent == SIZE as u64, "uploaded {sent} bytes of {SIZE}");
    let told_tcp = router.lbd.reason("told_too_big")? - told;
    eprintln!("the upload was told Packet Too Big {told_tcp} times");
    ensure!(told_tcp > 0, "the TCP upload was never told Packet Too Big");
    router.finish()
}

/// How long one exchange of the kernel's IPv6 waits for its echo: an
/// attempt of a bounded poll, not a speed target.
const ATTEMPT: Duration = Duration::from_millis(300);
/// A datagram bigger than the LAN's 1500 bytes: the client sends it in
/// fragments, which the fast path leaves to the kernel.
const FRAGMENTED: usize = 3000;

/// Traffic that is the kernel's to route: UDP exchanges of `size` bytes
/// with `server` from namespace `ns`, each from a new socket. A socket of
/// its own each time is a new connection for conntrack, whose NAT (none,
/// or the prefix translation of the uplink it leaves by) is decided at its
/// first packet and kept for its life.
struct Exchange<'a> {
    what: &'a str,
    ns: &'a str,
    server: SocketAddr,
    size: usize,
    /// A socket to send from every time instead (one connection for all
    /// the exchanges: what outlives a move of the kernel's IPv6).
    held: Option<&'a UdpSocket>,
}

/// A UDP socket in namespace `ns` connected to `server`, its reads
/// bounded by [`ATTEMPT`].
fn exchange_socket(ns: &str, server: SocketAddr) -> Result<UdpSocket> {
    in_netns(ns, || {
        let s = UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0)).context("binding a UDP socket")?;
        s.connect(server)
            .with_context(|| format!("connecting a UDP socket to {server}"))?;
        s.set_read_timeout(Some(ATTEMPT))?;
        Ok(s)
    })
}

/// Which ISP carried one exchange, and what the ISPs saw of it.
#[derive(Debug)]
struct Crossing {
    /// The exchange's source port (the client's, or the router's).
    port: u16,
    /// Its packets (fragments included) at isp1 with the LAN's own prefix,
    /// and at isp2 with the LAN's prefix translated to isp2's.
    sources: [u64; 2],
    /// Whether isp1 and isp2 saw its flow.
    seen: [bool; 2],
}

impl Crossing {
    /// The ISP (0: isp1, 1: isp2) that carried it, if exactly one did.
    fn by(&self) -> Option<usize> {
        match self.seen {
            [true, false] => Some(0),
            [false, true] => Some(1),
            _ => None,
        }
    }
}

/// The witnesses of the kernel's IPv6: the flows each ISP sees, and the
/// packets each sees with its own prefix for the LAN (isp1: the LAN's
/// prefix, untranslated; isp2: the prefix lb translates it to there).
struct KernelWatch {
    flows: [FlowWatch; 2],
    sources: [FlowWatch; 2],
}

impl KernelWatch {
    fn install(lab: &Lab, lan: &str, translated: &str) -> Result<KernelWatch> {
        Ok(KernelWatch {
            flows: watch_isps(lab)?,
            sources: [
                watch_sources(lab, "isp1", "down0", "lan6", lan)?,
                watch_sources(lab, "isp2", "down0", "to6", translated)?,
            ],
        })
    }

    /// One exchange: where it went if its echo came within [`ATTEMPT`],
    /// else (the inner error) why not.
    fn once(&self, ex: &Exchange) -> Result<Result<Crossing>> {
        for w in self.flows.iter().chain(&self.sources) {
            w.clear()?;
        }
        let socket = match ex.held {
            Some(held) => held.try_clone().context("the held UDP socket")?,
            None => exchange_socket(ex.ns, ex.server)?,
        };
        let port = socket.local_addr()?.port();
        let sent: Vec<u8> = (0..ex.size).map(|i| (i % 251) as u8).collect();
        // The network may refuse (no route yet, an ICMPv6 error): that is
        // an exchange that did not go through, not a failed test.
        if let Err(e) = socket.send(&sent) {
            return Ok(Err(anyhow::Error::new(e).context("sending")));
        }
        let mut back = vec![0u8; ex.size + 1];
        // A held socket's echo of an exchange that timed out may still
        // come: such stale echoes are read and passed over.
        let mut read = socket.recv(&mut back);
        while ex.held.is_some() && matches!(read, Ok(n) if back[..n] != sent[..]) {
            read = socket.recv(&mut back);
        }
        match read {
            Ok(n) if back[..n] == sent[..] => {}
            Ok(n) => {
                return Ok(Err(anyhow::anyhow!(
                    "an echo of {n} bytes, not the {} sent",
                    ex.size
                )))
            }
            Err(e) => return Ok(Err(anyhow::Error::new(e).context("waiting for the echo"))),
        }
        let flow = (17, port);
        Ok(Ok(Crossing {
            port,
            sources: [self.sources[0].packets()?, self.sources[1].packets()?],
            seen: [
                self.flows[0].seen_flows()?.contains(&flow),
                self.flows[1].seen_flows()?.contains(&flow),
            ],
        }))
    }

    /// Exchanges until one goes through ISP `isp` (0: isp1), within
    /// `limit` of `since`: that one, and how long after `since` it came.
    fn until_through(
        &self,
        lab: &Lab,
        ex: &Exchange,
        isp: usize,
        since: Instant,
        limit: Duration,
    ) -> Result<(Crossing, Duration)> {
        loop {
            let last = match self.once(ex)? {
                Ok(c) if c.by() == Some(isp) => return Ok((c, since.elapsed())),
                Ok(c) => format!("answered, not through isp{} alone: {c:?}", isp + 1),
                Err(e) => format!("{e:#}"),
            };
            if since.elapsed() >= limit {
                let rules = lab.exec("router", &["ip", "-6", "rule", "show"])?;
                let routes = lab.exec(
                    "router",
                    &["ip", "-6", "route", "show", "table", "all", "proto", "251"],
                )?;
                anyhow::bail!(
                    "{} did not go through isp{} within {limit:?}; the last: {last}\n\
                     the router's IPv6 rules:\n{rules}lbd's IPv6 routes:\n{routes}",
                    ex.what,
                    isp + 1
                );
            }
        }
    }
}

#[test]
fn the_kernels_ipv6_leaves_by_the_best_uplink_in_service_and_moves_when_its_ipv6_is_cut(
) -> Result<()> {
    if !require_root(
        "the_kernels_ipv6_leaves_by_the_best_uplink_in_service_and_moves_when_its_ipv6_is_cut",
    ) {
        return Ok(());
    }
    // isp2 is the best (tier 1; isp1, whose prefix the LAN carries, is the
    // backup), which the main table's default routes (wan1's first, as
    // dhcpcd put them) know nothing of: only lbd's IPv6 rules send the
    // kernel's IPv6 there.
    let router = Router::up([
        &format!("tier = 2\n{PROBE6}"),
        &format!("tier = 1\n{PROBE6}"),
    ])?;
    let lab = &router.lab;
    let status = router.lbd.status()?;
    let isp2 = uplink_of(&status, "isp2").context("isp2 not in status")?;
    let translated = isp2["ipv6"]["translated_to"]
        .as_str()
        .with_context(|| format!("isp2 translates the LAN's prefix to nothing: {isp2}"))?
        .to_string();
    let lan = router.v6.lan.to_string();
    let udp = UdpEchoServer::start(lab.ns("inet")?, server(0))?;
    let watch = KernelWatch::install(lab, &lan, &translated)?;
    let fragments = Exchange {
        what: "a fragmented datagram from the client",
        ns: router.client()?,
        server: udp.local_addr(),
        size: FRAGMENTED,
        held: None,
    };
    let own = Exchange {
        what: "a datagram of the router's own",
        ns: lab.ns("router")?,
        server: udp.local_addr(),
        size: 64,
        held: None,
    };
    // One connection for the whole test (an IPsec association, a long
    // stream on one socket): it must follow each move too.
    let socket = exchange_socket(router.client()?, udp.local_addr())?;
    let held = Exchange {
        what: "a fragmented datagram of the client's held connection",
        held: Some(&socket),
        ..fragments
    };
    let passed_before = router.lbd.reason("pass_fragment")?;

    // Both in service: the client's fragments and the router's own
    // datagrams leave by isp2, the LAN's prefix translated to isp2's.
    // Polled: lbd routes by an uplink the round after `ip6 lb` translates
    // for it.
    let (c, took) = watch.until_through(lab, &fragments, 1, Instant::now(), BOUND)?;
    eprintln!(
        "both in service: the client's {FRAGMENTED}-byte datagram (port {}) went through isp2 with {translated} ({} packets there) {took:?} after lbd balanced IPv6",
        c.port, c.sources[1]
    );
    ensure!(
        c.sources[1] >= 2 && c.sources[0] == 0,
        "the client's fragments reached isp2 with {translated} {} times and isp1 with {lan} {} times: {c:?}",
        c.sources[1],
        c.sources[0]
    );
    let passed = router
        .lbd
        .reason("pass_fragment")?
        .saturating_sub(passed_before);
    ensure!(
        passed >= 2,
        "the fast path left {passed} fragments to the kernel: the datagram was not the kernel's"
    );
    let (c, _) = watch.until_through(lab, &own, 1, Instant::now(), BOUND)?;
    eprintln!(
        "both in service: the router's own datagram (port {}) went through isp2",
        c.port
    );
    let (c, _) = watch.until_through(lab, &held, 1, Instant::now(), BOUND)?;
    eprintln!(
        "both in service: the held connection (port {}) went through isp2",
        c.port
    );
    let said = router.lbd.status()?["slow_path6"].clone();
    ensure!(
        said == "isp2",
        "lbctl status says the kernel's IPv6 goes by {said}, not isp2"
    );

    // isp2 stops forwarding IPv6, silently; its IPv4 goes on.
    lab.exec(
        "isp2",
        &[
            "nft",
            "add table ip6 cut; add chain ip6 cut forward { type filter hook forward priority 0; policy drop; }",
        ],
    )?;
    let cut = Instant::now();
    // Probes that wait out their timeouts, then a round: a bound for a
    // test that must end.
    let (c, moved) = watch.until_through(lab, &fragments, 0, cut, 3 * BOUND)?;
    let status = router.lbd.status()?;
    let isp2 = uplink_of(&status, "isp2").context("isp2 not in status")?;
    eprintln!(
        "isp2's IPv6 cut: the client's fragmented datagram (port {}) went through isp1 with {lan} ({} packets there) {moved:?} later; isp2 now: {} / IPv6 {}",
        c.port, c.sources[0], isp2["lifecycle"], isp2["ipv6"]["state"]
    );
    ensure!(
        c.sources[0] >= 2 && c.sources[1] == 0,
        "after the cut the client's fragments reached isp1 with {lan} {} times and isp2 with {translated} {} times: {c:?}",
        c.sources[0],
        c.sources[1]
    );
    ensure!(
        isp2["lifecycle"] == "in service" && isp2["ipv6"]["state"] == "down",
        "isp2 should be in service for IPv4 and down for IPv6: {isp2}"
    );
    let (c, moved_own) = watch.until_through(lab, &own, 0, cut, 3 * BOUND)?;
    eprintln!(
        "isp2's IPv6 cut: the router's own datagram (port {}) went through isp1 {moved_own:?} after the cut",
        c.port
    );
    // The held connection was translated for isp2: conntrack forgot it
    // when the kernel's IPv6 moved, so it leaves by isp1 untranslated
    // (kept, it would leave with isp2's prefix, and the guard drop it).
    let (c, moved_held) = watch.until_through(lab, &held, 0, cut, 3 * BOUND)?;
    eprintln!(
        "isp2's IPv6 cut: the held connection (port {}) went through isp1 with {lan} {moved_held:?} after the cut",
        c.port
    );
    ensure!(
        c.sources[0] >= 2 && c.sources[1] == 0,
        "the held connection after the cut: {c:?}"
    );
    let said = router.lbd.status()?["slow_path6"].clone();
    ensure!(
        said == "isp1",
        "after the cut lbctl status says the kernel's IPv6 goes by {said}, not isp1"
    );

    // isp2's IPv6 comes back, and the kernel's IPv6 with it.
    lab.exec("isp2", &["nft", "delete table ip6 cut"])?;
    let back = Instant::now();
    let (_, returned) = watch.until_through(lab, &fragments, 1, back, 3 * BOUND)?;
    eprintln!(
        "isp2's IPv6 back: the client's fragmented datagrams went through isp2 again {returned:?} after the cut ended"
    );
    let (c, held_back) = watch.until_through(lab, &held, 1, back, 3 * BOUND)?;
    eprintln!(
        "isp2's IPv6 back: the held connection (port {}) went through isp2 with {translated} {held_back:?} after the cut ended",
        c.port
    );
    router.finish()
}

/// The operator's rules place IPv6 flows as they place IPv4 ones, each
/// policy on its uplinks' IPv6: a rule on an IPv6 prefix and port sends
/// its flows by isp2 alone, a rule on an IPv4 prefix leaves IPv6 flows to
/// the default balance, and once isp2's IPv6 is down (its IPv4 still up)
/// the policy's `fallback = "unreachable"` refuses new IPv6 connections
/// at once with ICMPv6 (the client's connect fails with "no route to
/// host") rather than sending them elsewhere or into silence.
#[test]
fn ipv6_flows_follow_the_rules_and_a_policy_without_ipv6_refuses_them_at_once() -> Result<()> {
    const FLOWS: usize = 60;
    const RULED: u16 = 40100;
    const OTHER: u16 = 40101;
    if !require_root("ipv6_flows_follow_the_rules_and_a_policy_without_ipv6_refuses_them_at_once") {
        return Ok(());
    }
    let sections = format!(
        "[[policy]]\nname = \"via-isp2\"\nuplinks = [\"isp2\"]\nfallback = \"unreachable\"\n\n\
         [[rule]]\nproto = \"tcp\"\ndst = \"2001:db8:ff::/48\"\ndst_port = {RULED}\n\
         policy = \"via-isp2\"\n\n\
         [[rule]]\nproto = \"tcp\"\ndst = \"198.51.100.0/24\"\ndst_port = {OTHER}\n\
         policy = \"via-isp2\"\n"
    );
    let router = Router::up_with([PROBE6, PROBE6], &sections)?;
    let lab = &router.lab;
    let inet = lab.ns("inet")?;
    let ruled = TcpEchoServer::start(inet, server(RULED))?;
    let other = TcpEchoServer::start(inet, server(OTHER))?;
    let watches = watch_isps(lab)?;
    let client = router.client()?;

    // FLOWS connections to `to`, all answered: how many each ISP saw.
    let through = |to: SocketAddr, what: &str| -> Result<[usize; 2]> {
        watches[0].clear()?;
        watches[1].clear()?;
        let flows = tcp_flows(client, to, FLOWS, FLOW_TIMEOUT)?;
        all_ok(what, &flows)?;
        let these: Vec<(u8, u16)> = flows.iter().map(FlowResult::flow).collect();
        let by = split(&these, &watches)?;
        eprintln!(
            "{FLOWS} {what} (port {}): isp1 {}, isp2 {}",
            to.port(),
            by[0].len(),
            by[1].len()
        );
        Ok([by[0].len(), by[1].len()])
    };
    let by = through(ruled.local_addr(), "IPv6 flows rule 1 sends by isp2")?;
    ensure!(
        by == [0, FLOWS],
        "the rule's flows should all leave by isp2: {by:?}"
    );
    let by = through(
        other.local_addr(),
        "IPv6 flows of rule 2's port (an IPv4 rule)",
    )?;
    ensure!(
        by[0] > 0 && by[1] > 0,
        "an IPv4-only rule must leave IPv6 flows to the default balance: {by:?}"
    );
    let status = router.lbd.status()?;
    let policy = status["policies"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["name"] == "via-isp2"))
        .context("policy via-isp2 not in status")?;
    ensure!(
        policy["taking6"] == serde_json::json!(["isp2"]),
        "status should show via-isp2 taking IPv6 flows by isp2: {policy}"
    );

    // isp2 stops forwarding IPv6, silently; its IPv4 goes on.
    lab.exec(
        "isp2",
        &[
            "nft",
            "add table ip6 cut; add chain ip6 cut forward { type filter hook forward priority 0; policy drop; }",
        ],
    )?;
    let cut = Instant::now();
    loop {
        let status = router.lbd.status()?;
        let isp2 = uplink_of(&status, "isp2").context("isp2 not in status")?;
        if isp2["ipv6"]["state"] == "down" {
            break;
        }
        ensure!(
            cut.elapsed() < 3 * BOUND,
            "isp2's IPv6 not down {:?} after the cut: {isp2}",
            cut.elapsed()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("isp2's IPv6 down {:?} after the cut", cut.elapsed());
    watches[0].clear()?;
    let told = |status: &Value| {
        status["reasons"]
            .as_array()
            .and_then(|r| r.iter().find(|r| r[0] == "drop_policy_unreachable"))
            .and_then(|r| r[1].as_u64())
            .unwrap_or(0)
    };
    let told_before = told(&router.lbd.status()?);
    let started = Instant::now();
    let refused = tcp_flows(client, ruled.local_addr(), 10, FLOW_TIMEOUT)?;
    let took = started.elapsed();
    let answers = told(&router.lbd.status()?) - told_before;
    for flow in &refused {
        let Err(e) = &flow.outcome else {
            anyhow::bail!("a new flow of via-isp2 was answered with its IPv6 down");
        };
        let text = format!("{e:#}");
        ensure!(
            text.contains("os error 113"),
            "a refused flow should fail with EHOSTUNREACH (ICMPv6 address unreachable): {text}"
        );
    }
    // On a veth the first answer comes back while connect() still holds
    // its socket, and Linux keeps it as a soft error; the SYN sent again
    // a second later is answered too, and that one ends the connection.
    eprintln!(
        "10 new IPv6 connections of via-isp2 refused in {took:?} in all, {answers} ICMPv6 \
         answers sent"
    );
    ensure!(
        answers >= 10,
        "lb counted {answers} ICMPv6 answers for 10 refused connections"
    );
    let ids: BTreeSet<(u8, u16)> = refused.iter().map(FlowResult::flow).collect();
    let leaked = &watches[0].seen_flows()? & &ids;
    ensure!(leaked.is_empty(), "refused flows reached isp1: {leaked:?}");
    let flows = tcp_flows(client, other.local_addr(), 10, FLOW_TIMEOUT)?;
    all_ok("IPv6 TCP flows of the default policy after the cut", &flows)?;
    router.finish()
}

#[test]
fn the_lan_reaches_the_routers_own_services_at_its_uplinks_ipv6_addresses() -> Result<()> {
    if !require_root("the_lan_reaches_the_routers_own_services_at_its_uplinks_ipv6_addresses") {
        return Ok(());
    }
    // As for IPv4 (inbound.rs): the router's answers to a LAN client that
    // reached it at an uplink's global address go back into the LAN.
    let router = Router::up(["", ""])?;
    const PORT: u16 = 2222;
    let _service = TcpEchoServer::start(
        router.lab.ns("router")?,
        SocketAddr::from((Ipv6Addr::UNSPECIFIED, PORT)),
    )?;
    // An answer sent to an ISP may find its way back (the ISPs route the
    // delegations to the router): none may leave by an uplink at all.
    let at_isps = watch_isps(&router.lab)?;
    let status = router.lbd.status()?;
    let mut failed = Vec::new();
    for name in ["isp1", "isp2"] {
        let addr: Ipv6Addr = uplink_of(&status, name)
            .and_then(|u| u["ipv6"]["address"].as_str())
            .with_context(|| format!("{name} has no IPv6 address: {status}"))?
            .parse()?;
        let flows = tcp_flows(
            router.client()?,
            SocketAddr::from((addr, PORT)),
            5,
            FLOW_TIMEOUT,
        )?;
        failed.extend(flows.iter().filter_map(|f| {
            f.outcome
                .as_ref()
                .err()
                .map(|e| format!("{name} {addr}: {e:#}"))
        }));
    }
    ensure!(
        failed.is_empty(),
        "the client could not reach the router's own service at its uplinks' IPv6 addresses: {failed:?}"
    );
    for (isp, watch) in ["isp1", "isp2"].iter().zip(&at_isps) {
        ensure!(
            !watch.seen_flows()?.contains(&(6, PORT)),
            "the router's answers to the LAN reached {isp}"
        );
    }
    router.finish()
}
