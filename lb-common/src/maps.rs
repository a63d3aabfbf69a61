//! Layouts of the values the XDP programs and the daemon exchange through
//! maps, and the names of those maps.
//!
//! Rules (see STYLE.md): `#[repr(C)]`, fixed-width integers and byte arrays
//! only, explicit padding, sizes asserted below. No `bool`, `enum` or
//! `Option`: states are integers with named constants. Byte order is in the
//! type: addresses and ports that come from packets stay `[u8; N]` in
//! network order.

/// Map names, as the XDP object declares them and user space opens them.
pub mod name {
    pub const SETTINGS: &str = "SETTINGS";
    pub const BUCKETS: &str = "BUCKETS";
    pub const UPLINKS: &str = "UPLINKS";
    pub const UPLINK_BY_IFINDEX: &str = "UPLINK_BY_IFINDEX";
    /// The same for interface indexes below [`crate::IFINDEX_SLOTS`], as an
    /// array: uplink index + 1, 0 for none.
    pub const UPLINK_AT_IFINDEX: &str = "UPLINK_AT_IFINDEX";
    pub const TX_PORTS: &str = "TX_PORTS";
    pub const LAN_PORTS: &str = "LAN_PORTS";
    pub const FLOWS: &str = "FLOWS";
    pub const NAT_REV: &str = "NAT_REV";
    pub const BYPASS: &str = "BYPASS";
    pub const UPLINK_STATS: &str = "UPLINK_STATS";
    pub const REASONS: &str = "REASONS";
    /// Fragmented datagrams in flight (the name changed with its value:
    /// an older lbd's `FRAGS` held no time).
    pub const FRAGMENTS: &str = "FRAGMENTS";
    pub const EGRESS: &str = "EGRESS";
    pub const EGRESS_ANY: &str = "EGRESS_ANY";
    /// `EGRESS` for interface indexes below [`crate::IFINDEX_SLOTS`], as
    /// an array (all zero: the XDP path).
    pub const EGRESS_AT: &str = "EGRESS_AT";
    pub const SIGNALS: &str = "SIGNALS";
    /// How each uplink wraps its packets (`crate::encap`), by index.
    pub const ENCAP: &str = "ENCAP";
    pub const RULES: &str = "RULES";
    pub const POLICIES: &str = "POLICIES";
    pub const PREFIXES: &str = "PREFIXES";
    pub const PORT_BITS: &str = "PORT_BITS";
    pub const STICKY: &str = "STICKY";
    pub const LAN_CLASSES: &str = "LAN_CLASSES";
    pub const POLICY_STATS: &str = "POLICY_STATS";
    pub const UPLINKS6: &str = "UPLINKS6";
    pub const FLOWS6: &str = "FLOWS6";
    pub const BUCKETS6: &str = "BUCKETS6";
    pub const BYPASS6: &str = "BYPASS6";
    /// The IPv6 side of the rules and policies: each policy's IPv6 entry
    /// (its bucket tables are in `BUCKETS6`), the IPv6 prefixes the rules
    /// name, the IPv6 sticky clients.
    pub const POLICIES6: &str = "POLICIES6";
    pub const PREFIXES6: &str = "PREFIXES6";
    pub const STICKY6: &str = "STICKY6";
    /// Frames `XDP_REDIRECT` could not put into a device's full ring, by
    /// the device's ifindex (`crate::egress`): lbd makes an entry for each
    /// device lb sends to, and the ring watch counts into it.
    pub const RING_DROPS: &str = "RING_DROPS";
    /// The ring watch's wake-ups for lbd (a BPF ring buffer of ifindexes:
    /// a device whose ring just overflowed). Not pinned: each lbd reads
    /// its own.
    pub const RING_EVENTS: &str = "RING_EVENTS";
    /// The IPv6 programs `lan_ingress` reaches by tail calls
    /// ([`super::LAN6_SLOT`], [`super::UNREACHABLE6_SLOT`]). Pinned with the rest: a program array
    /// forgets its programs when the last file that names it closes, and
    /// the pinned `lan_ingress` goes on forwarding while lbd restarts.
    pub const LAN6: &str = "LAN6";
    /// The router's own MAC addresses on each LAN port, by the port's
    /// ifindex ([`super::RouterMacs`]). Came without a layout bump: a map
    /// created when absent changes nothing an older one holds, and a port
    /// without an entry is served as before.
    pub const ROUTER_MACS: &str = "ROUTER_MACS";
    /// The programs `lan_ingress` and `lan_ingress6` tail-call for a
    /// packet too big for its uplink: a UDP datagram without DF
    /// ([`super::TOO_BIG_SLOT`]), an IPv6 packet
    /// ([`super::TOO_BIG6_SLOT`]). Pinned as `LAN6` is; came without a
    /// layout bump, as `ROUTER_MACS` did.
    pub const TOO_BIG: &str = "TOO_BIG";

    /// Every map, for pinning them all.
    pub const ALL: [&str; 36] = [
        SETTINGS,
        BUCKETS,
        UPLINKS,
        UPLINK_BY_IFINDEX,
        UPLINK_AT_IFINDEX,
        TX_PORTS,
        LAN_PORTS,
        FLOWS,
        NAT_REV,
        BYPASS,
        UPLINK_STATS,
        REASONS,
        FRAGMENTS,
        EGRESS,
        EGRESS_ANY,
        EGRESS_AT,
        SIGNALS,
        RULES,
        POLICIES,
        PREFIXES,
        PORT_BITS,
        STICKY,
        LAN_CLASSES,
        POLICY_STATS,
        UPLINKS6,
        FLOWS6,
        BUCKETS6,
        BYPASS6,
        ENCAP,
        POLICIES6,
        PREFIXES6,
        STICKY6,
        RING_DROPS,
        LAN6,
        ROUTER_MACS,
        TOO_BIG,
    ];
}

/// The version of the maps' layouts (their names, key and value types and
/// meanings). A data plane pinned by an lbd of another layout is never
/// adopted: its maps would be misread. Bump it with any change to a type
/// below or to what a map holds.
pub const LAYOUT: u32 = 10;

/// The earlier layouts a start migrates rather than replaces, each with
/// the flow tables whose definition (kind or size) changed since: those
/// are made anew and their entries carried over; every other map, and
/// every link, is adopted as it is. Only a layout whose other maps all
/// still hold what they held, and whose changed maps are all flow tables,
/// may be listed (another remade map would meet the new programs empty).
/// Keep it with [`LAYOUT`].
pub const MIGRATES_FROM: &[(u32, &[&str])] = &[(9, &[name::NAT_REV])];
// (10: NAT_REV is a plain hash table, twice the flow table's size
// (`nat_entries`), no longer an LRU one; its entries are as before, and a
// start migrates 9 (`MIGRATES_FROM`). Room for more: BYPASS and BYPASS6
// (`BYPASS_ENTRIES`, was 256; a smaller one is made anew on any start:
// BYPASS refilled before lan_ingress takes over, BYPASS6 copied at load),
// and, for data planes made new (a migrated one keeps their sizes),
// LAN_PORTS, EGRESS and RING_DROPS (every LAN port, `MAX_LAN_PORTS`, not `MAX_LANS`).
// ROUTER_MACS, created. Then, without a bump: TOO_BIG, created;
// Uplink6::ipv6_mtu, carved from its padding, whose zero (what every
// earlier lbd wrote there) means "the link's MTU", as before.
// 6: also UplinkInfo's mtu and flags, and the told_too_big reason.
// 7: IPv6 policies: POLICIES6, PREFIXES6, STICKY6, a BUCKETS6 table pair
// per policy, Settings::live_policies6; NatValue::touched;
// UPLINK_AT_IFINDEX; EGRESS_AT. LAN6 came without a bump: a map that
// is created when absent changes nothing an older one holds.
// 8: tx_packets, tx_bytes and replies moved from UplinkStats to Signals.
// 9: Uplink6's translations (`npt::Npt`) hold their words as they
// lie in memory. FRAGS became FRAGMENTS, with a time, without a bump: a
// map under a new name is created, and the old one unpinned
// (`Pins::prepare`), which drops only fragments in flight.)

/// `LAN6`'s slots: `lan_ingress6`, which `lan_ingress` tail-calls, and
/// `lan_unreachable6`, which `lan_ingress6` tail-calls.
pub const LAN6_SLOT: u32 = 0;
pub const UNREACHABLE6_SLOT: u32 = 1;
pub const LAN6_SLOTS: u32 = 2;

/// `TOO_BIG`'s slots: `lan_too_big`, which `lan_ingress` tail-calls, and
/// `lan_too_big6`, which `lan_ingress6` tail-calls.
pub const TOO_BIG_SLOT: u32 = 0;
pub const TOO_BIG6_SLOT: u32 = 1;
pub const TOO_BIG_SLOTS: u32 = 2;

/// Program names in the XDP object.
pub mod program {
    pub const LAN_INGRESS: &str = "lan_ingress";
    pub const WAN_INGRESS: &str = "wan_ingress";
    /// `lan_ingress`'s IPv6 half, which it tail-calls (`LAN6`); never
    /// attached itself.
    pub const LAN_INGRESS6: &str = "lan_ingress6";
    /// The ICMPv6 answer of a policy's `fallback = unreachable`, which
    /// `lan_ingress6` tail-calls (`LAN6`); never attached itself.
    pub const LAN_UNREACHABLE6: &str = "lan_unreachable6";
    /// The hand-over to the kernel of a UDP datagram too big for its
    /// uplink without DF, which `lan_ingress` tail-calls (`TOO_BIG`);
    /// never attached itself.
    pub const LAN_TOO_BIG: &str = "lan_too_big";
    /// The ICMPv6 "Packet Too Big" for a packet too big for its flow's
    /// uplink, which `lan_ingress6` tail-calls (`TOO_BIG`); never attached
    /// itself.
    pub const LAN_TOO_BIG6: &str = "lan_too_big6";
    /// The tc program that sends what the XDP programs hand over through
    /// the target device's qdisc (see `crate::egress`).
    pub const HANDOFF: &str = "handoff";
    /// The tc program that translates replies on an L3 uplink (no
    /// Ethernet header: XDP cannot serve it).
    pub const WAN_INGRESS_L3: &str = "wan_ingress_l3";
    /// The raw tracepoint program on `xdp_devmap_xmit` that counts the
    /// frames a device map flush could not put into a full ring (see
    /// `crate::egress`).
    pub const RING_WATCH: &str = "ring_watch";
}

/// Global knobs the daemon may change at run time (one entry, index 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// Key of the classifier hash; random per boot of the data plane.
    pub seed: u32,
    /// One of [`crate::hash::mode`].
    pub mode: u32,
    /// Which generation of the compiled rules is live (0 or 1): its entry
    /// of `RULES`, its half of `PORT_BITS`, its keys in `PREFIXES` and its
    /// bits in each `LAN_CLASSES` entry. The daemon writes the other
    /// generation whole and then flips this, so new rules take effect in
    /// one step and no packet ever sees half of each. (Each policy's
    /// bucket tables flip the same way, in its `POLICIES` entry.)
    pub active_rules: u32,
    /// NAT source ports (host order, inclusive) a new mapping may take when
    /// the client's own port is not free.
    pub nat_port_min: u16,
    pub nat_port_max: u16,
    /// The router's own ephemeral ports (`ip_local_port_range`): a client
    /// port in here is never kept, so NAT and the router's own sockets can
    /// never claim the same port.
    pub local_port_min: u16,
    pub local_port_max: u16,
    /// [`settings_flags`]: switches.
    pub flags: u32,
    /// The policies (bits by index) one of whose uplinks takes new flows:
    /// what the rules' fallbacks go by.
    pub live_policies: u32,
    /// The same for IPv6 flows: one of whose uplinks takes new IPv6 flows
    /// (an uplink's IPv6 may be down while its IPv4 is up).
    pub live_policies6: u32,
}

/// Bits of [`Settings::flags`].
pub mod settings_flags {
    /// A SYN sent again for a connection still waiting for its answer
    /// moves to another uplink (a new mapping: nothing was committed).
    pub const RESTEER_SYN: u32 = 1;
    /// IPv6 is balanced: the LAN carries a prefix lbd knows, and
    /// `UPLINKS6` says how each uplink takes it. Without it, IPv6 is the
    /// kernel's, as it would be without lb.
    pub const IPV6: u32 = 2;
}

/// Values of [`UplinkInfo::flags`].
pub mod uplink_flags {
    /// Lower the MSS of SYNs leaving by it to what its MTU carries
    /// (`crate::mss`).
    pub const CLAMP_MSS: u16 = 1;
    /// Its packets are wrapped (a VLAN tag, a PPPoE session): its `ENCAP`
    /// entry says how. Plain Ethernet uplinks never look there.
    pub const WRAPPED: u16 = 2;
}

/// Slots of map `SIGNALS`: each uplink's IPv4 signals at its index, its
/// IPv6 signals at [`signals6`] of it. Health is kept per family: an ISP's
/// IPv6 often fails while its IPv4 works.
pub const SIGNAL_SLOTS: u32 = 2 * crate::MAX_UPLINKS;

/// The `SIGNALS` slot of `uplink`'s IPv6 traffic.
pub const fn signals6(uplink: u32) -> u32 {
    crate::MAX_UPLINKS + uplink
}

/// What the traffic says about one uplink's path in one family, per CPU
/// (map `SIGNALS`, see [`SIGNAL_SLOTS`]): read by lbd's passive failure
/// detection. Times are the coarse monotonic clock's. It also holds the
/// counters of the packets that set them (sent, replies), so that a
/// forwarded packet looks up one per-CPU entry, not two; lbd adds them to
/// the uplink's others ([`UplinkStats`]). One cache line.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Signals {
    /// A reply (a packet that matched a NAT mapping) last arrived.
    pub last_reply_ns: u64,
    /// A packet was last sent.
    pub last_sent_ns: u64,
    /// Flows and destinations that sent since this CPU's last reply: one
    /// bit each, by hash (mod 64).
    pub flows: u64,
    pub destinations: u64,
    /// SYNs sent again for connections still waiting for their answer.
    pub syn_retries: u64,
    /// Packets and bytes (whole frames) sent out of the uplink by XDP.
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// Replies translated back to a client (ICMP errors included).
    pub replies: u64,
}

/// One bucket table, a single map value: the daemon replaces a whole table
/// with one write. `uplinks[bucket]` is an uplink index or
/// [`crate::NO_UPLINK`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BucketTable {
    pub uplinks: crate::table::Table,
}

/// Operator and health state of an uplink as the data plane sees it.
pub mod uplink_state {
    /// No uplink at this index.
    pub const UNUSED: u32 = 0;
    /// Takes new flows (through the bucket table) and keeps its flows.
    pub const ACTIVE: u32 = 1;
    /// Keeps its flows but the bucket table sends it no new ones.
    pub const DRAIN: u32 = 2;
    /// Neither: its flows are moved on their next packet.
    pub const DOWN: u32 = 3;

    /// Whether flows already pinned to an uplink in `state` stay there.
    #[inline(always)]
    pub fn keeps_flows(state: u32) -> bool {
        state == ACTIVE || state == DRAIN
    }

    /// As `lbctl status` and the metrics say it.
    pub const fn name(state: u32) -> &'static str {
        match state {
            ACTIVE => "active",
            DRAIN => "drain",
            DOWN => "down",
            _ => "unused",
        }
    }
}

/// What the data plane needs to send a packet out of an uplink.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UplinkInfo {
    /// Interface index of the uplink (also its entry in the device map).
    pub ifindex: u32,
    /// One of [`uplink_state`].
    pub state: u32,
    /// The uplink's own IPv4 address (the NAT source address).
    pub addr: [u8; 4],
    /// MAC address of the uplink interface: the new Ethernet source.
    pub src_mac: [u8; 6],
    /// MAC address of the uplink's gateway: the new Ethernet destination.
    pub gw_mac: [u8; 6],
    /// Largest IP packet the uplink takes (its MTU).
    pub mtu: u16,
    /// [`uplink_flags`].
    pub flags: u16,
    /// Bumped by the daemon whenever `addr` changes. A flow pinned under
    /// another epoch has a NAT mapping for an address the uplink no longer
    /// has: it is moved (given a new mapping) on its next packet, so that
    /// nothing leaves with an old address.
    pub epoch: u32,
}

/// Key of the flow table: a connection as the client sent it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    pub src_addr: [u8; 4],
    pub dst_addr: [u8; 4],
    /// TCP/UDP source port, or the ICMP echo identifier.
    pub src_port: [u8; 2],
    /// TCP/UDP destination port; zero for ICMP echo.
    pub dst_port: [u8; 2],
    /// IP protocol number.
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// Value of the flow table: where a connection is pinned and how it is
/// translated.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowValue {
    /// `bpf_ktime_get_coarse_ns` of the last packet seen, either way.
    pub last_seen_ns: u64,
    /// Index of the uplink the flow is pinned to, or
    /// [`crate::KERNEL_OWNED`].
    pub uplink: u32,
    /// The source port (ICMP: identifier) the flow has on its uplink.
    pub nat_port: [u8; 2],
    /// One of [`tcp_state`]; zero for UDP and ICMP.
    pub tcp_state: u8,
    /// Its uplink's `epoch` when it was pinned (the low 8 bits).
    pub epoch: u8,
}

/// How far a TCP connection has got, as far as timeouts care (RFC 5382:
/// short while opening or closing, long once established).
pub mod tcp_state {
    /// Only the client has spoken (SYN sent).
    pub const OPENING: u8 = 0;
    /// The server answered: established.
    pub const ESTABLISHED: u8 = 1;
    /// A FIN or RST went by: closing.
    pub const CLOSING: u8 = 2;
    /// Only the client has spoken, and its SYN, sent again, was moved to
    /// another uplink once: it is not moved again (an answer that is only
    /// late must still find its mapping, and two uplinks are not played
    /// off against each other).
    pub const OPENING_MOVED: u8 = 3;

    /// Whether the server has not answered yet.
    pub const fn opening(state: u8) -> bool {
        state == OPENING || state == OPENING_MOVED
    }
}

/// Key of the reverse NAT table: a reply as it arrives on an uplink.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NatKey {
    /// The uplink's address (the reply's destination).
    pub nat_addr: [u8; 4],
    /// The server's address (the reply's source).
    pub remote_addr: [u8; 4],
    /// The NAT port (the reply's destination port; ICMP: identifier).
    pub nat_port: [u8; 2],
    /// The server's port (the reply's source port; zero for ICMP).
    pub remote_port: [u8; 2],
    pub proto: u8,
    pub _pad: [u8; 3],
}

impl NatKey {
    /// The flow (its `FLOWS` key) that mapping `self` -> `back` belongs
    /// to: the client's end from the value, the server's from the key.
    pub const fn flow(&self, back: &NatValue) -> FlowKey {
        FlowKey {
            src_addr: back.client_addr,
            dst_addr: self.remote_addr,
            src_port: back.client_port,
            dst_port: self.remote_port,
            proto: self.proto,
            _pad: [0; 3],
        }
    }
}

/// Value of the reverse NAT table: where a reply goes back to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatValue {
    pub client_addr: [u8; 4],
    /// The client's own source port (ICMP: identifier).
    pub client_port: [u8; 2],
    /// The client's 802.1Q tag control (VLAN id), zero when untagged.
    pub vlan_tci: [u8; 2],
    pub client_mac: [u8; 6],
    /// The router's MAC on the client's LAN: the reply's new source.
    pub lan_mac: [u8; 6],
    /// The LAN interface the client is on.
    pub lan_ifindex: u32,
    /// The uplink the mapping belongs to.
    pub uplink: u32,
    /// When a reply last refreshed its flow's entry, in [`reply_tick`]s
    /// (wrapping): a reply refreshes the flow table at most once a tick,
    /// or at once when its TCP flags move the flow's state.
    pub touched: u32,
}

/// `NAT_REV`'s size for a flow table of `max_flows` entries: twice. It
/// is a plain hash table, which never evicts: an LRU one would, when
/// full, evict the mapping of a live flow whose replies are rare, and
/// give its port to another flow to the same server, which would then
/// get the first one's replies. The flow table evicts instead (its
/// mapping stays until the collector sees it orphaned), and the room
/// beyond one mapping per flow holds those orphans. Full all the same,
/// a new flow finds no port, a counted drop: never a shared mapping.
pub const fn nat_entries(max_flows: u32) -> u32 {
    max_flows.saturating_mul(2)
}

/// A reply refreshes its flow's `last_seen_ns` at most once in 2^this
/// nanoseconds of the coarse clock (2^28: 268 ms, well below the shortest
/// flow timeout the configuration takes, 1 s): a busy download's replies
/// then cost a few flow-table lookups a second, not one a packet.
pub const REPLY_TICK_SHIFT: u32 = 28;

/// `now_ns` in reply ticks (see [`NatValue::touched`]).
#[inline(always)]
pub const fn reply_tick(now_ns: u64) -> u32 {
    (now_ns >> REPLY_TICK_SHIFT) as u32
}

/// Key of the fragment table: one IPv4 datagram in flight, as its
/// fragments carry it (RFC 791: source, destination, identification,
/// protocol), before any translation.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FragKey {
    pub src_addr: [u8; 4],
    pub dst_addr: [u8; 4],
    pub id: [u8; 2],
    pub proto: u8,
    pub _pad: u8,
}

/// Value of the fragment table: the ports (ICMP echo: identifier and zero)
/// that the datagram's first fragment carried, before translation; later
/// fragments, which carry none, are translated as their first one was.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragValue {
    /// `bpf_ktime_get_coarse_ns` when the first fragment went through.
    pub seen_ns: u64,
    pub src_port: [u8; 2],
    pub dst_port: [u8; 2],
    pub _pad: [u8; 4],
}

/// How long a datagram's later fragments follow its first one: Linux's
/// reassembly time (`ipfrag_time`, 30 s). A datagram is then given up by
/// whoever reassembles it, and its identification may come back with
/// another one, whose later fragments must not take its ports.
pub const FRAGMENT_LIFETIME_NS: u64 = 30_000_000_000;

impl FragValue {
    /// Whether its datagram may still have fragments on the way at
    /// `now_ns` (the same clock as `seen_ns`; a `now_ns` behind it, as
    /// another CPU's coarse clock can be by a tick, is no time at all).
    #[inline(always)]
    pub fn current(&self, now_ns: u64) -> bool {
        now_ns.saturating_sub(self.seen_ns) <= FRAGMENT_LIFETIME_NS
    }
}

/// What the data plane knows of a LAN port (map `LAN_CLASSES`, by
/// ifindex): the rules it matches, and the router's address there.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LanPort {
    /// The rules whose `lan` names the port, per rule generation.
    pub rules: [crate::policy::RuleBits; 2],
    /// The router's IPv4 address on the port's LAN (a bridge's, for its
    /// ports): the source of the ICMP errors sent there. Zero: unknown.
    pub addr: [u8; 4],
}

/// How many MAC addresses of the router one LAN port's entry holds.
pub const MAX_ROUTER_MACS: usize = 16;

/// The MAC addresses a LAN port's clients reach the router at (map
/// `ROUTER_MACS`, by the port's ifindex): its LAN interface's (a bridge's),
/// the bridge's ports' (the bridge takes frames to them as its own), and
/// those of the devices on top of it (a VLAN, a VRRP macvlan). A new flow
/// is pinned only from a frame to one of them: a frame to another MAC
/// (a second gateway on the LAN, a VPN box the clients route a network
/// through) is the bridge's to forward, as the kernel would never route
/// it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RouterMacs {
    /// How many of `macs` hold one.
    pub len: u32,
    pub macs: [[u8; 6]; MAX_ROUTER_MACS],
}

impl RouterMacs {
    /// The entry for `macs` (duplicates once), or `None` when there are
    /// more than [`MAX_ROUTER_MACS`] different ones: such a port is better
    /// left without an entry (every frame served, as before) than with
    /// one that misses the router's own.
    pub fn new(macs: impl IntoIterator<Item = [u8; 6]>) -> Option<Self> {
        let mut entry = RouterMacs::default();
        for mac in macs {
            // A group or unset address is no device's own.
            if mac[0] & 1 != 0 || mac == [0; 6] || entry.holds(&mac) {
                continue;
            }
            *entry.macs.get_mut(entry.len as usize)? = mac;
            entry.len += 1;
        }
        Some(entry)
    }

    /// Whether `mac` is one of the router's. A group address (broadcast,
    /// multicast) never is: the kernel routes no such frame either.
    #[inline(always)]
    pub fn holds(&self, mac: &[u8; 6]) -> bool {
        let mut i = 0;
        while i < MAX_ROUTER_MACS && i < self.len as usize {
            if self.macs[i] == *mac {
                return true;
            }
            i += 1;
        }
        false
    }
}

/// The IPv6 side of an uplink (map `UPLINKS6`, by uplink index). Its
/// interface and own MAC are its `UPLINKS` entry's; its MTU too, unless
/// its IPv6 has a smaller one ([`Uplink6::mtu`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Uplink6 {
    /// One of [`uplink_state`], for IPv6 alone: an ISP's IPv6 can fail
    /// while its IPv4 works.
    pub state: u32,
    /// MAC address of its IPv6 next hop (the router that advertised the
    /// default route, usually by a link-local address).
    pub gw_mac: [u8; 6],
    /// The interface's IPv6 MTU where it is smaller than its link's (a
    /// router advertisement's MTU option, an operator's sysctl); 0: the
    /// link's. Carved from padding without a layout bump: an older lbd's
    /// entries hold 0 there.
    pub ipv6_mtu: u16,
    /// To the translations' 64-bit alignment.
    pub _pad: [u8; 4],
    /// The LAN's prefix to the uplink's own (RFC 6296); from the LAN's
    /// prefix to itself on the uplink whose delegation the LAN carries.
    pub out: crate::npt::Npt,
    /// The uplink's prefix back to the LAN's.
    pub back: crate::npt::Npt,
}

impl Uplink6 {
    /// The MTU its IPv6 packets must fit, for a link of MTU `link`.
    #[inline(always)]
    pub fn mtu(&self, link: u16) -> u16 {
        if self.ipv6_mtu != 0 && self.ipv6_mtu < link {
            self.ipv6_mtu
        } else {
            link
        }
    }
}

/// Key of the IPv6 flow table: a connection as the client sent it.
/// Aligned as a 64-bit word (its layout is the same: there is no hole to
/// fill), so that the data plane reads its addresses a word at a time
/// rather than a byte at a time, on every packet.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey6 {
    pub src_addr: [u8; 16],
    pub dst_addr: [u8; 16],
    /// TCP/UDP source port, or the ICMPv6 echo identifier.
    pub src_port: [u8; 2],
    /// TCP/UDP destination port; zero for ICMPv6 echo.
    pub dst_port: [u8; 2],
    pub proto: u8,
    pub _pad: [u8; 3],
}

impl FlowKey6 {
    /// Its source and destination [`crate::hash::xor6`]-folded, from
    /// whole 64-bit words (the key is aligned for it): on every packet
    /// this is 4 loads, not 32.
    #[inline(always)]
    pub fn folded(&self) -> (u32, u32) {
        // SAFETY: the key is `repr(C, align(8))` and the addresses sit at
        // offsets 0 and 16: each is two aligned, initialised 64-bit words,
        // and every bit pattern is a valid u64.
        let words = unsafe { &*(self as *const Self as *const [u64; 4]) };
        // XOR is bytewise: XOR the native words, then read the result's
        // bytes as the big-endian word `xor6` gives.
        let fold = |x: u64| {
            let b = x.to_ne_bytes();
            u32::from_be_bytes([b[0] ^ b[4], b[1] ^ b[5], b[2] ^ b[6], b[3] ^ b[7]])
        };
        (fold(words[0] ^ words[1]), fold(words[2] ^ words[3]))
    }
}

/// Value of the IPv6 flow table. NPTv6 is stateless, so there is no
/// reverse table: a reply is translated back by its uplink's prefix and
/// finds its flow, and with it the client's link, under the original key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowValue6 {
    /// `bpf_ktime_get_coarse_ns` of the last packet seen, either way.
    pub last_seen_ns: u64,
    /// The uplink the flow is pinned to, or [`crate::KERNEL_OWNED`].
    pub uplink: u32,
    /// The LAN interface the client is on.
    pub lan_ifindex: u32,
    pub client_mac: [u8; 6],
    /// The router's MAC on the client's LAN: a reply's new source.
    pub lan_mac: [u8; 6],
    /// The client's 802.1Q tag control, zero when untagged.
    pub vlan_tci: [u8; 2],
    /// One of [`tcp_state`]; zero for UDP and ICMPv6.
    pub tcp_state: u8,
    pub _pad: u8,
}

/// Per-policy counters; one per CPU, summed by user space.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyStats {
    /// New flows the policy placed on one of its uplinks.
    pub new_flows: u64,
    /// New flows dropped by its `fallback = drop`.
    pub dropped: u64,
    /// New flows refused with an ICMP error by its `fallback = unreachable`.
    pub unreachable: u64,
    /// New flows placed by a sticky entry rather than by the hash.
    pub sticky_hits: u64,
}

/// Per-uplink counters; one per CPU, summed by user space. What each
/// forwarded packet counts is in [`Signals`], by family.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UplinkStats {
    /// Packets and bytes arriving on the uplink.
    pub rx_packets: u64,
    pub rx_bytes: u64,
    /// Flows pinned to this uplink (new, or moved here from a dead uplink).
    pub new_flows: u64,
    /// Flows moved away from this uplink because it went down.
    pub moved_away: u64,
    /// New flows that found no free NAT port on this uplink (dropped).
    pub nat_failures: u64,
}

const _: () = {
    assert!(core::mem::size_of::<Settings>() == 32);
    assert!(core::mem::size_of::<UplinkInfo>() == 32);
    assert!(core::mem::size_of::<FlowKey>() == 16);
    assert!(core::mem::size_of::<FlowValue>() == 16);
    assert!(core::mem::size_of::<NatKey>() == 16);
    assert!(core::mem::size_of::<NatValue>() == 32);
    assert!(core::mem::size_of::<UplinkStats>() == 40);
    assert!(core::mem::size_of::<Signals>() == 64);
    assert!(core::mem::size_of::<FragKey>() == 12);
    assert!(core::mem::size_of::<FragValue>() == 16);
    assert!(core::mem::size_of::<PolicyStats>() == 32);
    assert!(core::mem::size_of::<LanPort>() == 72);
    assert!(core::mem::size_of::<RouterMacs>() == 100);
    assert!(core::mem::size_of::<Uplink6>() == 80);
    assert!(core::mem::size_of::<FlowKey6>() == 40);
    assert!(core::mem::size_of::<FlowValue6>() == 32);
    assert!(core::mem::size_of::<BucketTable>() == 4 * crate::BUCKETS as usize);
};

#[cfg(feature = "user")]
mod pod {
    // SAFETY: every type here is `repr(C)`, made only of integers and byte
    // arrays with explicit padding, so every bit pattern is a valid value.
    unsafe impl aya::Pod for super::Settings {}
    unsafe impl aya::Pod for super::BucketTable {}
    unsafe impl aya::Pod for super::UplinkInfo {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowValue {}
    unsafe impl aya::Pod for super::UplinkStats {}
    unsafe impl aya::Pod for super::Signals {}
    unsafe impl aya::Pod for super::NatKey {}
    unsafe impl aya::Pod for super::RouterMacs {}
    unsafe impl aya::Pod for super::NatValue {}
    unsafe impl aya::Pod for super::FragKey {}
    unsafe impl aya::Pod for super::FragValue {}
    unsafe impl aya::Pod for super::PolicyStats {}
    unsafe impl aya::Pod for super::LanPort {}
    unsafe impl aya::Pod for super::Uplink6 {}
    unsafe impl aya::Pod for super::FlowKey6 {}
    unsafe impl aya::Pod for super::FlowValue6 {}
    unsafe impl aya::Pod for crate::egress::Egress {}
    unsafe impl aya::Pod for crate::policy::Rule {}
    unsafe impl aya::Pod for crate::policy::RuleTable {}
    unsafe impl aya::Pod for crate::policy::Policy {}
    unsafe impl aya::Pod for crate::policy::StickyKey {}
    unsafe impl aya::Pod for crate::policy::StickyValue {}
    unsafe impl aya::Pod for crate::policy::PrefixKey {}
    unsafe impl aya::Pod for crate::policy::PrefixKey6 {}
    unsafe impl aya::Pod for crate::policy::StickyKey6 {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ipv6_mtu_counts_only_below_the_links() {
        let six = |ipv6_mtu| Uplink6 {
            ipv6_mtu,
            ..Uplink6::default()
        };
        assert_eq!(six(0).mtu(1500), 1500, "none said: the link's");
        assert_eq!(six(1480).mtu(1500), 1480, "a router advertisement's");
        assert_eq!(six(9000).mtu(1500), 1500, "never above the link's");
        // Where the field sits: the translations keep their offset.
        assert_eq!(core::mem::offset_of!(Uplink6, ipv6_mtu), 10);
        assert_eq!(core::mem::offset_of!(Uplink6, out), 16);
    }

    #[test]
    fn a_fragment_entry_holds_for_the_reassembly_time_and_no_longer() {
        let seen_ns = 1_000_000_000_000;
        let v = FragValue {
            seen_ns,
            ..FragValue::default()
        };
        assert!(v.current(seen_ns));
        assert!(v.current(seen_ns + FRAGMENT_LIFETIME_NS));
        assert!(!v.current(seen_ns + FRAGMENT_LIFETIME_NS + 1));
        assert!(!v.current(u64::MAX));
        // Another CPU's clock a tick behind.
        assert!(v.current(seen_ns - 4_000_000));
    }

    #[test]
    fn a_ports_entry_holds_the_routers_macs_once_and_no_group_address() {
        let bridge = [0x02, 0, 0, 0, 0, 1];
        let port = [0x02, 0, 0, 0, 0, 2];
        let vrrp = [0x00, 0x00, 0x5e, 0x00, 0x01, 0x07];
        let entry = RouterMacs::new([bridge, port, bridge, [0xff; 6], [0; 6], vrrp])
            .expect("three MACs fit");
        assert_eq!(entry.len, 3);
        for mac in [bridge, port, vrrp] {
            assert!(entry.holds(&mac));
        }
        // Another host's (a second gateway's), broadcast, IPv4 multicast.
        for mac in [[0x02, 0, 0, 0, 0, 9], [0xff; 6], [0x01, 0, 0x5e, 0, 0, 1]] {
            assert!(!entry.holds(&mac));
        }
        // An empty entry holds nothing.
        assert!(!RouterMacs::default().holds(&bridge));
    }

    #[test]
    fn a_port_with_more_macs_than_an_entry_holds_gets_none() {
        let macs = (0..=MAX_ROUTER_MACS as u8).map(|i| [0x02, 0, 0, 0, 0, i]);
        assert!(RouterMacs::new(macs.clone().take(MAX_ROUTER_MACS)).is_some());
        assert!(RouterMacs::new(macs).is_none());
    }
}
