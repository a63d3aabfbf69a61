//! Policies and rules in a lab: `[[policy]]` names the uplinks a class of
//! traffic may use, `[[rule]]` sends matching new flows to a policy.
//!
//! The bridge lab (client 10.10.0.2 and client2 10.10.0.3 on br-lan, isp1
//! and isp2 to inet). VoIP-like UDP (port 5060 and 10000-20000) may use
//! only isp1, isp2 as its backup tier; client2 is a guest whose policy has
//! only isp2 and drops when isp2 is out. Which uplink a flow left by is the
//! NAT source address the server in inet sees (100.64.N.2 for ispN), and
//! lbd's flow table (`lbctl flows --json`) must say the same.

use std::{
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    time::Duration,
};

use anyhow::{bail, ensure, Context, Result};
use lb_tests::{
    daemon::{LabConfig, Lbd},
    require_root,
    stream::wait_for,
    traffic::{udp_flows, udp_socket, UdpEchoServer},
    unique_prefix, Lab, LabDesc, LanLeaks,
};
use serde_json::Value;

const SERVER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 2);
const GUEST: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 3);
/// A port no rule names: the default policy's traffic.
const OTHER_PORT: u16 = 7000;
const VOIP_PORTS: [u16; 4] = [5060, 10000, 15000, 20000];
const BOUND: Duration = Duration::from_secs(5);

const POLICIES: &str = r#"
[[policy]]
name = "voip"
uplinks = ["isp1", { name = "isp2", tier = 1 }]
fallback = "default"

[[policy]]
name = "guest"
uplinks = ["isp2"]
fallback = "drop"

[[rule]]
proto = "udp"
dst_port = [5060, "10000-20000"]
policy = "voip"

[[rule]]
src = "10.10.0.3/32"
policy = "guest"
"#;

fn config() -> String {
    LabConfig {
        sections: POLICIES,
        lans: &["br-lan"],
        ..LabConfig::default()
    }
    .render()
}

/// The uplink whose NAT address is `addr`.
fn uplink_of(addr: Ipv4Addr) -> Result<&'static str> {
    match addr.octets() {
        [100, 64, 1, 2] => Ok("isp1"),
        [100, 64, 2, 2] => Ok("isp2"),
        _ => bail!("the server saw source {addr}, no uplink's address"),
    }
}

/// Servers in inet, one UDP socket per port, answering by hand so that the
/// test sees each datagram's source.
struct Servers(Vec<(u16, UdpSocket)>);

impl Servers {
    fn start(lab: &Lab, ports: &[u16]) -> Result<Servers> {
        let ns = lab.ns("inet")?;
        let mut sockets = Vec::new();
        for &port in ports {
            let s = udp_socket(ns, SocketAddr::from((SERVER, port)))?;
            s.set_read_timeout(Some(Duration::from_millis(200)))?;
            sockets.push((port, s));
        }
        Ok(Servers(sockets))
    }

    fn socket(&self, port: u16) -> Result<&UdpSocket> {
        self.0
            .iter()
            .find(|(p, _)| *p == port)
            .map(|(_, s)| s)
            .with_context(|| format!("no server on port {port}"))
    }
}

/// One UDP flow from `client` (a fresh socket in the client namespace) to
/// SERVER:`port`: lbctl explain is asked first (a new flow's policy, rule
/// and uplink), then a datagram goes out, the server answers it, and the
/// flow table is read. Returns (explanation, uplink the server saw it by,
/// uplink in the flow table).
fn voip_flow(
    lab: &Lab,
    lbd: &Lbd,
    servers: &Servers,
    port: u16,
) -> Result<(Value, &'static str, String)> {
    let client = udp_socket(lab.ns("client")?, SocketAddr::from(([0, 0, 0, 0], 0)))?;
    let local = client.local_addr()?.port();
    let src = format!("{CLIENT}:{local}");
    let dst = format!("{SERVER}:{port}");
    let explained: Value =
        serde_json::from_str(&lbd.lbctl(&["explain", &src, &dst, "udp", "--json"])?)
            .context("parsing lbctl explain --json")?;

    client.connect(SocketAddr::from((SERVER, port)))?;
    client.set_read_timeout(Some(Duration::from_millis(500)))?;
    let server = servers.socket(port)?;
    let message = format!("policies {local}->{port}");
    let mut buf = [0u8; 256];
    let mut seen = None;
    for _ in 0..3 {
        client.send(message.as_bytes())?;
        // Drain what the server got until ours arrives (or times out).
        while let Ok((n, peer)) = server.recv_from(&mut buf) {
            server.send_to(&buf[..n], peer)?;
            if &buf[..n] == message.as_bytes() {
                seen = Some(peer);
                break;
            }
        }
        if seen.is_some() {
            break;
        }
    }
    let peer = seen.with_context(|| format!("flow {src} -> {dst}: the server never saw it"))?;
    let n = client
        .recv(&mut buf)
        .with_context(|| format!("flow {src} -> {dst}: no answer"))?;
    ensure!(
        &buf[..n] == message.as_bytes(),
        "flow {src} -> {dst}: wrong answer"
    );
    let SocketAddr::V4(peer) = peer else {
        bail!("an IPv6 peer {peer}")
    };
    let via = uplink_of(*peer.ip())?;

    let flows: Value = serde_json::from_str(&lbd.lbctl(&[
        "flows",
        "--client",
        &CLIENT.to_string(),
        "--limit",
        "10000",
        "--json",
    ])?)
    .context("parsing lbctl flows --json")?;
    let entry = flows["flows"]
        .as_array()
        .context("no flows in lbctl flows --json")?
        .iter()
        .find(|f| f["proto"] == "udp" && f["client"] == src.as_str() && f["remote"] == dst.as_str())
        .with_context(|| format!("flow {src} -> {dst} not in the flow table: {flows}"))?;
    let table = entry["uplink"].as_str().unwrap_or_default().to_string();
    Ok((explained, via, table))
}

/// Check one flow's explanation against where it went.
fn check_flow(explained: &Value, via: &str, table: &str, want: &str, what: &str) -> Result<()> {
    ensure!(via == want, "{what}: left by {via}, not {want}");
    ensure!(
        table == via,
        "{what}: the flow table says {table}, it left by {via}"
    );
    ensure!(
        explained["uplink"] == via,
        "{what}: explain said {}, it left by {via}: {explained}",
        explained["uplink"]
    );
    ensure!(explained["policy"] == "voip", "{what}: policy {explained}");
    ensure!(explained["rule"] == 1, "{what}: rule {explained}");
    Ok(())
}

#[test]
fn voip_udp_uses_only_its_uplink_and_fails_over() -> Result<()> {
    if !require_root("voip_udp_uses_only_its_uplink_and_fails_over") {
        return Ok(());
    }
    let mut lab = Lab::up(&LabDesc::shipped("bridge")?, &unique_prefix())?;
    let leaks = LanLeaks::install(&lab)?;
    let servers = Servers::start(&lab, &VOIP_PORTS)?;
    let lbd = Lbd::start(&mut lab, &config())?;

    // 16 flows, 4 to each port, from 16 source ports: all by isp1 (the
    // default policy would spread them over both uplinks).
    for i in 0..16 {
        let port = VOIP_PORTS[i % VOIP_PORTS.len()];
        let (explained, via, table) = voip_flow(&lab, &lbd, &servers, port)?;
        check_flow(
            &explained,
            via,
            &table,
            "isp1",
            &format!("flow {i} to {port}"),
        )?;
    }
    eprintln!("16 voip flows: all by isp1, as explain said");

    // isp1 out: new VoIP flows take the backup tier, isp2.
    lbd.lbctl(&["uplink", "disable", "isp1"])?;
    wait_for("isp1 down", BOUND, || {
        Ok(lbd.uplink("isp1")?["state"] == "down")
    })?;
    for i in 0..8 {
        let (explained, via, table) = voip_flow(&lab, &lbd, &servers, 5060)?;
        check_flow(
            &explained,
            via,
            &table,
            "isp2",
            &format!("flow {i} to 5060 after disable"),
        )?;
    }
    eprintln!("8 voip flows with isp1 disabled: all by isp2");
    lbd.stop(&mut lab)?;
    leaks.check()
}

#[test]
fn a_rule_whose_policy_is_down_with_fallback_drop_drops_and_counts() -> Result<()> {
    if !require_root("a_rule_whose_policy_is_down_with_fallback_drop_drops_and_counts") {
        return Ok(());
    }
    let mut lab = Lab::up(&LabDesc::shipped("bridge")?, &unique_prefix())?;
    let leaks = LanLeaks::install(&lab)?;
    let server = SocketAddr::from((SERVER, OTHER_PORT));
    let _udp = UdpEchoServer::start(lab.ns("inet")?, server)?;
    let lbd = Lbd::start(&mut lab, &config())?;

    // Guest with its uplink up: answered.
    let before = udp_flows(lab.ns("client2")?, server, 4, BOUND)?;
    ensure!(
        before.iter().all(|f| f.outcome.is_ok()),
        "guest flows failed with isp2 up: {before:?}"
    );

    lbd.lbctl(&["uplink", "disable", "isp2"])?;
    wait_for("isp2 down", BOUND, || {
        Ok(lbd.uplink("isp2")?["state"] == "down")
    })?;
    let explained: Value = serde_json::from_str(&lbd.lbctl(&[
        "explain",
        &format!("{GUEST}:40000"),
        &server.to_string(),
        "udp",
        "--json",
    ])?)?;
    ensure!(explained["verdict"] == "dropped", "explain: {explained}");

    let dropped_before = lbd.reason("drop_policy")?;
    const GUEST_FLOWS: usize = 4;
    let guest = udp_flows(
        lab.ns("client2")?,
        server,
        GUEST_FLOWS,
        Duration::from_secs(1),
    )?;
    let answered: Vec<_> = guest
        .iter()
        .filter(|f| f.outcome.is_ok())
        .map(|f| f.flow())
        .collect();
    ensure!(
        answered.is_empty(),
        "guest flows answered with isp2 out: {answered:?}"
    );
    // Each flow sent up to three datagrams, every one dropped.
    wait_for("drop_policy to count the guest's datagrams", BOUND, || {
        Ok(lbd.reason("drop_policy")? - dropped_before >= GUEST_FLOWS as u64)
    })?;
    let dropped = lbd.reason("drop_policy")? - dropped_before;

    // The other client is not a guest: its flows go by isp1.
    let other = udp_flows(lab.ns("client")?, server, 8, BOUND)?;
    let failed: Vec<_> = other
        .iter()
        .filter(|f| f.outcome.is_err())
        .map(|f| f.flow())
        .collect();
    ensure!(
        failed.is_empty(),
        "the other client's flows failed: {failed:?}"
    );
    eprintln!(
        "guest: {GUEST_FLOWS} flows unanswered, drop_policy +{dropped}; client: 8 flows answered"
    );
    lbd.stop(&mut lab)?;
    leaks.check()
}
