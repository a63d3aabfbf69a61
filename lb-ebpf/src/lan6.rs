//! `lan_ingress` for IPv6: packets from clients, steered per connection
//! as IPv4 ones are, and sent with their source prefix translated (NPTv6,
//! `lb_common::npt`) unless they leave by the uplink whose prefix the LAN
//! carries.
//!
//! Owns the IPv6 flow table's entries from the LAN side. There is no port
//! to reserve: the translation is stateless and one-to-one, so a flow's
//! uplink is all it pins. It never sends a packet whose source is outside
//! the LAN's prefix (a counted drop), never translates what the kernel
//! owns (link-local, multicast, the router's and routed destinations,
//! connections conntrack tracks), and leaves everything it did not parse
//! to the kernel.

use aya_ebpf::{
    bindings::{xdp_md, BPF_NOEXIST},
    maps::lpm_trie::Key,
    programs::XdpContext,
};
use lb_common::{
    icmp,
    maps::{settings_flags, tcp_state, uplink_flags, uplink_state, FlowKey6, FlowValue6},
    reason, KERNEL_OWNED, NO_UPLINK,
};

use crate::{
    answer, clock, conntrack, egress,
    maps::{BYPASS6, FLOWS6, SETTINGS, TX_PORTS, UPLINKS, UPLINKS6},
    parse::{
        self, EthHdr, ETH_P_IPV6, ICMPV6_ECHO_REQUEST, IPPROTO_TCP, IPPROTO_UDP, TCP_FIN, TCP_RST,
    },
    policy::{self, Placement},
    rewrite, stats,
};

/// Length of the fixed IPv6 header, which the MTU counts.
const IPV6_HDR_LEN: u32 = 40;
/// The smallest MTU an IPv6 link may have (RFC 8200).
const IPV6_MIN_MTU: u32 = 1280;

/// What [`ingress`] returns for a new flow its policy refuses with
/// `fallback = unreachable`: not a verdict (those are 0-4), but "answer
/// the client": `lan_ingress6` tail-calls `lan_unreachable6`.
pub const ANSWER_UNREACHABLE: u32 = u32::MAX;

/// What [`ingress`] returns for a packet too big for its flow's uplink:
/// "tell the client" (Packet Too Big): `lan_ingress6` tail-calls
/// `lan_too_big6` ([`too_big`]), as its frame has no room for the quote.
pub const ANSWER_TOO_BIG: u32 = u32::MAX - 1;

/// As `lan::ingress`: `Ok(verdict)` for packets the fast path handled,
/// `Err(reason)` for the kernel's.
#[inline(always)]
pub fn ingress(ctx: &XdpContext) -> Result<u32, u32> {
    if !balanced() {
        return Err(reason::PASS_NOT_IPV4);
    }
    let pkt = parse::ipv6(ctx)?;
    let ip = pkt.ip;
    // SAFETY: `parse::ipv6` bounds-checked the IPv6 header. The addresses
    // are read straight into the key: 16-byte copies are what fills the
    // BPF stack.
    let mut key = FlowKey6 {
        src_addr: unsafe { (*ip).src },
        dst_addr: unsafe { (*ip).dst },
        src_port: [0; 2],
        dst_port: [0; 2],
        proto: pkt.proto,
        _pad: [0; 3],
    };
    // Neighbour discovery, router solicitations, multicast, anything
    // link-local: the router's business. Never in the flow table, so a
    // packet of a flow need not be asked (only a miss, and what the fast
    // path does not parse).
    let kernels = |key: &FlowKey6| {
        lb_common::kernels_scope6(&key.src_addr) || lb_common::kernels_scope6(&key.dst_addr)
    };
    (key.src_port, key.dst_port) = match parse::ports6(ctx, &pkt, ICMPV6_ECHO_REQUEST) {
        Ok(ports) => ports,
        Err(_) if kernels(&key) => return Err(reason::PASS_LOCAL),
        Err(e) => return Err(e),
    };
    if unsafe { (*ip).hop_limit } <= 1 {
        return Err(reason::PASS_TTL);
    }
    let now = clock::now();
    let existing = FLOWS6.get_ptr_mut(&key);
    if existing.is_none() && (kernels(&key) || BYPASS6.get(Key::new(128, key.dst_addr)).is_some()) {
        return Err(reason::PASS_LOCAL);
    }
    if existing.is_none() && crate::lan::elsewhere(ctx.ctx) {
        return Err(reason::PASS_ELSEWHERE);
    }
    let closing = parse::tcp_flags6(ctx, &pkt) & (TCP_FIN | TCP_RST) != 0;
    let uplink = match existing.and_then(|flow| kept(flow, closing, now)) {
        Some(uplink) => uplink,
        None => {
            // SAFETY: as above.
            let class = unsafe { (*ip).version_class_flow };
            let tclass = (class[0] << 4) | (class[1] >> 4);
            let meta = u64::from(closing)
                | u64::from(tclass) << 8
                | u64::from(u16::from_be_bytes(pkt.vlan_tci)) << 16;
            let flow = existing.unwrap_or(core::ptr::null_mut());
            match unword(open(ctx.ctx, &key, flow, meta, now)) {
                Ok(uplink) => uplink,
                Err(pass @ (reason::PASS_KERNEL_CONNECTION | reason::PASS_POLICY_KERNEL)) => {
                    return Err(pass)
                }
                Err(reason::DROP_POLICY_UNREACHABLE) => return Ok(ANSWER_UNREACHABLE),
                Err(drop_reason) => return Ok(stats::drop(drop_reason)),
            }
        }
    };
    if uplink == KERNEL_OWNED {
        return Err(reason::PASS_KERNEL_CONNECTION);
    }
    let (Some(info), Some(six)) = (UPLINKS.get(uplink), UPLINKS6.get(uplink)) else {
        return Ok(stats::drop(reason::DROP_NO_UPLINK));
    };
    let mtu = six.mtu(info.mtu);
    // SAFETY: as above.
    if u32::from(u16::from_be_bytes(unsafe { (*ip).payload_len })) + IPV6_HDR_LEN > u32::from(mtu) {
        // IPv6 routers never fragment: the client is told the uplink's
        // MTU. The kernel would route the packet by its own rules, maybe
        // out of another uplink under another prefix, and never tell.
        return Ok(ANSWER_TOO_BIG);
    }
    // IPv6 over a wrapped uplink (PPPoE, a VLAN) is the kernel's for now:
    // lan6's stack frame has no room left for the push.
    if crate::lan::wrapping(uplink, info).is_some() {
        return Err(reason::PASS_UNSUPPORTED);
    }
    if info.flags & uplink_flags::CLAMP_MSS != 0 && pkt.proto == IPPROTO_TCP {
        crate::mss::clamp(ctx, pkt.l4_off, mtu, lb_common::mss::IPV6_OVERHEAD);
    }
    // The guard, for every packet: the LAN's prefix may have changed under
    // an established flow, and nothing leaves with an address the uplink's
    // ISP would not route back.
    if !six.out.takes(&key.src_addr) {
        return Ok(stats::drop(reason::DROP_FOREIGN_SOURCE));
    }
    // Checksum-neutral: no L4 checksum changes. On an aligned copy, read
    // and written a word at a time, then back into the packet.
    if !six.out.is_identity() {
        let mut src = Aligned6(key.src_addr);
        if six.out.apply(&mut src.0).is_err() {
            // An all-ones interface identifier: RFC 6296 leaves it alone.
            return Ok(stats::drop(reason::DROP_FOREIGN_SOURCE));
        }
        // SAFETY: as above.
        unsafe { (*ip).src = src.0 };
    }
    rewrite::decrement_hop_limit(&pkt);
    let len = rewrite::untagged(ctx, pkt.tagged(), ETH_P_IPV6, info.src_mac, six.gw_mac)
        .map_err(|_| reason::DROP_UNFINISHED)?;
    let folded = key.folded();
    stats::sent6(uplink, now, &key, folded, len);
    Ok(egress::send(
        ctx,
        info.ifindex,
        uplink,
        folded.0.to_be_bytes(),
        || TX_PORTS.redirect(uplink, 0),
    ))
}

/// An IPv6 address on the stack, aligned so that `npt` reads and writes
/// it in whole words (a packet's bytes are only 2-aligned).
#[repr(C, align(8))]
struct Aligned6([u8; 16]);

/// Whether lbd balances IPv6 (it knows the LAN's prefix).
#[inline(always)]
fn balanced() -> bool {
    SETTINGS
        .get(0)
        .is_some_and(|s| s.flags & settings_flags::IPV6 != 0)
}

/// A flow's pinned uplink (or [`KERNEL_OWNED`]) while it keeps it, its
/// entry touched; `None` when the flow must move. The established path:
/// everything else is [`open`]'s.
#[inline(always)]
fn kept(flow: *mut FlowValue6, closing: bool, now: u64) -> Option<u32> {
    // SAFETY: a pointer into the map's value. A racing CPU may write the
    // same fields; at worst a timestamp or state update is lost.
    let pinned = unsafe { (*flow).uplink };
    if pinned != KERNEL_OWNED && !keeps(pinned) {
        return None;
    }
    unsafe {
        (*flow).last_seen_ns = now;
        if closing {
            (*flow).tcp_state = tcp_state::CLOSING;
        }
    }
    Some(pinned)
}

/// A new flow's uplink, or a new one for `flow` (its entry; null for a
/// connection not in the table) whose uplink lost IPv6: the rules and
/// policies (`policy::place6`), pinned. `meta` packs whether the packet
/// closes the connection (bit 0), its traffic class (bits 8-15) and its
/// VLAN tag (16-31). Returns [`unword`]'s encoding of `Ok(uplink)` or
/// `Err(reason)`: a drop reason, or [`reason::PASS_KERNEL_CONNECTION`] /
/// [`reason::PASS_POLICY_KERNEL`] for the kernel's.
///
/// A BPF function of its own: the first packet's work (conntrack's
/// question, the rules, the flow's entry) then takes a stack frame of
/// its own, which the established path does not carry.
#[inline(never)]
fn open(ctx: *mut xdp_md, key: &FlowKey6, flow: *mut FlowValue6, meta: u64, now: u64) -> i64 {
    let ctx = XdpContext::new(ctx);
    let closing = meta & 1 != 0;
    let tclass = (meta >> 8) as u8;
    let placed = |except| policy::place6(&ctx, key, tclass, except, now);
    let opened = if flow.is_null() {
        first(
            &ctx,
            key,
            closing,
            (meta >> 16) as u16,
            placed(NO_UPLINK),
            now,
        )
    } else {
        // SAFETY: a pointer into the map's value, as in `kept`.
        let pinned = unsafe { (*flow).uplink };
        moved(flow, pinned, placed(pinned), now)
    };
    word(opened)
}

/// A result as one word, for a BPF function's return: `Ok` as itself
/// (non-negative), `Err(why)` as `-1 - why`.
#[inline(always)]
pub fn word(result: Result<u32, u32>) -> i64 {
    match result {
        Ok(value) => i64::from(value),
        Err(why) => -1 - i64::from(why),
    }
}

/// What [`word`] made of a result.
#[inline(always)]
pub fn unword(word: i64) -> Result<u32, u32> {
    if word >= 0 {
        Ok(word as u32)
    } else {
        Err((-1 - word) as u32)
    }
}

/// A flow whose uplink lost IPv6 moves where it is `placed`: with NPTv6
/// the server sees a new address, as with IPv4 NAT.
#[inline(always)]
fn moved(flow: *mut FlowValue6, pinned: u32, placed: Placement, now: u64) -> Result<u32, u32> {
    let uplink = match placed {
        Placement::Uplink(uplink) => uplink,
        // The rules now leave it to the kernel.
        Placement::Kernel => KERNEL_OWNED,
        Placement::Refused(why) => return Err(why),
        Placement::Unreachable => return Err(reason::DROP_POLICY_UNREACHABLE),
    };
    // SAFETY: as in `kept`.
    unsafe {
        (*flow).uplink = uplink;
        (*flow).last_seen_ns = now;
    }
    if uplink != KERNEL_OWNED {
        stats::uplink(pinned, |s| s.moved_away += 1);
        stats::uplink(uplink, |s| s.new_flows += 1);
    }
    Ok(uplink)
}

/// A connection's first packet: the kernel's if conntrack has it, else
/// where it is `placed`, pinned.
#[inline(always)]
fn first(
    ctx: &XdpContext,
    key: &FlowKey6,
    closing: bool,
    vlan_tci: u16,
    placed: Placement,
    now: u64,
) -> Result<u32, u32> {
    let eth: *const EthHdr = parse::ptr_at(ctx, 0)?;
    // SAFETY: bounds-checked by `ptr_at`.
    let (client_mac, lan_mac) = unsafe { ((*eth).src, (*eth).dst) };
    let mut value = FlowValue6 {
        last_seen_ns: now,
        uplink: KERNEL_OWNED,
        lan_ifindex: ctx.ingress_ifindex() as u32,
        client_mac,
        lan_mac,
        vlan_tci: vlan_tci.to_be_bytes(),
        tcp_state: if closing {
            tcp_state::CLOSING
        } else {
            tcp_state::OPENING
        },
        _pad: 0,
    };
    if kernel_owns(ctx, key) {
        // Remembered for the next packets; if another CPU was first, its
        // entry says the same.
        let _ = FLOWS6.insert(key, &value, u64::from(BPF_NOEXIST));
        return Err(reason::PASS_KERNEL_CONNECTION);
    }
    let uplink = match placed {
        Placement::Uplink(uplink) => uplink,
        Placement::Kernel => {
            // A `kernel` rule: remembered, so that its next packets are
            // not classified again.
            let _ = FLOWS6.insert(key, &value, u64::from(BPF_NOEXIST));
            return Err(reason::PASS_POLICY_KERNEL);
        }
        Placement::Refused(why) => return Err(why),
        Placement::Unreachable => return Err(reason::DROP_POLICY_UNREACHABLE),
    };
    // A source the uplinks do not translate is never pinned.
    if !UPLINKS6
        .get(uplink)
        .is_some_and(|six| six.out.takes(&key.src_addr))
    {
        return Err(reason::DROP_FOREIGN_SOURCE);
    }
    value.uplink = uplink;
    if FLOWS6.insert(key, &value, u64::from(BPF_NOEXIST)).is_err() {
        // Another CPU pinned the same connection first: follow its choice.
        // SAFETY: as above.
        return match FLOWS6.get_ptr(key) {
            Some(flow) => Ok(unsafe { (*flow).uplink }),
            None => Err(reason::DROP_NO_UPLINK),
        };
    }
    stats::uplink(uplink, |s| s.new_flows += 1);
    Ok(uplink)
}

/// Whether conntrack already has `key`'s connection (TCP and UDP).
#[inline(always)]
fn kernel_owns(ctx: &XdpContext, key: &FlowKey6) -> bool {
    (key.proto == IPPROTO_TCP || key.proto == IPPROTO_UDP)
        && conntrack::tracks6(
            ctx,
            key.proto,
            key.src_addr,
            key.dst_addr,
            key.src_port,
            key.dst_port,
        )
}

/// Whether IPv6 flows pinned to `uplink` stay there.
#[inline(always)]
fn keeps(uplink: u32) -> bool {
    UPLINKS6
        .get(uplink)
        .is_some_and(|six| uplink_state::keeps_flows(six.state))
}

/// The body of `lan_too_big6`: a packet too big for its flow's uplink
/// (`ANSWER_TOO_BIG`) is answered with ICMPv6 "Packet Too Big" and that
/// uplink's IPv6 MTU, back out of its port (`told_too_big`); where that cannot
/// be made (a tagged frame, the flow gone), the kernel has it
/// (`pass_too_big`).
#[inline(always)]
pub fn too_big(ctx: &XdpContext) -> u32 {
    tell_too_big(ctx).unwrap_or_else(stats::give_up)
}

#[inline(always)]
fn tell_too_big(ctx: &XdpContext) -> Result<u32, u32> {
    let pkt = parse::ipv6(ctx)?;
    let ip = pkt.ip;
    let (src_port, dst_port) = parse::ports6(ctx, &pkt, ICMPV6_ECHO_REQUEST)?;
    // SAFETY: `parse::ipv6` bounds-checked the IPv6 header.
    let key = FlowKey6 {
        src_addr: unsafe { (*ip).src },
        dst_addr: unsafe { (*ip).dst },
        src_port,
        dst_port,
        proto: pkt.proto,
        _pad: [0; 3],
    };
    let flow = FLOWS6.get_ptr(&key).ok_or(reason::PASS_TOO_BIG)?;
    // SAFETY: a pointer into the map's value, read at once.
    let uplink = unsafe { (*flow).uplink };
    let (Some(info), Some(six)) = (UPLINKS.get(uplink), UPLINKS6.get(uplink)) else {
        return Err(reason::PASS_TOO_BIG);
    };
    let mtu = u32::from(six.mtu(info.mtu));
    // Below IPv6's minimum the client would refuse it (and the kernel
    // soon takes IPv6 off such a device): the kernel's.
    if mtu < IPV6_MIN_MTU {
        return Err(reason::PASS_TOO_BIG);
    }
    answer::icmp6_error(
        ctx,
        |quote_sum, client, server| icmp::packet_too_big6(quote_sum, client, server, mtu),
        reason::TOLD_TOO_BIG,
    )
    .or(Err(reason::PASS_TOO_BIG))
}
