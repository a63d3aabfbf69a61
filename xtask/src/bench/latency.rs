//! Latency under load: a ping's round trip beside 8 saturating TCP
//! uploads through lb, with the router's shaper and without.
//!
//! The lab's isp1 gets a "modem": a 25 Mbit/s `tbf` with 400 ms of buffer
//! on its way up, as a DSL or cable modem has. Three ways take turns:
//! - no shaper on the router: the modem's buffer fills;
//! - an SQM-style `tbf` on wan1 (20 Mbit/s, 20 ms of queue), which lb
//!   honours (its packets pass it through the tc hand-off);
//! - lb's own shaper (`[uplink.shape] upload = "20mbit"`): HTB with a leaf
//!   per client.

use std::{
    process::{Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use anyhow::{ensure, Context, Result};
use lb_tests::{
    daemon::{LabConfig, Lbd},
    stream::wait_for,
    traffic::wait_tcp_listener,
    Lab, LabDesc,
};

const PREFIX: &str = "lbl-";
const IPERF_PORT: u16 = 5201;
const SERVER: &str = "198.51.100.10";
/// Pings per window, 200 ms apart, once the uploads have filled their
/// queue.
pub const PINGS: u32 = 15;

/// One way of queueing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Way {
    NoShaper,
    Sqm,
    LbShaper,
}

impl Way {
    pub const ALL: [Way; 3] = [Way::NoShaper, Way::Sqm, Way::LbShaper];

    pub fn label(self) -> &'static str {
        match self {
            Way::NoShaper => "no shaper on the router",
            Way::Sqm => "operator's tbf on wan1 (20 Mbit/s, 20 ms), honoured by lb",
            Way::LbShaper => "lb's shaper ([uplink.shape] upload = \"20mbit\")",
        }
    }
}

/// Round-trip times of one way, over all its windows, in ms.
pub struct WayRtts {
    pub way: Way,
    pub rtts: Vec<f64>,
    /// Pings sent, and answered.
    pub sent: u32,
}

/// Measure every way `runs` times, taking turns.
pub fn measure(runs: u32, interrupted: &AtomicBool) -> Result<Vec<WayRtts>> {
    Lab::down(PREFIX)?;
    let mut lab = Lab::up(&LabDesc::shipped("default")?, PREFIX)?;
    lab.exec(
        "isp1",
        &[
            "tc", "qdisc", "add", "dev", "up0", "root", "tbf", "rate", "25mbit", "burst", "32kb",
            "latency", "400ms",
        ],
    )?;
    lab.spawn(
        "inet",
        &[
            "iperf3",
            "-s",
            "-p",
            &IPERF_PORT.to_string(),
            "--logfile",
            "/dev/null",
        ],
    )?;
    wait_tcp_listener(lab.ns("inet")?, IPERF_PORT, Duration::from_secs(10))?;
    let mut results: Vec<WayRtts> = Way::ALL
        .iter()
        .map(|&way| WayRtts {
            way,
            rtts: Vec::new(),
            sent: 0,
        })
        .collect();
    for round in 1..=runs {
        for result in &mut results {
            ensure!(!interrupted.load(Ordering::Relaxed), "interrupted");
            let rtts = window(&mut lab, result.way)
                .with_context(|| format!("round {round}, {}", result.way.label()))?;
            let mut sorted = rtts.clone();
            sorted.sort_by(f64::total_cmp);
            println!(
                "  round {round}/{runs}: {:<62} median {:>6.1} ms ({} of {PINGS} answered)",
                result.way.label(),
                sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN),
                rtts.len()
            );
            result.rtts.extend(rtts);
            result.sent += PINGS;
        }
    }
    Ok(results)
}

/// One window of `way`: lbd up with its queueing, 8 uploads, pings.
fn window(lab: &mut Lab, way: Way) -> Result<Vec<f64>> {
    let shape = "[uplink.shape]\nupload = \"20mbit\"\n";
    let config = LabConfig {
        uplinks: &[(1, if way == Way::LbShaper { shape } else { "" })],
        ..LabConfig::default()
    };
    if way == Way::Sqm {
        lab.exec(
            "router",
            &[
                "tc", "qdisc", "add", "dev", "wan1", "root", "tbf", "rate", "20mbit", "burst",
                "32kb", "latency", "20ms",
            ],
        )?;
    }
    let lbd = Lbd::start(lab, &config.render())?;
    let measured = (|| {
        if way != Way::NoShaper {
            wait_for(
                "lbd to send through wan1's qdisc",
                Duration::from_secs(10),
                || Ok(lbd.uplink("isp1")?["egress"]["path"] == "qdisc"),
            )?;
        }
        pings_beside_uploads(lab)
    })();
    // Stopped keeping its data plane, so that the teardown (which removes
    // its shaper too) has nobody putting it back.
    let stopped = lbd
        .stop_keeping(lab)
        .and_then(|()| lbd.teardown(lab))
        .map(drop);
    if way == Way::Sqm {
        lab.exec("router", &["tc", "qdisc", "del", "dev", "wan1", "root"])?;
    }
    let rtts = measured?;
    stopped?;
    Ok(rtts)
}

fn pings_beside_uploads(lab: &Lab) -> Result<Vec<f64>> {
    let ns = lab.ns("client")?.to_owned();
    let load = {
        let ns = ns.clone();
        std::thread::spawn(move || {
            Command::new("ip")
                .args([
                    "netns", "exec", &ns, "timeout", "30", "iperf3", "-c", SERVER,
                ])
                .args(["-p", &IPERF_PORT.to_string(), "-P", "8", "-t", "6"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
        })
    };
    // The uploads fill whatever queue they fill within a second or two.
    std::thread::sleep(Duration::from_secs(2));
    let out = Command::new("ip")
        .args(["netns", "exec", &ns, "ping", "-c", &PINGS.to_string()])
        .args(["-i", "0.2", "-W", "2", SERVER])
        .stdin(Stdio::null())
        .output()
        .context("running ping")?;
    let _ = load.join();
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split("time=").nth(1))
        .filter_map(|t| t.split_whitespace().next()?.parse().ok())
        .collect())
}
