//! Failover time: from the moment an uplink fails to the first packet of a
//! flow that used it arriving at the internet host through the other
//! uplink. Two failures (the ISP's upstream cut while its gateway still
//! answers; the router's uplink interface losing its carrier), two ways of
//! failing over (lb: lbd with its default probes; the kernel's way with a
//! Netwatch-style script, `netwatch.sh`, that probes once a second and
//! rewrites routes), measured alike and taking turns, so drifting load on
//! the machine hits both.
//!
//! One run: a new flow pinned to isp1 (found with one-datagram probes, see
//! `lb_tests::stream`) sends a datagram every millisecond; the benchmark
//! notes the time, fails the link, and waits for the sink to see the flow
//! arrive from isp2's address. Then it restores the link and waits until
//! the way in turn uses isp1 again, ready for the next run.
//!
//! Both ways probe in rounds (lbd every 50 ms, the script every second),
//! and when in its round a failure strikes decides much of how long it
//! takes to notice. A run that started right after the way noticed the
//! recovery would always strike at the same point of the round, so once
//! the flow runs, run k of n waits (k + u) / n s before the cut, u random
//! in [0, 1): the cuts cover the script's 1 s round evenly and fall at
//! random points of lbd's, the same delays for both ways.

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use lb_tests::{
    daemon::{LabConfig, Lbd},
    stream::{outage, port_on, wait_for, Sink, Stream},
    Lab, LabDesc,
};

use super::forward::{kernel_off, kernel_on};

/// Namespace prefix of this part's lab (not the forwarding lab's: that one
/// drops everything at the ISPs).
const PREFIX: &str = "lbf-";
const LAB: &str = "default";
/// The streams' pace: the failover time's resolution.
const PACE: Duration = Duration::from_millis(1);
/// Datagrams that must arrive, before the cut through isp1 and after it
/// through isp2, for a run to count.
const STEADY: usize = 50;
/// Longest wait for a failover (the script's is 1 to 2 s) or a recovery.
const LIMIT: Duration = Duration::from_secs(10);
/// The longest probe round of the two ways (the script's): the cuts'
/// delays cover it.
const ROUND: Duration = Duration::from_secs(1);
const ISP1_NAT: [u8; 4] = [100, 64, 1, 2];
const ISP2_NAT: [u8; 4] = [100, 64, 2, 2];
/// Where both ways probe, through each uplink.
const TARGET: &str = "198.51.100.10";
/// First client port the runs use; each run takes new ones (in lb a flow
/// moved to isp2 stays there).
const FIRST_PORT: u16 = 5000;
const NETWATCH: &str = include_str!("netwatch.sh");

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// isp1's link to the internet goes down; its gateway still answers.
    UpstreamCut,
    /// isp1's end of the router's wan1 goes down: wan1 loses its carrier.
    CarrierLoss,
}

impl Failure {
    pub const ALL: [Failure; 2] = [Failure::UpstreamCut, Failure::CarrierLoss];

    pub fn label(self) -> &'static str {
        match self {
            Failure::UpstreamCut => "upstream cut behind isp1",
            Failure::CarrierLoss => "carrier loss on the router's wan1",
        }
    }

    /// The link that fails: (host, interface).
    fn link(self) -> (&'static str, &'static str) {
        match self {
            Failure::UpstreamCut => ("isp1", "up0"),
            Failure::CarrierLoss => ("isp1", "down0"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Way {
    Lb,
    Netwatch,
}

impl Way {
    pub const ALL: [Way; 2] = [Way::Lb, Way::Netwatch];

    pub fn label(self) -> &'static str {
        match self {
            Way::Lb => "lb (lbd, default probes)",
            Way::Netwatch => "Netwatch-style script",
        }
    }
}

/// One failover.
#[derive(Clone, Copy, Debug)]
pub struct Run {
    /// From just before the link went down to the first datagram through
    /// isp2.
    pub time: Duration,
    /// Datagrams of the stream that never arrived.
    pub lost: u32,
    /// How long the `ip link set` command that failed the link took (it is
    /// part of `time`: the link went down at some point within it).
    pub cut_command: Duration,
}

pub struct Case {
    pub failure: Failure,
    pub way: Way,
    pub runs: Vec<Run>,
}

/// Bring the lab up, fail over `runs` times per failure and way, and take
/// the lab down again (also on error).
pub fn measure(runs: u32, interrupted: &AtomicBool) -> Result<Vec<Case>> {
    Lab::down(PREFIX)?;
    let desc = LabDesc::shipped(LAB).with_context(|| format!("loading lab {LAB}"))?;
    let mut lab = Lab::up(&desc, PREFIX)?;
    let sink = Sink::start(&lab)?;
    let mut cases: Vec<Case> = Failure::ALL
        .iter()
        .flat_map(|&failure| {
            Way::ALL.iter().map(move |&way| Case {
                failure,
                way,
                runs: Vec::new(),
            })
        })
        .collect();
    let mut next_port = FIRST_PORT;
    use std::hash::BuildHasher as _;
    let random = std::collections::hash_map::RandomState::new();
    for round in 1..=runs {
        // u in [0, 1) from a randomly seeded hash: no generator needed.
        let u = random.hash_one(round) as f64 / (u64::MAX as f64 + 1.0);
        let delay = ROUND.mul_f64((f64::from(round - 1) + u) / f64::from(runs));
        for way in Way::ALL {
            let mut running = Running::start(&mut lab, way)?;
            for failure in Failure::ALL {
                ensure!(!interrupted.load(Ordering::Relaxed), "interrupted");
                let run = running
                    .failover(&sink, failure, delay, &mut next_port)
                    .with_context(|| {
                        format!("round {round}, {}, {}", way.label(), failure.label())
                    });
                let run = match run {
                    Ok(run) => run,
                    Err(e) => return Err(first_error(e, running.stop())),
                };
                println!(
                    "  round {round}/{runs}: {:<24} {:<34} {:>5.0} ms, {:>4} datagrams lost",
                    way.label(),
                    failure.label(),
                    run.time.as_secs_f64() * 1e3,
                    run.lost
                );
                if let Some(case) = cases
                    .iter_mut()
                    .find(|c| c.way == way && c.failure == failure)
                {
                    case.runs.push(run);
                }
            }
            running.stop()?;
        }
    }
    drop(sink);
    drop(lab);
    Ok(cases)
}

/// `error`, noting a failure to stop the way that came after it.
fn first_error(error: anyhow::Error, stop: Result<()>) -> anyhow::Error {
    match stop {
        Ok(()) => error,
        Err(e) => error.context(format!("(and stopping the way failed too: {e:#})")),
    }
}

/// A way of failing over, running in the lab.
struct Running<'a> {
    lab: &'a mut Lab,
    way: RunningWay,
}

enum RunningWay {
    Lb(Lbd),
    /// The script's pid.
    Netwatch(u32),
}

impl<'a> Running<'a> {
    fn start(lab: &'a mut Lab, way: Way) -> Result<Running<'a>> {
        let way = match way {
            Way::Lb => {
                // lbd as an operator would run it: an ICMP probe per uplink
                // to the internet host, every other setting its default.
                let probe = format!("[[uplink.probe]]\nkind = \"icmp\"\ntarget = \"{TARGET}\"");
                let config = LabConfig {
                    uplinks: &[(1, &probe), (2, &probe)],
                    ..LabConfig::default()
                };
                RunningWay::Lb(Lbd::start(lab, &config.render())?)
            }
            Way::Netwatch => {
                kernel_on(lab)?;
                // The script's text as an argument: no file for anyone to
                // swap between writing and running it.
                let args = [
                    "bash",
                    "-c",
                    NETWATCH,
                    "netwatch.sh",
                    TARGET,
                    "wan1:100.64.1.1",
                    "wan2:100.64.2.1",
                ];
                RunningWay::Netwatch(lab.spawn("router", &args)?)
            }
        };
        let running = Running { lab, way };
        running.wait_until_isp1_in_use()?;
        Ok(running)
    }

    fn stop(self) -> Result<()> {
        match self.way {
            RunningWay::Lb(lbd) => lbd.stop(self.lab),
            RunningWay::Netwatch(pid) => {
                self.lab.stop(pid)?;
                kernel_off(self.lab)
            }
        }
    }

    /// One failover of a new flow on isp1, `delay` after it flows, and back.
    fn failover(
        &mut self,
        sink: &Sink,
        failure: Failure,
        delay: Duration,
        next_port: &mut u16,
    ) -> Result<Run> {
        let port = port_on(self.lab, sink, ISP1_NAT, *next_port)?;
        *next_port = port + 1;
        let stream = Stream::start(self.lab, port, PACE)?;
        wait_for("the stream through isp1", LIMIT, || {
            Ok(arrived_via(sink, port, ISP1_NAT) >= STEADY)
        })?;

        // A deliberate wait, not a stand-in for a condition: see the top.
        std::thread::sleep(delay);
        let (host, ifname) = failure.link();
        let cut = Instant::now();
        self.lab.set_link_up(host, ifname, false)?;
        let cut_command = cut.elapsed();
        wait_for("the stream through isp2", LIMIT, || {
            Ok(arrived_via(sink, port, ISP2_NAT) >= STEADY)
        })?;
        let moved = sink
            .first_via(port, ISP2_NAT, cut)
            .context("the stream's first datagram through isp2 is gone")?;
        let lost = outage(sink, &stream, ISP2_NAT).lost;
        drop(stream);

        self.lab.set_link_up(host, ifname, true)?;
        self.wait_until_isp1_in_use()?;
        Ok(Run {
            time: moved.saturating_duration_since(cut),
            lost,
            cut_command,
        })
    }

    /// Wait until the way sends new flows through isp1 again: lbd reports
    /// it up, or the script has routed table 1 back through wan1.
    fn wait_until_isp1_in_use(&self) -> Result<()> {
        match &self.way {
            RunningWay::Lb(lbd) => {
                wait_for("lbd to report isp1 up", LIMIT, || {
                    let status = lbd.status()?;
                    Ok(status["uplinks"][0]["health"] == "up"
                        && status["uplinks"][1]["health"] == "up")
                })
            }
            RunningWay::Netwatch(_) => wait_for("the script to route through wan1", LIMIT, || {
                let routes = self
                    .lab
                    .exec("router", &["ip", "route", "show", "table", "1"])?;
                Ok(routes.contains("dev wan1"))
            }),
        }
    }
}

/// Datagrams from client port `port` that arrived from address `via`.
fn arrived_via(sink: &Sink, port: u16, via: [u8; 4]) -> usize {
    sink.stream(port)
        .iter()
        .filter(|&&(_, _, a)| a == via)
        .count()
}
