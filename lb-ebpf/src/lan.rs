//! `lan_ingress`: packets from clients.
//!
//! Owns the decision "which uplink does this packet leave by": look the
//! connection up in the flow table, or, for a new connection (or one whose
//! uplink died), hash it into a bucket and pin it to that bucket's uplink.
//! It never forwards what it did not parse, and never lets a new flow out
//! when no uplink takes new flows.

use aya_ebpf::{
    bindings::{xdp_action::XDP_REDIRECT, BPF_NOEXIST},
    helpers::bpf_ktime_get_coarse_ns,
    maps::lpm_trie::Key,
    programs::XdpContext,
};
use lb_common::{
    hash::{self, Tuple},
    maps::{uplink_state, FlowKey, FlowValue},
    reason, NO_UPLINK,
};

use crate::{
    maps::{BUCKETS, BYPASS, FLOWS, SETTINGS, TX_PORTS, UPLINKS},
    parse, rewrite, stats,
};

/// `Ok(verdict)` for packets the fast path handled (sent or dropped with a
/// counted reason), `Err(reason)` for packets the kernel should have.
#[inline(always)]
pub fn ingress(ctx: &XdpContext) -> Result<u32, u32> {
    let pkt = parse::ipv4(ctx)?;
    // SAFETY: `parse::ipv4` bounds-checked the IPv4 header.
    let (src, dst, ttl) = unsafe { ((*pkt.ip).src, (*pkt.ip).dst, (*pkt.ip).ttl) };
    if BYPASS.get(Key::new(32, dst)).is_some() {
        return Err(reason::PASS_LOCAL);
    }
    if ttl <= 1 {
        return Err(reason::PASS_TTL);
    }

    let key = FlowKey {
        src_addr: src,
        dst_addr: dst,
        src_port: pkt.src_port,
        dst_port: pkt.dst_port,
        proto: pkt.proto,
        _pad: [0; 3],
    };
    let Some(uplink) = select_uplink(&key) else {
        return Ok(stats::drop(reason::DROP_NO_UPLINK));
    };
    let Some(info) = UPLINKS.get(uplink) else {
        return Ok(stats::drop(reason::DROP_NO_UPLINK));
    };
    if info.ifindex == 0 || info.gw_mac == [0; 6] {
        return Err(reason::PASS_UPLINK_UNREADY);
    }

    let len = rewrite::to_uplink(ctx, &pkt, info)?;
    stats::uplink(uplink, |s| {
        s.tx_packets += 1;
        s.tx_bytes += len as u64;
    });
    match TX_PORTS.redirect(uplink, 0) {
        Ok(XDP_REDIRECT) => Ok(XDP_REDIRECT),
        _ => Ok(stats::drop(reason::DROP_REDIRECT_FAILED)),
    }
}

/// The uplink for this connection: the one it is pinned to while that uplink
/// keeps flows, otherwise a new choice from the bucket table, pinned.
#[inline(always)]
fn select_uplink(key: &FlowKey) -> Option<u32> {
    // SAFETY: reading the monotonic coarse clock has no preconditions.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    if let Some(flow) = FLOWS.get_ptr_mut(key) {
        // SAFETY: a pointer into the map's value; a racing CPU may write the
        // same fields, which at worst loses a timestamp update.
        let pinned = unsafe { (*flow).uplink };
        if UPLINKS
            .get(pinned)
            .is_some_and(|u| uplink_state::keeps_flows(u.state))
        {
            unsafe { (*flow).last_seen_ns = now };
            return Some(pinned);
        }
        // Its uplink is gone: move the flow, in place.
        let moved = new_uplink(key)?;
        unsafe {
            (*flow).uplink = moved;
            (*flow).last_seen_ns = now;
        }
        stats::uplink(pinned, |s| s.moved_away += 1);
        stats::uplink(moved, |s| s.new_flows += 1);
        return Some(moved);
    }

    let uplink = new_uplink(key)?;
    let value = FlowValue {
        last_seen_ns: now,
        uplink,
        _pad: [0; 4],
    };
    if FLOWS.insert(key, &value, u64::from(BPF_NOEXIST)).is_err() {
        // Another CPU pinned the same connection first (or the table could
        // not take it): follow whatever is there, so one connection never
        // leaves by two uplinks.
        // SAFETY: as above.
        if let Some(flow) = FLOWS.get_ptr(key) {
            return Some(unsafe { (*flow).uplink });
        }
        return Some(uplink);
    }
    stats::uplink(uplink, |s| s.new_flows += 1);
    Some(uplink)
}

/// The bucket table's uplink for a new connection, if it takes new flows.
#[inline(always)]
fn new_uplink(key: &FlowKey) -> Option<u32> {
    let settings = SETTINGS.get(0)?;
    let tuple = Tuple {
        src_addr: u32::from_be_bytes(key.src_addr),
        dst_addr: u32::from_be_bytes(key.dst_addr),
        src_port: u16::from_be_bytes(key.src_port),
        dst_port: u16::from_be_bytes(key.dst_port),
        proto: key.proto,
    };
    let bucket = hash::bucket(hash::classify(settings.seed, settings.mode, &tuple));
    let table = (settings.active_table & 1) * lb_common::BUCKETS;
    let uplink = *BUCKETS.get(table + bucket)?;
    if uplink == NO_UPLINK {
        return None;
    }
    let info = UPLINKS.get(uplink)?;
    (info.state == uplink_state::ACTIVE).then_some(uplink)
}
