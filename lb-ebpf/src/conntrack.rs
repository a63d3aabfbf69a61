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
//! And it writes one kind of connection in: [`hand_over`], a fast-path
//! UDP flow whose datagram only the kernel can send (too big for the
//! uplink, without DF: the kernel fragments it), translated as the fast
//! path translates the flow, so that the kernel's NAT gives it the same
//! source.
//!
//! The calls go through `kfunc::call`: on a kernel without the kfuncs the
//! lookup finds nothing, and nothing is the kernel's, as before this
//! existed; without the ones that write, nothing is written. It never
//! holds the reference it gets: every path releases it at once.

use aya_ebpf::{bindings::xdp_md, programs::XdpContext};
use lb_common::kfunc::{
    CONN_MARK_PLACEHOLDER, CT_ALLOC_PLACEHOLDER, CT_CHANGE_TIMEOUT_PLACEHOLDER,
    CT_INSERT_PLACEHOLDER, CT_LOOKUP_PLACEHOLDER, CT_RELEASE_PLACEHOLDER, CT_SET_NAT_PLACEHOLDER,
    CT_SET_TIMEOUT_PLACEHOLDER,
};

use crate::{kfunc, parse::IPPROTO_UDP};

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

impl CtOpts {
    /// Options for a connection of `proto` in the receiving device's
    /// namespace.
    #[inline(always)]
    fn here(proto: u8) -> Self {
        CtOpts {
            netns_id: CURRENT_NETNS,
            error: 0,
            l4proto: proto,
            dir: 0,
            reserved: [0; 2],
        }
    }
}

/// `enum nf_nat_manip_type`: which end a translation rewrites.
const NAT_MANIP_SRC: u64 = 0;
const NAT_MANIP_DST: u64 = 1;

/// `union nf_inet_addr`: an IPv4 address in its first four bytes.
#[repr(C)]
struct InetAddr([u8; 16]);

impl InetAddr {
    #[inline(always)]
    fn v4(addr: [u8; 4]) -> Self {
        let mut all = [0; 16];
        all[..4].copy_from_slice(&addr);
        InetAddr(all)
    }
}

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
    let conn = find(ctx, proto, tuple);
    if conn == 0 {
        return false;
    }
    kfunc::call!(CT_RELEASE_PLACEHOLDER, conn);
    true
}

/// The connection conntrack holds for `tuple`, held (the caller releases
/// it), or 0.
#[inline(always)]
fn find<T>(ctx: &XdpContext, proto: u8, tuple: &T) -> u64 {
    let mut opts = CtOpts::here(proto);
    kfunc::call!(
        CT_LOOKUP_PLACEHOLDER,
        ctx.ctx as u64,
        tuple as *const T as u64,
        core::mem::size_of::<T>() as u64,
        &mut opts as *mut CtOpts as u64,
        core::mem::size_of::<CtOpts>() as u64,
    )
}

/// One UDP datagram's connection, for [`hand_over`]: the client's end
/// and the remote end as the datagram carries them, and the fast path's
/// translation of the client's end. Addresses and ports in network
/// order.
pub struct Handed {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub nat_addr: [u8; 4],
    pub nat_port: [u8; 2],
}

/// See that conntrack translates `conn`'s connection as the fast path
/// translates its flow: source `nat_addr:nat_port` (and its destination
/// kept: no rule of the kernel's is asked for it), connmark `mark`
/// (`lb_common::marks::handed`). A connection conntrack already has is
/// kept if it is translated so (an earlier datagram of the flow handed
/// it over), and timed out at once if not (the flow moved since, or the
/// kernel translated a datagram of it itself): its next lookup lets go
/// of it, and this one's writes the connection anew. Whether conntrack
/// now translates it as the flow: `false` when it could not be made so,
/// and the kernel has the datagram as it would without lb. A BPF function
/// of its own: its tuples, options and addresses take a frame of their
/// own.
#[inline(never)]
pub fn hand_over(ctx: *mut xdp_md, conn: &Handed, mark: u32) -> bool {
    let xdp = XdpContext::new(ctx);
    let original = SockTupleV4 {
        saddr: conn.src,
        daddr: conn.dst,
        sport: conn.sport,
        dport: conn.dport,
    };
    let existing = find(&xdp, IPPROTO_UDP, &original);
    if existing != 0 {
        // Translated as the flow is, its replies come to the flow's
        // address and port.
        let current = tracks(
            &xdp,
            IPPROTO_UDP,
            conn.dst,
            conn.nat_addr,
            conn.dport,
            conn.nat_port,
        );
        if !current {
            kfunc::call!(CT_CHANGE_TIMEOUT_PLACEHOLDER, existing, 0);
        }
        kfunc::call!(CT_RELEASE_PLACEHOLDER, existing);
        // Still there after a lookup, which lets go of an expired one: in
        // use elsewhere this moment (or lbd left the hand-over off).
        if current || look_up(&xdp, IPPROTO_UDP, &original) {
            return current;
        }
    }
    let mut opts = CtOpts::here(IPPROTO_UDP);
    let new = kfunc::call!(
        CT_ALLOC_PLACEHOLDER,
        ctx as u64,
        &original as *const SockTupleV4 as u64,
        core::mem::size_of::<SockTupleV4>() as u64,
        &mut opts as *mut CtOpts as u64,
        core::mem::size_of::<CtOpts>() as u64,
    );
    if new == 0 {
        return false;
    }
    let translated = set_nat(new, conn.nat_addr, conn.nat_port, NAT_MANIP_SRC);
    let kept = set_nat(new, conn.dst, conn.dport, NAT_MANIP_DST);
    if translated && kept {
        set_mark(new, mark);
    } else {
        // An allocated connection is only ever let go of by inserting it;
        // inserted, conntrack never translates it afresh (it counts as
        // translated once inserted). So it is born expired: its first
        // lookup lets go of it, and the kernel's own NAT and routing take
        // the datagram, as without a hand-over.
        kfunc::call!(CT_SET_TIMEOUT_PLACEHOLDER, new, 0);
    }
    let inserted = kfunc::call!(CT_INSERT_PLACEHOLDER, new);
    if inserted == 0 {
        return false;
    }
    kfunc::call!(CT_RELEASE_PLACEHOLDER, inserted);
    translated && kept
}

/// Translate end `manip` of the new connection `new` to `addr:port`
/// (network order): whether conntrack took it.
#[inline(always)]
fn set_nat(new: u64, addr: [u8; 4], port: [u8; 2], manip: u64) -> bool {
    let addr = InetAddr::v4(addr);
    kfunc::call!(
        CT_SET_NAT_PLACEHOLDER,
        new,
        &addr as *const InetAddr as u64,
        u64::from(u16::from_be_bytes(port)),
        manip,
    ) == 0
}

/// `conn->mark = mark` on a connection not yet inserted: the only member
/// of `struct nf_conn` the verifier lets a program write, at the offset
/// lbd binds from the kernel's BTF (`lb_common::kfunc::bind_store`).
#[inline(always)]
fn set_mark(conn: u64, mark: u32) {
    // SAFETY: `conn` is a connection the allocation returned (not null);
    // the verifier checks the store against its BTF type at load.
    unsafe {
        core::arch::asm!(
            "*(u32 *)({conn} + {off}) = {mark}",
            conn = in(reg) conn,
            mark = in(reg) u64::from(mark),
            off = const CONN_MARK_PLACEHOLDER,
        );
    }
}
