//! Flow lifetimes in a lab: idle UDP flows are collected after the
//! configured timeout, with their NAT mappings, and counted.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{ensure, Result};
use lb_tests::{
    daemon::{LabConfig, Lbd},
    require_root,
    traffic::{udp_flows, UdpEchoServer},
    unique_prefix, Lab, LabDesc, LanLeaks,
};

const FLOWS: &str = "[flows]\nudp_timeout = \"1s\"";

#[test]
fn idle_flows_are_collected_after_their_timeout() -> Result<()> {
    if !require_root("idle_flows_are_collected_after_their_timeout") {
        return Ok(());
    }
    let mut lab = Lab::up(&LabDesc::shipped("default")?, &unique_prefix())?;
    let leaks = LanLeaks::install(&lab)?;
    let config = LabConfig {
        sections: FLOWS,
        ..LabConfig::default()
    }
    .render();
    let lbd = Lbd::start(&mut lab, &config)?;
    let server: SocketAddr = "198.51.100.10:7000".parse()?;
    let _udp = UdpEchoServer::start(lab.ns("inet")?, server)?;
    let flows = udp_flows(lab.ns("client")?, server, 50, Duration::from_secs(5))?;
    ensure!(
        flows.iter().all(|f| f.outcome.is_ok()),
        "some UDP flows failed"
    );
    let pinned = lbd.uplink_counter("isp1", "flows")? + lbd.uplink_counter("isp2", "flows")?;
    ensure!(
        pinned >= 50,
        "only {pinned} flows in the table after 50 UDP flows"
    );

    let sent = Instant::now();
    let deadline = sent + Duration::from_secs(6);
    loop {
        let status = lbd.status()?;
        let left = lbd.uplink_counter("isp1", "flows")? + lbd.uplink_counter("isp2", "flows")?;
        let expired = status["flows_expired"].as_u64().unwrap_or(0);
        if left == 0 && expired >= 50 {
            eprintln!(
                "{expired} flows collected {:?} after the last packet (timeout 1 s)",
                sent.elapsed()
            );
            ensure!(
                sent.elapsed() >= Duration::from_secs(1),
                "flows collected before their timeout"
            );
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "flows not collected: {left} left, {expired} expired"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    leaks.check()?;
    lbd.stop(&mut lab)
}
