//! Link-layer rewriting for forwarding: the IPv6 hop limit (IPv4's TTL
//! goes with the translation's checksum update, `nat`), Ethernet
//! addresses, and removing (towards an uplink) or adding (towards a tagged
//! LAN client) an 802.1Q tag.
//!
//! Called last: after the head moves (`Frame::adjust_head`) every earlier
//! packet pointer is stale, so nothing may touch the packet through one
//! afterwards.

use core::mem::size_of;

use aya_ebpf::programs::XdpContext;
use lb_common::{
    encap::{self, Encap},
    reason,
};

use crate::parse::{self, EthHdr, Frame, Ipv6Packet, VlanHdr, ETH_P_8021Q};

/// Hop limit minus one (IPv6 has no header checksum).
#[inline(always)]
pub fn decrement_hop_limit(pkt: &Ipv6Packet) {
    // SAFETY: `parse::ipv6` bounds-checked the IPv6 header.
    unsafe { (*pkt.ip).hop_limit -= 1 };
}

/// New Ethernet addresses, no VLAN tag (uplinks are untagged), for a
/// frame of `ether_type` that arrived `tagged` or not. Returns the frame's
/// new length.
#[inline(always)]
pub fn untagged(
    ctx: &XdpContext,
    tagged: bool,
    ether_type: u16,
    src: [u8; 6],
    dst: [u8; 6],
) -> Result<usize, u32> {
    // Write the new header where it starts once a tag is cut off.
    let eth_off = if tagged { size_of::<VlanHdr>() } else { 0 };
    let eth: *mut EthHdr = parse::ptr_at(ctx, eth_off)?;
    // SAFETY: bounds-checked by `ptr_at`.
    unsafe {
        (*eth).dst = dst;
        (*eth).src = src;
        (*eth).ether_type = ether_type.to_be_bytes();
    }
    if tagged {
        ctx.adjust_head(size_of::<VlanHdr>() as i32)?;
    }
    Ok(ctx.data_end() - ctx.data())
}

/// The link-layer headers of a wrapped uplink (`encap`: a VLAN tag, a
/// PPPoE session) in front of an IP packet of `ip_len` bytes and
/// `ether_type`, which now starts at `l3_off` (behind the LAN's Ethernet
/// header and maybe a tag). Returns the frame's new length.
#[inline(always)]
pub fn wrapped(
    ctx: &XdpContext,
    l3_off: usize,
    encap: &Encap,
    src: [u8; 6],
    dst: [u8; 6],
    ether_type: u16,
    ip_len: usize,
) -> Result<usize, u32> {
    let header =
        encap::header(encap, src, dst, ether_type, ip_len).ok_or(reason::PASS_MALFORMED)?;
    let len = encap.len();
    ctx.adjust_head(l3_off as i32 - len as i32)?;
    // One fixed-size write per shape: the verifier checks each copy once.
    macro_rules! put {
        ($n:expr) => {{
            let at: *mut [u8; $n] = parse::ptr_at(ctx, 0)?;
            // SAFETY: `at` is bounds-checked by `ptr_at` for $n bytes, and
            // `header` holds at least as many; they cannot overlap (one is
            // on the stack, the other in the packet).
            unsafe { core::ptr::copy_nonoverlapping(header.as_ptr(), at.cast::<u8>(), $n) };
        }};
    }
    match len {
        encap::ETH_LEN => put!(encap::ETH_LEN),
        18 => put!(18),
        22 => put!(22),
        _ => put!(encap::MAX_LEN),
    }
    Ok(ctx.data_end() - ctx.data())
}

/// New Ethernet addresses and, when `tci` is non-zero, an 802.1Q tag (the
/// packet, of `ether_type`, arrives untagged from an uplink, or with no
/// link-layer header at all from an L3 uplink: then the whole header is
/// pushed in front). Returns the new length.
#[inline(always)]
pub fn tagged<C: Frame>(
    ctx: &C,
    ether_type: u16,
    src: [u8; 6],
    dst: [u8; 6],
    tci: [u8; 2],
) -> Result<usize, u32> {
    let tag = if tci != [0, 0] {
        size_of::<VlanHdr>()
    } else {
        0
    };
    let link = if ctx.l3_proto().is_some() {
        size_of::<EthHdr>()
    } else {
        0
    };
    if tag + link != 0 {
        ctx.adjust_head(-((tag + link) as i32))?;
    }
    if tci != [0, 0] {
        let vlan: *mut VlanHdr = parse::ptr_at(ctx, size_of::<EthHdr>())?;
        // SAFETY: bounds-checked by `ptr_at`.
        unsafe {
            (*vlan).tci = tci;
            (*vlan).ether_type = ether_type.to_be_bytes();
        }
    }
    let eth: *mut EthHdr = parse::ptr_at(ctx, 0)?;
    // SAFETY: bounds-checked by `ptr_at`.
    unsafe {
        (*eth).dst = dst;
        (*eth).src = src;
        (*eth).ether_type = if tci != [0, 0] {
            ETH_P_8021Q
        } else {
            ether_type
        }
        .to_be_bytes();
    }
    Ok(ctx.data_end() - ctx.data())
}
