//! Nothing leaks: what the fast path hands to the kernel (ESP, GRE,
//! fragments) leaves the router with an uplink's address, through lb's
//! nftables table, and its guard drops, and counts, whatever would still
//! leave an uplink with a LAN source address.
//!
//! Every test watches the ISPs' side of the uplinks for packets with a LAN
//! source address: there must be none.

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use anyhow::{ensure, Context, Result};
use lb_tests::{
    daemon::{LabConfig, Lbd},
    in_netns, require_root,
    stream::wait_for,
    traffic::UdpEchoServer,
    unique_prefix, Lab, LabDesc, LanLeaks,
};
use socket2::Socket;

const SERVER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
const UPLINK_ADDRS: [Ipv4Addr; 2] = [Ipv4Addr::new(100, 64, 1, 2), Ipv4Addr::new(100, 64, 2, 2)];
const GRE: i32 = 47;
const ESP: i32 = 50;
/// A bound for a test that must end, not a speed target.
const BOUND: Duration = Duration::from_secs(10);

/// Send a few packets of protocol `proto` from the client to the server.
fn send_from_client(lab: &Lab, proto: i32) -> Result<()> {
    lb_tests::traffic::send_raw(lab.ns("client")?, proto, SERVER)
}

fn raw(ns: &str, proto: i32) -> Result<Socket> {
    lb_tests::traffic::raw_socket(ns, proto)
}

fn sources(socket: &Socket, wait: Duration) -> Result<Vec<Ipv4Addr>> {
    lb_tests::traffic::raw_sources(socket, wait)
}

#[test]
fn esp_and_gre_leave_natted_through_the_kernel_and_fragments_take_the_fast_path() -> Result<()> {
    if !require_root("esp_and_gre_leave_natted_through_the_kernel_and_fragments_take_the_fast_path")
    {
        return Ok(());
    }
    let mut lab = Lab::up(&LabDesc::shipped("default")?, &unique_prefix())?;
    let leaks = LanLeaks::install(&lab)?;
    let lbd = Lbd::start(&mut lab, &LabConfig::default().render())?;

    for (proto, name) in [(GRE, "GRE"), (ESP, "ESP")] {
        let listener = raw(lab.ns("inet")?, proto)?;
        send_from_client(&lab, proto)?;
        let seen = sources(&listener, BOUND)?;
        eprintln!("{name} from the client arrived from {seen:?}");
        ensure!(!seen.is_empty(), "no {name} packet reached the server");
        ensure!(
            seen.iter().all(|s| UPLINK_ADDRS.contains(s)),
            "{name} arrived from {seen:?}, not from an uplink's address"
        );
    }

    // Fragments, in the fast path both ways: 2500-byte pings, and
    // 3000-byte datagrams from 20 ports (so through both uplinks) echoed.
    for _ in 0..4 {
        let ping = lab.exec(
            "client",
            &["ping", "-c", "1", "-W", "2", "-s", "2500", "198.51.100.10"],
        )?;
        ensure!(ping.contains(" 0% packet loss"), "big ping: {ping}");
    }
    let server: SocketAddr = "198.51.100.10:7100".parse()?;
    let _echo = UdpEchoServer::start(lab.ns("inet")?, server)?;
    let big = vec![0x5a_u8; 3000];
    for port in 7200..7220u16 {
        let client = in_netns(lab.ns("client")?, || {
            let s = std::net::UdpSocket::bind(("10.10.0.2", port))?;
            s.set_read_timeout(Some(BOUND))?;
            Ok(s)
        })?;
        client.send_to(&big, server)?;
        let mut back = vec![0u8; 4000];
        let (n, from) = client
            .recv_from(&mut back)
            .with_context(|| format!("no echo of the 3000-byte datagram from port {port}"))?;
        ensure!(n == 3000 && from == server, "echo of {n} bytes from {from}");
    }
    let status = lbd.status()?;
    let fragments_to_kernel = lbd.reason("pass_fragment")?;
    let replies: Vec<u64> = status["uplinks"]
        .as_array()
        .map(|u| u.iter().filter_map(|u| u["replies"].as_u64()).collect())
        .unwrap_or_default();
    eprintln!(
        "2500-byte pings and 3000-byte datagrams came back; fragments left to the kernel: {fragments_to_kernel}; replies per uplink {replies:?}"
    );
    ensure!(
        fragments_to_kernel == 0,
        "{fragments_to_kernel} fragments went to the kernel"
    );
    ensure!(
        replies.len() == 2 && replies.iter().all(|&r| r >= 2),
        "replies per uplink {replies:?}: not both uplinks carried fragments"
    );

    leaks.check()?;
    lbd.stop(&mut lab)
}

#[test]
fn the_guard_drops_what_would_leave_an_uplink_unnatted() -> Result<()> {
    if !require_root("the_guard_drops_what_would_leave_an_uplink_unnatted") {
        return Ok(());
    }
    let mut lab = Lab::up(&LabDesc::shipped("default")?, &unique_prefix())?;
    let leaks = LanLeaks::install(&lab)?;
    let lbd = Lbd::start(&mut lab, &LabConfig::default().render())?;
    // An operator's rule that keeps GRE out of connection tracking: no NAT
    // can apply to it any more.
    lab.exec(
        "router",
        &[
            "nft",
            "add table ip operator; add chain ip operator raw { type filter hook prerouting priority raw; }; add rule ip operator raw ip protocol gre notrack",
        ],
    )?;
    let listener = raw(lab.ns("inet")?, GRE)?;
    send_from_client(&lab, GRE)?;
    wait_for("the guard to drop the GRE packets", BOUND, || {
        Ok(lbd.status()?["guard_dropped"].as_u64().unwrap_or(0) >= 5)
    })?;
    // The guard counted them all: any that got past it would be here by now.
    let seen = sources(&listener, Duration::from_secs(1))?;
    ensure!(seen.is_empty(), "GRE reached the server from {seen:?}");
    eprintln!(
        "untracked GRE: {} packets dropped by the guard, none reached an ISP",
        lbd.status()?["guard_dropped"]
    );
    leaks.check()?;
    lbd.stop(&mut lab)
}

#[test]
fn the_slow_path_follows_health_and_the_operator() -> Result<()> {
    if !require_root("the_slow_path_follows_health_and_the_operator") {
        return Ok(());
    }
    let mut lab = Lab::up(&LabDesc::shipped("default")?, &unique_prefix())?;
    let leaks = LanLeaks::install(&lab)?;
    const PROBE: &str = "[[uplink.probe]]\nkind = \"icmp\"\ntarget = \"198.51.100.10\"";
    let config = LabConfig {
        uplinks: &[(1, PROBE), (2, PROBE)],
        ..LabConfig::default()
    };
    let lbd = Lbd::start(&mut lab, &config.render())?;
    let gre_source = |lab: &Lab| -> Result<Vec<Ipv4Addr>> {
        let listener = raw(lab.ns("inet")?, GRE)?;
        send_from_client(lab, GRE)?;
        sources(&listener, BOUND)
    };
    // Both in service: the first uplink carries the slow path.
    wait_for("the slow path through isp1", BOUND, || {
        Ok(lbd.status()?["slow_path"] == "isp1")
    })?;
    let seen = gre_source(&lab)?;
    ensure!(
        !seen.is_empty() && seen.iter().all(|&s| s == UPLINK_ADDRS[0]),
        "with both uplinks up, GRE arrived from {seen:?}"
    );
    // isp1's upstream fails (the main table's default route still points
    // at it): the slow path moves to isp2.
    lab.set_link_up("isp1", "up0", false)?;
    lbd.wait_lifecycle("isp1", "down", BOUND)?;
    wait_for("the slow path through isp2", BOUND, || {
        Ok(lbd.status()?["slow_path"] == "isp2")
    })?;
    let seen = gre_source(&lab)?;
    eprintln!("isp1 down: GRE arrived from {seen:?}");
    ensure!(
        !seen.is_empty() && seen.iter().all(|&s| s == UPLINK_ADDRS[1]),
        "with isp1 down, GRE arrived from {seen:?}"
    );
    lab.set_link_up("isp1", "up0", true)?;
    lbd.wait_lifecycle("isp1", "in service", BOUND)?;
    // The operator takes isp1 out: the same.
    wait_for("the slow path back through isp1", BOUND, || {
        Ok(lbd.status()?["slow_path"] == "isp1")
    })?;
    lbd.lbctl(&["uplink", "disable", "isp1"])?;
    wait_for("the slow path through isp2", BOUND, || {
        Ok(lbd.status()?["slow_path"] == "isp2")
    })?;
    let seen = gre_source(&lab)?;
    ensure!(
        !seen.is_empty() && seen.iter().all(|&s| s == UPLINK_ADDRS[1]),
        "with isp1 disabled, GRE arrived from {seen:?}"
    );
    leaks.check()?;
    lbd.stop(&mut lab)
}
