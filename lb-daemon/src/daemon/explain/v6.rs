//! `lbctl explain` for IPv6: where an IPv6 connection goes and why,
//! decided by the data plane's own code (`lb_common::kernels_scope6`,
//! `lb_common::hash`, `lb_common::table::steer`, `lb_common::npt`) on the
//! IPv6 state lbd wrote: the LAN's prefix, each uplink's `UPLINKS6`
//! entry, the policies' IPv6 bucket tables and `BYPASS6`, and the flow
//! `FLOWS6` holds; the rules' part is the IPv4 explanation's own
//! (`explain_rules`), on the IPv6 prefix trie.
//!
//! [`decide`] is pure and follows `lb-ebpf/src/lan6.rs` step by step, in
//! its order; everything it reads comes in a [`Plane6`], so that it is
//! tested on the host. It never re-implements a choice the data plane
//! makes: where the two could differ, the code is shared in lb-common.
//! Reads only.

use std::{collections::BTreeSet, net::Ipv6Addr};

use anyhow::Result;
use lb_common::{
    hash,
    maps::{uplink_state, FlowKey6, FlowValue6, Uplink6},
    npt::Untranslatable,
    table::{self, Table},
    KERNEL_OWNED, NO_UPLINK,
};

use crate::{
    control::api::Explanation,
    observe::{conntrack, kernel6::mask6},
    reconcile::ipv6::Prefix6,
};

use super::*;

/// The IPv6 side of the data plane as lbd wrote it: what [`decide`]
/// reads.
#[derive(Debug, Clone)]
pub struct Plane6<'a> {
    /// The LAN's prefix while IPv6 is balanced (the data plane's switch).
    pub lan: Option<Prefix6>,
    pub seed: u32,
    /// The classifier mode's number, and its name for people.
    pub mode: u32,
    pub mode_name: String,
    /// Each policy's IPv6 bucket table, by policy index.
    pub tables: Vec<&'a Table>,
    /// Each uplink's `UPLINKS6` entry, by uplink index.
    pub sides: Vec<Option<Uplink6>>,
    /// Whether each uplink's `UPLINKS` entry has an interface (the data
    /// plane sends only through one that does).
    pub attached: Vec<bool>,
    /// The IPv6 destinations the kernel keeps (`BYPASS6`).
    pub bypass: &'a BTreeSet<Prefix6>,
    /// Each uplink's name, by index.
    pub names: Vec<String>,
}

impl Plane6<'_> {
    fn name(&self, i: u32) -> String {
        self.names
            .get(i as usize)
            .cloned()
            .unwrap_or_else(|| format!("#{i}"))
    }

    fn side(&self, i: u32) -> Option<Uplink6> {
        self.sides.get(i as usize).copied().flatten()
    }

    /// `lan6::takes_new`: IPv6 active, its next hop's MAC known, and an
    /// interface to send through.
    fn takes_new(&self, i: u32) -> bool {
        self.side(i)
            .is_some_and(|s| s.state == uplink_state::ACTIVE && s.gw_mac != [0; 6])
            && self.attached.get(i as usize).copied().unwrap_or(false)
    }

    /// `lan6::keeps`: IPv6 flows pinned to `i` stay there.
    fn keeps(&self, i: u32) -> bool {
        self.side(i)
            .is_some_and(|s| uplink_state::keeps_flows(s.state))
    }

    /// `policy::within`'s steering: an uplink of `table` for a new (or
    /// moving) flow, never `except`, with the flow's own bucket.
    fn steer(&self, table: &Table, key: &FlowKey6, except: u32) -> (Option<u32>, u32) {
        let tuple = key.tuple();
        let hash = hash::classify(self.seed, self.mode, &tuple);
        let owner = |b: u32| table.get(b as usize).copied();
        let chosen = table::steer(hash, owner, |u| u != except && self.takes_new(u));
        (chosen, hash::bucket(hash))
    }
}

/// What the rules say of a flow: `Ok((policy index, its name, [[rule]]
/// number))`, or `Err(verdict)` when a rule keeps it from any uplink (the
/// reasons pushed into the `why` given).
pub type Ruled = std::result::Result<(u32, String, Option<u32>), &'static str>;

/// Where the connection `key` goes, as `lan_ingress` decides it for its
/// next packet: `existing` is its `FLOWS6` entry, `conntrack(remembered)`
/// what the kernel's connection tracking says of it (asked only where the
/// data plane asks: for a remembered kernel connection, and for a new TCP
/// or UDP flow), `rules(why)` what the rules decide for it (asked for a
/// flow that is new or moves).
pub fn decide(
    plane: &Plane6,
    key: &FlowKey6,
    existing: Option<FlowValue6>,
    conntrack: impl FnOnce(bool) -> Explanation,
    rules: impl FnOnce(&mut Vec<String>) -> Ruled,
) -> Explanation {
    let (src, dst) = (Ipv6Addr::from(key.src_addr), Ipv6Addr::from(key.dst_addr));
    let Some(lan) = plane.lan else {
        return answer(
            "kernel",
            None,
            vec![
                "IPv6 is not balanced: lbd knows no prefix on the LAN (none of a delegation on \
                 its LAN interfaces, and no [[lan]] prefix6), so every IPv6 packet is the \
                 kernel's, sent by its default route"
                    .into(),
            ],
        );
    };
    for addr in [src, dst] {
        if lb_common::kernels_scope6(&addr.octets()) {
            return answer(
                "kernel",
                None,
                vec![format!(
                    "{addr} is link-local, multicast or unspecified: the router's own business \
                     (neighbour discovery, router advertisements), left to the kernel"
                )],
            );
        }
    }
    if existing.is_none() {
        if let Some((prefix, len)) = plane
            .bypass
            .iter()
            .filter(|p| mask6(dst, p.1) == p.0)
            .max_by_key(|p| p.1)
        {
            return answer(
                "kernel",
                None,
                vec![format!(
                    "{dst} is in {prefix}/{len}, which the kernel keeps (the router's own, \
                     routed other than by a default route, or taken by an IPsec policy): left \
                     to the kernel untouched"
                )],
            );
        }
    }
    let mut why = Vec::new();
    let mut bucket = None;
    let mut ruled = None;
    let uplink = match existing {
        Some(flow) if flow.uplink == KERNEL_OWNED => return conntrack(true),
        Some(flow) if plane.keeps(flow.uplink) => {
            why.push(format!(
                "a flow pinned to {} (kept for its whole life)",
                plane.name(flow.uplink)
            ));
            flow.uplink
        }
        _ => {
            if let Some(flow) = existing {
                why.push(format!(
                    "its flow's uplink {} keeps no IPv6 flows now: it moves",
                    plane.name(flow.uplink)
                ));
            } else if matches!(key.proto, 6 | 17) {
                let said = conntrack(false);
                if said.verdict == "kernel" {
                    return said;
                }
                why.extend(said.why);
            }
            let (policy, policy_name, rule) = match rules(&mut why) {
                Ok(placed) => placed,
                Err(verdict) => return answer(verdict, None, why),
            };
            let Some(&table) = plane.tables.get(policy as usize) else {
                why.push(format!(
                    "policy #{policy} has no IPv6 table: dropped and counted"
                ));
                return answer("dropped", None, why);
            };
            ruled = Some((policy_name.clone(), rule));
            let except = existing.map_or(NO_UPLINK, |f| f.uplink);
            let (chosen, own) = plane.steer(table, key, except);
            bucket = Some(own);
            let owner = table.get(own as usize).copied().unwrap_or(NO_UPLINK);
            why.push(format!(
                "a new IPv6 flow of policy {policy_name}: its {} hash (each address folded to 32 \
                 bits) falls into bucket {own} of {} of the policy's IPv6 table, which belongs \
                 to {}",
                plane.mode_name,
                lb_common::BUCKETS,
                if owner == NO_UPLINK {
                    "no uplink".to_string()
                } else {
                    plane.name(owner)
                }
            ));
            match chosen {
                Some(u) if u == owner => why.push(format!(
                    "{} takes new IPv6 flows: it goes there",
                    plane.name(u)
                )),
                Some(u) => why.push(format!(
                    "that uplink takes no new IPv6 flows now: the next of its buckets that does \
                     belongs to {}",
                    plane.name(u)
                )),
                None => {
                    why.push(
                        "no uplink takes new IPv6 flows: it would be dropped and counted".into(),
                    );
                    return Explanation {
                        bucket,
                        policy: Some(policy_name),
                        rule,
                        ..answer("dropped", None, why)
                    };
                }
            }
            chosen.unwrap_or(NO_UPLINK)
        }
    };
    let verdict = if existing.is_some_and(|f| f.uplink == uplink) {
        "existing"
    } else {
        "new"
    };
    let name = plane.name(uplink);
    let Some(six) = plane.side(uplink) else {
        why.push(format!("{name} has no IPv6 entry: dropped and counted"));
        return Explanation {
            bucket,
            ..answer("dropped", Some(name), why)
        };
    };
    // The guard, as the data plane runs it on every packet.
    if !six.out.takes(&key.src_addr) {
        why.push(format!(
            "{src} is not in the LAN's prefix {}/{}: it would leave with an address no ISP \
             routes back, so it is dropped and counted",
            lan.0, lan.1
        ));
        return Explanation {
            bucket,
            ..answer("dropped", Some(name), why)
        };
    }
    let mut public = key.src_addr;
    let source = if six.out.is_identity() {
        why.push(format!(
            "it leaves untranslated, as {src}: the LAN's prefix {}/{} is {name}'s own",
            lan.0, lan.1
        ));
        src
    } else {
        match six.out.apply(&mut public) {
            Ok(()) => {
                let public = Ipv6Addr::from(public);
                why.push(format!(
                    "NPTv6 (RFC 6296) translates its source to {public}, in {name}'s prefix \
                     {}/{}; its replies are translated back",
                    mask6(public, lan.1),
                    lan.1
                ));
                public
            }
            Err(Untranslatable::NoAdjustableWord) => {
                why.push(format!(
                    "{src}'s interface identifier has no word NPTv6 may adjust (RFC 6296 \
                     leaves 0xffff alone): dropped and counted"
                ));
                return Explanation {
                    bucket,
                    ..answer("dropped", Some(name), why)
                };
            }
            Err(Untranslatable::OutsidePrefix) => {
                why.push(format!(
                    "{src} is outside the prefix {name} translates: dropped and counted"
                ));
                return Explanation {
                    bucket,
                    ..answer("dropped", Some(name), why)
                };
            }
        }
    };
    let (policy, rule) = ruled.map_or((None, None), |(p, r)| (Some(p), r));
    Explanation {
        bucket,
        policy,
        rule,
        source: Some(source.to_string()),
        ..answer(verdict, Some(name), why)
    }
}

impl Daemon {
    /// [`decide`] on the data plane's IPv6 state and flow table, with
    /// conntrack and the rules asked as the data plane asks them.
    pub fn explain6(&self, key: &FlowKey6, on: &On) -> Result<Explanation> {
        let existing = lock(&self.flow_tables, FLOW_TABLES)?.get6(key)?;
        let plane = Plane6 {
            lan: self.ipv6.lan(),
            seed: self.dataplane.seed(),
            mode: self.config.balance.mode.number(),
            mode_name: self.config.balance.mode.to_string(),
            tables: (0..lb_common::policy::MAX_POLICIES)
                .map(|p| self.buckets6.table(p))
                .collect(),
            sides: (0..self.uplinks.len()).map(|i| self.ipv6.side(i)).collect(),
            attached: self
                .uplinks
                .iter()
                .map(|u| u.written.is_some_and(|w| w.ifindex != 0))
                .collect(),
            bypass: self.ipv6.bypass(),
            names: self.uplinks.iter().map(|u| u.cfg.name.clone()).collect(),
        };
        let tuple = conntrack::Tuple {
            src: Ipv6Addr::from(key.src_addr).into(),
            dst: Ipv6Addr::from(key.dst_addr).into(),
            src_port: u16::from_be_bytes(key.src_port),
            dst_port: u16::from_be_bytes(key.dst_port),
            proto: key.proto,
        };
        let folded = key.tuple();
        Ok(decide(
            &plane,
            key,
            existing,
            |remembered| self.kernel_connection(&tuple, remembered),
            |why| {
                let (policy, rule) =
                    self.explain_rules((tuple.src, tuple.dst), &folded, on, why)?;
                Ok((
                    policy,
                    crate::reconcile::policies::policy_name(&self.config, policy),
                    rule,
                ))
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::kernel6::within;
    use crate::reconcile::ipv6::{side, Facts6};
    use lb_common::{hash::Tuple, maps::tcp_state};

    fn ip6(s: &str) -> Ipv6Addr {
        s.parse().expect("an IPv6 address")
    }

    const LAN: Prefix6 = (Ipv6Addr::new(0x2001, 0xdb8, 1, 0x1ab, 0, 0, 0, 0), 64);

    /// isp1 delegated the LAN's prefix (untranslated), isp2 another /56
    /// (translated), both ready, with the states given.
    fn sides(states: [u32; 2]) -> Vec<Option<Uplink6>> {
        let facts = |n: u16| Facts6 {
            addr: Some(Ipv6Addr::new(0x2001, 0xdb8, n, 0xffff, 0, 0, 0, 2)),
            gateway: Some(ip6("fe80::1")),
            gateway_mac: Some([2, 0, 0, 0, n as u8, 1]),
            delegated: Some((Ipv6Addr::new(0x2001, 0xdb8, n, 0x100, 0, 0, 0, 0), 56)),
            mtu: None,
        };
        vec![
            side(Some(LAN), &facts(1), states[0], true),
            side(Some(LAN), &facts(2), states[1], true),
        ]
    }

    /// A table whose buckets go to the uplinks by `weights`.
    fn table_of(weights: [u32; 2]) -> Table {
        let mut t = table::empty();
        let mut all = [0u32; lb_common::MAX_UPLINKS as usize];
        all[..2].copy_from_slice(&weights);
        table::rebalance(&mut t, &all);
        t
    }

    fn plane<'a>(table: &'a Table, bypass: &'a BTreeSet<Prefix6>, states: [u32; 2]) -> Plane6<'a> {
        Plane6 {
            lan: Some(LAN),
            seed: 0x5eed,
            mode: hash::mode::FIVE_TUPLE,
            mode_name: "5-tuple".into(),
            tables: vec![table],
            sides: sides(states),
            attached: vec![true, true],
            bypass,
            names: vec!["isp1".into(), "isp2".into()],
        }
    }

    fn key(src: &str, sport: u16, dst: &str) -> FlowKey6 {
        FlowKey6 {
            src_addr: ip6(src).octets(),
            dst_addr: ip6(dst).octets(),
            src_port: sport.to_be_bytes(),
            dst_port: 443u16.to_be_bytes(),
            proto: 6,
            _pad: [0; 3],
        }
    }

    fn pinned(uplink: u32) -> FlowValue6 {
        FlowValue6 {
            uplink,
            tcp_state: tcp_state::ESTABLISHED,
            ..FlowValue6::default()
        }
    }

    /// No rules: the default policy.
    fn defaults(_: &mut Vec<String>) -> Ruled {
        Ok((0, "default".into(), None))
    }

    /// Conntrack knows nothing of it.
    fn untracked(_: bool) -> Explanation {
        answer("new", None, Vec::new())
    }

    const ACTIVE: [u32; 2] = [uplink_state::ACTIVE; 2];

    #[test]
    fn new_flows_follow_the_table_untranslated_by_the_lans_uplink_translated_by_the_other() {
        let (t, bypass) = (table_of([1, 1]), BTreeSet::new());
        let p = plane(&t, &bypass, ACTIVE);
        let mut seen = [0u32; 2];
        for port in 0..400u16 {
            let k = key("2001:db8:1:1ab::10", 30000 + port, "2001:db8:ff::10");
            let e = decide(&p, &k, None, untracked, defaults);
            assert_eq!(e.verdict, "new", "{e:?}");
            // The data plane's own choice: the shared hash, fold and steer.
            let tuple = Tuple::of6(&k.src_addr, &k.dst_addr, 30000 + port, 443, 6);
            let h = hash::classify(p.seed, p.mode, &tuple);
            let expected = t[hash::bucket(h) as usize];
            assert_eq!(e.bucket, Some(hash::bucket(h)));
            assert_eq!(
                e.uplink.as_deref(),
                Some(p.names[expected as usize].as_str())
            );
            seen[expected as usize] += 1;
            let source: Ipv6Addr = e.source.as_deref().expect("a source").parse().expect("v6");
            if expected == 0 {
                assert_eq!(
                    source,
                    ip6("2001:db8:1:1ab::10"),
                    "isp1 carries the LAN's prefix"
                );
            } else {
                // isp2's subnet 0xab of its /56, and back to the client.
                assert!(
                    within((source, 128), (ip6("2001:db8:2:1ab::"), 64)),
                    "{source}"
                );
                let mut back = source.octets();
                let six = p.sides[1].expect("isp2's side");
                six.back.apply(&mut back).expect("maps back");
                assert_eq!(Ipv6Addr::from(back), ip6("2001:db8:1:1ab::10"));
            }
        }
        assert!(
            seen.iter().all(|&n| n > 150),
            "both uplinks take flows: {seen:?}"
        );
    }

    #[test]
    fn a_flow_moves_off_an_uplink_whose_ipv6_is_down_and_stays_on_a_live_one() {
        let (t, bypass) = (table_of([1, 1]), BTreeSet::new());
        let p = plane(&t, &bypass, [uplink_state::DOWN, uplink_state::ACTIVE]);
        let k = key("2001:db8:1:1ab::10", 40000, "2001:db8:ff::10");
        let moved = decide(&p, &k, Some(pinned(0)), untracked, defaults);
        assert_eq!(
            (moved.verdict.as_str(), moved.uplink.as_deref()),
            ("new", Some("isp2"))
        );
        assert!(moved.why[0].contains("it moves"), "{:?}", moved.why);
        let kept = decide(&p, &k, Some(pinned(1)), untracked, defaults);
        assert_eq!(
            (kept.verdict.as_str(), kept.uplink.as_deref(), kept.bucket),
            ("existing", Some("isp2"), None)
        );
        // No uplink at all: dropped, with the bucket it fell into.
        let none = plane(&t, &bypass, [uplink_state::DOWN; 2]);
        let e = decide(&none, &k, None, untracked, defaults);
        assert_eq!((e.verdict.as_str(), e.uplink), ("dropped", None));
        assert!(e.bucket.is_some());
    }

    #[test]
    fn what_the_kernel_keeps_is_said_before_any_steering() {
        let t = table_of([1, 1]);
        let bypass: BTreeSet<Prefix6> = [(ip6("2001:db8:99::"), 48)].into();
        let p = plane(&t, &bypass, ACTIVE);
        let verdict =
            |p: &Plane6, k: &FlowKey6, existing| decide(p, k, existing, untracked, defaults);
        let to = |dst: &str| key("2001:db8:1:1ab::10", 40000, dst);
        let e = verdict(&p, &to("2001:db8:99::1"), None);
        assert_eq!(e.verdict, "kernel");
        assert!(e.why[0].contains("2001:db8:99::/48"), "{:?}", e.why);
        assert_eq!(verdict(&p, &to("fe80::1"), None).verdict, "kernel");
        assert_eq!(verdict(&p, &to("ff02::1"), None).verdict, "kernel");
        // Not balanced: everything is the kernel's.
        let off = Plane6 {
            lan: None,
            ..p.clone()
        };
        let e = verdict(&off, &to("2001:db8:ff::10"), None);
        assert_eq!(e.verdict, "kernel");
        assert!(e.why[0].contains("not balanced"), "{:?}", e.why);
        // A connection the kernel owns: conntrack speaks.
        let kernels = |remembered: bool| {
            answer(
                "kernel",
                None,
                vec![format!("conntrack (remembered: {remembered})")],
            )
        };
        let k = to("2001:db8:ff::10");
        let e = decide(&p, &k, Some(pinned(KERNEL_OWNED)), kernels, defaults);
        assert_eq!(e.why, ["conntrack (remembered: true)"]);
        let e = decide(&p, &k, None, kernels, defaults);
        assert_eq!(e.why, ["conntrack (remembered: false)"]);
    }

    #[test]
    fn a_source_outside_the_lans_prefix_is_dropped() {
        let (t, bypass) = (table_of([1, 1]), BTreeSet::new());
        let p = plane(&t, &bypass, ACTIVE);
        let e = decide(
            &p,
            &key("2001:db8:7::10", 40000, "2001:db8:ff::10"),
            None,
            untracked,
            defaults,
        );
        assert_eq!(e.verdict, "dropped");
        assert!(e.uplink.is_some(), "the data plane steers it first");
        assert!(e
            .why
            .last()
            .is_some_and(|w| w.contains("not in the LAN's prefix")));
    }
}
