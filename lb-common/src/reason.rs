//! Why the fast path gave a packet to the kernel or dropped it.
//!
//! Each reason is an index into the per-CPU `REASONS` counter array. The
//! numbers are part of the contract between kernel and user space: append new
//! reasons, never renumber. Every `XDP_DROP` the programs return has one.

/// Neither IPv4 nor IPv6 that lb balances (ARP, LLDP; IPv6 while lbd
/// has no LAN prefix for it).
pub const PASS_NOT_IPV4: u32 = 0;
/// Shorter than the headers it claims, or a header field out of range.
pub const PASS_MALFORMED: u32 = 1;
/// A later fragment of a datagram whose first fragment the fast path did
/// not translate (it went to the kernel, which reassembles it with its
/// first piece, or drops it when that never comes), or of a protocol the
/// fast path does not translate.
pub const PASS_FRAGMENT: u32 = 2;
/// For the router itself or another LAN subnet (the bypass table), or
/// never routed (broadcast, multicast, link-local: `kernels_scope4`).
pub const PASS_LOCAL: u32 = 3;
/// TTL would expire here: the kernel answers with ICMP time exceeded.
pub const PASS_TTL: u32 = 4;
/// A protocol or ICMP type the fast path does not forward.
pub const PASS_UNSUPPORTED: u32 = 5;
/// A configured uplink has no device or MAC yet.
pub const PASS_UPLINK_UNREADY: u32 = 6;
/// Arrived on an interface that is not a configured uplink.
pub const PASS_UNKNOWN_UPLINK: u32 = 7;
/// A new flow found no uplink that takes new flows: dropped rather than sent
/// out unNATed.
pub const DROP_NO_UPLINK: u32 = 8;
/// The device map had no entry for the chosen uplink.
pub const DROP_REDIRECT_FAILED: u32 = 9;

/// A reply on an uplink that matches no NAT mapping: the router's own.
pub const PASS_NO_MAPPING: u32 = 10;
/// Larger than the uplink's MTU: without DF, for the kernel to fragment
/// and translate itself, where it cannot be handed over
/// (`HANDED_TOO_BIG`); with DF (or IPv6) where the data plane cannot
/// answer itself (a tagged frame, IPv4 options), for the kernel to answer
/// with ICMP "fragmentation needed" (or Packet Too Big).
pub const PASS_TOO_BIG: u32 = 11;
/// Larger than the uplink's MTU without DF: XDP cannot fragment. No
/// longer dropped (the kernel fragments it: `HANDED_TOO_BIG`); kept so
/// that the reasons keep their numbers.
pub const DROP_TOO_BIG: u32 = 12;
/// No free NAT port for a new flow.
pub const DROP_NAT_EXHAUSTED: u32 = 13;
/// A packet of a connection the kernel's conntrack owns (the reply of a
/// port forward): the kernel translates and routes it.
pub const PASS_KERNEL_CONNECTION: u32 = 14;
/// A new flow a `kernel` rule leaves to the kernel's routing.
pub const PASS_POLICY_KERNEL: u32 = 15;
/// A new flow whose policy has no uplink that takes new flows, dropped by
/// its `fallback = drop`.
pub const DROP_POLICY: u32 = 16;
/// As `DROP_POLICY`, by `fallback = unreachable`: the client was sent an
/// ICMP "host unreachable" (or, when one cannot be made, only dropped).
pub const DROP_POLICY_UNREACHABLE: u32 = 17;

/// An IPv6 packet that would leave by an uplink with a source outside
/// the LAN's prefix (a ULA, a prefix the ISP took back): dropped, never
/// sent out with an address the ISP would not route back.
pub const DROP_FOREIGN_SOURCE: u32 = 18;

/// Larger than the uplink's MTU with DF set (any IPv6 packet): the client
/// was sent ICMP "fragmentation needed" (ICMPv6 "Packet Too Big") with
/// the uplink's MTU (path MTU discovery).
pub const TOLD_TOO_BIG: u32 = 19;

/// Forwarded with `XDP_REDIRECT`, then dropped by the device map because
/// the target's transmit ring (a veth's: its peer's receive ring) was
/// full. Not a verdict of lb's programs: counted after them, by the ring
/// watch (the `xdp_devmap_xmit` tracepoint), for the devices lb sends to;
/// lbd hands a device's packets to its queue while its ring overflows
/// (see `crate::egress`).
pub const DROP_RING_FULL: u32 = 20;

/// A frame whose outer 802.1Q tag has VID 4095, which the standard
/// reserves and no device sends: lb's own hand-off note
/// (`crate::egress::note`) uses it, so one arriving from outside could
/// only be a forged note.
pub const DROP_RESERVED_VLAN: u32 = 21;

/// An IPv6 frame on a LAN port while `lan_ingress6` was not in its
/// slot (`LAN6`), which lbd fills before it attaches anything: the kernel
/// has it.
pub const PASS_NO_PROGRAM: u32 = 22;

/// A frame marked with lb's hand-off note at its device's tc ingress
/// whose note could not be read or whose tags would not come off: its
/// headers are rewritten already, so it cannot go on to the kernel.
pub const DROP_BAD_NOTE: u32 = 23;

/// Translated, then a later step failed (the new link-layer header, the
/// kernel's checksum helper on a tc path): half rewritten, the packet
/// cannot go on to the kernel, which would take it for another.
pub const DROP_UNFINISHED: u32 = 24;

/// A connection's first packet in a frame addressed to another host's MAC
/// (a second gateway on the LAN: a VPN box or another router the client
/// routes through), seen on a bridge port: the bridge's to forward, never
/// lb's to pin (`maps::RouterMacs`).
pub const PASS_ELSEWHERE: u32 = 25;

/// A new flow found no room in the NAT table (full of the mappings of
/// flows the flow table evicted, until lbd's collector frees them; lbd
/// may not be running): the kernel's slow path NATs it, from the router's
/// own ports, which lb's never are.
pub const PASS_NAT_FULL: u32 = 26;

/// A UDP datagram of a fast-path flow, too big for its uplink and without
/// DF, handed to the kernel to fragment, with the flow's translation (its
/// uplink's address, its NAT port) and uplink written into conntrack
/// first: it leaves as the flow's other datagrams do. (Where that cannot
/// be done, `PASS_TOO_BIG`: the kernel's slow path translates it.)
pub const HANDED_TOO_BIG: u32 = 27;

/// Forwarded with `XDP_REDIRECT`, then dropped by the device map because
/// the target refused the whole flush (the flush's error is set: a veth
/// whose peer is down, a NIC with no XDP transmit queue for this CPU).
/// Counted by the ring watch beside `DROP_RING_FULL`, in the same
/// per-device count; lbd tells a device without carrier (no queue would
/// help) from one whose queue may (see `crate::egress`).
pub const DROP_TARGET_REFUSED: u32 = 28;

/// Number of reasons.
pub const COUNT: u32 = 29;
/// Size of the `REASONS` map: room for reasons to come, so that adding
/// one does not change the pinned map (nor the layout).
pub const CAPACITY: u32 = 32;
const _: () = assert!(COUNT <= CAPACITY);

/// Names for user space, indexed by reason.
pub const NAMES: [&str; COUNT as usize] = [
    "pass_not_ipv4",
    "pass_malformed",
    "pass_fragment",
    "pass_local",
    "pass_ttl",
    "pass_unsupported",
    "pass_uplink_unready",
    "pass_unknown_uplink",
    "drop_no_uplink",
    "drop_redirect_failed",
    "pass_no_mapping",
    "pass_too_big",
    "drop_too_big",
    "drop_nat_exhausted",
    "pass_kernel_connection",
    "pass_policy_kernel",
    "drop_policy",
    "drop_policy_unreachable",
    "drop_foreign_source",
    "told_too_big",
    "drop_ring_full",
    "drop_reserved_vlan",
    "pass_no_program",
    "drop_bad_note",
    "drop_unfinished",
    "pass_elsewhere",
    "pass_nat_full",
    "handed_too_big",
    "drop_target_refused",
];

/// Whether `reason` is a drop: a path that gives up on a packet with a
/// drop reason drops it, with any other it leaves it to the kernel.
pub const fn drops(reason: u32) -> bool {
    matches!(
        reason,
        DROP_NO_UPLINK
            | DROP_REDIRECT_FAILED
            | DROP_TOO_BIG
            | DROP_NAT_EXHAUSTED
            | DROP_POLICY
            | DROP_POLICY_UNREACHABLE
            | DROP_FOREIGN_SOURCE
            | DROP_RING_FULL
            | DROP_TARGET_REFUSED
            | DROP_RESERVED_VLAN
            | DROP_BAD_NOTE
            | DROP_UNFINISHED
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_drops_are_the_reasons_named_drop() {
        for (reason, name) in (0..COUNT).zip(NAMES) {
            assert_eq!(drops(reason), name.starts_with("drop_"), "{name}");
        }
    }
}
