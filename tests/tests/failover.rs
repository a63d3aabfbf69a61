//! Failover, recovery and operator toggles, with real traffic (issue:
//! health probes, failover and operator toggles).
//!
//! A client sends numbered UDP datagrams at 100 per second on flows pinned
//! to one uplink; a sink on the internet host records which sequence
//! numbers arrived, when, and from which uplink address (the NAT source):
//! see `lb_tests::stream`. Uplinks fail by cutting the ISP's link to the
//! internet while its gateway still answers (the case Netwatch-style probes
//! exist for).

use std::{
    thread,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use lb_tests::{
    daemon::{LabConfig, Lbd},
    require_root,
    stream::{lost_before, outage, port_on, wait_for, Outage, Sink, Stream},
    unique_prefix, watch_flows, Lab, LabDesc, LanLeaks,
};

const ISP1_NAT: [u8; 4] = [100, 64, 1, 2];
const ISP2_NAT: [u8; 4] = [100, 64, 2, 2];
const PACE: Duration = Duration::from_millis(10);
/// How long to wait for something that must happen: a bound for a test
/// that must end, not a speed target (the benchmark measures speed).
const BOUND: Duration = Duration::from_secs(10);

/// Both uplinks, each probing the internet host with ICMP; `extra_*` go
/// into each uplink's table, `hooks` into `[daemon]`.
fn config(extra_uplink1: &str, extra_uplink2: &str, hooks: &str) -> String {
    const PROBE: &str = "[[uplink.probe]]\nkind = \"icmp\"\ntarget = \"198.51.100.10\"";
    let (u1, u2) = (
        format!("{extra_uplink1}\n{PROBE}"),
        format!("{extra_uplink2}\n{PROBE}"),
    );
    LabConfig {
        daemon: hooks,
        uplinks: &[(1, &u1), (2, &u2)],
        ..LabConfig::default()
    }
    .render()
}

#[test]
fn upstream_failure_moves_only_the_dead_uplinks_flows_and_recovers() -> Result<()> {
    if !require_root("upstream_failure_moves_only_the_dead_uplinks_flows_and_recovers") {
        return Ok(());
    }
    let mut lab = Lab::up(&LabDesc::shipped("default")?, &unique_prefix())?;
    let leaks = LanLeaks::install(&lab)?;
    let hook_out = std::env::temp_dir().join(format!("{}hook.env", lab.prefix()));
    let hooks = format!(
        r#"hooks = [["/bin/sh", "-c", "env | grep ^LB_ >> {}"]]"#,
        hook_out.display()
    );
    // The defaults: a probe a second, and the traffic listened to. The
    // streams are answered (two-way, as calls are), so that the traffic
    // has something to say.
    let lbd = Lbd::start(&mut lab, &config("", "", &hooks))?;
    let sink = Sink::start_echoing(&lab)?;
    let p1 = port_on(&lab, &sink, ISP1_NAT, 5000)?;
    let p2 = port_on(&lab, &sink, ISP2_NAT, 5100)?;
    let (s1, s2) = (
        Stream::start(&lab, p1, PACE)?,
        Stream::start(&lab, p2, PACE)?,
    );
    wait_for("both streams flowing", BOUND, || {
        Ok(sink.stream(p1).len() > 20 && sink.stream(p2).len() > 20)
    })?;

    // Cut isp1 from the internet; its gateway still answers ARP and ping.
    let cut = Instant::now();
    lab.set_link_up("isp1", "up0", false)?;
    judge_failover(&lbd, &sink, &s1, &s2, cut, "upstream failure")?;
    let status = lbd.status()?;
    ensure!(
        status["uplinks"][0]["health"] == "down",
        "isp1 not down: {status}"
    );
    // Found by the traffic and confirmed by a burst, not by 3 s of probes.
    let reason = status["uplinks"][0]["reason"].as_str().unwrap_or("");
    ensure!(
        reason.contains("no replies from") && reason.contains("probes answered"),
        "isp1 went down for another reason: {reason}"
    );

    // Recovery: after the hold-down (10 s) and `rise` good rounds (5 s), new
    // flows use isp1 again; the moved flow stays on isp2.
    lab.set_link_up("isp1", "up0", true)?;
    wait_for("isp1 up again", Duration::from_secs(30), || {
        Ok(lbd.status()?["uplinks"][0]["health"] == "up")
    })?;
    let before = sink.stream(p1).len();
    wait_for("more of the moved stream", BOUND, || {
        Ok(sink.stream(p1).len() > before + 20)
    })?;
    ensure!(
        sink.stream(p1)
            .iter()
            .skip(before)
            .all(|&(_, _, a)| a == ISP2_NAT),
        "the moved flow went back to isp1"
    );
    let fresh = port_on(&lab, &sink, ISP1_NAT, 5200)?;
    eprintln!("after recovery, new flow from port {fresh} uses isp1");
    drop((s1, s2));

    // The hook saw both transitions with their context.
    wait_for("hook output", BOUND, || {
        Ok(std::fs::read_to_string(&hook_out)
            .is_ok_and(|t| t.matches("LB_UPLINK=isp1").count() >= 2))
    })?;
    let env = std::fs::read_to_string(&hook_out)?;
    let _ = std::fs::remove_file(&hook_out);
    for needle in [
        "LB_STATE=down",
        "LB_PREVIOUS_STATE=up",
        "LB_STATE=up",
        "LB_INTERFACE=wan1",
        "LB_REASON=",
        "LB_LOSS_PERCENT=",
    ] {
        ensure!(
            env.contains(needle),
            "hook environment lacks {needle}: {env}"
        );
    }
    leaks.check()?;
    lbd.stop(&mut lab)
}

#[test]
fn flapping_upstream_gives_few_transitions() -> Result<()> {
    if !require_root("flapping_upstream_gives_few_transitions") {
        return Ok(());
    }
    let mut lab = Lab::up(&LabDesc::shipped("default")?, &unique_prefix())?;
    let leaks = LanLeaks::install(&lab)?;
    // isp1 comes back only after 40 good rounds (2 s): the flaps' up times
    // (300 ms, plus however long a busy machine takes to run `ip`) stay far
    // below that, so what is judged is the hysteresis, not the clock.
    let fast = "[uplink.health]\ninterval = \"50ms\"\ntimeout = \"150ms\"\nrise = 40";
    let lbd = Lbd::start(&mut lab, &config(fast, "", ""))?;
    let sink = Sink::start(&lab)?;
    let p2 = port_on(&lab, &sink, ISP2_NAT, 5300)?;
    let s2 = Stream::start(&lab, p2, PACE)?;
    let before = lbd.uplink_counter("isp1", "transitions")?;
    let end = Instant::now() + Duration::from_secs(10);
    let mut up = true;
    while Instant::now() < end {
        up = !up;
        lab.set_link_up("isp1", "up0", up)?;
        thread::sleep(Duration::from_millis(300));
    }
    lab.set_link_up("isp1", "up0", true)?;
    let flips = lbd.uplink_counter("isp1", "transitions")? - before;
    let Outage { lost: lost2, .. } = outage(&sink, &s2, ISP2_NAT);
    eprintln!(
        "flapping every 300 ms for 10 s: {flips} transitions of isp1; isp2 stream lost {lost2}"
    );
    ensure!(
        flips >= 1,
        "isp1 never went down while its upstream was down half the time: health did not notice"
    );
    ensure!(flips <= 4, "{flips} transitions: no hysteresis");
    ensure!(lost2 == 0, "isp2 stream lost {lost2}");
    drop(s2);
    leaks.check()?;
    lbd.stop(&mut lab)
}

#[test]
fn operator_toggles_and_tiers_act_in_the_data_plane() -> Result<()> {
    if !require_root("operator_toggles_and_tiers_act_in_the_data_plane") {
        return Ok(());
    }
    let mut lab = Lab::up(&LabDesc::shipped("default")?, &unique_prefix())?;
    let leaks = LanLeaks::install(&lab)?;
    // isp2 is a backup: tier 1.
    let lbd = Lbd::start(&mut lab, &config("", "tier = 1", ""))?;
    let sink = Sink::start(&lab)?;
    let watch2 = watch_flows(&lab, "isp2", "down0")?;
    // Tiers: every new flow takes the primary while it is up.
    for port in 6000..6020 {
        ensure!(
            port_on(&lab, &sink, ISP1_NAT, port)? == port,
            "flow {port} went to the backup tier"
        );
    }
    ensure!(
        watch2.seen_flows()?.is_empty(),
        "the backup carried flows while the primary was up"
    );

    // Disable isp1: a running stream moves to isp2 within 100 ms.
    let s = Stream::start(&lab, 6100, PACE)?;
    wait_for("stream on isp1", BOUND, || Ok(sink.stream(6100).len() > 5))?;
    let t0 = Instant::now();
    lbd.lbctl(&["uplink", "disable", "isp1"])?;
    wait_for("stream on isp2", BOUND, || {
        Ok(sink.stream(6100).iter().any(|&(_, _, a)| a == ISP2_NAT))
    })?;
    eprintln!(
        "disable: stream on isp2 {:?} after the command",
        t0.elapsed()
    );
    ensure!(lbd.status()?["uplinks"][0]["state"] == "down");
    // With the primary out, the backup takes every new flow.
    ensure!(
        port_on(&lab, &sink, ISP2_NAT, 6200)? == 6200,
        "backup tier did not take over"
    );

    // Enable, then drain: the running flow (now on isp2) is untouched; new
    // flows avoid a drained uplink.
    lbd.lbctl(&["uplink", "enable", "isp1"])?;
    lbd.lbctl(&["uplink", "drain", "isp2"])?;
    let before = sink.stream(6100).len();
    wait_for("stream continues", BOUND, || {
        Ok(sink.stream(6100).len() > before + 10)
    })?;
    ensure!(
        sink.stream(6100)
            .iter()
            .skip(before)
            .all(|&(_, _, a)| a == ISP2_NAT),
        "drain moved an existing flow"
    );
    ensure!(
        port_on(&lab, &sink, ISP1_NAT, 6300)? == 6300,
        "a new flow went to the drained uplink"
    );
    drop(s);

    // Weight, and the refusals.
    lbd.lbctl(&["uplink", "enable", "isp2"])?;
    lbd.lbctl(&["uplink", "weight", "isp1", "7"])?;
    ensure!(lbd.status()?["uplinks"][0]["weight"] == 7);
    // lbd refuses (exit 1) what it cannot do; lbctl refuses (exit 2) what
    // is no command; each says why.
    for (bad, code, says) in [
        (
            &["uplink", "disable", "nope"][..],
            1,
            "no uplink named \"nope\"",
        ),
        (
            &["uplink", "weight", "isp1", "0"],
            2,
            "0 is not in 1..=1000",
        ),
        (&["uplink", "weight", "isp1", "x"], 2, "invalid value 'x'"),
    ] {
        let (got, said) = lbd.lbctl_refused(bad)?;
        ensure!(
            got == code && said.contains(says),
            "lbctl {bad:?}: exit {got} (wanted {code}), said {said:?} (wanted {says:?})"
        );
    }
    leaks.check()?;
    lbd.stop(&mut lab)
}

#[test]
fn carrier_loss_fails_over_at_once() -> Result<()> {
    if !require_root("carrier_loss_fails_over_at_once") {
        return Ok(());
    }
    let mut lab = Lab::up(&LabDesc::shipped("default")?, &unique_prefix())?;
    let leaks = LanLeaks::install(&lab)?;
    let lbd = Lbd::start(&mut lab, &config("", "", ""))?;
    let sink = Sink::start(&lab)?;
    let p1 = port_on(&lab, &sink, ISP1_NAT, 5400)?;
    let p2 = port_on(&lab, &sink, ISP2_NAT, 5450)?;
    let (s1, s2) = (
        Stream::start(&lab, p1, PACE)?,
        Stream::start(&lab, p2, PACE)?,
    );
    wait_for("both streams flowing", BOUND, || {
        Ok(sink.stream(p1).len() > 20 && sink.stream(p2).len() > 20)
    })?;
    // The ISP's end goes away: the router's wan1 loses its carrier.
    let cut = Instant::now();
    lab.set_link_up("isp1", "down0", false)?;
    judge_failover(&lbd, &sink, &s1, &s2, cut, "carrier loss")?;
    let status = lbd.status()?;
    ensure!(
        status["uplinks"][0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("carrier")),
        "isp1 went down for another reason: {}",
        status["uplinks"][0]["reason"]
    );
    drop((s1, s2));
    lab.set_link_up("isp1", "down0", true)?;
    leaks.check()?;
    lbd.stop(&mut lab)
}

/// Judge a failover of isp1, cut at `cut`, by cause and effect rather than
/// by the clock: the `moved` stream (on isp1) ends up on isp2 and stays
/// there; every datagram it lost was sent before the data plane had isp1
/// down (as lbd reports the moment); and the `kept` stream (on isp2) loses
/// nothing. How many were lost and how long it took is printed, not judged:
/// that is the benchmark's business.
fn judge_failover(
    lbd: &Lbd,
    sink: &Sink,
    moved: &Stream,
    kept: &Stream,
    cut: Instant,
    what: &str,
) -> Result<()> {
    let port = moved.port();
    wait_for(
        "the isp1 stream through isp2",
        Duration::from_secs(10),
        || Ok(sink.stream(port).iter().any(|&(_, _, a)| a == ISP2_NAT)),
    )?;
    let mut applied = None;
    wait_for("lbd to report isp1 down", Duration::from_secs(10), || {
        if lbd.status()?["uplinks"][0]["health"] != "down" {
            return Ok(false);
        }
        applied = lbd.changed_at("isp1")?;
        Ok(applied.is_some())
    })?;
    let applied = applied.context("lbd reported no change of isp1")?;
    ensure!(applied >= cut, "lbd's last change of isp1 predates the cut");

    // Count up to a little past the datagrams sent by now, all after the
    // change: every one of those must have arrived.
    let lost = lost_before(sink, moved, moved.sent() + 10)?;
    let late: Vec<u32> = lost
        .iter()
        .filter(|&&(_, sent)| sent > applied)
        .map(|&(seq, _)| seq)
        .collect();
    ensure!(
        late.is_empty(),
        "{what}: datagrams {late:?} were sent after the data plane had isp1 down, and lost"
    );
    let arrivals = sink.stream(port);
    let first_moved = arrivals
        .iter()
        .position(|&(_, _, a)| a == ISP2_NAT)
        .context("no datagram through isp2")?;
    ensure!(
        arrivals[first_moved..]
            .iter()
            .all(|&(_, _, a)| a == ISP2_NAT),
        "{what}: the moved stream went back to isp1"
    );
    let kept_lost = lost_before(sink, kept, kept.sent() + 10)?;
    ensure!(
        kept_lost.is_empty(),
        "{what}: the isp2 stream lost {} datagrams",
        kept_lost.len()
    );
    let gap = arrivals[first_moved].1.saturating_duration_since(cut);
    eprintln!(
        "{what}: the isp1 stream lost {} datagrams, all sent before the data plane changed {:?} after the cut; through isp2 {gap:?} after the cut; the isp2 stream lost none",
        lost.len(),
        applied - cut
    );
    Ok(())
}

#[test]
fn a_gateway_that_moves_to_another_mac_is_followed() -> Result<()> {
    if !require_root("a_gateway_that_moves_to_another_mac_is_followed") {
        return Ok(());
    }
    // isp1 swaps its router: same address, another Ethernet address,
    // announced with a gratuitous ARP, as routers and VRRP pairs do.
    const NEW_MAC: &str = "02:00:5e:00:01:99";
    let mut lab = Lab::up(&LabDesc::shipped("default")?, &unique_prefix())?;
    let leaks = LanLeaks::install(&lab)?;
    // No probes: health stays up, so only following the neighbour table
    // can bring the stream back through isp1.
    let lbd = Lbd::start(&mut lab, &LabConfig::default().render())?;
    let sink = Sink::start(&lab)?;
    let p1 = port_on(&lab, &sink, ISP1_NAT, 5500)?;
    let s1 = Stream::start(&lab, p1, PACE)?;
    wait_for("the stream flowing", BOUND, || {
        Ok(sink.stream(p1).len() > 20)
    })?;

    lab.exec(
        "isp1",
        &["ip", "link", "set", "dev", "down0", "address", NEW_MAC],
    )?;
    let before = sink.stream(p1).len();
    let announced = Instant::now();
    lab.exec(
        "isp1",
        &["arping", "-q", "-U", "-c", "1", "-I", "down0", "100.64.1.1"],
    )?;
    let arping = announced.elapsed();
    wait_for("the stream through isp1's new MAC", BOUND, || {
        Ok(sink.stream(p1).len() > before + 20)
    })?;
    eprintln!(
        "gateway moved to {NEW_MAC}: 20 more datagrams through isp1 {:?} after arping started (arping itself took {arping:?})",
        announced.elapsed()
    );
    ensure!(
        sink.stream(p1)
            .iter()
            .skip(before)
            .all(|&(_, _, a)| a == ISP1_NAT),
        "the stream left isp1"
    );
    let status = lbd.status()?;
    ensure!(
        status["uplinks"][0]["gateway_mac"] == NEW_MAC,
        "status shows gateway MAC {}",
        status["uplinks"][0]["gateway_mac"]
    );
    drop(s1);
    leaks.check()?;
    lbd.stop(&mut lab)
}

#[test]
fn an_uplink_down_when_lbd_restarts_stays_out_until_its_probes_say_otherwise() -> Result<()> {
    if !require_root("an_uplink_down_when_lbd_restarts_stays_out_until_its_probes_say_otherwise") {
        return Ok(());
    }
    let mut lab = Lab::up(&LabDesc::shipped("default")?, &unique_prefix())?;
    let leaks = LanLeaks::install(&lab)?;
    let mut lbd = Lbd::start(&mut lab, &config("", "", ""))?;
    for name in ["isp1", "isp2"] {
        lbd.wait_lifecycle(name, "in service", BOUND)?;
    }
    // isp2's line dies upstream, and lbd notices.
    lab.set_link_up("isp2", "up0", false)?;
    wait_for("isp2 out of service", BOUND, || {
        Ok(lbd.uplink("isp2")?["lifecycle"] != "in service")
    })?;
    // An upgrade restarts lbd meanwhile: the new one adopts a data plane
    // with isp2 down, and must not send new flows there until its probes
    // say it works (they cannot: it is still dead).
    lbd.stop_keeping(&mut lab)?;
    lbd.restart(&mut lab)?;
    let watched = Instant::now();
    let mut seen = Vec::new();
    // Longer than the fall rounds (3 of a second) that an optimistic
    // start would take to find the line dead again.
    while watched.elapsed() < Duration::from_secs(4) {
        let isp2 = lbd.uplink("isp2")?;
        if isp2["lifecycle"] == "in service" {
            seen.push(format!("{:?}: {}", watched.elapsed(), isp2["reason"]));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    ensure!(
        seen.is_empty(),
        "isp2, dead when lbd restarted, was in service after it: {seen:?}"
    );
    // The line comes back: in service after its good rounds.
    lab.set_link_up("isp2", "up0", true)?;
    lbd.wait_lifecycle("isp2", "in service", Duration::from_secs(30))?;
    leaks.check()?;
    lbd.stop(&mut lab)
}
