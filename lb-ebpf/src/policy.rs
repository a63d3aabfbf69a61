//! Where a new flow goes: the operator's rules pick a policy
//! (`lb_common::policy::decide`, the same code `lbctl explain` runs), the
//! policy's sticky entry or bucket table picks the uplink.
//!
//! Owns the reads of `RULES`, `PORT_BITS`, `PREFIXES`, `POLICIES`,
//! `STICKY` and `LAN_CLASSES`, and asks `answer` for the ICMP error of
//! `fallback = unreachable`. The rules cost a new flow one lookup per field they use
//! (two prefix tries, two port entries, the LAN port), however many there
//! are, and no loop. Only new flows (and flows that must move) come here:
//! an established packet never pays for a rule.

use core::ops::ControlFlow;

use aya_ebpf::{maps::lpm_trie::Key, programs::XdpContext};
use lb_common::{
    hash::{self, Tuple},
    icmp,
    maps::{uplink_state, FlowKey, LanPort, PolicyStats},
    policy::{
        self, fallback, port_index, sticky_holds, Decision, Policy, PrefixKey, RuleBits, StickyKey,
        StickyValue, DEFAULT_POLICY, NO_RULES,
    },
    reason, table, NO_UPLINK,
};

use crate::{
    answer,
    maps::{
        BUCKETS, CLASSIFYING, LAN_CLASSES, POLICIES, POLICY_STATS, PORT_BITS, PREFIXES, RULES,
        SETTINGS, STICKY, UPLINKS,
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
    let decision = decision(ctx, pkt, &tuple);
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
    let Some(info) = POLICIES.get(policy) else {
        return Placement::Refused(reason::DROP_NO_UPLINK);
    };
    if let Some(uplink) = within(policy, info, key, hash, except, now) {
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
            let fallen = POLICIES
                .get(DEFAULT_POLICY)
                .and_then(|d| within(DEFAULT_POLICY, d, key, hash, except, now));
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

/// What the rules decide for a new flow.
#[inline(always)]
fn decision(ctx: &XdpContext, pkt: &Ipv4Packet, tuple: &Tuple) -> Decision {
    // SAFETY: `parse::ipv4` bounds-checked the IPv4 header.
    let tos = unsafe { (*pkt.ip).tos };
    let addrs = u64::from(tuple.src_addr) << 32 | u64::from(tuple.dst_addr);
    let ports = u64::from(tuple.src_port) << 16 | u64::from(tuple.dst_port);
    let meta = u64::from(tuple.proto)
        | u64::from(tos) << 8
        | u64::from(ctx.ingress_ifindex() as u32) << 32;
    Decision::from_word(lb_rules_decide(addrs, ports, meta))
}

/// [`decision`]'s work, as a global BPF function: one that takes and
/// returns only scalars (the flow packed into three words, the decision
/// into one) is checked by the verifier once, on its own, rather than
/// once for every path of `lan_ingress` that reaches it. It is global
/// because the object carries BTF (lb-ebpf/.cargo/config.toml). Its
/// stack frame and lan_ingress's share the kernel's 512 bytes (128 and
/// 360 today): its results are written in place, never held in copies.
#[no_mangle]
#[inline(never)]
pub extern "C" fn lb_rules_decide(addrs: u64, ports: u64, meta: u64) -> u64 {
    let tuple = Tuple {
        src_addr: (addrs >> 32) as u32,
        dst_addr: addrs as u32,
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
                |out, side, addr| by_prefix(out, generation, side, addr),
                |out, side, port| by_port(out, generation, side, port),
                |out| {
                    if let Some(p) = lan_port(ifindex) {
                        *out = p.rules[generation as usize];
                    }
                },
            );
            policy::decide(rules, flow, settings.live_policies)
        }
        _ => policy::NO_MATCH,
    };
    decision.to_word()
}

/// An uplink of `policy` for the flow: its sticky client's, while that
/// holds, else its bucket's (`lb_common::table::steer`, so a state write
/// alone moves new flows off a dead uplink).
#[inline(always)]
fn within(
    policy: u32,
    info: &Policy,
    key: &FlowKey,
    hash: u32,
    except: u32,
    now: u64,
) -> Option<u32> {
    let sticky = if except == NO_UPLINK {
        StickyKey::of(policy, info.sticky, key.src_addr, key.dst_addr)
    } else {
        // A retried SYN is moving away from its uplink on purpose.
        None
    };
    if let Some(skey) = &sticky {
        if let Some(entry) = STICKY.get_ptr_mut(skey) {
            // SAFETY: a pointer into the map's value; a racing CPU may
            // write it too, at worst one timestamp is lost.
            let (last, uplink) = unsafe { ((*entry).last_ns, (*entry).uplink) };
            if sticky_holds(last, now, info.sticky_timeout_ns)
                && info.takes(uplink)
                && takes_new(uplink)
            {
                unsafe { (*entry).last_ns = now };
                count(policy, |s| s.sticky_hits += 1);
                return Some(uplink);
            }
        }
    }
    let table = BUCKETS.get(info.table_index(policy))?;
    // `table::steer`, its turns in a loop the verifier checks once.
    let mut steered = None;
    crate::count::up_to(table::STEER_ATTEMPTS, |attempt| {
        steered = table::steer_at(
            hash,
            attempt,
            |bucket| table.uplinks.get(bucket as usize).copied(),
            |uplink| uplink != except && takes_new(uplink),
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
        let _ = STICKY.insert(skey, &value, 0);
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

/// Into `out`, the rules of `generation` that `addr` (host order)
/// matches on `side`: a longest-prefix lookup. (Results are written in
/// place, never returned: the classifier's stack frame and the one that
/// calls it must fit the kernel's 512 bytes together.)
#[inline(always)]
fn by_prefix(out: &mut RuleBits, generation: u32, side: u32, addr: u32) {
    let key = PrefixKey::new(generation, side, addr.to_be_bytes());
    *out = match PREFIXES.get(Key::new(PrefixKey::TAG_BITS + 32, key)) {
        Some(bits) => *bits,
        None => NO_RULES,
    };
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
