//! `lan_ingress`: packets from clients.
//!
//! Owns the decision "which uplink, and which NAT mapping, does this
//! connection use": look it up in the flow table, or, for a new connection
//! (or one whose uplink died), hash it into a bucket, reserve a NAT port on
//! that bucket's uplink, and pin it. Then translate and send. It never
//! forwards what it did not parse, and never lets a packet out without its
//! translation: no uplink or no free port means a counted drop.

use core::ops::ControlFlow;

use aya_ebpf::{
    bindings::{xdp_md, BPF_NOEXIST},
    maps::lpm_trie::Key,
    programs::XdpContext,
};
use lb_common::{
    encap::Encap,
    hash, icmp,
    maps::{
        settings_flags, tcp_state, uplink_flags, uplink_state, FlowKey, FlowValue, NatKey,
        NatValue, UplinkInfo, TOO_BIG_SLOT,
    },
    mss,
    nat::{self, PORT_ATTEMPTS},
    reason, KERNEL_OWNED, NO_UPLINK,
};

use crate::{
    answer, clock, conntrack, count, egress, frags,
    lan6::{unword, word},
    maps::{BYPASS, ENCAP, FLOWS, NAT_REV, ROUTER_MACS, SETTINGS, TOO_BIG, TX_PORTS, UPLINKS},
    nat::{embedded, translate, translate_icmp_error, End},
    parse::{
        self, EthHdr, Fragment, IcmpHdr, Ipv4Packet, ICMP_ECHO_REQUEST, IPPROTO_ICMP, IPPROTO_TCP,
        IPPROTO_UDP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN,
    },
    policy::{self, tuple, Placement},
    rewrite, stats,
};

/// What a map insert returns when the table has no room (`-E2BIG`).
const E2BIG: i32 = -7;

/// Don't-fragment bit of the IPv4 flags field.
const IP_DF: u16 = 0x4000;

/// `Ok(verdict)` for packets the fast path handled (sent, or dropped with a
/// counted reason), `Err(reason)` for packets the kernel should have.
#[inline(always)]
pub fn ingress(ctx: &XdpContext) -> Result<u32, u32> {
    let pkt = parse::ipv4(ctx)?;
    if is_icmp_error(ctx, &pkt) {
        return unword(forward_icmp_error(ctx.ctx));
    }
    let (src_port, dst_port) = match pkt.fragment {
        Fragment::Later => frags::ports_of(&pkt)?,
        _ => parse::ports(ctx, &pkt, ICMP_ECHO_REQUEST)?,
    };
    let datagram = frags::first(&pkt);
    // SAFETY: `parse::ipv4` bounds-checked the IPv4 header.
    let (src, dst, ttl, total_len, frag) = unsafe {
        (
            (*pkt.ip).src,
            (*pkt.ip).dst,
            (*pkt.ip).ttl,
            (*pkt.ip).total_len,
            (*pkt.ip).frag,
        )
    };
    if ttl <= 1 {
        return Err(reason::PASS_TTL);
    }
    // Broadcast, multicast, link-local, a client without an address yet:
    // the LAN's, never the internet's. Asked before the flow table, so
    // that a flow pinned by an older lb that did not ask lets go at once
    // (a DHCP discover repeats with the same ports); a few compares.
    if lb_common::kernels_scope4(src, dst) {
        return Err(reason::PASS_LOCAL);
    }

    let key = FlowKey {
        src_addr: src,
        dst_addr: dst,
        src_port,
        dst_port,
        proto: pkt.proto,
        _pad: [0; 3],
    };
    let now = clock::now();
    let existing = FLOWS.get_ptr_mut(&key);
    // Destinations the kernel keeps are looked up only for packets of no
    // flow: a flow is only ever made for one it does not keep, so an
    // established packet pays one lookup, not two.
    if existing.is_none() && BYPASS.get(Key::new(32, dst)).is_some() {
        return Err(reason::PASS_LOCAL);
    }
    // Nor is a flow made from a frame the router was not sent (a second
    // gateway's, seen on a bridge port): the bridge forwards it.
    if existing.is_none() && elsewhere(ctx.ctx) {
        return Err(reason::PASS_ELSEWHERE);
    }
    let (uplink, nat_port) = if pkt.fragment == Fragment::Later {
        later_fragment(existing, now)?
    } else {
        match flow(ctx, &pkt, &key, existing, now) {
            Ok(found) => found,
            Err(reason::DROP_POLICY_UNREACHABLE) => {
                return Ok(policy::unreachable(ctx, &pkt).unwrap_or_else(stats::drop))
            }
            Err(pass @ (reason::PASS_POLICY_KERNEL | reason::PASS_NAT_FULL)) => return Err(pass),
            Err(drop_reason) => return Ok(stats::drop(drop_reason)),
        }
    };
    if uplink == KERNEL_OWNED {
        return Err(reason::PASS_KERNEL_CONNECTION);
    }
    let Some(info) = UPLINKS.get(uplink) else {
        return Ok(stats::drop(reason::DROP_NO_UPLINK));
    };
    if u16::from_be_bytes(total_len) > info.mtu {
        // DF: the client is told the uplink's MTU, as the router on a
        // narrower link must (RFC 1191); the kernel would route the
        // packet by its own tables, maybe out of another uplink. Without
        // DF the kernel fragments it: a UDP datagram is handed over with
        // its flow's translation (`handover`); anything else its slow
        // path NATs. Never dropped unheard.
        if u16::from_be_bytes(frag) & IP_DF == 0 && pkt.proto == IPPROTO_UDP {
            // SAFETY: a tail call does not return when it succeeds.
            let _ = unsafe { TOO_BIG.tail_call(ctx, TOO_BIG_SLOT) };
            return Err(reason::PASS_TOO_BIG);
        }
        if u16::from_be_bytes(frag) & IP_DF != 0 {
            let mtu = info.mtu;
            return answer::icmp_error(
                ctx,
                &pkt,
                |quoted, from| icmp::fragmentation_needed(quoted, from, mtu),
                reason::TOLD_TOO_BIG,
            )
            .or(Err(reason::PASS_TOO_BIG));
        }
        return Err(reason::PASS_TOO_BIG);
    }

    if info.flags & uplink_flags::CLAMP_MSS != 0 && pkt.proto == IPPROTO_TCP && pkt.has_l4() {
        crate::mss::clamp(ctx, pkt.l4_off, info.mtu, mss::IPV4_OVERHEAD);
    }
    translate(ctx, &pkt, End::Source, info.addr, nat_port)?;
    if let Some(datagram) = &datagram {
        frags::remember(datagram, src_port, dst_port);
    }
    let len = match wrapping(uplink, info) {
        None => rewrite::untagged(
            ctx,
            pkt.tagged(),
            parse::ETH_P_IPV4,
            info.src_mac,
            info.gw_mac,
        ),
        Some(_) => wrap(
            ctx,
            uplink,
            pkt.l3_off,
            parse::ETH_P_IPV4,
            usize::from(u16::from_be_bytes(total_len)),
        ),
    }
    .map_err(|_| reason::DROP_UNFINISHED)?;
    stats::sent(uplink, now, &key, len);
    Ok(egress::send(ctx, info.ifindex, uplink, src, || {
        TX_PORTS.redirect(uplink, 0)
    }))
}

/// Whether the frame is addressed to another MAC than the router's on
/// its port (`RouterMacs`): a second gateway on the LAN, whose frames a
/// bridge port sees too. A port without an entry (an older lbd wrote
/// none) is served as before. A BPF function of its own, asked on a
/// connection's first packet only: its frame is not added to the caller's.
#[inline(never)]
pub fn elsewhere(ctx: *mut xdp_md) -> bool {
    let ctx = XdpContext::new(ctx);
    let Ok(eth) = parse::ptr_at::<EthHdr>(&ctx, 0) else {
        return false;
    };
    // SAFETY: a map value, read at once; `ptr_at` bounds-checked `eth`.
    unsafe { ROUTER_MACS.get(&(ctx.ingress_ifindex() as u32)) }
        .is_some_and(|macs| !macs.holds(unsafe { &(*eth).dst }))
}

/// Whether `pkt` is an ICMP error (destination unreachable, time
/// exceeded, parameter problem): [`forward_icmp_error`]'s.
#[inline(always)]
fn is_icmp_error(ctx: &XdpContext, pkt: &Ipv4Packet) -> bool {
    if pkt.proto != IPPROTO_ICMP || !pkt.has_l4() {
        return false;
    }
    // SAFETY: bounds-checked by `ptr_at`.
    parse::ptr_at::<IcmpHdr>(ctx, pkt.l4_off).is_ok_and(|h| parse::icmp_error(unsafe { (*h).kind }))
}

/// An ICMP error a client sends about a reply the fast path brought it (a
/// closed port's "port unreachable" to a late answer, a router on the
/// LAN's "fragmentation needed"): translated as its flow's packets are,
/// and sent by its flow's uplink; [`word`]'s encoding of the verdict, or
/// of the reason it is the kernel's. The kernel has no connection of its
/// own for it, so without this lb's guard would drop it at the uplink, as
/// a LAN source. A BPF function of its own: its stack frame is not added
/// to `lan_ingress`'s.
#[inline(never)]
fn forward_icmp_error(ctx: *mut xdp_md) -> i64 {
    let ctx = XdpContext::new(ctx);
    word(parse::ipv4(&ctx).and_then(|pkt| icmp_error_out(&ctx, &pkt)))
}

/// [`forward_icmp_error`]'s work.
#[inline(always)]
fn icmp_error_out(ctx: &XdpContext, pkt: &Ipv4Packet) -> Result<u32, u32> {
    if pkt.fragment != Fragment::Whole {
        return Err(reason::PASS_FRAGMENT);
    }
    let inner = embedded(ctx, pkt)?;
    if inner.proto != IPPROTO_TCP && inner.proto != IPPROTO_UDP {
        return Err(reason::PASS_UNSUPPORTED);
    }
    // SAFETY: `parse::ipv4` bounds-checked the IPv4 header.
    let (dst, ttl, total_len) = unsafe { ((*pkt.ip).dst, (*pkt.ip).ttl, (*pkt.ip).total_len) };
    // To the remote end it is about, as conntrack wants of an error it
    // relates to a connection: a LAN host may not send ICMP elsewhere
    // under the uplink's address. (Its source is not asked: a router on
    // the LAN may be the one that tells.)
    if dst != inner.src {
        return Err(reason::PASS_UNSUPPORTED);
    }
    // The quote is a reply the client got: from the remote end to it.
    let key = FlowKey {
        src_addr: inner.dst,
        dst_addr: inner.src,
        src_port: inner.dst_port,
        dst_port: inner.src_port,
        proto: inner.proto,
        _pad: [0; 3],
    };
    let flow = FLOWS.get_ptr(&key).ok_or(reason::PASS_NO_MAPPING)?;
    // SAFETY: a pointer into the map's value, copied out at once.
    let (uplink, nat_port, epoch) = unsafe { ((*flow).uplink, (*flow).nat_port, (*flow).epoch) };
    if uplink == KERNEL_OWNED {
        return Err(reason::PASS_KERNEL_CONNECTION);
    }
    let info = UPLINKS.get(uplink).ok_or(reason::PASS_NO_MAPPING)?;
    // Its flow moves on its next packet: the error has no mapping now.
    if !uplink_state::keeps_flows(info.state) || epoch != info.epoch as u8 {
        return Err(reason::PASS_NO_MAPPING);
    }
    if ttl <= 1 {
        return Err(reason::PASS_TTL);
    }
    // A long quote may not fit a narrower uplink: the kernel's, as any
    // packet too big.
    if u16::from_be_bytes(total_len) > info.mtu {
        return Err(reason::PASS_TOO_BIG);
    }
    // An uplink that wraps its packets (a VLAN tag, PPPoE) would need
    // `wrap_frame`, whose stack frame does not fit beside this one's.
    if wrapping(uplink, info).is_some() {
        return Err(reason::PASS_UNSUPPORTED);
    }
    translate_icmp_error(ctx, pkt, &inner, End::Source, info.addr, nat_port)?;
    rewrite::untagged(
        ctx,
        pkt.tagged(),
        parse::ETH_P_IPV4,
        info.src_mac,
        info.gw_mac,
    )
    .map_err(|_| reason::DROP_UNFINISHED)?;
    Ok(egress::send(ctx, info.ifindex, uplink, inner.dst, || {
        TX_PORTS.redirect(uplink, 0)
    }))
}

/// [`wrap_frame`], for `lan::ingress`: `Ok` is the frame's new length.
#[inline(always)]
pub fn wrap(
    ctx: &XdpContext,
    uplink: u32,
    l3_off: usize,
    ether_type: u16,
    ip_len: usize,
) -> Result<usize, u32> {
    // Both under 2^16: one word each way.
    let packed = (l3_off as u64) << 32 | u64::from(ether_type) << 16 | (ip_len as u64 & 0xffff);
    let done = wrap_frame(ctx.ctx, uplink, packed);
    usize::try_from(done).map_err(|_| reason::PASS_MALFORMED)
}

/// The headers of wrapped uplink `uplink` (`rewrite::wrapped`) in front of
/// the IP packet at `packed`'s offset (its high word), of `packed`'s
/// EtherType and length (its low words); the frame's new length, or -1.
/// A BPF function of its own, taking and returning scalars: its stack
/// frame is not added to `lan_ingress`'s, which the rules' share the
/// kernel's 512 bytes with.
#[inline(never)]
fn wrap_frame(ctx: *mut xdp_md, uplink: u32, packed: u64) -> i64 {
    let ctx = XdpContext::new(ctx);
    let (l3_off, ether_type, ip_len) = (
        (packed >> 32) as usize,
        (packed >> 16) as u16,
        (packed & 0xffff) as usize,
    );
    let Some(info) = UPLINKS.get(uplink) else {
        return -1;
    };
    let Some(encap) = ENCAP.get(uplink) else {
        return -1;
    };
    match rewrite::wrapped(
        &ctx,
        l3_off,
        encap,
        info.src_mac,
        info.gw_mac,
        ether_type,
        ip_len,
    ) {
        Ok(len) => len as i64,
        Err(_) => -1,
    }
}

/// How uplink `uplink` wraps its packets, when it does (a VLAN tag, a
/// PPPoE session); `None` for plain Ethernet, without a lookup.
#[inline(always)]
pub fn wrapping(uplink: u32, info: &UplinkInfo) -> Option<Encap> {
    if info.flags & uplink_flags::WRAPPED == 0 {
        return None;
    }
    ENCAP.get(uplink).copied().filter(|e| !e.is_empty())
}

/// The uplink and NAT port of this connection: its pinned ones while that
/// uplink keeps flows; otherwise a new choice (`policy::place`), pinned.
/// `existing` is the flow table's entry for it, if any; `now` the coarse
/// clock. `Err` is a drop reason ([`reason::DROP_POLICY_UNREACHABLE`]:
/// answer the client with an ICMP error), or [`reason::PASS_POLICY_KERNEL`]
/// (a pass: a `kernel` rule's new flow).
#[inline(always)]
fn flow(
    ctx: &XdpContext,
    pkt: &Ipv4Packet,
    key: &FlowKey,
    existing: Option<*mut FlowValue>,
    now: u64,
) -> Result<(u32, [u8; 2]), u32> {
    let flags = parse::tcp_flags(ctx, pkt);
    let closing = flags & (TCP_FIN | TCP_RST) != 0;

    // What is placed, and where it may not go. Placing is the one costly
    // step (the rules), so every path below reaches it once, at one place.
    let mut except = NO_UPLINK;
    let mut moving = None;
    if let Some(flow) = existing {
        // SAFETY: a pointer into the map's value. A racing CPU may write the
        // same fields; at worst a timestamp or state update is lost.
        let (pinned, old_port, state) =
            unsafe { ((*flow).uplink, (*flow).nat_port, (*flow).tcp_state) };
        let old_info = UPLINKS.get(pinned);
        // SAFETY: as above.
        let epoch = unsafe { (*flow).epoch };
        let keeps = pinned == KERNEL_OWNED
            || old_info
                .is_some_and(|u| uplink_state::keeps_flows(u.state) && epoch == u.epoch as u8);
        // A SYN again, and still no answer: that uplink may be what fails.
        // Nothing was committed yet, so it may try another one, once.
        let retry = keeps
            && pinned != KERNEL_OWNED
            && tcp_state::opening(state)
            && flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
        if retry {
            stats::syn_retry(pinned);
        }
        let resteer = retry && state == tcp_state::OPENING && resteer_syn();
        if keeps && !resteer {
            unsafe {
                (*flow).last_seen_ns = now;
                if closing {
                    (*flow).tcp_state = tcp_state::CLOSING;
                }
            }
            return Ok((pinned, old_port));
        }
        if resteer {
            except = pinned;
        }
        moving = Some((flow, pinned, old_info, old_port));
    }

    let state = if closing {
        tcp_state::CLOSING
    } else {
        tcp_state::OPENING
    };
    let kernel = FlowValue {
        last_seen_ns: now,
        uplink: KERNEL_OWNED,
        nat_port: [0; 2],
        tcp_state: state,
        epoch: 0,
    };
    if moving.is_none() && kernel_owns(ctx, key) {
        // Remembered for the next packets; if another CPU was first, its
        // entry says the same.
        let _ = FLOWS.insert(key, &kernel, u64::from(BPF_NOEXIST));
        return Ok((KERNEL_OWNED, [0; 2]));
    }
    let placed = policy::place(ctx, pkt, key, except, now);

    if let Some((flow, pinned, old_info, old_port)) = moving {
        // Its uplink is gone, or has another address now, or its SYN goes
        // elsewhere: a new mapping on a live uplink, in place of the old
        // one. The old reverse entry is keyed by the address it was made
        // under, which is the uplink's now only while the epochs agree:
        // after an address change that key would name nothing of this
        // flow's (but maybe its new mapping, or another flow's), and the
        // entry under the old address is left to the collector, as an
        // orphan.
        // SAFETY: as above; the flow's epoch is rewritten only below.
        let old_info = old_info.filter(|u| unsafe { (*flow).epoch } == u.epoch as u8);
        let uplink = match placed {
            Placement::Uplink(uplink) => uplink,
            // A retried SYN with nowhere else to go stays where it is.
            _ if except != NO_UPLINK => {
                unsafe { (*flow).last_seen_ns = now };
                return Ok((pinned, old_port));
            }
            Placement::Kernel => {
                // The rules now leave it to the kernel: its mapping goes,
                // and so does the fast path.
                if let Some(old) = old_info {
                    let _ = NAT_REV.remove(&rev_key(key, old, old_port));
                }
                unsafe {
                    (*flow).uplink = KERNEL_OWNED;
                    (*flow).last_seen_ns = now;
                }
                return Ok((KERNEL_OWNED, [0; 2]));
            }
            Placement::Refused(why) => return Err(why),
            Placement::Unreachable => return Err(reason::DROP_POLICY_UNREACHABLE),
        };
        let (port, epoch) = match reserve_port(ctx, pkt, key, uplink) {
            Ok(found) => found,
            // No room for a new mapping: a retried SYN keeps its place...
            Err(reason::PASS_NAT_FULL) if except != NO_UPLINK => {
                unsafe { (*flow).last_seen_ns = now };
                return Ok((pinned, old_port));
            }
            // ...and a flow that must move goes to the kernel for good,
            // as a `kernel` rule's does, never back to the fast path with
            // a mapping the server has not seen.
            Err(reason::PASS_NAT_FULL) => {
                if let Some(old) = old_info {
                    let _ = NAT_REV.remove(&rev_key(key, old, old_port));
                }
                unsafe {
                    (*flow).uplink = KERNEL_OWNED;
                    (*flow).last_seen_ns = now;
                }
                return Err(reason::PASS_NAT_FULL);
            }
            Err(why) => return Err(why),
        };
        if let Some(old) = old_info {
            let _ = NAT_REV.remove(&rev_key(key, old, old_port));
        }
        unsafe {
            if except != NO_UPLINK {
                (*flow).tcp_state = tcp_state::OPENING_MOVED;
            }
            (*flow).uplink = uplink;
            (*flow).nat_port = port;
            (*flow).epoch = epoch;
            (*flow).last_seen_ns = now;
        }
        stats::uplink(pinned, |s| s.moved_away += 1);
        stats::uplink(uplink, |s| s.new_flows += 1);
        return Ok((uplink, port));
    }

    let uplink = match placed {
        Placement::Uplink(uplink) => uplink,
        Placement::Kernel => {
            // A `kernel` rule: remembered, so that its next packets are
            // not classified again (they count as the kernel's).
            let _ = FLOWS.insert(key, &kernel, u64::from(BPF_NOEXIST));
            return Err(reason::PASS_POLICY_KERNEL);
        }
        Placement::Refused(why) => return Err(why),
        Placement::Unreachable => return Err(reason::DROP_POLICY_UNREACHABLE),
    };
    let (port, epoch) = match reserve_port(ctx, pkt, key, uplink) {
        Ok(found) => found,
        // The kernel's from its first packet on: remembered, so that it
        // stays the kernel's when room comes back.
        Err(reason::PASS_NAT_FULL) => {
            let _ = FLOWS.insert(key, &kernel, u64::from(BPF_NOEXIST));
            return Err(reason::PASS_NAT_FULL);
        }
        Err(why) => return Err(why),
    };
    let value = FlowValue {
        last_seen_ns: now,
        uplink,
        nat_port: port,
        tcp_state: state,
        epoch,
    };
    if FLOWS.insert(key, &value, u64::from(BPF_NOEXIST)).is_err() {
        // Another CPU pinned the same connection first: give back our port
        // and follow its choice, so one connection never has two mappings.
        if let Some(info) = UPLINKS.get(uplink) {
            let _ = NAT_REV.remove(&rev_key(key, info, port));
        }
        // SAFETY: as above.
        return match FLOWS.get_ptr(key) {
            Some(flow) => Ok(unsafe { ((*flow).uplink, (*flow).nat_port) }),
            None => Err(reason::DROP_NAT_EXHAUSTED),
        };
    }
    stats::uplink(uplink, |s| s.new_flows += 1);
    Ok((uplink, port))
}

/// Whether the kernel's conntrack already has `key`'s connection (TCP and
/// UDP: the kinds a port forward carries and conntrack can be asked for).
#[inline(always)]
fn kernel_owns(ctx: &XdpContext, key: &FlowKey) -> bool {
    (key.proto == IPPROTO_TCP || key.proto == IPPROTO_UDP)
        && conntrack::tracks(
            ctx,
            key.proto,
            key.src_addr,
            key.dst_addr,
            key.src_port,
            key.dst_port,
        )
}

/// The uplink and NAT port of the flow a later fragment belongs to: its
/// first fragment pinned it. `Err` (to the kernel) when that flow is gone
/// or has to move: a datagram's fragments never leave by two uplinks.
#[inline(always)]
fn later_fragment(existing: Option<*mut FlowValue>, now: u64) -> Result<(u32, [u8; 2]), u32> {
    let flow = existing.ok_or(reason::PASS_FRAGMENT)?;
    // SAFETY: a pointer into the map's value; see `flow`.
    let (uplink, port, epoch) = unsafe { ((*flow).uplink, (*flow).nat_port, (*flow).epoch) };
    let info = UPLINKS.get(uplink).ok_or(reason::PASS_FRAGMENT)?;
    if !uplink_state::keeps_flows(info.state) || epoch != info.epoch as u8 {
        return Err(reason::PASS_FRAGMENT);
    }
    // SAFETY: as above.
    unsafe { (*flow).last_seen_ns = now };
    Ok((uplink, port))
}

/// The reverse-table key of `key`'s replies on `uplink` with `port`.
#[inline(always)]
fn rev_key(key: &FlowKey, uplink: &UplinkInfo, port: [u8; 2]) -> NatKey {
    NatKey {
        nat_addr: uplink.addr,
        remote_addr: key.dst_addr,
        nat_port: port,
        remote_port: key.dst_port,
        proto: key.proto,
        _pad: [0; 3],
    }
}

/// Claim a NAT port on `uplink` for `key` by inserting its reverse entry;
/// the insert is atomic, so two flows (on two CPUs) can never claim the
/// same mapping. Returns the port and the uplink's address epoch (low 8
/// bits) the mapping was made under.
#[inline(always)]
fn reserve_port(
    ctx: &XdpContext,
    pkt: &Ipv4Packet,
    key: &FlowKey,
    uplink: u32,
) -> Result<([u8; 2], u8), u32> {
    let settings = SETTINGS.get(0).ok_or(reason::DROP_NAT_EXHAUSTED)?;
    let info = UPLINKS.get(uplink).ok_or(reason::DROP_NO_UPLINK)?;
    let eth: *const EthHdr = parse::ptr_at(ctx, 0)?;
    // SAFETY: bounds-checked by `ptr_at`.
    let (client_mac, lan_mac) = unsafe { ((*eth).src, (*eth).dst) };
    let value = NatValue {
        client_addr: key.src_addr,
        client_port: key.src_port,
        vlan_tci: pkt.vlan_tci,
        client_mac,
        lan_mac,
        lan_ifindex: ctx.ingress_ifindex() as u32,
        uplink,
        touched: 0,
    };
    // Where in the NAT range this flow starts looking: a second, differently
    // keyed hash of the connection.
    let spread = hash::classify(
        settings.seed ^ 0x9e37_79b9,
        hash::mode::FIVE_TUPLE,
        &tuple(key),
    );
    let client_port = u16::from_be_bytes(key.src_port);
    // The client's own port is kept only while the router holds no
    // connection of its own from it to the same remote end (its
    // WireGuard, IKE or NTP sockets keep fixed ports, outside its local
    // range): that connection's answers would be taken for the client's.
    let own_port_taken = nat::candidate(0, client_port, spread, settings).is_some()
        && (key.proto == IPPROTO_TCP || key.proto == IPPROTO_UDP)
        && conntrack::tracks_in_own_frame(
            ctx.ctx,
            key.proto,
            info.addr,
            key.dst_addr,
            u32::from_be_bytes([
                key.src_port[0],
                key.src_port[1],
                key.dst_port[0],
                key.dst_port[1],
            ]),
        );
    // In a loop the verifier checks once, rather than once a turn.
    let mut claimed = None;
    let mut full = false;
    count::up_to(PORT_ATTEMPTS, |i| {
        if i == 0 && own_port_taken {
            return ControlFlow::Continue(());
        }
        let Some(port) = nat::candidate(i, client_port, spread, settings) else {
            return ControlFlow::Continue(());
        };
        let port = port.to_be_bytes();
        match NAT_REV.insert(&rev_key(key, info, port), &value, u64::from(BPF_NOEXIST)) {
            Ok(()) => {
                claimed = Some(port);
                ControlFlow::Break(())
            }
            // No room in the table at all (mappings of evicted flows wait
            // for lbd's collector, which may not be running): no port will
            // do.
            Err(E2BIG) => {
                full = true;
                ControlFlow::Break(())
            }
            Err(_) => ControlFlow::Continue(()),
        }
    });
    match claimed {
        Some(port) => Ok((port, info.epoch as u8)),
        // The kernel's slow path NATs it, from ports lb never uses: the
        // office stays online whatever the table holds.
        None if full => Err(reason::PASS_NAT_FULL),
        None => {
            stats::uplink(uplink, |s| s.nat_failures += 1);
            Err(reason::DROP_NAT_EXHAUSTED)
        }
    }
}

/// Whether a retried SYN may move (`[passive] resteer_syn`).
#[inline(always)]
fn resteer_syn() -> bool {
    SETTINGS
        .get(0)
        .is_some_and(|s| s.flags & settings_flags::RESTEER_SYN != 0)
}
