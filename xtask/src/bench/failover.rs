//! Failover time: from the moment an uplink fails to the moment traffic
//! that used it arrives at the internet host through the other uplink.
//!
//! Two failures, each against the way routers without lb handle it:
//!
//! - An upstream cut (isp1's link to the internet; its gateway still
//!   answers). Only probes beyond the gateway can see it, so lb (lbd with
//!   its default probes) runs beside a Netwatch-style script (`netwatch.sh`)
//!   that probes once a second and rewrites routes. Measured on an
//!   established flow pinned to isp1: until its first datagram arrives from
//!   isp2's address.
//! - A carrier loss on the router's wan1. The kernel sees this one at once,
//!   so lb runs beside the kernel on its own (nftables PCC marks, a routing
//!   table per uplink, a default route per uplink in main, routes over a
//!   link without carrier ignored): no script, nothing in user space.
//!   Measured on an established flow pinned to isp1, as above (the kernel
//!   moves it too: a masqueraded connection whose packets now leave by
//!   another interface is dropped and forgotten by conntrack, and its next
//!   packet starts a new one), and in the same cut on a stream of new
//!   connections (each datagram from a new port), until the last datagram
//!   that was lost.
//!
//! One run of a way: start the streams, note the time, fail the link, wait
//! until the traffic has moved, restore the link, and wait until the way
//! uses isp1 again. The ways take turns, so drifting load on the machine
//! hits all of them.
//!
//! Both probing ways probe in rounds (lbd every 50 ms, the script every
//! second), and when in its round a failure strikes decides much of how long
//! it takes to notice. A run that started right after the way noticed the
//! recovery would always strike at the same point of the round, so once the
//! traffic runs, run k of n waits (k + u) / n s before the cut, u random in
//! [0, 1): the cuts cover the script's 1 s round evenly and fall at random
//! points of lbd's 50 ms one, the same delays for every way.

use std::{
    collections::HashSet,
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
use super::picture::Trace;

/// Namespace prefix of this part's lab (not the forwarding lab's: that one
/// drops everything at the ISPs).
const PREFIX: &str = "lbf-";
const LAB: &str = "default";
/// The streams' pace: the failover time's resolution.
const PACE: Duration = Duration::from_millis(1);
/// Datagrams that must arrive, before the cut through isp1 and after it
/// through isp2, for a run to count.
const STEADY: usize = 50;
/// Consecutive datagrams of the new-connection stream that must arrive
/// after a cut for the traffic to count as moved: with new connections
/// split 1:1, a run this long that still used the dead uplink has odds of
/// 2^-100.
const MOVED_RUN: u32 = 100;
/// Longest wait for a failover (the script's is 1 to 2 s) or a recovery.
/// A bound for what must happen (a passive failover holds the uplink down
/// for 10 s, then 5 good rounds of 1 s bring it back).
const LIMIT: Duration = Duration::from_secs(30);
/// The longest probe round of the ways (the script's): the cuts' delays
/// cover it.
const ROUND: Duration = Duration::from_secs(1);
const ISP1_NAT: [u8; 4] = [100, 64, 1, 2];
const ISP2_NAT: [u8; 4] = [100, 64, 2, 2];
/// Where the probing ways probe, through each uplink.
const TARGET: &str = "198.51.100.10";
/// First client port the established flows use; each run takes new ones
/// (in lb a flow moved to isp2 stays there).
const FIRST_PORT: u16 = 5000;
/// Stream id (in place of a port) of the new-connection streams.
const FRESH_ID: u16 = 4000;
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
    /// lbd as it was before passive detection: 20 probes a second.
    LbFastProbes,
    Netwatch,
    Kernel,
}

impl Way {
    pub const ALL: [Way; 4] = [Way::Lb, Way::LbFastProbes, Way::Netwatch, Way::Kernel];

    pub fn label(self) -> &'static str {
        match self {
            Way::Lb => "lb (lbd, defaults: 1 probe/s, passive)",
            Way::LbFastProbes => "lb (50 ms probes, passive off)",
            Way::Netwatch => "Netwatch-style script",
            Way::Kernel => "kernel alone (PCC, linkdown routes ignored)",
        }
    }

    /// The failures this way is compared on.
    pub fn failures(self) -> &'static [Failure] {
        match self {
            Way::Lb => &Failure::ALL,
            Way::LbFastProbes => &[Failure::UpstreamCut],
            Way::Netwatch => &[Failure::UpstreamCut],
            Way::Kernel => &[Failure::CarrierLoss],
        }
    }
}

/// What was measured of one failover.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Traffic {
    /// One flow pinned to isp1 before the cut.
    Established,
    /// A new connection per datagram.
    NewConnections,
}

impl Traffic {
    pub fn label(self) -> &'static str {
        match self {
            Traffic::Established => "established flow",
            Traffic::NewConnections => "new connections",
        }
    }
}

/// One failover.
#[derive(Clone, Copy, Debug)]
pub struct Run {
    /// From just before the link went down until the traffic arrived
    /// through isp2: the first datagram of an established flow from isp2's
    /// address, or the last lost datagram of new connections.
    pub time: Duration,
    /// Datagrams of the stream that never arrived.
    pub lost: u32,
    /// How long the `ip link set` command that failed the link took (it is
    /// part of `time`: the link went down at some point within it).
    pub cut_command: Duration,
    /// lb only: how lbd's reaction went (see [`Reaction`]).
    pub reaction: Option<Reaction>,
}

/// lbd's part of a failover, as it reports it (`lbctl status`).
#[derive(Clone, Copy, Debug)]
pub struct Reaction {
    /// From lbd reading the kernel's event (or judging the probe round) to
    /// the uplink's state written in the data plane.
    pub event_to_dataplane: Duration,
    /// Of that, until the daemon took the change up.
    pub queued: Duration,
    /// From the cut to the data plane having it.
    pub cut_to_dataplane: Duration,
}

pub struct Case {
    pub failure: Failure,
    pub way: Way,
    pub traffic: Traffic,
    pub runs: Vec<Run>,
    /// The established flow per uplink around the first run's cut.
    pub trace: Option<Trace>,
}

/// Bring the lab up, fail over `runs` times per failure and way, and take
/// the lab down again (also on error).
pub fn measure(runs: u32, interrupted: &AtomicBool) -> Result<Vec<Case>> {
    Lab::down(PREFIX)?;
    let desc = LabDesc::shipped(LAB).with_context(|| format!("loading lab {LAB}"))?;
    let mut lab = Lab::up(&desc, PREFIX)?;
    // The streams are answered, as calls are: two-way traffic, which lb's
    // passive detection listens to.
    let sink = Sink::start_echoing(&lab)?;
    let mut cases: Vec<Case> = Vec::new();
    let mut next_port = FIRST_PORT;
    let mut next_id = FRESH_ID;
    use std::hash::BuildHasher as _;
    let random = std::collections::hash_map::RandomState::new();
    for round in 1..=runs {
        // u in [0, 1) from a randomly seeded hash: no generator needed.
        let u = random.hash_one(round) as f64 / (u64::MAX as f64 + 1.0);
        let delay = ROUND.mul_f64((f64::from(round - 1) + u) / f64::from(runs));
        for way in Way::ALL {
            let mut running = Running::start(&mut lab, way)?;
            for &failure in way.failures() {
                ensure!(!interrupted.load(Ordering::Relaxed), "interrupted");
                let mut streams = Streams {
                    sink: &sink,
                    next_port: &mut next_port,
                    next_id: &mut next_id,
                };
                let measured = running
                    .failover(&mut streams, failure, delay)
                    .with_context(|| {
                        format!("round {round}, {}, {}", way.label(), failure.label())
                    });
                let (measured, trace) = match measured {
                    Ok(m) => m,
                    Err(e) => return Err(first_error(e, running.stop())),
                };
                for (traffic, run) in measured {
                    println!(
                        "  round {round}/{runs}: {:<44} {:<34} {:<16} {:>7.1} ms, {:>4} datagrams lost",
                        way.label(),
                        failure.label(),
                        traffic.label(),
                        run.time.as_secs_f64() * 1e3,
                        run.lost
                    );
                    match cases
                        .iter_mut()
                        .find(|c| c.way == way && c.failure == failure && c.traffic == traffic)
                    {
                        Some(case) => case.runs.push(run),
                        None => cases.push(Case {
                            failure,
                            way,
                            traffic,
                            runs: vec![run],
                            trace: (traffic == Traffic::Established).then(|| trace.clone()),
                        }),
                    }
                }
            }
            running.stop()?;
        }
    }
    drop(sink);
    drop(lab);
    Ok(cases)
}

/// One restart of lbd under a running stream.
#[derive(Clone, Copy, Debug)]
pub struct Restart {
    /// Datagrams of the 1 ms stream that never arrived.
    pub lost: u32,
    /// From SIGTERM to the new lbd answering.
    pub downtime: Duration,
}

/// Restart lbd `runs` times (SIGTERM, start again: it adopts the pinned
/// data plane) while a flow sends a datagram every millisecond; what each
/// restart cost the flow. Its own lab, taken down again.
pub fn restarts(runs: u32, interrupted: &AtomicBool) -> Result<Vec<Restart>> {
    Lab::down(PREFIX)?;
    let desc = LabDesc::shipped(LAB).with_context(|| format!("loading lab {LAB}"))?;
    let mut lab = Lab::up(&desc, PREFIX)?;
    let sink = Sink::start(&lab)?;
    let mut lbd = Lbd::start(&mut lab, &LabConfig::default().render())?;
    let result = (|| {
        let stream = Stream::start(&lab, FIRST_PORT, PACE)?;
        wait_for("the stream", LIMIT, || {
            Ok(sink.stream(FIRST_PORT).len() >= STEADY)
        })?;
        let mut out = Vec::new();
        for run in 1..=runs {
            ensure!(!interrupted.load(Ordering::Relaxed), "interrupted");
            let stopped = Instant::now();
            lbd.stop_keeping(&mut lab)?;
            lbd.restart(&mut lab)?;
            let downtime = stopped.elapsed();
            // Counted once datagrams sent after the restart have arrived.
            let upto = stream.sent();
            wait_for("the stream after the restart", LIMIT, || {
                Ok(sink
                    .stream(FIRST_PORT)
                    .last()
                    .is_some_and(|&(seq, _, _)| seq >= upto + STEADY as u32))
            })?;
            let lost = outage(&sink, &stream, ISP1_NAT).lost;
            let before: u32 = out.iter().map(|r: &Restart| r.lost).sum();
            println!(
                "  restart {run}/{runs}: lbd away {:.0} ms, {} datagrams lost",
                downtime.as_secs_f64() * 1e3,
                lost - before
            );
            out.push(Restart {
                lost: lost - before,
                downtime,
            });
        }
        Ok(out)
    })();
    let stopped = lbd.stop(&mut lab);
    drop(sink);
    drop(lab);
    let out = result?;
    stopped?;
    Ok(out)
}

/// `error`, noting a failure to stop the way that came after it.
fn first_error(error: anyhow::Error, stop: Result<()>) -> anyhow::Error {
    match stop {
        Ok(()) => error,
        Err(e) => error.context(format!("(and stopping the way failed too: {e:#})")),
    }
}

/// The sink, and the ports and ids not used yet.
struct Streams<'a> {
    sink: &'a Sink,
    next_port: &'a mut u16,
    next_id: &'a mut u16,
}

impl Streams<'_> {
    /// A new flow that leaves through isp1, sending.
    fn established(&mut self, lab: &Lab) -> Result<Stream> {
        let port = port_on(lab, self.sink, ISP1_NAT, *self.next_port)?;
        *self.next_port = port + 1;
        Stream::start(lab, port, PACE)
    }

    /// A new stream of new connections, sending.
    fn new_connections(&mut self, lab: &Lab) -> Result<Stream> {
        let id = *self.next_id;
        *self.next_id += 1;
        Stream::start_fresh(lab, id, PACE)
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
    Kernel,
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
            Way::LbFastProbes => {
                // The defaults before passive detection.
                let probe = format!(
                    "[uplink.health]\ninterval = \"50ms\"\ntimeout = \"150ms\"\nrise = 10\n\
                     [[uplink.probe]]\nkind = \"icmp\"\ntarget = \"{TARGET}\""
                );
                let config = LabConfig {
                    sections: "[passive]\nenabled = false\n",
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
            Way::Kernel => {
                kernel_on(lab)?;
                // A route over a link without carrier is skipped, so the
                // lookup in table 1 finds nothing and falls through to the
                // main table's default route through wan2.
                set_ignore_linkdown(lab, true)?;
                RunningWay::Kernel
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
            RunningWay::Kernel => {
                set_ignore_linkdown(self.lab, false)?;
                kernel_off(self.lab)
            }
        }
    }

    /// One failover, `delay` after the traffic flows, and back: what each
    /// kind of traffic went through.
    fn failover(
        &mut self,
        streams: &mut Streams,
        failure: Failure,
        delay: Duration,
    ) -> Result<(Vec<(Traffic, Run)>, Trace)> {
        let sink = streams.sink;
        let flow = streams.established(self.lab)?;
        let fresh = match failure {
            Failure::CarrierLoss => Some(streams.new_connections(self.lab)?),
            Failure::UpstreamCut => None,
        };
        wait_for("the stream through isp1", LIMIT, || {
            Ok(arrived_via(sink, flow.port(), ISP1_NAT) >= STEADY
                && fresh.as_ref().is_none_or(|f| {
                    arrived_via(sink, f.port(), ISP1_NAT) >= STEADY
                        && arrived_via(sink, f.port(), ISP2_NAT) >= STEADY
                }))
        })?;

        // A deliberate wait, not a stand-in for a condition: see the top.
        std::thread::sleep(delay);
        let (host, ifname) = failure.link();
        let cut = Instant::now();
        self.lab.set_link_up(host, ifname, false)?;
        let cut_command = cut.elapsed();

        let mut measured = Vec::new();
        if let Some(fresh) = fresh {
            let (time, lost) = new_connections_outage(sink, &fresh, cut)?;
            measured.push((
                Traffic::NewConnections,
                Run {
                    time,
                    lost,
                    cut_command,
                    reaction: None,
                },
            ));
        }
        wait_for("the stream through isp2", LIMIT, || {
            Ok(arrived_via(sink, flow.port(), ISP2_NAT) >= STEADY)
        })?;
        let time = sink
            .first_via(flow.port(), ISP2_NAT, cut)
            .context("the stream's first datagram through isp2 is gone")?
            .saturating_duration_since(cut);
        let lost = outage(sink, &flow, ISP2_NAT).lost;
        let trace = Trace::of(&sink.stream(flow.port()), cut, ISP1_NAT, ISP2_NAT);
        drop(flow);
        let reaction = match &self.way {
            RunningWay::Lb(lbd) => Some(reaction(lbd, cut)?),
            _ => None,
        };
        for (_, run) in &mut measured {
            run.reaction = reaction;
        }
        measured.push((
            Traffic::Established,
            Run {
                time,
                lost,
                cut_command,
                reaction,
            },
        ));

        self.lab.set_link_up(host, ifname, true)?;
        self.wait_until_isp1_in_use()?;
        Ok((measured, trace))
    }

    /// Wait until the way sends new flows through isp1 again: lbd reports
    /// it up, the script has routed table 1 back through wan1, or (the
    /// kernel alone) wan1 has its carrier, which `set_link_up` waited for.
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
            RunningWay::Kernel => Ok(()),
        }
    }
}

/// lbd's own account of its last change of isp1.
fn reaction(lbd: &Lbd, cut: Instant) -> Result<Reaction> {
    let status = lbd.status()?;
    let change = &status["uplinks"][0]["last_change"];
    let micros = |key: &str| {
        change[key]
            .as_u64()
            .map(Duration::from_micros)
            .with_context(|| format!("lbctl status has no last_change.{key} for isp1"))
    };
    let (queued, write) = (micros("queued_us")?, micros("write_us")?);
    let applied = lbd
        .changed_at("isp1")?
        .context("lbd reports no change of isp1")?;
    Ok(Reaction {
        event_to_dataplane: queued + write,
        queued,
        cut_to_dataplane: applied.saturating_duration_since(cut),
    })
}

/// How long new connections failed after `cut`: until the send time of the
/// last datagram that never arrived (zero if none did), and how many did
/// not. Waits until [`MOVED_RUN`] datagrams in a row, all sent after the
/// cut, have arrived.
fn new_connections_outage(sink: &Sink, stream: &Stream, cut: Instant) -> Result<(Duration, u32)> {
    let first_after =
        |s: &Stream| (0..s.sent()).find(|&seq| s.sent_at(seq).is_some_and(|t| t >= cut));
    let mut settled = None;
    wait_for("new connections through isp2", LIMIT, || {
        let Some(start) = first_after(stream) else {
            return Ok(false);
        };
        let arrived: HashSet<u32> = sink.stream(stream.port()).iter().map(|a| a.0).collect();
        let mut run = 0;
        for seq in start..stream.sent() {
            run = if arrived.contains(&seq) { run + 1 } else { 0 };
            if run == MOVED_RUN {
                settled = Some(seq + 1 - MOVED_RUN);
                return Ok(true);
            }
        }
        Ok(false)
    })?;
    let settled = settled.context("no run of arrivals")?;
    let arrived: HashSet<u32> = sink.stream(stream.port()).iter().map(|a| a.0).collect();
    let lost: Vec<u32> = (0..settled).filter(|s| !arrived.contains(s)).collect();
    let last = lost.last().and_then(|&s| stream.sent_at(s));
    let time = last.map_or(Duration::ZERO, |t| t.saturating_duration_since(cut));
    Ok((time, lost.len() as u32))
}

/// `net.ipv4.conf.all.ignore_routes_with_linkdown` in the router.
fn set_ignore_linkdown(lab: &Lab, on: bool) -> Result<()> {
    let value = format!(
        "net.ipv4.conf.all.ignore_routes_with_linkdown={}",
        u8::from(on)
    );
    lab.exec("router", &["sysctl", "-q", "-w", &value])
        .map(|_| ())
        .context("setting ignore_routes_with_linkdown in the router")
}

/// Datagrams from client port `port` that arrived from address `via`.
fn arrived_via(sink: &Sink, port: u16, via: [u8; 4]) -> usize {
    sink.stream(port)
        .iter()
        .filter(|&&(_, _, a)| a == via)
        .count()
}
