//! The data plane outlives the daemon: a restart or a crash of lbd breaks no
//! connection and leaks nothing, a new lbd adopts what the old one pinned,
//! and `lbd --teardown` removes it all.
//!
//! Twelve numbered UDP streams run through the lab the whole time (see
//! `lb_tests::stream`); what is judged is what the internet host received:
//! every datagram, each stream from one address throughout.

use std::{collections::BTreeMap, net::Ipv4Addr, path::Path, time::Duration};

use anyhow::{ensure, Context, Result};
use lb_tests::{
    daemon::{LabConfig, Lbd},
    require_root,
    stream::{lost_before, port_on, wait_for, Sink, Stream},
    unique_prefix, Lab, LabDesc, LanLeaks,
};

const PACE: Duration = Duration::from_millis(10);
const STREAMS: u16 = 12;
const FIRST_PORT: u16 = 5600;
/// A bound for a test that must end, not a speed target.
const BOUND: Duration = Duration::from_secs(15);

struct Running {
    streams: Vec<Stream>,
    /// Each stream's source address at the internet host.
    via: BTreeMap<u16, [u8; 4]>,
}

/// Start the streams and wait until each has arrived a few times.
fn start_streams(lab: &Lab, sink: &Sink) -> Result<Running> {
    let streams = (FIRST_PORT..FIRST_PORT + STREAMS)
        .map(|port| Stream::start(lab, port, PACE))
        .collect::<Result<Vec<_>>>()?;
    wait_for("every stream through", BOUND, || {
        Ok(streams.iter().all(|s| sink.stream(s.port()).len() >= 10))
    })?;
    let via = streams
        .iter()
        .map(|s| (s.port(), sink.stream(s.port())[0].2))
        .collect();
    Ok(Running { streams, via })
}

impl Running {
    /// Wait until every stream has `more` new arrivals, then check that
    /// each still comes from its first address and lost nothing.
    fn still_flowing(&self, sink: &Sink, more: usize, when: &str) -> Result<()> {
        let before: Vec<usize> = self
            .streams
            .iter()
            .map(|s| sink.stream(s.port()).len())
            .collect();
        wait_for(&format!("the streams {when}"), BOUND, || {
            Ok(self
                .streams
                .iter()
                .zip(&before)
                .all(|(s, &b)| sink.stream(s.port()).len() >= b + more))
        })?;
        for s in &self.streams {
            let want = self.via[&s.port()];
            let moved: Vec<Ipv4Addr> = sink
                .stream(s.port())
                .iter()
                .filter(|&&(_, _, a)| a != want)
                .map(|&(_, _, a)| Ipv4Addr::from(a))
                .collect();
            ensure!(
                moved.is_empty(),
                "{when}: stream {} came from {moved:?}, not only {}",
                s.port(),
                Ipv4Addr::from(want)
            );
            let lost = lost_before(sink, s, s.sent().saturating_sub(5))?;
            ensure!(
                lost.is_empty(),
                "{when}: stream {} lost {} datagrams",
                s.port(),
                lost.len()
            );
        }
        Ok(())
    }
}

#[test]
fn a_restart_keeps_every_flow_with_its_mapping_and_loses_nothing() -> Result<()> {
    if !require_root("a_restart_keeps_every_flow_with_its_mapping_and_loses_nothing") {
        return Ok(());
    }
    let mut lab = Lab::up(&LabDesc::shipped("default")?, &unique_prefix())?;
    let leaks = LanLeaks::install(&lab)?;
    let mut lbd = Lbd::start(&mut lab, &LabConfig::default().render())?;
    let sink = Sink::start(&lab)?;
    let running = start_streams(&lab, &sink)?;

    // SIGTERM, as `systemctl restart` and upgrades do.
    lbd.stop_keeping(&mut lab)?;
    running.still_flowing(&sink, 20, "while no lbd runs")?;
    // New flows too.
    port_on(&lab, &sink, [100, 64, 1, 2], 6600)?;
    lbd.restart(&mut lab)?;
    let adopted = lbd.status()?["adopted_flows"].as_u64().unwrap_or(0);
    eprintln!("the new lbd adopted {adopted} flows");
    ensure!(
        adopted >= u64::from(STREAMS),
        "the new lbd adopted {adopted} flows, not the {STREAMS} running"
    );
    running.still_flowing(&sink, 20, "after the restart")?;
    drop(running);
    leaks.check()?;
    lbd.stop(&mut lab)
}

#[test]
fn a_killed_lbd_leaves_forwarding_and_nothing_leaks() -> Result<()> {
    if !require_root("a_killed_lbd_leaves_forwarding_and_nothing_leaks") {
        return Ok(());
    }
    let mut lab = Lab::up(&LabDesc::shipped("default")?, &unique_prefix())?;
    let leaks = LanLeaks::install(&lab)?;
    let mut lbd = Lbd::start(&mut lab, &LabConfig::default().render())?;
    let sink = Sink::start(&lab)?;
    let running = start_streams(&lab, &sink)?;

    // SIGKILL, as a crash or the OOM killer.
    lbd.kill(&mut lab)?;
    running.still_flowing(&sink, 30, "after lbd was killed")?;
    port_on(&lab, &sink, [100, 64, 1, 2], 6700)?;
    leaks.check()?;
    lbd.restart(&mut lab)?;
    running.still_flowing(&sink, 10, "after lbd came back")?;
    drop(running);
    leaks.check()?;
    lbd.stop(&mut lab)
}

#[test]
fn teardown_removes_everything_and_another_layout_is_replaced() -> Result<()> {
    if !require_root("teardown_removes_everything_and_another_layout_is_replaced") {
        return Ok(());
    }
    let mut lab = Lab::up(&LabDesc::shipped("default")?, &unique_prefix())?;
    let pins = Path::new("/sys/fs/bpf").join(format!("{}lb", lab.prefix()));
    // A data plane of another layout (v0) with one flow, as an older lbd
    // would have left it.
    let old = pins.join("v0/maps");
    std::fs::create_dir_all(&old)?;
    let flows = old.join("FLOWS");
    let flows = flows.to_str().context("path")?;
    // With the host's bpffs (`ip netns exec` would mount a /sys of its own).
    lab.exec_net_only(
        "router",
        &[
            "bpftool", "map", "create", flows, "type", "lru_hash", "key", "16", "value", "16",
            "entries", "16", "name", "FLOWS",
        ],
    )?;
    let zeros: Vec<&str> = std::iter::repeat_n("0", 16).collect();
    let mut update = vec!["bpftool", "map", "update", "pinned", flows, "key"];
    update.extend(&zeros);
    update.push("value");
    update.extend(&zeros);
    lab.exec_net_only("router", &update)?;

    let lbd = Lbd::start(&mut lab, &LabConfig::default().render())?;
    ensure!(
        !pins.join("v0").exists(),
        "the data plane of another layout is still pinned"
    );
    ensure!(
        lbd.status()?["adopted_flows"].is_null(),
        "lbd adopted a data plane of another layout"
    );
    lbd.stop_keeping(&mut lab)?;
    ensure!(
        lab.exec("router", &["ip", "link", "show", "dev", "wan1"])?
            .contains("xdp"),
        "the data plane did not outlive lbd"
    );
    let said = lbd.teardown(&lab)?;
    eprintln!("{said}");
    ensure!(!pins.exists(), "{} is still there", pins.display());
    for ifname in ["wan1", "wan2", "lan0"] {
        let shown = lab.exec("router", &["ip", "link", "show", "dev", ifname])?;
        ensure!(!shown.contains("xdp"), "XDP still on {ifname}: {shown}");
    }
    let rules = lab.exec("router", &["ip", "rule", "show"])?;
    ensure!(!rules.contains("proto 251"), "lbd's rules left: {rules}");
    let routes = lab.exec(
        "router",
        &["ip", "route", "show", "table", "all", "proto", "251"],
    )?;
    ensure!(routes.trim().is_empty(), "lbd's routes left: {routes}");
    ensure!(
        lab.exec("router", &["nft", "list", "table", "ip", "lb"])
            .is_err(),
        "lbd's nftables table is left"
    );
    Ok(())
}
