//! A LAN on a Linux bridge (lab `bridge`), as most routers have it: lbd is
//! given the bridge, attaches its fast path to the bridge's ports, sends
//! replies out of the port each client is on, leaves traffic between the
//! clients to the bridge, and follows ports that join while it runs.

use std::{net::SocketAddr, time::Duration};

use anyhow::{ensure, Result};
use lb_tests::{
    daemon::{LabConfig, Lbd},
    require_root,
    stream::wait_for,
    traffic::{udp_flows, HeldUdp, UdpEchoServer},
    unique_prefix, Lab, LabDesc, LanLeaks,
};

/// A bound for a test that must end, not a speed target.
const BOUND: Duration = Duration::from_secs(10);

/// New flows pinned so far, over both uplinks.
fn new_flows(lbd: &Lbd) -> Result<u64> {
    Ok(lbd.uplink_counter("isp1", "new_flows")? + lbd.uplink_counter("isp2", "new_flows")?)
}

/// `count` UDP flows from `host` to `server`, every one answered.
fn flows_answered(lab: &Lab, host: &str, server: SocketAddr, count: usize) -> Result<()> {
    let flows = udp_flows(lab.ns(host)?, server, count, BOUND)?;
    let failed: Vec<String> = flows
        .iter()
        .filter_map(|f| f.outcome.as_ref().err().map(|e| format!("{e:#}")))
        .collect();
    ensure!(
        failed.is_empty(),
        "{host}: {} of {count} flows failed: {failed:?}",
        failed.len()
    );
    Ok(())
}

#[test]
fn clients_on_a_bridges_ports_are_balanced_and_natted_and_new_ports_followed() -> Result<()> {
    if !require_root("clients_on_a_bridges_ports_are_balanced_and_natted_and_new_ports_followed") {
        return Ok(());
    }
    let mut lab = Lab::up(&LabDesc::shipped("bridge")?, &unique_prefix())?;
    let leaks = LanLeaks::install(&lab)?;
    let config = LabConfig {
        lans: &["br-lan"],
        ..LabConfig::default()
    };
    let lbd = Lbd::start(&mut lab, &config.render())?;
    let ports = lbd.status()?["lan_ports"].to_string();
    ensure!(
        ports.contains("lan1") && ports.contains("lan2") && !ports.contains("br-lan"),
        "lan_ingress is on {ports}, not on the bridge's ports"
    );

    let server: SocketAddr = "198.51.100.10:7000".parse()?;
    let _echo = UdpEchoServer::start(lab.ns("inet")?, server)?;
    for host in ["client", "client2"] {
        flows_answered(&lab, host, server, 30)?;
    }
    let (isp1, isp2) = (
        lbd.uplink_counter("isp1", "new_flows")?,
        lbd.uplink_counter("isp2", "new_flows")?,
    );
    eprintln!("60 flows from two bridge ports: {isp1} through isp1, {isp2} through isp2");
    ensure!(
        isp1 + isp2 >= 60 && isp1 > 0 && isp2 > 0,
        "the fast path pinned {isp1} + {isp2} flows"
    );
    // Between the clients: the bridge's business.
    lab.exec("client", &["ping", "-c", "1", "-W", "2", "10.10.0.3"])?;

    // A port that joins the bridge while lbd runs is followed.
    lab.exec(
        "router",
        &["ip", "link", "set", "dev", "lan3", "master", "br-lan"],
    )?;
    wait_for("lbd on the new port", BOUND, || {
        Ok(lbd.status()?["lan_ports"].to_string().contains("lan3"))
    })?;
    let before = new_flows(&lbd)?;
    flows_answered(&lab, "client3", server, 20)?;
    let pinned = new_flows(&lbd)? - before;
    eprintln!("20 flows from a port that joined later: {pinned} pinned by the fast path");
    ensure!(
        pinned >= 20,
        "only {pinned} of client3's 20 flows took the fast path"
    );
    // And one that leaves is let go.
    lab.exec("router", &["ip", "link", "set", "dev", "lan3", "nomaster"])?;
    wait_for("lbd off the port that left", BOUND, || {
        Ok(!lbd.status()?["lan_ports"].to_string().contains("lan3"))
    })?;

    leaks.check()?;
    lbd.stop(&mut lab)
}

/// Whether `host:ifname` carries an XDP program, as `ip -d link` says.
fn carries_xdp(lab: &Lab, host: &str, ifname: &str) -> Result<bool> {
    Ok(lab
        .exec(host, &["ip", "-d", "link", "show", "dev", ifname])?
        .contains("prog/xdp"))
}

#[test]
fn a_port_that_left_the_bridge_while_lbd_was_stopped_is_let_go_when_it_starts() -> Result<()> {
    if !require_root("a_port_that_left_the_bridge_while_lbd_was_stopped_is_let_go_when_it_starts") {
        return Ok(());
    }
    let mut lab = Lab::up(&LabDesc::shipped("bridge")?, &unique_prefix())?;
    let config = LabConfig {
        lans: &["br-lan"],
        ..LabConfig::default()
    };
    let mut lbd = Lbd::start(&mut lab, &config.render())?;
    ensure!(
        carries_xdp(&lab, "router", "lan2")?,
        "lan_ingress is not on the bridge's port lan2"
    );
    // Stopped for an upgrade; meanwhile the operator takes lan2 off the
    // LAN (for a second ISP's modem, say). The data plane stayed pinned.
    lbd.stop_keeping(&mut lab)?;
    lab.exec("router", &["ip", "link", "set", "dev", "lan2", "nomaster"])?;
    lbd.restart(&mut lab)?;
    wait_for("lbd's first round", BOUND, || {
        Ok(lbd.status()?["lan_ports"].to_string().contains("lan1"))
    })?;
    ensure!(
        !carries_xdp(&lab, "router", "lan2")?,
        "lan_ingress stayed on lan2, which is no LAN port any more: {}",
        lbd.status()?["lan_ports"]
    );
    ensure!(
        carries_xdp(&lab, "router", "lan1")?,
        "lan_ingress is gone from lan1, still a port of the bridge"
    );
    lbd.stop(&mut lab)
}

/// A clinic's LAN with a second gateway: a VPN box beside the router
/// (client3, on lan3) that carries the head office's 10.50.0.0/16, which
/// the clients route through it (as DHCP option 121 tells them). Their
/// frames to the box cross the router's bridge, where lan_ingress sees
/// them: they are the bridge's to forward, never NATed out of an ISP.
#[test]
fn frames_to_a_second_gateway_on_the_lan_are_bridged_not_balanced() -> Result<()> {
    if !require_root("frames_to_a_second_gateway_on_the_lan_are_bridged_not_balanced") {
        return Ok(());
    }
    let mut lab = Lab::up(&LabDesc::shipped("bridge")?, &unique_prefix())?;
    lab.exec(
        "router",
        &["ip", "link", "set", "dev", "lan3", "master", "br-lan"],
    )?;
    // The box's side of its tunnel, and the client's route through it.
    lab.exec(
        "client3",
        &["ip", "addr", "add", "10.50.0.1/16", "dev", "lo"],
    )?;
    lab.exec(
        "client",
        &["ip", "route", "add", "10.50.0.0/16", "via", "10.10.0.4"],
    )?;
    let config = LabConfig {
        lans: &["br-lan"],
        ..LabConfig::default()
    };
    let lbd = Lbd::start(&mut lab, &config.render())?;
    wait_for("lbd on lan3", BOUND, || {
        Ok(lbd.status()?["lan_ports"].to_string().contains("lan3"))
    })?;

    let head_office: SocketAddr = "10.50.0.1:7000".parse()?;
    let _echo = UdpEchoServer::start(lab.ns("client3")?, head_office)?;
    let (pinned, passed) = (new_flows(&lbd)?, lbd.reason("pass_elsewhere")?);
    flows_answered(&lab, "client", head_office, 20)?;
    let (pinned, passed) = (
        new_flows(&lbd)? - pinned,
        lbd.reason("pass_elsewhere")? - passed,
    );
    eprintln!("20 flows to the head office through the VPN box: {pinned} pinned, {passed} frames left to the bridge");
    ensure!(
        pinned == 0,
        "{pinned} flows to the VPN box's network were pinned to an ISP"
    );
    ensure!(
        passed >= 20,
        "only {passed} frames counted as pass_elsewhere"
    );

    // The internet, through the router, is balanced as before.
    let server: SocketAddr = "198.51.100.10:7000".parse()?;
    let _inet = UdpEchoServer::start(lab.ns("inet")?, server)?;
    let before = new_flows(&lbd)?;
    flows_answered(&lab, "client", server, 20)?;
    ensure!(
        new_flows(&lbd)? - before >= 20,
        "the client's internet flows did not take the fast path"
    );
    lbd.stop(&mut lab)
}

/// A client that roams to another port of the bridge (a phone walking
/// from one access point to another on a second router port) keeps its
/// connections: the bridge hears it on the new port from its first ARP
/// request there, and lbd sends its flows' replies after it.
#[test]
fn a_client_that_roams_to_another_bridge_port_keeps_its_flows() -> Result<()> {
    if !require_root("a_client_that_roams_to_another_bridge_port_keeps_its_flows") {
        return Ok(());
    }
    let mut lab = Lab::up(&LabDesc::shipped("bridge")?, &unique_prefix())?;
    // The second access point's port: the client's other radio, as it
    // were (its Wi-Fi keeps its MAC across access points).
    let client_ns = lab.ns("client")?.to_string();
    lab.exec(
        "router",
        &[
            "ip", "link", "add", "lan4", "type", "veth", "peer", "name", "eth1", "netns",
            &client_ns,
        ],
    )?;
    lab.exec(
        "router",
        &["ip", "link", "set", "dev", "lan4", "master", "br-lan", "up"],
    )?;
    // Offloads as the lab's other clients have them (a wire carries no
    // partial checksums).
    lab.exec(
        "client",
        &[
            "ethtool", "-K", "eth1", "tso", "off", "gso", "off", "tx", "off", "gro", "on",
        ],
    )?;
    let config = LabConfig {
        lans: &["br-lan"],
        ..LabConfig::default()
    };
    let lbd = Lbd::start(&mut lab, &config.render())?;
    wait_for("lbd on lan4", BOUND, || {
        Ok(lbd.status()?["lan_ports"].to_string().contains("lan4"))
    })?;

    let server: SocketAddr = "198.51.100.10:7000".parse()?;
    let _echo = UdpEchoServer::start(lab.ns("inet")?, server)?;
    let held = HeldUdp::open(&client_ns, server, 8)?;
    held.echo_all(BOUND)?;
    let pinned = new_flows(&lbd)?;

    // It roams: gone from lan1, heard on lan4, same MAC and address.
    let mac = lab.exec("client", &["cat", "/sys/class/net/eth0/address"])?;
    for step in [
        vec!["ip", "link", "set", "dev", "eth0", "down"],
        vec!["ip", "link", "set", "dev", "eth1", "address", mac.trim()],
        vec!["ip", "addr", "add", "10.10.0.2/24", "dev", "eth1"],
        vec!["ip", "link", "set", "dev", "eth1", "up"],
        vec!["ip", "route", "add", "default", "via", "10.10.0.1"],
    ] {
        lab.exec("client", &step)?;
    }
    held.echo_all(BOUND)?;
    let repinned = new_flows(&lbd)? - pinned;
    eprintln!("8 held flows answered after the roam; {repinned} flows pinned anew");
    ensure!(
        repinned == 0,
        "{repinned} flows were pinned again: the held flows were not followed, but replaced"
    );
    ensure!(
        lbd.stderr().contains("roamed"),
        "lbd did not say that a client roamed"
    );
    lbd.stop(&mut lab)
}
