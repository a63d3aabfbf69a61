//! Lab harness for lb: network-namespace labs described in TOML files, and
//! the tools tests use to drive traffic through them and see where it went.
//!
//! Used by `cargo xtask lab up|down` and `cargo xtask run` (one long-lived
//! lab with the fixed prefix [`LAB_PREFIX`]) and by the integration tests in
//! `tests/` (a lab per test, with a [`unique_prefix`], gone when dropped).
//!
//! - [`desc`]: the lab file format and its validation.
//! - [`netns`]: namespaces, commands inside them, [`in_netns`].
//! - [`lab`]: bringing a lab up and down, and operating it.
//! - [`observe`]: nftables witnesses of which flows crossed an interface.
//! - [`traffic`]: echo servers and multi-flow TCP/UDP clients.
//! - [`stream`]: numbered UDP streams and a sink, for failover timing.
//! - [`daemon`]: lbd running in a lab's router, and `lbctl` against it.
//! - [`dhcp`]: DHCP (IPv4) servers and clients in the DHCP lab.
//! - [`dhcp6`]: DHCPv6 with prefix delegation and RAs in the DHCP lab.
//! - [`rawip`]: a raw-IP link (tun at both ends), an LTE modem's stand-in.
//! - [`wireguard`]: a WireGuard uplink to a VPN provider (wireguard-go).

pub mod daemon;
pub mod desc;
pub mod dhcp;
pub mod dhcp6;
pub mod lab;
pub mod netns;
pub mod observe;
pub mod rawip;
pub mod stream;
pub mod traffic;
pub mod tun;
pub mod wireguard;
pub mod xdp;

pub use desc::LabDesc;
pub use lab::{unique_prefix, Lab, LinkStats, LAB_PREFIX, TEST_PREFIX_ROOT};
pub use netns::{in_netns, prerequisites_required, require_root, REQUIRE_PREREQUISITES};
pub use observe::{
    watch_destinations, watch_echo_ids, watch_flows, watch_sources, EchoWatch, FlowWatch, LanLeaks,
    Leaks6,
};
