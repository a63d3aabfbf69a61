//! Failover, recovery and operator toggles, with real traffic (issue:
//! health probes, failover and operator toggles).
//!
//! A client sends numbered UDP datagrams at 100 per second on flows pinned
//! to one uplink; a sink on the internet host records which sequence
//! numbers arrived, when, and from which uplink address (the NAT source).
//! Uplinks fail by cutting the ISP's link to the internet while its gateway
//! still answers (the case Netwatch-style probes exist for).

use std::{
    collections::BTreeMap,
    net::{SocketAddr, UdpSocket},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use lb_tests::{
    daemon::{LabConfig, Lbd},
    in_netns, require_root, unique_prefix, watch_flows, Lab, LabDesc,
};

const SINK: &str = "198.51.100.10:9000";
const ISP1_NAT: [u8; 4] = [100, 64, 1, 2];
const ISP2_NAT: [u8; 4] = [100, 64, 2, 2];
const PACE: Duration = Duration::from_millis(10);
/// Sequence number of the one-datagram probes that find a port's uplink.
const PROBE_SEQ: u32 = u32::MAX;

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

/// What the sink saw: per sequence number, when and from which address.
type Arrivals = Arc<Mutex<BTreeMap<(u16, u32), (Instant, [u8; 4])>>>;

/// Receives datagrams `[client port: u16][seq: u32]` on the internet host.
struct Sink {
    arrivals: Arrivals,
    stop: Arc<AtomicBool>,
}

impl Sink {
    fn start(lab: &Lab) -> Result<Sink> {
        let addr: SocketAddr = SINK.parse()?;
        let socket = in_netns(lab.ns("inet")?, || Ok(UdpSocket::bind(addr)?))?;
        socket.set_read_timeout(Some(Duration::from_millis(50)))?;
        let arrivals: Arrivals = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (a, s) = (arrivals.clone(), stop.clone());
        thread::spawn(move || {
            let mut buf = [0u8; 64];
            while !s.load(Ordering::Relaxed) {
                let Ok((n, from)) = socket.recv_from(&mut buf) else {
                    continue;
                };
                let (SocketAddr::V4(from), 6) = (from, n) else {
                    continue;
                };
                let port = u16::from_be_bytes([buf[0], buf[1]]);
                let seq = u32::from_be_bytes([buf[2], buf[3], buf[4], buf[5]]);
                if let Ok(mut m) = a.lock() {
                    m.insert((port, seq), (Instant::now(), from.ip().octets()));
                }
            }
        });
        Ok(Sink { arrivals, stop })
    }

    /// (sequence number, arrival, source address) of every datagram of the
    /// stream from client port `port`, in sequence order.
    fn stream(&self, port: u16) -> Vec<(u32, Instant, [u8; 4])> {
        let m = self.arrivals.lock().map(|m| m.clone()).unwrap_or_default();
        m.range((port, 0)..(port, PROBE_SEQ))
            .map(|(&(_, seq), &(t, a))| (seq, t, a))
            .collect()
    }

    /// The source address the probe datagram from `port` arrived with.
    fn probe_via(&self, port: u16) -> Option<[u8; 4]> {
        self.arrivals
            .lock()
            .ok()?
            .get(&(port, PROBE_SEQ))
            .map(|&(_, a)| a)
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A client stream at 100 datagrams per second from one source port.
struct Stream {
    port: u16,
    sent: Arc<Mutex<Vec<Instant>>>,
    stop: Arc<AtomicBool>,
}

impl Stream {
    fn start(lab: &Lab, port: u16) -> Result<Stream> {
        let socket = in_netns(lab.ns("client")?, || {
            Ok(UdpSocket::bind(("10.10.0.2", port))?)
        })?;
        let to: SocketAddr = SINK.parse()?;
        let sent: Arc<Mutex<Vec<Instant>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (sent2, stop2) = (sent.clone(), stop.clone());
        thread::spawn(move || {
            let start = Instant::now();
            let mut seq: u32 = 0;
            while !stop2.load(Ordering::Relaxed) {
                let mut msg = [0u8; 6];
                msg[..2].copy_from_slice(&port.to_be_bytes());
                msg[2..].copy_from_slice(&seq.to_be_bytes());
                let _ = socket.send_to(&msg, to);
                if let Ok(mut s) = sent2.lock() {
                    s.push(Instant::now());
                }
                seq += 1;
                // Paced against the start, so a late wake-up does not slow
                // the stream down.
                let next = start + PACE * seq;
                thread::sleep(next.saturating_duration_since(Instant::now()));
            }
        });
        Ok(Stream { port, sent, stop })
    }

    /// Send time of datagram `seq`.
    fn sent_at(&self, seq: u32) -> Option<Instant> {
        self.sent.lock().ok()?.get(seq as usize).copied()
    }

    fn sent(&self) -> u32 {
        self.sent.lock().map(|s| s.len() as u32).unwrap_or(0)
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Wait (bounded) until `f` holds.
fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + limit;
    while !f()? {
        ensure!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Find a client port (outside the router's ephemeral range, so NAT keeps
/// it) whose flow lbd steers to the uplink with NAT address `want`, using
/// one-datagram probes the sink records.
fn port_on(lab: &Lab, sink: &Sink, want: [u8; 4], from: u16) -> Result<u16> {
    for port in from..from + 64 {
        let socket = in_netns(lab.ns("client")?, || {
            Ok(UdpSocket::bind(("10.10.0.2", port))?)
        })?;
        let mut msg = [0u8; 6];
        msg[..2].copy_from_slice(&port.to_be_bytes());
        msg[2..].copy_from_slice(&PROBE_SEQ.to_be_bytes());
        socket.send_to(&msg, SINK)?;
        let mut via = None;
        wait_for(
            "a probe datagram at the sink",
            Duration::from_secs(2),
            || {
                via = sink.probe_via(port);
                Ok(via.is_some())
            },
        )?;
        if via == Some(want) {
            return Ok(port);
        }
    }
    anyhow::bail!("no port in {from}..{} landed on {want:?}", from + 64)
}

/// Datagrams of `stream` lost (sent, never arrived), and the gap from the
/// first lost datagram's send time to the first arrival via `now_via`.
fn outage(sink: &Sink, stream: &Stream, now_via: [u8; 4]) -> (u32, Option<Duration>) {
    let got = sink.stream(stream.port);
    let sent = stream.sent();
    let arrived: std::collections::HashSet<u32> = got.iter().map(|&(s, _, _)| s).collect();
    let lost: Vec<u32> = (0..sent.saturating_sub(10))
        .filter(|s| !arrived.contains(s))
        .collect();
    let resumed = got
        .iter()
        .find(|&&(_, _, a)| a == now_via)
        .map(|&(_, t, _)| t);
    let gap = match (lost.first().and_then(|&s| stream.sent_at(s)), resumed) {
        (Some(cut), Some(back)) => Some(back.saturating_duration_since(cut)),
        _ => None,
    };
    (lost.len() as u32, gap)
}

#[test]
fn upstream_failure_moves_only_the_dead_uplinks_flows_and_recovers() -> Result<()> {
    if !require_root("upstream_failure_moves_only_the_dead_uplinks_flows_and_recovers") {
        return Ok(());
    }
    let mut lab = Lab::up(&LabDesc::shipped("default")?, &unique_prefix())?;
    let hook_out = std::env::temp_dir().join(format!("{}hook.env", lab.prefix()));
    let hooks = format!(
        r#"hooks = [["/bin/sh", "-c", "env | grep ^LB_ >> {}"]]"#,
        hook_out.display()
    );
    let lbd = Lbd::start(&mut lab, &config("", "", &hooks))?;
    let sink = Sink::start(&lab)?;
    let p1 = port_on(&lab, &sink, ISP1_NAT, 5000)?;
    let p2 = port_on(&lab, &sink, ISP2_NAT, 5100)?;
    let (s1, s2) = (Stream::start(&lab, p1)?, Stream::start(&lab, p2)?);
    wait_for("both streams flowing", Duration::from_secs(3), || {
        Ok(sink.stream(p1).len() > 20 && sink.stream(p2).len() > 20)
    })?;

    // Cut isp1 from the internet; its gateway still answers ARP and ping.
    lab.set_link_up("isp1", "up0", false)?;
    wait_for(
        "the isp1 stream through isp2",
        Duration::from_secs(3),
        || Ok(sink.stream(p1).iter().any(|&(_, _, a)| a == ISP2_NAT)),
    )?;
    thread::sleep(Duration::from_millis(300)); // let both streams run on
    let (lost1, gap) = outage(&sink, &s1, ISP2_NAT);
    let (lost2, _) = outage(&sink, &s2, ISP2_NAT);
    eprintln!("upstream failure: isp1 stream lost {lost1} datagrams, resumed after {gap:?}; isp2 stream lost {lost2}");
    let gap = gap.context("no outage measured on the isp1 stream")?;
    ensure!(
        gap <= Duration::from_millis(400) && lost1 <= 40,
        "isp1 stream: {lost1} lost, resumed after {gap:?}"
    );
    ensure!(lost2 == 0, "the isp2 stream lost {lost2} datagrams");
    let status = lbd.status()?;
    ensure!(
        status["uplinks"][0]["health"] == "down",
        "isp1 not down: {status}"
    );

    // Recovery: after `rise` good rounds new flows use isp1 again; the moved
    // flow stays on isp2.
    lab.set_link_up("isp1", "up0", true)?;
    wait_for("isp1 up again", Duration::from_secs(5), || {
        Ok(lbd.status()?["uplinks"][0]["health"] == "up")
    })?;
    let before = sink.stream(p1).len();
    wait_for("more of the moved stream", Duration::from_secs(2), || {
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
    wait_for("hook output", Duration::from_secs(5), || {
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
    lbd.stop(&mut lab)
}

#[test]
fn flapping_upstream_gives_few_transitions() -> Result<()> {
    if !require_root("flapping_upstream_gives_few_transitions") {
        return Ok(());
    }
    let mut lab = Lab::up(&LabDesc::shipped("default")?, &unique_prefix())?;
    let lbd = Lbd::start(&mut lab, &config("", "", ""))?;
    let sink = Sink::start(&lab)?;
    let p2 = port_on(&lab, &sink, ISP2_NAT, 5300)?;
    let s2 = Stream::start(&lab, p2)?;
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
    let (lost2, _) = outage(&sink, &s2, ISP2_NAT);
    eprintln!(
        "flapping every 300 ms for 10 s: {flips} transitions of isp1; isp2 stream lost {lost2}"
    );
    ensure!(flips <= 4, "{flips} transitions: no hysteresis");
    ensure!(lost2 == 0, "isp2 stream lost {lost2}");
    drop(s2);
    lbd.stop(&mut lab)
}

#[test]
fn operator_toggles_and_tiers_act_in_the_data_plane() -> Result<()> {
    if !require_root("operator_toggles_and_tiers_act_in_the_data_plane") {
        return Ok(());
    }
    let mut lab = Lab::up(&LabDesc::shipped("default")?, &unique_prefix())?;
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
    let s = Stream::start(&lab, 6100)?;
    wait_for("stream on isp1", Duration::from_secs(2), || {
        Ok(sink.stream(6100).len() > 5)
    })?;
    let t0 = Instant::now();
    lbd.lbctl(&["uplink", "disable", "isp1"])?;
    wait_for("stream on isp2", Duration::from_secs(2), || {
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
    wait_for("stream continues", Duration::from_secs(2), || {
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
    for bad in [
        &["uplink", "disable", "nope"][..],
        &["uplink", "weight", "isp1", "0"],
        &["uplink", "weight", "isp1", "x"],
    ] {
        ensure!(lbd.lbctl(bad).is_err(), "lbctl {bad:?} was accepted");
    }
    lbd.stop(&mut lab)
}

#[test]
fn carrier_loss_fails_over_at_once() -> Result<()> {
    if !require_root("carrier_loss_fails_over_at_once") {
        return Ok(());
    }
    let mut lab = Lab::up(&LabDesc::shipped("default")?, &unique_prefix())?;
    let lbd = Lbd::start(&mut lab, &config("", "", ""))?;
    let sink = Sink::start(&lab)?;
    let p1 = port_on(&lab, &sink, ISP1_NAT, 5400)?;
    let s1 = Stream::start(&lab, p1)?;
    wait_for("the stream flowing", Duration::from_secs(3), || {
        Ok(sink.stream(p1).len() > 20)
    })?;
    // The ISP's end goes away: the router's wan1 loses its carrier.
    lab.set_link_up("isp1", "down0", false)?;
    wait_for("the stream through isp2", Duration::from_secs(3), || {
        Ok(sink.stream(p1).iter().any(|&(_, _, a)| a == ISP2_NAT))
    })?;
    thread::sleep(Duration::from_millis(200));
    let (lost, gap) = outage(&sink, &s1, ISP2_NAT);
    let status = lbd.status()?;
    eprintln!(
        "carrier loss: lost {lost} datagrams, resumed after {gap:?}; isp1 reason: {}",
        status["uplinks"][0]["reason"]
    );
    ensure!(lost <= 2, "{lost} datagrams lost on carrier loss");
    drop(s1);
    lab.set_link_up("isp1", "down0", true)?;
    lbd.stop(&mut lab)
}
