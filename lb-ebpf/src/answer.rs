//! ICMP errors the data plane sends a client itself, back out of the LAN
//! port its packet came in on: "host unreachable" for a new
//! flow its policy refuses, "fragmentation needed" for a packet with DF
//! set that is too big for its uplink. The headers come from
//! `lb_common::icmp`; this module only makes room for them in the frame.
//!
//! Untagged frames with an option-less IPv4 header only: for others it
//! gives up (`Err`), and the caller drops or passes the packet.
//!
//! Sent by `XDP_REDIRECT` to the port, as replies are, not `XDP_TX`: a
//! veth delivers what `XDP_TX` sends only when something else wakes its
//! peer (it kicks the peer's NAPI for a peer with an XDP program alone),
//! while a redirect flushes; a NIC takes either.

use aya_ebpf::{
    bindings::xdp_action::XDP_REDIRECT,
    helpers::{bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
    EbpfContext,
};
use lb_common::icmp;

use crate::{
    maps::LAN_PORTS,
    parse::{self, EthHdr, Ipv4Packet},
    policy, stats,
};

/// Turn the frame into the ICMP error whose headers `headers` makes from
/// the packet's quote and the router's address, from the router to the
/// client, counted as `reason`. `Err(reason)`, the frame untouched, when
/// it cannot be made; once the frame is changed, a failure drops it.
#[inline(always)]
pub fn icmp_error(
    ctx: &XdpContext,
    pkt: &Ipv4Packet,
    headers: impl FnOnce(&[u8; icmp::QUOTED_LEN], [u8; 4]) -> [u8; icmp::HEADERS_LEN],
    reason: u32,
) -> Result<u32, u32> {
    const ETH: usize = core::mem::size_of::<EthHdr>();
    if pkt.tagged() || pkt.l3_off != ETH || pkt.l4_off != ETH + icmp::IPV4_HDR_LEN {
        return Err(reason);
    }
    let eth: *const EthHdr = parse::ptr_at(ctx, 0).map_err(|_| reason)?;
    let quoted: *const [u8; icmp::QUOTED_LEN] = parse::ptr_at(ctx, ETH).map_err(|_| reason)?;
    // SAFETY: both bounds-checked by `ptr_at`.
    let (client_mac, router_mac, quoted) = unsafe { ((*eth).src, (*eth).dst, *quoted) };
    let port = ctx.ingress_ifindex() as u32;
    // Chosen first: after this the frame is the error, or nothing.
    if LAN_PORTS.redirect(port, 0) != Ok(XDP_REDIRECT) {
        return Err(reason);
    }
    let from = match policy::lan_port(port).map(|p| p.addr) {
        Some(addr) if addr != [0; 4] => addr,
        // The router's address there is unknown: the error comes from
        // where the client was going, which its stack accepts as well.
        _ => [quoted[16], quoted[17], quoted[18], quoted[19]],
    };
    let front = headers(&quoted, from);

    // Grow the front by the two new headers: the old Ethernet header and
    // the quote then sit right behind them, where the error needs them.
    // SAFETY: the helper checks the room it is asked for.
    if unsafe { bpf_xdp_adjust_head(ctx.as_ptr() as *mut _, -(icmp::HEADERS_LEN as i32)) } != 0 {
        return Err(reason);
    }
    let len = ctx.data_end() - ctx.data();
    let want = ETH + icmp::ERROR_LEN;
    if len < want {
        return Ok(stats::drop(reason));
    }
    // SAFETY: shrinking by what is past the quote, checked above.
    if unsafe { bpf_xdp_adjust_tail(ctx.as_ptr() as *mut _, -((len - want) as i32)) } != 0 {
        return Ok(stats::drop(reason));
    }
    let (Ok(new_eth), Ok(out)) = (
        parse::ptr_at::<EthHdr>(ctx, 0),
        parse::ptr_at::<[u8; icmp::HEADERS_LEN]>(ctx, ETH),
    ) else {
        return Ok(stats::drop(reason));
    };
    // SAFETY: bounds-checked by `ptr_at`.
    unsafe {
        (*new_eth).dst = client_mac;
        (*new_eth).src = router_mac;
        (*new_eth).ether_type = parse::ETH_P_IPV4.to_be_bytes();
        *out = front;
    }
    stats::count(reason);
    Ok(XDP_REDIRECT)
}
