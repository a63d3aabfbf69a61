//! Asking the kernel's connection tracking whether it already owns a
//! connection, with the conntrack kfuncs (`bpf_xdp_ct_lookup`,
//! `bpf_ct_release`).
//!
//! Owns only the question "does conntrack hold this TCP/UDP 4-tuple, in
//! either direction?". The typical yes is the reply of a port forward: the
//! LAN server answers a connection that came in on an uplink and was
//! DNATed by the kernel, and that answer must go back through the kernel
//! (which un-DNATs it and routes it out of the uplink it came in on), not
//! be NATed afresh by the fast path. It is asked on the new-flow path
//! only; `lan` remembers the answer in the flow table.
//!
//! Why inline assembly: a kfunc call is a `call` whose source register
//! says "kernel function" (`BPF_PSEUDO_KFUNC_CALL`) and whose immediate is
//! that function's BTF id in the running kernel. Rust has no `__ksym`
//! externs and aya 0.14 resolves none, so the call is written out with a
//! placeholder id ([`lb_common::kfunc`]) that lbd replaces with the kernel's
//! id before loading, or with `r0 = 0` (no connection) on a kernel without
//! the kfuncs: then nothing is the kernel's, as before this existed.
//! It never holds the reference it gets: every path releases it at once.

use core::arch::asm;

use aya_ebpf::programs::XdpContext;
use lb_common::kfunc;

/// `struct bpf_sock_tuple`'s IPv4 half: addresses and ports in network
/// order.
#[repr(C)]
struct SockTupleV4 {
    saddr: [u8; 4],
    daddr: [u8; 4],
    sport: [u8; 2],
    dport: [u8; 2],
}

/// `struct bpf_ct_opts` in its first, 12-byte form: every kernel with the
/// kfuncs takes this size (later ones also take 16, with a zone).
#[repr(C)]
struct CtOpts {
    netns_id: i32,
    error: i32,
    l4proto: u8,
    dir: u8,
    reserved: [u8; 2],
}

/// `BPF_F_CURRENT_NETNS`: the network namespace of the receiving device.
const CURRENT_NETNS: i32 = -1;

/// Whether conntrack tracks the connection of a `proto` (TCP or UDP)
/// packet from `src:sport` to `dst:dport`, as either of its directions.
#[inline(always)]
pub fn tracks(
    ctx: &XdpContext,
    proto: u8,
    src: [u8; 4],
    dst: [u8; 4],
    sport: [u8; 2],
    dport: [u8; 2],
) -> bool {
    let tuple = SockTupleV4 {
        saddr: src,
        daddr: dst,
        sport,
        dport,
    };
    let mut opts = CtOpts {
        netns_id: CURRENT_NETNS,
        error: 0,
        l4proto: proto,
        dir: 0,
        reserved: [0; 2],
    };
    let conn: u64;
    // SAFETY: the call's arguments are what `bpf_xdp_ct_lookup` takes: the
    // program's context, a tuple and options on the stack with their
    // sizes. The kfunc clobbers r1-r5 (the calling convention) and returns
    // in r0 a referenced `struct nf_conn *` or NULL.
    unsafe {
        asm!(
            ".byte {call}, {pseudo}, 0, 0",
            ".4byte {id}",
            call = const kfunc::CALL_OPCODE,
            pseudo = const kfunc::PSEUDO_KFUNC_CALL_REGS,
            id = const kfunc::CT_LOOKUP_PLACEHOLDER,
            inlateout("r1") ctx.ctx as u64 => _,
            inlateout("r2") &tuple as *const SockTupleV4 as u64 => _,
            inlateout("r3") core::mem::size_of::<SockTupleV4>() as u64 => _,
            inlateout("r4") &mut opts as *mut CtOpts as u64 => _,
            inlateout("r5") core::mem::size_of::<CtOpts>() as u64 => _,
            lateout("r0") conn,
        );
    }
    if conn == 0 {
        return false;
    }
    // SAFETY: `conn` is the reference the lookup acquired; `bpf_ct_release`
    // takes it back. Same clobbers as above.
    unsafe {
        asm!(
            ".byte {call}, {pseudo}, 0, 0",
            ".4byte {id}",
            call = const kfunc::CALL_OPCODE,
            pseudo = const kfunc::PSEUDO_KFUNC_CALL_REGS,
            id = const kfunc::CT_RELEASE_PLACEHOLDER,
            inlateout("r1") conn => _,
            lateout("r0") _,
            lateout("r2") _,
            lateout("r3") _,
            lateout("r4") _,
            lateout("r5") _,
        );
    }
    true
}
