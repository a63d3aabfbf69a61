//! Fragments: a datagram's later fragments carry no ports, so the fast
//! path remembers the ports of each first fragment it translates, by the
//! datagram's (source, destination, identification, protocol), and
//! translates the later ones as their first one was (cilium's IPv4
//! fragment tracking does the same). Both ways: `lan` for what clients
//! send, `wan` for what comes back.
//!
//! Owns the `FRAGMENTS` map's keys and values. A later fragment whose first one
//! the fast path did not translate, or translated longer ago than a
//! datagram lives ([`lb_common::maps::FRAGMENT_LIFETIME_NS`]: its identification may be
//! another datagram's by now), is not its business: it goes to the
//! kernel, which reassembles it with its first piece (that one went to the
//! kernel too), or drops it when that never comes; lb's nftables guard
//! keeps it from ever leaving un-NATed.

use lb_common::{
    maps::{FragKey, FragValue},
    reason,
};

use crate::{
    clock,
    maps::FRAGMENTS,
    parse::{Fragment, Ipv4Packet, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP},
};

/// The datagram `pkt` belongs to, as its fragments carry it.
#[inline(always)]
fn key(pkt: &Ipv4Packet) -> FragKey {
    // SAFETY: `parse::ipv4` bounds-checked the IPv4 header.
    let (src_addr, dst_addr, id) = unsafe { ((*pkt.ip).src, (*pkt.ip).dst, (*pkt.ip).id) };
    FragKey {
        src_addr,
        dst_addr,
        id,
        proto: pkt.proto,
        _pad: 0,
    }
}

/// The ports of the datagram a later fragment belongs to; `Err` (to the
/// kernel) when its first fragment was not translated here.
#[inline(always)]
pub fn ports_of(pkt: &Ipv4Packet) -> Result<([u8; 2], [u8; 2]), u32> {
    if !matches!(pkt.proto, IPPROTO_TCP | IPPROTO_UDP | IPPROTO_ICMP) {
        return Err(reason::PASS_FRAGMENT);
    }
    // SAFETY: a lookup; the value is copied out at once.
    match unsafe { FRAGMENTS.get(&key(pkt)).copied() } {
        Some(v) if v.current(clock::now()) => Ok((v.src_port, v.dst_port)),
        _ => Err(reason::PASS_FRAGMENT),
    }
}

/// The datagram of a first fragment, taken before translation; `None`
/// for anything else.
#[inline(always)]
pub fn first(pkt: &Ipv4Packet) -> Option<FragKey> {
    (pkt.fragment == Fragment::First).then(|| key(pkt))
}

/// After the first fragment of `datagram` was translated: remember its
/// ports (as it arrived) for the later ones.
#[inline(always)]
pub fn remember(datagram: &FragKey, src_port: [u8; 2], dst_port: [u8; 2]) {
    // A full table evicts the oldest datagram: losing one is what a full
    // reassembly queue does too.
    let value = FragValue {
        seen_ns: clock::now(),
        src_port,
        dst_port,
        _pad: [0; 4],
    };
    let _ = FRAGMENTS.insert(datagram, &value, 0);
}
