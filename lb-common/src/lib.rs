//! Types and pure logic shared by the XDP programs (`lb-ebpf`) and user space
//! (`lb-daemon`, tests, benchmarks).
//!
//! Everything here is `no_std` and allocation-free so that the kernel side can
//! use the very same code: map layouts (`#[repr(C)]`, fixed-width integers,
//! explicit padding, sizes asserted at compile time), the counter and verdict
//! reason numbers, the classifier hash, checksum arithmetic and the bucket
//! table builder. Nothing here touches a map, a socket or the clock.
#![no_std]

pub mod csum;
pub mod egress;
pub mod encap;
pub mod hash;
pub mod icmp;
pub mod kfunc;
pub mod maps;
pub mod marks;
pub mod mss;
pub mod nat;
pub mod npt;
pub mod policy;
pub mod reason;
pub mod table;

/// Number of entries of the bucket table. A power of two, so the kernel finds
/// a bucket with a mask instead of a division.
pub const BUCKETS: u32 = 4096;
const _: () = assert!(BUCKETS.is_power_of_two());

/// Most uplinks one router can have; sizes the per-uplink maps.
pub const MAX_UPLINKS: u32 = 16;

/// Interface indexes below this find their uplink in an array (map
/// `UPLINK_AT_IFINDEX`: one load, where a hash lookup costs a reply about
/// ten nanoseconds); a router's interfaces are numbered from 1 up, so all
/// but a router with thousands of interfaces are there. Larger ones are
/// in `UPLINK_BY_IFINDEX`, a hash map.
pub const IFINDEX_SLOTS: u32 = 4096;

/// Most LAN interfaces one router can have.
pub const MAX_LANS: u32 = 16;

/// Most LAN ports (interfaces lb is attached to, a bridge's ports each)
/// the rules can tell apart.
pub const MAX_LAN_PORTS: u32 = 64;

/// Most prefixes the rules can name on one side (source or destination),
/// inline and from files together.
pub const MAX_SIDE_PREFIXES: u32 = 1024 * 1024;

/// Room in each bypass trie (`BYPASS`, `BYPASS6`): the destinations the
/// kernel keeps (LAN subnets, the router's addresses, VPN and routed
/// prefixes, IPsec policies'). A trie takes memory per entry written, so
/// the room costs nothing until used; a router with a VPN's few thousand
/// routes fits.
pub const BYPASS_ENTRIES: u32 = 16384;

/// Room in the prefix trie: both sides, and a new generation of the rules
/// written beside the live one.
pub const PREFIX_ENTRIES: u32 = 4 * MAX_SIDE_PREFIXES;

/// Sticky clients remembered (LRU: the least recently used make room).
pub const DEFAULT_STICKY_ENTRIES: u32 = 65_536;

/// The "MAC address" lbd writes for an L3 uplink (a tunnel, a raw-IP
/// modem), as its own and as its next hop's: it has none, and the data
/// plane's check that an uplink's next hop is known must still hold. A
/// locally administered address no NIC has ("lb3"); its frames lose their
/// Ethernet header on the way out (the hand-off path), so it is never
/// sent.
pub const NO_LINK_LAYER: [u8; 6] = [0x02, 0x6c, 0x62, 0x33, 0x00, 0x00];

/// Bucket table value meaning "no uplink can take new flows": packets of new
/// flows are dropped and counted rather than leaked to the kernel unNATed.
pub const NO_UPLINK: u32 = u32::MAX;

/// Flow table value of `uplink` for a connection the kernel owns (its
/// conntrack had it when the fast path first saw it: the reply of a port
/// forward). Its packets go to the kernel, with no second lookup.
pub const KERNEL_OWNED: u32 = u32::MAX - 1;

/// Whether an IPv6 address is never forwarded by anyone and so always the
/// kernel's: multicast (ff00::/8), link-local (fe80::/10) and the
/// unspecified address (neighbour discovery, router solicitations).
/// `lan_ingress` and `lbctl explain` both ask this.
#[inline(always)]
pub fn kernels_scope6(addr: &[u8; 16]) -> bool {
    addr[0] == 0xff || (addr[0] == 0xfe && addr[1] & 0xc0 == 0x80) || addr == &[0; 16]
}

/// Whether an IPv4 packet from `src` to `dst` is never the internet's and
/// so always the kernel's (or the LAN's bridge's): to a group or to
/// everyone (224.0.0.0/4, and 240.0.0.0/4 with 255.255.255.255: a DHCP
/// client's discover, mDNS, SSDP), from or to a link-local address
/// (169.254.0.0/16), from or to "this network" (0.0.0.0/8: a client that
/// has no address yet) or loopback. Pinned to an uplink and NATed, a
/// client's DHCP discover would leave for the ISP and never reach the
/// router's own DHCP server. `lan_ingress` and `lbctl explain` both ask
/// this.
#[inline(always)]
pub fn kernels_scope4(src: [u8; 4], dst: [u8; 4]) -> bool {
    let never_routed = |a: [u8; 4]| a[0] == 0 || a[0] == 127 || (a[0] == 169 && a[1] == 254);
    never_routed(src) || never_routed(dst) || src[0] >= 224 || dst[0] >= 224
}

/// Datagrams whose fragments the fast path follows at once (LRU: the
/// oldest make room). Fragments of one datagram arrive within
/// milliseconds of each other; this many is far more than in flight.
pub const FRAG_ENTRIES: u32 = 8192;

/// Default size of the flow table (entries); the daemon overrides it from its
/// configuration at load time.
pub const DEFAULT_MAX_FLOWS: u32 = 65_536;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_no_uplink_carries_is_the_kernels() {
        let client = [10, 10, 0, 2];
        let server = [198, 51, 100, 10];
        // A DHCP discover, mDNS, SSDP, a directed-to-everyone datagram.
        assert!(kernels_scope4([0, 0, 0, 0], [255, 255, 255, 255]));
        assert!(kernels_scope4(client, [224, 0, 0, 251]));
        assert!(kernels_scope4(client, [239, 255, 255, 250]));
        assert!(kernels_scope4(client, [255, 255, 255, 255]));
        // Link-local both ways, loopback, a multicast source.
        assert!(kernels_scope4([169, 254, 7, 1], server));
        assert!(kernels_scope4(client, [169, 254, 0, 1]));
        assert!(kernels_scope4(client, [127, 0, 0, 1]));
        assert!(kernels_scope4([224, 0, 0, 1], server));
        // The internet, and the neighbours of the ranges above.
        assert!(!kernels_scope4(client, server));
        assert!(!kernels_scope4(client, [223, 255, 255, 255]));
        assert!(!kernels_scope4(client, [169, 253, 0, 1]));
        assert!(!kernels_scope4(client, [1, 0, 0, 1]));
        assert!(!kernels_scope4([100, 64, 0, 1], [128, 0, 0, 1]));
    }
}
