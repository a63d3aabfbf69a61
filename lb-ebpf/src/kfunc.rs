//! Calling a kernel function (kfunc): one `call` whose source register
//! says "kernel function" (`BPF_PSEUDO_KFUNC_CALL`) and whose immediate is
//! the function's BTF id in the running kernel. Rust has no `__ksym`
//! externs and aya 0.14 resolves none, so the call is written out with a
//! placeholder id ([`lb_common::kfunc`]) that lbd replaces with the
//! kernel's id before loading, or with `r0 = 0` ("found nothing") on a
//! kernel without the function.

/// Call the kfunc of `placeholder` with its one to five arguments; evaluates to its return value (`r0`). The other argument
/// registers are only clobbered, never set: the verifier's view of a loop
/// around the call stays the smallest it can be.
macro_rules! call {
    ($placeholder:path, $r1:expr $(,)?) => {
        $crate::kfunc::call!(@asm $placeholder;
            inlateout("r1") $r1 => _, lateout("r2") _, lateout("r3") _,
            lateout("r4") _, lateout("r5") _)
    };
    ($placeholder:path, $r1:expr, $r2:expr $(,)?) => {
        $crate::kfunc::call!(@asm $placeholder;
            inlateout("r1") $r1 => _, inlateout("r2") $r2 => _, lateout("r3") _,
            lateout("r4") _, lateout("r5") _)
    };
    ($placeholder:path, $r1:expr, $r2:expr, $r3:expr $(,)?) => {
        $crate::kfunc::call!(@asm $placeholder;
            inlateout("r1") $r1 => _, inlateout("r2") $r2 => _, inlateout("r3") $r3 => _,
            lateout("r4") _, lateout("r5") _)
    };
    ($placeholder:path, $r1:expr, $r2:expr, $r3:expr, $r4:expr $(,)?) => {
        $crate::kfunc::call!(@asm $placeholder;
            inlateout("r1") $r1 => _, inlateout("r2") $r2 => _, inlateout("r3") $r3 => _,
            inlateout("r4") $r4 => _, lateout("r5") _)
    };
    ($placeholder:path, $r1:expr, $r2:expr, $r3:expr, $r4:expr, $r5:expr $(,)?) => {
        $crate::kfunc::call!(@asm $placeholder;
            inlateout("r1") $r1 => _, inlateout("r2") $r2 => _, inlateout("r3") $r3 => _,
            inlateout("r4") $r4 => _, inlateout("r5") $r5 => _)
    };
    (@asm $placeholder:path; $($operands:tt)*) => {{
        let r0: u64;
        // SAFETY: the caller passes what the kfunc's signature asks for;
        // the verifier checks it against the kernel's BTF at load.
        unsafe {
            core::arch::asm!(
                ".byte {call}, {pseudo}, 0, 0",
                ".4byte {id}",
                call = const lb_common::kfunc::CALL_OPCODE,
                pseudo = const lb_common::kfunc::PSEUDO_KFUNC_CALL_REGS,
                id = const $placeholder,
                $($operands)*,
                lateout("r0") r0,
            );
        }
        r0
    }};
}

pub(crate) use call;
