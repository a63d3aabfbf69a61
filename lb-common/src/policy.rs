//! Rules and policies: which policy a new flow belongs to.
//!
//! The operator's ordered `[[rule]]`s are compiled by lbd into a
//! [`RuleTable`]; the data plane runs [`decide`] on each new flow (and on a
//! flow whose uplink died), and `lbctl explain` runs the very same function
//! on the same table. A rule matches on the LAN port a packet came in on,
//! source and destination prefixes (one inline, or a prefix set: an LPM
//! trie the caller looks into), protocol, port ranges and DSCP; the first
//! that matches wins, and no match means the default policy.
//!
//! The walk is bounded by [`MAX_RULES`] and touches no map: the caller
//! looks the packet's addresses up in the prefix trie once each (the
//! value holds every set that covers the address) and reads which
//! policies are live, so the kernel and user space differ only in where
//! they read those from, and the walk costs the verifier little.

/// Most rules the data plane walks (compiled rules: one `[[rule]]` with
/// several port ranges or LAN names is several).
pub const MAX_RULES: u32 = 256;

/// Most policies, the default one included; sizes the bucket tables.
pub const MAX_POLICIES: u32 = 16;

/// The default policy: the global `[[uplink]]` weights and tiers, for
/// flows no rule takes.
pub const DEFAULT_POLICY: u32 = 0;

/// [`Rule::action`] meaning "leave the flow to the kernel's routing".
pub const ACTION_KERNEL: u32 = u32::MAX;

/// [`Rule::src_set`] and [`Rule::dst_set`] value meaning "no prefix set".
pub const NO_SET: u32 = 0;

/// Most prefix sets at once (bits of a trie value). lbd keeps half free,
/// so that any set can be reloaded beside the one it replaces.
pub const MAX_SETS: u32 = 32;

/// [`Rule::dscp`] value meaning "any DSCP" (DSCP is six bits).
pub const ANY_DSCP: u8 = 0xff;

/// [`Rule::proto`] value meaning "any protocol".
pub const ANY_PROTO: u8 = 0;

/// The IP protocol numbers rules with port ranges apply to.
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// What a policy does with a new flow when none of its uplinks can take
/// it ([`Policy::fallback`]).
pub mod fallback {
    /// Try the rules after the one that matched.
    pub const NEXT: u32 = 0;
    /// Use the default policy.
    pub const DEFAULT: u32 = 1;
    /// Drop it, counted.
    pub const DROP: u32 = 2;
    /// Answer the client with an ICMP "unreachable", so it gives up at once.
    pub const UNREACHABLE: u32 = 3;

    /// As the configuration and `lbctl` say it.
    pub const fn name(fallback: u32) -> &'static str {
        match fallback {
            NEXT => "next",
            DEFAULT => "default",
            DROP => "drop",
            _ => "unreachable",
        }
    }
}

/// How a policy keeps a client on one uplink ([`Policy::sticky`]).
pub mod sticky {
    /// Not sticky: every new flow is hashed.
    pub const NONE: u32 = 0;
    /// By source address.
    pub const SRC: u32 = 1;
    /// By source address and destination network ([`DST_NET_BITS`]).
    pub const SRC_DST_NET: u32 = 2;
    /// The destination network of `SRC_DST_NET`: a /24, as most sites
    /// that tie a session to an address serve it from one.
    pub const DST_NET_BITS: u32 = 24;
}

/// One compiled rule. Every field has an "any" value, so a rule matches
/// with one comparison per field and no field list to walk. Addresses and
/// ports are in host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rule {
    /// The source matches when `src & src_mask == src_addr` (mask 0: any).
    pub src_addr: u32,
    pub src_mask: u32,
    pub dst_addr: u32,
    pub dst_mask: u32,
    /// The prefix set (its bit) the source and destination must be in
    /// ([`NO_SET`]: no set).
    pub src_set: u32,
    pub dst_set: u32,
    /// Inclusive port ranges (0..=65535: any). A rule with a narrower
    /// range only matches TCP and UDP.
    pub src_port_min: u16,
    pub src_port_max: u16,
    pub dst_port_min: u16,
    pub dst_port_max: u16,
    /// LAN classes (bits) the packet's LAN port must have one of; zero:
    /// any port. lbd gives every LAN name a rule uses a bit, and each LAN
    /// port (a bridge's ports too) the bits of the names it answers to.
    pub lan_classes: u32,
    /// A policy index, or [`ACTION_KERNEL`].
    pub action: u32,
    /// The `[[rule]]` this was compiled from (its position, from 1), for
    /// `explain` and the counters.
    pub origin: u32,
    /// IP protocol number, or [`ANY_PROTO`].
    pub proto: u8,
    /// DSCP (0..=63), or [`ANY_DSCP`].
    pub dscp: u8,
    /// Its policy's [`fallback`] (copied here, so that the walk reads no
    /// map for it).
    pub fallback: u8,
    pub _pad: u8,
}

/// An empty rule, which matches everything.
pub const ANY: Rule = Rule {
    src_addr: 0,
    src_mask: 0,
    dst_addr: 0,
    dst_mask: 0,
    src_set: NO_SET,
    dst_set: NO_SET,
    src_port_min: 0,
    src_port_max: u16::MAX,
    dst_port_min: 0,
    dst_port_max: u16::MAX,
    lan_classes: 0,
    action: DEFAULT_POLICY,
    origin: 0,
    proto: ANY_PROTO,
    dscp: ANY_DSCP,
    fallback: fallback::DEFAULT as u8,
    _pad: 0,
};

/// The compiled rules, one map value: lbd replaces them all with one
/// write, so a packet never sees half of an old list and half of a new.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RuleTable {
    /// How many of `rules` are in use.
    pub count: u32,
    /// Which sides' prefix sets the rules use ([`SET_SRC`], [`SET_DST`]):
    /// the trie is asked only for those.
    pub set_sides: u32,
    pub rules: [Rule; MAX_RULES as usize],
}

impl RuleTable {
    pub const fn empty() -> Self {
        Self {
            count: 0,
            set_sides: 0,
            rules: [ANY; MAX_RULES as usize],
        }
    }
}

/// What the data plane needs to know of a policy (map `POLICIES`, by
/// policy index).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    /// Which of the policy's two bucket tables is live (0 or 1): its
    /// tables are entries `2 * policy` and `2 * policy + 1` of `BUCKETS`.
    pub active_table: u32,
    /// The uplinks (bits by uplink index) the live table gives new flows:
    /// a sticky entry holds only while its uplink is one of them. Zero:
    /// none of the policy's uplinks takes new flows, and its fallback
    /// applies. Written with `active_table`, in one write.
    pub takers: u32,
    /// One of [`fallback`].
    pub fallback: u32,
    /// One of [`sticky`].
    pub sticky: u32,
    /// How long a sticky client stays on its uplink after its last new
    /// flow.
    pub sticky_timeout_ns: u64,
}

impl Policy {
    /// Whether the live table sends new flows to `uplink`.
    pub const fn takes(&self, uplink: u32) -> bool {
        uplink < 32 && self.takers & (1 << uplink) != 0
    }

    /// The `BUCKETS` entry of `policy`'s live table.
    pub const fn table_index(&self, policy: u32) -> u32 {
        policy * 2 + (self.active_table & 1)
    }
}

/// Key of the sticky table: a client (and, by `SRC_DST_NET`, the network
/// it talks to) under one policy.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StickyKey {
    pub policy: u32,
    pub src_addr: [u8; 4],
    /// The destination network, or zero when sticky by source only.
    pub dst_net: [u8; 4],
}

/// Value of the sticky table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StickyValue {
    /// `bpf_ktime_get_coarse_ns` of the last new flow that used it.
    pub last_ns: u64,
    pub uplink: u32,
    pub _pad: u32,
}

impl StickyKey {
    /// The sticky key of a flow from `src` to `dst` under `policy` with
    /// stickiness `by` (one of [`sticky`]); `None` when not sticky.
    pub fn of(policy: u32, by: u32, src: [u8; 4], dst: [u8; 4]) -> Option<Self> {
        let dst_net = match by {
            sticky::SRC => [0; 4],
            sticky::SRC_DST_NET => {
                let mask = u32::MAX << (32 - sticky::DST_NET_BITS);
                (u32::from_be_bytes(dst) & mask).to_be_bytes()
            }
            _ => return None,
        };
        Some(Self {
            policy,
            src_addr: src,
            dst_net,
        })
    }
}

/// Whether a sticky entry last used at `last_ns` still holds at `now_ns`.
pub fn sticky_holds(last_ns: u64, now_ns: u64, timeout_ns: u64) -> bool {
    now_ns.saturating_sub(last_ns) < timeout_ns
}

/// [`RuleTable::set_sides`] bits.
pub const SET_SRC: u32 = 1;
pub const SET_DST: u32 = 2;

/// A new flow's packet as the rules see it. Host order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Packet {
    pub src: u32,
    pub dst: u32,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    /// The top six bits of the IPv4 TOS byte.
    pub dscp: u8,
    /// The classes of the LAN port it came in on (see [`Rule::lan_classes`]).
    pub lan_classes: u32,
    /// The prefix sets (bits) its source and destination are in: one
    /// trie lookup each, whose value already holds every set with a
    /// prefix covering the address (see `reconcile::policies`).
    pub src_sets: u32,
    pub dst_sets: u32,
}

impl Packet {
    /// DSCP of a TOS byte (the low two bits are ECN).
    pub const fn dscp_of(tos: u8) -> u8 {
        tos >> 2
    }
}

/// Whether `rule` matches `pkt`. One comparison per field, no lookup;
/// the first that fails ends it (for the verifier too: each comparison
/// adds one way out, not a doubling of the ways through).
#[inline(always)]
pub fn matches(rule: &Rule, pkt: &Packet) -> bool {
    if pkt.src & rule.src_mask != rule.src_addr || pkt.dst & rule.dst_mask != rule.dst_addr {
        return false;
    }
    if rule.proto != ANY_PROTO && rule.proto != pkt.proto {
        return false;
    }
    if rule.dscp != ANY_DSCP && rule.dscp != pkt.dscp {
        return false;
    }
    if rule.lan_classes != 0 && rule.lan_classes & pkt.lan_classes == 0 {
        return false;
    }
    if rule.src_set != NO_SET && rule.src_set & pkt.src_sets == 0 {
        return false;
    }
    if rule.dst_set != NO_SET && rule.dst_set & pkt.dst_sets == 0 {
        return false;
    }
    let any_ports = rule.src_port_min == 0
        && rule.src_port_max == u16::MAX
        && rule.dst_port_min == 0
        && rule.dst_port_max == u16::MAX;
    if any_ports {
        return true;
    }
    (pkt.proto == IPPROTO_TCP || pkt.proto == IPPROTO_UDP)
        && pkt.src_port >= rule.src_port_min
        && pkt.src_port <= rule.src_port_max
        && pkt.dst_port >= rule.dst_port_min
        && pkt.dst_port <= rule.dst_port_max
}

/// Where a new flow goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// To a policy's uplinks; `rule` is the table index of the rule that
    /// sent it there (`None`: no rule matched, or a fallback to the
    /// default).
    Policy { policy: u32, rule: Option<u32> },
    /// Left to the kernel by a `kernel` rule.
    Kernel { rule: u32 },
    /// Dropped by `policy`'s `fallback = drop`.
    Drop { policy: u32, rule: u32 },
    /// Refused with an ICMP error by `policy`'s `fallback = unreachable`.
    Unreachable { policy: u32, rule: u32 },
}

/// Decide where a new flow goes: the first rule that matches, with its
/// policy's fallback applied when none of that policy's uplinks takes new
/// flows (`next` goes on with the following rules). `live` has the bit of
/// each policy one of whose uplinks takes new flows. The walk is bounded
/// by [`MAX_RULES`] and reads nothing but the table. (The data plane walks
/// with the kernel's own bounded counter and [`step`], the same steps.)
pub fn decide(table: &RuleTable, pkt: &Packet, live: u32) -> Decision {
    for i in 0..MAX_RULES {
        if let Some(decision) = step(table, pkt, live, i) {
            return decision;
        }
    }
    NO_MATCH
}

/// What no rule decided: the default policy.
pub const NO_MATCH: Decision = Decision::Policy {
    policy: DEFAULT_POLICY,
    rule: None,
};

/// One step of [`decide`]'s walk, at rule `i`: `Some` ends the walk with
/// that decision (past the last rule: [`NO_MATCH`]), `None` goes on.
#[inline(always)]
pub fn step(table: &RuleTable, pkt: &Packet, live: u32, i: u32) -> Option<Decision> {
    if i >= table.count || i >= MAX_RULES {
        return Some(NO_MATCH);
    }
    let rule = table.rules.get(i as usize)?;
    if !matches(rule, pkt) {
        return None;
    }
    let policy = rule.action;
    if policy == ACTION_KERNEL {
        return Some(Decision::Kernel { rule: i });
    }
    if policy < 32 && live & (1 << policy) != 0 {
        return Some(Decision::Policy {
            policy,
            rule: Some(i),
        });
    }
    match u32::from(rule.fallback) {
        fallback::NEXT => None,
        fallback::DROP => Some(Decision::Drop { policy, rule: i }),
        fallback::UNREACHABLE => Some(Decision::Unreachable { policy, rule: i }),
        _ => Some(NO_MATCH),
    }
}

const _: () = {
    assert!(core::mem::size_of::<Rule>() == 48);
    assert!(core::mem::size_of::<RuleTable>() == 8 + 48 * MAX_RULES as usize);
    assert!(core::mem::size_of::<Policy>() == 24);
    assert!(core::mem::size_of::<StickyKey>() == 12);
    assert!(core::mem::size_of::<StickyValue>() == 16);
    assert!(MAX_POLICIES <= 32);
    assert!(crate::MAX_UPLINKS <= 32, "Policy::takers is a 32-bit set");
};

#[cfg(test)]
mod tests {
    use super::*;

    fn table(rules: &[Rule]) -> RuleTable {
        let mut t = RuleTable::empty();
        t.count = rules.len() as u32;
        t.rules[..rules.len()].copy_from_slice(rules);
        t
    }

    fn pkt(src: [u8; 4], dst: [u8; 4], proto: u8, dst_port: u16) -> Packet {
        Packet {
            src: u32::from_be_bytes(src),
            dst: u32::from_be_bytes(dst),
            src_port: 40000,
            dst_port,
            proto,
            dscp: 0,
            lan_classes: 0,
            src_sets: 0,
            dst_sets: 0,
        }
    }

    /// Every policy live.
    const LIVE: u32 = u32::MAX;

    fn prefix(addr: [u8; 4], len: u32) -> (u32, u32) {
        let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
        (u32::from_be_bytes(addr) & mask, mask)
    }

    #[test]
    fn no_rules_is_the_default_policy() {
        let d = decide(
            &RuleTable::empty(),
            &pkt([10, 0, 0, 1], [1, 1, 1, 1], 6, 443),
            LIVE,
        );
        assert_eq!(
            d,
            Decision::Policy {
                policy: DEFAULT_POLICY,
                rule: None
            }
        );
    }

    #[test]
    fn first_match_wins() {
        let (a, m) = prefix([10, 0, 1, 0], 24);
        let guests = Rule {
            src_addr: a,
            src_mask: m,
            action: 2,
            ..ANY
        };
        let voip = Rule {
            proto: IPPROTO_UDP,
            dst_port_min: 5060,
            dst_port_max: 5060,
            action: 1,
            ..ANY
        };
        let t = table(&[voip, guests]);
        let guest_sip = pkt([10, 0, 1, 7], [1, 1, 1, 1], IPPROTO_UDP, 5060);
        assert_eq!(
            decide(&t, &guest_sip, LIVE),
            Decision::Policy {
                policy: 1,
                rule: Some(0)
            }
        );
        let guest_web = pkt([10, 0, 1, 7], [1, 1, 1, 1], IPPROTO_TCP, 443);
        assert_eq!(
            decide(&t, &guest_web, LIVE),
            Decision::Policy {
                policy: 2,
                rule: Some(1)
            }
        );
        let office = pkt([10, 0, 0, 7], [1, 1, 1, 1], IPPROTO_TCP, 443);
        assert_eq!(
            decide(&t, &office, LIVE),
            Decision::Policy {
                policy: 0,
                rule: None
            }
        );
    }

    #[test]
    fn port_ranges_are_inclusive_and_only_for_tcp_and_udp() {
        let rtp = Rule {
            dst_port_min: 10000,
            dst_port_max: 20000,
            action: 1,
            ..ANY
        };
        for (port, hit) in [(9999, false), (10000, true), (20000, true), (20001, false)] {
            let p = pkt([10, 0, 0, 1], [1, 1, 1, 1], IPPROTO_UDP, port);
            assert_eq!(matches(&rtp, &p), hit, "port {port}");
        }
        let mut icmp = pkt([10, 0, 0, 1], [1, 1, 1, 1], 1, 15000);
        icmp.src_port = 15000;
        assert!(!matches(&rtp, &icmp), "ICMP has no ports");
        assert!(matches(&ANY, &icmp), "a rule without ports takes ICMP");
    }

    #[test]
    fn dscp_and_lan_classes() {
        let ef = Rule {
            dscp: 46,
            action: 1,
            ..ANY
        };
        let mut p = pkt([10, 0, 0, 1], [1, 1, 1, 1], IPPROTO_UDP, 4000);
        assert!(!matches(&ef, &p));
        p.dscp = Packet::dscp_of(0xb8);
        assert!(matches(&ef, &p), "TOS 0xb8 is EF (46)");
        let guest_port = Rule {
            lan_classes: 0b10,
            action: 2,
            ..ANY
        };
        p.lan_classes = 0b01;
        assert!(!matches(&guest_port, &p));
        p.lan_classes = 0b11;
        assert!(matches(&guest_port, &p));
    }

    #[test]
    fn sets_match_by_their_bit() {
        let partner = Rule {
            proto: IPPROTO_TCP,
            dst_set: 0b100,
            action: 1,
            ..ANY
        };
        let t = table(&[partner]);
        let mut p = pkt([10, 0, 0, 1], [192, 0, 2, 9], IPPROTO_TCP, 443);
        p.dst_sets = 0b011;
        assert_eq!(
            decide(&t, &p, LIVE),
            Decision::Policy {
                policy: 0,
                rule: None
            }
        );
        p.dst_sets = 0b110;
        assert_eq!(
            decide(&t, &p, LIVE),
            Decision::Policy {
                policy: 1,
                rule: Some(0)
            }
        );
        p.src_sets = 0b100;
        p.dst_sets = 0;
        assert_eq!(
            decide(&t, &p, LIVE),
            Decision::Policy {
                policy: 0,
                rule: None
            },
            "the source's sets are not the destination's"
        );
    }

    #[test]
    fn fallbacks() {
        let p = pkt([10, 0, 0, 1], [1, 1, 1, 1], IPPROTO_TCP, 80);
        let to = |action| Rule { action, ..ANY };
        // Policy 1 is down; its rule comes first.
        let dead = !0b10;
        let with = |fb: u32| {
            table(&[
                Rule {
                    fallback: fb as u8,
                    ..to(1)
                },
                to(2),
            ])
        };
        assert_eq!(
            decide(&with(fallback::NEXT), &p, dead),
            Decision::Policy {
                policy: 2,
                rule: Some(1)
            }
        );
        assert_eq!(
            decide(&with(fallback::DEFAULT), &p, dead),
            Decision::Policy {
                policy: 0,
                rule: None
            }
        );
        assert_eq!(
            decide(&with(fallback::DROP), &p, dead),
            Decision::Drop { policy: 1, rule: 0 }
        );
        assert_eq!(
            decide(&with(fallback::UNREACHABLE), &p, dead),
            Decision::Unreachable { policy: 1, rule: 0 }
        );
        let kernel = table(&[to(ACTION_KERNEL), to(1)]);
        assert_eq!(decide(&kernel, &p, LIVE), Decision::Kernel { rule: 0 });
    }

    #[test]
    fn the_walk_stops_at_the_count() {
        let mut t = table(&[Rule {
            proto: 99,
            action: 1,
            ..ANY
        }]);
        // A rule past the count, which would match, is never looked at.
        t.rules[1] = Rule { action: 3, ..ANY };
        let p = pkt([10, 0, 0, 1], [1, 1, 1, 1], IPPROTO_TCP, 80);
        assert_eq!(
            decide(&t, &p, LIVE),
            Decision::Policy {
                policy: 0,
                rule: None
            }
        );
        t.count = u32::MAX;
        assert_eq!(
            decide(&t, &p, LIVE),
            Decision::Policy {
                policy: 3,
                rule: Some(1)
            },
            "a count beyond the table is bounded by it"
        );
    }

    #[test]
    fn sticky_keys() {
        let k = StickyKey::of(1, sticky::SRC_DST_NET, [10, 0, 0, 5], [203, 0, 113, 77]);
        assert_eq!(k.map(|k| k.dst_net), Some([203, 0, 113, 0]));
        let k = StickyKey::of(1, sticky::SRC, [10, 0, 0, 5], [203, 0, 113, 77]);
        assert_eq!(k.map(|k| k.dst_net), Some([0; 4]));
        assert_eq!(StickyKey::of(1, sticky::NONE, [0; 4], [0; 4]), None);
        assert!(sticky_holds(100, 150, 60));
        assert!(!sticky_holds(100, 160, 60));
        assert!(
            sticky_holds(200, 150, 60),
            "a clock read on another CPU may lag"
        );
    }
}
