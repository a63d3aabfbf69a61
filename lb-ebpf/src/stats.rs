//! Counting: per-uplink packet and byte counters, passive detection's
//! signals, and per-reason verdicts. Per-CPU arrays, so no atomics on the
//! fast path; user space sums the CPUs. A forwarded packet touches one
//! entry: its family's `SIGNALS` slot holds its counters beside its
//! signals.

use aya_ebpf::bindings::xdp_action::{XDP_DROP, XDP_PASS};
use lb_common::{
    maps::{signals6, FlowKey, FlowKey6, Signals, UplinkStats},
    reason,
};

use crate::maps::{REASONS, SIGNALS, UPLINK_STATS};

/// Count `reason` for a packet whose verdict is given elsewhere.
#[inline(always)]
pub fn count(reason: u32) {
    bump_reason(reason);
}

/// Count `reason` `n` times (frames lost after the programs' verdict,
/// counted by the ring watch).
#[inline(always)]
pub fn count_many(reason: u32, n: u64) {
    if let Some(c) = REASONS.get_ptr_mut(reason) {
        // SAFETY: per-CPU slot; the ring watch fires from device map
        // flushes, in the same softirq as the XDP programs on this CPU,
        // never in the middle of one.
        unsafe { *c += n };
    }
}

#[inline(always)]
fn bump_reason(reason: u32) {
    if let Some(n) = REASONS.get_ptr_mut(reason) {
        // SAFETY: per-CPU slot, only this program on this CPU touches it.
        unsafe { *n += 1 };
    }
}

/// Count `reason` and give the packet to the kernel.
#[inline(always)]
pub fn pass(reason: u32) -> u32 {
    bump_reason(reason);
    XDP_PASS
}

/// Count `reason` and drop the packet.
#[inline(always)]
pub fn drop(reason: u32) -> u32 {
    bump_reason(reason);
    XDP_DROP
}

/// Count `reason` for a packet the fast path gave up on: dropped if the
/// reason is a drop (`reason::drops`: above all one already half
/// rewritten), the kernel's otherwise.
#[inline(always)]
pub fn give_up(reason: u32) -> u32 {
    if reason::drops(reason) {
        drop(reason)
    } else {
        pass(reason)
    }
}

/// Update the counters of `uplink` with `f`.
#[inline(always)]
pub fn uplink(uplink: u32, f: impl FnOnce(&mut UplinkStats)) {
    if let Some(s) = UPLINK_STATS.get_ptr_mut(uplink) {
        // SAFETY: per-CPU slot, as above.
        f(unsafe { &mut *s });
    }
}

/// Update the signals of `uplink` with `f`.
#[inline(always)]
fn signals(uplink: u32, f: impl FnOnce(&mut Signals)) {
    if let Some(s) = SIGNALS.get_ptr_mut(uplink) {
        // SAFETY: per-CPU slot, as above.
        f(unsafe { &mut *s });
    }
}

/// Multiplier of the 64-bit masks' hashes (Knuth's, 2^32 / phi).
const SPREAD: u32 = 0x9e37_79b1;

/// The bit of `x` in a 64-bit mask.
#[inline(always)]
fn bit(x: u32) -> u64 {
    1 << (x.wrapping_mul(SPREAD) >> 26)
}

/// A packet of flow `key`, `len` bytes, left by `uplink` at `now`.
#[inline(always)]
pub fn sent(uplink: u32, now: u64, key: &FlowKey, len: usize) {
    let ports = u32::from(u16::from_be_bytes(key.src_port)) << 16
        | u32::from(u16::from_be_bytes(key.dst_port));
    let src = u32::from_be_bytes(key.src_addr);
    sent_folded(
        uplink,
        now,
        src,
        u32::from_be_bytes(key.dst_addr),
        ports,
        key.proto,
        len,
    );
}

/// A packet of IPv6 flow `key` left by `uplink` at `now`: the same
/// signals, in the uplink's IPv6 slot, from its addresses folded to 32
/// bits (`folded`: `key.folded()`, which the caller has already).
#[inline(always)]
pub fn sent6(uplink: u32, now: u64, key: &FlowKey6, folded: (u32, u32), len: usize) {
    let ports = u32::from(u16::from_be_bytes(key.src_port)) << 16
        | u32::from(u16::from_be_bytes(key.dst_port));
    let (src, dst) = folded;
    sent_folded(signals6(uplink), now, src, dst, ports, key.proto, len);
}

#[inline(always)]
fn sent_folded(slot: u32, now: u64, src: u32, dst: u32, ports: u32, proto: u8, len: usize) {
    let flow = dst ^ src ^ ports ^ u32::from(proto);
    signals(slot, |s| {
        s.last_sent_ns = now;
        s.flows |= bit(flow);
        s.destinations |= bit(dst);
        s.tx_packets += 1;
        s.tx_bytes += len as u64;
    });
}

/// A reply was translated back through `uplink` at `now`. One that
/// `answers` (not an ICMP error about what was sent) says the path works:
/// what sent before it was heard.
#[inline(always)]
pub fn replied(uplink: u32, now: u64, answers: bool) {
    signals(uplink, |s| {
        s.replies += 1;
        if answers {
            s.last_reply_ns = now;
            s.flows = 0;
            s.destinations = 0;
        }
    });
}

/// An IPv6 reply came back through `uplink` at `now`.
#[inline(always)]
pub fn replied6(uplink: u32, now: u64, answers: bool) {
    replied(signals6(uplink), now, answers);
}

/// A SYN went again on `uplink` for a connection still waiting.
#[inline(always)]
pub fn syn_retry(uplink: u32) {
    signals(uplink, |s| s.syn_retries += 1);
}
