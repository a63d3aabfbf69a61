//! Failover from what the traffic says: suspicion from the data plane's
//! per-uplink signals, confirmed or cleared by a burst of probes.
//!
//! The data plane keeps, per uplink and per CPU (`SIGNALS`), when a reply
//! (a packet that matched a NAT mapping) last arrived, when a packet was
//! last sent, which flows and destinations sent since the last reply (a
//! 64-bit hash mask each), and how many SYNs were sent again for a
//! connection still waiting for its answer. When an uplink's upstream dies,
//! clients keep sending and nothing comes back. An uplink is *suspect* once
//! sending has gone on for `T` since the first send that no reply has
//! followed, with `T` derived from its measured round trip (`rtt_factor` ×
//! RTT, at least `floor`). Measured from that first unanswered send, not
//! from the last reply: one packet after a quiet minute is not a silence,
//! its answer simply has not had time to come.
//!
//! Suspicion never takes an uplink down by itself: it buys a burst of
//! probes (see `health`), and only a burst that nobody answers does. A
//! suspicion that proves false backs off (doubling, up to
//! [`MAX_BACKOFF`]), so traffic that never gets answers (a client blasting
//! UDP at a dead server) costs a bounded number of probes.
//!
//! Pure: samples and the clock are handed in; the daemon reads the maps and
//! acts on what [`Watch::sample`] says.

use std::time::Duration;

use crate::config::PassiveConfig;

/// The longest wait between two bursts while suspicion keeps proving
/// false.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// The wait after the first false suspicion; doubles with each further one.
pub const FIRST_BACKOFF: Duration = Duration::from_secs(1);

/// One reading of an uplink's signals, all CPUs together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Sample {
    /// The data plane's clock (monotonic, coarse) when read, ns.
    pub now_ns: u64,
    /// The latest reply on any CPU, ns (0: none yet).
    pub last_reply_ns: u64,
    /// The latest packet sent on any CPU, ns (0: none yet).
    pub last_sent_ns: u64,
    /// Distinct flows and destinations (by hash) that sent since the last
    /// reply, about.
    pub flows: u32,
    pub destinations: u32,
    /// SYNs sent again for connections still opening, since lbd started.
    pub syn_retries: u64,
}

/// Why an uplink is suspect, for the burst and its verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Suspicion {
    /// How long sending has gone on without a reply; `None`: no reply was
    /// ever seen on this uplink.
    pub silent: Option<Duration>,
    pub flows: u32,
    pub destinations: u32,
}

impl Suspicion {
    /// `no replies from 3 flows (to 2 destinations) for 120 ms`.
    pub fn describe(&self) -> String {
        let since = match self.silent {
            Some(silent) => format!("for {} ms", silent.as_millis()),
            None => "since lb started listening".to_owned(),
        };
        format!(
            "no replies from {} (to {}) {since}",
            plural(self.flows.max(1), "flow"),
            plural(self.destinations.max(1), "destination"),
        )
    }
}

fn plural(n: u32, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// One uplink's listener: when to suspect, and the backoff of false
/// alarms.
#[derive(Debug, Clone)]
pub struct Watch {
    config: PassiveConfig,
    /// No burst before this (data-plane clock, ns).
    quiet_until_ns: u64,
    /// The next false alarm's wait.
    backoff: Duration,
    /// The silence a burst is out for (its last reply), so that one
    /// silence buys one burst, however long it lasts.
    asked_about: Option<u64>,
    /// The first send seen after the latest reply (the data plane's clock,
    /// as of the reading that first saw it), while no reply has followed.
    unanswered_since: Option<u64>,
    /// When the last burst was asked for: a long quiet spell after it
    /// forgets the backoff.
    last_burst_ns: u64,
    /// Bursts asked for, and how many of them proved false.
    pub bursts: u64,
    pub false_alarms: u64,
}

impl Watch {
    pub fn new(config: PassiveConfig) -> Self {
        Self {
            config,
            quiet_until_ns: 0,
            backoff: FIRST_BACKOFF,
            asked_about: None,
            unanswered_since: None,
            last_burst_ns: 0,
            bursts: 0,
            false_alarms: 0,
        }
    }

    /// Take in a reading (one every few milliseconds). `Some` when a burst
    /// should go out now: sending has gone on for at least the suspicious
    /// silence since the first send no reply has followed, this silence has
    /// not had its burst yet, and no backoff holds.
    pub fn sample(&mut self, s: &Sample, rtt: Option<Duration>) -> Option<Suspicion> {
        self.observe(s);
        let since = self.unanswered_since.filter(|_| self.config.enabled)?;
        if self.last_burst_ns != 0
            && s.now_ns.saturating_sub(self.last_burst_ns) > 2 * MAX_BACKOFF.as_nanos() as u64
        {
            // Quiet for long: what backed off back then says nothing now.
            self.backoff = FIRST_BACKOFF;
        }
        let silent = Duration::from_nanos(s.last_sent_ns - since);
        if silent < self.config.silence(rtt)
            || self.asked_about == Some(s.last_reply_ns)
            || s.now_ns < self.quiet_until_ns
        {
            return None;
        }
        self.asked_about = Some(s.last_reply_ns);
        self.last_burst_ns = s.now_ns;
        self.bursts += 1;
        Some(Suspicion {
            silent: (s.last_reply_ns != 0)
                .then(|| Duration::from_nanos(s.last_sent_ns - s.last_reply_ns)),
            flows: s.flows,
            destinations: s.destinations,
        })
    }

    /// Take in a reading while no burst may go out (another is out, or
    /// this uplink is not in service): the silence is still dated. The
    /// first reading that sees a send after the latest reply dates the
    /// silence from that send: the earliest one it can vouch for.
    pub fn observe(&mut self, s: &Sample) {
        if s.last_sent_ns <= s.last_reply_ns {
            self.unanswered_since = None;
        } else if self
            .unanswered_since
            .is_none_or(|since| since <= s.last_reply_ns)
        {
            self.unanswered_since = Some(s.last_sent_ns);
        }
    }

    /// A burst's verdict, at `now_ns`: `answered`, the suspicion was false:
    /// no burst for the backoff, which doubles. Otherwise the uplink went
    /// down and the backoff starts over.
    pub fn verdict(&mut self, answered: bool, now_ns: u64) {
        if answered {
            self.false_alarms += 1;
            self.quiet_until_ns = now_ns.saturating_add(self.backoff.as_nanos() as u64);
            self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
            // The same silence may be asked about again once the backoff
            // is over: the path may have died meanwhile.
            self.asked_about = None;
        } else {
            self.backoff = FIRST_BACKOFF;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bursts one never-answered silence can cost in the first `window`, and
    /// then per minute: the figure the README states.
    fn bursts_within(window: Duration) -> u32 {
        let mut at = Duration::ZERO;
        let mut backoff = FIRST_BACKOFF;
        let mut n = 0;
        while at <= window {
            n += 1;
            at += backoff;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
        n
    }

    const MS: u64 = 1_000_000;

    fn sample(now: u64, reply: u64, sent: u64) -> Sample {
        Sample {
            now_ns: now * MS,
            last_reply_ns: reply * MS,
            last_sent_ns: sent * MS,
            flows: 1,
            destinations: 1,
            syn_retries: 0,
        }
    }

    /// Readings every 10 ms of a stream that keeps sending from `from`
    /// with its last reply at `reply`: the first that raises suspicion.
    fn first_suspicion(w: &mut Watch, reply: u64, from: u64, rtt: Option<Duration>) -> Option<u64> {
        (from..from + 1000)
            .step_by(10)
            .find(|&t| w.sample(&sample(t, reply, t), rtt).is_some())
    }

    #[test]
    fn sending_on_without_a_reply_raises_suspicion_once() {
        let mut w = Watch::new(PassiveConfig::default());
        let rtt = Some(Duration::from_millis(5));
        // 4 x 5 ms = 20 ms, below the 60 ms floor: the floor counts, from
        // the first reading that saw the unanswered sending (1010).
        assert_eq!(first_suspicion(&mut w, 1000, 1010, rtt), Some(1070));
        // The same silence does not buy a second burst.
        assert_eq!(first_suspicion(&mut w, 1000, 1080, rtt), None);
        // A slow uplink waits longer: 4 x 40 ms.
        let mut w = Watch::new(PassiveConfig::default());
        let slow = Some(Duration::from_millis(40));
        assert_eq!(first_suspicion(&mut w, 1000, 1010, slow), Some(1170));
        // What the suspicion says: silent since the last reply.
        let mut w = Watch::new(PassiveConfig::default());
        for t in (1010..1070).step_by(10) {
            assert_eq!(w.sample(&sample(t, 1000, t), rtt), None);
        }
        let s = w.sample(&sample(1070, 1000, 1070), rtt).expect("suspect");
        assert_eq!(s.silent, Some(Duration::from_millis(70)));
        assert_eq!(
            s.describe(),
            "no replies from 1 flow (to 1 destination) for 70 ms"
        );
    }

    #[test]
    fn one_send_after_a_quiet_spell_is_not_a_silence() {
        let mut w = Watch::new(PassiveConfig::default());
        // Nothing for a minute after the last reply, then a DNS query,
        // answered 30 ms later.
        assert_eq!(w.sample(&sample(61_000, 1000, 61_000), None), None);
        assert_eq!(w.sample(&sample(61_010, 1000, 61_000), None), None);
        assert_eq!(w.sample(&sample(61_020, 1000, 61_000), None), None);
        assert_eq!(w.sample(&sample(61_030, 61_030, 61_000), None), None);
        // Answered traffic never adds up to a silence.
        for t in (61_040..70_000).step_by(10) {
            assert_eq!(w.sample(&sample(t, t - 5, t), None), None);
        }
        assert_eq!(w.bursts, 0);
    }

    #[test]
    fn no_sending_is_no_suspicion() {
        let mut w = Watch::new(PassiveConfig::default());
        // A download that ended: the last ACK went right after the last
        // data; then nothing, for ever.
        assert_eq!(w.sample(&sample(90_000, 1000, 1001), None), None);
        // An idle connection: nothing sent since its last reply.
        assert_eq!(w.sample(&sample(90_000, 5000, 4000), None), None);
        let off = PassiveConfig {
            enabled: false,
            ..PassiveConfig::default()
        };
        assert_eq!(Watch::new(off).sample(&sample(9000, 0, 9000), None), None);
    }

    #[test]
    fn false_alarms_back_off_and_a_real_failure_starts_over() {
        let mut w = Watch::new(PassiveConfig::default());
        // A client blasting UDP at a server that never answers: no reply,
        // ever, and sending all the time (from 40 ms on).
        let mut bursts = Vec::new();
        for t in (40..200_000).step_by(10) {
            if w.sample(&sample(t, 0, t), None).is_some() {
                bursts.push(t);
                w.verdict(true, t * MS);
            }
        }
        // 100 ms, then 1, 2, 4, 8, 16, 32, 60, 60 ... s later.
        assert_eq!(bursts[..4], [100, 1100, 3100, 7100]);
        let first_minute = bursts.iter().filter(|&&t| t <= 60_100).count();
        assert_eq!(first_minute as u32, bursts_within(Duration::from_secs(60)));
        assert_eq!(first_minute, 6);
        let late: Vec<u64> = bursts.windows(2).map(|p| p[1] - p[0]).skip(6).collect();
        assert!(late.iter().all(|&gap| gap == 60_000), "{late:?}");
        let never = w.sample(&sample(500_000, 0, 500_000), None);
        assert_eq!(
            never.map(|s| s.describe()).as_deref(),
            Some("no replies from 1 flow (to 1 destination) since lb started listening")
        );
        assert_eq!(w.false_alarms, bursts.len() as u64);
        // A burst that fails starts the backoff over.
        w.verdict(false, 300_000 * MS);
        assert_eq!(w.backoff, FIRST_BACKOFF);
        // So does a long quiet spell after false alarms.
        let mut w = Watch::new(PassiveConfig::default());
        for t in (40..100_000).step_by(10) {
            if w.sample(&sample(t, 0, t), None).is_some() {
                w.verdict(true, t * MS);
            }
        }
        assert_eq!(w.backoff, MAX_BACKOFF);
        let later = 400_000;
        assert_eq!(w.sample(&sample(later, later - 1, later), None), None);
        assert_eq!(
            w.sample(&sample(later + 10, later - 1, later + 10), None),
            None
        );
        assert_eq!(w.backoff, FIRST_BACKOFF);
    }
}
