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
    traffic::{http_download, udp_flows, HttpFileServer, UdpEchoServer},
    unique_prefix, watch_flows, FlowWatch, Lab, LabDesc, LanLeaks,
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

/// A TCP download that runs while lbd is stopped and started: a 16 MB file
/// from the internet host, its sending side held to 40 Mbit/s so that it
/// lasts seconds. `finish` checks that every byte arrived, unchanged, on
/// one connection with one NAT source.
struct Download {
    thread: std::thread::JoinHandle<Result<u64>>,
    blob: std::path::PathBuf,
    got: std::path::PathBuf,
    watches: [FlowWatch; 2],
    _server: HttpFileServer,
}

const DOWNLOAD: u64 = 16 * 1024 * 1024;

impl Download {
    fn start(lab: &Lab) -> Result<Download> {
        for ifname in ["isp1", "isp2"] {
            lab.exec(
                "inet",
                &[
                    "tc", "qdisc", "replace", "dev", ifname, "root", "tbf", "rate", "40mbit",
                    "burst", "64kb", "latency", "1s",
                ],
            )?;
        }
        let dir = std::env::temp_dir();
        let blob = dir.join(format!("{}blob", lab.prefix()));
        let got = dir.join(format!("{}got", lab.prefix()));
        let mut random = std::fs::File::open("/dev/urandom")?;
        let mut file = std::fs::File::create(&blob)?;
        std::io::copy(&mut std::io::Read::take(&mut random, DOWNLOAD), &mut file)?;
        let server: std::net::SocketAddr = "198.51.100.10:8080".parse()?;
        let _server = HttpFileServer::start(lab.ns("inet")?, server, &blob)?;
        let watches = [
            watch_flows(lab, "isp1", "down0")?,
            watch_flows(lab, "isp2", "down0")?,
        ];
        let ns = lab.ns("client")?.to_owned();
        let dest = got.clone();
        let thread = std::thread::spawn(move || {
            http_download(&ns, server, "/blob", &dest, Duration::from_secs(60))
        });
        Ok(Download {
            thread,
            blob,
            got,
            watches,
            _server,
        })
    }

    fn finish(self) -> Result<()> {
        let length = self
            .thread
            .join()
            .map_err(|_| anyhow::anyhow!("the download thread panicked"))??;
        ensure!(length == DOWNLOAD, "{length} of {DOWNLOAD} bytes arrived");
        let same = std::fs::read(&self.got)? == std::fs::read(&self.blob)?;
        let _ = std::fs::remove_file(&self.got);
        let _ = std::fs::remove_file(&self.blob);
        ensure!(same, "the downloaded bytes differ from the file");
        // One connection, one NAT source: one (TCP, port) at one ISP.
        let tcp = flows_seen(&self.watches, 6)?;
        ensure!(
            tcp.iter().sum::<usize>() == 1,
            "the download's connection left as {tcp:?} TCP flows at (isp1, isp2)"
        );
        eprintln!("the 16 MB download completed byte-exact, on one NAT source");
        Ok(())
    }
}

/// How many flows of IP protocol `proto` each watch saw.
fn flows_seen(watches: &[FlowWatch], proto: u8) -> Result<Vec<usize>> {
    watches
        .iter()
        .map(|w| {
            w.seen_flows()
                .map(|f| f.iter().filter(|(p, _)| *p == proto).count())
        })
        .collect()
}

/// 40 new UDP flows from the client, every one answered, through both
/// uplinks.
fn new_flows_balanced(lab: &Lab) -> Result<()> {
    let watches = [
        watch_flows(lab, "isp1", "down0")?,
        watch_flows(lab, "isp2", "down0")?,
    ];
    let server: std::net::SocketAddr = "198.51.100.10:7300".parse()?;
    let _echo = UdpEchoServer::start(lab.ns("inet")?, server)?;
    let flows = udp_flows(lab.ns("client")?, server, 40, BOUND)?;
    ensure!(
        flows.iter().all(|f| f.outcome.is_ok()),
        "some new flows failed"
    );
    let seen = flows_seen(&watches, 17)?;
    eprintln!("40 new UDP flows: {seen:?} at (isp1, isp2)");
    ensure!(
        seen.iter().all(|&n| n > 0),
        "new flows were not balanced: {seen:?}"
    );
    Ok(())
}

/// The lbd just started adopted the data plane its predecessor pinned,
/// with at least the running streams' flows: its status says how many
/// flows it adopted, and its events say it adopted.
fn adopted_the_streams(lbd: &Lbd) -> Result<()> {
    let status = lbd.status()?;
    let adopted = status["adopted_flows"].as_u64().with_context(|| {
        format!(
            "the new lbd adopted no data plane (adopted_flows is {})",
            status["adopted_flows"]
        )
    })?;
    eprintln!("the new lbd adopted {adopted} flows");
    ensure!(
        adopted >= u64::from(STREAMS),
        "the new lbd adopted {adopted} flows, not the {STREAMS} running"
    );
    let events = lbd.lbctl(&["events"])?;
    ensure!(
        events.contains("adopted the pinned data plane"),
        "lbd's events do not say it adopted the pinned data plane:\n{events}"
    );
    Ok(())
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
    let download = Download::start(&lab)?;

    // SIGTERM, as `systemctl restart` and upgrades do.
    lbd.stop_keeping(&mut lab)?;
    running.still_flowing(&sink, 20, "while no lbd runs")?;
    // New flows too.
    port_on(&lab, &sink, [100, 64, 1, 2], 6600)?;
    lbd.restart(&mut lab)?;
    adopted_the_streams(&lbd)?;
    // The rules and routes its predecessor left are read as its own: no
    // round replaces them.
    lbd.wait_steady(3, BOUND)?;
    running.still_flowing(&sink, 20, "after the restart")?;
    download.finish()?;
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
    let download = Download::start(&lab)?;

    // SIGKILL, as a crash or the OOM killer.
    lbd.kill(&mut lab)?;
    running.still_flowing(&sink, 30, "after lbd was killed")?;
    new_flows_balanced(&lab)?;
    download.finish()?;
    leaks.check()?;
    lbd.restart(&mut lab)?;
    adopted_the_streams(&lbd)?;
    running.still_flowing(&sink, 10, "after lbd came back")?;
    drop(running);
    leaks.check()?;
    lbd.stop(&mut lab)
}

#[test]
fn a_restart_with_another_configuration_keeps_the_flows() -> Result<()> {
    if !require_root("a_restart_with_another_configuration_keeps_the_flows") {
        return Ok(());
    }
    let mut lab = Lab::up(&LabDesc::shipped("default")?, &unique_prefix())?;
    let leaks = LanLeaks::install(&lab)?;
    // isp1 alone first: every stream on it.
    let alone = LabConfig {
        uplinks: &[(1, "")],
        ..LabConfig::default()
    };
    let mut lbd = Lbd::start(&mut lab, &alone.render())?;
    let sink = Sink::start(&lab)?;
    let running = start_streams(&lab, &sink)?;
    lbd.stop_keeping(&mut lab)?;
    // Then isp1 with another weight, and isp2 added.
    let both = LabConfig {
        uplinks: &[(1, "weight = 3"), (2, "")],
        ..LabConfig::default()
    };
    lbd.restart_with(&mut lab, &both.render())?;
    running.still_flowing(&sink, 20, "after a restart with isp2 added")?;
    let status = lbd.status()?;
    ensure!(
        status["uplinks"][0]["weight"] == 3 && status["uplinks"][1]["lifecycle"] == "in service",
        "the new configuration is not applied: {status}"
    );
    new_flows_balanced(&lab)?;
    drop(running);
    leaks.check()?;
    lbd.stop(&mut lab)
}

/// The flow table's size is fixed when it is made: a restart with
/// another `[flows] max` makes new tables, and carries every flow over
/// with its mapping.
#[test]
fn a_restart_with_another_flows_max_resizes_the_tables_and_keeps_the_flows() -> Result<()> {
    if !require_root("a_restart_with_another_flows_max_resizes_the_tables_and_keeps_the_flows") {
        return Ok(());
    }
    let mut lab = Lab::up(&LabDesc::shipped("default")?, &unique_prefix())?;
    let leaks = LanLeaks::install(&lab)?;
    let small = LabConfig {
        sections: "[flows]\nmax = 4096\n",
        ..LabConfig::default()
    };
    let mut lbd = Lbd::start(&mut lab, &small.render())?;
    let sink = Sink::start(&lab)?;
    let running = start_streams(&lab, &sink)?;
    lbd.stop_keeping(&mut lab)?;
    let big = LabConfig {
        sections: "[flows]\nmax = 16384\n",
        ..LabConfig::default()
    };
    lbd.restart_with(&mut lab, &big.render())?;
    running.still_flowing(&sink, 20, "after a restart with a bigger flow table")?;
    let said = lbd.stderr();
    ensure!(
        said.contains("flow tables carried (tables of another [flows] max)"),
        "lbd did not say it carried the flow tables over"
    );
    let layout = std::fs::read_dir(lbd.bpffs())?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.is_dir())
        .context("no data plane directory under lbd's bpffs root")?;
    let table = layout.join("maps/FLOWS");
    let flows = lab.exec_net_only(
        "router",
        &[
            "bpftool",
            "map",
            "show",
            "pinned",
            table.to_str().context("path")?,
        ],
    )?;
    ensure!(
        flows.contains("max_entries 16384"),
        "the pinned flow table was not remade: {flows}"
    );
    drop(running);
    leaks.check()?;
    lbd.stop(&mut lab)
}

/// An upgrade to an lbd of the next layout (one that carries the flow
/// tables over): the data plane it finds is not its own, yet every flow
/// goes on with its mapping, and its links are taken over, not cut.
#[test]
fn an_upgrade_to_another_layout_keeps_the_flows() -> Result<()> {
    if !require_root("an_upgrade_to_another_layout_keeps_the_flows") {
        return Ok(());
    }
    let mut lab = Lab::up(&LabDesc::shipped("default")?, &unique_prefix())?;
    let leaks = LanLeaks::install(&lab)?;
    let mut lbd = Lbd::start(&mut lab, &LabConfig::default().render())?;
    let sink = Sink::start(&lab)?;
    let running = start_streams(&lab, &sink)?;
    lbd.stop_keeping(&mut lab)?;
    // As the lbd of the layout before would have left it.
    let ours = lbd.bpffs().join(format!("v{}", lb_common::maps::LAYOUT));
    let older = lbd
        .bpffs()
        .join(format!("v{}", lb_common::maps::MIGRATES_FROM[0].0));
    std::fs::rename(&ours, &older)?;
    // Its bypass tries had room for 256 prefixes (the programs running
    // keep theirs: only the pins are replaced). Keys: a prefix length and
    // an IPv4 or IPv6 address.
    for (name, key) in [("BYPASS", "8"), ("BYPASS6", "20")] {
        let trie = older.join("maps").join(name);
        std::fs::remove_file(&trie)?;
        let trie = trie.to_str().context("path")?;
        lab.exec_net_only(
            "router",
            &[
                "bpftool", "map", "create", trie, "type", "lpm_trie", "key", key, "value", "4",
                "entries", "256", "name", name, "flags", "1",
            ],
        )?;
    }
    lbd.restart(&mut lab)?;
    running.still_flowing(&sink, 20, "after the upgrade")?;
    ensure!(!older.exists(), "the older data plane was left in place");
    for trie in ["BYPASS", "BYPASS6"] {
        let pinned = ours.join("maps").join(trie);
        let shown = lab.exec_net_only(
            "router",
            &[
                "bpftool",
                "-j",
                "map",
                "show",
                "pinned",
                &pinned.to_string_lossy(),
            ],
        )?;
        let room: serde_json::Value = serde_json::from_str(&shown).context("bpftool's JSON")?;
        ensure!(
            room["max_entries"] == lb_common::BYPASS_ENTRIES,
            "{trie} kept the older layout's room: {shown}"
        );
    }
    ensure!(
        lbd.stderr()
            .contains("flow tables carried (the data plane of layout"),
        "lbd did not say it carried the flow tables over"
    );
    new_flows_balanced(&lab)?;
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
    // Beside a running lbd, a teardown is refused and removes nothing.
    let refused = lbd.run_teardown(&lab)?.refusal();
    ensure!(
        refused.contains("lbd is running"),
        "a teardown beside a running lbd: {refused:?}"
    );
    ensure!(pins.exists(), "a refused teardown removed the pins");
    lbd.status().context("lbd after a refused teardown")?;
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
