//! `wan_ingress`: packets arriving on an uplink.
//!
//! Owns the way back: a reply (or an ICMP error about a packet we sent)
//! that matches a NAT mapping is translated to its client and sent out of
//! the client's LAN interface. Everything else, above all the router's own
//! traffic (its probes, SSH, routing protocols), goes to the kernel
//! untouched: this program never drops.
//!
//! The same translation serves L3 uplinks (tunnels, raw-IP modems), whose
//! packets have no Ethernet header and reach lb at tc ingress rather than
//! in XDP ([`ingress_l3`]): it pushes the LAN's Ethernet header in front
//! and sends the packet out of the client's LAN port.

use aya_ebpf::{
    bindings::{xdp_action::XDP_PASS, TC_ACT_OK, TC_ACT_SHOT},
    programs::{TcContext, XdpContext},
};
use lb_common::{
    encap::{self, Encap},
    maps::{reply_tick, tcp_state, FlowKey, NatKey},
    reason, IFINDEX_SLOTS,
};

use crate::{
    clock, egress, frags,
    maps::{FLOWS, LAN_PORTS, NAT_REV, UPLINKS, UPLINK_AT_IFINDEX, UPLINK_BY_IFINDEX},
    nat::{self, End},
    parse::{
        self, Fragment, Frame, IcmpHdr, Inner, L3Packet, ICMP_ECHO_REPLY, IPPROTO_ICMP, TCP_FIN,
        TCP_RST, TCP_SYN,
    },
    rewrite, stats,
};

#[inline(always)]
pub fn ingress(ctx: &XdpContext) -> Result<u32, u32> {
    let uplink = arrived(ctx.ingress_ifindex() as u32, ctx)?;
    let info = UPLINKS.get(uplink).ok_or(reason::PASS_UNKNOWN_UPLINK)?;
    if let Some(encap) = crate::lan::wrapping(uplink, info) {
        return ingress_wrapped(ctx, uplink, &encap);
    }
    if parse::ether_type(ctx) == parse::ETH_P_IPV6 {
        return crate::wan6::ingress(ctx, uplink);
    }
    let back = translate(ctx, uplink)?;
    Ok(egress::send(
        ctx,
        back.lan_ifindex,
        uplink,
        back.client_addr,
        || LAN_PORTS.redirect(back.lan_ifindex, 0),
    ))
}

/// A frame on a wrapped uplink (a VLAN tag, a PPPoE session): the IP
/// packet inside it, translated as on any uplink, leaves with the LAN's
/// Ethernet header in place of the uplink's. A frame that is not this
/// uplink's session (PPPoE discovery, LCP, another VLAN) and IPv6 are the
/// kernel's, untouched.
#[inline(always)]
fn ingress_wrapped(ctx: &XdpContext, uplink: u32, encap: &Encap) -> Result<u32, u32> {
    let head: *const [u8; encap::MAX_LEN] = parse::ptr_at(ctx, 0)?;
    // SAFETY: bounds-checked by `ptr_at`.
    let head = unsafe { *head };
    let (off, proto) = encap::inner(encap, &head).ok_or(reason::PASS_UNSUPPORTED)?;
    if proto != parse::ETH_P_IPV4 {
        return Err(reason::PASS_NOT_IPV4);
    }
    let back = translate(&Inner::new(ctx, off, proto), uplink)?;
    Ok(egress::send(
        ctx,
        back.lan_ifindex,
        uplink,
        back.client_addr,
        || LAN_PORTS.redirect(back.lan_ifindex, 0),
    ))
}

/// tc ingress of an L3 uplink: a reply is translated, given the LAN's
/// Ethernet header and sent out of its client's LAN port (through that
/// port's qdisc). Everything else goes on to the kernel as it came.
/// IPv6 over L3 uplinks is the kernel's.
#[inline(always)]
pub fn ingress_l3(ctx: &TcContext) -> i32 {
    // SAFETY: reading the context's field.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let Some(pkt) = L3Packet::of(ctx) else {
        stats::count(reason::PASS_NOT_IPV4);
        return TC_ACT_OK;
    };
    let sent = arrived(ifindex, &pkt).and_then(|uplink| {
        if pkt.l3_proto() == Some(parse::ETH_P_IPV6) {
            return Err(reason::PASS_NOT_IPV4);
        }
        let back = translate(&pkt, uplink)?;
        Ok(egress::send_tc(
            ctx,
            back.lan_ifindex,
            uplink,
            back.client_addr,
        ))
    });
    sent.unwrap_or_else(|reason| {
        stats::count(reason);
        if reason::drops(reason) {
            TC_ACT_SHOT
        } else {
            TC_ACT_OK
        }
    })
}

/// Uplink on `ifindex`, with the packet counted.
#[inline(always)]
fn arrived<C: Frame>(ifindex: u32, ctx: &C) -> Result<u32, u32> {
    let uplink = if ifindex < IFINDEX_SLOTS {
        UPLINK_AT_IFINDEX
            .get(ifindex)
            .and_then(|&n| n.checked_sub(1))
    } else {
        // SAFETY: a plain lookup; the value is copied out at once.
        unsafe { UPLINK_BY_IFINDEX.get(&ifindex) }.copied()
    }
    .ok_or(reason::PASS_UNKNOWN_UPLINK)?;
    let len = (ctx.data_end() - ctx.data()) as u64;
    stats::uplink(uplink, |s| {
        s.rx_packets += 1;
        s.rx_bytes += len;
    });
    Ok(uplink)
}

/// Where a translated reply goes.
struct Back {
    lan_ifindex: u32,
    client_addr: [u8; 4],
}

/// Translate an IPv4 reply (or an ICMP error about a packet we sent) that
/// arrived on `uplink` back to its client, with the client's link-layer
/// header; `Err` is the reason to leave it to the kernel.
#[inline(always)]
fn translate<C: Frame>(ctx: &C, uplink: u32) -> Result<Back, u32> {
    let pkt = parse::ipv4(ctx)?;
    // A tag still on the frame (an ISP's priority tag, VLAN 0): the
    // rewrite below writes an untagged header, so the kernel's.
    if pkt.behind_a_tag() {
        return Err(reason::PASS_UNSUPPORTED);
    }
    let info = UPLINKS.get(uplink).ok_or(reason::PASS_UNKNOWN_UPLINK)?;
    // SAFETY: `parse::ipv4` bounds-checked the IPv4 header.
    let (src, dst, ttl) = unsafe { ((*pkt.ip).src, (*pkt.ip).dst, (*pkt.ip).ttl) };
    if dst != info.addr {
        return Err(reason::PASS_NO_MAPPING);
    }

    // An ICMP error quotes the packet we sent: its source is our mapping.
    let icmp_kind = if pkt.proto == IPPROTO_ICMP && pkt.has_l4() {
        // SAFETY: bounds-checked by `ptr_at`.
        parse::ptr_at::<IcmpHdr>(ctx, pkt.l4_off).map(|h| unsafe { (*h).kind })?
    } else {
        ICMP_ECHO_REPLY
    };
    let error = parse::icmp_error(icmp_kind);
    if error && pkt.fragment != Fragment::Whole {
        // Errors are small; a fragmented one is not worth a fast path.
        return Err(reason::PASS_FRAGMENT);
    }
    let datagram = frags::first(&pkt);
    let (key, inner) = if error {
        let inner = nat::embedded(ctx, &pkt)?;
        if inner.src != info.addr {
            return Err(reason::PASS_NO_MAPPING);
        }
        let key = NatKey {
            nat_addr: inner.src,
            remote_addr: inner.dst,
            nat_port: inner.src_port,
            remote_port: inner.dst_port,
            proto: inner.proto,
            _pad: [0; 3],
        };
        (key, Some(inner))
    } else {
        let (src_port, dst_port) = match pkt.fragment {
            Fragment::Later => frags::ports_of(&pkt)?,
            _ => parse::ports(ctx, &pkt, ICMP_ECHO_REPLY)?,
        };
        if let Some(datagram) = &datagram {
            // Remembered before the mapping is looked up: the later
            // fragments of a datagram for the router itself find no mapping
            // either, and go to the kernel with their first one.
            frags::remember(datagram, src_port, dst_port);
        }
        // An echo reply carries our identifier where a reply would carry
        // our port, and has no server port.
        let (nat_port, remote_port) = if pkt.proto == IPPROTO_ICMP {
            (src_port, [0, 0])
        } else {
            (dst_port, src_port)
        };
        let key = NatKey {
            nat_addr: dst,
            remote_addr: src,
            nat_port,
            remote_port,
            proto: pkt.proto,
            _pad: [0; 3],
        };
        (key, None)
    };
    let Some(mapping) = NAT_REV.get_ptr_mut(&key) else {
        return Err(reason::PASS_NO_MAPPING);
    };
    // SAFETY: a pointer into the map's value, copied out at once (its
    // `touched` is written below; racing writers at worst both refresh).
    let back = unsafe { *mapping };
    if ttl <= 1 {
        return Err(reason::PASS_TTL);
    }

    let flags = parse::tcp_flags(ctx, &pkt);
    // A translation that fails has written nothing: such a packet (its
    // transport header cut short) goes to the kernel as it came.
    match &inner {
        Some(inner) => nat::translate_icmp_error(
            ctx,
            &pkt,
            inner,
            End::Destination,
            back.client_addr,
            back.client_port,
        )?,
        None => nat::translate(
            ctx,
            &pkt,
            End::Destination,
            back.client_addr,
            back.client_port,
        )?,
    }
    let now = clock::now();
    if inner.is_none() {
        // The flow's entry, at most once a tick, or when the flags move
        // its state: an established reply then costs no lookup of it.
        let tick = reply_tick(now);
        if tick != back.touched || flags & (TCP_SYN | TCP_FIN | TCP_RST) != 0 {
            touch_flow(&key, back.client_addr, back.client_port, flags, now);
            // SAFETY: as above.
            unsafe { (*mapping).touched = tick };
        }
    }
    rewrite::tagged(
        ctx,
        parse::ETH_P_IPV4,
        back.lan_mac,
        back.client_mac,
        back.vlan_tci,
    )
    .map_err(|_| reason::DROP_UNFINISHED)?;
    // An answer says the path works; an ICMP error says otherwise.
    stats::replied(uplink, now, inner.is_none());
    Ok(Back {
        lan_ifindex: back.lan_ifindex,
        client_addr: back.client_addr,
    })
}

/// A reply keeps its flow alive and moves its TCP state along.
#[inline(always)]
fn touch_flow(key: &NatKey, client_addr: [u8; 4], client_port: [u8; 2], flags: u8, now: u64) {
    let flow_key = FlowKey {
        src_addr: client_addr,
        dst_addr: key.remote_addr,
        src_port: client_port,
        dst_port: key.remote_port,
        proto: key.proto,
        _pad: [0; 3],
    };
    let Some(flow) = FLOWS.get_ptr_mut(&flow_key) else {
        return;
    };
    // SAFETY: a pointer into the map's value; racing writers at worst lose
    // an update.
    unsafe {
        (*flow).last_seen_ns = now;
        if flags & (TCP_FIN | TCP_RST) != 0 {
            (*flow).tcp_state = tcp_state::CLOSING;
        } else if flags & TCP_SYN != 0 && tcp_state::opening((*flow).tcp_state) {
            (*flow).tcp_state = tcp_state::ESTABLISHED;
        }
    }
}

// Replies the fast path does not handle go to the kernel as they are.
const _: u32 = XDP_PASS;
