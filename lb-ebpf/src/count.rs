//! A bounded loop the verifier checks once: the kernel's open-coded
//! numeric iterator (`bpf_iter_num_new`, `_next`, `_destroy`, Linux 6.4),
//! called through placeholder kfunc instructions that lbd binds (see
//! `lb_common::kfunc`). A plain loop of 256 turns is checked turn by turn,
//! and the rule walk would not fit the verifier's budget that way.
//!
//! Where the kernel lacks the iterator, lbd binds its calls to "nothing":
//! the loop then makes no turn at all.

use core::{arch::asm, mem::MaybeUninit, ops::ControlFlow};

use lb_common::kfunc;

/// Call `body` with 0, 1, ... up to `end - 1`, until it breaks.
#[inline(always)]
pub fn up_to(end: u32, mut body: impl FnMut(u32) -> ControlFlow<()>) {
    // `struct bpf_iter_num`: 8 bytes on the stack that only the kfuncs
    // touch, never moved.
    let mut iter = MaybeUninit::<u64>::uninit();
    let at = iter.as_mut_ptr() as u64;
    // SAFETY: the kfunc initialises the iterator in the 8 bytes at `at`.
    unsafe {
        asm!(
            ".byte {call}, {pseudo}, 0, 0",
            ".4byte {id}",
            call = const kfunc::CALL_OPCODE,
            pseudo = const kfunc::PSEUDO_KFUNC_CALL_REGS,
            id = const kfunc::ITER_NEW_PLACEHOLDER,
            inlateout("r1") at => _,
            inlateout("r2") 0u64 => _,
            inlateout("r3") u64::from(end) => _,
            lateout("r0") _,
            lateout("r4") _,
            lateout("r5") _,
        );
    }
    loop {
        let next: u64;
        // SAFETY: the iterator was made above; the result is a pointer to
        // the next number, or null at the end.
        unsafe {
            asm!(
                ".byte {call}, {pseudo}, 0, 0",
                ".4byte {id}",
                call = const kfunc::CALL_OPCODE,
                pseudo = const kfunc::PSEUDO_KFUNC_CALL_REGS,
                id = const kfunc::ITER_NEXT_PLACEHOLDER,
                inlateout("r1") at => _,
                lateout("r0") next,
                lateout("r2") _,
                lateout("r3") _,
                lateout("r4") _,
                lateout("r5") _,
            );
        }
        if next == 0 {
            break;
        }
        // SAFETY: a non-null result points at the current number.
        let i = unsafe { *(next as *const i32) };
        if i < 0 || body(i as u32).is_break() {
            break;
        }
    }
    // SAFETY: every path out of the loop comes here, once.
    unsafe {
        asm!(
            ".byte {call}, {pseudo}, 0, 0",
            ".4byte {id}",
            call = const kfunc::CALL_OPCODE,
            pseudo = const kfunc::PSEUDO_KFUNC_CALL_REGS,
            id = const kfunc::ITER_DESTROY_PLACEHOLDER,
            inlateout("r1") at => _,
            lateout("r0") _,
            lateout("r2") _,
            lateout("r3") _,
            lateout("r4") _,
            lateout("r5") _,
        );
    }
}
