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
    pub const TX_PORTS: &str = "TX_PORTS";
    pub const FLOWS: &str = "FLOWS";
    pub const BYPASS: &str = "BYPASS";
    pub const UPLINK_STATS: &str = "UPLINK_STATS";
    pub const REASONS: &str = "REASONS";
}

/// Program names in the XDP object.
pub mod program {
    pub const LAN_INGRESS: &str = "lan_ingress";
    pub const WAN_INGRESS: &str = "wan_ingress";
}

/// Global knobs the daemon may change at run time (one entry, index 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// Key of the classifier hash; random per boot of the data plane.
    pub seed: u32,
    /// One of [`crate::hash::mode`].
    pub mode: u32,
    /// Which half of the `BUCKETS` map is live (0 or 1). The daemon writes
    /// the other half and then flips this, so a new table takes effect in
    /// one step and no packet ever sees half of each.
    pub active_table: u32,
    pub _pad: u32,
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

/// Value of the flow table: where a connection is pinned.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowValue {
    /// `bpf_ktime_get_ns` of the last packet seen.
    pub last_seen_ns: u64,
    /// Index of the uplink the flow is pinned to.
    pub uplink: u32,
    pub _pad: [u8; 4],
}

/// Per-uplink counters; one per CPU, summed by user space.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UplinkStats {
    /// Packets and bytes (whole frames) sent out of the uplink by XDP.
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// Packets and bytes arriving on the uplink.
    pub rx_packets: u64,
    pub rx_bytes: u64,
    /// Flows pinned to this uplink (new, or moved here from a dead uplink).
    pub new_flows: u64,
    /// Flows moved away from this uplink because it went down.
    pub moved_away: u64,
}

/// Key of the bypass trie: destinations the fast path leaves to the kernel
/// (the router's own addresses, LAN subnets). Same layout as aya's
/// `LpmTrie` key: prefix length, then the address in network order.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BypassKey {
    pub prefix_len: u32,
    pub addr: [u8; 4],
}

const _: () = {
    assert!(core::mem::size_of::<Settings>() == 16);
    assert!(core::mem::size_of::<UplinkInfo>() == 24);
    assert!(core::mem::size_of::<FlowKey>() == 16);
    assert!(core::mem::size_of::<FlowValue>() == 16);
    assert!(core::mem::size_of::<UplinkStats>() == 48);
    assert!(core::mem::size_of::<BypassKey>() == 8);
};

#[cfg(feature = "user")]
mod pod {
    // SAFETY: every type here is `repr(C)`, made only of integers and byte
    // arrays with explicit padding, so every bit pattern is a valid value.
    unsafe impl aya::Pod for super::Settings {}
    unsafe impl aya::Pod for super::UplinkInfo {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowValue {}
    unsafe impl aya::Pod for super::UplinkStats {}
    unsafe impl aya::Pod for super::BypassKey {}
}
