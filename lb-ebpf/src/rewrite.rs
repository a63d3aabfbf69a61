//! Packet rewriting on the way out: TTL and IP checksum, Ethernet addresses,
//! and the removal of a LAN VLAN tag (uplinks are untagged).
//!
//! Only touches headers `parse` has already bounds-checked, through
//! `parse::ptr_at`; checksum arithmetic is `lb_common::csum`'s.

use core::mem::size_of;

use aya_ebpf::{helpers::bpf_xdp_adjust_head, programs::XdpContext, EbpfContext};
use lb_common::{csum, maps::UplinkInfo, reason};

use crate::parse::{self, EthHdr, Ipv4Packet, VlanHdr, ETH_P_IPV4};

/// Make the packet ready to leave by `uplink`; returns its new length.
#[inline(always)]
pub fn to_uplink(ctx: &XdpContext, pkt: &Ipv4Packet, uplink: &UplinkInfo) -> Result<usize, u32> {
    decrement_ttl(pkt);

    // Write the new Ethernet header where it will start once a VLAN tag, if
    // any, is cut off: 4 bytes further in.
    let eth_off = if pkt.tagged() {
        size_of::<VlanHdr>()
    } else {
        0
    };
    let eth: *mut EthHdr = parse::ptr_at(ctx, eth_off)?;
    // SAFETY: bounds-checked by `ptr_at`.
    unsafe {
        (*eth).dst = uplink.gw_mac;
        (*eth).src = uplink.src_mac;
        (*eth).ether_type = ETH_P_IPV4.to_be_bytes();
    }
    if pkt.tagged() {
        // SAFETY: shrinking the head by the tag's size; the helper checks it.
        if unsafe { bpf_xdp_adjust_head(ctx.as_ptr().cast(), size_of::<VlanHdr>() as i32) } != 0 {
            return Err(reason::PASS_MALFORMED);
        }
    }
    Ok(ctx.data_end() - ctx.data())
}

/// TTL minus one, with the header checksum updated incrementally: the TTL
/// shares a 16-bit word with the protocol number.
#[inline(always)]
fn decrement_ttl(pkt: &Ipv4Packet) {
    let ip = pkt.ip;
    // SAFETY: `parse::ipv4` bounds-checked the IPv4 header.
    unsafe {
        let old = u16::from_be_bytes([(*ip).ttl, (*ip).proto]);
        (*ip).ttl -= 1;
        let new = u16::from_be_bytes([(*ip).ttl, (*ip).proto]);
        let check = csum::replace16(u16::from_be_bytes((*ip).check), old, new);
        (*ip).check = check.to_be_bytes();
    }
}
