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

/// Placeholders of the kfuncs that write a connection into conntrack
/// (Linux 6.1): the hand-over of a datagram the kernel must fragment
/// (see [`HAND_OVER`]).
pub const CT_ALLOC_PLACEHOLDER: u32 = 0x6c62_0006;
pub const CT_INSERT_PLACEHOLDER: u32 = 0x6c62_0007;
pub const CT_SET_NAT_PLACEHOLDER: u32 = 0x6c62_0008;
/// Placeholders of the kfuncs that time a connection out: a new one
/// whose translation failed (born expired), an inserted one whose
/// translation is no longer its flow's (expired at once).
pub const CT_SET_TIMEOUT_PLACEHOLDER: u32 = 0x6c62_0009;
pub const CT_CHANGE_TIMEOUT_PLACEHOLDER: u32 = 0x6c62_000a;

/// The kfuncs a hand-over needs, all or none: a connection allocated but
/// never inserted, or inserted and never released, would be a reference
/// the verifier refuses to leave held. Where one is missing, lbd binds
/// the allocation to "found nothing" too, and the hand-over is never
/// made.
pub const HAND_OVER: [&str; 7] = [
    "bpf_xdp_ct_lookup",
    "bpf_ct_release",
    "bpf_xdp_ct_alloc",
    "bpf_ct_set_nat_info",
    "bpf_ct_insert_entry",
    "bpf_ct_set_timeout",
    "bpf_ct_change_timeout",
];

/// The calls that make a hand-over happen (an allocation, and the expiry
/// of a connection whose translation is stale): bound to "found nothing"
/// when it cannot be made, so that the data plane then leaves conntrack
/// as it finds it.
pub const HAND_OVER_CALLS: [u32; 2] = [CT_ALLOC_PLACEHOLDER, CT_CHANGE_TIMEOUT_PLACEHOLDER];

/// `BPF_STX | BPF_MEM | BPF_W`: a 32-bit store from a register.
pub const STORE_W_OPCODE: u8 = 0x63;
/// `BPF_JMP | BPF_JA` with offset 0: an instruction that does nothing.
const NOP: [u8; 8] = [0x05, 0, 0, 0, 0, 0, 0, 0];

/// Placeholder offset of the hand-over's store into the new connection's
/// `mark` (`struct nf_conn`'s layout differs from build to build, and the
/// verifier lets a program write that one member only, at its exact
/// offset): lbd replaces it with the offset the kernel's BTF gives.
pub const CONN_MARK_PLACEHOLDER: u16 = 0x6c62;

/// The kfuncs the data plane cannot do without: lbd refuses to load it
/// on a kernel that lacks one.
pub const REQUIRED: [&str; 3] = [
    "bpf_iter_num_new",
    "bpf_iter_num_next",
    "bpf_iter_num_destroy",
];

/// The kfuncs the data plane calls: placeholder and the kernel's name.
pub const ALL: [(u32, &str); 10] = [
    (CT_LOOKUP_PLACEHOLDER, "bpf_xdp_ct_lookup"),
    (CT_RELEASE_PLACEHOLDER, "bpf_ct_release"),
    (ITER_NEW_PLACEHOLDER, "bpf_iter_num_new"),
    (ITER_NEXT_PLACEHOLDER, "bpf_iter_num_next"),
    (ITER_DESTROY_PLACEHOLDER, "bpf_iter_num_destroy"),
    (CT_ALLOC_PLACEHOLDER, "bpf_xdp_ct_alloc"),
    (CT_INSERT_PLACEHOLDER, "bpf_ct_insert_entry"),
    (CT_SET_NAT_PLACEHOLDER, "bpf_ct_set_nat_info"),
    (CT_SET_TIMEOUT_PLACEHOLDER, "bpf_ct_set_timeout"),
    (CT_CHANGE_TIMEOUT_PLACEHOLDER, "bpf_ct_change_timeout"),
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

/// Rewrite every 32-bit store at the placeholder offset `placeholder` in
/// `object` to store at `offset`, or, with `None` (the kernel's BTF does
/// not say where the member is), to do nothing. Returns how many
/// instructions were rewritten.
pub fn bind_store(object: &mut [u8], placeholder: u16, offset: Option<u16>) -> usize {
    let mut count = 0;
    for insn in object.chunks_exact_mut(8) {
        let at = u16::from_le_bytes([insn[2], insn[3]]);
        if insn[0] == STORE_W_OPCODE && at == placeholder && insn[4..] == [0; 4] {
            match offset {
                Some(off) => insn[2..4].copy_from_slice(&off.to_le_bytes()),
                None => insn.copy_from_slice(&NOP),
            }
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
    fn the_mark_store_is_bound_to_the_kernels_offset_or_to_nothing() {
        // `*(u32 *)(r6 + 0x6c62) = r1`, and a store elsewhere.
        let store = [STORE_W_OPCODE, 0x16, 0x62, 0x6c, 0, 0, 0, 0];
        let other = [STORE_W_OPCODE, 0x16, 0x08, 0x00, 0, 0, 0, 0];
        let mut object = [store, other, store].concat();
        assert_eq!(
            bind_store(&mut object, CONN_MARK_PLACEHOLDER, Some(0x90)),
            2
        );
        assert_eq!(object[..8], [0x63, 0x16, 0x90, 0, 0, 0, 0, 0]);
        assert_eq!(object[8..16], other);
        let mut object = [store, other].concat();
        assert_eq!(bind_store(&mut object, CONN_MARK_PLACEHOLDER, None), 1);
        assert_eq!(object[..8], NOP);
        assert_eq!(object[8..16], other);
    }

    #[test]
    fn a_placeholder_off_the_instruction_grid_is_not_an_instruction() {
        let mut object = [0u8; 24];
        object[4..12].copy_from_slice(&kfunc_call(CT_LOOKUP_PLACEHOLDER));
        assert_eq!(bind(&mut object, CT_LOOKUP_PLACEHOLDER, Binding::Absent), 0);
    }
}
