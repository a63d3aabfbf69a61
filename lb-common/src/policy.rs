//! Rules and policies: which policy a new flow belongs to.
//!
//! The operator's ordered `[[rule]]`s are compiled by lbd into bit
//! vectors, one bit per compiled rule (a packet classifier of the
//! "bit-vector" kind): for each field, which rules a value of it matches.
//! The rule table holds the small fields (protocol, DSCP) and what holds
//! for any value; port arrays, the LAN ports' entries and two prefix tries
//! (source, destination) hold the rest. A new flow costs one lookup per
//! field, whatever the number of rules; the lowest bit set in all of them
//! is the first rule that matches. [`decide`] does the arithmetic, and
//! runs the same in XDP and in `lbctl explain`; lbd's compiler is checked
//! against the rules' plain meaning by property tests.

/// Most rules (compiled: one `[[rule]]` with several port ranges is
/// several): the width of the bit vectors.
pub const MAX_RULES: u32 = 256;

/// 64-bit words of a [`RuleBits`].
pub const RULE_WORDS: usize = MAX_RULES as usize / 64;

/// One bit per compiled rule (rule `i`: bit `i % 64` of word `i / 64`).
pub type RuleBits = [u64; RULE_WORDS];

/// No rule.
pub const NO_RULES: RuleBits = [0; RULE_WORDS];
/// Every rule.
pub const ALL_RULES: RuleBits = [u64::MAX; RULE_WORDS];

/// Port-array entries per side, and the sides: `PORT_BITS[generation *
/// PORT_GENERATION + side * PORTS + port]`.
pub const PORTS: u32 = 65_536;
pub const SRC_SIDE: u32 = 0;
pub const DST_SIDE: u32 = 1;
pub const PORT_GENERATION: u32 = 2 * PORTS;

/// Most policies, the default one included; sizes the bucket tables.
pub const MAX_POLICIES: u32 = 16;

/// The default policy: the global `[[uplink]]` weights and tiers, for
/// flows no rule takes.
pub const DEFAULT_POLICY: u32 = 0;

/// [`Rule::action`] meaning "leave the flow to the kernel's routing".
pub const ACTION_KERNEL: u32 = u32::MAX;

/// The IP protocol numbers rules with port ranges apply to.
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
/// A rule's `"icmp"`: ICMP, and for IPv6 flows ICMPv6, its counterpart.
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_ICMPV6: u8 = 58;

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
    /// The same for IPv6: a /48, the smallest prefix sites announce.
    pub const DST_NET_BITS6: u32 = 48;
}

/// What a compiled rule does once it is the first that matches.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rule {
    /// A policy index, or [`ACTION_KERNEL`].
    pub action: u32,
    /// The `[[rule]]` this was compiled from (its position, from 1), for
    /// `explain`.
    pub origin: u32,
    /// Its policy's [`fallback`].
    pub fallback: u8,
    pub _pad: [u8; 3],
}

/// [`RuleTable::lookups`] bits: the fields some rule constrains, whose
/// maps a new flow must look into (the others match every rule).
pub mod lookup {
    pub const SRC: u32 = 1;
    pub const DST: u32 = 2;
    pub const PORTS: u32 = 4;
    pub const LAN: u32 = 8;
}

/// The compiled rules' table, one map value per generation: lbd writes a
/// whole new generation (this, the port arrays, the tries' entries, the
/// LAN ports') beside the live one, then flips `Settings::active_rules`,
/// so a packet never sees half of an old list and half of a new.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RuleTable {
    /// How many rules there are (bits at and past it are never set).
    pub count: u32,
    /// [`lookup`] bits.
    pub lookups: u32,
    /// Rules with no constraint on the source, the destination, the ports
    /// (they also take what has none: ICMP), the LAN port.
    pub any_src: RuleBits,
    pub any_dst: RuleBits,
    pub any_ports: RuleBits,
    pub any_lan: RuleBits,
    /// Rules that decide even when their policy takes no new flows:
    /// `kernel` rules, and rules whose policy's fallback is not `next`.
    pub decisive: RuleBits,
    /// Each policy's rules.
    pub by_policy: [RuleBits; MAX_POLICIES as usize],
    /// The rules each protocol number, and each DSCP, matches.
    pub by_proto: [RuleBits; 256],
    pub by_dscp: [RuleBits; 64],
    pub rules: [Rule; MAX_RULES as usize],
}

impl RuleTable {
    /// No rules: every new flow goes to the default policy.
    pub const fn empty() -> Self {
        Self {
            count: 0,
            lookups: 0,
            any_src: NO_RULES,
            any_dst: NO_RULES,
            any_ports: NO_RULES,
            any_lan: NO_RULES,
            decisive: NO_RULES,
            by_policy: [NO_RULES; MAX_POLICIES as usize],
            by_proto: [NO_RULES; 256],
            by_dscp: [NO_RULES; 64],
            rules: [Rule {
                action: DEFAULT_POLICY,
                origin: 0,
                fallback: 0,
                _pad: [0; 3],
            }; MAX_RULES as usize],
        }
    }
}

/// Key of the prefix trie (map `PREFIXES`): a tag (generation and side,
/// see [`PrefixKey::new`]) then the address, so that both sides and a new
/// generation's entries share one trie beside the live ones. The LPM
/// prefix length counts the tag's [`PrefixKey::TAG_BITS`] too.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrefixKey {
    /// Big-endian: the first 32 bits the trie compares.
    pub tag: [u8; 4],
    pub addr: [u8; 4],
}

impl PrefixKey {
    /// Bits of the key taken by the tag.
    pub const TAG_BITS: u32 = 32;

    /// The key of `addr` on `side` ([`SRC_SIDE`] or [`DST_SIDE`]) in
    /// rule generation `generation` (0 or 1).
    pub const fn new(generation: u32, side: u32, addr: [u8; 4]) -> Self {
        Self {
            tag: prefix_tag(generation, side),
            addr,
        }
    }

    /// The rule generation the key belongs to (as [`PrefixKey::new`]
    /// wrote it).
    pub const fn generation(&self) -> u32 {
        tag_generation(self.tag)
    }
}

/// Key of the IPv6 prefix trie (map `PREFIXES6`): as [`PrefixKey`], with
/// an IPv6 address. The families' prefixes live in tries of their own, so
/// an IPv4 flow's lookup never finds a rule that names only IPv6 prefixes
/// on that side, and the other way round: such a rule matches only its
/// own family.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrefixKey6 {
    pub tag: [u8; 4],
    pub addr: [u8; 16],
}

impl PrefixKey6 {
    /// The key of `addr` on `side` in rule generation `generation`.
    pub const fn new(generation: u32, side: u32, addr: [u8; 16]) -> Self {
        Self {
            tag: prefix_tag(generation, side),
            addr,
        }
    }

    /// The rule generation the key belongs to.
    pub const fn generation(&self) -> u32 {
        tag_generation(self.tag)
    }
}

/// One family's addresses as the prefix tries hold them (host-order
/// integers: `u32` for IPv4, `u128` for IPv6), for lbd's compiler and
/// writer: the same code builds both tries.
pub trait TrieAddr: Copy + Ord + core::fmt::Debug {
    /// The trie's key.
    type Key: Copy;
    /// Bits in an address.
    const BITS: u8;
    /// `self` with the bits past `len` cleared.
    fn masked(self, len: u8) -> Self;
    /// The key of `self` on `side` in `generation` (its LPM length is
    /// [`PrefixKey::TAG_BITS`] + the prefix's).
    fn key(self, generation: u32, side: u32) -> Self::Key;
    /// The generation a key belongs to.
    fn generation(key: &Self::Key) -> u32;
}

impl TrieAddr for u32 {
    type Key = PrefixKey;
    const BITS: u8 = 32;
    fn masked(self, len: u8) -> Self {
        self & u32::MAX
            .checked_shl(32 - u32::from(len.min(32)))
            .unwrap_or(0)
    }
    fn key(self, generation: u32, side: u32) -> PrefixKey {
        PrefixKey::new(generation, side, self.to_be_bytes())
    }
    fn generation(key: &PrefixKey) -> u32 {
        key.generation()
    }
}

impl TrieAddr for u128 {
    type Key = PrefixKey6;
    const BITS: u8 = 128;
    fn masked(self, len: u8) -> Self {
        self & u128::MAX
            .checked_shl(128 - u32::from(len.min(128)))
            .unwrap_or(0)
    }
    fn key(self, generation: u32, side: u32) -> PrefixKey6 {
        PrefixKey6::new(generation, side, self.to_be_bytes())
    }
    fn generation(key: &PrefixKey6) -> u32 {
        key.generation()
    }
}

/// The tag of a prefix key: generation and side, big-endian, so that the
/// trie compares it first.
const fn prefix_tag(generation: u32, side: u32) -> [u8; 4] {
    ((generation & 1) * 2 + (side & 1)).to_be_bytes()
}

const fn tag_generation(tag: [u8; 4]) -> u32 {
    (u32::from_be_bytes(tag) >> 1) & 1
}

/// The `PORT_BITS` entry of `port` on `side` in `generation`.
pub const fn port_index(generation: u32, side: u32, port: u16) -> u32 {
    (generation & 1) * PORT_GENERATION + (side & 1) * PORTS + port as u32
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

/// Key of the IPv6 sticky table: as [`StickyKey`], with IPv6 addresses
/// (the destination network of `SRC_DST_NET` is a
/// [`sticky::DST_NET_BITS6`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StickyKey6 {
    pub policy: u32,
    pub src_addr: [u8; 16],
    pub dst_net: [u8; 16],
}

impl StickyKey6 {
    /// The sticky key of an IPv6 flow from `src` to `dst` under `policy`
    /// with stickiness `by`; `None` when not sticky.
    #[inline(always)]
    pub fn of(policy: u32, by: u32, src: [u8; 16], dst: [u8; 16]) -> Option<Self> {
        let dst_net = match by {
            sticky::SRC => [0; 16],
            sticky::SRC_DST_NET => {
                let mask = u128::MAX << (128 - sticky::DST_NET_BITS6);
                (u128::from_be_bytes(dst) & mask).to_be_bytes()
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

/// DSCP of a TOS byte (the low two bits are ECN).
pub const fn dscp_of(tos: u8) -> u8 {
    tos >> 2
}

/// Whether a protocol has ports the rules can match.
pub const fn has_ports(proto: u8) -> bool {
    proto == IPPROTO_TCP || proto == IPPROTO_UDP
}

/// What a new flow's lookups found: for each field its map holds, the
/// rules its value matches ([`NO_RULES`] when not looked up or not
/// there). Copies, not references: the verifier then sees one kind of
/// value whichever lookup hit, and merges the paths.
///
/// A field no rule constrains needs no lookup: every rule is in its
/// `any_` vector. The ports are the exception, as a protocol without
/// ports matches only the rules without ranges: when they are not looked
/// up (no rule has a range, or the protocol has none), both are
/// `any_ports` ([`Found::portless`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Found {
    pub src: RuleBits,
    pub dst: RuleBits,
    pub src_port: RuleBits,
    pub dst_port: RuleBits,
    pub lan: RuleBits,
}

impl Found {
    /// Nothing found, and no ports looked up.
    pub fn portless(table: &RuleTable) -> Self {
        Self {
            src_port: table.any_ports,
            dst_port: table.any_ports,
            ..Self::default()
        }
    }

    /// Do the lookups a new flow needs, into `self`: only those of fields
    /// some rule constrains (`table.lookups`), the others as
    /// [`Found::portless`]. `prefix(out, side)` (the flow's address on
    /// that side, in its family's trie) and `port(out, side, port)` write
    /// the rules one lookup finds (or [`NO_RULES`]),
    /// `lan(out)` those of the flow's LAN port. The data plane looks in
    /// its maps, `lbctl explain` in the same maps, the tests in what lbd
    /// compiled. Results are written in place: in XDP they live in a
    /// per-CPU map, as they do not fit the BPF stack.
    #[inline(always)]
    pub fn look_up(
        &mut self,
        table: &RuleTable,
        tuple: &crate::hash::Tuple,
        mut prefix: impl FnMut(&mut RuleBits, u32),
        mut port: impl FnMut(&mut RuleBits, u32, u16),
        lan: impl FnOnce(&mut RuleBits),
    ) {
        let wants = |flag: u32| table.lookups & flag != 0;
        self.src = NO_RULES;
        self.dst = NO_RULES;
        self.lan = NO_RULES;
        self.src_port = table.any_ports;
        self.dst_port = table.any_ports;
        if wants(lookup::SRC) {
            prefix(&mut self.src, SRC_SIDE);
        }
        if wants(lookup::DST) {
            prefix(&mut self.dst, DST_SIDE);
        }
        if wants(lookup::PORTS) && has_ports(tuple.proto) {
            port(&mut self.src_port, SRC_SIDE, tuple.src_port);
            port(&mut self.dst_port, DST_SIDE, tuple.dst_port);
        }
        if wants(lookup::LAN) {
            lan(&mut self.lan);
        }
    }
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

impl Decision {
    const POLICY: u64 = 0;
    const KERNEL: u64 = 1;
    const DROP: u64 = 2;
    const UNREACHABLE: u64 = 3;
    const HAS_RULE: u64 = 1 << 56;

    /// The decision in one 64-bit word, a BPF function's return register:
    /// the kind in bits 0-7, the policy in 8-39, the rule in 40-55 and
    /// whether there is one in bit 56.
    pub const fn to_word(self) -> u64 {
        let (kind, policy, rule) = match self {
            Decision::Policy { policy, rule } => (Self::POLICY, policy, rule),
            Decision::Kernel { rule } => (Self::KERNEL, 0, Some(rule)),
            Decision::Drop { policy, rule } => (Self::DROP, policy, Some(rule)),
            Decision::Unreachable { policy, rule } => (Self::UNREACHABLE, policy, Some(rule)),
        };
        let rule = match rule {
            Some(r) => Self::HAS_RULE | ((r as u64 & 0xffff) << 40),
            None => 0,
        };
        kind | (policy as u64) << 8 | rule
    }

    /// The decision [`Decision::to_word`] wrote.
    pub const fn from_word(word: u64) -> Self {
        let policy = (word >> 8) as u32;
        let rule = ((word >> 40) & 0xffff) as u32;
        match word & 0xff {
            Self::KERNEL => Decision::Kernel { rule },
            Self::DROP => Decision::Drop { policy, rule },
            Self::UNREACHABLE => Decision::Unreachable { policy, rule },
            _ => Decision::Policy {
                policy,
                rule: if word & Self::HAS_RULE != 0 {
                    Some(rule)
                } else {
                    None
                },
            },
        }
    }
}

/// What no rule decided: the default policy.
pub const NO_MATCH: Decision = Decision::Policy {
    policy: DEFAULT_POLICY,
    rule: None,
};

/// What the classifier knows of a new flow: its protocol, DSCP and what
/// its lookups found. (The data plane keeps it in a per-CPU map: 170
/// bytes are a third of a BPF stack.)
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow {
    pub proto: u8,
    pub dscp: u8,
    pub found: Found,
}

/// Word `w` of the rules `flow` matches: the AND of every field's rules.
/// No branch: the verifier walks it once.
#[inline(always)]
fn matching_word(table: &RuleTable, flow: &Flow, w: usize) -> u64 {
    let found = &flow.found;
    (table.any_src[w] | found.src[w])
        & (table.any_dst[w] | found.dst[w])
        & (table.any_lan[w] | found.lan[w])
        & found.src_port[w]
        & found.dst_port[w]
        & table.by_proto[flow.proto as usize][w]
        & table.by_dscp[(flow.dscp & 0x3f) as usize][w]
}

/// Every rule `flow` matches, whatever its policy's state (the tests'
/// view of the vectors; [`decide`] needs only the first usable one).
pub fn matching(table: &RuleTable, flow: &Flow) -> RuleBits {
    let mut out = NO_RULES;
    for (w, word) in out.iter_mut().enumerate() {
        *word = matching_word(table, flow, w);
    }
    out
}

/// Decide where a new flow goes: the first rule that matches whose policy
/// takes new flows, or which decides anyway (a `kernel` rule; a policy
/// whose fallback is not `next`, then applied); none: the default policy.
/// `live` has the bit of each policy one of whose uplinks takes new flows.
/// A word of rules at a time: the first word with a usable match ends it.
#[inline(always)]
pub fn decide(table: &RuleTable, flow: &Flow, live: u32) -> Decision {
    let usable = usable(table, live);
    for (w, usable) in usable.iter().enumerate() {
        let both = matching_word(table, flow, w) & usable;
        if both != 0 {
            return ruled(table, live, w as u32 * 64 + lowest_bit(both));
        }
    }
    NO_MATCH
}

/// The rules that can decide now: those whose policy is `live`, and those
/// that decide whatever it is (`decisive`). Policy by policy, all words
/// at once: few values are live at a time (the data plane's classifier
/// and its caller share 512 bytes of stack).
#[inline(always)]
fn usable(table: &RuleTable, live: u32) -> RuleBits {
    let mut usable = table.decisive;
    for (p, rules) in table.by_policy.iter().enumerate() {
        let on = 0u64.wrapping_sub(u64::from((live >> p) & 1));
        for (word, rule_word) in usable.iter_mut().zip(rules) {
            *word |= rule_word & on;
        }
    }
    usable
}

/// What rule `i`, the first usable match, decides.
#[inline(always)]
fn ruled(table: &RuleTable, live: u32, i: u32) -> Decision {
    if i >= table.count {
        return NO_MATCH;
    }
    let Some(rule) = table.rules.get(i as usize) else {
        return NO_MATCH;
    };
    let policy = rule.action;
    if policy == ACTION_KERNEL {
        return Decision::Kernel { rule: i };
    }
    if policy < 32 && live & (1 << policy) != 0 {
        return Decision::Policy {
            policy,
            rule: Some(i),
        };
    }
    match u32::from(rule.fallback) {
        fallback::DROP => Decision::Drop { policy, rule: i },
        fallback::UNREACHABLE => Decision::Unreachable { policy, rule: i },
        _ => NO_MATCH,
    }
}

/// The position of the lowest bit set in `x` (64 when none), in plain
/// arithmetic: `trailing_zeros` compiles for BPF to a lookup in a table,
/// whose computed index makes the verifier track every value leading to
/// it exactly, and then it cannot merge the paths of a new flow.
#[inline(always)]
pub const fn lowest_bit(x: u64) -> u32 {
    // The bits below the lowest one, counted (SWAR popcount).
    let below = x.wrapping_sub(1) & !x;
    let a = below - ((below >> 1) & 0x5555_5555_5555_5555);
    let b = (a & 0x3333_3333_3333_3333) + ((a >> 2) & 0x3333_3333_3333_3333);
    let c = (b + (b >> 4)) & 0x0f0f_0f0f_0f0f_0f0f;
    (c.wrapping_mul(0x0101_0101_0101_0101) >> 56) as u32
}

/// Whether rule `i`'s bit is set in `bits`.
pub fn has_bit(bits: &RuleBits, i: usize) -> bool {
    bits.get(i / 64).is_some_and(|w| w & (1 << (i % 64)) != 0)
}

/// Set rule `i`'s bit in `bits`.
pub fn set_bit(bits: &mut RuleBits, i: usize) {
    if let Some(w) = bits.get_mut(i / 64) {
        *w |= 1 << (i % 64);
    }
}

const _: () = {
    assert!(core::mem::size_of::<Rule>() == 12);
    assert!(
        core::mem::size_of::<RuleTable>()
            == 8 + 32 * (5 + MAX_POLICIES as usize + 256 + 64) + 12 * MAX_RULES as usize
    );
    assert!(core::mem::size_of::<PrefixKey>() == 8);
    assert!(PORT_GENERATION == 2 * PORTS);
    assert!(MAX_RULES as usize == RULE_WORDS * 64);
    assert!(core::mem::size_of::<Policy>() == 24);
    assert!(core::mem::size_of::<StickyKey>() == 12);
    assert!(core::mem::size_of::<StickyKey6>() == 36);
    assert!(core::mem::size_of::<PrefixKey6>() == 20);
    assert!(core::mem::size_of::<StickyValue>() == 16);
    assert!(MAX_POLICIES <= 32);
    assert!(crate::MAX_UPLINKS <= 32, "Policy::takers is a 32-bit set");
};

#[cfg(test)]
mod tests {
    use super::*;

    fn bits(rules: &[usize]) -> RuleBits {
        let mut b = NO_RULES;
        for &i in rules {
            set_bit(&mut b, i);
        }
        b
    }

    /// A table of `n` rules to policies `actions` (fallbacks `fallbacks`),
    /// matching any protocol and DSCP.
    fn table(actions: &[u32], fallbacks: &[u32]) -> RuleTable {
        let mut t = RuleTable::empty();
        t.count = actions.len() as u32;
        for (i, (&a, &f)) in actions.iter().zip(fallbacks).enumerate() {
            t.rules[i] = Rule {
                action: a,
                origin: i as u32 + 1,
                fallback: f as u8,
                _pad: [0; 3],
            };
            if a == ACTION_KERNEL || f != fallback::NEXT {
                set_bit(&mut t.decisive, i);
            }
            if a != ACTION_KERNEL {
                set_bit(&mut t.by_policy[a as usize], i);
            }
        }
        let all = bits(&(0..actions.len()).collect::<std::vec::Vec<_>>());
        t.by_proto = [all; 256];
        t.by_dscp = [all; 64];
        (t.any_src, t.any_dst, t.any_lan, t.any_ports) = (all, all, all, all);
        t
    }

    extern crate std;

    #[test]
    fn no_rules_is_the_default_policy() {
        let t = RuleTable::empty();
        let flow = Flow {
            proto: IPPROTO_TCP,
            dscp: 0,
            found: Found::portless(&t),
        };
        assert_eq!(decide(&t, &flow, u32::MAX), NO_MATCH);
    }

    #[test]
    fn fields_are_anded_and_the_lowest_rule_wins() {
        let mut t = table(&[1, 2, 3], &[fallback::NEXT; 3]);
        t.lookups = lookup::DST | lookup::PORTS;
        // Rule 0 wants a destination in the trie, rule 1 port 5060, rule 2
        // nothing.
        t.any_dst = bits(&[1, 2]);
        t.any_ports = bits(&[0, 2]);
        let found = Found {
            src_port: ALL_RULES,
            dst_port: bits(&[0, 2]),
            ..Found::default()
        };
        let udp = |found| Flow {
            proto: IPPROTO_UDP,
            dscp: 0,
            found,
        };
        let m = matching(&t, &udp(found));
        assert_eq!(m, bits(&[2]), "rule 0 misses the trie, rule 1 the port");
        assert_eq!(
            decide(&t, &udp(found), u32::MAX),
            Decision::Policy {
                policy: 3,
                rule: Some(2)
            }
        );
        let found = Found {
            dst: bits(&[0]),
            dst_port: bits(&[0, 1, 2]),
            ..found
        };
        assert_eq!(
            decide(&t, &udp(found), u32::MAX),
            Decision::Policy {
                policy: 1,
                rule: Some(0)
            }
        );
        // ICMP has no ports: only the rules without any take it.
        let icmp = Flow {
            proto: 1,
            found: Found {
                dst: bits(&[0]),
                ..Found::portless(&t)
            },
            ..udp(found)
        };
        assert_eq!(matching(&t, &icmp), bits(&[0, 2]));
    }

    /// A flow that matches rules `m` of `t` (by its destination).
    fn matching_only(t: &mut RuleTable, m: &RuleBits) -> Flow {
        t.lookups |= lookup::DST;
        t.any_dst = NO_RULES;
        Flow {
            proto: IPPROTO_TCP,
            dscp: 0,
            found: Found {
                dst: *m,
                ..Found::portless(t)
            },
        }
    }

    #[test]
    fn fallbacks() {
        let m = ALL_RULES;
        let dead_1 = !0b10;
        for (fb, want) in [
            (
                fallback::NEXT,
                Decision::Policy {
                    policy: 2,
                    rule: Some(1),
                },
            ),
            (fallback::DEFAULT, NO_MATCH),
            (fallback::DROP, Decision::Drop { policy: 1, rule: 0 }),
            (
                fallback::UNREACHABLE,
                Decision::Unreachable { policy: 1, rule: 0 },
            ),
        ] {
            let mut t = table(&[1, 2], &[fb, fallback::NEXT]);
            let flow = matching_only(&mut t, &m);
            assert_eq!(
                decide(&t, &flow, dead_1),
                want,
                "fallback {}",
                fallback::name(fb)
            );
        }
        let mut t = table(&[ACTION_KERNEL, 1], &[fallback::NEXT; 2]);
        let flow = matching_only(&mut t, &m);
        assert_eq!(decide(&t, &flow, 0), Decision::Kernel { rule: 0 });
    }

    #[test]
    fn bits_past_the_count_never_decide() {
        let mut t = table(&[1], &[fallback::NEXT]);
        set_bit(&mut t.by_policy[3], 200);
        let m = bits(&[200]);
        let flow = matching_only(&mut t, &m);
        assert_eq!(decide(&t, &flow, u32::MAX), NO_MATCH);
        // The lowest usable bit, past the first word.
        let mut t = table(&[1; 200], &[fallback::NEXT; 200]);
        let m = bits(&[70, 130]);
        let flow = matching_only(&mut t, &m);
        assert_eq!(
            decide(&t, &flow, 0b10),
            Decision::Policy {
                policy: 1,
                rule: Some(70)
            }
        );
        assert!(has_bit(&m, 130) && !has_bit(&m, 131) && !has_bit(&m, 999));
    }

    #[test]
    fn the_lowest_bit_is_found_in_plain_arithmetic() {
        assert_eq!(lowest_bit(0), 64);
        for i in 0..64 {
            assert_eq!(lowest_bit(1 << i), i);
            assert_eq!(lowest_bit(u64::MAX << i), i);
            assert_eq!(lowest_bit((1 << i) | (1 << 63)), i);
        }
    }

    #[test]
    fn a_decision_fits_one_word_and_back() {
        for d in [
            NO_MATCH,
            Decision::Policy {
                policy: 15,
                rule: Some(255),
            },
            Decision::Kernel { rule: 0 },
            Decision::Drop { policy: 3, rule: 7 },
            Decision::Unreachable {
                policy: 1,
                rule: 200,
            },
        ] {
            assert_eq!(Decision::from_word(d.to_word()), d);
        }
    }

    #[test]
    fn a_prefix_key_knows_its_generation() {
        for generation in 0..2 {
            for side in [SRC_SIDE, DST_SIDE] {
                let key = PrefixKey::new(generation, side, [10, 0, 0, 0]);
                assert_eq!(key.generation(), generation);
            }
        }
        let sides = [SRC_SIDE, DST_SIDE].map(|s| PrefixKey::new(1, s, [0; 4]).tag);
        assert_ne!(sides[0], sides[1], "the sides have tags of their own");
    }

    #[test]
    fn sticky_keys() {
        let k = StickyKey::of(1, sticky::SRC_DST_NET, [10, 0, 0, 5], [203, 0, 113, 77]);
        assert_eq!(k.map(|k| k.dst_net), Some([203, 0, 113, 0]));
        let k = StickyKey::of(1, sticky::SRC, [10, 0, 0, 5], [203, 0, 113, 77]);
        assert_eq!(k.map(|k| k.dst_net), Some([0; 4]));
        assert_eq!(StickyKey::of(1, sticky::NONE, [0; 4], [0; 4]), None);
        let dst: [u8; 16] = "2001:db8:1:2:3::9"
            .parse::<core::net::Ipv6Addr>()
            .expect("an address")
            .octets();
        let src = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5];
        let k = StickyKey6::of(2, sticky::SRC_DST_NET, src, dst).expect("sticky");
        assert_eq!(
            k.dst_net,
            "2001:db8:1::"
                .parse::<core::net::Ipv6Addr>()
                .expect("an address")
                .octets()
        );
        assert_eq!(
            StickyKey6::of(2, sticky::SRC, src, dst)
                .expect("sticky")
                .dst_net,
            [0; 16]
        );
        assert_eq!(StickyKey6::of(2, sticky::NONE, src, dst), None);
        assert!(sticky_holds(100, 150, 60));
        assert!(!sticky_holds(100, 160, 60));
        assert!(
            sticky_holds(200, 150, 60),
            "a clock read on another CPU may lag"
        );
    }
}
