//! Uplink health: the per-uplink state machine (`Up`, `Degraded`, `Down`)
//! with a probe quorum and rise/fall hysteresis, the sliding-window
//! statistics (RTT, loss, jitter), and the driver that runs an uplink's probe
//! rounds on tokio time and reports what changed.
//!
//! The state machine ([`Machine`]) and the statistics ([`Window`]) are pure:
//! no I/O and no clock; probe results and link events are handed in, and
//! every change of state comes back as a [`Transition`] value. The driver
//! ([`run`]) owns the timing: a round (every target probed once) starts every
//! `interval`, is judged at the latest `timeout` after it started, and rounds
//! are fed to the machine in the order they started, even when they overlap.
//! With the defaults (1 s, 1 s, fall 3) probes alone declare a dead path
//! down within 4 s; under traffic a suspicion from the data plane (see
//! `passive`) sends a burst of probes at once, and a burst that nobody
//! answers takes the uplink down then. A carrier loss counts at once.
//!
//! It never touches the data plane, the bucket table or the operator's say
//! over an uplink (the daemon acts on the transitions), never opens a socket
//! (that is `probe`), and never reads the clock outside the driver.

pub mod passive;
pub mod probe;

use std::collections::VecDeque;
use std::error::Error as _;
use std::fmt;
use std::time::Duration;

use futures::stream::{FuturesOrdered, StreamExt};
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, MissedTickBehavior};

use crate::config::HealthConfig;
use crate::health::probe::{Probe, ProbeError};
use crate::observe::linkwatch::LinkEvent;
use crate::{config::PassiveConfig, health::passive::Suspicion};

/// Time between two rounds of a burst.
const BURST_SPACING: Duration = Duration::from_millis(10);

/// The statistics window holds the results of this many rounds (times the
/// number of targets): 2.5 s of history at the default 50 ms interval.
pub const STATS_WINDOW_ROUNDS: usize = 50;

/// What the probes and the link say about an uplink.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    /// Answering, within the loss and latency limits (if any).
    Up,
    /// Answering, but over a loss or latency limit: keeps its flows, and
    /// should get new ones only when nothing better is up.
    Degraded,
    /// Not answering, or no carrier.
    Down,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Up => "up",
            Self::Degraded => "degraded",
            Self::Down => "down",
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A change of an uplink's state, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub from: State,
    pub to: State,
    /// For people: e.g. `3 rounds without quorum (0/1 answered)`,
    /// `carrier lost on wan1`, `5 good rounds`.
    pub reason: String,
}

impl fmt::Display for Transition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {}: {}", self.from, self.to, self.reason)
    }
}

// ---------------------------------------------------------------------------
// Statistics.

/// Statistics over the window of recent probe results.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    /// Probe results in the window.
    pub probes: usize,
    /// Of which unanswered (or answered after the timeout).
    pub lost: usize,
    /// Mean round-trip time of the answered probes; `None` without any.
    pub rtt: Option<Duration>,
    /// Mean absolute difference between consecutive round-trip times of the
    /// same target (RFC 3550's interarrival jitter, unsmoothed); `None`
    /// until some target has answered twice.
    pub jitter: Option<Duration>,
}

impl Stats {
    /// Lost probes in percent of the window; 0 for an empty window.
    pub fn loss_percent(&self) -> f64 {
        if self.probes == 0 {
            return 0.0;
        }
        self.lost as f64 * 100.0 / self.probes as f64
    }
}

impl fmt::Display for Stats {
    /// `rtt 12.3ms, jitter 0.4ms, loss 2.0% of 50 probes`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let show = |d: Option<Duration>| d.map_or_else(|| "-".to_owned(), millis);
        write!(
            f,
            "rtt {}, jitter {}, loss {:.1}% of {} probes",
            show(self.rtt),
            show(self.jitter),
            self.loss_percent(),
            self.probes
        )
    }
}

/// `12.3ms`: durations in logs and reasons.
fn millis(d: Duration) -> String {
    format!("{:.1}ms", d.as_secs_f64() * 1000.0)
}

/// The last `capacity` probe results of an uplink, oldest first.
#[derive(Debug, Clone)]
pub struct Window {
    capacity: usize,
    samples: VecDeque<Sample>,
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    /// Index of the probe target, so that jitter compares like with like.
    target: usize,
    /// `None` when lost.
    rtt: Option<Duration>,
}

impl Window {
    /// A window of `capacity` results (at least one).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            capacity,
            samples: VecDeque::with_capacity(capacity),
        }
    }

    /// Records one probe result of `target`, forgetting the oldest when full.
    pub fn push(&mut self, target: usize, rtt: Option<Duration>) {
        if self.samples.len() == self.capacity {
            self.samples.pop_front();
        }
        self.samples.push_back(Sample { target, rtt });
    }

    pub fn is_full(&self) -> bool {
        self.samples.len() == self.capacity
    }

    pub fn stats(&self) -> Stats {
        let mut answered: u32 = 0;
        let mut rtt_sum = Duration::ZERO;
        let mut diffs: u32 = 0;
        let mut diff_sum = Duration::ZERO;
        let mut last: Vec<Option<Duration>> = Vec::new();
        for sample in &self.samples {
            let Some(rtt) = sample.rtt else { continue };
            answered += 1;
            rtt_sum = rtt_sum.saturating_add(rtt);
            if last.len() <= sample.target {
                last.resize(sample.target + 1, None);
            }
            if let Some(previous) = last[sample.target] {
                diffs += 1;
                diff_sum = diff_sum.saturating_add(rtt.abs_diff(previous));
            }
            last[sample.target] = Some(rtt);
        }
        Stats {
            probes: self.samples.len(),
            lost: self.samples.len() - answered as usize,
            rtt: (answered > 0).then(|| rtt_sum / answered),
            jitter: (diffs > 0).then(|| diff_sum / diffs),
        }
    }
}

// ---------------------------------------------------------------------------
// The state machine.

/// One uplink's health, fed with round results and link events.
///
/// - A round is good when at least `quorum` targets answered within
///   `timeout` (and the link has carrier).
/// - `fall` bad rounds in a row take an uplink that is up or degraded down;
///   `rise` good rounds in a row bring a down uplink up.
/// - A carrier loss takes it down at once and restarts the count of good
///   rounds; it comes back after `rise` good rounds once the carrier is back.
/// - With `max_loss_percent` or `max_rtt`, an up uplink whose window (once
///   full) is over a limit for `fall` rounds in a row becomes degraded, and a
///   degraded one within the limits for `rise` rounds in a row is up again.
///   An uplink that comes back over a limit comes back degraded: the losses
///   of its outage are still in the window, which damps a bouncing line.
/// - An uplink without probe targets follows its carrier alone.
#[derive(Debug, Clone)]
pub struct Machine {
    rise: u32,
    fall: u32,
    quorum: usize,
    timeout: Duration,
    max_loss_percent: Option<u8>,
    max_rtt: Option<Duration>,
    targets: usize,
    state: State,
    carrier: bool,
    /// Consecutive good rounds.
    good: u32,
    /// Consecutive bad rounds.
    bad: u32,
    /// Consecutive rounds after which the window was over a limit.
    over: u32,
    /// Consecutive rounds after which the window was within the limits.
    within: u32,
    window: Window,
}

impl Machine {
    /// A machine for an uplink with `targets` probe targets, starting in
    /// `initial` with its carrier assumed up (report a carrier loss with
    /// [`Machine::link`]).
    pub fn new(config: &HealthConfig, targets: usize, initial: State) -> Self {
        Self {
            rise: config.rise.max(1),
            fall: config.fall.max(1),
            quorum: usize::try_from(config.quorum)
                .unwrap_or(usize::MAX)
                .clamp(1, targets.max(1)),
            timeout: config.timeout,
            max_loss_percent: config.max_loss_percent,
            max_rtt: config.max_rtt,
            targets,
            state: initial,
            carrier: true,
            good: 0,
            bad: 0,
            over: 0,
            within: 0,
            window: Window::new(STATS_WINDOW_ROUNDS * targets.max(1)),
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn carrier(&self) -> bool {
        self.carrier
    }

    pub fn stats(&self) -> Stats {
        self.window.stats()
    }

    /// Feeds one round: `results[i]` is target `i`'s round-trip time, `None`
    /// when it did not answer. Rounds must come in the order they started.
    pub fn round(&mut self, results: &[Option<Duration>]) -> Option<Transition> {
        let in_time = |rtt: &Option<Duration>| rtt.filter(|rtt| *rtt <= self.timeout);
        let answered = results.iter().filter_map(in_time).count();
        for (target, rtt) in results.iter().enumerate() {
            self.window.push(target, in_time(rtt));
        }
        if self.carrier && answered >= self.quorum {
            self.good = self.good.saturating_add(1);
            self.bad = 0;
        } else {
            self.bad = self.bad.saturating_add(1);
            self.good = 0;
        }
        let excess = self.excess();
        if excess.is_some() {
            self.over = self.over.saturating_add(1);
            self.within = 0;
        } else {
            self.within = self.within.saturating_add(1);
            self.over = 0;
        }

        let (to, reason) = match (self.state, excess) {
            (State::Down, excess) if self.good >= self.rise => {
                let good = count(self.rise, "good round");
                match excess {
                    Some(excess) => (State::Degraded, format!("{good}, but {excess}")),
                    None => (State::Up, good),
                }
            }
            (State::Up | State::Degraded, _) if self.bad >= self.fall => {
                let quorum = if self.quorum > 1 {
                    format!(", quorum {}", self.quorum)
                } else {
                    String::new()
                };
                let reason = format!(
                    "{} without quorum ({answered}/{} answered{quorum})",
                    count(self.fall, "round"),
                    results.len()
                );
                (State::Down, reason)
            }
            (State::Up, Some(excess)) if self.over >= self.fall => (
                State::Degraded,
                format!("{excess} for {}", count(self.fall, "round")),
            ),
            (State::Degraded, None) if self.within >= self.rise => {
                let reason = format!(
                    "within loss and latency limits for {} ({})",
                    count(self.rise, "round"),
                    self.window.stats()
                );
                (State::Up, reason)
            }
            _ => return None,
        };
        self.enter(to, reason)
    }

    /// Feeds a change of the uplink's link: `up` is false when its carrier
    /// (or operational state) went down. `ifname` names it in the reason.
    pub fn link(&mut self, up: bool, ifname: &str) -> Option<Transition> {
        if up {
            self.carrier = true;
            if self.targets == 0 && self.state == State::Down {
                return self.enter(State::Up, format!("carrier back on {ifname}"));
            }
            None
        } else {
            self.carrier = false;
            self.good = 0;
            self.enter(State::Down, format!("carrier lost on {ifname}"))
        }
    }

    /// Which limit the window is over, e.g. `loss 12.0% over 10%`; `None`
    /// within the limits, without limits, or before the window is full.
    fn excess(&self) -> Option<String> {
        if (self.max_loss_percent.is_none() && self.max_rtt.is_none()) || !self.window.is_full() {
            return None;
        }
        let stats = self.window.stats();
        let mut over = Vec::new();
        if let Some(max) = self.max_loss_percent {
            if stats.lost * 100 > usize::from(max) * stats.probes {
                over.push(format!("loss {:.1}% over {max}%", stats.loss_percent()));
            }
        }
        if let (Some(max), Some(rtt)) = (self.max_rtt, stats.rtt) {
            if rtt > max {
                over.push(format!("mean RTT {} over {}", millis(rtt), millis(max)));
            }
        }
        (!over.is_empty()).then(|| over.join(" and "))
    }

    /// A burst of probes sent on suspicion found nobody answering: down
    /// now, with `reason`; `rise` good rounds bring it back, as after any
    /// failure.
    pub fn confirmed(&mut self, reason: String) -> Option<Transition> {
        self.good = 0;
        self.bad = self.fall;
        self.enter(State::Down, reason)
    }

    fn enter(&mut self, to: State, reason: String) -> Option<Transition> {
        let from = self.state;
        if from == to {
            return None;
        }
        self.state = to;
        Some(Transition { from, to, reason })
    }
}

/// `1 round`, `3 rounds`, `5 good rounds`.
fn count(n: u32, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

// ---------------------------------------------------------------------------
// The driver.

/// What the driver publishes on its watch channel after every round and
/// every link event: the uplink's current health, for the CLI and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    pub state: State,
    pub carrier: bool,
    pub stats: Stats,
    /// Rounds judged so far.
    pub rounds: u64,
}

impl Snapshot {
    /// The value to create the watch channel with.
    pub fn new(state: State) -> Self {
        Self {
            state,
            carrier: true,
            stats: Stats::default(),
            rounds: 0,
        }
    }
}

/// A transition of one uplink, sent by the driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthEvent {
    /// [`Monitor::uplink`].
    pub uplink: usize,
    /// [`Monitor::generation`].
    pub generation: u64,
    pub transition: Transition,
    /// The window's statistics when it happened.
    pub stats: Stats,
    /// When what caused it was seen (tokio time): the kernel's link event
    /// read, or the probe round judged.
    pub at: Instant,
}

/// What [`run`] needs to know about one uplink.
#[derive(Debug)]
pub struct Monitor<P> {
    /// The daemon's index of the uplink, copied into every [`HealthEvent`].
    pub uplink: usize,
    /// Which of the uplink's monitors this is (the daemon starts a new one
    /// when the uplink's address changes), copied into every
    /// [`HealthEvent`], so that a late event of an old one is recognised.
    pub generation: u64,
    /// The uplink's name, for logs.
    pub name: String,
    pub config: HealthConfig,
    /// One per target, in configuration order; none to follow the link only.
    pub probes: Vec<P>,
    pub initial: State,
    /// Suspicions from the traffic (see `passive`), each to be confirmed
    /// or cleared by a burst of probes; none without passive detection.
    pub bursts: Option<mpsc::Receiver<Burst>>,
    /// The bursts' size and timeout, and the hold-down after one failed.
    pub passive: PassiveConfig,
    /// Probing waits for this (or for one interval, should it never come):
    /// the round that started the monitor makes the uplink's routes after
    /// it, and a probe sent before them finds no route and counts as lost.
    pub start: Option<tokio::sync::oneshot::Receiver<()>>,
}

/// A suspicion to check with a burst of probes; the verdict (`true`: some
/// probe answered, the suspicion was false) goes back on `verdict`.
#[derive(Debug)]
pub struct Burst {
    pub suspicion: Suspicion,
    pub verdict: tokio::sync::oneshot::Sender<bool>,
}

/// Runs one uplink's health checks until the receiver of `events` is
/// dropped.
///
/// Starts a round every `config.interval` (the first at once; a late tick
/// delays the next ones rather than bursting), probes all targets of the
/// round concurrently, each bounded by `config.timeout`, and feeds the rounds
/// to a [`Machine`] in the order they started. Link events from
/// `link_events` apply as soon as they arrive, ahead of pending rounds.
///
/// Sends every transition on `events`; publishes a [`Snapshot`] on
/// `snapshots` after every round and link event (so at the probe interval:
/// readers see the latest one, never a queue).
pub async fn run<P: Probe>(
    monitor: Monitor<P>,
    mut link_events: mpsc::Receiver<LinkEvent>,
    events: mpsc::Sender<HealthEvent>,
    snapshots: watch::Sender<Snapshot>,
) {
    let Monitor {
        uplink,
        generation,
        name,
        config,
        probes,
        initial,
        mut bursts,
        passive,
        start,
    } = monitor;
    if let Some(start) = start {
        // Either way it goes on: the round said so, or it failed before
        // it could, and the probes will say what the uplink is worth.
        let _ = tokio::time::timeout(config.interval, start).await;
    }
    let mut machine = Machine::new(&config, probes.len(), initial);
    // The configuration guarantees a non-zero interval; `interval` would
    // panic on zero.
    let mut ticker = tokio::time::interval(config.interval.max(Duration::from_millis(1)));
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut pending = FuturesOrdered::new();
    let mut judged: u64 = 0;
    let mut links_open = true;
    // The burst under way, and what asked for it.
    let mut burst_pending = FuturesOrdered::new();
    let mut burst_asked: Option<Burst> = None;
    // After a burst took the uplink down, rounds are not judged until this.
    let mut hold_until: Option<Instant> = None;

    loop {
        let mut seen = None;
        let transition = tokio::select! {
            biased;
            () = events.closed() => return,
            event = link_events.recv(), if links_open => match event {
                Some(event) => {
                    seen = Some(event.at);
                    machine.link(event.up, &event.ifname)
                }
                None => {
                    log::debug!("uplink {name}: link events ended; probing on");
                    links_open = false;
                    continue;
                }
            },
            request = next_burst(&mut bursts), if burst_asked.is_none() => match request {
                Some(request) if probes.is_empty() => {
                    // Nothing to confirm with: passive evidence alone never
                    // takes an uplink down.
                    let _ = request.verdict.send(true);
                    continue;
                }
                Some(request) => {
                    // Three round trips, with their jitter: a loaded line's
                    // answers come late, and late is not dead.
                    let stats = machine.stats();
                    let rtt = stats.rtt.unwrap_or_default() + stats.jitter.unwrap_or_default();
                    let timeout = passive.burst_timeout.max(rtt * 3);
                    burst_pending.push_back(burst(&probes, passive.burst, timeout));
                    burst_asked = Some(request);
                    continue;
                }
                None => {
                    bursts = None;
                    continue;
                }
            },
            Some((answered, sent)) = burst_pending.next(), if !burst_pending.is_empty() => {
                let Some(asked) = burst_asked.take() else { continue };
                let what = asked.suspicion.describe();
                if answered > 0 {
                    log::info!("uplink {name}: suspect ({what}), but {answered} of {sent} probes answered: stays up");
                    let _ = asked.verdict.send(true);
                    continue;
                }
                let _ = asked.verdict.send(false);
                hold_until = Some(Instant::now() + passive.hold_down);
                machine.confirmed(format!("{what}; 0 of {sent} probes answered"))
            }
            Some(results) = pending.next(), if !pending.is_empty() => {
                let results: Vec<Result<Duration, ProbeError>> = results;
                judged += 1;
                if hold_until.is_some_and(|t| Instant::now() < t) {
                    // Held down after a confirmed suspicion: whatever this
                    // round says, flows are not moved back yet.
                    continue;
                }
                let answers: Vec<Option<Duration>> =
                    results.iter().map(|r| r.as_ref().ok().copied()).collect();
                for (probe, result) in probes.iter().zip(&results) {
                    if let Err(e) = result {
                        log::trace!("uplink {name}: {probe}: {}", chain(e));
                    }
                }
                machine.round(&answers).map(|mut t| {
                    if t.to == State::Down {
                        t.reason.push_str(&failures(&probes, &results));
                    }
                    t
                })
            }
            _ = ticker.tick(), if !probes.is_empty() => {
                pending.push_back(round(&probes, config.timeout));
                continue;
            }
        };
        snapshots.send_replace(Snapshot {
            state: machine.state(),
            carrier: machine.carrier(),
            stats: machine.stats(),
            rounds: judged,
        });
        if let Some(transition) = transition {
            let event = HealthEvent {
                uplink,
                generation,
                transition,
                stats: machine.stats(),
                at: seen.unwrap_or_else(Instant::now),
            };
            if events.send(event).await.is_err() {
                return;
            }
        }
    }
}

/// The next burst request, or never without a channel.
async fn next_burst(bursts: &mut Option<mpsc::Receiver<Burst>>) -> Option<Burst> {
    match bursts {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// `n` rounds, [`BURST_SPACING`] apart, each probing every target, all of
/// them judged `timeout` after the burst began (a later round has that
/// much less time, at least one spacing): (answers, probes sent).
async fn burst<P: Probe>(probes: &[P], n: u32, timeout: Duration) -> (usize, usize) {
    let rounds = (0..n).map(|k| async move {
        let start = BURST_SPACING * k;
        tokio::time::sleep(start).await;
        round(probes, timeout.saturating_sub(start).max(BURST_SPACING)).await
    });
    let results = futures::future::join_all(rounds).await;
    let all = results.iter().flatten();
    (all.clone().filter(|r| r.is_ok()).count(), all.count())
}

/// Probes every target once, concurrently; each result within `timeout`.
async fn round<P: Probe>(probes: &[P], timeout: Duration) -> Vec<Result<Duration, ProbeError>> {
    futures::future::join_all(probes.iter().map(|probe| async move {
        tokio::time::timeout(timeout, probe.probe(timeout))
            .await
            .unwrap_or(Err(ProbeError::Timeout(timeout)))
    }))
    .await
}

/// `; last round: icmp 198.51.100.10: no answer within 150ms`, for the
/// reason of a transition to down.
fn failures<P: Probe>(probes: &[P], results: &[Result<Duration, ProbeError>]) -> String {
    let failed: Vec<String> = probes
        .iter()
        .zip(results)
        .filter_map(|(probe, result)| {
            result
                .as_ref()
                .err()
                .map(|e| format!("{probe}: {}", chain(e)))
        })
        .collect();
    if failed.is_empty() {
        String::new()
    } else {
        format!("; last round: {}", failed.join(", "))
    }
}

/// An error and its sources, `: `-separated.
fn chain(error: &ProbeError) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};

    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn config() -> HealthConfig {
        // The figures these tests assert were worked out for 50 ms rounds
        // judged within 150 ms, rise 5, fall 3.
        HealthConfig {
            interval: Duration::from_millis(50),
            timeout: Duration::from_millis(150),
            rise: 5,
            fall: 3,
            ..HealthConfig::default()
        }
    }

    fn ok(ms: u64) -> Option<Duration> {
        Some(MS * ms as u32)
    }

    /// Feeds `n` rounds of `results`, expecting no transition.
    fn quiet(machine: &mut Machine, n: usize, results: &[Option<Duration>]) {
        for i in 0..n {
            assert_eq!(machine.round(results), None, "round {i} of {n}");
        }
    }

    #[test]
    fn fall_bad_rounds_take_it_down() {
        let mut m = Machine::new(&config(), 1, State::Up);
        quiet(&mut m, 2, &[None]);
        let t = m.round(&[None]).expect("third bad round");
        assert_eq!((t.from, t.to), (State::Up, State::Down));
        assert_eq!(t.reason, "3 rounds without quorum (0/1 answered)");
        quiet(&mut m, 10, &[None]);
        assert_eq!(m.state(), State::Down);
    }

    #[test]
    fn a_good_round_restarts_the_fall_count() {
        let mut m = Machine::new(&config(), 1, State::Up);
        for _ in 0..10 {
            quiet(&mut m, 2, &[None]);
            quiet(&mut m, 1, &[ok(5)]);
        }
        assert_eq!(m.state(), State::Up);
    }

    #[test]
    fn rise_good_rounds_bring_it_up() {
        let mut m = Machine::new(&config(), 1, State::Down);
        quiet(&mut m, 4, &[ok(5)]);
        quiet(&mut m, 1, &[None]);
        quiet(&mut m, 4, &[ok(5)]);
        let t = m.round(&[ok(5)]).expect("fifth good round in a row");
        assert_eq!((t.from, t.to), (State::Down, State::Up));
        assert_eq!(t.reason, "5 good rounds");
    }

    #[test]
    fn one_round_fall_and_rise() {
        let cfg = HealthConfig {
            rise: 1,
            fall: 1,
            ..config()
        };
        let mut m = Machine::new(&cfg, 1, State::Up);
        let down = m.round(&[None]).expect("down");
        assert_eq!(down.reason, "1 round without quorum (0/1 answered)");
        let up = m.round(&[ok(1)]).expect("up");
        assert_eq!(up.reason, "1 good round");
    }

    #[test]
    fn quorum_k_of_n() {
        let cfg = HealthConfig {
            quorum: 2,
            fall: 1,
            rise: 1,
            ..config()
        };
        let mut m = Machine::new(&cfg, 3, State::Up);
        assert_eq!(m.round(&[ok(5), None, ok(7)]), None, "2 of 3 is enough");
        assert_eq!(m.round(&[ok(5), ok(6), ok(7)]), None);
        let t = m.round(&[None, ok(6), None]).expect("1 of 3 is not");
        assert_eq!(t.to, State::Down);
        assert_eq!(t.reason, "1 round without quorum (1/3 answered, quorum 2)");
        let t = m.round(&[None, ok(6), ok(9)]).expect("back at 2 of 3");
        assert_eq!(t.to, State::Up);
    }

    #[test]
    fn answers_after_the_timeout_are_lost() {
        let cfg = HealthConfig {
            fall: 1,
            ..config()
        };
        let mut m = Machine::new(&cfg, 1, State::Up);
        assert_eq!(m.round(&[Some(cfg.timeout)]), None, "at the timeout");
        let t = m.round(&[Some(cfg.timeout + MS)]).expect("after it");
        assert_eq!(t.to, State::Down);
        assert_eq!(m.stats().lost, 1);
    }

    #[test]
    fn hysteresis_alternating_rounds_never_flip() {
        for (rise, fall) in [(2, 2), (5, 3), (2, 7)] {
            let cfg = HealthConfig {
                rise,
                fall,
                ..config()
            };
            for initial in [State::Up, State::Down] {
                let mut m = Machine::new(&cfg, 1, initial);
                for _ in 0..100 {
                    assert_eq!(m.round(&[ok(5)]), None);
                    assert_eq!(m.round(&[None]), None);
                }
                assert_eq!(m.state(), initial);
            }
        }
    }

    #[test]
    fn carrier_loss_is_down_at_once_and_back_after_rise() {
        let mut m = Machine::new(&config(), 1, State::Up);
        let t = m.link(false, "wan1").expect("down at once");
        assert_eq!((t.from, t.to), (State::Up, State::Down));
        assert_eq!(t.reason, "carrier lost on wan1");
        assert!(!m.carrier());
        assert_eq!(m.link(false, "wan1"), None, "already down");
        // Answers while the carrier is down (stale, or racing) do not count.
        quiet(&mut m, 10, &[ok(5)]);
        assert_eq!(
            m.link(true, "wan1"),
            None,
            "carrier alone does not bring it up"
        );
        quiet(&mut m, 4, &[ok(5)]);
        let t = m.round(&[ok(5)]).expect("up after rise good rounds");
        assert_eq!(t.to, State::Up);
    }

    #[test]
    fn carrier_loss_restarts_the_rise_count() {
        let mut m = Machine::new(&config(), 1, State::Down);
        quiet(&mut m, 4, &[ok(5)]);
        assert_eq!(m.link(false, "wan1"), None);
        assert_eq!(m.link(true, "wan1"), None);
        quiet(&mut m, 4, &[ok(5)]);
        assert_eq!(m.round(&[ok(5)]).map(|t| t.to), Some(State::Up));
    }

    #[test]
    fn carrier_loss_takes_a_degraded_uplink_down() {
        let cfg = HealthConfig {
            max_rtt: Some(MS * 20),
            ..config()
        };
        let mut m = Machine::new(&cfg, 1, State::Degraded);
        let t = m.link(false, "wan2").expect("down");
        assert_eq!((t.from, t.to), (State::Degraded, State::Down));
    }

    #[test]
    fn without_targets_the_link_decides() {
        let mut m = Machine::new(&config(), 0, State::Up);
        assert_eq!(m.link(true, "wan1"), None);
        assert_eq!(m.link(false, "wan1").map(|t| t.to), Some(State::Down));
        let t = m.link(true, "wan1").expect("up");
        assert_eq!(
            (t.to, t.reason.as_str()),
            (State::Up, "carrier back on wan1")
        );
    }

    /// Two targets, one of which never answers: 50% loss, yet every round
    /// has its quorum of one.
    #[test]
    fn loss_over_the_limit_degrades_and_recovers() {
        let cfg = HealthConfig {
            max_loss_percent: Some(10),
            ..config()
        };
        let window_rounds = STATS_WINDOW_ROUNDS;
        let mut m = Machine::new(&cfg, 2, State::Up);
        // Not judged until the window is full (after round 50): over the
        // limit after rounds 50, 51 and 52.
        quiet(
            &mut m,
            window_rounds + cfg.fall as usize - 2,
            &[ok(5), None],
        );
        let t = m.round(&[ok(5), None]).expect("degraded");
        assert_eq!((t.from, t.to), (State::Up, State::Degraded));
        assert_eq!(t.reason, "loss 50.0% over 10% for 3 rounds");
        // Recovery: within the limit once at most 10 of the 100 results are
        // lost, after 40 whole rounds, and up after `rise` such rounds.
        quiet(&mut m, 40 + cfg.rise as usize - 2, &[ok(5), ok(6)]);
        let t = m.round(&[ok(5), ok(6)]).expect("up again");
        assert_eq!((t.from, t.to), (State::Degraded, State::Up));
        assert!(
            t.reason
                .starts_with("within loss and latency limits for 5 rounds (rtt"),
            "{}",
            t.reason
        );
        assert_eq!(m.stats().loss_percent(), 6.0);
    }

    #[test]
    fn rtt_over_the_limit_degrades() {
        let cfg = HealthConfig {
            max_rtt: Some(MS * 100),
            timeout: MS * 300,
            ..config()
        };
        let mut m = Machine::new(&cfg, 1, State::Up);
        quiet(&mut m, STATS_WINDOW_ROUNDS - 1, &[ok(120)]);
        quiet(&mut m, 2, &[ok(120)]);
        let t = m.round(&[ok(120)]).expect("degraded");
        assert_eq!(t.reason, "mean RTT 120.0ms over 100.0ms for 3 rounds");
        // Still answering, so never down; the mean must fall first.
        quiet(&mut m, 10, &[ok(120)]);
        assert_eq!(m.state(), State::Degraded);
    }

    #[test]
    fn coming_back_over_a_limit_is_degraded() {
        let cfg = HealthConfig {
            max_loss_percent: Some(20),
            ..config()
        };
        let mut m = Machine::new(&cfg, 1, State::Down);
        quiet(&mut m, STATS_WINDOW_ROUNDS, &[None]);
        quiet(&mut m, 4, &[ok(5)]);
        let t = m.round(&[ok(5)]).expect("back");
        assert_eq!(t.to, State::Degraded);
        assert_eq!(t.reason, "5 good rounds, but loss 90.0% over 20%");
    }

    #[test]
    fn window_stats() {
        let mut w = Window::new(4);
        assert_eq!(w.stats(), Stats::default());
        assert_eq!(w.stats().loss_percent(), 0.0);
        for rtt in [ok(10), ok(20), None, ok(15)] {
            w.push(0, rtt);
        }
        assert!(w.is_full());
        let s = w.stats();
        assert_eq!((s.probes, s.lost), (4, 1));
        assert_eq!(s.loss_percent(), 25.0);
        assert_eq!(s.rtt, ok(15));
        // |20 - 10| and |15 - 20|: the loss in between is skipped.
        assert_eq!(s.jitter, Some(MS * 15 / 2));
        // The oldest result goes first.
        w.push(0, ok(15));
        let s = w.stats();
        assert_eq!(s.rtt, Some((MS * 50) / 3));
        assert_eq!(s.jitter, Some(MS * 5 / 2), "|15 - 20| and |15 - 15|");
        assert_eq!(
            s.to_string(),
            "rtt 16.7ms, jitter 2.5ms, loss 25.0% of 4 probes"
        );
    }

    #[test]
    fn jitter_compares_each_target_with_itself() {
        let mut w = Window::new(100);
        for _ in 0..10 {
            w.push(0, ok(10));
            w.push(1, ok(100));
        }
        let s = w.stats();
        assert_eq!(s.jitter, Some(Duration::ZERO));
        assert_eq!(s.rtt, ok(55));
        let mut w = Window::new(10);
        w.push(0, ok(10));
        w.push(1, None);
        assert_eq!(w.stats().jitter, None, "nothing answered twice");
        assert_eq!(Window::new(0).capacity, 1);
    }

    // -- The driver, on paused time with fake probes. ----------------------

    #[derive(Debug, Clone, Copy)]
    enum Behaviour {
        Answer(Duration),
        Silent,
        Fail,
    }

    /// A probe whose behaviour the test sets; `script`, when given, decides
    /// by the number of the call instead.
    struct Fake {
        behaviour: Arc<Mutex<Behaviour>>,
        calls: AtomicU64,
        script: Option<fn(u64) -> Behaviour>,
    }

    impl Fake {
        fn new(behaviour: Behaviour) -> (Self, Arc<Mutex<Behaviour>>) {
            let shared = Arc::new(Mutex::new(behaviour));
            let fake = Self {
                behaviour: Arc::clone(&shared),
                calls: AtomicU64::new(0),
                script: None,
            };
            (fake, shared)
        }
    }

    impl fmt::Display for Fake {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("fake")
        }
    }

    impl Probe for Fake {
        async fn probe(&self, _timeout: Duration) -> Result<Duration, ProbeError> {
            let call = self.calls.fetch_add(1, Ordering::Relaxed);
            let behaviour = match self.script {
                Some(script) => script(call),
                None => *self.behaviour.lock().expect("not poisoned"),
            };
            match behaviour {
                Behaviour::Answer(rtt) => {
                    tokio::time::sleep(rtt).await;
                    Ok(rtt)
                }
                Behaviour::Silent => std::future::pending().await,
                Behaviour::Fail => Err(ProbeError::Send {
                    target: "192.0.2.1".into(),
                    source: std::io::Error::from_raw_os_error(libc::ENETUNREACH),
                }),
            }
        }
    }

    struct Driven {
        link: mpsc::Sender<LinkEvent>,
        events: mpsc::Receiver<HealthEvent>,
        snapshots: watch::Receiver<Snapshot>,
        task: tokio::task::JoinHandle<()>,
    }

    fn drive(probes: Vec<Fake>, config: HealthConfig, initial: State) -> Driven {
        let (link, link_rx) = mpsc::channel(4);
        let (events_tx, events) = mpsc::channel(16);
        let (snap_tx, snapshots) = watch::channel(Snapshot::new(initial));
        let monitor = Monitor {
            uplink: 3,
            generation: 0,
            name: "isp1".into(),
            config,
            probes,
            initial,
            bursts: None,
            passive: PassiveConfig::default(),
            start: None,
        };
        let task = tokio::spawn(run(monitor, link_rx, events_tx, snap_tx));
        Driven {
            link,
            events,
            snapshots,
            task,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_dead_path_is_down_within_300ms() {
        let (fake, behaviour) = Fake::new(Behaviour::Answer(MS * 5));
        let mut d = drive(vec![fake], config(), State::Up);
        tokio::time::sleep(MS * 1010).await;
        *behaviour.lock().expect("not poisoned") = Behaviour::Silent;
        let died = Instant::now();
        let event = d.events.recv().await.expect("an event");
        assert_eq!(event.uplink, 3);
        assert_eq!(event.transition.to, State::Down);
        assert_eq!(
            event.transition.reason,
            "3 rounds without quorum (0/1 answered); last round: fake: no answer within 150ms"
        );
        let took = event.at - died;
        // The rounds of 1050, 1100 and 1150 ms fail; the last is judged at
        // 1150 + 150 ms.
        assert_eq!(took, MS * 290, "detected after {took:?}");
        assert!(event.stats.lost >= 3);

        // Recovery: rise good rounds, the first starting at the next tick.
        *behaviour.lock().expect("not poisoned") = Behaviour::Answer(MS * 5);
        let back = Instant::now();
        let event = d.events.recv().await.expect("an event");
        assert_eq!(event.transition.to, State::Up);
        assert_eq!(event.transition.reason, "5 good rounds");
        assert!(
            event.at - back <= MS * (5 * 50 + 5),
            "{:?}",
            event.at - back
        );
        let snapshot = *d.snapshots.borrow();
        assert_eq!(snapshot.state, State::Up);
        assert!(snapshot.rounds > 20);
        d.task.abort();
    }

    /// A burst on suspicion: answered, nothing changes and the verdict says
    /// so; unanswered, down at once with the suspicion's reason, and held
    /// down for `hold_down` whatever the rounds say after.
    #[tokio::test(start_paused = true)]
    async fn a_burst_confirms_or_clears_a_suspicion_and_a_confirmed_one_holds_down() {
        use crate::health::passive::Suspicion;
        let (fake, behaviour) = Fake::new(Behaviour::Answer(MS * 5));
        let (_link, link_rx) = mpsc::channel(4);
        let (events_tx, mut events) = mpsc::channel(16);
        let (snap_tx, _snapshots) = watch::channel(Snapshot::new(State::Up));
        let (bursts_tx, bursts_rx) = mpsc::channel(1);
        let passive = PassiveConfig {
            hold_down: MS * 2000,
            ..PassiveConfig::default()
        };
        let monitor = Monitor {
            uplink: 0,
            generation: 0,
            name: "isp1".into(),
            config: HealthConfig {
                interval: MS * 1000,
                timeout: MS * 1000,
                rise: 2,
                fall: 3,
                ..HealthConfig::default()
            },
            probes: vec![fake],
            initial: State::Up,
            bursts: Some(bursts_rx),
            passive,
            start: None,
        };
        let task = tokio::spawn(run(monitor, link_rx, events_tx, snap_tx));
        let suspicion = Suspicion {
            silent: Some(MS * 60),
            flows: 2,
            destinations: 1,
        };
        let ask = |bursts: &mpsc::Sender<Burst>| {
            let (verdict, rx) = tokio::sync::oneshot::channel();
            let sent = bursts.try_send(Burst { suspicion, verdict });
            assert!(sent.is_ok(), "the monitor takes a burst");
            rx
        };
        tokio::time::sleep(MS * 1500).await;
        assert_eq!(
            ask(&bursts_tx).await.ok(),
            Some(true),
            "answered: a false alarm"
        );

        *behaviour.lock().expect("not poisoned") = Behaviour::Silent;
        let asked = Instant::now();
        let verdict = ask(&bursts_tx);
        let event = events.recv().await.expect("an event");
        assert_eq!(verdict.await.ok(), Some(false));
        assert_eq!(event.transition.to, State::Down);
        assert_eq!(
            event.transition.reason,
            "no replies from 2 flows (to 1 destination) for 60 ms; 0 of 3 probes answered"
        );
        // All three rounds are judged 50 ms after the burst began.
        assert_eq!(event.at - asked, MS * 50);

        // Answering again at once, but held down for 2 s, then 2 good
        // rounds of 1 s.
        *behaviour.lock().expect("not poisoned") = Behaviour::Answer(MS * 5);
        let event = events.recv().await.expect("an event");
        assert_eq!(event.transition.to, State::Up);
        let back = event.at - asked;
        assert!(back >= MS * 2000 + MS * 1000, "up again after {back:?}");
        task.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn failing_probes_are_judged_as_soon_as_they_fail() {
        let (fake, behaviour) = Fake::new(Behaviour::Answer(MS * 5));
        let mut d = drive(vec![fake], config(), State::Up);
        tokio::time::sleep(MS * 1010).await;
        *behaviour.lock().expect("not poisoned") = Behaviour::Fail;
        let died = Instant::now();
        let event = d.events.recv().await.expect("an event");
        assert_eq!(event.at - died, MS * 140, "rounds of 1050, 1100, 1150 ms");
        assert!(
            event.transition.reason.ends_with(
                "last round: fake: sending to 192.0.2.1 failed: Network is unreachable (os error 101)"
            ),
            "{}",
            event.transition.reason
        );
        d.task.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn carrier_loss_applies_at_once() {
        let (fake, _) = Fake::new(Behaviour::Answer(MS * 100));
        let mut d = drive(vec![fake], config(), State::Up);
        tokio::time::sleep(MS * 333).await;
        let lost = Instant::now();
        let down = LinkEvent {
            ifindex: 7,
            ifname: "wan1".into(),
            up: false,
            at: Instant::now(),
        };
        d.link.send(down).await.expect("driver running");
        let event = d.events.recv().await.expect("an event");
        assert_eq!(event.at, lost);
        assert_eq!(event.transition.reason, "carrier lost on wan1");
        assert!(!d.snapshots.borrow().carrier);
        // Back after the carrier and rise good rounds.
        let up = LinkEvent {
            ifindex: 7,
            ifname: "wan1".into(),
            up: true,
            at: Instant::now(),
        };
        d.link.send(up).await.expect("driver running");
        let back = Instant::now();
        let event = d.events.recv().await.expect("an event");
        assert_eq!(event.transition.to, State::Up);
        // Rounds still in flight from before the carrier came back count;
        // at most the five rounds that started since, each 100 ms long.
        assert!(
            event.at - back <= MS * (4 * 50 + 100),
            "{:?}",
            event.at - back
        );
        d.task.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn overlapping_rounds_are_judged_in_order() {
        // Round 1 gets no answer (judged at 150 ms); round 2 answers at
        // 55 ms. With fall = rise = 1, in order means down, then up, both at
        // 150 ms; out of order would be one "down" at 150 ms.
        let script: fn(u64) -> Behaviour = |call| match call {
            0 => Behaviour::Silent,
            _ => Behaviour::Answer(MS * 5),
        };
        let fake = Fake {
            behaviour: Arc::new(Mutex::new(Behaviour::Silent)),
            calls: AtomicU64::new(0),
            script: Some(script),
        };
        let cfg = HealthConfig {
            rise: 1,
            fall: 1,
            ..config()
        };
        let start = Instant::now();
        let mut d = drive(vec![fake], cfg, State::Up);
        let first = d.events.recv().await.expect("an event");
        let second = d.events.recv().await.expect("an event");
        assert_eq!(first.transition.to, State::Down);
        assert_eq!(second.transition.to, State::Up);
        assert_eq!(first.at - start, MS * 150);
        assert_eq!(second.at - start, MS * 150);
        d.task.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn quorum_across_concurrent_targets() {
        let (a, _) = Fake::new(Behaviour::Answer(MS * 20));
        let (b, b_behaviour) = Fake::new(Behaviour::Answer(MS * 40));
        let (c, c_behaviour) = Fake::new(Behaviour::Answer(MS * 140));
        let cfg = HealthConfig {
            quorum: 2,
            ..config()
        };
        let mut d = drive(vec![a, b, c], cfg, State::Up);
        tokio::time::sleep(MS * 500).await;
        *c_behaviour.lock().expect("not poisoned") = Behaviour::Silent;
        tokio::time::sleep(MS * 500).await;
        assert!(d.events.try_recv().is_err(), "2 of 3 still answer");
        let stats = d.snapshots.borrow().stats;
        assert_eq!(stats.rtt.map(|r| r > MS * 20), Some(true));
        *b_behaviour.lock().expect("not poisoned") = Behaviour::Silent;
        let event = d.events.recv().await.expect("an event");
        assert_eq!(
            event.transition.reason,
            "3 rounds without quorum (1/3 answered, quorum 2); last round: fake: no answer within 150ms, fake: no answer within 150ms"
        );
        d.task.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn without_probes_the_link_decides() {
        let mut d = drive(Vec::new(), config(), State::Up);
        let event = LinkEvent {
            ifindex: 7,
            ifname: "wan1".into(),
            up: false,
            at: Instant::now(),
        };
        d.link.send(event.clone()).await.expect("running");
        assert_eq!(
            d.events.recv().await.map(|e| e.transition.to),
            Some(State::Down)
        );
        d.link
            .send(LinkEvent { up: true, ..event })
            .await
            .expect("running");
        assert_eq!(
            d.events.recv().await.map(|e| e.transition.to),
            Some(State::Up)
        );
        assert_eq!(d.snapshots.borrow().rounds, 0);
        d.task.abort();
    }

    /// A new monitor probes once the round that started it has made its
    /// routes (`start`), or after one interval should that never be said.
    #[tokio::test(start_paused = true)]
    async fn the_first_probe_waits_for_the_routes_of_its_round() {
        let config = config();
        for said in [true, false] {
            let (fake, _) = Fake::new(Behaviour::Answer(MS * 5));
            let (go, start) = tokio::sync::oneshot::channel();
            let (_link, link_rx) = mpsc::channel(4);
            let (events_tx, _events) = mpsc::channel(16);
            let (snap_tx, mut snapshots) = watch::channel(Snapshot::new(State::Up));
            let monitor = Monitor {
                uplink: 0,
                generation: 0,
                name: "isp1".into(),
                config,
                probes: vec![fake],
                initial: State::Up,
                bursts: None,
                passive: PassiveConfig::default(),
                start: Some(start),
            };
            let task = tokio::spawn(run(monitor, link_rx, events_tx, snap_tx));
            tokio::time::sleep(config.interval / 2).await;
            assert_eq!(snapshots.borrow().rounds, 0, "probed before its routes");
            let held = Instant::now();
            // Unsaid, the round still holds the sender (a dropped one would
            // let the monitor go at once).
            let _unsaid = if said {
                go.send(()).expect("the monitor waits");
                None
            } else {
                Some(go)
            };
            while snapshots.borrow().rounds == 0 {
                snapshots.changed().await.expect("the monitor runs");
            }
            let waited = Instant::now() - held;
            if said {
                assert!(waited <= MS * 10, "went {waited:?} after it was said");
            } else {
                assert!(
                    waited >= config.interval / 2 - MS && waited <= config.interval,
                    "unsaid, went {waited:?} after half an interval"
                );
            }
            task.abort();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn stops_when_nobody_listens() {
        let (fake, _) = Fake::new(Behaviour::Answer(MS * 5));
        let d = drive(vec![fake], config(), State::Up);
        // Closing the link channel does not stop it...
        drop(d.link);
        tokio::time::sleep(MS * 200).await;
        assert!(!d.task.is_finished());
        // ... dropping the event receiver does.
        drop(d.events);
        tokio::time::timeout(MS * 100, d.task)
            .await
            .expect("stopped")
            .expect("no panic");
    }
}
