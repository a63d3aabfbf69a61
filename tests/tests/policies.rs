//! Policies and rules in a lab: `[[policy]]` names the uplinks a class of
//! traffic may use, `[[rule]]` sends matching new flows to a policy.
//!
//! The bridge lab (client 10.10.0.2 and client2 10.10.0.3 on br-lan, isp1
//! and isp2 to inet). VoIP-like UDP (port 5060 and 10000-20000) may use
//! only isp1, isp2 as its backup tier; client2 is a guest whose policy has
//! only isp2 and drops when isp2 is out. Which uplink a flow left by is the
//! NAT source address the server in inet sees (100.64.N.2 for ispN), and
//! lbd's flow table (`lbctl flows --json`) must say the same.
//!
//! Then one lab each: a sticky policy keeps a client's new flows on one
//! uplink until its timeout; a rule whose destinations are a file of
//! 100,000 prefixes; a reload that gives a rule's policy another uplink
//! (new flows move, established ones stay).

use std::{
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    time::{Duration, Instant},
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
    config_with(POLICIES)
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

/// `lbctl explain SRC DST udp --json`, parsed.
fn explain(lbd: &Lbd, src: &str, dst: &str) -> Result<Value> {
    serde_json::from_str(&lbd.lbctl(&["explain", src, dst, "udp", "--json"])?)
        .context("parsing lbctl explain --json")
}

/// A fresh UDP socket in `host` (a LAN client), connected to SERVER:`port`:
/// a new flow once it sends.
fn client_socket(lab: &Lab, host: &str, port: u16) -> Result<UdpSocket> {
    let s = udp_socket(lab.ns(host)?, SocketAddr::from(([0, 0, 0, 0], 0)))?;
    s.connect(SocketAddr::from((SERVER, port)))?;
    s.set_read_timeout(Some(Duration::from_millis(500)))?;
    Ok(s)
}

/// A datagram from `client` (connected to SERVER:`port`) until the server
/// on that port gets it (three tries), its answer back: the uplink it left
/// by (the source the server saw).
fn exchange(client: &UdpSocket, servers: &Servers, port: u16) -> Result<&'static str> {
    let local = client.local_addr()?;
    let message = format!("policies {}->{port}", local.port());
    let what = format!("flow {local} -> {SERVER}:{port}");
    let server = servers.socket(port)?;
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
    let peer = seen.with_context(|| format!("{what}: the server never saw it"))?;
    // Answers to earlier tries may come first.
    loop {
        let n = client
            .recv(&mut buf)
            .with_context(|| format!("{what}: no answer"))?;
        if &buf[..n] == message.as_bytes() {
            break;
        }
    }
    let SocketAddr::V4(peer) = peer else {
        bail!("an IPv6 peer {peer}")
    };
    uplink_of(*peer.ip())
}

/// Policy `name`'s entry in `lbctl status --json`.
fn policy_status(lbd: &Lbd, name: &str) -> Result<Value> {
    let status = lbd.status()?;
    status["policies"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["name"] == name))
        .cloned()
        .with_context(|| format!("policy {name} not in status: {}", status["policies"]))
}

/// A counter of policy `name` in `lbctl status --json`.
fn policy_counter(lbd: &Lbd, name: &str, counter: &str) -> Result<u64> {
    policy_status(lbd, name)?[counter]
        .as_u64()
        .with_context(|| format!("policy {name} has no counter {counter}"))
}

/// The lab's configuration with `sections` (policies and rules).
fn config_with(sections: &str) -> String {
    LabConfig {
        sections,
        lans: &["br-lan"],
        ..LabConfig::default()
    }
    .render()
}

/// One UDP flow from `client` (a fresh socket in the client namespace) to
/// SERVER:`port`: lbctl explain is asked first (a new flow's policy, rule
/// and uplink), then a datagram goes out, the server answers it, and the
/// flow table is read. Returns (explanation, uplink the server saw it by,
/// uplink in the flow table). The socket goes into `held`, so that no
/// later flow gets its port (and so an earlier flow's pinned entry).
fn voip_flow(
    lab: &Lab,
    lbd: &Lbd,
    servers: &Servers,
    port: u16,
    held: &mut Vec<UdpSocket>,
) -> Result<(Value, &'static str, String)> {
    let client = client_socket(lab, "client", port)?;
    let src = format!("{CLIENT}:{}", client.local_addr()?.port());
    let dst = format!("{SERVER}:{port}");
    let explained = explain(lbd, &src, &dst)?;
    let via = exchange(&client, servers, port)?;

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
    held.push(client);
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
    // The policies' rules (by mark) are read back as lbd made them: no
    // round changes them again. (A bound, not a speed: a few rounds.)
    lbd.wait_steady(3, Duration::from_secs(20))?;

    // 16 flows, 4 to each port, from 16 source ports: all by isp1 (the
    // default policy would spread them over both uplinks).
    let mut held = Vec::new();
    for i in 0..16 {
        let port = VOIP_PORTS[i % VOIP_PORTS.len()];
        let (explained, via, table) = voip_flow(&lab, &lbd, &servers, port, &mut held)?;
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
        let (explained, via, table) = voip_flow(&lab, &lbd, &servers, 5060, &mut held)?;
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

/// Destination ports of the policy tests below: each one a server of its
/// own, so that a client's flows go to 50 different places.
const PORTS: std::ops::Range<u16> = 7000..7050;
/// Flows per batch in the sticky test.
const STICKY_FLOWS: usize = 50;

const STICKY: &str = r#"
[[policy]]
name = "bank"
uplinks = ["isp1", "isp2"]
sticky = { by = "src", timeout = "3s" }

[[rule]]
proto = "udp"
dst_port = "7000-7999"
policy = "bank"
"#;
const STICKY_TIMEOUT: Duration = Duration::from_secs(3);

/// The other uplink of the lab's two.
fn other_than(uplink: &str) -> &'static str {
    if uplink == "isp1" {
        "isp2"
    } else {
        "isp1"
    }
}

#[test]
fn sticky_by_src_keeps_a_client_on_one_uplink_until_the_timeout() -> Result<()> {
    if !require_root("sticky_by_src_keeps_a_client_on_one_uplink_until_the_timeout") {
        return Ok(());
    }
    let mut lab = Lab::up(&LabDesc::shipped("bridge")?, &unique_prefix())?;
    let leaks = LanLeaks::install(&lab)?;
    let ports: Vec<u16> = PORTS.collect();
    let servers = Servers::start(&lab, &ports)?;
    let lbd = Lbd::start(&mut lab, &config_with(STICKY))?;

    // 50 new flows, one to each port: the first places the client, the
    // other 49 follow it (the hash alone would spread them over both).
    // Every socket stays open to the end, so that no later flow can reuse
    // one's source port (and be an established flow rather than a new one).
    let hits_before = policy_counter(&lbd, "bank", "sticky_hits")?;
    let mut sockets = Vec::new();
    let mut first = Vec::new();
    let mut last_sent = Instant::now();
    for &port in &ports {
        let client = client_socket(&lab, "client", port)?;
        last_sent = Instant::now();
        first.push(exchange(&client, &servers, port)?);
        sockets.push(client);
    }
    let stuck = first[0];
    ensure!(
        first.iter().all(|&u| u == stuck),
        "the first {STICKY_FLOWS} flows left by more than one uplink: {first:?}"
    );
    let bank = policy_status(&lbd, "bank")?;
    let hits = bank["sticky_hits"].as_u64().unwrap_or_default() - hits_before;
    ensure!(
        hits >= STICKY_FLOWS as u64 - 1,
        "sticky_hits grew by {hits} over {STICKY_FLOWS} new flows: {bank}"
    );
    ensure!(bank["sticky_entries"] == 1, "one client, one entry: {bank}");
    eprintln!("{STICKY_FLOWS} flows: all by {stuck}, sticky_hits +{hits}");

    // The entry lasts its timeout from the client's last new flow, no less.
    wait_for(
        "the client's sticky entry to expire",
        STICKY_TIMEOUT + Duration::from_secs(10),
        || Ok(policy_counter(&lbd, "bank", "sticky_entries")? == 0),
    )?;
    let held = last_sent.elapsed();
    ensure!(
        held + Duration::from_millis(100) >= STICKY_TIMEOUT,
        "the sticky entry went {held:?} after the client's last new flow"
    );

    // Expired, the client is placed anew by the hash: a new flow whose
    // hash falls to the other uplink (lbctl explain says which: placed by
    // its bucket, not by an entry) leaves by it, and the client's next
    // new flows follow it there. (Not both uplinks within the second
    // batch: its first flow makes a new entry that holds the rest.)
    let other = other_than(stuck);
    let hits_before = policy_counter(&lbd, "bank", "sticky_hits")?;
    let mut second = Vec::new();
    let mut tried = Vec::new();
    let (port, client) = loop {
        ensure!(
            tried.len() < 64,
            "no new flow of 64 would leave by {other}: {tried:?}"
        );
        let port = ports[tried.len() % ports.len()];
        let client = client_socket(&lab, "client", port)?;
        let src = format!("{CLIENT}:{}", client.local_addr()?.port());
        let explained = explain(&lbd, &src, &format!("{SERVER}:{port}"))?;
        ensure!(
            explained["policy"] == "bank" && explained["rule"] == 1,
            "explain {src}: {explained}"
        );
        ensure!(
            explained["bucket"].is_u64(),
            "explain {src}: still placed by a sticky entry: {explained}"
        );
        if explained["uplink"] == other {
            break (port, client);
        }
        tried.push(explained["uplink"].clone());
        sockets.push(client);
    };
    second.push(exchange(&client, &servers, port)?);
    sockets.push(client);
    for &port in ports.iter().skip(1) {
        let client = client_socket(&lab, "client", port)?;
        second.push(exchange(&client, &servers, port)?);
        sockets.push(client);
    }
    ensure!(
        second.iter().all(|&u| u == other),
        "after the timeout, {STICKY_FLOWS} new flows (the first placed on {other}) left by {second:?}"
    );
    let bank = policy_status(&lbd, "bank")?;
    let hits = bank["sticky_hits"].as_u64().unwrap_or_default() - hits_before;
    ensure!(
        hits >= STICKY_FLOWS as u64 - 1,
        "sticky_hits grew by {hits} over the second {STICKY_FLOWS} new flows: {bank}"
    );
    eprintln!(
        "after {held:?}: the entry expired; {STICKY_FLOWS} new flows by {other} (the first placed \
         there by its hash), sticky_hits +{hits}"
    );
    drop(sockets);
    lbd.stop(&mut lab)?;
    leaks.check()
}

/// How many prefixes the partner file has.
const PARTNER_PREFIXES: usize = 100_000;

/// A file lbd reads, removed when dropped.
struct Scratch(std::path::PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A prefix file of `PARTNER_PREFIXES` lines: /24s from 20.0.0.0 on, and
/// the server's /24 in the middle.
fn partner_file(lab: &Lab) -> Result<Scratch> {
    let path = std::env::temp_dir().join(format!("{}partners.txt", lab.prefix()));
    let file = Scratch(path);
    let mut text = String::from("# partners: one prefix a line\n");
    for i in 0..PARTNER_PREFIXES - 1 {
        if i == PARTNER_PREFIXES / 2 {
            text += "198.51.100.0/24\n";
        }
        text += &format!("{}.{}.{}.0/24\n", 20 + i / 65536, (i / 256) % 256, i % 256);
    }
    std::fs::write(&file.0, text).with_context(|| format!("writing {}", file.0.display()))?;
    Ok(file)
}

#[test]
fn a_destination_in_a_100000_prefix_file_leaves_by_isp2_only() -> Result<()> {
    if !require_root("a_destination_in_a_100000_prefix_file_leaves_by_isp2_only") {
        return Ok(());
    }
    let mut lab = Lab::up(&LabDesc::shipped("bridge")?, &unique_prefix())?;
    let leaks = LanLeaks::install(&lab)?;
    let file = partner_file(&lab)?;
    let servers = Servers::start(&lab, &[OTHER_PORT])?;
    let sections = format!(
        "\n[[policy]]\nname = \"partner\"\nuplinks = [\"isp2\"]\n\n\
         [[rule]]\ndst_file = \"{}\"\npolicy = \"partner\"\n",
        file.0.display()
    );
    let lbd = Lbd::start(&mut lab, &config_with(&sections))?;

    // Addresses in the file (the server's, the first and the last /24) are
    // the partner's, one outside it the default policy's.
    let src = format!("{CLIENT}:40000");
    let last = PARTNER_PREFIXES - 2;
    for dst in [
        format!("{SERVER}:{OTHER_PORT}"),
        "20.0.0.1:7000".to_string(),
        format!(
            "{}.{}.{}.9:7000",
            20 + last / 65536,
            (last / 256) % 256,
            last % 256
        ),
    ] {
        let explained = explain(&lbd, &src, &dst)?;
        ensure!(
            explained["policy"] == "partner" && explained["rule"] == 1,
            "explain {src} -> {dst}: {explained}"
        );
        ensure!(
            explained["uplink"] == "isp2",
            "explain {src} -> {dst}: {explained}"
        );
    }
    let outside = explain(&lbd, &src, "203.0.113.1:7000")?;
    ensure!(
        outside["policy"] == "default" && outside["rule"].is_null(),
        "explain {src} -> 203.0.113.1:7000: {outside}"
    );

    let mut sockets = Vec::new();
    let mut via = Vec::new();
    for _ in 0..16 {
        let client = client_socket(&lab, "client", OTHER_PORT)?;
        via.push(exchange(&client, &servers, OTHER_PORT)?);
        sockets.push(client);
    }
    ensure!(
        via.iter().all(|&u| u == "isp2"),
        "16 flows to the partner left by {via:?}"
    );
    let partner = policy_status(&lbd, "partner")?;
    ensure!(
        partner["new_flows"].as_u64().unwrap_or_default() >= 16,
        "the partner policy counted fewer than 16 new flows: {partner}"
    );
    eprintln!("16 flows to a destination in {PARTNER_PREFIXES} prefixes: all by isp2");
    drop(sockets);
    lbd.stop(&mut lab)?;
    leaks.check()
}

fn reload_config(uplink: &str) -> String {
    config_with(&format!(
        "\n[[policy]]\nname = \"p\"\nuplinks = [\"{uplink}\"]\n\n\
         [[rule]]\nproto = \"udp\"\ndst_port = \"7000-7999\"\npolicy = \"p\"\n"
    ))
}

#[test]
fn a_reload_moves_new_flows_to_the_rules_new_policy_and_no_established_one() -> Result<()> {
    if !require_root("a_reload_moves_new_flows_to_the_rules_new_policy_and_no_established_one") {
        return Ok(());
    }
    let mut lab = Lab::up(&LabDesc::shipped("bridge")?, &unique_prefix())?;
    let leaks = LanLeaks::install(&lab)?;
    let ports: Vec<u16> = PORTS.take(8).collect();
    let servers = Servers::start(&lab, &ports)?;
    let lbd = Lbd::start(&mut lab, &reload_config("isp1"))?;

    // 8 long-lived "connections": sockets kept open, a datagram each way.
    let mut established = Vec::new();
    for &port in &ports {
        let client = client_socket(&lab, "client", port)?;
        let via = exchange(&client, &servers, port)?;
        ensure!(
            via == "isp1",
            "flow to {port} before the reload left by {via}"
        );
        established.push((port, client));
    }

    lbd.write_config(&lab, &reload_config("isp2"))?;
    let said = lbd.lbctl(&["reload"])?;
    ensure!(said.contains("polic"), "reload said {said:?}");
    // A reload may start lbd again in place: it may not answer for a while.
    wait_for("policy p to take isp2 only", BOUND, || {
        Ok(policy_status(&lbd, "p").is_ok_and(|p| p["taking"] == serde_json::json!(["isp2"])))
    })?;

    for (port, client) in &established {
        let via = exchange(client, &servers, *port)?;
        ensure!(
            via == "isp1",
            "established flow to {port} after the reload left by {via}"
        );
    }
    let mut fresh = Vec::new();
    for &port in &ports {
        let client = client_socket(&lab, "client", port)?;
        let via = exchange(&client, &servers, port)?;
        ensure!(
            via == "isp2",
            "new flow to {port} after the reload left by {via}"
        );
        fresh.push(client);
    }
    eprintln!(
        "reload ({}): 8 established flows still by isp1, 8 new ones by isp2",
        said.trim()
    );
    drop((established, fresh));
    lbd.stop(&mut lab)?;
    leaks.check()
}

/// The slow path follows the rules nftables can say: what the router
/// itself sends (its DNS forwarder, NTP, updates: a socket bound to no
/// uplink) to the rule's ports leaves by the rule's policy's uplink, and
/// what no rule takes by the slow path's own (isp1, the main table's).
#[test]
fn the_routers_own_traffic_follows_the_rules_by_its_policys_uplink() -> Result<()> {
    if !require_root("the_routers_own_traffic_follows_the_rules_by_its_policys_uplink") {
        return Ok(());
    }
    let mut lab = Lab::up(&LabDesc::shipped("bridge")?, &unique_prefix())?;
    let leaks = LanLeaks::install(&lab)?;
    let ruled = 7000;
    let unruled = 6000;
    let servers = Servers::start(&lab, &[ruled, unruled])?;
    let lbd = Lbd::start(&mut lab, &reload_config("isp2"))?;
    wait_for("policy p to take isp2", BOUND, || {
        Ok(policy_status(&lbd, "p").is_ok_and(|p| p["taking"] == serde_json::json!(["isp2"])))
    })?;
    // lbd's table and rules come with its rounds, and isp1 may enter
    // service after isp2 (until then everything leaves by isp2): wait
    // until one try sees the rule at work, the ruled port by isp2 and the
    // other by isp1, each a new socket (a new connection). A datagram
    // lost while the rules go in is "not yet" too.
    let mut seen = String::new();
    wait_for(
        "the router's own UDP to 7000 to leave by isp2, and to 6000 by isp1",
        BOUND,
        || {
            let way = |port| -> Result<String> {
                let socket = client_socket(&lab, "router", port)?;
                Ok(match exchange(&socket, &servers, port) {
                    Ok(via) => via.to_owned(),
                    Err(e) => format!("nowhere ({e:#})"),
                })
            };
            let (to_ruled, to_unruled) = (way(ruled)?, way(unruled)?);
            seen = format!("to {ruled} by {to_ruled}, to {unruled} by {to_unruled}");
            Ok(to_ruled == "isp2" && to_unruled == "isp1")
        },
    )
    .with_context(|| format!("the last try: {seen}"))?;
    for _ in 0..4 {
        let socket = client_socket(&lab, "router", ruled)?;
        let via = exchange(&socket, &servers, ruled)?;
        ensure!(
            via == "isp2",
            "the router's own UDP to {ruled} left by {via}"
        );
        let socket = client_socket(&lab, "router", unruled)?;
        let via = exchange(&socket, &servers, unruled)?;
        ensure!(
            via == "isp1",
            "the router's own UDP to {unruled} (no rule) left by {via}"
        );
    }
    let rules = lab.exec("router", &["ip", "rule", "show"])?;
    ensure!(
        rules.contains("fwmark 0x1000000/0xf000000"),
        "no policy rule: {rules}"
    );
    eprintln!("the router's own UDP: to {ruled} by isp2 (rule), to {unruled} by isp1");
    lbd.stop(&mut lab)?;
    leaks.check()
}
