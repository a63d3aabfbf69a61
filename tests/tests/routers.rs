//! lbd on a router shaped like the ones it is for (lab `dhcp`): uplink
//! addresses from real DHCP servers through a real DHCP client, one default
//! route in the main table, modems that are late, leases that change,
//! carriers that come back, and networks the kernel routes elsewhere.
//!
//! Each test checks what the clients, the servers and the ISPs see, and
//! that no packet with a LAN source address reached an ISP. How fast lbd
//! follows is printed (the figures of the issue), not judged: a bound here
//! only says that a test must end.

use std::{
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use lb_tests::{
    daemon::{LabConfig, Lbd},
    dhcp,
    netns::in_netns,
    require_root,
    stream::{port_on, probe_via, wait_for, Sink, Stream},
    traffic::{tcp_upload, TcpSinkServer},
    unique_prefix, watch_sources,
    xdp::ForeignXdp,
    Lab, LabDesc, LanLeaks,
};
use socket2::{Domain, Protocol, Socket, Type};

const ISP1_NAT: [u8; 4] = [100, 64, 1, 2];
const ISP2_NAT: [u8; 4] = [100, 64, 2, 2];
const ISP3_NAT: [u8; 4] = [100, 64, 3, 2];
/// How long to wait for something that must happen: a bound for a test
/// that must end, not a speed target.
const BOUND: Duration = Duration::from_secs(15);
const PROBE: &str = "[[uplink.probe]]\nkind = \"icmp\"\ntarget = \"198.51.100.10\"";

/// lbd on all three uplinks, gateways `auto`, an ICMP probe each; the LAN
/// is the bridge.
fn config() -> String {
    LabConfig {
        lans: &["br-lan"],
        uplinks: &[(1, PROBE), (2, PROBE), (3, PROBE)],
        auto_gateway: true,
        ..LabConfig::default()
    }
    .render()
}

/// The dhcp lab with its leases, the LAN's leak watch, and lbd ([`config`])
/// with all three uplinks in service.
fn in_service() -> Result<(Lab, LanLeaks, Lbd)> {
    let mut lab = Lab::up(&LabDesc::shipped("dhcp")?, &unique_prefix())?;
    let leaks = LanLeaks::install(&lab)?;
    dhcp::start(&mut lab, &[1, 2, 3])?;
    let lbd = Lbd::start(&mut lab, &config())?;
    for n in 1..=3 {
        lbd.wait_lifecycle(&format!("isp{n}"), "in service", BOUND)?;
    }
    Ok((lab, leaks, lbd))
}

#[test]
fn boots_with_a_mute_modem_and_a_missing_lease_and_takes_them_in_as_they_come() -> Result<()> {
    if !require_root("boots_with_a_mute_modem_and_a_missing_lease_and_takes_them_in_as_they_come") {
        return Ok(());
    }
    let mut lab = Lab::up(&LabDesc::shipped("dhcp")?, &unique_prefix())?;
    let leaks = LanLeaks::install(&lab)?;
    // isp2's modem does not answer ARP yet; isp3's DHCP server is not up.
    lab.exec("isp2", &["ip", "link", "set", "dev", "down0", "arp", "off"])?;
    dhcp::start(&mut lab, &[1, 2])?;

    let started = Instant::now();
    let lbd = Lbd::start(&mut lab, &config())?;
    let ready = started.elapsed();
    lbd.wait_lifecycle("isp1", "in service", BOUND)?;
    let isp2 = lbd.uplink("isp2")?;
    let isp3 = lbd.uplink("isp3")?;
    eprintln!(
        "lbd answered {ready:?} after it started; isp2: {} ({}), isp3: {}",
        isp2["lifecycle"], isp2["gateway"], isp3["lifecycle"]
    );
    ensure!(isp2["lifecycle"] == "gateway not resolved", "isp2: {isp2}");
    ensure!(
        isp3["lifecycle"] == "waiting for an address",
        "isp3: {isp3}"
    );
    // Every new flow takes the one uplink in service.
    let sink = Sink::start(&lab)?;
    for port in 7000..7010 {
        ensure!(
            port_on(&lab, &sink, ISP1_NAT, port)? == port,
            "flow {port} did not leave through isp1"
        );
    }

    // The modem wakes up.
    lab.exec("isp2", &["ip", "link", "set", "dev", "down0", "arp", "on"])?;
    let joined = lbd.wait_lifecycle("isp2", "in service", BOUND)?;
    eprintln!("isp2 in service {joined:?} after its modem answered ARP");
    port_on(&lab, &sink, ISP2_NAT, 7100)?;

    // The lease comes.
    dhcp::start_server(&mut lab, 3, 2)?;
    dhcp::wait_lease(&lab, 3, dhcp::uplink_addr(3, 2))?;
    let joined = lbd.wait_lifecycle("isp3", "in service", BOUND)?;
    eprintln!("isp3 in service {joined:?} after its lease arrived");
    port_on(&lab, &sink, ISP3_NAT, 7200)?;

    leaks.check()?;
    lbd.stop(&mut lab)
}

#[test]
fn an_uplinks_first_probes_find_the_routes_lbd_makes_for_them() -> Result<()> {
    if !require_root("an_uplinks_first_probes_find_the_routes_lbd_makes_for_them") {
        return Ok(());
    }
    // The main table has one default route (isp1's, from its DHCP client):
    // a probe through isp2 or isp3 needs the table lbd makes for it.
    let mut lab = Lab::up(&LabDesc::shipped("dhcp")?, &unique_prefix())?;
    dhcp::start(&mut lab, &[1, 2, 3])?;
    let lbd = Lbd::start(&mut lab, &config())?;
    for n in 1..=3 {
        let name = format!("isp{n}");
        lbd.wait_lifecycle(&name, "in service", BOUND)?;
        // Its first answer: every probe before it was judged by then.
        wait_for(&format!("{name}'s first answered probe"), BOUND, || {
            Ok(!lbd.uplink(&name)?["rtt_ms"].is_null())
        })?;
    }
    for n in 1..=3 {
        let uplink = lbd.uplink(&format!("isp{n}"))?;
        ensure!(
            uplink["loss_percent"].as_f64() == Some(0.0),
            "isp{n} lost probes on a healthy line: {uplink}"
        );
    }
    lbd.stop(&mut lab)
}

#[test]
fn someone_elses_xdp_programs_on_an_uplink_and_a_lan_port_hold_up_nothing_else() -> Result<()> {
    if !require_root("someone_elses_xdp_programs_on_an_uplink_and_a_lan_port_hold_up_nothing_else")
    {
        return Ok(());
    }
    let mut lab = Lab::up(&LabDesc::shipped("dhcp")?, &unique_prefix())?;
    let leaks = LanLeaks::install(&lab)?;
    dhcp::start(&mut lab, &[1, 2, 3])?;
    // The operator's own filters, on isp2's port and on client2's bridge
    // port: lbd cannot attach there.
    let on_wan2 = ForeignXdp::attach(&lab, "router", "wan2")?;
    let on_lan1 = ForeignXdp::attach(&lab, "router", "lan1")?;

    let lbd = Lbd::start(&mut lab, &config())?;
    lbd.wait_lifecycle("isp1", "in service", BOUND)?;
    lbd.wait_lifecycle("isp3", "in service", BOUND)?;
    let isp2 = lbd.uplink("isp2")?;
    eprintln!("isp2: {} ({})", isp2["lifecycle"], isp2["reason"]);
    ensure!(isp2["lifecycle"] == "not set up", "isp2: {isp2}");
    let reason = isp2["reason"].as_str().unwrap_or_default();
    ensure!(
        reason.contains("wan2") && reason.contains("XDP program"),
        "isp2's reason names neither its interface nor what holds it: {reason}"
    );
    let status = lbd.status()?;
    eprintln!(
        "LAN ports: {}; not attached: {}",
        status["lan_ports"], status["lan_faults"]
    );
    ensure!(
        status["lan_ports"] == serde_json::json!(["lan0"]),
        "lan_ingress on {}",
        status["lan_ports"]
    );
    ensure!(
        status["lan_faults"][0]
            .as_str()
            .is_some_and(|f| f.starts_with("lan1: ") && f.contains("XDP program")),
        "lan1's fault: {}",
        status["lan_faults"]
    );
    // New flows take the two uplinks lbd set up, and never isp2.
    let sink = Sink::start(&lab)?;
    for port in 7000..7016 {
        let via = probe_via(&lab, &sink, port)?;
        ensure!(
            via == ISP1_NAT || via == ISP3_NAT,
            "flow {port} left through {via:?}"
        );
    }
    // client2, behind the port lb could not take, goes out the kernel's way.
    lab.exec("client2", &["ping", "-c", "1", "-W", "5", "198.51.100.10"])?;

    // The operator removes the filters: isp2 is set up and joins, and
    // lan1 is lb's.
    drop(on_wan2);
    drop(on_lan1);
    let joined = lbd.wait_lifecycle("isp2", "in service", BOUND)?;
    eprintln!("isp2 in service {joined:?} after the other program left");
    port_on(&lab, &sink, ISP2_NAT, 7100)?;
    wait_for("lan_ingress on lan1", BOUND, || {
        let status = lbd.status()?;
        Ok(status["lan_ports"] == serde_json::json!(["lan0", "lan1"])
            && status["lan_faults"].as_array().is_some_and(Vec::is_empty))
    })?;

    leaks.check()?;
    lbd.stop(&mut lab)
}

#[test]
fn a_lan_port_without_native_xdp_carries_a_clients_uploads_whole() -> Result<()> {
    const SIZE: usize = 8 * 1024 * 1024;
    if !require_root("a_lan_port_without_native_xdp_carries_a_clients_uploads_whole") {
        return Ok(());
    }
    // client2's port (lan1) has no native XDP, as a Wi-Fi or USB port has
    // none: its peer has more transmit queues than it has receive queues,
    // which veth's native XDP refuses. lb's program runs there in generic
    // mode, on socket buffers. The port merges segments (GRO), as Wi-Fi
    // drivers do: a merged packet would carry a partial checksum that XDP
    // cannot tell from a complete one, and be longer than the uplink's
    // MTU. The kernel skips GRO on a device with a generic XDP program;
    // this test holds it to that.
    let mut desc = LabDesc::shipped("dhcp")?;
    for end in desc.links.iter_mut().flat_map(|l| [&mut l.a, &mut l.b]) {
        if end.host == "client2" {
            end.queues = Some(2);
        }
    }
    let mut lab = Lab::up(&desc, &unique_prefix())?;
    let leaks = LanLeaks::install(&lab)?;
    dhcp::start(&mut lab, &[1, 2, 3])?;
    lab.exec("router", &["ethtool", "-K", "lan1", "gro", "on"])?;
    // The ISPs' links finish checksums themselves, as a NIC does before the
    // wire (a veth hands a partial one on, and the server trusts it): a
    // packet translated with a wrong checksum then fails at the server, as
    // it would on the internet.
    for n in 1..=3 {
        lab.exec(&format!("isp{n}"), &["ethtool", "-K", "up0", "tx", "off"])?;
    }

    let lbd = Lbd::start(&mut lab, &config())?;
    for n in 1..=3 {
        lbd.wait_lifecycle(&format!("isp{n}"), "in service", BOUND)?;
    }
    wait_for("lan_ingress on lan1", BOUND, || {
        let status = lbd.status()?;
        Ok(status["lan_ports"] == serde_json::json!(["lan0", "lan1"]))
    })?;
    let shown = lab.exec("router", &["ip", "link", "show", "dev", "lan1"])?;
    ensure!(
        shown.contains("xdpgeneric"),
        "lb's program on lan1 is not in generic mode, so this test tests nothing: {shown}"
    );

    let inet = lab.ns("inet")?.to_string();
    let server = TcpSinkServer::start(&inet, "198.51.100.10:0".parse()?)?;
    let client2 = lab.ns("client2")?.to_string();
    // Back to one queue, now that lb is attached: veth merges only what
    // arrives on a queue the port has.
    lab.exec("client2", &["ethtool", "-L", "eth0", "tx", "1", "rx", "1"])?;
    lab.wait_up("client2", "eth0")?;
    // Several connections: they spread over the uplinks.
    for upload in 0..4 {
        let got = tcp_upload(&client2, server.local_addr(), SIZE, BOUND)?;
        ensure!(
            got == SIZE as u64,
            "upload {upload} from client2: the server read {got} of {SIZE} bytes"
        );
    }
    // Each crossed lb as packets of the uplink's size: none was merged.
    let status = lbd.status()?;
    for reason in ["told_too_big", "pass_too_big"] {
        let n = status["reasons"]
            .as_array()
            .and_then(|r| r.iter().find(|r| r[0] == reason))
            .map_or(-1, |r| r[1].as_i64().unwrap_or(-1));
        ensure!(n == 0, "{reason}: {n} (from status {status})");
    }
    eprintln!("4 uploads of {SIZE} bytes from client2 arrived whole");
    leaks.check()?;
    lbd.stop(&mut lab)
}

#[test]
fn a_new_address_from_the_isp_is_followed_and_the_old_one_never_used_again() -> Result<()> {
    if !require_root("a_new_address_from_the_isp_is_followed_and_the_old_one_never_used_again") {
        return Ok(());
    }
    let mut lab = Lab::up(&LabDesc::shipped("dhcp")?, &unique_prefix())?;
    let leaks = LanLeaks::install(&lab)?;
    let procs = dhcp::start(&mut lab, &[1, 2, 3])?;
    let lbd = Lbd::start(&mut lab, &config())?;
    for n in 1..=3 {
        lbd.wait_lifecycle(&format!("isp{n}"), "in service", BOUND)?;
    }
    let sink = Sink::start(&lab)?;
    let port = port_on(&lab, &sink, ISP1_NAT, 7300)?;
    let stream = Stream::start(&lab, port, Duration::from_millis(10))?;
    wait_for("the stream through isp1", BOUND, || {
        Ok(sink.stream(port).len() > 20)
    })?;

    // isp1 moves the router to another address: its server now leases .3,
    // and the client's next renewal is told no and starts over.
    let (old, new) = (dhcp::uplink_addr(1, 2), dhcp::uplink_addr(1, 3));
    lab.stop(procs.server(1)?)?;
    dhcp::start_server(&mut lab, 1, 3)?;
    dhcp::renew(&lab, procs.client(1)?)?;
    dhcp::wait_lease(&lab, 1, new)?;
    let changed = Instant::now();
    wait_for("lbd to take isp1's new address", BOUND, || {
        let u = lbd.uplink("isp1")?;
        Ok(u["address"] == new.to_string() && u["lifecycle"] == "in service")
    })?;
    eprintln!(
        "isp1 in service with {new} {:?} after the lease",
        changed.elapsed()
    );

    // From here on, nothing may leave through isp1 with the old address.
    let stale = watch_sources(&lab, "isp1", "down0", "old", &format!("{old}/32"))?;
    let fresh = port_on(&lab, &sink, new.octets(), 7400)?;
    eprintln!("a new flow from port {fresh} leaves through isp1 with {new}");
    let before = sink.stream(port).len();
    wait_for("the running stream after the change", BOUND, || {
        Ok(sink.stream(port).len() > before + 20)
    })?;
    let moved_to: Vec<Ipv4Addr> = sink
        .stream(port)
        .iter()
        .skip(before)
        .map(|&(_, _, a)| Ipv4Addr::from(a))
        .collect();
    ensure!(
        !moved_to.contains(&old),
        "the running stream still arrived from {old}"
    );
    drop(stream);
    let stale = stale.packets()?;
    ensure!(
        stale == 0,
        "{stale} packets left through isp1 with the old address {old} after lbd had the new one"
    );
    leaks.check()?;
    lbd.stop(&mut lab)
}

#[test]
fn carrier_loss_and_return_need_no_help() -> Result<()> {
    if !require_root("carrier_loss_and_return_need_no_help") {
        return Ok(());
    }
    let (mut lab, leaks, lbd) = in_service()?;
    lab.set_link_up("isp1", "down0", false)?;
    lbd.wait_lifecycle("isp1", "waiting for carrier", BOUND)?;
    let table = lbd.uplink("isp1")?["table"].to_string();
    lab.set_link_up("isp1", "down0", true)?;
    let back = lbd.wait_lifecycle("isp1", "in service", BOUND)?;
    let routes = lab.exec("router", &["ip", "route", "show", "table", &table])?;
    eprintln!("isp1 back in service {back:?} after its carrier; table {table}: {routes}");
    ensure!(
        routes.contains("default via 100.64.1.1 dev wan1"),
        "lbd's table {table} for isp1 lacks its default route: {routes}"
    );
    let sink = Sink::start(&lab)?;
    port_on(&lab, &sink, ISP1_NAT, 7500)?;
    leaks.check()?;
    lbd.stop(&mut lab)
}

#[test]
fn networks_the_kernel_routes_elsewhere_are_reached_unnated() -> Result<()> {
    if !require_root("networks_the_kernel_routes_elsewhere_are_reached_unnated") {
        return Ok(());
    }
    let mut lab = Lab::up(&LabDesc::shipped("dhcp")?, &unique_prefix())?;
    let leaks = LanLeaks::install(&lab)?;
    let unnated = watch_sources(&lab, "branch", "eth0", "lan", "10.10.0.2/32")?;
    dhcp::start(&mut lab, &[1, 2, 3])?;
    let lbd = Lbd::start(&mut lab, &config())?;
    for n in 1..=3 {
        lbd.wait_lifecycle(&format!("isp{n}"), "in service", BOUND)?;
    }
    let ping = |dst: &str| {
        lab.exec("client", &["ping", "-c", "1", "-W", "1", dst])
            .is_ok()
    };
    // A connected subnet and a static route.
    for dst in ["10.20.0.2", "10.21.0.1"] {
        ensure!(ping(dst), "the client cannot reach {dst}");
    }
    let seen = unnated.packets()?;
    ensure!(
        seen >= 2,
        "the branch saw {seen} packets from the client's own address"
    );
    // A route added while lbd runs.
    lab.exec(
        "router",
        &["ip", "route", "add", "10.22.0.0/24", "via", "10.20.0.2"],
    )?;
    let added = Instant::now();
    wait_for("10.22.0.1 reached through the kernel", BOUND, || {
        Ok(ping("10.22.0.1"))
    })?;
    eprintln!(
        "a route added while lbd runs: reached through it {:?} later",
        added.elapsed()
    );
    let kept = lbd.status()?["kernel_destinations"].to_string();
    ensure!(
        kept.contains("10.22.0.0/24") && kept.contains("10.21.0.0/24"),
        "left to the kernel: {kept}"
    );
    ensure!(
        unnated.packets()? > seen,
        "the branch did not see the client's own address"
    );
    // Traffic for the branch never went to an ISP.
    leaks.check()?;
    lbd.stop(&mut lab)
}

#[test]
fn tables_and_rules_of_someone_else_are_refused_with_a_clear_message() -> Result<()> {
    if !require_root("tables_and_rules_of_someone_else_are_refused_with_a_clear_message") {
        return Ok(());
    }
    let lab = Lab::up(&LabDesc::shipped("default")?, &unique_prefix())?;
    // Bounded: an lbd that starts instead of refusing is stopped, and what
    // it left removed; the test then fails on what it said.
    let config = LabConfig::default().render();
    let run = || lb_tests::daemon::start_refusal(&lab, &config);
    // Another program's route in lbd's first table (4000 by default).
    lab.exec(
        "router",
        &[
            "ip",
            "route",
            "add",
            "default",
            "via",
            "100.64.1.1",
            "table",
            "4000",
        ],
    )?;
    let refused = run()?;
    eprintln!("{refused}");
    ensure!(
        refused.contains("routing table 4000 already holds routes lbd did not make")
            && refused.contains("first_table"),
        "lbd did not refuse a foreign table 4000: {refused:?}"
    );
    lab.exec("router", &["ip", "route", "flush", "table", "4000"])?;
    // Another program's rule at lbd's second priority.
    lab.exec(
        "router",
        &["ip", "rule", "add", "pref", "4001", "lookup", "main"],
    )?;
    let refused = run()?;
    ensure!(
        refused.contains("a rule at priority 4001 is not lbd's")
            && refused.contains("first_priority"),
        "lbd did not refuse a foreign rule at 4001: {refused:?}"
    );
    Ok(())
}

#[test]
fn interfaces_that_take_no_xdp_redirects_get_lbs_packets_by_their_qdisc() -> Result<()> {
    if !require_root("interfaces_that_take_no_xdp_redirects_get_lbs_packets_by_their_qdisc") {
        return Ok(());
    }
    let mut lab = Lab::up(&LabDesc::shipped("default")?, &unique_prefix())?;
    let leaks = LanLeaks::install(&lab)?;
    // A veth takes XDP-redirected frames only while its peer has GRO on (or
    // an XDP program): with isp1's end and the client's end without it,
    // wan1 and the LAN port lan0 take none, as a Wi-Fi radio or a DSA
    // switch port does not. Sent there by XDP, every frame would be lost.
    lab.exec("isp1", &["ethtool", "-K", "down0", "gro", "off"])?;
    lab.exec("client", &["ethtool", "-K", "eth0", "gro", "off"])?;
    let config = LabConfig::default().render();
    let refused = lb_tests::daemon::check_refusal(&lab, &config)?;
    ensure!(refused.is_empty(), "lbd --check refused: {refused}");
    let lbd = Lbd::start(&mut lab, &config)?;
    let said = lbd.stderr();
    ensure!(
        said.contains("wan1 takes no frames redirected by XDP")
            && said.contains("lan0 takes no frames redirected by XDP")
            && said.contains("gro on"),
        "lbd did not say which interfaces take no XDP redirects: {said}"
    );
    let status = lbd.status()?;
    let wan1 = &status["uplinks"][0]["egress"];
    let lan0 = status["lan_egress"].to_string();
    eprintln!("wan1: {wan1}; LAN ports: {lan0}");
    ensure!(
        wan1["path"] == "qdisc" && wan1["why"].to_string().contains("ndo_xdp_xmit"),
        "wan1's way out: {wan1}"
    );
    ensure!(
        lan0.contains("qdisc") && lan0.contains("ndo_xdp_xmit"),
        "lan0's way out: {lan0}"
    );
    // Flows through both uplinks, answered into lan0: every one whole.
    let server: std::net::SocketAddr = "198.51.100.10:7000".parse()?;
    let _echo = lb_tests::traffic::UdpEchoServer::start(lab.ns("inet")?, server)?;
    let flows = lb_tests::traffic::udp_flows(lab.ns("client")?, server, 40, BOUND)?;
    let failed: Vec<String> = flows
        .iter()
        .filter_map(|f| f.outcome.as_ref().err().map(|e| format!("{e:#}")))
        .collect();
    let isp1 = lbd.uplink_counter("isp1", "new_flows")?;
    eprintln!("40 flows: {} failed, {isp1} through isp1", failed.len());
    ensure!(
        failed.is_empty() && isp1 > 0,
        "flows through interfaces without XDP redirects: {isp1} through isp1, failed: {failed:?}"
    );
    leaks.check()?;
    lbd.stop(&mut lab)
}

/// The router's DHCP server for the LAN, as OpenWrt's dnsmasq: leases
/// 10.10.0.100-150 on `br-lan`, no DNS. Returns its pid.
fn start_lan_dhcp_server(lab: &mut Lab) -> Result<u32> {
    let server = [
        "dnsmasq",
        "--keep-in-foreground",
        "--conf-file=/dev/null",
        "--port=0",
        "--interface=br-lan",
        "--bind-dynamic",
        "--dhcp-range=10.10.0.100,10.10.0.150,255.255.255.0,2m",
        "--dhcp-option=option:router,10.10.0.1",
        "--dhcp-authoritative",
        "--leasefile-ro",
        "--pid-file",
        "--user=root",
        "--log-facility=-",
    ];
    lab.spawn("router", &server)
        .context("starting the router's DHCP server for the LAN (dnsmasq)")
}

/// `client`'s datagram to the mDNS group (224.0.0.251:5353, TTL 255, as
/// an announcement goes), read by `listener` on the same LAN: whether it
/// arrived within `limit`.
fn mdns_reaches(lab: &Lab, client: &str, listener: &str, limit: Duration) -> Result<bool> {
    let group = Ipv4Addr::new(224, 0, 0, 251);
    let listening = in_netns(lab.ns(listener)?, || {
        let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
        socket.set_reuse_address(true)?;
        socket.bind(&SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 5353).into())?;
        socket.join_multicast_v4(&group, &Ipv4Addr::UNSPECIFIED)?;
        socket.set_read_timeout(Some(Duration::from_millis(200)))?;
        Ok(UdpSocket::from(socket))
    })?;
    let sending = in_netns(lab.ns(client)?, || {
        let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        socket.set_multicast_ttl_v4(255)?;
        Ok(socket)
    })?;
    let hello = b"lb test: an mDNS announcement";
    let until = Instant::now() + limit;
    let mut buf = [0u8; 256];
    // Sent again while unseen: a group join takes a moment to settle.
    while Instant::now() < until {
        sending.send_to(hello, (group, 5353))?;
        if let Ok(n) = listening.recv(&mut buf) {
            if &buf[..n] == hello {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

#[test]
fn a_new_lan_client_gets_its_lease_from_the_router_and_its_broadcasts_stay_on_the_lan() -> Result<()>
{
    if !require_root(
        "a_new_lan_client_gets_its_lease_from_the_router_and_its_broadcasts_stay_on_the_lan",
    ) {
        return Ok(());
    }
    let (mut lab, leaks, lbd) = in_service()?;
    start_lan_dhcp_server(&mut lab)?;
    let pinned = |lbd: &Lbd| -> Result<u64> {
        (1..=3).try_fold(0, |sum, n| {
            Ok(sum + lbd.uplink_counter(&format!("isp{n}"), "new_flows")?)
        })
    };
    let pinned_before = pinned(&lbd)?;

    // A laptop that joins the LAN: udhcpc broadcasts its discover from
    // 0.0.0.0 to 255.255.255.255, and quits (-q) with a lease or fails
    // (-n) after 10 tries 2 s apart. `/bin/true` as its hook: the test
    // wants the lease, not the address on the interface.
    let asked = Instant::now();
    let out = lab.output(
        "client2",
        &[
            "udhcpc",
            "-f",
            "-q",
            "-n",
            "-t",
            "10",
            "-T",
            "2",
            "-i",
            "eth0",
            "-s",
            "/bin/true",
        ],
    )?;
    let said =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success() && said.contains("obtained"),
        "client2 got no lease from the router's DHCP server while lbd ran ({}): {said}",
        out.status
    );
    eprintln!(
        "client2's lease took {:?}: {}",
        asked.elapsed(),
        said.trim()
    );

    // mDNS between the clients: a group on the LAN, never an uplink's.
    ensure!(
        mdns_reaches(&lab, "client", "client2", BOUND)?,
        "client's mDNS announcement never reached client2 on the same bridge"
    );
    let pinned_after = pinned(&lbd)?;
    eprintln!(
        "flows pinned to an uplink meanwhile: {}; packets left to the kernel as local: {}",
        pinned_after - pinned_before,
        lbd.reason("pass_local")?
    );
    ensure!(
        pinned_after == pinned_before,
        "the fast path pinned {} flows to uplinks while the LAN's clients only asked for a \
         lease and announced themselves",
        pinned_after - pinned_before
    );

    leaks.check()?;
    lbd.stop(&mut lab)
}
