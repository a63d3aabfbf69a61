//! The last step of forwarding: out of the target device by `XDP_REDIRECT`,
//! or, when that device's qdisc is to be honoured, handed over to lb's tc
//! program (`handoff`), which sends it through the qdisc. See
//! `lb_common::egress`.
//!
//! Owns the hand-off note and nothing else: the decision and the rewrite
//! are done before `send` and are the same on both paths. Never drops what
//! it cannot hand over: a frame without headroom for the note, or bound
//! for a device whose index the note cannot carry, gets the XDP path.
//!
//! Also the ring watch (`watch`): what `XDP_REDIRECT` lost to a full ring,
//! per device, for lbd to hand that device to its queue while it
//! overflows (`lb_common::egress` says why).

use core::intrinsics::{atomic_xadd, AtomicOrdering};

use aya_ebpf::{
    bindings::{
        xdp_action::XDP_PASS, xdp_action::XDP_REDIRECT, xdp_md, TC_ACT_SHOT, TC_ACT_UNSPEC,
    },
    helpers::{bpf_probe_read_kernel, bpf_redirect, bpf_skb_vlan_pop},
    programs::{RawTracePointContext, TcContext, XdpContext},
};
use lb_common::{
    egress::{
        self, note, path, Egress, Note, RingBinding, RING_ARG_DROPS, RING_ARG_ERR, RING_ARG_TO_DEV,
    },
    reason, IFINDEX_SLOTS,
};

use crate::{
    maps::{EGRESS, EGRESS_ANY, EGRESS_AT, RING_DROPS, RING_EVENTS},
    parse::Frame,
    stats,
};

/// Bytes of the two MAC addresses, which stay in front of the note.
const MACS: usize = 12;

/// Where this kernel keeps what the ring watch reads, and lbd's network
/// namespace: lbd sets it at load from the kernel's BTF
/// ([`lb_common::egress::RING_BINDING_GLOBAL`]); all zero keeps the watch
/// idle.
#[no_mangle]
static RING_BINDING: RingBinding = RingBinding {
    ifindex: 0,
    net: 0,
    inum: 0,
    netns: 0,
};

/// Send the rewritten frame out of device `ifindex`: `redirect` does it
/// the XDP way; a device whose qdisc counts gets a hand-off instead.
/// `uplink` and `client` (its address) pick the class on a device lb
/// shapes.
#[inline(always)]
pub fn send(
    ctx: &XdpContext,
    ifindex: u32,
    uplink: u32,
    client: [u8; 4],
    redirect: impl FnOnce() -> Result<u32, u32>,
) -> u32 {
    if way_out(ifindex).is_some_and(|out| out.path == path::QDISC) {
        let note = Note {
            ifindex,
            uplink,
            leaf: egress::leaf(client),
        };
        if let Some([outer, inner]) = note::tags(&note) {
            if hand_off(ctx.ctx, u64::from(outer) << 16 | u64::from(inner)) {
                return XDP_PASS;
            }
        }
    }
    match redirect() {
        Ok(XDP_REDIRECT) => XDP_REDIRECT,
        _ => stats::drop(reason::DROP_REDIRECT_FAILED),
    }
}

/// Send a packet that tc took in (a reply from an L3 uplink, its
/// Ethernet header pushed) out of device `ifindex`, through its qdisc, as
/// [`send`] does for XDP: to the bridge a shaped port names, in the class
/// of `uplink` and `client`.
#[inline(always)]
pub fn send_tc(ctx: &TcContext, ifindex: u32, uplink: u32, client: [u8; 4]) -> i32 {
    let (to, priority) = queue(ifindex, uplink, egress::leaf(client));
    redirect_tc(ctx, to, priority)
}

/// How lbd said to send out of `ifindex`, when it said anything.
#[inline(always)]
fn way_out(ifindex: u32) -> Option<Egress> {
    if ifindex < IFINDEX_SLOTS {
        return EGRESS_AT.get(ifindex).copied();
    }
    let any = EGRESS_ANY.get(0).is_some_and(|&n| n != 0);
    // SAFETY: a lookup; the value is copied out at once.
    any.then(|| unsafe { EGRESS.get(&ifindex) }.copied())
        .flatten()
}

/// Where a packet for `ifindex` queues (the bridge of a shaped port, or
/// the device itself) and in which class, for `uplink`'s client in leaf
/// `leaf`.
#[inline(always)]
fn queue(ifindex: u32, uplink: u32, leaf: u32) -> (u32, u32) {
    let out = way_out(ifindex).unwrap_or_default();
    let to = if out.ifindex != 0 {
        out.ifindex
    } else {
        ifindex
    };
    (to, egress::class(out.shaper_major, uplink, leaf))
}

/// tc's part: into device `to`'s egress (its qdisc), in class `priority`
/// (0: the qdisc's choice).
#[inline(always)]
fn redirect_tc(ctx: &TcContext, to: u32, priority: u32) -> i32 {
    if priority != 0 {
        // SAFETY: tc programs may write `priority`.
        unsafe { (*ctx.skb.skb).priority = priority };
    }
    // SAFETY: no preconditions; it names the device and tc does the rest.
    unsafe { bpf_redirect(to, 0) as i32 }
}

/// Write the note (tag control words `tags`: the outer in bits 16..32,
/// the inner in 0..16) in front of the frame's EtherType, behind its MAC
/// addresses. `false`, and the frame as it was, when there is no room.
/// A BPF function of its own, taking scalars: its few bytes of stack are
/// not added to the callers' frames, which the rules fill.
#[inline(never)]
fn hand_off(ctx: *mut xdp_md, tags: u64) -> bool {
    let ctx = XdpContext::new(ctx);
    if ctx.adjust_head(-(note::LEN as i32)).is_err() {
        return false;
    }
    let start = ctx.data();
    if start + note::LEN + MACS > ctx.data_end() {
        // Cannot be (the frame had its Ethernet header): undo all the same.
        let _ = ctx.adjust_head(note::LEN as i32);
        return false;
    }
    let at = start as *mut u8;
    let [outer_hi, outer_lo, inner_hi, inner_lo] = (tags as u32).to_be_bytes();
    let [tpid_hi, tpid_lo] = note::TPID.to_be_bytes();
    // SAFETY: bounds-checked just above. The MAC addresses move to the
    // new start: all read before any is written, as the two overlap.
    unsafe {
        let macs = core::ptr::read_unaligned(at.add(note::LEN) as *const [u8; MACS]);
        core::ptr::write_unaligned(at as *mut [u8; MACS], macs);
        core::ptr::write_unaligned(
            at.add(MACS) as *mut [u8; note::LEN],
            [
                tpid_hi, tpid_lo, outer_hi, outer_lo, tpid_hi, tpid_lo, inner_hi, inner_lo,
            ],
        );
    }
    true
}

/// lb's tc program: a packet that carries a note goes out of the note's
/// device, through its qdisc, in its class. The kernel took the outer
/// tag off already (into the packet's VLAN fields); the inner one follows
/// it there when the outer is popped. Anything else goes on to whatever
/// else the device has (tc's "next").
#[inline(always)]
pub fn carry(ctx: &TcContext) -> i32 {
    let Some(outer) = vlan_tag(ctx) else {
        return TC_ACT_UNSPEC;
    };
    if !note::marks(outer) {
        return TC_ACT_UNSPEC;
    }
    // SAFETY: the helper edits the packet it is given, nothing else.
    if unsafe { bpf_skb_vlan_pop(ctx.skb.skb.cast()) } != 0 {
        return bad_note();
    }
    let Some(note) = vlan_tag(ctx).and_then(|inner| note::read(outer, inner)) else {
        return bad_note();
    };
    // The second pop leaves the rewritten frame as XDP wrote it (its own
    // tag, if its device has one, goes back on when it is sent).
    if unsafe { bpf_skb_vlan_pop(ctx.skb.skb.cast()) } != 0 {
        return bad_note();
    }
    let (to, priority) = queue(note.ifindex, note.uplink, note.leaf);
    redirect_tc(ctx, to, priority)
}

/// A noted frame that cannot be carried: counted, and dropped.
#[inline(always)]
fn bad_note() -> i32 {
    stats::count(reason::DROP_BAD_NOTE);
    TC_ACT_SHOT
}

/// The tag control word of the packet's (outermost) VLAN tag, which the
/// kernel keeps beside the packet, when it has one.
#[inline(always)]
fn vlan_tag(ctx: &TcContext) -> Option<u16> {
    let skb = ctx.skb.skb;
    // SAFETY: reading the context's fields.
    let (present, tci) = unsafe { ((*skb).vlan_present, (*skb).vlan_tci) };
    (present != 0).then_some(tci as u16)
}

/// The ring watch, on the `xdp_devmap_xmit` tracepoint (every device map
/// flush, on every CPU, in every namespace, whoever redirected): frames
/// the flush could not put into the target's ring (or that it refused)
/// are added to the target's `RING_DROPS` entry, and counted as
/// `drop_ring_full`, when the
/// target is in lbd's namespace and lbd made an entry for it (a device lb
/// sends to), and lbd is woken (`RING_EVENTS`); flushes that placed
/// everything cost one test. A flush the target refused whole (its error
/// set) is counted as `drop_target_refused` instead, in the same entry,
/// and wakes no one: lbd's tick reads it, and tells a device without
/// carrier, which no queue would help, from one whose queue may.
#[inline(always)]
pub fn watch(ctx: &RawTracePointContext) -> i32 {
    // `int drops`: the low 32 bits of its argument slot.
    let drops = ctx.arg::<u64>(RING_ARG_DROPS) as u32 as i32;
    if drops <= 0 {
        return 0;
    }
    let refused = ctx.arg::<u64>(RING_ARG_ERR) as u32 as i32 != 0;
    // SAFETY: a read of a global that the loader may have rewritten.
    let at = unsafe { core::ptr::read_volatile(&RING_BINDING) };
    if at.ifindex == 0 {
        return 0;
    }
    let dev = ctx.arg::<u64>(RING_ARG_TO_DEV);
    let Some(net) = read_kernel::<u64>(dev, at.net) else {
        return 0;
    };
    if read_kernel::<u32>(net, at.inum) != Some(at.netns) {
        return 0;
    }
    let Some(ifindex) = read_kernel::<u32>(dev, at.ifindex) else {
        return 0;
    };
    let Some(count) = RING_DROPS.get_ptr_mut(ifindex) else {
        return 0;
    };
    let drops = drops as u64;
    // SAFETY: a map value; flushes on other CPUs add to it at the same
    // time, hence the atomic add (BPF's `lock xadd`: the target has no
    // `AtomicU64::fetch_add`).
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(count, drops) };
    let why = if refused {
        reason::DROP_TARGET_REFUSED
    } else {
        reason::DROP_RING_FULL
    };
    stats::count_many(why, drops);
    // Wake lbd for a full ring (if its buffer is full, lbd is awake
    // already). A refused flush waits for lbd's tick: a device without
    // carrier goes on refusing for as long as traffic comes.
    if !refused {
        let _ = RING_EVENTS.output::<u32>(ifindex, 0);
    }
    0
}

/// The `T` at `offset` bytes into the kernel object at `base`.
#[inline(always)]
fn read_kernel<T>(base: u64, offset: u32) -> Option<T> {
    // SAFETY: the helper checks the address; a bad one is an error.
    unsafe { bpf_probe_read_kernel(base.wrapping_add(u64::from(offset)) as usize as *const T) }.ok()
}
