//! What lbd reads from the kernel, and never writes: one snapshot of
//! links, addresses, routes, neighbours, rules and qdiscs (`kernel`, its
//! IPv6 part in `kernel6`),
//! the event stream that says when to take another (`linkwatch`), the
//! XDP features of devices (`xdpcaps`), conntrack's view of one
//! connection (`conntrack`), over the netlink helpers they share; and
//! WireGuard uplinks' listen ports (`wireguard`).

pub mod conntrack;
pub mod facts;
pub mod kernel;
pub mod kernel6;
pub mod linkwatch;
pub mod netlink;
pub mod nlmsg;
pub mod wireguard;
pub mod xdpcaps;
pub mod xfrm;
