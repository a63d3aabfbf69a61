//! Failover from what the traffic says (`[passive]`): traffic that is
//! never answered, for reasons other than a dead uplink, costs a bounded
//! number of probe bursts and never a failover; a SYN sent again without an
//! answer moves to another uplink before the uplink itself is judged.
//!
//! (A passive failover itself: `failover.rs`, upstream failure, which runs
//! with the defaults and checks the reason lbd gives.)

use std::{
    io::{Read, Write},
    net::{SocketAddr, UdpSocket},
    thread,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use lb_tests::{
    daemon::{LabConfig, Lbd},
    in_netns, require_root,
    stream::{wait_for, Sink, Stream},
    traffic::{http_download, tcp_connect_from, HttpFileServer, TcpEchoServer},
    unique_prefix, Lab, LabDesc, LanLeaks,
};
use serde_json::Value;

const PROBE: &str = "[[uplink.probe]]\nkind = \"icmp\"\ntarget = \"198.51.100.10\"";
/// A bound for what must happen, not a speed target.
const BOUND: Duration = Duration::from_secs(10);
/// Probe rounds in a burst (the default).
const BURST: u64 = 3;

/// The most bursts one never-answered silence may cost in `window`, as
/// the README states it: one at once, then after 1 s, doubling up to a
/// minute between two.
fn most_bursts(window: Duration) -> u64 {
    let (mut at, mut gap, mut n) = (Duration::ZERO, Duration::from_secs(1), 0);
    while at <= window {
        n += 1;
        at += gap;
        gap = (gap * 2).min(Duration::from_secs(60));
    }
    n
}

/// Counter `key` of `uplink` (an entry of `lbctl status --json`); a
/// missing one fails the test, it does not read as zero.
fn counter(uplink: &Value, key: &str) -> Result<u64> {
    uplink[key]
        .as_u64()
        .with_context(|| format!("no counter `{key}` in lbd's status of the uplink: {uplink}"))
}

fn counters(lbd: &Lbd) -> Result<(u64, u64, String, u64)> {
    let isp1 = lbd.uplink("isp1")?;
    Ok((
        counter(&isp1, "suspicions")?,
        counter(&isp1, "transitions")?,
        isp1["health"]
            .as_str()
            .with_context(|| format!("no `health` in lbd's status of isp1: {isp1}"))?
            .to_owned(),
        counter(&isp1, "false_alarms")?,
    ))
}

/// Four kinds of traffic that go unanswered while isp1's path is fine, one
/// after the other on isp1 (isp2 is a backup: in service, but no new
/// flows): a client blasting UDP at a dead server, a download that ends, a
/// long-idle TCP connection, and a call whose far end stopped answering.
/// isp1 never goes down, and the bursts stay within the backoff's bound.
#[test]
fn traffic_that_goes_unanswered_costs_bounded_probes_and_no_failover() -> Result<()> {
    if !require_root("traffic_that_goes_unanswered_costs_bounded_probes_and_no_failover") {
        return Ok(());
    }
    let mut lab = Lab::up(&LabDesc::shipped("default")?, &unique_prefix())?;
    let leaks = LanLeaks::install(&lab)?;
    let isp2 = format!("tier = 1\n{PROBE}");
    let config = LabConfig {
        uplinks: &[(1, PROBE), (2, &isp2)],
        ..LabConfig::default()
    };
    let lbd = Lbd::start(&mut lab, &config.render())?;
    let started = Instant::now();
    let client = lab.ns("client")?.to_owned();
    let inet = lab.ns("inet")?.to_owned();
    let mut report = Vec::new();
    let mut step = |what: &str, lbd: &Lbd| -> Result<()> {
        let (suspicions, transitions, health, false_alarms) = counters(lbd)?;
        report.push(format!(
            "{what}: {suspicions} bursts so far ({false_alarms} proved false), isp1 {health} after {transitions} transitions"
        ));
        ensure!(
            transitions == 0 && health == "up",
            "{what}: isp1 failed over: {}",
            lbd.uplink("isp1")?
        );
        Ok(())
    };

    // 1. UDP at a server that does not exist: never answered.
    let blaster = in_netns(&client, || Ok(UdpSocket::bind("10.10.0.2:0")?))?;
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        let _ = blaster.send_to(b"anyone there?", "198.51.100.99:9");
        thread::sleep(Duration::from_millis(10));
    }
    step("UDP blast at a dead server, 5 s", &lbd)?;

    // 2. A download that ends, then silence.
    let dir = std::env::temp_dir().join(format!("{}passive", lab.prefix()));
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("file");
    std::fs::write(&file, vec![7u8; 2_000_000])?;
    let http = HttpFileServer::start(&inet, "198.51.100.10:0".parse()?, &file)?;
    let got = http_download(&client, http.local_addr(), "/file", &dir.join("got"), BOUND)?;
    ensure!(got == 2_000_000, "downloaded {got} bytes");
    let idle_until = Instant::now() + Duration::from_secs(3);
    wait_for("3 s after the download", BOUND, || {
        Ok(Instant::now() >= idle_until)
    })?;
    step("a 2 MB download that ended, then 3 s", &lbd)?;
    let _ = std::fs::remove_dir_all(&dir);

    // 3. A TCP connection idle for 5 s, then used again.
    let echo = TcpEchoServer::start(&inet, "198.51.100.10:0".parse()?)?;
    let local: SocketAddr = "10.10.0.2:0".parse()?;
    let mut conn = tcp_connect_from(&client, local, echo.local_addr(), BOUND)?;
    let mut buf = [0u8; 5];
    conn.write_all(b"hello")?;
    conn.read_exact(&mut buf)?;
    let idle_until = Instant::now() + Duration::from_secs(5);
    wait_for("5 s of an idle connection", BOUND, || {
        Ok(Instant::now() >= idle_until)
    })?;
    conn.write_all(b"again")?;
    conn.read_exact(&mut buf)?;
    ensure!(&buf == b"again", "the idle connection broke");
    step("a TCP connection idle for 5 s", &lbd)?;

    // 4. A call: answered for 2 s, then its far end goes quiet for 5 s
    // while the client keeps sending.
    let sink = Sink::start_echoing(&lab)?;
    let call = Stream::start(&lab, 6000, Duration::from_millis(20))?;
    wait_for("the call answered", BOUND, || {
        Ok(sink.stream(6000).len() > 50)
    })?;
    sink.set_echo(false);
    let quiet_until = Instant::now() + Duration::from_secs(5);
    wait_for("5 s of an unanswered call", BOUND, || {
        Ok(Instant::now() >= quiet_until)
    })?;
    drop(call);
    step("a call whose far end stopped answering for 5 s", &lbd)?;

    let elapsed = started.elapsed();
    let (suspicions, _, _, false_alarms) = counters(&lbd)?;
    let most = most_bursts(elapsed);
    let probes = suspicions * BURST;
    for line in &report {
        eprintln!("{line}");
    }
    eprintln!(
        "in {:.1} s: {suspicions} bursts ({probes} probes on top of one a second), {false_alarms} proved false; the backoff allows at most {most}",
        elapsed.as_secs_f64()
    );
    ensure!(
        suspicions <= most,
        "{suspicions} bursts in {elapsed:?}: more than the backoff allows ({most})"
    );
    ensure!(
        suspicions >= 1,
        "the unanswered traffic raised no suspicion at all"
    );
    leaks.check()?;
    lbd.stop(&mut lab)
}

/// isp1's path dies beyond its gateway, silently (a blackhole: what an
/// ISP's broken core does; an ICMP "unreachable" instead would make the
/// client give up the connection at once, with nothing left to move), and
/// isp1 has no probes (nothing can confirm a suspicion, so it stays in
/// service). New TCP connections still succeed: a SYN that gets no answer
/// is sent again by the client, and lb moves that one to isp2. With
/// `resteer_syn = false`, those hashed to isp1 fail.
#[test]
fn a_syn_sent_again_without_an_answer_moves_to_another_uplink() -> Result<()> {
    if !require_root("a_syn_sent_again_without_an_answer_moves_to_another_uplink") {
        return Ok(());
    }
    let mut lab = Lab::up(&LabDesc::shipped("default")?, &unique_prefix())?;
    let leaks = LanLeaks::install(&lab)?;
    let render = |passive: &str| {
        LabConfig {
            sections: passive,
            uplinks: &[(1, ""), (2, PROBE)],
            ..LabConfig::default()
        }
        .render()
    };
    let lbd = Lbd::start(&mut lab, &render(""))?;
    let echo = TcpEchoServer::start(lab.ns("inet")?, "198.51.100.10:0".parse()?)?;
    lab.exec("isp1", &["ip", "route", "replace", "blackhole", "default"])?;
    let client = lab.ns("client")?.to_owned();
    let local: SocketAddr = "10.10.0.2:0".parse()?;
    // 16 connections: each lands on isp1 or isp2 by its hash; all on isp2
    // happens once in 65,536 runs.
    const CONNECTIONS: usize = 16;
    // How many connected; why the others did not, said for the record.
    let connect_all = |timeout: Duration| -> usize {
        (0..CONNECTIONS)
            .filter(
                |_| match tcp_connect_from(&client, local, echo.local_addr(), timeout) {
                    Ok(_) => true,
                    Err(e) => {
                        eprintln!("a connection failed: {e:#}");
                        false
                    }
                },
            )
            .count()
    };
    let before = counter(&lbd.uplink("isp1")?, "syn_retries")?;
    let connected = connect_all(BOUND);
    let isp1 = lbd.uplink("isp1")?;
    let retries = counter(&isp1, "syn_retries")? - before;
    eprintln!(
        "isp1 cut upstream, no probes: {connected} of {CONNECTIONS} connections made; {retries} SYNs sent again on isp1 and moved; isp1 {}",
        isp1["health"]
    );
    ensure!(
        connected == CONNECTIONS,
        "{} connections failed",
        CONNECTIONS - connected
    );
    ensure!(
        retries >= 1,
        "no SYN was sent again on isp1: did none land there?"
    );
    ensure!(isp1["state"] == "active", "isp1 left service: {isp1}");

    // Switched off: those on isp1 wait in vain.
    lbd.write_config(&lab, &render("[passive]\nresteer_syn = false\n"))?;
    let said = lbd.lbctl(&["reload"])?;
    ensure!(said.contains("passive"), "reload said {said:?}");
    let connected = connect_all(Duration::from_secs(3));
    eprintln!("with resteer_syn = false: {connected} of {CONNECTIONS} connections made");
    ensure!(
        connected < CONNECTIONS,
        "every connection was made without re-steering"
    );
    lab.exec(
        "isp1",
        &["ip", "route", "replace", "default", "via", "100.65.1.2"],
    )?;
    leaks.check()?;
    lbd.stop(&mut lab).context("stopping lbd")
}
