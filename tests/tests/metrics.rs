//! Prometheus metrics: scraped from lbd during traffic, checked with
//! Prometheus' own `promtool`, and moving with the traffic.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{ensure, Context, Result};
use lb_tests::{
    daemon::{LabConfig, Lbd},
    in_netns, require_root,
    traffic::{udp_flows, UdpEchoServer},
    unique_prefix, Lab, LabDesc, LanLeaks,
};

const LISTEN: &str = "127.0.0.1:9725";

/// `GET /metrics` from inside the router (lbd's loopback).
fn scrape(lab: &Lab) -> Result<String> {
    let reply = in_netns(lab.ns("router")?, || {
        let mut stream = TcpStream::connect(LISTEN)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: lbd\r\n\r\n")?;
        let mut reply = String::new();
        stream.read_to_string(&mut reply)?;
        Ok(reply)
    })?;
    let (head, body) = reply
        .split_once("\r\n\r\n")
        .context("no HTTP head in the reply")?;
    ensure!(head.starts_with("HTTP/1.1 200"), "scrape answered {head}");
    Ok(body.to_string())
}

/// The sum of the samples of `metric` (all label sets).
fn sum(metrics: &str, metric: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(metric) && l[metric.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// `promtool check metrics` on `text`: its verdict.
fn promtool(text: &str) -> Result<()> {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running promtool (Debian's prometheus package)")?;
    child
        .stdin
        .take()
        .context("promtool's stdin")?
        .write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[test]
fn metrics_pass_promtool_and_move_with_the_traffic() -> Result<()> {
    if !require_root("metrics_pass_promtool_and_move_with_the_traffic") {
        return Ok(());
    }
    let mut lab = Lab::up(&LabDesc::shipped("default")?, &unique_prefix())?;
    let leaks = LanLeaks::install(&lab)?;
    let sections = format!("[metrics]\nlisten = \"{LISTEN}\"");
    // Quotas far from reached, for their gauges.
    let quota = "quota = { bytes = \"1GB\", period = \"month\" }";
    let config = LabConfig {
        daemon: "state_dir = \"{state}\"",
        sections: &sections,
        uplinks: &[(1, quota), (2, quota)],
        ..LabConfig::default()
    };
    let lbd = Lbd::start(&mut lab, &config.render())?;
    let before = scrape(&lab)?;
    promtool(&before)?;

    let server: SocketAddr = "198.51.100.10:7400".parse()?;
    let _echo = UdpEchoServer::start(lab.ns("inet")?, server)?;
    let flows = udp_flows(lab.ns("client")?, server, 30, Duration::from_secs(10))?;
    ensure!(flows.iter().all(|f| f.outcome.is_ok()), "some flows failed");

    let after = scrape(&lab)?;
    promtool(&after)?;
    for (metric, at_least) in [
        ("lb_uplink_new_flows_total", 30.0),
        ("lb_uplink_tx_packets_total", 30.0),
        ("lb_uplink_replies_total", 30.0),
        ("lb_uplink_flows", 30.0),
    ] {
        let (was, is) = (sum(&before, metric), sum(&after, metric));
        eprintln!("{metric}: {was} -> {is}");
        ensure!(
            is - was >= at_least,
            "{metric} moved from {was} to {is} with 30 flows"
        );
    }
    ensure!(
        sum(&after, "lb_uplink_in_service") == 2.0,
        "not both uplinks in service: {after}"
    );
    // Both uplinks and lan0 leave by XDP (no qdisc of anyone's): the
    // family is there, at 0 for each of the three.
    let egress: Vec<&str> = after
        .lines()
        .filter(|l| l.starts_with("lb_egress_qdisc{"))
        .collect();
    ensure!(
        egress.len() == 3 && egress.iter().all(|l| l.ends_with(" 0.0")),
        "lb_egress_qdisc: {egress:?}"
    );
    for family in [
        "lb_uplink_suspicions_total",
        "lb_uplink_false_alarms_total",
        "lb_uplink_syn_retries_total",
        "lb_uplink_inbound_connections_total",
        "lb_guard_dropped_packets_total",
    ] {
        ensure!(after.contains(family), "no {family} in {after}");
    }
    ensure!(
        sum(&after, "lb_uplink_quota_bytes") == 2e9,
        "quotas: {after}"
    );
    // The usage is brought up to date once a second.
    let was = sum(&before, "lb_uplink_quota_used_bytes");
    lb_tests::stream::wait_for("the quota usage to move", Duration::from_secs(10), || {
        Ok(sum(&scrape(&lab)?, "lb_uplink_quota_used_bytes") > was)
    })?;
    leaks.check()?;
    lbd.stop(&mut lab)
}

#[test]
fn lbctl_flows_lists_filters_and_stops_at_the_limit() -> Result<()> {
    if !require_root("lbctl_flows_lists_filters_and_stops_at_the_limit") {
        return Ok(());
    }
    let mut lab = Lab::up(&LabDesc::shipped("default")?, &unique_prefix())?;
    let leaks = LanLeaks::install(&lab)?;
    let lbd = Lbd::start(&mut lab, &LabConfig::default().render())?;
    let server: SocketAddr = "198.51.100.10:7500".parse()?;
    let _echo = UdpEchoServer::start(lab.ns("inet")?, server)?;
    let flows = udp_flows(lab.ns("client")?, server, 20, Duration::from_secs(10))?;
    ensure!(flows.iter().all(|f| f.outcome.is_ok()), "some flows failed");

    let list = |args: &[&str]| -> Result<serde_json::Value> {
        let mut all = vec!["flows", "--json"];
        all.extend_from_slice(args);
        Ok(serde_json::from_str(&lbd.lbctl(&all)?)?)
    };
    let every = list(&[])?;
    let entries = every["flows"].as_array().context("no flows")?;
    ensure!(
        entries.len() == 20,
        "{} flows listed, 20 made",
        entries.len()
    );
    for f in entries {
        let nat = f["nat"].as_str().unwrap_or_default();
        let uplink = f["uplink"].as_str().unwrap_or_default();
        let want = match uplink {
            "isp1" => "100.64.1.2:",
            "isp2" => "100.64.2.2:",
            other => anyhow::bail!("flow on uplink {other:?}: {f}"),
        };
        ensure!(
            nat.starts_with(want)
                && f["client"]
                    .as_str()
                    .is_some_and(|c| c.starts_with("10.10.0.2:"))
                && f["remote"] == "198.51.100.10:7500"
                && f["proto"] == "udp",
            "flow {f}"
        );
    }
    let isp1 = list(&["--uplink", "isp1"])?["flows"]
        .as_array()
        .map(Vec::len)
        .unwrap_or(0) as u64;
    ensure!(
        isp1 == lbd.uplink_counter("isp1", "flows")?,
        "--uplink isp1 listed {isp1}, status says {}",
        lbd.uplink_counter("isp1", "flows")?
    );
    let nobody = list(&["--client", "10.10.0.9"])?;
    ensure!(nobody["flows"].as_array().is_some_and(Vec::is_empty));
    let five = list(&["--limit", "5"])?;
    ensure!(
        five["flows"].as_array().map(Vec::len) == Some(5) && five["truncated"] == true,
        "--limit 5: {five}"
    );
    let (code, said) = lbd.lbctl_refused(&["flows", "--uplink", "nope"])?;
    ensure!(
        code == 1 && said.contains("no uplink named \"nope\" (uplinks: isp1, isp2)"),
        "an unknown uplink: exit {code}, {said:?}"
    );
    println!("{}", lbd.lbctl(&["flows", "--limit", "3"])?);
    leaks.check()?;
    lbd.stop(&mut lab)
}

#[test]
fn events_tell_what_happened_and_follow_streams_them() -> Result<()> {
    if !require_root("events_tell_what_happened_and_follow_streams_them") {
        return Ok(());
    }
    let mut lab = Lab::up(&LabDesc::shipped("default")?, &unique_prefix())?;
    let leaks = LanLeaks::install(&lab)?;
    let lbd = Lbd::start(&mut lab, &LabConfig::default().render())?;
    let mut follower = lbd.lbctl_spawn(&["events", "--follow", "--json"])?;
    let stdout = follower.stdout.take().context("the follower's stdout")?;
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let lines = seen.clone();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if let Ok(mut l) = lines.lock() {
                l.push(line);
            }
        }
    });

    lbd.lbctl(&["uplink", "disable", "isp1"])?;
    lbd.lbctl(&["uplink", "enable", "isp1"])?;
    lab.set_link_up("isp1", "down0", false)?;
    let has = |kind: &str, text: &str| {
        seen.lock().is_ok_and(|l| {
            l.iter()
                .any(|e| e.contains(&format!("\"kind\":\"{kind}\"")) && e.contains(text))
        })
    };
    let heard = lb_tests::stream::wait_for(
        "the follower to hear it all",
        Duration::from_secs(10),
        || {
            Ok(has("operator", "uplink isp1 disabled")
                && has("operator", "uplink isp1 enabled")
                && has("health", "carrier lost on wan1")
                && has("lifecycle", "waiting for carrier"))
        },
    );
    if heard.is_err() {
        eprintln!("the follower heard: {:?}", seen.lock().map(|l| l.clone()));
    }
    heard?;
    let _ = follower.kill();
    let _ = follower.wait();
    // The history holds it too, from lbd's start on.
    let history = lbd.lbctl(&["events"])?;
    eprintln!("{history}");
    for needle in ["started", "disabled", "carrier lost on wan1"] {
        ensure!(history.contains(needle), "no {needle:?} in:\n{history}");
    }
    lab.set_link_up("isp1", "down0", true)?;
    leaks.check()?;

    // A follower hears lbd go away, and says so (exit 3), once it has
    // printed the history (it is connected then).
    let mut last = lbd.lbctl_spawn(&["events", "--follow"])?;
    let mut first = String::new();
    // Held open to the end: what lbd says as it stops must find a reader
    // (else the follower dies of SIGPIPE, not of lbd's going).
    let mut printed =
        std::io::BufReader::new(last.stdout.take().context("the last follower's stdout")?);
    std::io::BufRead::read_line(&mut printed, &mut first)?;
    ensure!(!first.is_empty(), "the follower printed no history");
    lbd.stop(&mut lab)?;
    let mut ended = None;
    lb_tests::stream::wait_for("the follower to end", Duration::from_secs(10), || {
        ended = last.try_wait()?;
        Ok(ended.is_some())
    })?;
    ensure!(
        ended.and_then(|s| s.code()) == Some(3),
        "a follower whose lbd stopped ended with {ended:?}"
    );
    drop(printed);
    Ok(())
}

#[test]
fn explain_predicts_where_connections_go() -> Result<()> {
    if !require_root("explain_predicts_where_connections_go") {
        return Ok(());
    }
    let mut lab = Lab::up(&LabDesc::shipped("default")?, &unique_prefix())?;
    let leaks = LanLeaks::install(&lab)?;
    let lbd = Lbd::start(&mut lab, &LabConfig::default().render())?;
    let sink = lb_tests::stream::Sink::start(&lab)?;
    let explain = |args: &[&str]| -> Result<serde_json::Value> {
        let mut all = vec!["explain", "--json"];
        all.extend_from_slice(args);
        Ok(serde_json::from_str(&lbd.lbctl(&all)?)?)
    };
    let nat = |uplink: &serde_json::Value| -> Result<[u8; 4]> {
        match uplink.as_str() {
            Some("isp1") => Ok([100, 64, 1, 2]),
            Some("isp2") => Ok([100, 64, 2, 2]),
            other => anyhow::bail!("uplink {other:?}"),
        }
    };
    // New flows: the prediction is where they really go.
    for port in 8100..8110u16 {
        let src = format!("10.10.0.2:{port}");
        let said = explain(&[&src, "198.51.100.10:9000", "udp"])?;
        ensure!(
            said["verdict"] == "new" && said["bucket"].is_u64(),
            "{said}"
        );
        let want = nat(&said["uplink"])?;
        ensure!(
            lb_tests::stream::port_on(&lab, &sink, want, port)? == port,
            "port {port}: explain said {}, it went elsewhere",
            said["uplink"]
        );
        // Now it is an existing flow, on the same uplink.
        let again = explain(&[&src, "198.51.100.10:9000", "udp"])?;
        ensure!(
            again["verdict"] == "existing" && again["uplink"] == said["uplink"],
            "{again}"
        );
    }
    // What names no connection is refused (exit 2), saying what to give.
    for (bad, says) in [
        (
            &["explain", "10.10.0.2:5000", "198.51.100.10", "tcp"][..],
            "give the remote port",
        ),
        (
            &["explain", "10.10.0.2", "198.51.100.10", "icmpv6"],
            "for IPv4 say icmp",
        ),
        (&["status", "--watch", "--json"], "give one of them"),
    ] {
        let (code, said) = lbd.lbctl_refused(bad)?;
        ensure!(
            code == 2 && said.contains(says),
            "lbctl {bad:?}: exit {code}, {said:?}"
        );
    }
    // The router and the LAN are the kernel's.
    for dst in ["10.10.0.1:22", "10.10.0.3:80"] {
        let said = explain(&["10.10.0.2:5555", dst])?;
        ensure!(said["verdict"] == "kernel", "{dst}: {said}");
    }
    // With isp1 out, a flow of its buckets goes to isp2, and says why.
    lbd.lbctl(&["uplink", "disable", "isp1"])?;
    let said = explain(&["10.10.0.2:9999", "198.51.100.10:443"])?;
    ensure!(said["uplink"] == "isp2", "{said}");
    println!(
        "{}",
        lbd.lbctl(&["explain", "10.10.0.2:9999", "198.51.100.10:443"])?
    );
    leaks.check()?;
    lbd.stop(&mut lab)
}

/// A numbered stream through the lab, and a check that it lost nothing and
/// kept its address.
fn steady_stream(
    lab: &Lab,
    sink: &lb_tests::stream::Sink,
    port: u16,
) -> Result<(lb_tests::stream::Stream, [u8; 4])> {
    let stream = lb_tests::stream::Stream::start(lab, port, Duration::from_millis(10))?;
    lb_tests::stream::wait_for("the stream", Duration::from_secs(10), || {
        Ok(sink.stream(port).len() >= 10)
    })?;
    let via = sink.stream(port)[0].2;
    Ok((stream, via))
}

fn unbroken(
    sink: &lb_tests::stream::Sink,
    stream: &lb_tests::stream::Stream,
    via: [u8; 4],
) -> Result<()> {
    let upto = stream.sent() + 10;
    let lost = lb_tests::stream::lost_before(sink, stream, upto)?;
    ensure!(lost.is_empty(), "the stream lost {} datagrams", lost.len());
    ensure!(
        sink.stream(stream.port()).iter().all(|&(_, _, a)| a == via),
        "the stream changed address"
    );
    Ok(())
}

/// What `lbctl reload` said when it was refused; empty if it was not.
fn reload_refusal(lbd: &Lbd) -> String {
    lbd.lbctl(&["reload"])
        .err()
        .map(|e| format!("{e:#}"))
        .unwrap_or_default()
}

#[test]
fn reload_applies_changes_in_place_and_refuses_a_bad_file() -> Result<()> {
    if !require_root("reload_applies_changes_in_place_and_refuses_a_bad_file") {
        return Ok(());
    }
    let mut lab = Lab::up(&LabDesc::shipped("default")?, &unique_prefix())?;
    let leaks = LanLeaks::install(&lab)?;
    let lbd = Lbd::start(&mut lab, &LabConfig::default().render())?;
    let sink = lb_tests::stream::Sink::start(&lab)?;
    let (stream, via) = steady_stream(&lab, &sink, 8300)?;

    let weighted = |w: &str| {
        LabConfig {
            uplinks: &[(1, w), (2, "")],
            ..LabConfig::default()
        }
        .render()
    };
    lbd.write_config(&lab, &weighted("weight = 3"))?;
    let said = lbd.lbctl(&["reload"])?;
    ensure!(said.contains("isp1: weight 1 -> 3"), "{said}");
    let status = lbd.status()?;
    ensure!(
        status["uplinks"][0]["buckets"] == 3072 && status["uplinks"][1]["buckets"] == 1024,
        "buckets after the reload: {status}"
    );

    // A bad file: refused with what --check says, nothing changed.
    lbd.write_config(&lab, &weighted("weight = \"x\""))?;
    let refused = reload_refusal(&lbd);
    eprintln!("{refused}");
    ensure!(
        refused.contains("nothing changed")
            && refused.contains("weight")
            && refused.contains("lbd.toml:"),
        "a bad file was not refused as --check would: {refused:?}"
    );
    ensure!(
        lbd.status()?["uplinks"][0]["weight"] == 3,
        "the bad file changed something"
    );

    // SIGHUP does the same.
    lbd.write_config(&lab, &weighted("weight = 5"))?;
    lbd.signal(&lab, "HUP")?;
    lb_tests::stream::wait_for("SIGHUP's reload", Duration::from_secs(10), || {
        Ok(lbd.status()?["uplinks"][0]["weight"] == 5)
    })?;
    unbroken(&sink, &stream, via)?;
    drop(stream);
    leaks.check()?;
    lbd.stop(&mut lab)
}

#[test]
fn reload_with_an_uplink_added_starts_again_without_dropping_a_flow() -> Result<()> {
    if !require_root("reload_with_an_uplink_added_starts_again_without_dropping_a_flow") {
        return Ok(());
    }
    let mut lab = Lab::up(&LabDesc::shipped("default")?, &unique_prefix())?;
    let leaks = LanLeaks::install(&lab)?;
    let alone = LabConfig {
        uplinks: &[(1, "")],
        ..LabConfig::default()
    };
    let lbd = Lbd::start(&mut lab, &alone.render())?;
    let sink = lb_tests::stream::Sink::start(&lab)?;
    let (stream, via) = steady_stream(&lab, &sink, 8400)?;

    // A LAN that is not there: the new lbd would refuse to start, so the
    // reload is refused and this lbd goes on.
    let missing_lan = LabConfig {
        lans: &["lan0", "lan9"],
        ..LabConfig::default()
    };
    lbd.write_config(&lab, &missing_lan.render())?;
    let refused = reload_refusal(&lbd);
    eprintln!("{refused}");
    ensure!(
        refused.contains("nothing changed") && refused.contains("lan9"),
        "a reload the new lbd would refuse was not refused, naming the missing LAN: {refused:?}"
    );
    let status = lbd.status()?;
    ensure!(
        status["uplinks"].as_array().map(Vec::len) == Some(1),
        "lbd changed after a refused reload: {status}"
    );

    lbd.write_config(&lab, &LabConfig::default().render())?;
    let said = lbd.lbctl(&["reload"])?;
    eprintln!("{said}");
    ensure!(said.contains("starting again"), "{said}");
    lb_tests::stream::wait_for("isp2 in service", Duration::from_secs(20), || {
        Ok(lbd
            .status()
            .is_ok_and(|s| s["uplinks"][1]["lifecycle"] == "in service"))
    })?;
    unbroken(&sink, &stream, via)?;
    drop(stream);
    leaks.check()?;
    lbd.stop(&mut lab)
}

#[test]
fn lbd_tells_systemd_it_is_ready_once_it_answers() -> Result<()> {
    if !require_root("lbd_tells_systemd_it_is_ready_once_it_answers") {
        return Ok(());
    }
    let mut lab = Lab::up(&LabDesc::shipped("default")?, &unique_prefix())?;
    // systemd's side of Type=notify: a datagram socket named in
    // NOTIFY_SOCKET.
    let path = std::env::temp_dir().join(format!("{}notify", lab.prefix()));
    let _ = std::fs::remove_file(&path);
    let systemd = std::os::unix::net::UnixDatagram::bind(&path)
        .with_context(|| format!("binding {}", path.display()))?;
    systemd.set_read_timeout(Some(Duration::from_secs(10)))?;
    let env = format!("NOTIFY_SOCKET={}", path.display());
    // `start` returns once lbd answers lbctl; READY=1 must be there by then.
    let lbd = Lbd::start_with_env(&mut lab, &LabConfig::default().render(), &[&env])?;
    let mut buf = [0u8; 512];
    let n = systemd.recv(&mut buf).context("no notification from lbd")?;
    let said = String::from_utf8_lossy(&buf[..n]).to_string();
    let _ = std::fs::remove_file(&path);
    ensure!(
        said.lines().any(|l| l == "READY=1"),
        "lbd told systemd {said:?}"
    );
    lbd.stop(&mut lab)
}

#[test]
fn what_the_operator_said_of_an_uplink_outlives_a_restart_until_the_file_changes() -> Result<()> {
    if !require_root(
        "what_the_operator_said_of_an_uplink_outlives_a_restart_until_the_file_changes",
    ) {
        return Ok(());
    }
    let mut lab = Lab::up(&LabDesc::shipped("default")?, &unique_prefix())?;
    let mut lbd = Lbd::start(&mut lab, &LabConfig::default().render())?;
    // isp2 out for the modem's maintenance, isp1 given more of the load.
    lbd.lbctl(&["uplink", "disable", "isp2"])?;
    lbd.lbctl(&["uplink", "weight", "isp1", "3"])?;
    let said = |lbd: &Lbd| -> Result<(String, String)> {
        let status = lbd.status()?;
        let (isp1, isp2) = (&status["uplinks"][0], &status["uplinks"][1]);
        Ok((
            format!("{}/{}", isp1["admin"], isp1["weight"]),
            format!("{}/{}", isp2["admin"], isp2["weight"]),
        ))
    };
    let before = said(&lbd)?;

    // An upgrade: lbd stops and starts again.
    lbd.stop_keeping(&mut lab)?;
    lbd.restart(&mut lab)?;
    let after = said(&lbd)?;
    eprintln!("isp1, isp2 before the restart: {before:?}; after: {after:?}");
    ensure!(
        after == ("\"enabled\"/3".to_string(), "\"disabled\"/1".to_string()),
        "what the operator said did not outlive the restart: {before:?} before, {after:?} after"
    );

    // The operator edits isp1's weight in the file: the file wins; isp2
    // stays out until it is enabled.
    let edited = LabConfig {
        uplinks: &[(1, "weight = 2"), (2, "")],
        ..LabConfig::default()
    };
    lbd.stop_keeping(&mut lab)?;
    lbd.restart_with(&mut lab, &edited.render())?;
    let edited_said = said(&lbd)?;
    ensure!(
        edited_said == ("\"enabled\"/2".to_string(), "\"disabled\"/1".to_string()),
        "after the file's weight changed: {edited_said:?}"
    );
    lbd.lbctl(&["uplink", "enable", "isp2"])?;
    lbd.stop_keeping(&mut lab)?;
    lbd.restart(&mut lab)?;
    let enabled = said(&lbd)?;
    ensure!(
        enabled.1 == "\"enabled\"/1",
        "isp2 enabled before the restart came back {enabled:?}"
    );
    lbd.stop(&mut lab)
}
