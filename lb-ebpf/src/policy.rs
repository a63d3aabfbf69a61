//! Where a new flow goes: the operator's rules pick a policy
//! (`lb_common::policy::decide`, the same code `lbctl explain` runs), the
//! policy's sticky entry or bucket table picks the uplink.
//!
//! Owns the reads of `RULES`, `POLICIES`, `PREFIX_SETS`, `STICKY` and
//! `LAN_CLASSES`, and the ICMP error of `fallback = unreachable`. Only new
//! flows (and flows that must move) come here: an established packet never
//! pays for a rule.

use aya_ebpf::{
    bindings::xdp_action::XDP_TX, helpers::bpf_xdp_adjust_tail, maps::lpm_trie::Key,
    programs::XdpContext, EbpfContext,
};
use lb_common::{
    hash::{self, Tuple},
    icmp,
    maps::{uplink_state, FlowKey, LanPort, PolicyStats},
    policy::{
        self, fallback, sticky_holds, Decision, Packet, Policy, RuleTable, StickyKey, StickyValue,
        DEFAULT_POLICY, SET_DST, SET_SRC,
    },
    reason, table, NO_UPLINK,
};

use core::ops::ControlFlow;

use crate::{
    count,
    maps::{
        BUCKETS, LAN_CLASSES, POLICIES, POLICY_STATS, PREFIX_SETS, RULES, SETTINGS, STICKY, UPLINKS,
    },
    parse::{self, EthHdr, Ipv4Packet},
    stats,
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
    let decision = match RULES.get(settings.active_rules & 1) {
        Some(rules) if rules.count > 0 => {
            let view = packet(ctx, pkt, &tuple, rules);
            let mut decision = policy::NO_MATCH;
            count::up_to(policy::MAX_RULES, |i| {
                match policy::step(rules, &view, settings.live_policies, i) {
                    Some(d) => {
                        decision = d;
                        ControlFlow::Break(())
                    }
                    None => ControlFlow::Continue(()),
                }
            });
            decision
        }
        _ => Decision::Policy {
            policy: DEFAULT_POLICY,
            rule: None,
        },
    };
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
    count::up_to(table::STEER_ATTEMPTS, |attempt| {
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

/// The prefix sets (bits) that hold `addr` (host order).
#[inline(always)]
fn sets_of(addr: u32) -> u32 {
    PREFIX_SETS
        .get(&Key::new(32, addr.to_be_bytes()))
        .copied()
        .unwrap_or(0)
}

/// The packet as the rules see it.
#[inline(always)]
fn packet(ctx: &XdpContext, pkt: &Ipv4Packet, tuple: &Tuple, rules: &RuleTable) -> Packet {
    // SAFETY: `parse::ipv4` bounds-checked the IPv4 header.
    let tos = unsafe { (*pkt.ip).tos };
    let port = ctx.ingress_ifindex() as u32;
    Packet {
        src: tuple.src_addr,
        dst: tuple.dst_addr,
        src_port: tuple.src_port,
        dst_port: tuple.dst_port,
        proto: tuple.proto,
        dscp: Packet::dscp_of(tos),
        lan_classes: lan_port(port).map_or(0, |p| p.classes),
        src_sets: if rules.set_sides & SET_SRC != 0 {
            sets_of(tuple.src_addr)
        } else {
            0
        },
        dst_sets: if rules.set_sides & SET_DST != 0 {
            sets_of(tuple.dst_addr)
        } else {
            0
        },
    }
}

/// What `LAN_CLASSES` says of LAN port `ifindex`.
#[inline(always)]
fn lan_port(ifindex: u32) -> Option<LanPort> {
    // SAFETY: a copy out of the map's value; lbd writes whole entries.
    LAN_CLASSES.get_ptr(&ifindex).map(|p| unsafe { *p })
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

/// Answer the packet with an ICMP "host unreachable" from the router, sent
/// back out of the port it came in on (`lb_common::icmp`). Untagged
/// frames with an option-less IPv4 header only; others are only dropped.
/// `Ok` is the verdict; `Err` a drop reason.
#[inline(always)]
pub fn unreachable(ctx: &XdpContext, pkt: &Ipv4Packet) -> Result<u32, u32> {
    const ETH: usize = core::mem::size_of::<EthHdr>();
    if pkt.tagged() || pkt.l3_off != ETH || pkt.l4_off != ETH + icmp::IPV4_HDR_LEN {
        return Err(reason::DROP_POLICY_UNREACHABLE);
    }
    let eth: *const EthHdr = parse::ptr_at(ctx, 0)?;
    let quoted: *const [u8; icmp::QUOTED_LEN] = parse::ptr_at(ctx, ETH)?;
    // SAFETY: both bounds-checked by `ptr_at`.
    let (client_mac, router_mac, quoted) = unsafe { ((*eth).src, (*eth).dst, *quoted) };
    let port = ctx.ingress_ifindex() as u32;
    let from = match lan_port(port).map(|p| p.addr) {
        Some(addr) if addr != [0; 4] => addr,
        // The router's address there is unknown: the error comes from
        // where the client was going, which its stack accepts as well.
        _ => [quoted[16], quoted[17], quoted[18], quoted[19]],
    };
    let headers = icmp::host_unreachable(&quoted, from);

    // Grow the front by the two new headers: the old Ethernet header and
    // the quote then sit right behind them, where the error needs them.
    // SAFETY: the helper checks the room it is asked for.
    if unsafe {
        aya_ebpf::helpers::bpf_xdp_adjust_head(ctx.as_ptr() as *mut _, -(icmp::HEADERS_LEN as i32))
    } != 0
    {
        return Err(reason::DROP_POLICY_UNREACHABLE);
    }
    let len = ctx.data_end() - ctx.data();
    let want = ETH + icmp::ERROR_LEN;
    if len < want {
        return Err(reason::DROP_POLICY_UNREACHABLE);
    }
    // SAFETY: shrinking by what is past the quote, checked above.
    if unsafe { bpf_xdp_adjust_tail(ctx.as_ptr() as *mut _, -((len - want) as i32)) } != 0 {
        return Err(reason::DROP_POLICY_UNREACHABLE);
    }
    let new_eth: *mut EthHdr = parse::ptr_at(ctx, 0)?;
    let front: *mut [u8; icmp::HEADERS_LEN] = parse::ptr_at(ctx, ETH)?;
    // SAFETY: bounds-checked by `ptr_at`.
    unsafe {
        (*new_eth).dst = client_mac;
        (*new_eth).src = router_mac;
        (*new_eth).ether_type = parse::ETH_P_IPV4.to_be_bytes();
        *front = headers;
    }
    stats::count(reason::DROP_POLICY_UNREACHABLE);
    Ok(XDP_TX)
}
