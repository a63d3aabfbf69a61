//! Bandwidth management: lb's packets pass the queues the operator put on
//! an uplink or a LAN port (an SQM-style `tbf`), lb shapes per uplink when
//! asked (`[uplink.shape]`), with a fair share per client, and an uplink
//! without a shaper keeps the XDP path, until XDP_REDIRECT loses what it
//! sends there: then lb's queue, for a while.
//!
//! Rates are the behaviour under test here, not the machine's speed: a
//! shaper holds traffic to its configured rate on any machine that can go
//! faster than it, and these rates (20 Mbit/s) are a hundredth of what the
//! slowest lab machine forwards.

use std::{
    io::ErrorKind,
    net::Ipv4Addr,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use lb_tests::{
    daemon::{LabConfig, Lbd},
    require_root,
    stream::wait_for,
    traffic::{tcp_upload, udp_socket, wait_tcp_idle, wait_tcp_listener, TcpSinkServer},
    unique_prefix, Lab, LabDesc, LanLeaks,
};
use serde_json::Value;

const SERVER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
const IPERF_PORTS: [u16; 2] = [5201, 5202];
/// The rate of every shaper here, in bit/s.
const RATE: f64 = 20e6;
/// A bound for a test that must end, not a speed target.
const BOUND: Duration = Duration::from_secs(10);

/// Start iperf3 servers in inet and wait for them.
fn iperf_servers(lab: &mut Lab) -> Result<()> {
    for port in IPERF_PORTS {
        lab.spawn(
            "inet",
            &[
                "iperf3",
                "-s",
                "-p",
                &port.to_string(),
                "--logfile",
                "/dev/null",
            ],
        )?;
    }
    for port in IPERF_PORTS {
        wait_tcp_listener(lab.ns("inet")?, port, BOUND)?;
    }
    Ok(())
}

/// iperf3 from `host` to server port `port` with 8 streams for 6 s (the
/// first second, TCP's slow start, not counted): received bit/s. With
/// `download`, the server sends.
fn iperf(lab: &Lab, host: &str, port: u16, download: bool) -> Result<f64> {
    let port_arg = port.to_string();
    let server = SERVER.to_string();
    let mut args = vec![
        "timeout", "40", "iperf3", "-c", &server, "-p", &port_arg, "-P", "8", "-t", "6", "-O", "1",
        "-J",
    ];
    if download {
        args.push("-R");
    }
    // iperf3's server runs one test at a time and finishes the last one a
    // moment after its client has: a run that starts in that moment is
    // refused ("Connection refused" while the server reopens its listening
    // socket, "the server is busy" before), sends nothing, and is tried
    // again once the server listens and holds no connection.
    let deadline = Instant::now() + BOUND;
    let out = loop {
        let inet = lab.ns("inet")?;
        wait_tcp_listener(inet, port, BOUND)?;
        wait_tcp_idle(inet, port, BOUND)?;
        let out = lab.output(host, &args)?;
        let said = String::from_utf8_lossy(&out.stdout);
        let refused = said.contains("Connection refused") || said.contains("server is busy");
        if !refused || Instant::now() >= deadline {
            break out;
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "iperf3 on {host} failed ({}): {}{stdout}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_str(&stdout).context("parsing iperf3 -J")?;
    report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .with_context(|| format!("no end.sum_received in iperf3's report: {stdout}"))
}

/// Bytes the root qdisc of `dev` on the router has sent.
fn qdisc_sent(lab: &Lab, dev: &str) -> Result<u64> {
    let out = lab.exec(
        "router",
        &["tc", "-s", "-j", "qdisc", "show", "dev", dev, "root"],
    )?;
    let qdiscs: Value = serde_json::from_str(&out).context("parsing tc -j")?;
    qdiscs[0]["bytes"]
        .as_u64()
        .with_context(|| format!("no bytes in `tc -s -j qdisc show dev {dev}` on router: {out}"))
}

/// `device`'s egress in lbd's status: (path, why).
fn egress_of(lbd: &Lbd, device: &str) -> Result<Option<(String, String)>> {
    let status = lbd.status()?;
    let uplinks = status["uplinks"].as_array().cloned().unwrap_or_default();
    let all = uplinks
        .iter()
        .map(|u| u["egress"].clone())
        .chain(status["lan_egress"].as_array().cloned().unwrap_or_default());
    Ok(all
        .filter(|e| e["device"] == device)
        .map(|e| {
            (
                e["path"].as_str().unwrap_or("").to_owned(),
                e["why"].as_str().unwrap_or("").to_owned(),
            )
        })
        .next())
}

fn wait_egress(lbd: &Lbd, device: &str, path: &str) -> Result<String> {
    wait_for(&format!("{device}'s egress to be {path}"), BOUND, || {
        Ok(egress_of(lbd, device)?.is_some_and(|(p, _)| p == path))
    })?;
    Ok(egress_of(lbd, device)?
        .map(|(_, why)| why)
        .unwrap_or_default())
}

fn within(rate: f64, want: f64, share: f64) -> bool {
    (rate - want).abs() <= want * share
}

/// Whether `rate` shows traffic that a shaper of rate `want` held: never
/// more than it lets through (10 % for measuring), and not starved below
/// half of it, which a shaper set wrong would do. How near the rate it
/// gets on a busy machine is no behaviour of lb's.
fn shaped(rate: f64, want: f64) -> bool {
    rate <= want * 1.10 && rate >= want * 0.5
}

/// An operator's `tbf` (what an SQM setup amounts to) on uplink wan1 and
/// on LAN port lan0: lb's uploads and downloads keep to it (never more than 10 % over it)
/// because they pass it; wan2, without one, keeps the XDP path.
#[test]
fn an_operators_shaper_on_an_uplink_and_a_lan_port_holds_lbs_traffic() -> Result<()> {
    if !require_root("an_operators_shaper_on_an_uplink_and_a_lan_port_holds_lbs_traffic") {
        return Ok(());
    }
    let mut lab = Lab::up(&LabDesc::shipped("default")?, &unique_prefix())?;
    let leaks = LanLeaks::install(&lab)?;
    let lbd = Lbd::start(&mut lab, &LabConfig::default().render())?;
    for dev in ["wan1", "lan0"] {
        lab.exec(
            "router",
            &[
                "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", "20mbit", "burst", "32kb",
                "latency", "20ms",
            ],
        )?;
    }
    // Followed while lbd runs: no restart.
    let why = wait_egress(&lbd, "wan1", "qdisc")?;
    ensure!(why.contains("tbf"), "wan1: {why}");
    wait_egress(&lbd, "lan0", "qdisc")?;
    let why2 = wait_egress(&lbd, "wan2", "xdp")?;
    eprintln!("egress: wan1 by qdisc ({why}); lan0 by qdisc; wan2 by xdp ({why2})");

    iperf_servers(&mut lab)?;
    lbd.lbctl(&["uplink", "disable", "isp2"])?;
    let before = qdisc_sent(&lab, "wan1")?;
    let up = iperf(&lab, "client", IPERF_PORTS[0], false)?;
    let through = qdisc_sent(&lab, "wan1")? - before;
    let down = iperf(&lab, "client", IPERF_PORTS[0], true)?;
    eprintln!(
        "through isp1 with a 20 Mbit/s tbf on wan1 and lan0: upload {:.2} Mbit/s ({through} bytes through wan1's tbf), download {:.2} Mbit/s",
        up / 1e6,
        down / 1e6
    );
    ensure!(shaped(up, RATE), "upload at {:.2} Mbit/s", up / 1e6);
    ensure!(shaped(down, RATE), "download at {:.2} Mbit/s", down / 1e6);
    ensure!(
        through > 4_000_000,
        "only {through} bytes passed wan1's tbf"
    );

    // wan2 has no shaper: its traffic takes the XDP path, past no qdisc.
    lbd.lbctl(&["uplink", "enable", "isp2"])?;
    lbd.lbctl(&["uplink", "disable", "isp1"])?;
    let tx_before = lbd.uplink_counter("isp2", "tx_bytes")?;
    let before = qdisc_sent(&lab, "wan1")?;
    let up2 = iperf(&lab, "client", IPERF_PORTS[1], false)?;
    let tx = lbd.uplink_counter("isp2", "tx_bytes")? - tx_before;
    let wan1_more = qdisc_sent(&lab, "wan1")? - before;
    eprintln!(
        "through isp2 (no shaper, XDP): upload {:.2} Mbit/s, {tx} bytes by lb's XDP path; wan1's tbf saw {wan1_more} bytes meanwhile",
        up2 / 1e6
    );
    ensure!(tx > 4_000_000, "isp2 sent only {tx} bytes");
    ensure!(
        wan1_more < 100_000,
        "wan1's tbf carried {wan1_more} bytes of isp2's run"
    );

    // The operator removes the shaper: back to XDP.
    lab.exec("router", &["tc", "qdisc", "del", "dev", "wan1", "root"])?;
    wait_egress(&lbd, "wan1", "xdp")?;
    leaks.check()?;
    lbd.stop(&mut lab)
}

/// A ping beside 8 saturating TCP uploads, with a slower "modem" beyond
/// the router that has a deep buffer (400 ms), and an SQM-style tbf on the
/// router below the modem's rate with a 20 ms queue: the ping waits in the
/// router's short queue, not in the modem's long one, because lb's packets
/// pass the router's queue. What is judged is where the queue builds (the
/// modem's stays empty while the router's holds the backlog); the ping's
/// times are printed, not judged.
#[test]
fn a_ping_beside_saturating_uploads_waits_only_in_the_routers_short_queue() -> Result<()> {
    if !require_root("a_ping_beside_saturating_uploads_waits_only_in_the_routers_short_queue") {
        return Ok(());
    }
    let mut lab = Lab::up(&LabDesc::shipped("default")?, &unique_prefix())?;
    let leaks = LanLeaks::install(&lab)?;
    let config = LabConfig {
        uplinks: &[(1, "")],
        ..LabConfig::default()
    };
    // The modem: 25 Mbit/s with 400 ms of buffer, on the ISP's way up.
    lab.exec(
        "isp1",
        &[
            "tc", "qdisc", "add", "dev", "up0", "root", "tbf", "rate", "25mbit", "burst", "32kb",
            "latency", "400ms",
        ],
    )?;
    lab.exec(
        "router",
        &[
            "tc", "qdisc", "add", "dev", "wan1", "root", "tbf", "rate", "20mbit", "burst", "32kb",
            "latency", "20ms",
        ],
    )?;
    let lbd = Lbd::start(&mut lab, &config.render())?;
    wait_egress(&lbd, "wan1", "qdisc")?;
    iperf_servers(&mut lab)?;

    let ns = lab.ns("client")?.to_owned();
    let server = SERVER.to_string();
    let port = IPERF_PORTS[0].to_string();
    let sent_before = qdisc_sent(&lab, "wan1")?;
    let load = std::thread::spawn(move || {
        Command::new("ip")
            .args([
                "netns", "exec", &ns, "timeout", "40", "iperf3", "-c", &server, "-p", &port,
            ])
            .args(["-P", "8", "-t", "8", "-J"])
            .stdin(Stdio::null())
            .output()
    });
    // Let the streams fill whatever queue they fill (TCP's slow start is
    // over after a second's worth of the shaper's rate here): the router's
    // queue holds a backlog. Then ping through it, watching both queues.
    wait_for("the uploads to fill the router's queue", BOUND, || {
        let sent = qdisc_sent(&lab, "wan1")?.saturating_sub(sent_before);
        Ok(sent as f64 * 8.0 >= RATE && backlog_now(&lab, "router", "wan1")? > 0)
    })?;
    let ns = lab.ns("client")?.to_owned();
    let server = SERVER.to_string();
    let ping = std::thread::spawn(move || {
        Command::new("ip")
            .args([
                "netns", "exec", &ns, "ping", "-c", "20", "-i", "0.2", "-W", "2", &server,
            ])
            .stdin(Stdio::null())
            .output()
    });
    // Bounded by the ping itself: 20 echoes, each given at most 2 s.
    let (mut modem_backlog, mut router_backlog) = (0, 0);
    while !ping.is_finished() {
        modem_backlog = modem_backlog.max(backlog_now(&lab, "isp1", "up0")?);
        router_backlog = router_backlog.max(backlog_now(&lab, "router", "wan1")?);
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = ping
        .join()
        .map_err(|_| anyhow::anyhow!("the ping thread panicked"))??;
    let load = load
        .join()
        .map_err(|_| anyhow::anyhow!("the iperf3 thread panicked"))??;
    let sent = uploaded(&load)?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut rtts: Vec<f64> = text
        .lines()
        .filter_map(|l| l.split("time=").nth(1))
        .filter_map(|t| t.split_whitespace().next()?.parse().ok())
        .collect();
    rtts.sort_by(f64::total_cmp);
    ensure!(
        rtts.len() >= 15,
        "only {} of 20 pings answered: {text}",
        rtts.len()
    );
    let median = rtts[rtts.len() / 2];
    let p95 = rtts[rtts.len() * 95 / 100];
    eprintln!(
        "ping beside 8 uploads ({} bytes sent by iperf3's streams: {:?}): median {median:.1} ms, p95 {p95:.1} ms, worst {:.1} ms (router's queue 20 ms, modem's 400 ms); the backlogs peaked at {router_backlog} bytes in the router's queue and {modem_backlog} bytes of its {MODEM_BUFFER} in the modem's",
        sent.iter().sum::<u64>(),
        sent,
        rtts[rtts.len() - 1]
    );
    // The load ran, and saturated the uplink: the router's shaper held a
    // queue while the ping went through.
    ensure!(
        router_backlog > 0,
        "the router's queue on wan1 stayed empty during the ping: the uploads did not saturate the uplink"
    );
    // Fed below its rate, the modem never builds a queue (in it, a ping
    // waits up to 400 ms: 185 ms median when lb skipped the router's
    // queue).
    ensure!(
        modem_backlog < MODEM_BUFFER / 10,
        "the modem queued {modem_backlog} bytes: lb's packets skip the router's shaper"
    );
    leaks.check()?;
    lbd.stop(&mut lab)
}

/// Bytes each stream of an `iperf3 -J` client run sent, from its report;
/// fails unless it ran to its end and every stream sent something.
fn uploaded(run: &std::process::Output) -> Result<Vec<u64>> {
    let stdout = String::from_utf8_lossy(&run.stdout);
    ensure!(
        run.status.success(),
        "iperf3 failed ({}): {}{stdout}",
        run.status,
        String::from_utf8_lossy(&run.stderr)
    );
    let report: Value = serde_json::from_str(&stdout).context("parsing iperf3 -J")?;
    let streams = report["end"]["streams"]
        .as_array()
        .with_context(|| format!("no end.streams in iperf3's report: {stdout}"))?;
    let sent = streams
        .iter()
        .map(|s| {
            s["sender"]["bytes"]
                .as_u64()
                .with_context(|| format!("no sender.bytes in iperf3's stream {s}"))
        })
        .collect::<Result<Vec<u64>>>()?;
    ensure!(
        sent.len() == 8 && sent.iter().all(|&b| b > 0),
        "iperf3's 8 streams sent {sent:?} bytes"
    );
    Ok(sent)
}

/// The modem's buffer: 400 ms at 25 Mbit/s, in bytes.
const MODEM_BUFFER: u64 = 25_000_000 / 8 * 400 / 1000;

/// The backlog of the root qdisc of `host:dev` now, in bytes.
fn backlog_now(lab: &Lab, host: &str, dev: &str) -> Result<u64> {
    let out = lab.exec(
        host,
        &["tc", "-s", "-j", "qdisc", "show", "dev", dev, "root"],
    )?;
    let qdiscs: Value = serde_json::from_str(&out).context("parsing tc -j")?;
    qdiscs[0]["backlog"]
        .as_u64()
        .with_context(|| format!("no backlog in `tc -s -j qdisc show dev {dev}` on {host}: {out}"))
}

/// `[uplink.shape]`: lbd builds an HTB on the uplink (uploads) and on the
/// LAN bridge (downloads, one class per uplink for all its ports), with a
/// fair leaf per client; two clients downloading at once through the same
/// uplink get a fair share each, and the total keeps to the rate. lbd's
/// teardown removes it all.
#[test]
fn lbs_shaper_gives_two_clients_on_one_uplink_a_fair_share() -> Result<()> {
    if !require_root("lbs_shaper_gives_two_clients_on_one_uplink_a_fair_share") {
        return Ok(());
    }
    let mut lab = Lab::up(&LabDesc::shipped("bridge")?, &unique_prefix())?;
    let leaks = LanLeaks::install(&lab)?;
    let shape = "[uplink.shape]\nupload = \"20mbit\"\ndownload = \"20mbit\"\n";
    let config = LabConfig {
        lans: &["br-lan"],
        uplinks: &[(1, shape), (2, "")],
        ..LabConfig::default()
    };
    let lbd = Lbd::start(&mut lab, &config.render())?;
    let why = wait_egress(&lbd, "wan1", "qdisc")?;
    ensure!(why.contains("lb's shaper"), "wan1: {why}");
    for port in ["lan1", "lan2"] {
        let why = wait_egress(&lbd, port, "qdisc")?;
        ensure!(why.contains("bridge"), "{port}: {why}");
    }
    wait_egress(&lbd, "wan2", "xdp")?;
    iperf_servers(&mut lab)?;
    lbd.lbctl(&["uplink", "disable", "isp2"])?;

    // Both clients download at once.
    let ns = lab.ns("client2")?.to_owned();
    let server = SERVER.to_string();
    let port = IPERF_PORTS[1].to_string();
    let second = std::thread::spawn(move || {
        Command::new("ip")
            .args([
                "netns", "exec", &ns, "timeout", "40", "iperf3", "-c", &server, "-p", &port,
            ])
            .args(["-P", "8", "-t", "6", "-O", "1", "-J", "-R"])
            .stdin(Stdio::null())
            .output()
    });
    let first = iperf(&lab, "client", IPERF_PORTS[0], true)?;
    let out = second
        .join()
        .map_err(|_| anyhow::anyhow!("the second client's thread panicked"))??;
    let report: Value =
        serde_json::from_slice(&out.stdout).context("parsing client2's iperf3 -J")?;
    let other = report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("no end.sum_received in client2's iperf3 report")?;
    let total = first + other;
    eprintln!(
        "two clients downloading through isp1 shaped to 20 Mbit/s: {:.2} and {:.2} Mbit/s, {:.2} in total",
        first / 1e6,
        other / 1e6,
        total / 1e6
    );
    let fair = total / 2.0;
    ensure!(
        within(first, fair, 0.20) && within(other, fair, 0.20),
        "not a fair share: {:.2} and {:.2} Mbit/s",
        first / 1e6,
        other / 1e6
    );
    ensure!(shaped(total, RATE), "total {:.2} Mbit/s", total / 1e6);

    // Uploads keep to the rate too.
    let up = iperf(&lab, "client", IPERF_PORTS[0], false)?;
    eprintln!(
        "upload through isp1 shaped to 20 Mbit/s: {:.2} Mbit/s",
        up / 1e6
    );
    ensure!(shaped(up, RATE), "upload at {:.2} Mbit/s", up / 1e6);
    leaks.check()?;

    // Stopping lbd keeps the data plane, shaper and all; the teardown
    // removes it.
    lbd.stop_keeping(&mut lab)?;
    let kept = lab.exec("router", &["tc", "qdisc", "show", "dev", "wan1"])?;
    ensure!(
        kept.contains("htb 1b:"),
        "lbd's stop removed its shaper: {kept}"
    );
    let said = lbd.teardown(&lab)?;
    for dev in ["wan1", "br-lan"] {
        let qdiscs = lab.exec("router", &["tc", "qdisc", "show", "dev", dev])?;
        ensure!(
            !qdiscs.contains("htb 1b:"),
            "lb's shaper is still on {dev} after the teardown ({said}): {qdiscs}"
        );
    }
    Ok(())
}

/// An ingress shaper on an uplink (SQM's: an `ingress` qdisc feeding an
/// IFB) cannot be honoured, since XDP forwards replies before it: `lbd
/// --check` and lbd's start refuse it, naming `[uplink.shape]` instead.
#[test]
fn an_ingress_shaper_on_an_uplink_is_refused_at_start() -> Result<()> {
    if !require_root("an_ingress_shaper_on_an_uplink_is_refused_at_start") {
        return Ok(());
    }
    let lab = Lab::up(&LabDesc::shipped("default")?, &unique_prefix())?;
    // What SQM does for downloads: arrivals on wan1 go through ifb4wan1's
    // shaper.
    lab.exec(
        "router",
        &["ip", "link", "add", "name", "ifb4wan1", "type", "ifb"],
    )?;
    lab.exec("router", &["ip", "link", "set", "ifb4wan1", "up"])?;
    lab.exec(
        "router",
        &[
            "tc", "qdisc", "add", "dev", "ifb4wan1", "root", "tbf", "rate", "20mbit", "burst",
            "32kb", "latency", "20ms",
        ],
    )?;
    lab.exec(
        "router",
        &[
            "tc", "qdisc", "add", "dev", "wan1", "handle", "ffff:", "ingress",
        ],
    )?;
    lab.exec(
        "router",
        &[
            "tc", "filter", "add", "dev", "wan1", "parent", "ffff:", "protocol", "all", "u32",
            "match", "u32", "0", "0", "action", "mirred", "egress", "redirect", "dev", "ifb4wan1",
        ],
    )?;
    let (checked, refused) = lb_tests::daemon::refusals(&lab, &LabConfig::default().render())?;
    for (what, said) in [("lbd --check", &checked), ("lbd", &refused)] {
        eprintln!("{what}: {said}");
        ensure!(
            said.contains("wan1 has an ingress qdisc")
                && said.contains("[uplink.shape] download")
                && said.contains("tc qdisc del dev wan1 ingress"),
            "{what} did not refuse wan1's ingress shaper: {said:?}"
        );
    }
    Ok(())
}

/// The ring watch: a device that loses what `XDP_REDIRECT` hands it takes
/// lb's queue, for a while. A full ring is what loses frames under load;
/// here, for a test that does not hang on a machine's speed, the device is
/// made to lose every full-size frame instead (isp1's end of wan1 with a
/// smaller MTU: the device map drops what is too big for the peer, as it
/// drops what a full ring has no room for, and says so the same way). The
/// lost frames are counted (`drop_ring_full`, and in status); wan1, which
/// has no queue of its own (noqueue), is given lb's (1c:, pfifo_fast: a
/// namespace's lbd sees no `net.core.default_qdisc`) and
/// takes it, and status says why; with the MTU back, an upload completes
/// whole, and once the hold is over wan1 is back on XDP. lbd's teardown
/// removes lb's queue.
#[test]
fn a_device_that_loses_what_xdp_redirects_to_it_takes_lbs_queue() -> Result<()> {
    if !require_root("a_device_that_loses_what_xdp_redirects_to_it_takes_lbs_queue") {
        return Ok(());
    }
    /// Longer than a first hold (4 s) and a round: a bound, not a speed.
    const HOLD_BOUND: Duration = Duration::from_secs(15);
    let mut lab = Lab::up(&LabDesc::shipped("default")?, &unique_prefix())?;
    let leaks = LanLeaks::install(&lab)?;
    let lbd = Lbd::start(&mut lab, &LabConfig::default().render())?;
    lbd.lbctl(&["uplink", "disable", "isp2"])?;
    wait_egress(&lbd, "wan1", "xdp")?;
    let client = lab.ns("client")?.to_owned();

    lab.exec("isp1", &["ip", "link", "set", "down0", "mtu", "1400"])?;
    let lost_before = lbd.reason("drop_ring_full")?;
    let socket = udp_socket(&client, (Ipv4Addr::UNSPECIFIED, 0).into())?;
    let datagram = [0u8; 1450];
    let why = wait_for_value("wan1 to take its queue", BOUND, || {
        socket.send_to(&datagram, (SERVER, 9))?;
        std::thread::sleep(Duration::from_millis(20));
        Ok(egress_of(&lbd, "wan1")?
            .filter(|(p, _)| p == "qdisc")
            .map(|(_, why)| why))
    })?;
    let lost = lbd.reason("drop_ring_full")? - lost_before;
    eprintln!("wan1 by qdisc ({why}); {lost} frames XDP_REDIRECT lost there");
    ensure!(lost > 0, "the ring watch counted nothing");
    ensure!(why.contains("XDP_REDIRECT lost"), "wan1: {why}");
    let qdiscs = lab.exec("router", &["tc", "qdisc", "show", "dev", "wan1"])?;
    ensure!(
        qdiscs.contains("pfifo_fast 1c:"),
        "wan1 has not lb's queue: {qdiscs}"
    );
    let status = lbd.lbctl(&["status"])?;
    ensure!(
        status.contains("frames lost to its full ring"),
        "lbctl status says nothing of wan1's lost frames: {status}"
    );

    // The device takes full-size frames again: through lb's queue while
    // the hold lasts, by XDP after it.
    lab.exec("isp1", &["ip", "link", "set", "down0", "mtu", "1500"])?;
    let sink = TcpSinkServer::start(lab.ns("inet")?, (SERVER, 0).into())?;
    let bytes = 1 << 20;
    let got = tcp_upload(&client, sink.local_addr(), bytes, BOUND)?;
    ensure!(got == bytes as u64, "the sink read {got} of {bytes} bytes");
    wait_for("wan1 back on XDP", HOLD_BOUND, || {
        Ok(egress_of(&lbd, "wan1")?.is_some_and(|(p, _)| p == "xdp"))
    })?;
    let got = tcp_upload(&client, sink.local_addr(), bytes, BOUND)?;
    ensure!(got == bytes as u64, "the sink read {got} of {bytes} bytes");
    leaks.check()?;
    lbd.stop(&mut lab)?;
    let qdiscs = lab.exec("router", &["tc", "qdisc", "show", "dev", "wan1"])?;
    ensure!(
        !qdiscs.contains(" 1c: "),
        "lbd --teardown left lb's queue on wan1: {qdiscs}"
    );
    Ok(())
}

/// A LAN port whose client went away (its veth peer down: no carrier)
/// loses whatever `XDP_REDIRECT` sends it: that is no full ring, and its
/// queue would not help. The client's flow is made, its end goes down,
/// and the server goes on answering: the answers lost at lan0 are counted
/// as `drop_target_refused` (the flush refused whole), never as
/// `drop_ring_full`; lbd reads them and lan0 keeps XDP.
#[test]
fn a_lan_port_whose_client_went_away_is_not_taken_for_a_full_ring() -> Result<()> {
    if !require_root("a_lan_port_whose_client_went_away_is_not_taken_for_a_full_ring") {
        return Ok(());
    }
    let mut lab = Lab::up(&LabDesc::shipped("default")?, &unique_prefix())?;
    let leaks = LanLeaks::install(&lab)?;
    let lbd = Lbd::start(&mut lab, &LabConfig::default().render())?;
    wait_egress(&lbd, "lan0", "xdp")?;
    let far = udp_socket(lab.ns("inet")?, (SERVER, 0).into())?;
    far.set_read_timeout(Some(Duration::from_millis(200)))?;
    let near = udp_socket(lab.ns("client")?, (Ipv4Addr::UNSPECIFIED, 0).into())?;
    let mut buf = [0u8; 64];
    let mapped = wait_for_value("the client's datagram at the server", BOUND, || {
        near.send_to(b"hello", far.local_addr()?)?;
        match far.recv_from(&mut buf) {
            Ok((_, from)) => Ok(Some(from)),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => Ok(None),
            Err(e) => Err(e).context("the server's socket"),
        }
    })?;
    lab.exec("client", &["ip", "link", "set", "dev", "eth0", "down"])?;
    let (refused_before, full_before) = (
        lbd.reason("drop_target_refused")?,
        lbd.reason("drop_ring_full")?,
    );
    wait_for("answers to the client lost at lan0, counted", BOUND, || {
        for _ in 0..16 {
            far.send_to(b"answer", mapped)?;
        }
        Ok(lbd.reason("drop_target_refused")? > refused_before)
    })?;
    let refused = lbd.reason("drop_target_refused")?;
    // Counted by the same program at the same moment: no race.
    let full = lbd.reason("drop_ring_full")? - full_before;
    ensure!(
        full == 0,
        "{full} frames to a port without carrier taken for a full ring"
    );
    // lbd has read the count (every 100 ms) and decided.
    let (path, why) = wait_for_value("lbd to read lan0's count", BOUND, || {
        let status = lbd.status()?;
        let lan0 = status["lan_egress"]
            .as_array()
            .and_then(|l| l.iter().find(|e| e["device"] == "lan0"))
            .cloned()
            .context("lan0 in lan_egress")?;
        Ok(
            (lan0["ring_drops"].as_u64().unwrap_or(0) >= refused).then(|| {
                (
                    lan0["path"].as_str().unwrap_or("").to_owned(),
                    lan0["why"].as_str().unwrap_or("").to_owned(),
                )
            }),
        )
    })?;
    eprintln!(
        "lan0 without carrier: {} frames refused, {full} lost to a full ring; lan0 by {path}",
        refused - refused_before
    );
    ensure!(path == "xdp", "lan0 took its {path}: {why}");
    leaks.check()?;
    lbd.stop(&mut lab)
}

/// Polls `f` until it gives a value, for at most `limit`.
fn wait_for_value<T>(
    what: &str,
    limit: Duration,
    mut f: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f()? {
            return Ok(v);
        }
        ensure!(Instant::now() < deadline, "waited {limit:?} for {what}");
    }
}
