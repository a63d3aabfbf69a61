//! `lan_too_big`: a UDP datagram of a fast-path flow that is too big for
//! its uplink and carries no DF, which `lan_ingress` tail-calls.
//!
//! XDP cannot fragment; the kernel can, but its slow path would translate
//! the datagram afresh: from one of the router's own ports, and out of
//! whatever uplink the main table names. The remote end would see one
//! flow come from two places, and a reply to the big datagram would miss
//! the client. So the flow's translation (its uplink's address, its NAT
//! port) goes into conntrack first, with the flow's uplink in the
//! connmark (`lb_common::marks`): the kernel then fragments the datagram,
//! NATs it to the very same source, and lbd's table and rules route it
//! out of the flow's uplink. Replies come back through `wan_ingress`, as
//! every reply of the flow does.
//!
//! Owns that hand-over and nothing else. It never changes the packet: the
//! kernel gets it as the client sent it, whatever happens here. Only a
//! whole UDP datagram is handed over (conntrack's UDP needs no state from
//! earlier packets, and a fragment would meet the kernel's reassembly
//! beside fragments the fast path sent itself); anything else is
//! `PASS_TOO_BIG`, the kernel's to translate, as before.

use aya_ebpf::programs::XdpContext;
use lb_common::{
    maps::{uplink_state, FlowKey},
    marks, reason,
};

use crate::{
    conntrack::{self, Handed},
    maps::{FLOWS, UPLINKS},
    parse::{self, Fragment, ICMP_ECHO_REQUEST, IPPROTO_UDP},
    stats,
};

/// Hand the datagram in `ctx` to the kernel, its connection translated in
/// conntrack as the fast path translates its flow; always `XDP_PASS`,
/// counted `HANDED_TOO_BIG` or, where that cannot be done,
/// `PASS_TOO_BIG`.
#[inline(always)]
pub fn too_big(ctx: &XdpContext) -> u32 {
    match hand_over(ctx) {
        Ok(()) => stats::pass(reason::HANDED_TOO_BIG),
        Err(why) => stats::pass(why),
    }
}

#[inline(always)]
fn hand_over(ctx: &XdpContext) -> Result<(), u32> {
    let pkt = parse::ipv4(ctx)?;
    if pkt.proto != IPPROTO_UDP || pkt.fragment != Fragment::Whole {
        return Err(reason::PASS_TOO_BIG);
    }
    let (sport, dport) = parse::ports(ctx, &pkt, ICMP_ECHO_REQUEST)?;
    // SAFETY: `parse::ipv4` bounds-checked the IPv4 header.
    let (src, dst) = unsafe { ((*pkt.ip).src, (*pkt.ip).dst) };
    let key = FlowKey {
        src_addr: src,
        dst_addr: dst,
        src_port: sport,
        dst_port: dport,
        proto: IPPROTO_UDP,
        _pad: [0; 3],
    };
    // `lan_ingress` found or made the flow a moment ago; it is asked
    // again, as it may have moved since.
    let flow = FLOWS.get_ptr(&key).ok_or(reason::PASS_TOO_BIG)?;
    // SAFETY: a pointer into the map's value, copied out at once.
    let (uplink, nat_port, epoch) = unsafe { ((*flow).uplink, (*flow).nat_port, (*flow).epoch) };
    let info = UPLINKS.get(uplink).ok_or(reason::PASS_TOO_BIG)?;
    if !uplink_state::keeps_flows(info.state) || epoch != info.epoch as u8 {
        return Err(reason::PASS_TOO_BIG);
    }
    let conn = Handed {
        src,
        dst,
        sport,
        dport,
        nat_addr: info.addr,
        nat_port,
    };
    if conntrack::hand_over(ctx.ctx, &conn, marks::handed(uplink)) {
        Ok(())
    } else {
        Err(reason::PASS_TOO_BIG)
    }
}
