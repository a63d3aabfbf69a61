//! One module per kind of kernel state lbd owns besides the data plane's
//! flows: what it wants, as a pure function of the view and what the
//! kernel holds, and how it converges there, writing only its own kind.
//! A round (see `daemon`) converges them in this order, so that no packet
//! sees a state that sends it to a dead uplink or out untranslated:
//! uplink entries and states, bucket tables, the operator's rules and
//! prefix sets, attachments (and what each LAN port is to the rules),
//! bypass, qdiscs, routes and rules, nftables. `overflow` is not a kind
//! but the hysteresis of one of egress's inputs (a device's ring that
//! overflows), pure like the rest.

pub mod attachments;
pub mod buckets;
pub mod bypass;
pub mod egress;
pub mod ipv6;
pub mod nftables;
pub mod overflow;
pub mod policies;
pub mod roaming;
pub mod router_macs;
pub mod routing;
pub mod uplinks;
