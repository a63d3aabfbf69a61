//! The bucket table: from uplink states, weights and tiers to the weights
//! it is built from ([`weights`], pure: no I/O, no clock;
//! `lb_common::table` does the bucket arithmetic), and the table the data
//! plane has ([`Buckets`]), rebalanced with minimal disruption and made
//! live in one step when it changes.
//!
//! Tiers give active/backup: only the best (lowest-numbered) tier that has
//! an uplink able to take new flows gets any; the tiers behind it carry
//! traffic only when every uplink ahead of them is down.

use anyhow::Result;
use lb_common::{
    policy::{Policy, MAX_POLICIES},
    table::{self, Table},
    BUCKETS, MAX_UPLINKS,
};

use crate::dataplane::{takers, Dataplane, Family};

/// Each policy's bucket table for one family as the data plane has it
/// (index 0: the default policy), as lbd last wrote it.
#[derive(Debug)]
pub struct Buckets {
    family: Family,
    live: Vec<Table>,
    /// What each policy's entry says, once lbd (or the data plane it
    /// adopted) wrote it.
    written: Vec<Option<Policy>>,
}

/// What one policy wants of the data plane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyWant {
    /// By uplink index; an uplink not in the policy has weight 0.
    pub candidates: Vec<Candidate>,
    /// `lb_common::policy::fallback`.
    pub fallback: u32,
    /// `lb_common::policy::sticky`, and its timeout.
    pub sticky: u32,
    pub sticky_timeout_ns: u64,
}

impl Buckets {
    /// Nothing written yet.
    pub fn new(family: Family) -> Self {
        Self {
            family,
            live: vec![table::empty(); MAX_POLICIES as usize],
            written: vec![None; MAX_POLICIES as usize],
        }
    }

    /// The live tables of an adopted data plane: rebalancing from them
    /// moves nothing that need not move.
    pub fn adopted(family: Family, tables: Vec<Table>) -> Self {
        let mut out = Self::new(family);
        for (slot, t) in out.live.iter_mut().zip(tables) {
            *slot = t;
        }
        out
    }

    /// Policy `index`'s table as the data plane has it.
    pub fn table(&self, index: u32) -> &Table {
        self.live.get(index as usize).unwrap_or(&self.live[0])
    }

    /// Rebalance each policy of `wants` (by policy index) for its
    /// candidates, moving only the buckets that must move, and make each
    /// result live if it changed (two map writes a policy). Policies past
    /// `wants` get no uplink. Returns how many buckets moved in all.
    pub fn converge(&mut self, wants: &[PolicyWant], dataplane: &mut Dataplane) -> Result<usize> {
        let mut total = 0;
        for index in 0..MAX_POLICIES as usize {
            let want = wants.get(index);
            if want.is_none() && self.written[index].is_none() {
                continue;
            }
            let mut next = self.live[index];
            let weights = want.map_or([0; MAX_UPLINKS as usize], |w| weights(&w.candidates));
            let moved = table::rebalance(&mut next, &weights);
            let policy = Policy {
                active_table: 0,
                takers: takers(&next),
                fallback: want.map_or(0, |w| w.fallback),
                sticky: want.map_or(0, |w| w.sticky),
                sticky_timeout_ns: want.map_or(0, |w| w.sticky_timeout_ns),
            };
            let same_entry = self.written[index].is_some_and(|w| {
                Policy {
                    active_table: 0,
                    ..w
                } == policy
            });
            if moved > 0 || self.written[index].is_none() {
                dataplane.set_policy(self.family, index as u32, Some(&next), policy)?;
                log::info!(
                    "{}bucket table{} updated: {moved} of {BUCKETS} buckets moved",
                    self.family.label(),
                    if index == 0 {
                        String::new()
                    } else {
                        format!(" of policy #{index}")
                    }
                );
            } else if !same_entry {
                dataplane.set_policy(self.family, index as u32, None, policy)?;
            }
            self.written[index] = if want.is_some() {
                dataplane.policy(self.family, index as u32)
            } else {
                None
            };
            self.live[index] = next;
            total += moved;
        }
        Ok(total)
    }
}

/// What the balancer needs to know about one uplink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    pub weight: u32,
    pub tier: u8,
    /// Healthy and enabled (not drained, disabled or down).
    pub takes_new_flows: bool,
    /// Over its loss or latency threshold: new flows only when no healthy
    /// uplink can take them.
    pub degraded: bool,
}

/// Weights per uplink index for `lb_common::table::rebalance`: the weights
/// of the best tier's uplinks that take new flows, zero for all others.
/// Degraded uplinks count only when no healthy one can take new flows.
pub fn weights(uplinks: &[Candidate]) -> [u32; MAX_UPLINKS as usize] {
    let usable = |u: &Candidate, degraded_ok: bool| {
        u.takes_new_flows && u.weight > 0 && (degraded_ok || !u.degraded)
    };
    let degraded_ok = !uplinks.iter().any(|u| usable(u, false));
    let mut out = [0; MAX_UPLINKS as usize];
    let best = uplinks
        .iter()
        .filter(|u| usable(u, degraded_ok))
        .map(|u| u.tier)
        .min();
    for (slot, u) in out.iter_mut().zip(uplinks) {
        if usable(u, degraded_ok) && Some(u.tier) == best {
            *slot = u.weight;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(weight: u32, tier: u8, up: bool) -> Candidate {
        Candidate {
            weight,
            tier,
            takes_new_flows: up,
            degraded: false,
        }
    }

    #[test]
    fn degraded_uplinks_only_when_nothing_healthy_is_up() {
        let degraded = Candidate {
            degraded: true,
            ..c(4, 0, true)
        };
        assert_eq!(
            weights(&[degraded, c(1, 1, true)])[..2],
            [0, 1],
            "a healthy backup beats a degraded primary"
        );
        assert_eq!(
            weights(&[degraded, c(1, 1, false)])[..2],
            [4, 0],
            "degraded is better than nothing"
        );
    }

    #[test]
    fn backup_tier_idle_while_a_primary_is_up() {
        let w = weights(&[c(1, 0, true), c(3, 0, false), c(5, 1, true)]);
        assert_eq!(w[..3], [1, 0, 0]);
    }

    #[test]
    fn backup_tier_takes_over_when_all_primaries_are_down() {
        let w = weights(&[c(1, 0, false), c(3, 0, false), c(5, 1, true), c(2, 1, true)]);
        assert_eq!(w[..4], [0, 0, 5, 2]);
    }

    #[test]
    fn nothing_up_gives_no_weights() {
        assert!(weights(&[c(1, 0, false), c(1, 1, false)])
            .iter()
            .all(|&w| w == 0));
    }
}
