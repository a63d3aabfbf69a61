//! IPv6: the prefix the LAN carries, each uplink's side (`UPLINKS6`: its
//! IPv6 state, next hop and NPTv6 translations), and the IPv6
//! destinations the kernel keeps (`BYPASS6`); the policies' IPv6 bucket
//! tables are `reconcile::buckets`'s, written in step with these.
//!
//! [`lan_prefix`], [`side`] and [`Ipv6::converge`]'s inputs are pure
//! functions of the kernel's snapshot and the uplinks' states; converging
//! writes only what changed. Without a LAN prefix IPv6 is not balanced at
//! all and stays the kernel's, as it would be without lb. It never
//! touches a flow: an uplink whose IPv6 dies is written down, and its
//! flows move on their next packet.

use std::{
    collections::BTreeSet,
    net::Ipv6Addr,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use lb_common::{
    maps::{uplink_state, Uplink6},
    npt::Npt,
};

use crate::{
    dataplane::Dataplane,
    observe::kernel6::{mask6, within, Observed6},
};

/// An IPv6 prefix.
pub type Prefix6 = (Ipv6Addr, u8);

/// What the kernel says about one uplink's IPv6.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Facts6 {
    /// Its global address on the WAN link (SLAAC or DHCPv6).
    pub addr: Option<Ipv6Addr>,
    /// Its IPv6 next hop: the default route's, usually link-local.
    pub gateway: Option<Ipv6Addr>,
    pub gateway_mac: Option<[u8; 6]>,
    /// The prefix delegated to the router through it (DHCPv6-PD).
    pub delegated: Option<Prefix6>,
    /// Its interface's IPv6 MTU (a router advertisement's MTU option).
    pub mtu: Option<u32>,
}

impl Facts6 {
    /// The IPv6 facts of the uplink on `ifindex`, with `delegated` as its
    /// delegation and `mtu` as its interface's IPv6 MTU. A next hop's address the kernel no longer holds is
    /// kept from `previous` while the next hop stays the same, as for
    /// IPv4 (`Facts::observe`).
    pub fn observe(
        v6: &Observed6,
        ifindex: u32,
        delegated: Option<Prefix6>,
        mtu: Option<u32>,
        previous: &Facts6,
    ) -> Facts6 {
        let gateway = v6.default_gateway(ifindex);
        let gateway_mac =
            gateway
                .and_then(|gw| v6.neighbour(ifindex, gw))
                .or(if previous.gateway == gateway {
                    previous.gateway_mac
                } else {
                    None
                });
        Facts6 {
            addr: v6.address_of(ifindex).map(|(a, _)| a),
            gateway,
            gateway_mac,
            delegated,
            mtu,
        }
    }
}

/// How long an uplink keeps a delegation the kernel stopped showing.
/// dhcpcd deletes its reject route for a delegation and adds it back a
/// few milliseconds later at every renewal: taken at its word, each
/// renewal would take IPv6 off the uplink and move its flows. A lease
/// that really ends is followed this much later; a new prefix at once.
pub const DELEGATION_HOLD: Duration = Duration::from_secs(3);

/// The delegation an uplink goes on with: `seen` (the kernel's now), or
/// `previous` while it has been gone for less than [`DELEGATION_HOLD`].
/// `lost_since` remembers since when it is gone.
pub fn held(
    seen: Option<Prefix6>,
    previous: Option<Prefix6>,
    lost_since: &mut Option<Instant>,
    now: Instant,
) -> Option<Prefix6> {
    match (seen, previous) {
        (None, Some(kept)) => {
            let since = *lost_since.get_or_insert(now);
            if now.saturating_duration_since(since) < DELEGATION_HOLD {
                return Some(kept);
            }
            *lost_since = None;
            None
        }
        _ => {
            *lost_since = None;
            seen
        }
    }
}

/// Which delegation each uplink has, from the router's delegations and
/// the uplinks' WAN addresses: the delegation that shares the longest
/// prefix with an uplink's address (an ISP delegates from the block its
/// WAN addresses come from), each delegation to one uplink at most. An
/// uplink whose `configured` prefix is set takes that one instead.
pub fn delegations(
    all: &[Prefix6],
    addrs: &[Option<Ipv6Addr>],
    configured: &[Option<Prefix6>],
) -> Vec<Option<Prefix6>> {
    let common = |a: Ipv6Addr, p: Ipv6Addr| (u128::from(a) ^ u128::from(p)).leading_zeros();
    let mut out: Vec<Option<Prefix6>> = configured.to_vec();
    out.resize(addrs.len(), None);
    let mut free: Vec<Prefix6> = all
        .iter()
        .filter(|d| !configured.iter().flatten().any(|c| c == *d))
        .copied()
        .collect();
    // Best matches first, so that two uplinks never claim one delegation.
    let mut pairs: Vec<(u32, usize, Prefix6)> = Vec::new();
    for (i, addr) in addrs.iter().enumerate() {
        if out[i].is_some() {
            continue;
        }
        if let Some(a) = addr {
            for d in &free {
                pairs.push((common(*a, d.0), i, *d));
            }
        }
    }
    pairs.sort_by(|x, y| y.0.cmp(&x.0).then(x.1.cmp(&y.1)));
    for (score, i, d) in pairs {
        // Less than a /32 in common: not the same ISP's block.
        if score < 32 || out[i].is_some() || !free.contains(&d) {
            continue;
        }
        out[i] = Some(d);
        free.retain(|f| *f != d);
    }
    out
}

/// The prefix the LAN carries: the first LAN interface's global prefix
/// that lies in an uplink's delegation, else its first global prefix
/// (`lans` by ifindex). `None`: no IPv6 on the LAN, nothing to balance.
pub fn lan_prefix(v6: &Observed6, lans: &[u32], delegated: &[Option<Prefix6>]) -> Option<Prefix6> {
    let prefixes: Vec<Prefix6> = lans.iter().flat_map(|&i| v6.prefixes_of(i)).collect();
    prefixes
        .iter()
        .find(|p| delegated.iter().flatten().any(|d| within(**p, *d)))
        .or(prefixes.first())
        .copied()
}

/// The prefix an uplink's flows take in place of the LAN's: the LAN's own
/// when its delegation holds the LAN's prefix, else the same subnet of its
/// own delegation (the LAN's bits past the delegation's length). `None`
/// when it has no delegation, or one too long to hold the LAN's prefix.
pub fn target(lan: Prefix6, delegated: Option<Prefix6>) -> Option<Prefix6> {
    let d = delegated?;
    if within(lan, d) {
        return Some(lan);
    }
    if d.1 > lan.1 {
        return None;
    }
    let host_bits = u128::MAX.checked_shr(u32::from(d.1)).unwrap_or(0);
    let subnet = u128::from(lan.0) & host_bits;
    Some((
        mask6(Ipv6Addr::from(u128::from(d.0) & !host_bits | subnet), lan.1),
        lan.1,
    ))
}

/// Uplink `state` (its data-plane state for IPv4: operator and health)
/// as IPv6 has it, given its IPv6 facts and the LAN's prefix: its entry,
/// or `None` when it has none to give.
pub fn side(lan: Option<Prefix6>, facts: &Facts6, state: u32, ipv6_up: bool) -> Option<Uplink6> {
    let lan = lan?;
    let to = target(lan, facts.delegated);
    let (out, back) = match to {
        Some(to) => (
            Npt::new(lan.0.octets(), to.0.octets(), lan.1)?,
            Npt::new(to.0.octets(), lan.0.octets(), lan.1)?,
        ),
        None => (Npt::default(), Npt::default()),
    };
    let ready = to.is_some() && facts.gateway_mac.is_some() && ipv6_up;
    let state = match state {
        uplink_state::ACTIVE | uplink_state::DRAIN if ready => state,
        _ => uplink_state::DOWN,
    };
    Some(Uplink6 {
        state,
        gw_mac: facts.gateway_mac.unwrap_or_default(),
        // Above what 16 bits hold, no link is narrower.
        ipv6_mtu: facts.mtu.map_or(0, |m| u16::try_from(m).unwrap_or(0)),
        _pad: [0; 4],
        out,
        back,
    })
}

/// An uplink's IPv6 state as written changed: an event for the operator
/// ([`Ipv6::take_changes`], said with [`change_text`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Change6 {
    /// The uplink, by index.
    pub index: usize,
    /// Its state before (`None`: its first entry), and now.
    pub from: Option<u32>,
    pub to: u32,
}

/// What the operator is told of `change`, with the uplink's IPv6 `facts`
/// and the LAN's prefix now: the states, and why. A state down with all
/// its facts in place is down for its uplink's state (carrier, health,
/// the operator), which other events tell.
pub fn change_text(change: &Change6, facts: &Facts6, lan: Option<Prefix6>) -> String {
    let from = change.from.map_or("-", uplink_state::name);
    let why = match change.to {
        uplink_state::DOWN => match (lan, facts.delegated, facts.gateway, facts.gateway_mac) {
            (_, None, ..) => "no delegated prefix".to_string(),
            (Some(lan), Some(d), ..) if target(lan, Some(d)).is_none() => format!(
                "its delegation {}/{} cannot hold the LAN's prefix {}/{}",
                d.0, d.1, lan.0, lan.1
            ),
            (_, _, None, _) => "no IPv6 default route through it".to_string(),
            (_, _, Some(gw), None) => format!("its IPv6 next hop {gw} is not resolved"),
            _ => "its state: carrier, health or operator".to_string(),
        },
        _ => match lan.and_then(|lan| Some((lan, target(lan, facts.delegated)?))) {
            Some((lan, to)) if to == lan => {
                format!(
                    "untranslated: the LAN's prefix {}/{} is its own",
                    lan.0, lan.1
                )
            }
            Some((lan, to)) => format!(
                "the LAN's {}/{} translated to {}/{}",
                lan.0, lan.1, to.0, to.1
            ),
            None => "-".to_string(),
        },
    };
    format!("IPv6 {from} -> {} ({why})", uplink_state::name(change.to))
}

/// IPv6 as the data plane has it, as lbd wrote it.
#[derive(Debug, Default)]
pub struct Ipv6 {
    /// The switch as written; `None` before the first convergence, which
    /// writes it either way (an adopted data plane may hold it on).
    on: Option<bool>,
    lan: Option<Prefix6>,
    written: Vec<Option<Uplink6>>,
    /// State changes written and not yet taken.
    changes: Vec<Change6>,
    bypass: BTreeSet<Prefix6>,
    /// Prefixes added to `BYPASS6` and not yet taken (`take_added`).
    added: Vec<Prefix6>,
}

impl Ipv6 {
    /// The LAN's prefix, when IPv6 is balanced.
    pub fn lan(&self) -> Option<Prefix6> {
        self.lan.filter(|_| self.on == Some(true))
    }

    /// As an adopted data plane holds it: the earlier lbd's `BYPASS6`, to
    /// converge from.
    pub fn adopted(bypass: impl IntoIterator<Item = Prefix6>) -> Self {
        Self {
            bypass: bypass.into_iter().collect(),
            ..Self::default()
        }
    }

    /// Uplink `index`'s entry as written.
    pub fn side(&self, index: usize) -> Option<Uplink6> {
        self.written.get(index).copied().flatten()
    }

    /// The uplinks' IPv6 state changes written since the last call,
    /// oldest first: one event each. An uplink whose first entry is down
    /// has nothing to tell.
    pub fn take_changes(&mut self) -> Vec<Change6> {
        std::mem::take(&mut self.changes)
    }

    /// The prefixes added to `BYPASS6` since the last call: flows pinned
    /// to destinations there are to be let go.
    pub fn take_added(&mut self) -> Vec<Prefix6> {
        std::mem::take(&mut self.added)
    }

    /// The IPv6 destinations the kernel keeps (`BYPASS6`), as written.
    pub fn bypass(&self) -> &BTreeSet<Prefix6> {
        &self.bypass
    }

    /// Make the data plane hold `sides` (by uplink index), the policies'
    /// IPv6 bucket tables (`tables` writes them: `reconcile::buckets`), and
    /// `bypass`; IPv6 is balanced while `lan` is known. Order: entries,
    /// tables, bypass, then the switch, so that the first balanced packet
    /// finds everything in place; off goes first.
    pub fn converge(
        &mut self,
        lan: Option<Prefix6>,
        sides: &[Option<Uplink6>],
        bypass: BTreeSet<Prefix6>,
        dataplane: &mut Dataplane,
        tables: impl FnOnce(&mut Dataplane) -> Result<()>,
    ) -> Result<()> {
        let on = lan.is_some();
        if !on && self.on != Some(false) {
            dataplane.set_ipv6(false)?;
            if self.on.is_some() {
                log::info!("IPv6: the LAN carries no prefix; IPv6 is the kernel's");
            }
            self.on = Some(false);
        }
        if lan != self.lan {
            if let Some((p, len)) = lan {
                log::info!("IPv6: the LAN carries {p}/{len}");
            }
            self.lan = lan;
        }
        self.written
            .resize(sides.len().max(self.written.len()), None);
        for (i, want) in sides.iter().enumerate() {
            if let Some(six) = want {
                if self.written[i] != Some(*six) {
                    dataplane
                        .set_uplink6(i as u32, six)
                        .with_context(|| format!("writing uplink #{i}'s IPv6 entry"))?;
                    let from = self.written[i].map(|w| w.state);
                    if from != Some(six.state) && (from, six.state) != (None, uplink_state::DOWN) {
                        self.changes.push(Change6 {
                            index: i,
                            from,
                            to: six.state,
                        });
                    }
                    self.written[i] = Some(*six);
                }
            }
        }
        tables(dataplane)?;
        // Added before the gone ones go: a covering prefix that replaces a
        // narrower one leaves no gap.
        for &(addr, len) in bypass.difference(&self.bypass) {
            dataplane.add_bypass6(addr, len)?;
            self.added.push((addr, len));
        }
        for &(addr, len) in self.bypass.difference(&bypass) {
            dataplane.remove_bypass6(addr, len)?;
        }
        self.bypass = bypass;
        if on && self.on != Some(true) {
            dataplane.set_ipv6(true)?;
            self.on = Some(true);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::kernel6::fixtures::{ip6, router6};

    #[test]
    fn a_delegation_that_blinks_is_kept_and_one_that_ends_is_let_go() {
        let (old, new) = (
            (ip6("2001:db8:2:1000::"), 56),
            (ip6("2001:db8:2:2000::"), 56),
        );
        let t0 = Instant::now();
        let mut lost = None;
        // dhcpcd's renewal: gone for a round, then back.
        assert_eq!(held(None, Some(old), &mut lost, t0), Some(old));
        assert_eq!(held(Some(old), Some(old), &mut lost, t0), Some(old));
        assert_eq!(lost, None);
        // Renumbering: the new prefix is taken at once.
        assert_eq!(held(Some(new), Some(old), &mut lost, t0), Some(new));
        // A lease that ends: kept for the hold, then gone.
        assert_eq!(held(None, Some(new), &mut lost, t0), Some(new));
        let later = t0 + DELEGATION_HOLD / 2;
        assert_eq!(held(None, Some(new), &mut lost, later), Some(new));
        let after = t0 + DELEGATION_HOLD;
        assert_eq!(held(None, Some(new), &mut lost, after), None);
        assert_eq!(held(None, None, &mut lost, after), None);
        assert_eq!(lost, None);
    }

    #[test]
    fn each_uplink_finds_its_delegation_and_the_lan_its_prefix() {
        let o = router6();
        let all = o.delegations();
        let addrs = [
            o.address_of(3).map(|a| a.0),
            o.address_of(4).map(|a| a.0),
            None,
        ];
        let d = delegations(&all, &addrs, &[None, None, None]);
        assert_eq!(
            d,
            vec![
                Some((ip6("2001:db8:1:100::"), 56)),
                Some((ip6("2001:db8:2:200::"), 56)),
                None
            ]
        );
        assert_eq!(
            lan_prefix(&o, &[2], &d),
            Some((ip6("2001:db8:1:100::"), 64))
        );
        // A configured prefix wins, and is nobody else's.
        let d = delegations(
            &all,
            &addrs,
            &[Some((ip6("2001:db8:2:200::"), 56)), None, None],
        );
        assert_eq!(d[0], Some((ip6("2001:db8:2:200::"), 56)));
        assert_eq!(
            d[1],
            Some((ip6("2001:db8:1:100::"), 56)),
            "what is left, within the same /32 (one ISP's block)"
        );
    }

    #[test]
    fn an_uplink_takes_the_lans_subnet_of_its_own_delegation() {
        let lan = (ip6("2001:db8:1:1ab::"), 64);
        assert_eq!(target(lan, Some((ip6("2001:db8:1:100::"), 56))), Some(lan));
        assert_eq!(
            target(lan, Some((ip6("2001:db8:2:200::"), 56))),
            Some((ip6("2001:db8:2:2ab::"), 64))
        );
        assert_eq!(
            target(lan, Some((ip6("2001:db8:9:9::"), 64))),
            Some((ip6("2001:db8:9:9::"), 64)),
            "a /64 delegation is taken whole"
        );
        assert_eq!(
            target((ip6("2001:db8:1::"), 48), Some((ip6("2001:db8:2::"), 56))),
            None
        );
        assert_eq!(target(lan, None), None);
    }

    #[test]
    fn an_uplinks_ipv6_is_down_without_a_next_hop_or_delegation() {
        let lan = Some((ip6("2001:db8:1:100::"), 64));
        let ready = Facts6 {
            addr: Some(ip6("2001:db8:2:ffff::2")),
            gateway: Some(ip6("fe80::2")),
            gateway_mac: Some([2, 0, 0, 0, 2, 1]),
            delegated: Some((ip6("2001:db8:2:200::"), 56)),
            mtu: None,
        };
        let six = side(lan, &ready, uplink_state::ACTIVE, true).expect("an entry");
        assert_eq!(six.state, uplink_state::ACTIVE);
        assert!(!six.out.is_identity());
        let mut a = ip6("2001:db8:1:100::1234").octets();
        six.out.apply(&mut a).expect("translates");
        assert!(within(
            (Ipv6Addr::from(a), 128),
            (ip6("2001:db8:2:200::"), 64)
        ));
        for (what, facts, up) in [
            (
                "no next hop's MAC",
                Facts6 {
                    gateway_mac: None,
                    ..ready
                },
                true,
            ),
            (
                "no delegation",
                Facts6 {
                    delegated: None,
                    ..ready
                },
                true,
            ),
            ("its IPv6 health down", ready, false),
        ] {
            let six = side(lan, &facts, uplink_state::ACTIVE, up).expect("an entry");
            assert_eq!(six.state, uplink_state::DOWN, "{what}");
        }
        assert_eq!(
            side(lan, &ready, uplink_state::DOWN, true).map(|s| s.state),
            Some(uplink_state::DOWN),
            "down for IPv4's reasons (carrier, operator) is down for IPv6"
        );
        assert_eq!(side(None, &ready, uplink_state::ACTIVE, true), None);
    }

    #[test]
    fn an_ipv6_state_change_says_why() {
        let lan = Some((ip6("2001:db8:1:1ab::"), 64));
        let ready = Facts6 {
            addr: Some(ip6("2001:db8:2:ffff::2")),
            gateway: Some(ip6("fe80::2")),
            gateway_mac: Some([2, 0, 0, 0, 2, 1]),
            delegated: Some((ip6("2001:db8:2:200::"), 56)),
            mtu: None,
        };
        let up = Change6 {
            index: 1,
            from: Some(uplink_state::DOWN),
            to: uplink_state::ACTIVE,
        };
        assert_eq!(
            change_text(&up, &ready, lan),
            "IPv6 down -> active (the LAN's 2001:db8:1:1ab::/64 translated to 2001:db8:2:2ab::/64)"
        );
        let own = Facts6 {
            delegated: Some((ip6("2001:db8:1:100::"), 56)),
            ..ready
        };
        assert!(change_text(&up, &own, lan)
            .ends_with("(untranslated: the LAN's prefix 2001:db8:1:1ab::/64 is its own)"));
        let down = Change6 {
            from: Some(uplink_state::ACTIVE),
            to: uplink_state::DOWN,
            ..up
        };
        for (facts, why) in [
            (
                Facts6 {
                    delegated: None,
                    ..ready
                },
                "(no delegated prefix)",
            ),
            (
                Facts6 {
                    gateway: None,
                    gateway_mac: None,
                    ..ready
                },
                "(no IPv6 default route through it)",
            ),
            (
                Facts6 {
                    gateway_mac: None,
                    ..ready
                },
                "(its IPv6 next hop fe80::2 is not resolved)",
            ),
            (ready, "(its state: carrier, health or operator)"),
        ] {
            let said = change_text(&down, &facts, lan);
            assert!(said.starts_with("IPv6 active -> down "), "{said}");
            assert!(said.ends_with(why), "{said}");
        }
    }
}
