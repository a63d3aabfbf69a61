//! lb steering real connections in a lab (issue: walking skeleton).
//!
//! 200 TCP and 200 UDP flows from the client reach the internet host through
//! lbd's data plane and its NAT (the ISPs have no route to the LAN); nftables witnesses on the ISP side of each uplink say
//! which uplink carried which flow. With weights 1:1 and then 3:1 the split
//! must be within 10 percentage points of the weights, and the per-uplink
//! counters lbctl reports must agree with what the ISPs received.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{ensure, Result};
use lb_tests::{
    daemon::{LabConfig, Lbd},
    require_root,
    traffic::{tcp_flows, udp_flows, TcpEchoServer, UdpEchoServer},
    unique_prefix, watch_flows, Lab, LabDesc, LanLeaks,
};

const SERVER: &str = "198.51.100.10:7000";
const FLOWS_PER_PROTO: usize = 200;
const FLOW_TIMEOUT: Duration = Duration::from_secs(5);
/// How long in-flight packets get to arrive before counters must agree.
const SETTLE: Duration = Duration::from_secs(10);

fn config(weights: (u32, u32)) -> String {
    let (w1, w2) = (
        format!("weight = {}", weights.0),
        format!("weight = {}", weights.1),
    );
    LabConfig {
        uplinks: &[(1, &w1), (2, &w2)],
        ..LabConfig::default()
    }
    .render()
}

/// Run the flows with lbd at `weights`; check the split and the counters.
fn check_split(lab: &mut Lab, weights: (u32, u32)) -> Result<()> {
    let lbd = Lbd::start(lab, &config(weights))?;
    let watches = [
        watch_flows(lab, "isp1", "down0")?,
        watch_flows(lab, "isp2", "down0")?,
    ];
    // Receive counters: lb's (XDP on the uplink) against the interface's own,
    // both as differences from here on. Taken while nothing arrives (two
    // readings in a row the same), so that no packet can be counted by one
    // and not yet by the other: late packets of an earlier check would.
    let mut rx_base = rx_counters(lab, &lbd)?;
    let deadline = Instant::now() + SETTLE;
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let again = rx_counters(lab, &lbd)?;
        if again == rx_base {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the uplinks never went quiet before the flows: {rx_base:?}, then {again:?}"
        );
        rx_base = again;
    }

    let server: SocketAddr = SERVER.parse()?;
    let client = lab.ns("client")?.to_string();
    let mut flows = tcp_flows(&client, server, FLOWS_PER_PROTO, FLOW_TIMEOUT)?;
    flows.extend(udp_flows(&client, server, FLOWS_PER_PROTO, FLOW_TIMEOUT)?);
    let failed: Vec<_> = flows
        .iter()
        .filter(|f| f.outcome.is_err())
        .map(|f| f.flow())
        .collect();
    ensure!(
        failed.is_empty(),
        "{} of {} flows failed: {failed:?}",
        failed.len(),
        flows.len()
    );

    // Behind NAT the ISPs see each flow with its uplink's address and its
    // NAT port; on one uplink no two flows to one server share a port, so
    // the distinct (protocol, port) pairs an ISP saw are the flows it
    // carried, and together they must be all of them.
    let per_uplink = [
        watches[0].seen_flows()?.len(),
        watches[1].seen_flows()?.len(),
    ];
    ensure!(
        per_uplink[0] + per_uplink[1] == flows.len(),
        "the ISPs saw {per_uplink:?} flows, the client made {}",
        flows.len()
    );
    let share = per_uplink[0] as f64 / flows.len() as f64;
    let expected = f64::from(weights.0) / f64::from(weights.0 + weights.1);
    eprintln!("weights {weights:?}: flows per uplink {per_uplink:?}, isp1 share {share:.3} (expected {expected:.3})");
    ensure!(
        (share - expected).abs() <= 0.10,
        "isp1 carried {:.1}% of flows, weights {weights:?} ask for {:.1}%",
        share * 100.0,
        expected * 100.0
    );

    // lb's counters against the ISPs': every TCP/UDP packet XDP sent out of
    // an uplink arrived on that ISP's side, and nothing else did. The last
    // packets of closing TCP connections may still be on their way, so
    // compare until the two agree, within a bound.
    for (i, name) in ["isp1", "isp2"].iter().enumerate() {
        let deadline = Instant::now() + SETTLE;
        loop {
            let sent = lbd.uplink_counter(name, "tx_packets")?;
            let received = watches[i].packets()?;
            if sent == received && sent > 0 {
                eprintln!(
                    "{name}: lbctl tx_packets {sent} = ISP received {received} TCP/UDP packets"
                );
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "{name}: lbctl says {sent} packets sent, the ISP received {received}; status: {}",
                lbd.status()?
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let deadline = Instant::now() + SETTLE;
    loop {
        let now = rx_counters(lab, &lbd)?;
        let deltas: Vec<(u64, u64)> = now
            .iter()
            .zip(&rx_base)
            .map(|(n, b)| (n.0 - b.0, n.1 - b.1))
            .collect();
        if deltas.iter().all(|(lb, link)| lb == link) {
            eprintln!("received (lbctl rx_packets, interface rx_packets) per uplink: {deltas:?}");
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "rx counters disagree (lbctl, interface): {deltas:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    lbd.stop(lab)
}

/// (lbctl rx_packets, router interface rx_packets) for isp1 and isp2.
fn rx_counters(lab: &Lab, lbd: &Lbd) -> Result<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    for (name, ifname) in [("isp1", "wan1"), ("isp2", "wan2")] {
        out.push((
            lbd.uplink_counter(name, "rx_packets")?,
            lab.link_stats("router", ifname)?.rx_packets,
        ));
    }
    Ok(out)
}

#[test]
fn flows_spread_by_weight_and_counters_agree() -> Result<()> {
    if !require_root("flows_spread_by_weight_and_counters_agree") {
        return Ok(());
    }
    let mut lab = Lab::up(&LabDesc::shipped("default")?, &unique_prefix())?;
    let leaks = LanLeaks::install(&lab)?;
    let server: SocketAddr = SERVER.parse()?;
    let _tcp = TcpEchoServer::start(lab.ns("inet")?, server)?;
    let _udp = UdpEchoServer::start(lab.ns("inet")?, server)?;
    check_split(&mut lab, (1, 1))?;
    check_split(&mut lab, (3, 1))?;
    leaks.check()
}
