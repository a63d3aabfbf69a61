//! Kernel functions (kfuncs) the data plane calls, and how their calls are
//! bound to the running kernel.
//!
//! A kfunc call is one instruction: `call` with source register
//! `BPF_PSEUDO_KFUNC_CALL` and, as immediate, the function's BTF id in the
//! running kernel's BTF. Ids differ from kernel to kernel, so the data plane
//! is built with a placeholder immediate per function (below), and lbd
//! binds the object before loading it: each placeholder call becomes a call
//! of the kernel's id, or, where the kernel lacks the function, `r0 = 0`
//! (the kfunc "found nothing"). This module holds the placeholders and the
//! pure rewrite of the object's bytes, tested on the host.

/// `BPF_JMP | BPF_CALL`.
pub const CALL_OPCODE: u8 = 0x85;
/// The registers byte of a kfunc call: source register
/// `BPF_PSEUDO_KFUNC_CALL` (2) in the high nibble, destination 0.
pub const PSEUDO_KFUNC_CALL_REGS: u8 = 0x20;
/// `BPF_ALU64 | BPF_MOV | BPF_K`: `r0 = imm` with the registers byte 0.
const MOV_IMM_R0: u8 = 0xb7;

/// Placeholder of `bpf_xdp_ct_lookup`.
pub const CT_LOOKUP_PLACEHOLDER: u32 = 0x6c62_0001;
/// Placeholder of `bpf_ct_release`.
pub const CT_RELEASE_PLACEHOLDER: u32 = 0x6c62_0002;

/// Placeholders of the open-coded numeric iterator (Linux 6.4): a bounded
/// loop whose body the verifier checks until it converges, not once per
/// turn (the fallback buckets, the NAT port search).
pub const ITER_NEW_PLACEHOLDER: u32 = 0x6c62_0003;
pub const ITER_NEXT_PLACEHOLDER: u32 = 0x6c62_0004;
pub const ITER_DESTROY_PLACEHOLDER: u32 = 0x6c62_0005;

/// The kfuncs the data plane cannot do without: lbd refuses to load it
/// on a kernel that lacks one.
pub const REQUIRED: [&str; 3] = [
    "bpf_iter_num_new",
    "bpf_iter_num_next",
    "bpf_iter_num_destroy",
];

/// The kfuncs the data plane calls: placeholder and the kernel's name.
pub const ALL: [(u32, &str); 5] = [
    (CT_LOOKUP_PLACEHOLDER, "bpf_xdp_ct_lookup"),
    (CT_RELEASE_PLACEHOLDER, "bpf_ct_release"),
    (ITER_NEW_PLACEHOLDER, "bpf_iter_num_new"),
    (ITER_NEXT_PLACEHOLDER, "bpf_iter_num_next"),
    (ITER_DESTROY_PLACEHOLDER, "bpf_iter_num_destroy"),
];

/// The 8 bytes of a kfunc call whose immediate is `imm` (a placeholder,
/// or a BTF id).
pub const fn kfunc_call(imm: u32) -> [u8; 8] {
    let imm = imm.to_le_bytes();
    [
        CALL_OPCODE,
        PSEUDO_KFUNC_CALL_REGS,
        0,
        0,
        imm[0],
        imm[1],
        imm[2],
        imm[3],
    ]
}

/// What a placeholder call of a kfunc becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Binding {
    /// A call of the function with this BTF id in the kernel's own BTF
    /// (vmlinux: the call's offset stays 0).
    Kernel(u32),
    /// `r0 = 0`: the kernel lacks it, and the call "returns nothing".
    Absent,
}

impl Binding {
    fn instruction(self) -> [u8; 8] {
        match self {
            Binding::Kernel(id) => kfunc_call(id),
            Binding::Absent => [MOV_IMM_R0, 0, 0, 0, 0, 0, 0, 0],
        }
    }
}

/// Rewrite every placeholder call of `placeholder` in `object` (the ELF
/// file's bytes) as `binding` says. Instructions are 8-byte aligned within
/// their section, and sections within the file, so only aligned offsets
/// are looked at. Returns how many calls were rewritten.
pub fn bind(object: &mut [u8], placeholder: u32, binding: Binding) -> usize {
    let wanted = kfunc_call(placeholder);
    let with = binding.instruction();
    let mut count = 0;
    for insn in object.chunks_exact_mut(8) {
        if *insn == wanted {
            insn.copy_from_slice(&with);
            count += 1;
        }
    }
    count
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_bound_to_the_kernels_id_or_to_nothing() {
        let mut object = [0u8; 40];
        object[8..16].copy_from_slice(&kfunc_call(CT_LOOKUP_PLACEHOLDER));
        object[24..32].copy_from_slice(&kfunc_call(CT_RELEASE_PLACEHOLDER));
        assert_eq!(
            bind(
                &mut object,
                CT_LOOKUP_PLACEHOLDER,
                Binding::Kernel(0x0001_2345)
            ),
            1
        );
        assert_eq!(object[8..16], [0x85, 0x20, 0, 0, 0x45, 0x23, 0x01, 0]);
        assert_eq!(
            bind(&mut object, CT_RELEASE_PLACEHOLDER, Binding::Absent),
            1
        );
        assert_eq!(object[24..32], [0xb7, 0, 0, 0, 0, 0, 0, 0]);
        // Bound once, nothing is left to bind.
        assert_eq!(bind(&mut object, CT_LOOKUP_PLACEHOLDER, Binding::Absent), 0);
    }

    #[test]
    fn a_placeholder_off_the_instruction_grid_is_not_an_instruction() {
        let mut object = [0u8; 24];
        object[4..12].copy_from_slice(&kfunc_call(CT_LOOKUP_PLACEHOLDER));
        assert_eq!(bind(&mut object, CT_LOOKUP_PLACEHOLDER, Binding::Absent), 0);
    }
}
