//! `wan_ingress`: packets arriving on an uplink.
//!
//! For now it counts what each uplink receives and leaves every packet to
//! the kernel; reply translation (NAT) comes with its own change. It must
//! never drop: the router's own sessions (probes, SSH) arrive here too.

use aya_ebpf::{bindings::xdp_action::XDP_PASS, programs::XdpContext};
use lb_common::reason;

use crate::{maps::UPLINK_BY_IFINDEX, stats};

#[inline(always)]
pub fn ingress(ctx: &XdpContext) -> Result<u32, u32> {
    let ifindex = ctx.ingress_ifindex() as u32;
    // SAFETY: a plain lookup; the value is a u32 copied out at once.
    let uplink = unsafe { UPLINK_BY_IFINDEX.get(&ifindex) }
        .copied()
        .ok_or(reason::PASS_UNKNOWN_UPLINK)?;
    let len = (ctx.data_end() - ctx.data()) as u64;
    stats::uplink(uplink, |s| {
        s.rx_packets += 1;
        s.rx_bytes += len;
    });
    Ok(XDP_PASS)
}
