//! `lbctl explain`: where a connection goes and why, decided by the data
//! plane's own code on the data plane's own state. Reads only. IPv6's
//! answer is [`v6`]'s.

mod v6;

use std::net::Ipv4Addr;

use anyhow::Result;
use lb_common::{maps::uplink_state, table};

use crate::reconcile::{nftables, policies};

use super::*;

/// An explanation with only a verdict, maybe an uplink, and why.
fn answer(
    verdict: &str,
    uplink: Option<String>,
    why: Vec<String>,
) -> crate::control::api::Explanation {
    crate::control::api::Explanation {
        verdict: verdict.into(),
        uplink,
        bucket: None,
        policy: None,
        rule: None,
        source: None,
        why,
    }
}

impl Daemon {
    /// What conntrack says of `tuple`'s connection (either family), as an
    /// explanation of a packet the data plane leaves to the kernel
    /// (`remembered`: its flow table says so already); verdict "new" when
    /// conntrack has none.
    pub(super) fn kernel_connection(
        &self,
        tuple: &crate::observe::conntrack::Tuple,
        remembered: bool,
    ) -> crate::control::api::Explanation {
        use crate::observe::conntrack;
        let found = conntrack::lookup(tuple);
        let mut why = Vec::new();
        if remembered {
            why.push(
                "a connection of the kernel's: conntrack had it when the fast path first saw it, \
                 and the flow table remembers that"
                    .to_string(),
            );
        }
        match &found {
            Ok(Some(c)) => {
                let index = (c.mark & nftables::MARK_MASK) >> nftables::MARK_MASK.trailing_zeros();
                let uplink = index
                    .checked_sub(1)
                    .and_then(|i| self.uplinks.get(i as usize))
                    .map(|u| u.cfg.name.clone());
                let came = uplink
                    .as_ref()
                    .map_or_else(String::new, |u| format!(", arrived on {u}"));
                let o = &c.original;
                let handed = c.mark & nftables::HANDED_MARK != 0;
                why.push(match c.forwarded_to() {
                    _ if handed => format!(
                        "a flow of the fast path from {}:{} to {}:{}, handed to the kernel with \
                         its translation when one of its datagrams was too big for {} without \
                         DF: the kernel fragments and translates what reaches it (that datagram, \
                         or the whole flow once the flow table has let go of it) as the fast \
                         path did, and sends it out of that uplink",
                        o.src,
                        o.src_port,
                        o.dst,
                        o.dst_port,
                        uplink.as_deref().unwrap_or("its uplink")
                    ),
                    Some((addr, p)) => format!(
                        "port forward to {addr}:{p} of {}:{} from {}:{}{came}: the kernel \
                         translates it back and sends it out {}",
                        o.dst,
                        o.dst_port,
                        o.src,
                        o.src_port,
                        uplink.as_deref().unwrap_or("by its routes")
                    ),
                    None => format!(
                        "a connection the kernel tracks, from {}:{} to {}:{}{came}: the kernel \
                         routes it",
                        o.src, o.src_port, o.dst, o.dst_port
                    ),
                });
            }
            Ok(None) if remembered => why.push(
                "conntrack no longer has it: its next packets stay the kernel's until the flow \
                 idles out"
                    .into(),
            ),
            Ok(None) => {}
            Err(e) => why.push(format!("conntrack could not be asked: {e:#}")),
        }
        let kernel = remembered || matches!(found, Ok(Some(_)));
        crate::control::api::Explanation {
            verdict: if kernel { "kernel" } else { "new" }.into(),
            uplink: None,
            bucket: None,
            policy: None,
            rule: None,
            source: None,
            why,
        }
    }

    /// `key` as conntrack is asked about it.
    fn conntrack_tuple(key: &lb_common::maps::FlowKey) -> crate::observe::conntrack::Tuple {
        let port = |p: [u8; 2]| u16::from_be_bytes(p);
        crate::observe::conntrack::Tuple {
            src: Ipv4Addr::from(key.src_addr).into(),
            dst: Ipv4Addr::from(key.dst_addr).into(),
            src_port: port(key.src_port),
            dst_port: port(key.dst_port),
            proto: key.proto,
        }
    }

    /// Where a connection goes and why, decided by the data plane's own
    /// code (`lb_common::hash` and `lb_common::table::steer`) on the data
    /// plane's own state: its flow table, the destinations it leaves to
    /// the kernel, its seed, bucket table and uplink states. The order is
    /// the data plane's: what no uplink carries (`kernels_scope4`) first,
    /// then a pinned flow, then the kernel's
    /// destinations, then the kernel's connections (conntrack, asked as
    /// the data plane asks it), then the bucket table.
    pub fn explain(
        &self,
        key: &lb_common::maps::FlowKey,
        on: &On,
    ) -> Result<crate::control::api::Explanation> {
        use crate::control::api::Explanation;
        let name = |i: u32| {
            self.uplinks
                .get(i as usize)
                .map_or_else(|| format!("#{i}"), |u| u.cfg.name.clone())
        };
        if lb_common::kernels_scope4(key.src_addr, key.dst_addr) {
            return Ok(answer(
                "kernel",
                None,
                vec![format!(
                    "{} to {} is broadcast, multicast, link-local or from no address yet (a DHCP \
                     discover, mDNS): the LAN's and the router's own business, never an \
                     uplink's; left to the kernel",
                    Ipv4Addr::from(key.src_addr),
                    Ipv4Addr::from(key.dst_addr)
                )],
            ));
        }
        let existing = lock(&self.flow_tables, FLOW_TABLES)?.get(key)?;
        if existing.is_some_and(|f| f.uplink == lb_common::KERNEL_OWNED) {
            return Ok(self.kernel_connection(&Self::conntrack_tuple(key), true));
        }
        if let Some(flow) = existing {
            let uplink = self.uplinks.get(flow.uplink as usize);
            let keeps = uplink.is_some_and(|u| {
                uplink_state::keeps_flows(u.dataplane_state()) && flow.epoch == u.epoch as u8
            });
            if keeps {
                return Ok(Explanation {
                    verdict: "existing".into(),
                    uplink: Some(name(flow.uplink)),
                    bucket: None,
                    policy: None,
                    rule: None,
                    source: None,
                    why: vec![format!(
                        "a flow pinned to {} with NAT port {} ({})",
                        name(flow.uplink),
                        u16::from_be_bytes(flow.nat_port),
                        if key.proto == 6 {
                            "TCP"
                        } else {
                            "kept for its whole life"
                        }
                    )],
                });
            }
        }
        let dst = Ipv4Addr::from(key.dst_addr);
        if let Some((prefix, len)) = self
            .bypass
            .prefixes()
            .iter()
            .filter(|(p, l)| contains(*p, *l, dst))
            .max_by_key(|(_, l)| *l)
        {
            return Ok(answer("kernel", None, vec![format!(
                    "{dst} is in {prefix}/{len}, which the kernel keeps (the router's own, routed other than by a default route, or taken by an IPsec policy): left to the kernel untouched"
                )]));
        }
        if existing.is_none() && matches!(key.proto, 6 | 17) {
            let explained = self.kernel_connection(&Self::conntrack_tuple(key), false);
            if explained.verdict == "kernel" {
                return Ok(explained);
            }
        }
        let tuple = lb_common::hash::Tuple {
            src_addr: u32::from_be_bytes(key.src_addr),
            dst_addr: u32::from_be_bytes(key.dst_addr),
            src_port: u16::from_be_bytes(key.src_port),
            dst_port: u16::from_be_bytes(key.dst_port),
            proto: key.proto,
        };
        let hash = lb_common::hash::classify(
            self.dataplane.seed(),
            self.config.balance.mode.number(),
            &tuple,
        );
        let mut why = Vec::new();
        if existing.is_some() {
            why.push("its flow's uplink is down or has another address now: it moves".into());
        }
        let addrs = (
            Ipv4Addr::from(key.src_addr).into(),
            Ipv4Addr::from(key.dst_addr).into(),
        );
        let (policy, rule) = match self.explain_rules(addrs, &tuple, on, &mut why) {
            Ok(placed) => placed,
            Err(verdict) => return Ok(answer(verdict, None, why)),
        };
        let policy_name = policies::policy_name(&self.config, policy);
        let own = lb_common::hash::bucket(hash);
        let takes = |i: u32| {
            self.uplinks
                .get(i as usize)
                .is_some_and(|u| u.dataplane_state() == uplink_state::ACTIVE)
        };
        let written = self
            .dataplane
            .policy(Family::V4, policy)
            .unwrap_or_default();
        // The sticky entry the data plane would find first.
        if let Some(skey) =
            lb_common::policy::StickyKey::of(policy, written.sticky, key.src_addr, key.dst_addr)
        {
            let now = clock_ns(libc::CLOCK_MONOTONIC_COARSE);
            let entry = self
                .dataplane
                .sticky_entries(now)
                .unwrap_or_default()
                .into_iter()
                .find(|(k, _)| *k == skey);
            match entry {
                Some((_, v)) if written.takes(v.uplink) && takes(v.uplink) => {
                    why.push(format!(
                        "policy {policy_name} is sticky: this client was placed on {} {} s ago \
                         and stays there",
                        name(v.uplink),
                        now.saturating_sub(v.last_ns) / 1_000_000_000
                    ));
                    return Ok(Explanation {
                        verdict: "new".into(),
                        uplink: Some(name(v.uplink)),
                        bucket: None,
                        policy: Some(policy_name),
                        rule,
                        source: None,
                        why,
                    });
                }
                Some(_) => why.push(format!(
                    "policy {policy_name} is sticky, but this client's uplink takes no new flows \
                     of it now: it is placed anew, and its stickiness follows"
                )),
                None => why.push(format!(
                    "policy {policy_name} is sticky: no entry for this client yet, the one made \
                     now keeps its next flows with this one"
                )),
            }
        }
        let table = self.buckets.table(policy);
        let owner = |b: u32| table.get(b as usize).copied();
        let owner_of_own = owner(own).unwrap_or(lb_common::NO_UPLINK);
        why.push(format!(
            "a new flow of policy {policy_name}: its {} hash falls into bucket {own} of {}, which \
             belongs to {}",
            self.config.balance.mode,
            lb_common::BUCKETS,
            if owner_of_own == lb_common::NO_UPLINK {
                "no uplink".to_string()
            } else {
                name(owner_of_own)
            }
        ));
        let chosen = table::steer(hash, owner, takes);
        let verdict = match chosen {
            Some(u) if u == owner_of_own => {
                why.push(format!("{} takes new flows: it goes there", name(u)));
                "new"
            }
            Some(u) => {
                why.push(format!(
                    "that uplink takes no new flows now: the next of its buckets that does belongs to {}",
                    name(u)
                ));
                "new"
            }
            None => {
                why.push("no uplink takes new flows: it would be dropped and counted".into());
                "dropped"
            }
        };
        Ok(Explanation {
            verdict: verdict.into(),
            uplink: chosen.map(name),
            bucket: Some(own),
            policy: Some(policy_name),
            rule,
            source: None,
            why,
        })
    }

    /// Which policy the rules give a new flow from `addrs.0` to `addrs.1`
    /// (either family; `tuple` gives its ports and protocol), as the data
    /// plane decides it (`lb_common::policy::decide` on the rules, prefix
    /// sets and policy states it holds): `Ok((policy, [[rule]] number))`,
    /// or `Err(verdict)` when a rule keeps it from any uplink.
    pub(super) fn explain_rules(
        &self,
        addrs: (std::net::IpAddr, std::net::IpAddr),
        tuple: &lb_common::hash::Tuple,
        on: &On,
        why: &mut Vec<String>,
    ) -> std::result::Result<(u32, Option<u32>), &'static str> {
        use lb_common::policy::{decide, lookup, Decision, Flow, Found, NO_RULES};
        let Some(compiled) = self.policies.compiled() else {
            return Ok((lb_common::policy::DEFAULT_POLICY, None));
        };
        let rules = &compiled.table;
        if rules.count == 0 {
            return Ok((lb_common::policy::DEFAULT_POLICY, None));
        }
        // The data plane's own maps, in the live generation, looked up as
        // the data plane looks them up.
        let dp = &self.dataplane;
        let generation = dp.rule_generation();
        let wants = |flag: u32| rules.lookups & flag != 0;
        let lan = match (&on.lan, wants(lookup::LAN)) {
            (Some(port), true) => {
                let ifindex = std::fs::read_to_string(format!("/sys/class/net/{port}/ifindex"))
                    .ok()
                    .and_then(|s| s.trim().parse::<u32>().ok());
                let found = dp.lan_ports().ok().and_then(|ports| {
                    ports
                        .into_iter()
                        .find(|(i, _)| Some(*i) == ifindex)
                        .map(|(_, p)| p.rules[generation as usize])
                });
                if found.is_none() {
                    why.push(format!(
                        "{port} is not a LAN port lb is attached to: rules on a LAN do not match"
                    ));
                }
                found
            }
            _ => None,
        };
        let mut found = Found::default();
        found.look_up(
            rules,
            tuple,
            |out, side| {
                let addr = if side == lb_common::policy::SRC_SIDE {
                    addrs.0
                } else {
                    addrs.1
                };
                *out = dp
                    .prefix_rules(generation, side, addr)
                    .ok()
                    .flatten()
                    .unwrap_or(NO_RULES);
            },
            |out, side, port| *out = dp.port_rules(generation, side, port).unwrap_or(NO_RULES),
            |out| *out = lan.unwrap_or(NO_RULES),
        );
        let flow = Flow {
            proto: tuple.proto,
            dscp: on.dscp.unwrap_or(0),
            found,
        };
        let family = if addrs.0.is_ipv6() {
            Family::V6
        } else {
            Family::V4
        };
        let decision = decide(rules, &flow, dp.live_policies(family));
        let origin = |i: u32| rules.rules.get(i as usize).map_or(0, |r| r.origin);
        let line = |i: u32| {
            self.config
                .rules
                .get(origin(i) as usize - 1)
                .map_or(0, |r| r.line)
        };
        let name = |p: u32| policies::policy_name(&self.config, p);
        if on.lan.is_none() && !compiled.lan_names.is_empty() {
            why.push("no --lan given: rules on a LAN port are taken as not matching".into());
        }
        match decision {
            Decision::Kernel { rule } => {
                why.push(format!(
                    "rule #{} (line {}) leaves it to the kernel's routing",
                    origin(rule),
                    line(rule)
                ));
                Err("kernel")
            }
            Decision::Drop { policy, rule } => {
                why.push(format!(
                    "rule #{} (line {}) sends it to policy {}, none of whose uplinks takes new \
                     flows, and its fallback is drop: dropped and counted",
                    origin(rule),
                    line(rule),
                    name(policy)
                ));
                Err("dropped")
            }
            Decision::Unreachable { policy, rule } => {
                why.push(format!(
                    "rule #{} (line {}) sends it to policy {}, none of whose uplinks takes new \
                     flows, and its fallback is unreachable: the client is told host unreachable",
                    origin(rule),
                    line(rule),
                    name(policy)
                ));
                Err("unreachable")
            }
            Decision::Policy {
                policy,
                rule: Some(rule),
            } => {
                why.push(format!(
                    "rule #{} (line {}) matches: policy {}",
                    origin(rule),
                    line(rule),
                    name(policy)
                ));
                Ok((policy, Some(origin(rule))))
            }
            Decision::Policy { policy, rule: None } => {
                why.push(
                    "no rule sends it elsewhere (or its policy fell back): the default policy"
                        .into(),
                );
                Ok((policy, None))
            }
        }
    }
}

/// What `lbctl explain` may say about a packet besides its addresses:
/// the LAN port it comes in on and its DSCP.
#[derive(Debug, Clone, Default)]
pub struct On {
    pub lan: Option<String>,
    pub dscp: Option<u8>,
}

/// Whether `addr` is in `prefix/len`.
pub(super) fn contains(prefix: Ipv4Addr, len: u8, addr: Ipv4Addr) -> bool {
    let mask = if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len.min(32)))
    };
    u32::from(prefix) & mask == u32::from(addr) & mask
}
