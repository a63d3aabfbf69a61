//! Overflow: which devices' rings `XDP_REDIRECT` overflows, and how long
//! each sends lb's packets through its queue instead (the adaptive
//! hand-off, `lb_common::egress` says why).
//!
//! Pure: the ring watch's count per device and the time come in, a change
//! of path goes out; `egress` applies it. The hysteresis lives here. A
//! device whose ring overflows takes its queue at once, for a hold; after
//! it, `XDP_REDIRECT` again, and if the ring overflows again within the
//! hold just served (the load that filled it is still there), the next
//! hold is twice as long, up to [`MAX_HOLD`]; a device that stayed calm
//! on XDP for as long as its last hold starts again from [`FIRST_HOLD`].
//! Each return to XDP under a load that still overflows costs one burst
//! of losses (what the ring drops before lbd hears of it), so the first
//! hold is long enough for a transfer of a few seconds to pay one, and
//! the doubling keeps a long one to a handful; a device that overflowed
//! once, in a burst, is back on XDP in a few seconds, having lost
//! nothing but the queue's cost per packet meanwhile. The same shape as
//! passive detection's false alarms (1 s doubling to 60 s).

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

/// The first hold of a device whose ring overflowed.
pub const FIRST_HOLD: Duration = Duration::from_secs(4);
/// The longest hold: how long a device whose ring overflows every time
/// it comes back keeps its queue before it tries again.
pub const MAX_HOLD: Duration = Duration::from_secs(256);

/// How often lbd says again that a device without carrier loses frames.
pub const DOWN_SAID_EVERY: Duration = Duration::from_secs(60);

/// A change of a device's path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Its ring overflowed: through its queue, for `hold`.
    Queue { dropped: u64, hold: Duration },
    /// The hold is over: `XDP_REDIRECT` again.
    Xdp,
}

#[derive(Debug, Clone)]
struct Ring {
    /// The count last read (`None`: not read yet).
    seen: Option<u64>,
    /// Until when it takes its queue, while it does.
    queued_until: Option<Instant>,
    /// Its next (or current) hold.
    hold: Duration,
    /// When its last hold ended, if one did.
    back_at: Option<Instant>,
    /// What the last overflow lost (for the reason shown).
    dropped: u64,
    /// When frames lost while it had no carrier were last said, and how
    /// many were lost since.
    down_said: Option<Instant>,
    down_lost: u64,
}

impl Default for Ring {
    fn default() -> Self {
        Ring {
            seen: None,
            queued_until: None,
            hold: FIRST_HOLD,
            back_at: None,
            dropped: 0,
            down_said: None,
            down_lost: 0,
        }
    }
}

/// Every device lb sends to, and how its ring fares.
#[derive(Debug, Default)]
pub struct Overflow {
    rings: BTreeMap<u32, Ring>,
}

impl Overflow {
    /// The devices (ifindexes) lb sends to now: new ones start on XDP,
    /// gone ones are forgotten. Whether the set changed.
    pub fn track(&mut self, ifindexes: &[u32]) -> bool {
        let before = self.rings.len();
        self.rings.retain(|i, _| ifindexes.contains(i));
        let mut changed = self.rings.len() != before;
        for &i in ifindexes {
            if let std::collections::btree_map::Entry::Vacant(e) = self.rings.entry(i) {
                e.insert(Ring::default());
                changed = true;
            }
        }
        changed
    }

    /// The devices tracked.
    pub fn devices(&self) -> Vec<u32> {
        self.rings.keys().copied().collect()
    }

    /// Device `ifindex`'s count (frames lost at it, ever) read
    /// at `now`: the change of its path this calls for, if any. The first
    /// reading only sets where counting starts (the count outlives lbd).
    pub fn observe(&mut self, ifindex: u32, count: u64, now: Instant) -> Option<Change> {
        let ring = self.rings.get_mut(&ifindex)?;
        let new = ring.seen.map(|seen| count.saturating_sub(seen));
        ring.seen = Some(count);
        if let Some(until) = ring.queued_until {
            if now < until {
                return None;
            }
            ring.queued_until = None;
            ring.back_at = Some(now);
            return Some(Change::Xdp);
        }
        let dropped = new.filter(|&n| n > 0)?;
        // Back on XDP for less than the hold it served: the load is still
        // there, wait twice as long. Calm for longer: a new episode.
        ring.hold = match ring.back_at {
            Some(back) if now.duration_since(back) < ring.hold => (ring.hold * 2).min(MAX_HOLD),
            _ => FIRST_HOLD,
        };
        ring.queued_until = Some(now + ring.hold);
        ring.dropped = dropped;
        Some(Change::Queue {
            dropped,
            hold: ring.hold,
        })
    }

    /// Whether `ifindex` takes its queue now, and why.
    pub fn queued(&self, ifindex: u32) -> Option<String> {
        let ring = self.rings.get(&ifindex)?;
        ring.queued_until.map(|_| {
            format!(
                "its ring overflowed (XDP_REDIRECT lost {} frames to it): through its queue for {} s",
                ring.dropped,
                ring.hold.as_secs()
            )
        })
    }

    /// The last count read for `ifindex`.
    pub fn count(&self, ifindex: u32) -> Option<u64> {
        self.rings.get(&ifindex)?.seen
    }

    /// Whether `count` for `ifindex` says frames were lost since the last
    /// reading.
    pub fn rose(&self, ifindex: u32, count: u64) -> bool {
        self.rings
            .get(&ifindex)
            .and_then(|r| r.seen)
            .is_some_and(|seen| count > seen)
    }

    /// Device `ifindex`'s count read at `now` while it has no carrier (a
    /// LAN port whose client just went away): the frames were lost to a
    /// device that could take none, not to a full ring, and its queue
    /// would not help. Counting goes on from `count`; its path stays as it
    /// is. How many were lost since last said, when it is time to say it
    /// again (at most every [`DOWN_SAID_EVERY`]: a client that left can
    /// have traffic sent after it for minutes).
    pub fn lost_while_down(&mut self, ifindex: u32, count: u64, now: Instant) -> Option<u64> {
        let ring = self.rings.get_mut(&ifindex)?;
        ring.down_lost += count.saturating_sub(ring.seen.unwrap_or(count));
        ring.seen = Some(count);
        if ring
            .down_said
            .is_some_and(|said| now.duration_since(said) < DOWN_SAID_EVERY)
        {
            return None;
        }
        ring.down_said = Some(now);
        Some(std::mem::take(&mut ring.down_lost))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn the_first_reading_only_sets_the_start() {
        let (mut o, t) = (Overflow::default(), Instant::now());
        o.track(&[3]);
        // Drops counted before lbd started are not an overflow now.
        assert_eq!(o.observe(3, 5000, t), None);
        assert_eq!(o.observe(3, 5000, t + ms(10)), None);
        assert_eq!(o.queued(3), None);
        assert_eq!(o.observe(4, 1, t), None, "an untracked device");
    }

    #[test]
    fn an_overflow_takes_the_queue_for_a_hold_then_xdp_again() {
        let (mut o, t) = (Overflow::default(), Instant::now());
        o.track(&[3]);
        o.observe(3, 0, t);
        assert_eq!(
            o.observe(3, 120, t + ms(10)),
            Some(Change::Queue {
                dropped: 120,
                hold: FIRST_HOLD
            })
        );
        assert!(o
            .queued(3)
            .is_some_and(|why| why.contains("lost 120 frames")));
        // Counts while queued change nothing.
        assert_eq!(o.observe(3, 130, t + FIRST_HOLD / 2), None);
        assert_eq!(
            o.observe(3, 130, t + ms(10) + FIRST_HOLD),
            Some(Change::Xdp)
        );
        assert_eq!(o.queued(3), None);
        assert_eq!(o.observe(3, 130, t + ms(20) + FIRST_HOLD), None);
    }

    #[test]
    fn overflowing_again_soon_doubles_the_hold_up_to_the_most() {
        let (mut o, mut t) = (Overflow::default(), Instant::now());
        o.track(&[3]);
        let mut count = 0;
        o.observe(3, count, t);
        let mut holds = Vec::new();
        for _ in 0..9 {
            count += 50;
            t += ms(10);
            match o.observe(3, count, t) {
                Some(Change::Queue { hold, .. }) => holds.push(hold),
                other => panic!("expected an overflow, got {other:?}"),
            }
            t += holds.last().copied().unwrap_or(FIRST_HOLD);
            assert_eq!(o.observe(3, count, t), Some(Change::Xdp));
        }
        let want: Vec<Duration> = (0..9)
            .map(|i| (FIRST_HOLD * 2u32.pow(i)).min(MAX_HOLD))
            .collect();
        assert_eq!(holds, want);
        assert_eq!(holds.last(), Some(&MAX_HOLD));
    }

    #[test]
    fn a_calm_spell_as_long_as_the_hold_starts_again_from_the_first() {
        let (mut o, t) = (Overflow::default(), Instant::now());
        o.track(&[3]);
        o.observe(3, 0, t);
        o.observe(3, 10, t);
        let back = t + FIRST_HOLD;
        assert_eq!(o.observe(3, 10, back), Some(Change::Xdp));
        // Soon: doubled.
        assert_eq!(
            o.observe(3, 20, back + ms(500)),
            Some(Change::Queue {
                dropped: 10,
                hold: FIRST_HOLD * 2
            })
        );
        let back = back + ms(500) + FIRST_HOLD * 2;
        assert_eq!(o.observe(3, 20, back), Some(Change::Xdp));
        // Calm on XDP for as long as it last held: the first hold again.
        assert_eq!(
            o.observe(3, 25, back + FIRST_HOLD * 2 + ms(1)),
            Some(Change::Queue {
                dropped: 5,
                hold: FIRST_HOLD
            })
        );
    }

    #[test]
    fn devices_come_and_go() {
        let mut o = Overflow::default();
        assert!(o.track(&[3, 4]));
        assert!(!o.track(&[4, 3]));
        assert!(o.track(&[4]));
        assert_eq!(o.devices(), [4]);
    }

    #[test]
    fn frames_lost_while_a_device_has_no_carrier_never_make_it_take_its_queue() {
        let mut o = Overflow::default();
        o.track(&[7]);
        let t = Instant::now();
        assert_eq!(o.observe(7, 100, t), None, "where counting starts");
        assert!(o.rose(7, 116));
        assert_eq!(o.lost_while_down(7, 116, t), Some(16), "said");
        assert_eq!(o.lost_while_down(7, 130, t), None, "not again at once");
        assert_eq!(o.observe(7, 130, t), None, "a quiet tick");
        let later = t + DOWN_SAID_EVERY;
        assert_eq!(
            o.lost_while_down(7, 131, later),
            Some(15),
            "said again a while later, with all it lost since"
        );
        assert_eq!(o.queued(7), None);
        // Back with carrier, an overflow counts from where the last
        // reading left off.
        assert!(!o.rose(7, 131));
        assert_eq!(
            o.observe(7, 136, later),
            Some(Change::Queue {
                dropped: 5,
                hold: FIRST_HOLD
            })
        );
    }
}
