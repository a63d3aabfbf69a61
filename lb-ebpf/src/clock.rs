//! The fast path's clock: the kernel's coarse monotonic clock, as
//! `bpf_ktime_get_coarse_ns` reads it, but asked once per tick per CPU
//! rather than once per packet.
//!
//! The coarse clock only moves on a timer tick, and so does `jiffies`; the
//! verifier turns `bpf_jiffies64` into one load, where the clock is a
//! helper call (three calls deep, each return paying the CPU's
//! return-thunk mitigation: about a tenth of an established packet's
//! cost). So each CPU keeps the last tick's pair and reads the clock again
//! only when `jiffies` moved. The values are the helper's, to within the
//! tick (a reader between the tick's two updates keeps the old clock for
//! that tick), which is the coarse clock's resolution anyway. It owns no
//! other time: lbd compares these stamps with `CLOCK_MONOTONIC_COARSE`.

use aya_ebpf::helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns};

use crate::maps::TICK;

/// The last tick a CPU saw: its `jiffies`, and the coarse clock then.
#[repr(C)]
pub struct Tick {
    jiffies: u64,
    ns: u64,
}

/// Now, on the coarse monotonic clock, in nanoseconds.
#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: neither helper has preconditions.
    let jiffies = unsafe { bpf_jiffies64() };
    let Some(tick) = TICK.get_ptr_mut(0) else {
        return unsafe { bpf_ktime_get_coarse_ns() };
    };
    // SAFETY: this CPU's slot; only code on this CPU touches it, and XDP
    // and tc programs do not preempt each other there.
    unsafe {
        if (*tick).jiffies != jiffies {
            (*tick).ns = bpf_ktime_get_coarse_ns();
            (*tick).jiffies = jiffies;
        }
        (*tick).ns
    }
}
