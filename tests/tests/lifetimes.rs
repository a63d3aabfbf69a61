//! Lifetimes in a lab: idle UDP flows are collected after the configured
//! timeout, with their NAT mappings, and counted, while a flow that keeps
//! sending is not; and lbd itself stops cleanly, over and over.

use std::{net::SocketAddr, time::Duration};

use anyhow::{ensure, Context, Result};
use lb_tests::{
    daemon::{LabConfig, Lbd},
    require_root,
    stream::{wait_for, Sink, Stream},
    traffic::{udp_flows, UdpEchoServer},
    unique_prefix, Lab, LabDesc, LanLeaks,
};

const FLOWS: &str = "[flows]\nudp_timeout = \"1s\"";
/// A bound for what must happen, not a speed target.
const BOUND: Duration = Duration::from_secs(10);
/// The client port of the flow that keeps sending.
const KEPT: u16 = 7600;
/// How often it sends: a tenth of its timeout, so that it is never idle
/// for as long as the timeout.
const KEEP_PACE: Duration = Duration::from_millis(100);

/// Flows in the table (both uplinks) and flows collected so far, from
/// `lbctl status`; a missing counter fails.
fn flows_and_expired(lbd: &Lbd) -> Result<(u64, u64)> {
    let status = lbd.status()?;
    let expired = status["flows_expired"]
        .as_u64()
        .with_context(|| format!("no flows_expired in lbd's status: {status}"))?;
    let left = lbd.uplink_counter("isp1", "flows")? + lbd.uplink_counter("isp2", "flows")?;
    Ok((left, expired))
}

/// 50 UDP flows go idle beside one that keeps sending, one datagram a
/// tenth of the timeout: the idle ones are collected (and counted) and the
/// one that sends is not, keeping its uplink throughout; once it stops
/// sending, it is collected too.
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
    let sink = Sink::start(&lab)?;
    let kept = Stream::start(&lab, KEPT, KEEP_PACE)?;
    wait_for("the kept flow through", BOUND, || {
        Ok(sink.stream(KEPT).len() >= 3)
    })?;
    let server: SocketAddr = "198.51.100.10:7000".parse()?;
    let _udp = UdpEchoServer::start(lab.ns("inet")?, server)?;
    let flows = udp_flows(lab.ns("client")?, server, 50, Duration::from_secs(5))?;
    ensure!(
        flows.iter().all(|f| f.outcome.is_ok()),
        "some UDP flows failed"
    );
    let (pinned, expired_before) = flows_and_expired(&lbd)?;
    ensure!(
        pinned + expired_before >= 51,
        "{pinned} flows in the table and {expired_before} collected after 50 UDP flows and the kept one"
    );

    // The 50 go idle: collected, all of them, and only them.
    wait_for("the idle flows to be collected", BOUND, || {
        let (left, expired) = flows_and_expired(&lbd)?;
        Ok(left <= 1 && expired >= 50)
    })?;
    let (left, expired) = flows_and_expired(&lbd)?;
    let listed: serde_json::Value = serde_json::from_str(&lbd.lbctl(&["flows", "--json"])?)?;
    let clients: Vec<&str> = listed["flows"]
        .as_array()
        .context("no flows in lbctl flows --json")?
        .iter()
        .filter_map(|f| f["client"].as_str())
        .collect();
    eprintln!(
        "{expired} idle flows collected (timeout 1 s); left in the table: {clients:?}, the kept flow having sent {} datagrams",
        kept.sent()
    );
    ensure!(
        left == 1 && clients == [format!("10.10.0.2:{KEPT}")],
        "the flow that kept sending every {KEEP_PACE:?} is not the one left: {clients:?} ({left} flows in the table)"
    );
    ensure!(
        expired == 50,
        "{expired} flows collected, not the 50 idle ones: the kept flow was collected while it sent"
    );
    let via: Vec<[u8; 4]> = sink.stream(KEPT).iter().map(|&(_, _, a)| a).collect();
    ensure!(
        via.windows(2).all(|w| w[0] == w[1]),
        "the kept flow changed its source address: {via:?}"
    );

    // It stops sending: collected in turn.
    drop(kept);
    wait_for("the kept flow to be collected once idle", BOUND, || {
        let (left, expired) = flows_and_expired(&lbd)?;
        Ok(left == 0 && expired == 51)
    })?;
    leaks.check()?;
    lbd.stop(&mut lab)
}

/// How many times lbd is started and stopped.
const STOPS: usize = 20;

/// lbd is stopped 20 times, by SIGTERM (systemd's stop) and every fourth
/// time by SIGINT (Ctrl-C), each time after it answered, starting fresh
/// or adopting what its predecessor left: each time it exits with status
/// 0, and it never panics.
#[test]
fn lbd_stops_cleanly_on_sigterm_and_sigint_every_time() -> Result<()> {
    if !require_root("lbd_stops_cleanly_on_sigterm_and_sigint_every_time") {
        return Ok(());
    }
    let mut lab = Lab::up(&LabDesc::shipped("default")?, &unique_prefix())?;
    let leaks = LanLeaks::install(&lab)?;
    let config = LabConfig::default().render();
    let mut lbd = Lbd::start(&mut lab, &config)?;
    let mut unclean = Vec::new();
    for i in 0..STOPS {
        if i > 0 {
            lbd.restart(&mut lab)?;
        }
        let (signal, name) = if i % 4 == 3 {
            (libc::SIGINT, "SIGINT")
        } else {
            (libc::SIGTERM, "SIGTERM")
        };
        let ended = lbd.stop_with(&mut lab, signal)?;
        let panicked = ended.stderr.contains("panicked");
        if !ended.status.success() || panicked || !ended.stderr_complete {
            unclean.push(format!(
                "stop {} by {name}: exited with {}{}{}; it said:\n{}",
                i + 1,
                ended.status,
                if panicked { ", panicked" } else { "" },
                if ended.stderr_complete {
                    ""
                } else {
                    ", its stderr still open"
                },
                ended.stderr.trim()
            ));
        }
        // Every fifth run leaves nothing behind: the next one starts fresh
        // instead of adopting (and the last one cleans up).
        if i % 5 == 4 || i == STOPS - 1 {
            lbd.teardown(&lab)?;
        }
    }
    eprintln!("{} of {STOPS} stops were clean", STOPS - unclean.len());
    ensure!(
        unclean.is_empty(),
        "{} of {STOPS} stops were not clean:\n{}",
        unclean.len(),
        unclean.join("\n")
    );
    leaks.check()
}
