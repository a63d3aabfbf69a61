//! Where a new flow goes: the operator's rules pick a policy
//! (`lb_common::policy::decide`, the same code `lbctl explain` runs), the
//! policy's sticky entry or bucket table picks the uplink.
//!
//! Owns the reads of `RULES`, `PORT_BITS`, `PREFIXES`, `POLICIES`,
//! `STICKY` and `LAN_CLASSES`, and their IPv6 sides (`PREFIXES6`,
//! `POLICIES6`, `BUCKETS6`, `STICKY6`), and asks `answer` for the ICMP
//! error of `fallback = unreachable`. One set of rules serves both
//! families: a rule that names prefixes of one family only matches that
//! family's flows. The rules cost a new flow one lookup per field they
//! use (two prefix tries, two port entries, the LAN port), however many
//! there are, and no loop. Only new flows (and flows that must move) come here:
//! an established packet never pays for a rule.

use core::ops::ControlFlow;

use aya_ebpf::{
    maps::{lpm_trie::Key, Array, LruHashMap},
    programs::XdpContext,
};
use lb_common::{
    hash::{self, Tuple},
    icmp,
    maps::{uplink_state, BucketTable, FlowKey, FlowKey6, LanPort, PolicyStats, Settings},
    policy::{
        self, fallback, port_index, sticky_holds, Decision, Policy, PrefixKey, PrefixKey6,
        RuleBits, StickyKey, StickyKey6, StickyValue, DEFAULT_POLICY, NO_RULES,
    },
    reason, table, NO_UPLINK,
};

use crate::{
    answer,
    maps::{
        BUCKETS, BUCKETS6, CLASSIFYING, CLASSIFYING6, LAN_CLASSES, POLICIES, POLICIES6,
        POLICY_STATS, PORT_BITS, PREFIXES, PREFIXES6, RULES, SETTINGS, STICKY, STICKY6, UPLINKS,
        UPLINKS6,
    },
    parse::Ipv4Packet,
};

/// Where a new flow goes.
pub enum Placement {
    /// Out of this uplink.
    Uplink(u32),
    /// To the kernel's routing (a `kernel` rule).
    Kernel,
    /// Nowhere: a counted drop, for this reason.
    Refused(u32),
    /// Nowhere, and the client is told (`fallback = unreachable`).
    Unreachable,
}

/// What placing differs in between IPv4 and IPv6 flows: each family has
/// its own side of every policy (bucket tables and takers, as an uplink's
/// IPv6 may be down while its IPv4 is up), its own sticky clients, and
/// its own test of whether an uplink takes new flows. The rules, the
/// policies' fallbacks and their counters are shared.
pub trait Family {
    type Key;
    type Sticky: 'static;
    fn policies() -> &'static Array<Policy>;
    fn buckets() -> &'static Array<BucketTable>;
    fn sticky() -> &'static LruHashMap<Self::Sticky, StickyValue>;
    fn sticky_key(policy: u32, by: u32, key: &Self::Key) -> Option<Self::Sticky>;
    fn takes_new(uplink: u32) -> bool;
}

pub struct V4;
pub struct V6;

impl Family for V4 {
    type Key = FlowKey;
    type Sticky = StickyKey;
    #[inline(always)]
    fn policies() -> &'static Array<Policy> {
        &POLICIES
    }
    #[inline(always)]
    fn buckets() -> &'static Array<BucketTable> {
        &BUCKETS
    }
    #[inline(always)]
    fn sticky() -> &'static LruHashMap<StickyKey, StickyValue> {
        &STICKY
    }
    #[inline(always)]
    fn sticky_key(policy: u32, by: u32, key: &FlowKey) -> Option<StickyKey> {
        StickyKey::of(policy, by, key.src_addr, key.dst_addr)
    }
    #[inline(always)]
    fn takes_new(uplink: u32) -> bool {
        takes_new(uplink)
    }
}

impl Family for V6 {
    type Key = FlowKey6;
    type Sticky = StickyKey6;
    #[inline(always)]
    fn policies() -> &'static Array<Policy> {
        &POLICIES6
    }
    #[inline(always)]
    fn buckets() -> &'static Array<BucketTable> {
        &BUCKETS6
    }
    #[inline(always)]
    fn sticky() -> &'static LruHashMap<StickyKey6, StickyValue> {
        &STICKY6
    }
    #[inline(always)]
    fn sticky_key(policy: u32, by: u32, key: &FlowKey6) -> Option<StickyKey6> {
        StickyKey6::of(policy, by, key.src_addr, key.dst_addr)
    }
    #[inline(always)]
    fn takes_new(uplink: u32) -> bool {
        takes_new6(uplink)
    }
}

/// Place a new flow (or one that must move) on an uplink, never `except`
/// ([`NO_UPLINK`]: any). `now` is the coarse clock, for stickiness.
#[inline(always)]
pub fn place(
    ctx: &XdpContext,
    pkt: &Ipv4Packet,
    key: &FlowKey,
    except: u32,
    now: u64,
) -> Placement {
    let Some(settings) = SETTINGS.get(0) else {
        return Placement::Refused(reason::DROP_NO_UPLINK);
    };
    let tuple = tuple(key);
    let hash = hash::classify(settings.seed, settings.mode, &tuple);
    // SAFETY: `parse::ipv4` bounds-checked the IPv4 header.
    let tos = unsafe { (*pkt.ip).tos };
    let addrs = u64::from(tuple.src_addr) << 32 | u64::from(tuple.dst_addr);
    let decision = Decision::from_word(lb_rules_decide(
        addrs,
        packed_ports(&tuple),
        packed_meta(ctx, &tuple, tos),
    ));
    placement::<V4>(decision, key, hash, except, now)
}

/// [`place`] for an IPv6 flow; `tclass` is its traffic class (whose DSCP
/// the rules match as an IPv4 packet's).
#[inline(always)]
pub fn place6(ctx: &XdpContext, key: &FlowKey6, tclass: u8, except: u32, now: u64) -> Placement {
    let Some(settings) = SETTINGS.get(0) else {
        return Placement::Refused(reason::DROP_NO_UPLINK);
    };
    let tuple = key.tuple();
    let hash = hash::classify(settings.seed, settings.mode, &tuple);
    let Some(addrs) = CLASSIFYING6.get_ptr_mut(0) else {
        return Placement::Refused(reason::DROP_NO_UPLINK);
    };
    // SAFETY: this CPU's slot, read by `lb_rules_decide6` below and by
    // nothing else before this program ends.
    unsafe { *addrs = [key.src_addr, key.dst_addr] };
    // The tuple's ports and protocol are the flow's own (its addresses are
    // folded for hashing, and the rules look at the whole ones).
    let decision = Decision::from_word(lb_rules_decide6(
        packed_ports(&tuple),
        packed_meta(ctx, &tuple, tclass),
    ));
    placement::<V6>(decision, key, hash, except, now)
}

#[inline(always)]
fn packed_ports(tuple: &Tuple) -> u64 {
    u64::from(tuple.src_port) << 16 | u64::from(tuple.dst_port)
}

/// The protocol, the TOS (traffic class) byte and the LAN port, in one
/// word for the rules' BPF functions.
#[inline(always)]
fn packed_meta(ctx: &XdpContext, tuple: &Tuple, tos: u8) -> u64 {
    u64::from(tuple.proto) | u64::from(tos) << 8 | u64::from(ctx.ingress_ifindex() as u32) << 32
}

/// Where the rules' `decision` puts a flow of family `F`: its policy's
/// uplink, or what the policy's fallback says when none of them can take
/// it any more.
#[inline(always)]
fn placement<F: Family>(
    decision: Decision,
    key: &F::Key,
    hash: u32,
    except: u32,
    now: u64,
) -> Placement {
    let policy = match decision {
        Decision::Kernel { .. } => return Placement::Kernel,
        Decision::Drop { policy, .. } => {
            count(policy, |s| s.dropped += 1);
            return Placement::Refused(reason::DROP_POLICY);
        }
        Decision::Unreachable { policy, .. } => {
            count(policy, |s| s.unreachable += 1);
            return Placement::Unreachable;
        }
        Decision::Policy { policy, .. } => policy,
    };
    let Some(info) = F::policies().get(policy) else {
        return Placement::Refused(reason::DROP_NO_UPLINK);
    };
    if let Some(uplink) = within::<F>(policy, info, key, hash, except, now) {
        count(policy, |s| s.new_flows += 1);
        return Placement::Uplink(uplink);
    }
    // The rules saw the policy take new flows, but its uplinks went down
    // since (their states are written a moment before its new table): its
    // fallback, with `next` taken as the default policy.
    match info.fallback {
        fallback::DROP => {
            count(policy, |s| s.dropped += 1);
            Placement::Refused(reason::DROP_POLICY)
        }
        fallback::UNREACHABLE => {
            count(policy, |s| s.unreachable += 1);
            Placement::Unreachable
        }
        _ if policy != DEFAULT_POLICY => {
            let fallen = F::policies()
                .get(DEFAULT_POLICY)
                .and_then(|d| within::<F>(DEFAULT_POLICY, d, key, hash, except, now));
            match fallen {
                Some(uplink) => {
                    count(DEFAULT_POLICY, |s| s.new_flows += 1);
                    Placement::Uplink(uplink)
                }
                None => Placement::Refused(reason::DROP_NO_UPLINK),
            }
        }
        _ => Placement::Refused(reason::DROP_NO_UPLINK),
    }
}

/// What the rules decide for a new IPv4 flow, as a global BPF function:
/// one that takes and returns only scalars (the flow packed into three
/// words, the decision into one) is checked by the verifier once, on its
/// own, rather than once for every path of `lan_ingress` that reaches it.
/// It is global because the object carries BTF (lb-ebpf/.cargo/config.toml).
/// Its stack frame and lan_ingress's share the kernel's 512 bytes (128 and
/// 360 today): its results are written in place, never held in copies.
#[no_mangle]
#[inline(never)]
pub extern "C" fn lb_rules_decide(addrs: u64, ports: u64, meta: u64) -> u64 {
    let (src, dst) = ((addrs >> 32) as u32, addrs as u32);
    classify(ports, meta, false, |out, generation, side| {
        let addr = if side == policy::SRC_SIDE { src } else { dst };
        let key = PrefixKey::new(generation, side, addr.to_be_bytes());
        *out = match PREFIXES.get(Key::new(PrefixKey::TAG_BITS + 32, key)) {
            Some(bits) => *bits,
            None => NO_RULES,
        };
    })
}

/// [`lb_rules_decide`] for an IPv6 flow, whose addresses wait in this
/// CPU's `CLASSIFYING6` slot (they would take four more words).
#[no_mangle]
#[inline(never)]
pub extern "C" fn lb_rules_decide6(ports: u64, meta: u64) -> u64 {
    let Some(addrs) = CLASSIFYING6.get_ptr(0) else {
        return policy::NO_MATCH.to_word();
    };
    classify(ports, meta, true, |out, generation, side| {
        // SAFETY: this CPU's slot, written by `place6` just before.
        let addr = unsafe { (*addrs)[(side & 1) as usize] };
        let key = PrefixKey6::new(generation, side, addr);
        *out = match PREFIXES6.get(Key::new(PrefixKey::TAG_BITS + 128, key)) {
            Some(bits) => *bits,
            None => NO_RULES,
        };
    })
}

/// The rules' decision for a flow (ports and protocol, TOS and LAN port
/// packed as [`packed_ports`] and [`packed_meta`] say), whose addresses
/// `prefix(out, generation, side)` looks up; `ipv6` picks the policies'
/// IPv6 liveness.
#[inline(always)]
fn classify(
    ports: u64,
    meta: u64,
    ipv6: bool,
    mut prefix: impl FnMut(&mut RuleBits, u32, u32),
) -> u64 {
    let tuple = Tuple {
        src_addr: 0,
        dst_addr: 0,
        src_port: (ports >> 16) as u16,
        dst_port: ports as u16,
        proto: meta as u8,
    };
    let tos = (meta >> 8) as u8;
    let ifindex = (meta >> 32) as u32;
    let Some(settings) = SETTINGS.get(0) else {
        return policy::NO_MATCH.to_word();
    };
    let generation = settings.active_rules & 1;
    let decision = match (RULES.get(generation), CLASSIFYING.get_ptr_mut(0)) {
        (Some(rules), Some(flow)) if rules.count > 0 => {
            // SAFETY: this CPU's slot, used by this program alone and
            // only until it returns.
            let flow = unsafe { &mut *flow };
            flow.proto = tuple.proto;
            flow.dscp = policy::dscp_of(tos);
            flow.found.look_up(
                rules,
                &tuple,
                |out, side| prefix(out, generation, side),
                |out, side, port| by_port(out, generation, side, port),
                |out| {
                    if let Some(p) = lan_port(ifindex) {
                        *out = p.rules[generation as usize];
                    }
                },
            );
            policy::decide(rules, flow, live(settings, ipv6))
        }
        _ => policy::NO_MATCH,
    };
    decision.to_word()
}

/// The policies one of whose uplinks takes new flows of the family.
#[inline(always)]
fn live(settings: &Settings, ipv6: bool) -> u32 {
    if ipv6 {
        settings.live_policies6
    } else {
        settings.live_policies
    }
}

/// An uplink of `policy` for the flow: its sticky client's, while that
/// holds, else its bucket's (`lb_common::table::steer`, so a state write
/// alone moves new flows off a dead uplink).
#[inline(always)]
fn within<F: Family>(
    policy: u32,
    info: &Policy,
    key: &F::Key,
    hash: u32,
    except: u32,
    now: u64,
) -> Option<u32> {
    let sticky = if except == NO_UPLINK {
        F::sticky_key(policy, info.sticky, key)
    } else {
        // A retried SYN is moving away from its uplink on purpose.
        None
    };
    if let Some(skey) = &sticky {
        if let Some(entry) = F::sticky().get_ptr_mut(skey) {
            // SAFETY: a pointer into the map's value; a racing CPU may
            // write it too, at worst one timestamp is lost.
            let (last, uplink) = unsafe { ((*entry).last_ns, (*entry).uplink) };
            if sticky_holds(last, now, info.sticky_timeout_ns)
                && info.takes(uplink)
                && F::takes_new(uplink)
            {
                unsafe { (*entry).last_ns = now };
                count(policy, |s| s.sticky_hits += 1);
                return Some(uplink);
            }
        }
    }
    let table = F::buckets().get(info.table_index(policy))?;
    // `table::steer`, its turns in a loop the verifier checks once.
    let mut steered = None;
    crate::count::up_to(table::STEER_ATTEMPTS, |attempt| {
        steered = table::steer_at(
            hash,
            attempt,
            |bucket| table.uplinks.get(bucket as usize).copied(),
            |uplink| uplink != except && F::takes_new(uplink),
        );
        if steered.is_some() {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    });
    let uplink = steered?;
    if let Some(skey) = &sticky {
        let value = StickyValue {
            last_ns: now,
            uplink,
            _pad: 0,
        };
        // A new entry, or one that expired or whose uplink died: the
        // client's stickiness follows it to its new uplink.
        let _ = F::sticky().insert(skey, &value, 0);
    }
    Some(uplink)
}

/// Whether `uplink` can take a new flow now.
#[inline(always)]
fn takes_new(uplink: u32) -> bool {
    UPLINKS.get(uplink).is_some_and(|info| {
        info.state == uplink_state::ACTIVE && info.ifindex != 0 && info.gw_mac != [0; 6]
    })
}

/// Whether `uplink` takes new IPv6 flows now: its IPv6 is in service and
/// its IPv6 next hop known, on a device that is there.
#[inline(always)]
pub fn takes_new6(uplink: u32) -> bool {
    UPLINKS6
        .get(uplink)
        .is_some_and(|six| six.state == uplink_state::ACTIVE && six.gw_mac != [0; 6])
        && UPLINKS.get(uplink).is_some_and(|info| info.ifindex != 0)
}

/// Into `out`, the rules of `generation` that `port` matches on `side`.
#[inline(always)]
fn by_port(out: &mut RuleBits, generation: u32, side: u32, port: u16) {
    *out = match PORT_BITS.get(port_index(generation, side, port)) {
        Some(bits) => *bits,
        None => NO_RULES,
    };
}

/// What `LAN_CLASSES` says of LAN port `ifindex`.
#[inline(always)]
pub fn lan_port(ifindex: u32) -> Option<&'static LanPort> {
    // SAFETY: a reference into the map's value, which lbd only replaces
    // whole (the kernel frees an old value after the readers are gone).
    unsafe { LAN_CLASSES.get(&ifindex) }
}

#[inline(always)]
pub fn tuple(key: &FlowKey) -> Tuple {
    Tuple {
        src_addr: u32::from_be_bytes(key.src_addr),
        dst_addr: u32::from_be_bytes(key.dst_addr),
        src_port: u16::from_be_bytes(key.src_port),
        dst_port: u16::from_be_bytes(key.dst_port),
        proto: key.proto,
    }
}

/// Update the counters of `policy` with `f`.
#[inline(always)]
fn count(policy: u32, f: impl FnOnce(&mut PolicyStats)) {
    if let Some(s) = POLICY_STATS.get_ptr_mut(policy) {
        // SAFETY: per-CPU slot, only this program on this CPU touches it.
        f(unsafe { &mut *s });
    }
}

/// Answer a new flow refused by `fallback = unreachable` with an ICMP
/// "host unreachable" (see `answer`).
#[inline(always)]
pub fn unreachable(ctx: &XdpContext, pkt: &Ipv4Packet) -> Result<u32, u32> {
    answer::icmp_error(
        ctx,
        pkt,
        icmp::host_unreachable,
        reason::DROP_POLICY_UNREACHABLE,
    )
}
