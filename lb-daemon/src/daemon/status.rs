//! What `lbctl status` and `lbctl flows` show, and the metrics read: the
//! view, the data plane's counters and lb's nftables counters, by uplink.
//! Reads only.

use std::{
    net::Ipv4Addr,
    sync::{Arc, Mutex},
};

use anyhow::{Context, Result};
use lb_common::{maps::uplink_state, reason, table};

use crate::{
    control::api::{EgressStatus, Ipv6Status, QuotaStatus, Status, UplinkStatus},
    dataplane::flows::FlowTables,
    health::State as Health,
    reconcile::nftables,
};

use super::*;

impl Daemon {
    pub(super) fn egress_status(&self, device: &str) -> Option<EgressStatus> {
        self.egress.choices.get(device).map(|c| EgressStatus {
            device: device.to_owned(),
            path: c.path().to_owned(),
            why: c.why.clone(),
            ring_drops: self.egress.ring_drops(device),
        })
    }

    /// Each policy: what takes its new flows, and its counters.
    fn policy_status(&self) -> Result<Vec<crate::control::api::PolicyStatus>> {
        let now = clock_ns(libc::CLOCK_MONOTONIC_COARSE);
        let sticky = self.dataplane.sticky_entries(now)?;
        let sticky6 = self.dataplane.sticky_entries6(now)?;
        let mut out = Vec::new();
        for index in 0..=self.config.policies.len() as u32 {
            let Some(written) = self.dataplane.policy(Family::V4, index) else {
                continue;
            };
            let written6 = self
                .dataplane
                .policy(Family::V6, index)
                .filter(|_| self.ipv6.lan().is_some())
                .unwrap_or_default();
            let stats = self.dataplane.policy_stats(index)?;
            out.push(crate::control::api::PolicyStatus {
                name: crate::reconcile::policies::policy_name(&self.config, index),
                taking: self
                    .uplinks
                    .iter()
                    .filter(|u| written.takes(u.index))
                    .map(|u| u.cfg.name.clone())
                    .collect(),
                taking6: self
                    .uplinks
                    .iter()
                    .filter(|u| written6.takes(u.index))
                    .map(|u| u.cfg.name.clone())
                    .collect(),
                fallback: lb_common::policy::fallback::name(written.fallback).into(),
                new_flows: stats.new_flows,
                dropped: stats.dropped,
                unreachable: stats.unreachable,
                sticky_hits: stats.sticky_hits,
                sticky_entries: (sticky.iter().filter(|(k, _)| k.policy == index).count()
                    + sticky6.iter().filter(|(k, _)| k.policy == index).count())
                    as u64,
            });
        }
        Ok(out)
    }

    /// Uplink `u`'s IPv6 as the data plane has it, while IPv6 is balanced.
    fn ipv6_status(&self, u: &Uplink) -> Option<Ipv6Status> {
        let lan = self.ipv6.lan()?;
        let six = self.ipv6.side(u.index as usize)?;
        let f = &u.facts6;
        Some(Ipv6Status {
            state: uplink_state::name(six.state).to_string(),
            address: text_or_none(f.addr),
            gateway: text_or_none(f.gateway),
            gateway_mac: f.gateway_mac.map_or_else(|| "-".into(), |m| mac_text(&m)),
            delegated: prefix6_text(f.delegated),
            translated_to: prefix6_text(ipv6::target(lan, f.delegated)),
            health: match (u.probes_ipv6(), u.six.health) {
                (false, _) => "follows IPv4".into(),
                (true, Some(h)) => h.as_str().into(),
                (true, None) => "-".into(),
            },
            reason: u.six.reason.clone(),
        })
    }

    /// Uplink `index`'s name, if any.
    fn name_of(&self, index: Option<usize>) -> Option<String> {
        Some(self.uplinks.get(index?)?.cfg.name.clone())
    }

    /// Everything `lbctl status` shows but the flow counts, which need a
    /// walk of the flow table: [`StatusDraft::finish`] does that walk, so
    /// that the caller can do it after letting go of the daemon.
    pub fn status(&self) -> Result<StatusDraft> {
        let counts = table::counts(self.buckets.table(lb_common::policy::DEFAULT_POLICY));
        let mut uplinks = Vec::new();
        for (i, u) in self.uplinks.iter().enumerate() {
            let s = self.dataplane.uplink_stats(u.index)?;
            let snap = u.snapshot.as_ref().map(|s| *s.borrow());
            let stats = snap.map(|s| s.stats).unwrap_or_default();
            uplinks.push(UplinkStatus {
                name: u.cfg.name.clone(),
                interface: u.cfg.interface.clone(),
                address: text_or_none(u.facts.addr),
                gateway: text_or_none(u.facts.gateway),
                gateway_config: u.cfg.gateway.to_string(),
                gateway_mac: u
                    .facts
                    .gateway_mac
                    .map_or_else(|| "-".into(), |m| mac_text(&m)),
                lifecycle: u.lifecycle().to_string(),
                table: self.config.routing.table(i),
                rule_priority: self.config.routing.priority(i),
                weight: u.weight,
                tier: u.cfg.tier,
                admin: u.admin.as_str().to_string(),
                health: u.health.map_or("-", Health::as_str).to_string(),
                reason: u.reason.clone(),
                transitions: u.transitions,
                rtt_ms: stats.rtt.map(|d| d.as_secs_f64() * 1000.0),
                jitter_ms: stats.jitter.map(|d| d.as_secs_f64() * 1000.0),
                loss_percent: stats.loss_percent(),
                state: uplink_state::name(u.dataplane_state()).to_string(),
                buckets: counts[u.index as usize],
                tx_packets: s.tx_packets,
                tx_bytes: s.tx_bytes,
                rx_packets: s.rx_packets,
                rx_bytes: s.rx_bytes,
                new_flows: s.new_flows,
                flows: 0,
                flows_ipv6: 0,
                inbound: 0,
                replies: s.replies,
                nat_failures: s.nat_failures,
                last_change: u.last_change,
                quota: u.cfg.quota.map(|q| {
                    let usage = self.quota.get(&u.cfg.name).copied().unwrap_or_default();
                    QuotaStatus {
                        limit_bytes: q.bytes,
                        used_bytes: usage.used,
                        period: q.period.as_str().into(),
                        period_start: usage.period_start,
                        next_period: quota::next_start(&q, usage.period_start),
                        action: q.action.as_str().into(),
                        reached: usage.reached,
                    }
                }),
                egress: self.egress_status(&u.cfg.interface),
                suspicions: u.watch.bursts,
                false_alarms: u.watch.false_alarms,
                syn_retries: u.syn_retries,
                ipv6: self.ipv6_status(u),
            });
        }
        let reasons = self.dataplane.reasons()?;
        let status = Status {
            // Filled in by `finish`.
            flows_expired: 0,
            flows_evicted: 0,
            mode: self.config.balance.mode.to_string(),
            uplinks,
            reasons: reason::NAMES
                .iter()
                .zip(reasons)
                .map(|(n, c)| (n.to_string(), c))
                .collect(),
            guard_dropped: 0,
            slow_path: self.name_of(self.slow_path_applied.lan),
            own_path: self.name_of(self.slow_path_applied.own),
            tunnels_own: self
                .slow_path_applied
                .transport
                .ports
                .iter()
                .map(|&port| {
                    let tunnel = self
                        .uplinks
                        .iter()
                        .find(|u| u.facts.transport_port == Some(port))
                        .map_or("a tunnel", |u| u.cfg.name.as_str());
                    format!("{tunnel} from UDP {port}")
                })
                .collect(),
            tunnels_own_path: self.name_of(self.slow_path_applied.transport.uplink),
            rounds: self.rounds,
            routing_changes: self.routing_changes,
            slow_path6: self
                .slow_path6_applied
                .filter(|_| self.ipv6.lan().is_some())
                .and_then(|i| self.uplinks.get(i))
                .map(|u| u.cfg.name.clone()),
            lan_ports: self
                .attachments
                .lan_ports()
                .map(|(_, n)| n.to_owned())
                .collect(),
            lan_faults: self
                .attachments
                .lan_faults()
                .map(|(port, why)| format!("{port}: {why}"))
                .collect(),
            pinned_at: self.config.daemon.bpffs.display().to_string(),
            adopted_flows: self.adopted_flows,
            kernel_destinations: self
                .bypass
                .prefixes()
                .iter()
                .map(|(a, l)| format!("{a}/{l}"))
                .collect(),
            lan_egress: self
                .attachments
                .lan_ports()
                .filter_map(|(_, name)| self.egress_status(name))
                .collect(),
            policies: self.policy_status()?,
            lan_prefix6: self.ipv6.lan().map(|(p, l)| format!("{p}/{l}")),
            no_ring_watch: self.dataplane.ring_watch().err().map(str::to_owned),
            no_hand_over: self.dataplane.no_hand_over().map(str::to_owned),
        };
        Ok(StatusDraft {
            status,
            pinned: self.dataplane.pinned_flows(self.uplinks.len() as u32)?,
            tables: self.flow_tables.clone(),
            counted_before: self.counted_before.clone(),
        })
    }

    /// What `lbctl flows` needs besides the walk: the tables, and each
    /// uplink's name and address by index. The walk itself
    /// ([`FlowQuery::run`]) happens without the daemon.
    pub fn flow_query(&self) -> FlowQuery {
        FlowQuery {
            tables: self.flow_tables.clone(),
            uplinks: self
                .uplinks
                .iter()
                .map(|u| (u.cfg.name.clone(), u.facts.addr))
                .collect(),
            npt6: self
                .uplinks
                .iter()
                .map(|u| self.ipv6.side(u.index as usize).map(|s| s.out))
                .collect(),
        }
    }
}

/// A walk of the flow table for `lbctl flows`.
pub struct FlowQuery {
    tables: Arc<Mutex<FlowTables>>,
    uplinks: Vec<(String, Option<Ipv4Addr>)>,
    /// Each uplink's IPv6 translation, by index.
    npt6: Vec<Option<lb_common::npt::Npt>>,
}

impl FlowQuery {
    /// The flows of `uplink` (by name) and of `client`, at most `limit`.
    /// The walk stops at the limit: bounded on a full table.
    pub fn run(
        &self,
        uplink: Option<&str>,
        client: Option<Ipv4Addr>,
        limit: usize,
    ) -> Result<crate::control::api::FlowList> {
        let wanted_uplink = match uplink {
            Some(name) => Some(
                self.uplinks
                    .iter()
                    .position(|(n, _)| n == name)
                    .with_context(|| {
                        let known: Vec<&str> =
                            self.uplinks.iter().map(|(n, _)| n.as_str()).collect();
                        format!("no uplink named {name:?} (uplinks: {})", known.join(", "))
                    })? as u32,
            ),
            None => None,
        };
        let now = clock_ns(libc::CLOCK_MONOTONIC_COARSE);
        let tables = lock(&self.tables, FLOW_TABLES)?;
        let mut out = Vec::new();
        let mut walked = 0u64;
        let mut truncated = false;
        for (key, value) in tables.walk()? {
            walked += 1;
            if wanted_uplink.is_some_and(|u| u != value.uplink)
                || client.is_some_and(|c| c.octets() != key.src_addr)
            {
                continue;
            }
            if out.len() == limit {
                truncated = true;
                break;
            }
            let (name, addr) = if value.uplink == lb_common::KERNEL_OWNED {
                ("kernel".to_string(), None)
            } else {
                self.uplinks
                    .get(value.uplink as usize)
                    .cloned()
                    .unwrap_or_else(|| (format!("#{}", value.uplink), None))
            };
            out.push(crate::dataplane::flows::describe(
                &key, &value, &name, addr, now,
            ));
        }
        // IPv6 flows after, unless the question is about an IPv4 client.
        let flows6 = if truncated || client.is_some() {
            Vec::new()
        } else {
            tables.flows6()?
        };
        for (key, value) in flows6 {
            walked += 1;
            if wanted_uplink.is_some_and(|u| u != value.uplink) {
                continue;
            }
            if out.len() == limit {
                truncated = true;
                break;
            }
            let name = match self.uplinks.get(value.uplink as usize) {
                Some((name, _)) => name.clone(),
                None if value.uplink == lb_common::KERNEL_OWNED => "kernel".into(),
                None => format!("#{}", value.uplink),
            };
            let npt = self.npt6.get(value.uplink as usize).copied().flatten();
            out.push(crate::dataplane::flows::describe6(
                &key, &value, &name, npt, now,
            ));
        }
        Ok(crate::control::api::FlowList {
            flows: out,
            walked,
            truncated,
        })
    }
}

/// A status waiting for its flow counts.
pub struct StatusDraft {
    status: Status,
    /// Flows pinned to an uplink since start.
    pinned: u64,
    tables: Arc<Mutex<FlowTables>>,
    counted_before: nftables::Counted,
}

impl StatusDraft {
    /// Walk the flow table (tenths of a second when it is full) and fill in
    /// the flows per uplink, and the evictions, which are the flows pinned
    /// that are neither collected nor still in the table.
    /// Waits for a collection that is under way, so that a flow is counted
    /// once: in the table, expired, or evicted.
    pub fn finish(mut self) -> Result<Status> {
        // Counted by nftables, read with `nft`: not under the daemon's lock.
        let mut counted = self.counted_before.clone();
        counted.add(&nftables::counted().unwrap_or_default());
        self.status.guard_dropped = counted.leaked;
        for (i, uplink) in self.status.uplinks.iter_mut().enumerate() {
            uplink.inbound = counted.inbound(i);
        }
        let tables = lock(&self.tables, FLOW_TABLES)?;
        let (v4, v6) = tables.count_by_uplink_and_family()?;
        for ((uplink, n4), n6) in self.status.uplinks.iter_mut().zip(&v4).zip(&v6) {
            uplink.flows = n4 + n6;
            uplink.flows_ipv6 = *n6;
        }
        let expired = tables.expired();
        self.status.flows_expired = expired;
        self.status.flows_evicted = self
            .pinned
            .saturating_sub(expired)
            .saturating_sub(v4.iter().chain(&v6).sum());
        Ok(self.status)
    }
}
