//! ICMP errors the data plane sends a client itself, back out of the LAN
//! port its packet came in on: "host unreachable" for a new
//! flow its policy refuses, "fragmentation needed" for a packet with DF
//! set that is too big for its uplink (for IPv6, "Packet Too Big"). The headers come from
//! `lb_common::icmp`; this module only makes room for them in the frame.
//!
//! Untagged frames with an option-less IPv4 header (or an IPv6 header)
//! only: for others it gives up (`Err`), and the caller drops or passes
//! the packet. IPv6 clients get ICMPv6 "address unreachable" and "Packet
//! Too Big".
//!
//! Sent by `XDP_REDIRECT` to the port, as replies are, not `XDP_TX`: a
//! veth delivers what `XDP_TX` sends only when something else wakes its
//! peer (it kicks the peer's NAPI for a peer with an XDP program alone),
//! while a redirect flushes; a NIC takes either.

use aya_ebpf::{
    bindings::xdp_action::XDP_REDIRECT,
    helpers::{bpf_csum_diff, bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
    EbpfContext,
};
use lb_common::{csum, icmp, reason};

use crate::{
    maps::LAN_PORTS,
    parse::{self, EthHdr, Ipv4Packet, Ipv6Hdr},
    policy, stats,
};

/// Turn the frame into the ICMP error whose headers `headers` makes from
/// the packet's quote and the router's address, from the router to the
/// client, counted as `reason`. `Err(reason)`, the frame untouched, when
/// it cannot be made; once the frame is changed, a failure drops it.
#[inline(always)]
pub fn icmp_error(
    ctx: &XdpContext,
    pkt: &Ipv4Packet,
    headers: impl FnOnce(&[u8; icmp::QUOTED_LEN], [u8; 4]) -> [u8; icmp::HEADERS_LEN],
    reason: u32,
) -> Result<u32, u32> {
    const ETH: usize = core::mem::size_of::<EthHdr>();
    if pkt.tagged() || pkt.l3_off != ETH || pkt.l4_off != ETH + icmp::IPV4_HDR_LEN {
        return Err(reason);
    }
    let eth: *const EthHdr = parse::ptr_at(ctx, 0).map_err(|_| reason)?;
    let quoted: *const [u8; icmp::QUOTED_LEN] = parse::ptr_at(ctx, ETH).map_err(|_| reason)?;
    // SAFETY: both bounds-checked by `ptr_at`.
    let (client_mac, router_mac, quoted) = unsafe { ((*eth).src, (*eth).dst, *quoted) };
    let port = ctx.ingress_ifindex() as u32;
    // Chosen first: after this the frame is the error, or nothing.
    if LAN_PORTS.redirect(port, 0) != Ok(XDP_REDIRECT) {
        return Err(reason);
    }
    let from = match policy::lan_port(port).map(|p| p.addr) {
        Some(addr) if addr != [0; 4] => addr,
        // The router's address there is unknown: the error comes from
        // where the client was going, which its stack accepts as well.
        _ => [quoted[16], quoted[17], quoted[18], quoted[19]],
    };
    let front = headers(&quoted, from);

    // Grow the front by the two new headers: the old Ethernet header and
    // the quote then sit right behind them, where the error needs them.
    // (Written out here rather than through [`rebuild`]: so inlined,
    // lan_ingress's stack frame stays within what the verifier allows
    // beside the rules' function.)
    // SAFETY: the helper checks the room it is asked for.
    if unsafe { bpf_xdp_adjust_head(ctx.as_ptr() as *mut _, -(icmp::HEADERS_LEN as i32)) } != 0 {
        return Err(reason);
    }
    let len = ctx.data_end() - ctx.data();
    let want = ETH + icmp::ERROR_LEN;
    if len < want {
        return Ok(stats::drop(reason));
    }
    // SAFETY: shrinking by what is past the quote, checked above.
    if unsafe { bpf_xdp_adjust_tail(ctx.as_ptr() as *mut _, -((len - want) as i32)) } != 0 {
        return Ok(stats::drop(reason));
    }
    let (Ok(new_eth), Ok(out)) = (
        parse::ptr_at::<EthHdr>(ctx, 0),
        parse::ptr_at::<[u8; icmp::HEADERS_LEN]>(ctx, ETH),
    ) else {
        return Ok(stats::drop(reason));
    };
    // SAFETY: bounds-checked by `ptr_at`.
    unsafe {
        (*new_eth).dst = client_mac;
        (*new_eth).src = router_mac;
        (*new_eth).ether_type = parse::ETH_P_IPV4.to_be_bytes();
        *out = front;
    }
    stats::count(reason);
    Ok(XDP_REDIRECT)
}

/// `fallback = unreachable` for an IPv6 client: its new flow is refused
/// with an ICMPv6 "address unreachable" from where it was going (the
/// router may have no address on the client's prefix it could use),
/// back out of its port; when that cannot be made, a counted drop. The
/// body of program `lan_unreachable6`: `lan_ingress6`'s frame has no room
/// for the quote.
#[inline(always)]
pub fn unreachable6(ctx: &XdpContext) -> u32 {
    icmp6_error(
        ctx,
        icmp::address_unreachable6,
        reason::DROP_POLICY_UNREACHABLE,
    )
    .unwrap_or_else(stats::drop)
}

/// As [`icmp_error`], for an untagged IPv6 frame: the error whose headers
/// `headers` makes from the quote's sum, the client's address and where
/// it was going (the error's source: the router may have no address on
/// the client's prefix).
#[inline(always)]
pub fn icmp6_error(
    ctx: &XdpContext,
    headers: impl FnOnce(u32, [u8; 16], [u8; 16]) -> [u8; icmp::HEADERS6_LEN],
    reason: u32,
) -> Result<u32, u32> {
    const ETH: usize = core::mem::size_of::<EthHdr>();
    let eth: *const EthHdr = parse::ptr_at(ctx, 0).map_err(|_| reason)?;
    let ip: *const Ipv6Hdr = parse::ptr_at(ctx, ETH).map_err(|_| reason)?;
    let quoted: *const [u8; icmp::QUOTED6_LEN] = parse::ptr_at(ctx, ETH).map_err(|_| reason)?;
    // SAFETY: all bounds-checked by `ptr_at`.
    let (client_mac, router_mac, ether_type, client, server) = unsafe {
        (
            (*eth).src,
            (*eth).dst,
            (*eth).ether_type,
            (*ip).src,
            (*ip).dst,
        )
    };
    if u16::from_be_bytes(ether_type) != parse::ETH_P_IPV6 {
        return Err(reason);
    }
    // The kernel sums the quote where it is (whole 32-bit words, in the
    // machine's order: folded, then read as big-endian words).
    // SAFETY: the helper reads the 48 bytes `ptr_at` checked.
    let wsum = unsafe {
        bpf_csum_diff(
            core::ptr::null_mut(),
            0,
            quoted as *mut u32,
            icmp::QUOTED6_LEN as u32,
            0,
        )
    };
    if wsum < 0 {
        return Err(reason);
    }
    let folded = csum::fold(wsum as u32);
    let quote_sum = u32::from(if cfg!(target_endian = "little") {
        folded.swap_bytes()
    } else {
        folded
    });
    if LAN_PORTS.redirect(ctx.ingress_ifindex() as u32, 0) != Ok(XDP_REDIRECT) {
        return Err(reason);
    }
    let front = headers(quote_sum, client, server);
    rebuild(
        ctx,
        (client_mac, router_mac),
        parse::ETH_P_IPV6,
        &front,
        icmp::ERROR6_LEN,
        reason,
    )
}

/// Make the frame the error: grow its front by `front` (the old Ethernet
/// header and the quote then sit right behind it, where the error needs
/// them), cut it `error_len` past the Ethernet header, and write the new
/// Ethernet header (back to the client) and `front`. Counted as `reason`;
/// once the frame is changed, a failure drops it.
#[inline(always)]
fn rebuild<const N: usize>(
    ctx: &XdpContext,
    (client_mac, router_mac): ([u8; 6], [u8; 6]),
    ether_type: u16,
    front: &[u8; N],
    error_len: usize,
    reason: u32,
) -> Result<u32, u32> {
    const ETH: usize = core::mem::size_of::<EthHdr>();
    // SAFETY: the helper checks the room it is asked for.
    if unsafe { bpf_xdp_adjust_head(ctx.as_ptr() as *mut _, -(N as i32)) } != 0 {
        return Err(reason);
    }
    let len = ctx.data_end() - ctx.data();
    let want = ETH + error_len;
    if len < want {
        return Ok(stats::drop(reason));
    }
    // SAFETY: shrinking by what is past the quote, checked above.
    if unsafe { bpf_xdp_adjust_tail(ctx.as_ptr() as *mut _, -((len - want) as i32)) } != 0 {
        return Ok(stats::drop(reason));
    }
    let (Ok(new_eth), Ok(out)) = (
        parse::ptr_at::<EthHdr>(ctx, 0),
        parse::ptr_at::<[u8; N]>(ctx, ETH),
    ) else {
        return Ok(stats::drop(reason));
    };
    // SAFETY: bounds-checked by `ptr_at`.
    unsafe {
        (*new_eth).dst = client_mac;
        (*new_eth).src = router_mac;
        (*new_eth).ether_type = ether_type.to_be_bytes();
        *out = *front;
    }
    stats::count(reason);
    Ok(XDP_REDIRECT)
}
