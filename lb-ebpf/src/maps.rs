//! The maps the programs share with the daemon. Layouts and names come from
//! `lb_common::maps`; sizes here are defaults that the daemon may override
//! at load time (the flow table's, from its configuration).

use aya_ebpf::{
    macros::map,
    maps::{
        Array, DevMap, DevMapHash, HashMap, LpmTrie, LruHashMap, PerCpuArray, ProgramArray, RingBuf,
    },
};
use lb_common::{
    egress::Egress,
    maps::{
        nat_entries, BucketTable, FlowKey, FlowKey6, FlowValue, FlowValue6, FragKey, FragValue,
        LanPort, NatKey, NatValue, PolicyStats, RouterMacs, Settings, Signals, Uplink6, UplinkInfo,
        UplinkStats, LAN6_SLOTS, SIGNAL_SLOTS, TOO_BIG_SLOTS,
    },
    policy::{
        Flow, Policy, PrefixKey, PrefixKey6, RuleBits, RuleTable, StickyKey, StickyKey6,
        StickyValue, MAX_POLICIES, PORT_GENERATION,
    },
    reason, BYPASS_ENTRIES, DEFAULT_MAX_FLOWS, DEFAULT_STICKY_ENTRIES, FRAG_ENTRIES, IFINDEX_SLOTS,
    MAX_LAN_PORTS, MAX_UPLINKS, PREFIX_ENTRIES,
};

/// The IPv6 programs reached by tail calls: `lan_ingress6` (from
/// `lan_ingress`) and `lan_unreachable6` (from `lan_ingress6`), in the
/// slots `lb_common::maps` names.
#[map]
pub static LAN6: ProgramArray = ProgramArray::with_max_entries(LAN6_SLOTS, 0);

/// `lan_too_big` and `lan_too_big6`, which `lan_ingress` and
/// `lan_ingress6` tail-call for a packet too big for its uplink (see
/// `handover`, `lan6::too_big`).
#[map]
pub static TOO_BIG: ProgramArray = ProgramArray::with_max_entries(TOO_BIG_SLOTS, 0);

/// Global knobs, one entry.
#[map]
pub static SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);

/// Bucket -> uplink index for new flows ([`lb_common::NO_UPLINK`]: none).
/// Two whole tables per policy, one map value each (entries `2 * policy`
/// and `2 * policy + 1`); the policy's `active_table` says which is live.
#[map]
pub static BUCKETS: Array<BucketTable> = Array::with_max_entries(2 * MAX_POLICIES, 0);

/// The operator's rules, compiled: one whole table per generation;
/// `Settings::active_rules` says which is live.
#[map]
pub static RULES: Array<RuleTable> = Array::with_max_entries(2, 0);

/// Port -> the rules it matches, per generation and side
/// (`lb_common::policy::port_index`).
#[map]
pub static PORT_BITS: Array<RuleBits> = Array::with_max_entries(2 * PORT_GENERATION, 0);

/// Policy index -> its live bucket table, the uplinks that take its new
/// flows, its fallback and stickiness.
#[map]
pub static POLICIES: Array<Policy> = Array::with_max_entries(MAX_POLICIES, 0);

/// Every prefix the rules name, inline or from files, per generation and
/// side (`lb_common::policy::PrefixKey`): the value of a prefix has the
/// bit of each rule that names it or a prefix covering it, so one
/// longest-prefix lookup tells every rule an address matches.
#[map]
pub static PREFIXES: LpmTrie<PrefixKey, RuleBits> = LpmTrie::with_max_entries(PREFIX_ENTRIES, 0);

/// The IPv6 prefixes the rules name, as `PREFIXES` (an address is looked
/// up in its own family's trie).
#[map]
pub static PREFIXES6: LpmTrie<PrefixKey6, RuleBits> = LpmTrie::with_max_entries(PREFIX_ENTRIES, 0);

/// Sticky clients: (policy, client, destination network) -> its uplink.
/// LRU: when full, the least recently used client loses its stickiness.
#[map]
pub static STICKY: LruHashMap<StickyKey, StickyValue> =
    LruHashMap::with_max_entries(DEFAULT_STICKY_ENTRIES, 0);

/// IPv6 sticky clients, as `STICKY`.
#[map]
pub static STICKY6: LruHashMap<StickyKey6, StickyValue> =
    LruHashMap::with_max_entries(DEFAULT_STICKY_ENTRIES, 0);

/// LAN port ifindex -> the rules that name it (per generation) and the
/// router's address there.
#[map]
pub static LAN_CLASSES: HashMap<u32, LanPort> = HashMap::with_max_entries(MAX_LAN_PORTS, 0);

/// Room for the flow being classified (one per CPU): the rules' bit
/// vectors do not fit on the BPF stack beside the rest. Never pinned:
/// nothing in it outlives a packet.
#[map]
pub static CLASSIFYING: PerCpuArray<Flow> = PerCpuArray::with_max_entries(1, 0);

/// The addresses of the IPv6 flow being classified (source, then
/// destination), one slot per CPU: the rules' BPF function takes scalars
/// only, and 32 bytes of addresses are too many of them. Never pinned.
#[map]
pub static CLASSIFYING6: PerCpuArray<[[u8; 16]; 2]> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU counters per policy.
#[map]
pub static POLICY_STATS: PerCpuArray<PolicyStats> = PerCpuArray::with_max_entries(MAX_POLICIES, 0);

/// Uplink index -> how to send through it.
#[map]
pub static UPLINKS: Array<UplinkInfo> = Array::with_max_entries(MAX_UPLINKS, 0);

/// Uplink index -> how it takes IPv6: its state for IPv6, its next hop,
/// and the prefix translation both ways.
#[map]
pub static UPLINKS6: Array<Uplink6> = Array::with_max_entries(MAX_UPLINKS, 0);

/// How each uplink wraps its packets (a VLAN tag, a PPPoE session), by
/// index; all zero for plain Ethernet.
#[map]
pub static ENCAP: Array<lb_common::encap::Encap> = Array::with_max_entries(MAX_UPLINKS, 0);

/// The bucket tables for new IPv6 flows, built from the uplinks' IPv6
/// states: as `BUCKETS`, two per policy, the live one named by the
/// policy's `POLICIES6` entry.
#[map]
pub static BUCKETS6: Array<BucketTable> = Array::with_max_entries(2 * MAX_POLICIES, 0);

/// Policy index -> its IPv6 side: live IPv6 bucket table and the uplinks
/// that take its new IPv6 flows (fallback and stickiness as `POLICIES`).
#[map]
pub static POLICIES6: Array<Policy> = Array::with_max_entries(MAX_POLICIES, 0);

/// IPv6 connections and the uplink each is pinned to. Sized as `FLOWS`.
#[map]
pub static FLOWS6: LruHashMap<FlowKey6, FlowValue6> =
    LruHashMap::with_max_entries(DEFAULT_MAX_FLOWS, 0);

/// IPv6 destinations the fast path leaves to the kernel (the router's
/// addresses, the LAN's and other routed prefixes), by longest prefix.
#[map]
pub static BYPASS6: LpmTrie<[u8; 16], u32> = LpmTrie::with_max_entries(BYPASS_ENTRIES, 0);

/// Interface index of an uplink -> its uplink index, for `wan_ingress`:
/// for indexes from [`lb_common::IFINDEX_SLOTS`] up.
#[map]
pub static UPLINK_BY_IFINDEX: HashMap<u32, u32> = HashMap::with_max_entries(MAX_UPLINKS, 0);

/// The same below [`lb_common::IFINDEX_SLOTS`], by array: uplink index +
/// 1, 0 where no uplink is.
#[map]
pub static UPLINK_AT_IFINDEX: Array<u32> = Array::with_max_entries(IFINDEX_SLOTS, 0);

/// Uplink index -> device, for `bpf_redirect_map`.
#[map]
pub static TX_PORTS: DevMap = DevMap::with_max_entries(MAX_UPLINKS, 0);

/// Connections and the uplink each is pinned to. LRU: when full, the least
/// recently used flow makes room.
#[map]
pub static FLOWS: LruHashMap<FlowKey, FlowValue> =
    LruHashMap::with_max_entries(DEFAULT_MAX_FLOWS, 0);

/// Replies as they arrive on an uplink -> the client they go back to.
/// Entries are made with their flow and removed with it. Not LRU, twice
/// `FLOWS`'s size (`lb_common::maps::nat_entries`): a live mapping is
/// never evicted to make room for another.
#[map]
pub static NAT_REV: HashMap<NatKey, NatValue> =
    HashMap::with_max_entries(nat_entries(DEFAULT_MAX_FLOWS), 0);

/// Datagrams being forwarded in fragments, both ways: the ports their
/// first fragment carried (see `frags`).
#[map]
pub static FRAGMENTS: LruHashMap<FragKey, FragValue> =
    LruHashMap::with_max_entries(FRAG_ENTRIES, 0);

/// LAN interfaces by ifindex, for redirecting replies to clients.
#[map]
pub static LAN_PORTS: DevMapHash = DevMapHash::with_max_entries(MAX_LAN_PORTS, 0);

/// The router's own MACs on each LAN port, by the port's ifindex: a new
/// flow is pinned only from a frame to one of them (`lan::elsewhere`).
#[map]
pub static ROUTER_MACS: HashMap<u32, RouterMacs> = HashMap::with_max_entries(MAX_LAN_PORTS, 0);

/// Destinations the fast path leaves to the kernel (router addresses, LAN
/// subnets), by longest prefix.
#[map]
pub static BYPASS: LpmTrie<[u8; 4], u32> = LpmTrie::with_max_entries(BYPASS_ENTRIES, 0);

/// Per-CPU counters per uplink: what arrives, and the new-flow path's.
#[map]
pub static UPLINK_STATS: PerCpuArray<UplinkStats> = PerCpuArray::with_max_entries(MAX_UPLINKS, 0);

/// Per-CPU, per uplink and family: what the traffic says about its path
/// (replies, sends, flows waiting), for lbd's passive failure detection,
/// and the counters of the packets that say it (sent, replies).
#[map]
pub static SIGNALS: PerCpuArray<Signals> = PerCpuArray::with_max_entries(SIGNAL_SLOTS, 0);

/// Per-CPU count of packets per pass/drop reason.
#[map]
pub static REASONS: PerCpuArray<u64> = PerCpuArray::with_max_entries(reason::CAPACITY, 0);

/// Devices whose qdisc lb's packets pass, by ifindex (see
/// `lb_common::egress`). No entry: the XDP path.
#[map]
pub static EGRESS: HashMap<u32, Egress> = HashMap::with_max_entries(MAX_UPLINKS + MAX_LAN_PORTS, 0);

/// How many entries `EGRESS` has (one entry): while none, not a packet
/// pays for a hash lookup in it, only for this array's.
#[map]
pub static EGRESS_ANY: Array<u32> = Array::with_max_entries(1, 0);

/// `EGRESS` for interface indexes below [`lb_common::IFINDEX_SLOTS`], by
/// array (one load per packet, where the hash lookup cost ten
/// nanoseconds on every packet while any device took its queue); all zero
/// is the XDP path.
#[map]
pub static EGRESS_AT: Array<Egress> = Array::with_max_entries(IFINDEX_SLOTS, 0);

/// Frames `XDP_REDIRECT` could not put into a device's full ring, by
/// ifindex: lbd makes the entries (the devices lb sends to), the ring
/// watch adds to them (see `egress::watch`). Not per-CPU: it is written
/// once per device map flush that dropped, not per packet.
#[map]
pub static RING_DROPS: HashMap<u32, u64> =
    HashMap::with_max_entries(MAX_UPLINKS + MAX_LAN_PORTS, 0);

/// The ring watch's wake-ups for lbd: the ifindex of a device whose ring
/// just overflowed, so that lbd hands it to its queue at once rather than
/// at its next look (a full buffer loses wake-ups, never counts).
#[map]
pub static RING_EVENTS: RingBuf = RingBuf::with_byte_size(4096, 0);
