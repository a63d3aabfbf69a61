//! The recent history an operator asks for with `lbctl events`: health
//! transitions and their reasons, lifecycle changes, operator actions,
//! addresses and gateways that changed, adoption. Kept in a bounded ring
//! (the oldest go first) and streamed to followers as it happens.
//!
//! Owns the ring and the broadcast to followers; the daemon says what
//! happened. Never blocks the daemon: a follower too slow to keep up loses
//! events, and is told how many.

use std::{
    collections::VecDeque,
    time::{SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

/// Events kept for `lbctl events`.
pub const KEPT: usize = 1000;

/// One thing that happened.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Event {
    /// When, UTC, RFC 3339 with milliseconds.
    pub at: String,
    /// `health`, `lifecycle`, `operator`, `address`, `gateway`, `prefix`
    /// (a delegation), `ipv6` (an uplink's IPv6 state), `quota`, `daemon`.
    pub kind: String,
    /// The uplink it is about, if any.
    pub uplink: Option<String>,
    pub message: String,
}

/// The ring and the followers.
#[derive(Debug)]
pub struct History {
    ring: VecDeque<Event>,
    followers: broadcast::Sender<Event>,
}

impl Default for History {
    fn default() -> Self {
        Self {
            ring: VecDeque::with_capacity(KEPT),
            followers: broadcast::channel(256).0,
        }
    }
}

impl History {
    /// Record an event now.
    pub fn say(&mut self, kind: &str, uplink: Option<&str>, message: impl Into<String>) {
        let event = Event {
            at: rfc3339(SystemTime::now()),
            kind: kind.to_string(),
            uplink: uplink.map(str::to_string),
            message: message.into(),
        };
        if self.ring.len() == KEPT {
            self.ring.pop_front();
        }
        self.ring.push_back(event.clone());
        // No follower is fine.
        let _ = self.followers.send(event);
    }

    /// The events kept, oldest first.
    pub fn recent(&self) -> Vec<Event> {
        self.ring.iter().cloned().collect()
    }

    /// New events from now on.
    pub fn follow(&self) -> broadcast::Receiver<Event> {
        self.followers.subscribe()
    }
}

/// `2026-11-29T17:01:02.345Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days as i64);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60,
        since.subsec_millis()
    )
}

/// The civil date (year, month, day) of a day number (days since
/// 1970-01-01; Howard Hinnant's algorithm). Also dates `lbctl events`.
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps_are_utc_rfc3339() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_795_971_662_345);
        assert_eq!(rfc3339(t), "2026-11-29T17:01:02.345Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn the_ring_keeps_the_newest_and_followers_hear_them() {
        let mut h = History::default();
        let mut follower = h.follow();
        for i in 0..KEPT + 5 {
            h.say("health", Some("isp1"), format!("event {i}"));
        }
        let kept = h.recent();
        assert_eq!(kept.len(), KEPT);
        assert_eq!(kept[0].message, "event 5");
        assert_eq!(kept[KEPT - 1].message, format!("event {}", KEPT + 4));
        // The follower's buffer overflowed: it is told, then goes on.
        assert!(matches!(
            follower.try_recv(),
            Err(broadcast::error::TryRecvError::Lagged(_))
        ));
        assert!(follower.try_recv().is_ok());
    }
}
