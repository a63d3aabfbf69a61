//! What changes the view besides the kernel: health verdicts (probes and
//! the traffic's signals), the operator's commands, and reloads. Each
//! changes the view and runs the data plane's part of a round; none writes
//! anything else itself.

use std::{net::Ipv4Addr, time::Instant};

use anyhow::{bail, Result};
use lb_common::maps::{signals6, uplink_state};

use crate::{
    config::{Config, UplinkConfig, MAX_WEIGHT},
    control::api::UplinkAction,
    control::hooks,
    daemon::uplink::Admin,
    health::passive,
    health::{self, HealthEvent, State as Health},
};

use super::*;

impl Daemon {
    /// Apply a health transition: data plane first, then log and hooks.
    pub fn on_health(&mut self, event: HealthEvent) -> Result<()> {
        let taken = Instant::now();
        let Some(u) = self.uplinks.get_mut(event.uplink) else {
            return Ok(());
        };
        if u.six.monitor.as_ref().map(|m| m.generation) == Some(event.generation) {
            return self.on_health6(event, taken);
        }
        if u.monitor.as_ref().map(|m| m.generation) != Some(event.generation) {
            // From a monitor that has since been replaced or stopped.
            return Ok(());
        }
        let previous = u.health;
        u.health = Some(event.transition.to);
        if event.transition.to == Health::Up {
            u.proven = true;
        }
        u.reason = event.transition.reason.clone();
        u.transitions += 1;
        self.converge_dataplane_timed(event.uplink, event.at.into_std(), taken)?;
        let u = &self.uplinks[event.uplink];
        let timing = u
            .last_change
            .map(|r| {
                format!(
                    "; in the data plane {} µs after the event ({} µs to the daemon, state written in {} µs, table in {} µs)",
                    r.queued_us + r.write_us,
                    r.queued_us,
                    r.write_us,
                    r.table_us
                )
            })
            .unwrap_or_default();
        let previous = previous.map_or("-", Health::as_str);
        let now = u.health.map_or("-", Health::as_str);
        // The transition's own reason: applying it may have put a waiting
        // state's in `u.reason` meanwhile.
        let reason = &event.transition.reason;
        log::info!(
            "uplink {}: {previous} -> {now} ({reason}){timing}",
            u.cfg.name,
        );
        let said = format!("{previous} -> {now}: {reason}");
        self.tell_health("health", &event, previous, now, said);
        Ok(())
    }

    /// Say a health transition of `event`'s uplink in the history (as
    /// `said`) and to the hooks (as `kind`).
    fn tell_health(
        &mut self,
        kind: &'static str,
        event: &HealthEvent,
        previous: &str,
        now: &str,
        said: String,
    ) {
        let u = &self.uplinks[event.uplink];
        let (name, interface) = (u.cfg.name.clone(), u.cfg.interface.clone());
        self.history.say("health", Some(&name), said);
        let hook = hooks::Event {
            kind,
            uplink: name,
            interface,
            state: now.to_string(),
            previous: previous.to_string(),
            reason: event.transition.reason.clone(),
            rtt_ms: event.stats.rtt.map(|d| d.as_secs_f64() * 1000.0),
            loss_percent: event.stats.loss_percent(),
        };
        hooks::run_all(
            &self.config.daemon.hooks,
            self.config.daemon.hook_timeout,
            &hook,
        );
    }

    /// Apply a transition of uplink `event.uplink`'s IPv6 health: the
    /// data plane first (its IPv6 entry and table), then log, history and
    /// hooks (kind `health6`).
    fn on_health6(&mut self, event: HealthEvent, taken: Instant) -> Result<()> {
        let u = &mut self.uplinks[event.uplink];
        let previous = u.six.health.map_or("-", Health::as_str);
        let now = event.transition.to.as_str();
        u.six.health = Some(event.transition.to);
        u.six.reason = event.transition.reason.clone();
        u.six.transitions += 1;
        self.converge_dataplane_timed(event.uplink, event.at.into_std(), taken)?;
        let u = &self.uplinks[event.uplink];
        let reason = &event.transition.reason;
        log::info!("uplink {}: IPv6 {previous} -> {now} ({reason})", u.cfg.name);
        let said = format!("IPv6 {previous} -> {now}: {reason}");
        self.tell_health("health6", &event, previous, now, said);
        Ok(())
    }

    /// Listen to the traffic (every [`PASSIVE_INTERVAL`]): an uplink in
    /// service that has sent for a suspicious while without a reply gets a
    /// burst of probes from its monitor, which takes it down if nobody
    /// answers. Never for the last uplink in service: passive evidence
    /// does not take the office offline.
    pub fn passive_tick(&mut self) -> Result<()> {
        if !self.config.passive.enabled {
            return Ok(());
        }
        let now_ns = clock_ns(libc::CLOCK_MONOTONIC_COARSE);
        let in_service: Vec<bool> = self
            .uplinks
            .iter()
            .map(|u| u.dataplane_state() == uplink_state::ACTIVE && u.health == Some(Health::Up))
            .collect();
        let in_service6: Vec<bool> = self
            .uplinks
            .iter()
            .map(|u| {
                u.dataplane_state6() == uplink_state::ACTIVE && u.health6() == Some(Health::Up)
            })
            .collect();
        let others = |up: &[bool], i: usize| up.iter().enumerate().any(|(j, &up)| j != i && up);
        // One burst at a time: two uplinks suspect at once (a probe target
        // gone) must not both be taken down on the same evidence.
        let mut busy = self
            .uplinks
            .iter()
            .any(|u| u.verdict.is_some() || u.six.verdict.is_some());
        for i in 0..self.uplinks.len() {
            let index = self.uplinks[i].index;
            let sample = self.dataplane.signals(index, now_ns)?;
            let u = &mut self.uplinks[i];
            u.syn_retries = sample.syn_retries;
            // Without probes nothing could confirm a suspicion: passive
            // evidence alone never takes an uplink down.
            let may = in_service[i] && others(&in_service, i) && !u.cfg.probes.is_empty();
            let rtt = u.snapshot.as_ref().and_then(|s| s.borrow().stats.rtt);
            let listener = Listener {
                name: &u.cfg.name,
                family: "",
                watch: &mut u.watch,
                verdict: &mut u.verdict,
                monitor: u.monitor.as_ref(),
            };
            busy |= listener.listen(&sample, rtt, may && !busy, now_ns);
            if !u.probes_ipv6() {
                continue;
            }
            let sample = self.dataplane.signals(signals6(index), now_ns)?;
            let u = &mut self.uplinks[i];
            let may = in_service6[i] && others(&in_service6, i);
            let rtt = u.six.snapshot.as_ref().and_then(|s| s.borrow().stats.rtt);
            let listener = Listener {
                name: &u.cfg.name,
                family: "IPv6 ",
                watch: &mut u.six.watch,
                verdict: &mut u.six.verdict,
                monitor: u.six.monitor.as_ref(),
            };
            busy |= listener.listen(&sample, rtt, may && !busy, now_ns);
        }
        Ok(())
    }

    /// An operator's change to uplink `name`. Refused, with nothing changed,
    /// for an unknown uplink or a bad value.
    pub fn operate(&mut self, name: &str, action: UplinkAction) -> Result<String> {
        let taken = Instant::now();
        let Some(index) = self.uplinks.iter().position(|u| u.cfg.name == name) else {
            let known: Vec<&str> = self.uplinks.iter().map(|u| u.cfg.name.as_str()).collect();
            bail!("no uplink named {name:?} (uplinks: {})", known.join(", "));
        };
        let u = &mut self.uplinks[index];
        let before = (u.admin, u.weight, u.reason.clone());
        let done = match action {
            UplinkAction::Enable => {
                u.admin = Admin::Enabled;
                format!("uplink {name} enabled")
            }
            UplinkAction::Disable => {
                u.admin = Admin::Disabled;
                format!("uplink {name} disabled: its flows move to other uplinks")
            }
            UplinkAction::Drain => {
                u.admin = Admin::Drain;
                format!("uplink {name} draining: no new flows, existing ones finish")
            }
            UplinkAction::Weight { weight } => {
                if weight == 0 || weight > MAX_WEIGHT {
                    bail!("weight must be between 1 and {MAX_WEIGHT}, got {weight} (use drain to stop new flows)");
                }
                u.weight = weight;
                format!("uplink {name} weight {weight}")
            }
        };
        u.reason = format!("operator: {done}");
        if let Err(e) = self.converge_dataplane_timed(index, taken, taken) {
            // Refused means unchanged: the view goes back, and the data
            // plane is written from it again (what the failed write had
            // changed, if anything).
            let u = &mut self.uplinks[index];
            (u.admin, u.weight, u.reason) = before;
            if let Err(again) = self.converge_dataplane() {
                log::warn!("uplink {name}: putting the data plane back failed: {again:#}; tried again every round");
            }
            return Err(e.context(format!("uplink {name}: nothing changed")));
        }
        log::info!("{done} (operator)");
        self.history.say("operator", Some(name), done.clone());
        let u = &self.uplinks[index];
        let (admin, weight, configured) = (u.admin, u.weight, u.cfg.weight);
        self.said.record(name, admin, weight, configured);
        self.save_said();
        Ok(done)
    }

    /// Put back what the operator said of each uplink before this lbd
    /// started (`kept`). A file lbd cannot read is moved aside (and said):
    /// the uplinks start as configured rather than lbd not starting.
    pub(super) fn load_said(&mut self) {
        let path = self.config.daemon.state_dir.join(kept::FILE);
        self.said = match kept::load(&path) {
            Ok(said) => said,
            Err(e) => {
                let aside = path.with_extension("bad");
                let _ = std::fs::rename(&path, &aside);
                log::error!("{e:#}; moved to {}", aside.display());
                kept::Said::default()
            }
        };
        let names: Vec<&str> = self.uplinks.iter().map(|u| u.cfg.name.as_str()).collect();
        let before = self.said.uplinks.len();
        self.said
            .uplinks
            .retain(|name, _| names.contains(&name.as_str()));
        let mut forgot = self.said.uplinks.len() != before;
        for u in &mut self.uplinks {
            forgot |= self.said.forget_stale_weight(&u.cfg.name, u.cfg.weight);
            let (admin, weight) = self.said.kept(&u.cfg.name, u.cfg.weight);
            if let Some(admin) = admin {
                u.admin = admin;
                u.reason = format!(
                    "operator: {} (kept from before lbd started)",
                    admin.as_str()
                );
                log::info!("uplink {}: {}", u.cfg.name, u.reason);
            }
            if let Some(weight) = weight {
                u.weight = weight;
                log::info!(
                    "uplink {}: weight {weight}, as the operator set it before lbd started",
                    u.cfg.name
                );
            }
        }
        if forgot {
            self.save_said();
        }
    }

    /// Write what the operator said to the state directory; a failure is
    /// said, and what was said holds until lbd stops.
    pub(super) fn save_said(&self) {
        let path = self.config.daemon.state_dir.join(kept::FILE);
        if let Err(e) = kept::save(&path, &self.said) {
            log::warn!("{e:#}: the operator's uplink commands hold until lbd stops, not after");
        }
    }

    /// Take up configuration `new` (already validated whole). What can
    /// change in place does, with the data plane converged after it, and
    /// existing flows untouched: weights, tiers, health settings and
    /// probes, gateways, the classifier mode, NAT ports, flow timeouts,
    /// hooks. Anything else (uplinks added, removed or renamed, the LANs,
    /// routing, metrics, socket, pin directory, flow table size) is left
    /// for a restart, which is said.
    pub fn reconfigure(&mut self, new: Config) -> Result<Reconfigured> {
        let old = &self.config;
        let mut restart = Vec::new();
        let uplinks = |c: &Config| -> Vec<(String, String)> {
            c.uplinks
                .iter()
                .map(|u| (u.name.clone(), u.interface.clone()))
                .collect()
        };
        if uplinks(old) != uplinks(&new) {
            restart.push("the uplinks (added, removed, renamed or moved)".to_string());
        }
        if old.lans != new.lans {
            restart.push("the LANs".into());
        }
        if old.routing != new.routing {
            restart.push("[routing]".into());
        }
        if old.metrics != new.metrics {
            restart.push("[metrics]".into());
        }
        if old.daemon.socket != new.daemon.socket || old.daemon.bpffs != new.daemon.bpffs {
            restart.push("[daemon] socket or bpffs".into());
        }
        if old.flows.max != new.flows.max {
            restart.push("[flows] max (the size of the pinned flow table)".into());
        }
        if !restart.is_empty() {
            return Ok(Reconfigured::NeedsRestart(restart));
        }

        // The data plane's settings first, all or none: a reload refused
        // here has changed nothing.
        let mut done = Vec::new();
        let before = self.dataplane.settings();
        if let Err(e) = self.reload_settings(&new, &mut done) {
            if let Err(undo) = self.dataplane.restore_settings(before) {
                log::error!("reload: putting the data plane's settings back failed: {undo:#}");
            }
            return Err(e);
        }
        let old = &self.config;
        let reached: Vec<String> = self
            .quota
            .iter()
            .filter(|(_, usage)| usage.reached)
            .map(|(name, _)| name.clone())
            .collect();
        // Quotas removed: not reached any more, should they come back in
        // this period.
        let mut unreached = Vec::new();
        let mut said_changed = false;
        for (u, cfg) in self.uplinks.iter_mut().zip(&new.uplinks) {
            if u.cfg.weight != cfg.weight {
                done.push(format!(
                    "{}: weight {} -> {}",
                    cfg.name, u.cfg.weight, cfg.weight
                ));
                u.weight = cfg.weight;
                // The file's new weight wins over the operator's.
                said_changed |= self.said.forget_stale_weight(&cfg.name, cfg.weight);
            }
            if u.cfg.tier != cfg.tier {
                done.push(format!("{}: tier {} -> {}", cfg.name, u.cfg.tier, cfg.tier));
            }
            if u.cfg.gateway != cfg.gateway {
                done.push(format!(
                    "{}: gateway {} -> {}",
                    cfg.name, u.cfg.gateway, cfg.gateway
                ));
            }
            if u.cfg.shape != cfg.shape {
                done.push(format!("{}: shape", cfg.name));
            }
            if u.cfg.quota != cfg.quota {
                done.push(format!("{}: quota", cfg.name));
                // A reached quota that is gone no longer holds the uplink
                // back (a raised one is taken up by the next accounting).
                if let (Some(old_q), None) = (u.cfg.quota, cfg.quota) {
                    unreached.push(cfg.name.clone());
                    if reached.contains(&cfg.name) && u.admin == quota_admin(&old_q) {
                        u.admin = Admin::Enabled;
                        u.reason = "quota removed by a reload: back in service".into();
                        done.push(format!("{}: back in service (its quota is gone)", cfg.name));
                    }
                }
            }
            let prefixes = |c: &UplinkConfig| -> Vec<(Ipv4Addr, u8)> {
                c.routed.iter().map(|r| (r.addr, r.len)).collect()
            };
            if prefixes(&u.cfg) != prefixes(cfg) {
                // The next convergence puts them in lb's nftables table.
                done.push(format!("{}: routed prefixes", cfg.name));
            }
            if u.cfg.health != cfg.health || u.cfg.probes != cfg.probes {
                done.push(format!("{}: health checks", cfg.name));
                // New monitors, starting from the health they had.
                u.monitor = None;
                u.six.monitor = None;
            }
            u.cfg = cfg.clone();
        }
        for name in unreached {
            if let Some(usage) = self.quota.get_mut(&name) {
                usage.reached = false;
                self.quota_unsaved = true;
            }
        }
        for warning in &new.warnings {
            log::warn!("{warning}");
        }
        if old.policies != new.policies {
            done.push(format!("policies ({})", new.policies.len()));
        }
        if old.rules != new.rules {
            // The next round writes them: new flows only, established
            // ones keep their uplinks.
            done.push(format!("rules ({}; new flows)", new.rules.len()));
        }
        if old.passive != new.passive {
            for u in &mut self.uplinks {
                u.watch = passive::Watch::new(new.passive);
                u.verdict = None;
                u.six.watch = passive::Watch::new(new.passive);
                u.six.verdict = None;
                // New monitors, with the new bursts, from the health they had.
                u.monitor = None;
                u.six.monitor = None;
            }
            done.push("[passive]".into());
        }
        if old.flows != new.flows {
            if let Ok(mut tables) = self.flow_tables.lock() {
                tables.set_timeouts(new.flows);
            }
            done.push("flow timeouts".into());
        }
        if old.daemon.hooks != new.daemon.hooks
            || old.daemon.hook_timeout != new.daemon.hook_timeout
        {
            done.push("hooks".into());
        }
        // The view has changed: from here on a failure is the new
        // configuration's to converge to, said and tried again every
        // round, not a refusal.
        self.config = new;
        if said_changed {
            self.save_said();
        }
        for i in 0..self.uplinks.len() {
            if let Err(e) = self.converge_monitor(i) {
                self.note_fault(i, Some(e));
            }
            if let Err(e) = self.converge_monitor6(i) {
                self.note_fault6(i, e);
            }
        }
        if let Err(e) = self.converge_dataplane() {
            log::warn!("reload: writing the data plane failed: {e:#}; tried again every round");
            done.push(format!(
                "the data plane not yet written ({e:#}; tried again every round)"
            ));
        }
        let said = if done.is_empty() {
            "reloaded: nothing changed".to_string()
        } else {
            format!("reloaded: {}", done.join("; "))
        };
        self.history.say("daemon", None, said);
        Ok(Reconfigured::Applied(done))
    }

    /// Write the settings a reload to `new` changes (the classifier,
    /// re-steered SYNs, NAT ports), saying each in `done`.
    fn reload_settings(&mut self, new: &Config, done: &mut Vec<String>) -> Result<()> {
        let old = &self.config;
        if old.balance != new.balance {
            self.dataplane
                .set_classifier(self.dataplane.seed(), new.balance.mode.number())?;
            done.push(format!(
                "classifier {} -> {} (new flows)",
                old.balance.mode, new.balance.mode
            ));
        }
        if old.passive != new.passive {
            self.dataplane
                .set_resteer_syn(new.passive.enabled && new.passive.resteer_syn)?;
        }
        if old.nat != new.nat {
            self.dataplane
                .set_nat_ports((new.nat.port_min, new.nat.port_max), self.local_ports)?;
            done.push("NAT ports (new flows)".into());
        }
        Ok(())
    }
}

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reconfigured {
    /// Applied in place: what changed.
    Applied(Vec<String>),
    /// Changes lbd takes up only by starting again (it then adopts its own
    /// data plane: no flow is dropped): what they are.
    NeedsRestart(Vec<String>),
}

/// One family of one uplink, as passive detection listens to it.
struct Listener<'a> {
    name: &'a str,
    /// "" for IPv4, "IPv6 " for IPv6, as logs say it.
    family: &'static str,
    watch: &'a mut passive::Watch,
    verdict: &'a mut Option<tokio::sync::oneshot::Receiver<bool>>,
    monitor: Option<&'a Running>,
}

impl Listener<'_> {
    /// Takes in `sample` (what the data plane's signals say at `now_ns`)
    /// and the verdict of a burst that is out; when `may_burst` and the
    /// traffic is suspect, asks the monitor for a burst of probes. Whether
    /// a burst went out.
    fn listen(
        self,
        sample: &passive::Sample,
        rtt: Option<std::time::Duration>,
        may_burst: bool,
        now_ns: u64,
    ) -> bool {
        if let Some(rx) = self.verdict {
            match rx.try_recv() {
                Ok(answered) => {
                    self.watch.verdict(answered, now_ns);
                    *self.verdict = None;
                }
                Err(tokio::sync::oneshot::error::TryRecvError::Empty) => return false,
                Err(tokio::sync::oneshot::error::TryRecvError::Closed) => *self.verdict = None,
            }
        }
        let (Some(monitor), true) = (self.monitor, may_burst) else {
            // Still watched, so that the silence is dated right.
            self.watch.observe(sample);
            return false;
        };
        let Some(suspicion) = self.watch.sample(sample, rtt) else {
            return false;
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        let burst = health::Burst {
            suspicion,
            verdict: tx,
        };
        if monitor.bursts.try_send(burst).is_err() {
            return false;
        }
        log::info!(
            "uplink {}: {}suspect ({}): probing it now",
            self.name,
            self.family,
            suspicion.describe()
        );
        *self.verdict = Some(rx);
        true
    }
}
