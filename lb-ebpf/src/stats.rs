//! Counting: per-uplink packet and byte counters and per-reason verdicts.
//! Per-CPU arrays, so no atomics on the fast path; user space sums the CPUs.

use aya_ebpf::bindings::xdp_action::{XDP_DROP, XDP_PASS};
use lb_common::maps::UplinkStats;

use crate::maps::{REASONS, UPLINK_STATS};

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

/// Update the counters of `uplink` with `f`.
#[inline(always)]
pub fn uplink(uplink: u32, f: impl FnOnce(&mut UplinkStats)) {
    if let Some(s) = UPLINK_STATS.get_ptr_mut(uplink) {
        // SAFETY: per-CPU slot, as above.
        f(unsafe { &mut *s });
    }
}
