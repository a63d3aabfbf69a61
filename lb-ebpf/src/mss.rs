//! MSS clamping in place (`lb_common::mss` says when and to what): a SYN
//! that leaves by an uplink narrower than its client's link gets its
//! maximum segment size lowered, its TCP checksum updated. Both families:
//! the caller says where the TCP header is and what the headers in front
//! of a segment cost. Anything else, and a SYN whose first option is not
//! its MSS, is left as it is.

use aya_ebpf::programs::XdpContext;
use lb_common::{csum, mss};

use crate::parse::{self, TcpHdr, TcpOptHdr, TCP_HDR_LEN, TCP_SYN};

/// Lower the MSS of the SYN whose TCP header is at `l4_off` to what an
/// uplink of MTU `mtu` carries, with `overhead` bytes of headers per
/// segment.
#[inline(always)]
pub fn clamp(ctx: &XdpContext, l4_off: usize, mtu: u16, overhead: u16) {
    let Ok(tcp) = parse::ptr_at::<TcpHdr>(ctx, l4_off) else {
        return;
    };
    // SAFETY: bounds-checked by `ptr_at`, here and below.
    let (flags, data_off) = unsafe { ((*tcp).flags, usize::from((*tcp).off_res >> 4) * 4) };
    if flags & TCP_SYN == 0 || data_off < core::mem::size_of::<TcpOptHdr>() + TCP_HDR_LEN {
        return;
    }
    let Ok(opt) = parse::ptr_at::<TcpOptHdr>(ctx, l4_off + TCP_HDR_LEN) else {
        return;
    };
    let (kind, len, value) = unsafe { ((*opt).kind, (*opt).len, u16::from_be_bytes((*opt).value)) };
    if kind != mss::KIND || len != mss::LEN {
        return;
    }
    let Some(new) = mss::clamped(value, mtu, overhead) else {
        return;
    };
    unsafe {
        (*opt).value = new.to_be_bytes();
        let check = csum::replace16(u16::from_be_bytes((*tcp).check), value, new);
        (*tcp).check = check.to_be_bytes();
    }
}
