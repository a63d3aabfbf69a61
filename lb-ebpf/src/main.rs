//! lb's XDP programs: thin entry points over the modules that do the work.
//!
//! Both programs fail open: whatever they cannot or should not handle goes
//! to the kernel stack with `XDP_PASS` and a counted reason, so the router
//! stays an ordinary Linux router for everything but the fast path.
#![no_std]
#![no_main]
// Kfunc calls are written out in assembly (see `conntrack`).
#![feature(asm_experimental_arch)]
// The ring watch adds to a shared counter with BPF's atomic add, which the
// target has only as an intrinsic (see `egress::watch`).
#![feature(core_intrinsics)]
#![expect(
    internal_features,
    reason = "core_intrinsics: the BPF target has no AtomicU64::fetch_add"
)]

mod answer;
mod clock;
mod conntrack;
mod count;
mod egress;
mod frags;
mod handover;
mod kfunc;
mod lan;
mod lan6;
mod maps;
mod mss;
mod nat;
mod parse;
mod policy;
mod rewrite;
mod stats;
mod wan;
mod wan6;

use aya_ebpf::{
    bindings::xdp_action::XDP_PASS,
    macros::{classifier, raw_tracepoint, xdp},
    programs::{RawTracePointContext, TcContext, XdpContext},
};
use lb_common::{
    maps::{LAN6_SLOT, TOO_BIG6_SLOT, UNREACHABLE6_SLOT},
    reason,
};

use crate::maps::{LAN6, TOO_BIG};

/// Packets from LAN clients: steer each connection to an uplink and send it.
/// IPv4's path is this program's own body (a BPF call costs a return, and
/// on CPUs with return-thunk mitigations that is a tenth of an
/// established packet); IPv6's is `lan_ingress6`, a program of its own
/// that this one tail-calls: the two families' stack frames then never
/// add up, as neither would fit beside the other's.
#[xdp]
pub fn lan_ingress(ctx: XdpContext) -> u32 {
    if parse::note_tagged(&ctx) {
        return refuse_note();
    }
    if parse::ether_type(&ctx) == parse::ETH_P_IPV6 {
        return to_lan_ingress6(&ctx);
    }
    lan::ingress(&ctx).unwrap_or_else(stats::give_up)
}

/// `lan_ingress`'s IPv6 half, reached only by its tail call (`LAN6`).
/// The path is this program's own body, as IPv4's is `lan_ingress`'s; a
/// new flow that its policy refuses is answered by `lan_unreachable6`,
/// and a packet too big for its uplink by `lan_too_big6`, which it
/// tail-calls in turn: an answer's stack frame (it quotes the packet)
/// does not fit beside this one.
#[xdp]
pub fn lan_ingress6(ctx: XdpContext) -> u32 {
    match lan6::ingress(&ctx) {
        Ok(lan6::ANSWER_UNREACHABLE) => {
            // SAFETY: a tail call does not return when it succeeds.
            let _ = unsafe { LAN6.tail_call(&ctx, UNREACHABLE6_SLOT) };
            stats::drop(reason::DROP_POLICY_UNREACHABLE)
        }
        Ok(lan6::ANSWER_TOO_BIG) => {
            // SAFETY: as above.
            let _ = unsafe { TOO_BIG.tail_call(&ctx, TOO_BIG6_SLOT) };
            stats::pass(reason::PASS_TOO_BIG)
        }
        Ok(verdict) => verdict,
        Err(reason) => stats::give_up(reason),
    }
}

/// The ICMPv6 "address unreachable" of a policy's `fallback =
/// unreachable`, reached only by `lan_ingress6`'s tail call (`LAN6`).
#[xdp]
pub fn lan_unreachable6(ctx: XdpContext) -> u32 {
    answer::unreachable6(&ctx)
}

/// A UDP datagram too big for its uplink without DF, handed to the
/// kernel to fragment with its flow's translation (see `handover`);
/// reached only by `lan_ingress`'s tail call (`TOO_BIG`).
#[xdp]
pub fn lan_too_big(ctx: XdpContext) -> u32 {
    handover::too_big(&ctx)
}

/// An IPv6 packet too big for its flow's uplink, answered "Packet Too
/// Big"; reached only by `lan_ingress6`'s tail call (`TOO_BIG`).
#[xdp]
pub fn lan_too_big6(ctx: XdpContext) -> u32 {
    lan6::too_big(&ctx)
}

/// Tail-call `lan_ingress6`; should its slot be empty (lbd fills it at
/// load, before it attaches anything), the kernel has the packet. Inline:
/// the kernel takes tail calls from a BPF function only while the frames
/// below it are small, and `lan_ingress`'s is IPv4's whole path.
#[inline(always)]
fn to_lan_ingress6(ctx: &XdpContext) -> u32 {
    // SAFETY: a tail call does not return when it succeeds.
    let _ = unsafe { LAN6.tail_call(ctx, LAN6_SLOT) };
    stats::pass(reason::PASS_NO_PROGRAM)
}

/// Packets arriving on an uplink: translate replies back to their clients.
#[xdp]
pub fn wan_ingress(ctx: XdpContext) -> u32 {
    if parse::note_tagged(&ctx) {
        return refuse_note();
    }
    wan::ingress(&ctx).unwrap_or_else(stats::give_up)
}

/// Drop and count a frame that arrived with a hand-off note's tag (see
/// `parse::note_tagged`). A BPF function of its own: the entry points keep
/// no stack, as the call chains below them use all 512 bytes.
#[inline(never)]
fn refuse_note() -> u32 {
    stats::drop(reason::DROP_RESERVED_VLAN)
}

/// tc ingress of the same devices: sends what the two programs above hand
/// over through the target device's qdisc (see `egress`).
#[classifier]
pub fn handoff(ctx: TcContext) -> i32 {
    egress::carry(&ctx)
}

/// tc ingress of an L3 uplink (no Ethernet header: a tunnel, a raw-IP
/// modem), where XDP cannot serve: `wan_ingress`'s translation, then out
/// of the client's LAN port.
#[classifier]
pub fn wan_ingress_l3(ctx: TcContext) -> i32 {
    wan::ingress_l3(&ctx)
}

/// Every device map flush: counts what `XDP_REDIRECT` lost to a full
/// ring, per device lb sends to (see `egress::watch`).
#[raw_tracepoint(tracepoint = "xdp_devmap_xmit")]
pub fn ring_watch(ctx: RawTracePointContext) -> i32 {
    egress::watch(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any path that could reach here; nothing to do.
    loop {}
}

// Every program's fallback is the kernel stack.
const _: u32 = XDP_PASS;

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
