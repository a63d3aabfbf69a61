//! `wan_ingress` for IPv6: replies, and ICMPv6 errors about packets we
//! sent (Packet Too Big above all: IPv6 routers never fragment, so path
//! MTU discovery must work through lb), translated back to the LAN's
//! prefix and sent to their client.
//!
//! A packet is the fast path's only when it belongs to a flow lan6 pinned
//! to this very uplink; everything else (the router's own traffic, a
//! connection from the internet to a LAN host, neighbour discovery, router
//! advertisements) goes to the kernel untouched. Never drops.

use aya_ebpf::programs::XdpContext;
use lb_common::{
    maps::{settings_flags, tcp_state, FlowKey6},
    reason,
};

use crate::{
    clock, egress,
    maps::{FLOWS6, LAN_PORTS, SETTINGS, UPLINKS6},
    parse::{
        self, IcmpHdr, Ipv6Hdr, Ipv6Packet, ETH_P_IPV6, ICMPV6_DEST_UNREACH, ICMPV6_ECHO_REPLY,
        ICMPV6_ECHO_REQUEST, ICMPV6_PACKET_TOO_BIG, ICMPV6_PARAM_PROBLEM, ICMPV6_TIME_EXCEEDED,
        IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, TCP_FIN, TCP_RST, TCP_SYN,
    },
    rewrite, stats,
};

/// A packet that arrived on `uplink`.
#[inline(always)]
pub fn ingress(ctx: &XdpContext, uplink: u32) -> Result<u32, u32> {
    if !SETTINGS
        .get(0)
        .is_some_and(|s| s.flags & settings_flags::IPV6 != 0)
    {
        return Err(reason::PASS_NOT_IPV4);
    }
    let pkt = parse::ipv6(ctx)?;
    // As IPv4's: a tagged frame is the kernel's.
    if pkt.behind_a_tag() {
        return Err(reason::PASS_UNSUPPORTED);
    }
    let six = UPLINKS6.get(uplink).ok_or(reason::PASS_UNKNOWN_UPLINK)?;
    // SAFETY: `parse::ipv6` bounds-checked the IPv6 header.
    let (src, dst, hop_limit) = unsafe { ((*pkt.ip).src, (*pkt.ip).dst, (*pkt.ip).hop_limit) };
    // Only what is addressed into the uplink's prefix can be a reply.
    if !six.back.takes(&dst) {
        return Err(reason::PASS_NO_MAPPING);
    }
    let mut client = dst;
    if !six.back.is_identity() && six.back.apply(&mut client).is_err() {
        return Err(reason::PASS_NO_MAPPING);
    }

    let icmp_kind = if pkt.proto == IPPROTO_ICMPV6 {
        // SAFETY: bounds-checked by `ptr_at`.
        parse::ptr_at::<IcmpHdr>(ctx, pkt.l4_off).map(|h| unsafe { (*h).kind })?
    } else {
        ICMPV6_ECHO_REPLY
    };
    let error = matches!(
        icmp_kind,
        ICMPV6_DEST_UNREACH | ICMPV6_PACKET_TOO_BIG | ICMPV6_TIME_EXCEEDED | ICMPV6_PARAM_PROBLEM
    );
    let (key, quoted) = if error {
        let (key, quoted) = quoted_flow(ctx, &pkt, &client)?;
        (key, Some(quoted))
    } else {
        let (src_port, dst_port) = parse::ports6(ctx, &pkt, ICMPV6_ECHO_REPLY)?;
        // An echo reply carries the client's identifier where a reply
        // carries its port, and has no server port.
        let (client_port, remote_port) = if pkt.proto == IPPROTO_ICMPV6 {
            (src_port, [0, 0])
        } else {
            (dst_port, src_port)
        };
        let key = FlowKey6 {
            src_addr: client,
            dst_addr: src,
            src_port: client_port,
            dst_port: remote_port,
            proto: pkt.proto,
            _pad: [0; 3],
        };
        (key, None)
    };
    let flow = FLOWS6.get_ptr_mut(&key).ok_or(reason::PASS_NO_MAPPING)?;
    // SAFETY: a pointer into the map's value; copied out at once. Racing
    // writers at worst lose an update.
    let back = unsafe { *flow };
    if back.uplink != uplink {
        // Not ours by this uplink: the kernel's (or a flow that moved, whose
        // late answers the new uplink's server address never gets).
        return Err(reason::PASS_NO_MAPPING);
    }
    if hop_limit <= 1 {
        return Err(reason::PASS_TTL);
    }

    // Both rewrites are checksum-neutral: the outer destination is in the
    // pseudo header, the quoted source in the ICMPv6 payload, and each
    // keeps its sum.
    // SAFETY: bounds-checked by `parse::ipv6` and `quoted_flow`.
    unsafe {
        (*pkt.ip).dst = client;
        if let Some(quoted) = quoted {
            (*quoted).src = key.src_addr;
        }
    }
    rewrite::decrement_hop_limit(&pkt);
    let now = clock::now();
    if quoted.is_none() {
        let flags = parse::tcp_flags6(ctx, &pkt);
        // SAFETY: as above.
        unsafe {
            (*flow).last_seen_ns = now;
            if flags & (TCP_FIN | TCP_RST) != 0 {
                (*flow).tcp_state = tcp_state::CLOSING;
            } else if flags & TCP_SYN != 0 && tcp_state::opening((*flow).tcp_state) {
                (*flow).tcp_state = tcp_state::ESTABLISHED;
            }
        }
    }
    rewrite::tagged(
        ctx,
        ETH_P_IPV6,
        back.lan_mac,
        back.client_mac,
        back.vlan_tci,
    )
    .map_err(|_| reason::DROP_UNFINISHED)?;
    // An answer says the path works; an ICMP error says otherwise.
    stats::replied6(uplink, now, quoted.is_none());
    Ok(egress::send(
        ctx,
        back.lan_ifindex,
        uplink,
        // The client's address, folded (`key.src_addr` is `client`).
        key.folded().0.to_be_bytes(),
        || LAN_PORTS.redirect(back.lan_ifindex, 0),
    ))
}

/// The flow an ICMPv6 error is about, from the packet it quotes (which
/// left by this uplink: its source is the client's, translated, as the
/// error's destination is), and the quoted header. `client` is the
/// error's destination translated back.
#[inline(always)]
fn quoted_flow(
    ctx: &XdpContext,
    pkt: &Ipv6Packet,
    client: &[u8; 16],
) -> Result<(FlowKey6, *mut Ipv6Hdr), u32> {
    let ip_off = pkt.l4_off + core::mem::size_of::<IcmpHdr>();
    let quoted: *mut Ipv6Hdr = parse::ptr_at(ctx, ip_off)?;
    // SAFETY: bounds-checked by `ptr_at`, here and below.
    let (src, dst, proto) = unsafe { ((*quoted).src, (*quoted).dst, (*quoted).next_header) };
    // SAFETY: as above.
    let dst_of_error = unsafe { (*pkt.ip).dst };
    if src != dst_of_error {
        return Err(reason::PASS_NO_MAPPING);
    }
    let l4_off = ip_off + core::mem::size_of::<Ipv6Hdr>();
    let (src_port, dst_port) = match proto {
        IPPROTO_TCP | IPPROTO_UDP => {
            // The quote holds as much of the packet as fits in the
            // minimum MTU: the ports are always there.
            let ports: *const [[u8; 2]; 2] = parse::ptr_at(ctx, l4_off)?;
            unsafe { ((*ports)[0], (*ports)[1]) }
        }
        IPPROTO_ICMPV6 => {
            let icmp: *const IcmpHdr = parse::ptr_at(ctx, l4_off)?;
            if unsafe { (*icmp).kind } != ICMPV6_ECHO_REQUEST {
                return Err(reason::PASS_UNSUPPORTED);
            }
            (unsafe { (*icmp).id }, [0, 0])
        }
        _ => return Err(reason::PASS_UNSUPPORTED),
    };
    let key = FlowKey6 {
        src_addr: *client,
        dst_addr: dst,
        src_port,
        dst_port,
        proto,
        _pad: [0; 3],
    };
    Ok((key, quoted))
}
