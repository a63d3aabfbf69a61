//! Volume quotas: the fair-usage caps of many ISP plans ("500 GB a month,
//! from the 1st"). This module owns the arithmetic (periods, usage from the
//! data plane's byte counters) and the usage file that carries it across
//! restarts; the daemon acts on what it says. It never touches the kernel.
//!
//! Usage is what lb forwards through the uplink, both ways, as the data
//! plane counts it (its per-uplink byte counters survive lbd restarts with
//! the pinned data plane). Periods start at 00:00 UTC.

use std::collections::BTreeMap;
use std::path::Path;

use crate::{
    config::{Action, Period, QuotaConfig},
    control::events::civil_from_days,
};
use anyhow::Result;
use serde::{Deserialize, Serialize};

// The daemon's side of quotas (below the book): its view and its imports.
#[allow(unused_imports)]
use super::*;

const DAY: u64 = 24 * 60 * 60;

/// A volume for people: "1.23 GB" (decimal units, as ISPs count).
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KB", "MB", "GB", "TB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit < UNITS.len() - 1 {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.2} {}", UNITS[unit])
    }
}

/// A Unix time as "2026-12-01 00:00 UTC".
pub fn utc_text(secs: u64) -> String {
    let (year, month, day) = civil_from_days((secs / DAY) as i64);
    let minutes = secs % DAY / 60;
    format!(
        "{year}-{month:02}-{day:02} {:02}:{:02} UTC",
        minutes / 60,
        minutes % 60
    )
}

/// The day number (days since 1970-01-01) of a civil date.
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    // Shift the year to start in March so that February's length is last.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// When (Unix seconds) the period holding `now` began.
pub fn period_start(config: &QuotaConfig, now: u64) -> u64 {
    let today = (now / DAY) as i64;
    let start_day = match config.period {
        Period::Day => today,
        Period::Week => {
            // 1970-01-01 was a Thursday (4).
            let weekday = (today + 3).rem_euclid(7) + 1;
            today - (weekday - i64::from(config.reset_day)).rem_euclid(7)
        }
        Period::Month => {
            let (year, month, day) = civil_from_days(today);
            let reset = u32::from(config.reset_day);
            if day >= reset {
                days_from_civil(year, month, reset)
            } else if month == 1 {
                days_from_civil(year - 1, 12, reset)
            } else {
                days_from_civil(year, month - 1, reset)
            }
        }
    };
    start_day.max(0) as u64 * DAY
}

/// When (Unix seconds) the period after the one that began at `start` begins.
pub fn next_start(config: &QuotaConfig, start: u64) -> u64 {
    match config.period {
        Period::Day => start + DAY,
        Period::Week => start + 7 * DAY,
        // Any day of the next month, then back to its reset day.
        Period::Month => period_start(config, start + 31 * DAY),
    }
}

/// One uplink's usage in its current period, as kept in the usage file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Usage {
    /// When the period began (Unix seconds).
    pub period_start: u64,
    /// Bytes used in it.
    pub used: u64,
    /// The data plane's byte counter (in + out) at the last reading.
    pub counter: u64,
    /// Whether the quota was reached in this period (its action taken).
    pub reached: bool,
    /// The data plane's counter slot (uplink index) `counter` was read
    /// from; none in files of earlier lbds. Uplinks reordered in the
    /// configuration read another slot: the new one's counter is taken as
    /// it is, not as a difference to the old one's.
    #[serde(default)]
    pub slot: Option<u32>,
}

/// What a reading changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Nothing,
    /// The quota was reached now.
    Reached,
    /// A new period began; the quota had been reached in the old one.
    Renewed,
}

impl Usage {
    /// A first reading: nothing used yet in the current period.
    pub fn new(config: &QuotaConfig, slot: u32, counter: u64, now: u64) -> Usage {
        Usage {
            period_start: period_start(config, now),
            used: 0,
            counter,
            reached: false,
            slot: Some(slot),
        }
    }

    /// Take up the data plane's counter (`counter`, bytes both ways) at
    /// `now`, from counter slot `slot`. A counter lower than the last one
    /// means a new data plane (after `lbd --teardown`): all of it is new.
    /// Another slot than the last (uplinks reordered) starts a new baseline:
    /// at most one reading's traffic goes uncounted, none is counted twice.
    pub fn account(&mut self, config: &QuotaConfig, slot: u32, counter: u64, now: u64) -> Outcome {
        let delta = if self.slot.is_some_and(|s| s != slot) {
            0
        } else {
            counter.checked_sub(self.counter).unwrap_or(counter)
        };
        self.counter = counter;
        self.slot = Some(slot);
        let start = period_start(config, now);
        let mut outcome = Outcome::Nothing;
        if start != self.period_start {
            if self.reached {
                outcome = Outcome::Renewed;
            }
            *self = Usage {
                period_start: start,
                used: 0,
                counter,
                reached: false,
                slot: Some(slot),
            };
        }
        self.used = self.used.saturating_add(delta);
        // A reload raised the quota above what was used.
        if self.reached && self.used < config.bytes {
            self.reached = false;
            outcome = Outcome::Renewed;
        }
        if !self.reached && self.used >= config.bytes {
            self.reached = true;
            outcome = Outcome::Reached;
        }
        outcome
    }
}

/// The usage file: each uplink's usage by name.
pub type Book = BTreeMap<String, Usage>;

/// Read the usage file; none yet is an empty book.
pub fn load(path: &Path) -> Result<Book> {
    super::kept::read_json(path, "counting starts afresh")
}

/// Write the usage file whole or not at all.
pub fn save(path: &Path, book: &Book) -> Result<()> {
    super::kept::write_json(path, book)
}

/// How often the quotas' usage is written while it changes. What a crash
/// loses of it is not lost: the next lbd reads the rest from the pinned
/// data plane's counters.
pub(super) const QUOTA_SAVE_INTERVAL: Duration = Duration::from_secs(30);

/// The usage file in the state directory.
pub(super) const QUOTA_FILE: &str = "quota.json";

/// What reaching quota `q` makes of the uplink.
pub(super) fn quota_admin(q: &QuotaConfig) -> Admin {
    match q.action {
        Action::Drain => Admin::Drain,
        Action::Disable => Admin::Disabled,
    }
}

/// Now, in Unix seconds (0 on a clock before 1970).
pub(super) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Daemon {
    /// Read the usage file, and put back in force the quotas reached in
    /// the current period. A file lbd cannot read is moved aside (and
    /// said): counting starts afresh rather than lbd not starting.
    pub(super) fn load_quota(&mut self) {
        if self.uplinks.iter().all(|u| u.cfg.quota.is_none()) {
            return;
        }
        let path = self.config.daemon.state_dir.join(QUOTA_FILE);
        self.quota = match load(&path) {
            Ok(book) => book,
            Err(e) => {
                let aside = path.with_extension("bad");
                let _ = std::fs::rename(&path, &aside);
                log::error!(
                    "quota: {e:#}; moved to {}, counting afresh",
                    aside.display()
                );
                Book::new()
            }
        };
        let now = unix_now();
        for u in &mut self.uplinks {
            let (Some(q), Some(usage)) = (u.cfg.quota, self.quota.get(&u.cfg.name)) else {
                continue;
            };
            if usage.reached && usage.period_start == period_start(&q, now) {
                u.admin = quota_admin(&q);
                u.reason = format!(
                    "quota reached this {} (kept from before lbd started)",
                    q.period.as_str()
                );
            }
        }
    }

    /// Take up the data plane's byte counters into the quotas' usage: an
    /// uplink that reaches its quota is drained or disabled (with the
    /// hooks run), and put back in service when a new period begins or a
    /// reload raises the quota above what it used (unless the operator
    /// changed it meanwhile). Called every second.
    pub fn account_quota(&mut self) -> Result<()> {
        let now = unix_now();
        let mut acted = false;
        let mut failed = Vec::new();
        for i in 0..self.uplinks.len() {
            let Some(q) = self.uplinks[i].cfg.quota else {
                continue;
            };
            // One uplink's counters that cannot be read hold up no other's.
            let s = match self.dataplane.uplink_stats(self.uplinks[i].index) {
                Ok(s) => s,
                Err(e) => {
                    failed.push(format!(
                        "uplink {}: reading its byte counters: {e:#}",
                        self.uplinks[i].cfg.name
                    ));
                    continue;
                }
            };
            let counter = s.tx_bytes.saturating_add(s.rx_bytes);
            let slot = self.uplinks[i].index;
            let usage = self
                .quota
                .entry(self.uplinks[i].cfg.name.clone())
                .or_insert_with(|| Usage::new(&q, slot, counter, now));
            let before = *usage;
            let outcome = usage.account(&q, slot, counter, now);
            self.quota_unsaved |= *usage != before;
            if outcome != Outcome::Nothing {
                self.quota_act(i, &q, outcome);
                acted = true;
            }
        }
        if self.quota_unsaved && (acted || self.quota_saved.elapsed() >= QUOTA_SAVE_INTERVAL) {
            self.save_quota();
        }
        anyhow::ensure!(failed.is_empty(), "{}", failed.join("; "));
        Ok(())
    }

    /// Take the action `outcome` calls for on uplink `i`. Decided is done:
    /// the view changes, the history and the hooks are told, and a data
    /// plane that cannot be written now takes it from the next round.
    pub(super) fn quota_act(&mut self, i: usize, q: &QuotaConfig, outcome: Outcome) {
        let taken = Instant::now();
        let u = &self.uplinks[i];
        let used = self.quota.get(&u.cfg.name).map_or(0, |usage| usage.used);
        let (admin, said) = match outcome {
            Outcome::Nothing => return,
            Outcome::Reached => (
                Some(quota_admin(q)),
                format!(
                    "quota reached: {} of {} used this {}; uplink {}",
                    human(used),
                    human(q.bytes),
                    q.period.as_str(),
                    match q.action {
                        Action::Drain => "draining (no new flows)",
                        Action::Disable => "disabled (its flows move)",
                    }
                ),
            ),
            // Only what the quota did is undone.
            Outcome::Renewed => (
                (u.admin == quota_admin(q)).then_some(Admin::Enabled),
                format!(
                    "quota renewed ({} of {} used this {}); uplink back in service",
                    human(used),
                    human(q.bytes),
                    q.period.as_str()
                ),
            ),
        };
        let Some(admin) = admin else {
            self.history.say("quota", Some(&u.cfg.name), said);
            return;
        };
        let previous = u.admin.as_str();
        let u = &mut self.uplinks[i];
        u.admin = admin;
        u.reason = said.clone();
        if let Err(e) = self.converge_dataplane_timed(i, taken, taken) {
            log::warn!(
                "uplink {}: writing the data plane for its quota failed: {e:#}; tried again \
                 every round",
                self.uplinks[i].cfg.name
            );
        }
        let u = &self.uplinks[i];
        match outcome {
            Outcome::Reached => log::warn!("uplink {}: {said}", u.cfg.name),
            _ => log::info!("uplink {}: {said}", u.cfg.name),
        }
        let name = u.cfg.name.clone();
        let hook = hooks::Event {
            kind: "quota",
            uplink: name.clone(),
            interface: u.cfg.interface.clone(),
            state: admin.as_str().to_string(),
            previous: previous.to_string(),
            reason: said.clone(),
            rtt_ms: None,
            loss_percent: 0.0,
        };
        self.history.say("quota", Some(&name), said);
        hooks::run_all(
            &self.config.daemon.hooks,
            self.config.daemon.hook_timeout,
            &hook,
        );
        self.save_quota();
    }

    /// Write the usage file now (also on the way out).
    pub fn save_quota(&mut self) {
        if self.quota.is_empty() {
            return;
        }
        let path = self.config.daemon.state_dir.join(QUOTA_FILE);
        match save(&path, &self.quota) {
            Ok(()) => self.quota_unsaved = false,
            Err(e) => log::warn!("quota: {e:#} (usage kept in memory; trying again)"),
        }
        self.quota_saved = Instant::now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_bytes;

    fn month(reset_day: u8) -> QuotaConfig {
        QuotaConfig {
            bytes: 1000,
            period: Period::Month,
            reset_day,
            action: Action::Drain,
        }
    }

    fn at(year: i64, month: u32, day: u32, secs: u64) -> u64 {
        days_from_civil(year, month, day) as u64 * DAY + secs
    }

    #[test]
    fn civil_dates_round_trip() {
        for days in [-800_000, -1, 0, 1, 59, 365, 11_016, 20_000, 2_000_000] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days, "{y}-{m}-{d}");
        }
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(days_from_civil(2026, 11, 29), 20_786);
        assert_eq!(utc_text(at(2026, 12, 1, 3660)), "2026-12-01 01:01 UTC");
        assert_eq!(human(999), "999 B");
        assert_eq!(human(1_234_567_890), "1.23 GB");
    }

    #[test]
    fn months_start_on_the_reset_day() {
        let q = month(15);
        assert_eq!(
            period_start(&q, at(2026, 11, 29, 3600)),
            at(2026, 11, 15, 0)
        );
        assert_eq!(
            period_start(&q, at(2026, 11, 14, 86_399)),
            at(2026, 10, 15, 0)
        );
        assert_eq!(period_start(&q, at(2026, 1, 3, 0)), at(2025, 12, 15, 0));
        assert_eq!(next_start(&q, at(2026, 12, 15, 0)), at(2027, 1, 15, 0));
        assert_eq!(next_start(&month(1), at(2027, 1, 1, 0)), at(2027, 2, 1, 0));
        assert_eq!(
            next_start(&month(28), at(2027, 1, 28, 0)),
            at(2027, 2, 28, 0)
        );
    }

    #[test]
    fn weeks_start_on_the_reset_weekday() {
        // 2026-11-29 is a Sunday; Monday (1) weeks began on the 23rd.
        let q = QuotaConfig {
            period: Period::Week,
            reset_day: 1,
            ..month(1)
        };
        assert_eq!(period_start(&q, at(2026, 11, 29, 100)), at(2026, 11, 23, 0));
        assert_eq!(period_start(&q, at(2026, 11, 30, 0)), at(2026, 11, 30, 0));
        let sunday = QuotaConfig { reset_day: 7, ..q };
        assert_eq!(
            period_start(&sunday, at(2026, 11, 29, 100)),
            at(2026, 11, 29, 0)
        );
    }

    #[test]
    fn usage_reaches_the_quota_once_and_a_new_period_renews_it() {
        let q = QuotaConfig {
            period: Period::Day,
            ..month(1)
        };
        let t = at(2026, 11, 29, 0);
        let mut usage = Usage::new(&q, 0, 5000, t);
        assert_eq!(usage.account(&q, 0, 5600, t + 10), Outcome::Nothing);
        assert_eq!(usage.used, 600);
        assert_eq!(usage.account(&q, 0, 6000, t + 20), Outcome::Reached);
        assert_eq!(usage.account(&q, 0, 9000, t + 30), Outcome::Nothing);
        assert_eq!(usage.used, 4000);
        // A new data plane: its counter starts from zero.
        assert_eq!(usage.account(&q, 0, 100, t + 40), Outcome::Nothing);
        assert_eq!(usage.used, 4100);
        assert_eq!(usage.account(&q, 0, 150, t + DAY), Outcome::Renewed);
        assert_eq!((usage.used, usage.reached), (50, false));
        assert_eq!(usage.period_start, t + DAY);
        // Uplinks reordered: slot 1's counter is a new baseline, not a
        // difference to slot 0's.
        assert_eq!(usage.account(&q, 1, 70_000, t + DAY + 10), Outcome::Nothing);
        assert_eq!(usage.used, 50);
        assert_eq!(usage.account(&q, 1, 70_030, t + DAY + 20), Outcome::Nothing);
        assert_eq!(usage.used, 80);
    }

    #[test]
    fn volumes_parse_with_their_units() {
        assert_eq!(parse_bytes("500GB"), Ok(500_000_000_000));
        assert_eq!(parse_bytes("1.5 TB"), Ok(1_500_000_000_000));
        assert_eq!(parse_bytes("2TiB"), Ok(2 << 40));
        assert_eq!(parse_bytes("300KB"), Ok(300_000));
        for bad in ["500", "500 GiG", "GB", "0GB", "-1GB", "1e30TB"] {
            assert!(parse_bytes(bad).is_err(), "{bad} was taken");
        }
    }

    #[test]
    fn the_usage_file_round_trips_and_a_bad_one_is_named() {
        let dir = std::env::temp_dir().join(format!("lb-quota-test-{}", std::process::id()));
        let path = dir.join("usage.json");
        assert_eq!(load(&path).ok(), Some(Book::new()));
        let mut book = Book::new();
        book.insert("isp1".into(), Usage::new(&month(1), 0, 7, 1_000_000));
        save(&path, &book).expect("saving");
        assert_eq!(load(&path).ok(), Some(book));
        std::fs::write(&path, "{ not json").expect("writing");
        let err = load(&path).expect_err("a bad file was read").to_string();
        assert!(err.contains("usage.json"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
