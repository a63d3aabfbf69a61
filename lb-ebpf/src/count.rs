//! A bounded loop the verifier checks once: the kernel's open-coded
//! numeric iterator (`bpf_iter_num_new`, `_next`, `_destroy`, Linux 6.4),
//! called through placeholder kfunc instructions that lbd binds (see
//! `lb_common::kfunc`). A plain loop is checked turn by turn, and
//! lan_ingress's loops (the fallback buckets, the NAT port search) cost
//! half the verifier's budget that way.
//!
//! lbd refuses to load the data plane on a kernel without the iterator.

use core::{mem::MaybeUninit, ops::ControlFlow};

use lb_common::kfunc::{ITER_DESTROY_PLACEHOLDER, ITER_NEW_PLACEHOLDER, ITER_NEXT_PLACEHOLDER};

use crate::kfunc;

/// Call `body` with 0, 1, ... up to `end - 1`, until it breaks.
#[inline(always)]
pub fn up_to(end: u32, mut body: impl FnMut(u32) -> ControlFlow<()>) {
    // `struct bpf_iter_num`: 8 bytes on the stack that only the kfuncs
    // touch, never moved.
    let mut iter = MaybeUninit::<u64>::uninit();
    let at = iter.as_mut_ptr() as u64;
    kfunc::call!(ITER_NEW_PLACEHOLDER, at, 0u64, u64::from(end));
    loop {
        // A pointer to the next number, or null at the end.
        let next = kfunc::call!(ITER_NEXT_PLACEHOLDER, at);
        if next == 0 {
            break;
        }
        // SAFETY: a non-null result points at the current number.
        let i = unsafe { *(next as *const i32) };
        if i < 0 || body(i as u32).is_break() {
            break;
        }
    }
    // Every path out of the loop comes here, once.
    kfunc::call!(ITER_DESTROY_PLACEHOLDER, at);
}
