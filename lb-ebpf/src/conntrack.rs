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
//! The calls go through `kfunc::call`: on a kernel without the kfuncs the
//! lookup finds nothing, and nothing is the kernel's, as before this
//! existed. It never holds the reference it gets: every path releases it
//! at once.

use aya_ebpf::{bindings::xdp_md, programs::XdpContext};
use lb_common::kfunc::{CT_LOOKUP_PLACEHOLDER, CT_RELEASE_PLACEHOLDER};

use crate::kfunc;

/// `struct bpf_sock_tuple`'s IPv4 half: addresses and ports in network
/// order.
#[repr(C)]
struct SockTupleV4 {
    saddr: [u8; 4],
    daddr: [u8; 4],
    sport: [u8; 2],
    dport: [u8; 2],
}

/// `struct bpf_sock_tuple`'s IPv6 half.
#[repr(C)]
struct SockTupleV6 {
    saddr: [u8; 16],
    daddr: [u8; 16],
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
    look_up(ctx, proto, &tuple)
}

/// [`tracks`] as a BPF function of its own, for a caller whose stack frame
/// has no room left for the lookup's tuple and options: they take a frame
/// of their own. `ports` packs the source port (high half) and the
/// destination port, network order each.
#[inline(never)]
pub fn tracks_in_own_frame(
    ctx: *mut xdp_md,
    proto: u8,
    src: [u8; 4],
    dst: [u8; 4],
    ports: u32,
) -> bool {
    let [s0, s1, d0, d1] = ports.to_be_bytes();
    tracks(&XdpContext::new(ctx), proto, src, dst, [s0, s1], [d0, d1])
}

/// [`tracks`] for IPv6: on a router without NAT66 this is above all a
/// connection from the internet to a LAN host (the firewall let it in),
/// whose answers must leave as they came, untranslated.
#[inline(always)]
pub fn tracks6(
    ctx: &XdpContext,
    proto: u8,
    src: [u8; 16],
    dst: [u8; 16],
    sport: [u8; 2],
    dport: [u8; 2],
) -> bool {
    let tuple = SockTupleV6 {
        saddr: src,
        daddr: dst,
        sport,
        dport,
    };
    look_up(ctx, proto, &tuple)
}

/// Ask conntrack for `tuple` (a `bpf_sock_tuple` half, whose size tells
/// the kernel the family), releasing what it finds at once.
#[inline(always)]
fn look_up<T>(ctx: &XdpContext, proto: u8, tuple: &T) -> bool {
    let mut opts = CtOpts {
        netns_id: CURRENT_NETNS,
        error: 0,
        l4proto: proto,
        dir: 0,
        reserved: [0; 2],
    };
    let conn = kfunc::call!(
        CT_LOOKUP_PLACEHOLDER,
        ctx.ctx as u64,
        tuple as *const T as u64,
        core::mem::size_of::<T>() as u64,
        &mut opts as *mut CtOpts as u64,
        core::mem::size_of::<CtOpts>() as u64,
    );
    if conn == 0 {
        return false;
    }
    kfunc::call!(CT_RELEASE_PLACEHOLDER, conn);
    true
}
