//! The kernel's IPv6 state that lbd observes: global addresses, IPv6
//! routes of every table, IPv6 neighbours, IPv6 rules. Taken with the IPv4
//! snapshot (`kernel::Observed::take`), on the same events.
//!
//! The questions asked of it (an uplink's IPv6 next hop, its delegated
//! prefix, the prefix a LAN carries, which destinations the kernel keeps)
//! are pure functions, tested without a kernel. Never changes anything;
//! `reconcile::routing` owns lbd's IPv6 routes and rules as it does the
//! IPv4 ones.

use std::net::{IpAddr, Ipv6Addr};

use anyhow::{Context, Result};
use futures::TryStreamExt;
use rtnetlink::{
    packet_route::{
        address::{AddressAttribute, AddressFlags},
        neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState},
        route::{RouteAddress, RouteAttribute, RouteMessage, RouteMetric, RouteType},
        AddressFamily,
    },
    Handle, IpVersion, RouteMessageBuilder,
};

use crate::observe::kernel::{self, Rule, LOCAL_TABLE, MAIN_TABLE, ROUTE_PROTOCOL};

/// A global IPv6 address on an interface (link-local ones are of no use
/// to lb: nothing it forwards carries them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Address6 {
    pub ifindex: u32,
    pub addr: Ipv6Addr,
    pub prefix_len: u8,
}

/// An IPv6 route, as far as lbd cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route6 {
    pub table: u32,
    pub dst: Ipv6Addr,
    pub dst_len: u8,
    pub kind: RouteType,
    pub protocol: u8,
    pub gateway: Option<Ipv6Addr>,
    pub oif: Option<u32>,
    pub priority: u32,
    /// As dumped, for deleting it (lbd's own).
    pub message: RouteMessage,
}

/// An IPv6 neighbour whose Ethernet address the kernel holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Neighbour6 {
    pub ifindex: u32,
    pub ip: Ipv6Addr,
    pub mac: [u8; 6],
}

/// What the kernel holds of IPv6 now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed6 {
    pub addresses: Vec<Address6>,
    pub routes: Vec<Route6>,
    pub neighbours: Vec<Neighbour6>,
    pub rules: Vec<Rule>,
}

impl Observed6 {
    /// Dump it. `addresses` is the address dump the IPv4 snapshot made
    /// (one dump holds both families).
    pub async fn take(
        handle: &Handle,
        addresses: &[rtnetlink::packet_route::address::AddressMessage],
    ) -> Result<Observed6> {
        let routes: Vec<RouteMessage> = handle
            .route()
            .get(RouteMessageBuilder::<Ipv6Addr>::new().build())
            .execute()
            .try_collect()
            .await
            .context("listing IPv6 routes over netlink")?;
        let neighbours: Vec<NeighbourMessage> = handle
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Inet6)
            .execute()
            .try_collect()
            .await
            .context("listing IPv6 neighbours over netlink")?;
        let rules: Vec<_> = handle
            .rule()
            .get(IpVersion::V6)
            .execute()
            .try_collect()
            .await
            .context("listing IPv6 rules over netlink")?;
        Ok(Observed6 {
            addresses: addresses.iter().flat_map(address6).collect(),
            routes: routes.iter().filter_map(route6).collect(),
            neighbours: neighbours.iter().filter_map(neighbour6).collect(),
            rules: rules.into_iter().filter_map(kernel::rule).collect(),
        })
    }

    /// The global address of `ifindex` (its first), with its prefix length.
    pub fn address_of(&self, ifindex: u32) -> Option<(Ipv6Addr, u8)> {
        self.addresses
            .iter()
            .find(|a| a.ifindex == ifindex)
            .map(|a| (a.addr, a.prefix_len))
    }

    /// The prefixes (of /64 or shorter) of `ifindex`'s global addresses:
    /// what a LAN carries.
    pub fn prefixes_of(&self, ifindex: u32) -> Vec<(Ipv6Addr, u8)> {
        let mut out: Vec<(Ipv6Addr, u8)> = self
            .addresses
            .iter()
            .filter(|a| a.ifindex == ifindex && a.prefix_len <= 64)
            .map(|a| (mask6(a.addr, a.prefix_len), a.prefix_len))
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// The next hop of the kernel's IPv6 default route through `ifindex`
    /// (as a router advertisement or a DHCPv6 client installs it: usually
    /// the ISP router's link-local address), in any table but lbd's own.
    pub fn default_gateway(&self, ifindex: u32) -> Option<Ipv6Addr> {
        self.default_route(ifindex).and_then(|r| r.gateway)
    }

    /// The MTU that default route carries, if it has one: where a router
    /// advertisement's MTU option lands when a DHCPv6 client (dhcpcd)
    /// handles advertisements itself, rather than in the interface's IPv6
    /// MTU.
    pub fn default_route_mtu(&self, ifindex: u32) -> Option<u32> {
        self.default_route(ifindex)?
            .message
            .attributes
            .iter()
            .find_map(|a| match a {
                RouteAttribute::Metrics(metrics) => metrics.iter().find_map(|m| match m {
                    RouteMetric::Mtu(mtu) => Some(*mtu).filter(|&m| m > 0),
                    _ => None,
                }),
                _ => None,
            })
    }

    /// The kernel's IPv6 default route through `ifindex` (see
    /// [`Observed6::default_gateway`]).
    fn default_route(&self, ifindex: u32) -> Option<&Route6> {
        self.routes
            .iter()
            .filter(|r| {
                r.dst_len == 0
                    && r.kind == RouteType::Unicast
                    && r.protocol != ROUTE_PROTOCOL
                    && r.oif == Some(ifindex)
                    && r.gateway.is_some()
            })
            .min_by_key(|r| (r.table != MAIN_TABLE, r.priority))
    }

    /// The Ethernet address the kernel holds for `ip` on `ifindex`.
    pub fn neighbour(&self, ifindex: u32, ip: Ipv6Addr) -> Option<[u8; 6]> {
        self.neighbours
            .iter()
            .find(|n| n.ifindex == ifindex && n.ip == ip)
            .map(|n| n.mac)
    }

    /// The prefixes delegated to the router (DHCPv6-PD), as its client
    /// announces them to the kernel: an `unreachable` route for each whole
    /// delegation (RFC 7084's WPD-5: what the LAN does not use must not
    /// loop back to the ISP), of /64 or shorter, in the main table.
    pub fn delegations(&self) -> Vec<(Ipv6Addr, u8)> {
        let mut out: Vec<(Ipv6Addr, u8)> = self
            .routes
            .iter()
            .filter(|r| {
                r.table == MAIN_TABLE
                    && r.kind == RouteType::Unreachable
                    && r.dst_len > 0
                    && r.dst_len <= 64
                    && r.protocol != ROUTE_PROTOCOL
                    && is_global(r.dst)
            })
            .map(|r| (r.dst, r.dst_len))
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// IPv6 destinations the kernel keeps: the router's own addresses, and
    /// what the main table routes other than by a default route and other
    /// than through an uplink (LAN prefixes, static and VPN routes), but
    /// never a delegation's blackhole (its LAN part has its own route).
    pub fn kernel_destinations(&self, uplinks: &[u32]) -> Vec<(Ipv6Addr, u8)> {
        let mut out: Vec<(Ipv6Addr, u8)> = self
            .routes
            .iter()
            .filter(|r| {
                if r.table == LOCAL_TABLE {
                    return r.kind == RouteType::Local && is_global(r.dst);
                }
                r.table == MAIN_TABLE
                    && r.kind == RouteType::Unicast
                    && r.dst_len > 0
                    && r.protocol != ROUTE_PROTOCOL
                    && is_global(r.dst)
                    && !r.oif.is_some_and(|oif| uplinks.contains(&oif))
            })
            .map(|r| (r.dst, r.dst_len))
            .collect();
        out.sort();
        out.dedup();
        out
    }
}

/// `addr` with the bits past `len` cleared.
pub fn mask6(addr: Ipv6Addr, len: u8) -> Ipv6Addr {
    let mask = u128::MAX
        .checked_shl(128 - u32::from(len.min(128)))
        .unwrap_or(0);
    Ipv6Addr::from(u128::from(addr) & mask)
}

/// Whether `inner/inner_len` lies within `outer/outer_len`.
pub fn within(inner: (Ipv6Addr, u8), outer: (Ipv6Addr, u8)) -> bool {
    inner.1 >= outer.1 && mask6(inner.0, outer.1) == mask6(outer.0, outer.1)
}

/// Global unicast (2000::/3) or unique-local (fc00::/7): not link-local,
/// multicast, loopback or unspecified.
fn is_global(addr: Ipv6Addr) -> bool {
    let first = addr.octets()[0];
    first & 0xe0 == 0x20 || first & 0xfe == 0xfc
}

fn address6(msg: &rtnetlink::packet_route::address::AddressMessage) -> Vec<Address6> {
    if msg.header.family != AddressFamily::Inet6 {
        return Vec::new();
    }
    // A tentative address (duplicate detection still running) cannot be
    // used yet; a deprecated one is on its way out.
    let flags = msg.attributes.iter().find_map(|a| match a {
        AddressAttribute::Flags(f) => Some(*f),
        _ => None,
    });
    if flags
        .is_some_and(|f| f.contains(AddressFlags::Tentative) || f.contains(AddressFlags::Dadfailed))
    {
        return Vec::new();
    }
    msg.attributes
        .iter()
        .filter_map(|a| match a {
            AddressAttribute::Address(IpAddr::V6(addr)) if is_global(*addr) => Some(Address6 {
                ifindex: msg.header.index,
                addr: *addr,
                prefix_len: msg.header.prefix_len,
            }),
            _ => None,
        })
        .collect()
}

fn route6(msg: &RouteMessage) -> Option<Route6> {
    if msg.header.address_family != AddressFamily::Inet6 {
        return None;
    }
    let mut r = Route6 {
        table: u32::from(msg.header.table),
        dst: Ipv6Addr::UNSPECIFIED,
        dst_len: msg.header.destination_prefix_length,
        kind: msg.header.kind,
        protocol: u8::from(msg.header.protocol),
        gateway: None,
        oif: None,
        priority: 0,
        message: msg.clone(),
    };
    for attr in &msg.attributes {
        match attr {
            RouteAttribute::Table(t) => r.table = *t,
            RouteAttribute::Destination(RouteAddress::Inet6(a)) => r.dst = *a,
            RouteAttribute::Gateway(RouteAddress::Inet6(a)) => r.gateway = Some(*a),
            RouteAttribute::Oif(i) => r.oif = Some(*i),
            RouteAttribute::Priority(p) => r.priority = *p,
            _ => {}
        }
    }
    Some(r)
}

fn neighbour6(msg: &NeighbourMessage) -> Option<Neighbour6> {
    if matches!(
        msg.header.state,
        NeighbourState::Incomplete | NeighbourState::Failed | NeighbourState::None
    ) {
        return None;
    }
    let mut ip = None;
    let mut mac = None;
    for attr in &msg.attributes {
        match attr {
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => ip = Some(*a),
            NeighbourAttribute::LinkLayerAddress(b) => mac = <[u8; 6]>::try_from(b.as_slice()).ok(),
            _ => {}
        }
    }
    Some(Neighbour6 {
        ifindex: msg.header.ifindex,
        ip: ip?,
        mac: mac?,
    })
}

#[cfg(test)]
pub(crate) mod fixtures {
    use super::*;

    pub fn ip6(s: &str) -> Ipv6Addr {
        s.parse().unwrap_or(Ipv6Addr::UNSPECIFIED)
    }

    pub fn route6(
        table: u32,
        dst: &str,
        len: u8,
        kind: RouteType,
        via: Option<&str>,
        oif: Option<u32>,
    ) -> Route6 {
        Route6 {
            table,
            dst: ip6(dst),
            dst_len: len,
            kind,
            protocol: 3,
            gateway: via.map(ip6),
            oif,
            priority: 1024,
            message: RouteMessage::default(),
        }
    }

    /// A router as dhcpcd leaves it: wan1 (3) and wan2 (4) with addresses
    /// and RA default routes, a /56 delegated by each, the LAN (2) with
    /// wan1's delegation's first /64.
    pub fn router6() -> Observed6 {
        Observed6 {
            addresses: vec![
                Address6 {
                    ifindex: 2,
                    addr: ip6("2001:db8:1:100::1"),
                    prefix_len: 64,
                },
                Address6 {
                    ifindex: 3,
                    addr: ip6("2001:db8:1:ffff::2"),
                    prefix_len: 128,
                },
                Address6 {
                    ifindex: 4,
                    addr: ip6("2001:db8:2:ffff::2"),
                    prefix_len: 128,
                },
            ],
            routes: vec![
                route6(
                    MAIN_TABLE,
                    "::",
                    0,
                    RouteType::Unicast,
                    Some("fe80::1"),
                    Some(3),
                ),
                route6(
                    MAIN_TABLE,
                    "::",
                    0,
                    RouteType::Unicast,
                    Some("fe80::2"),
                    Some(4),
                ),
                route6(
                    MAIN_TABLE,
                    "2001:db8:1:100::",
                    56,
                    RouteType::Unreachable,
                    None,
                    Some(1),
                ),
                route6(
                    MAIN_TABLE,
                    "2001:db8:2:200::",
                    56,
                    RouteType::Unreachable,
                    None,
                    Some(1),
                ),
                route6(
                    MAIN_TABLE,
                    "2001:db8:1:100::",
                    64,
                    RouteType::Unicast,
                    None,
                    Some(2),
                ),
                route6(MAIN_TABLE, "fe80::", 64, RouteType::Unicast, None, Some(3)),
                route6(
                    LOCAL_TABLE,
                    "2001:db8:1:100::1",
                    128,
                    RouteType::Local,
                    None,
                    Some(2),
                ),
            ],
            neighbours: vec![Neighbour6 {
                ifindex: 3,
                ip: ip6("fe80::1"),
                mac: [2, 0, 0, 0, 1, 1],
            }],
            rules: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::*;
    use super::*;

    #[test]
    fn an_uplinks_gateway_delegations_and_the_lans_prefix() {
        let o = router6();
        assert_eq!(o.default_gateway(3), Some(ip6("fe80::1")));
        assert_eq!(o.default_gateway(4), Some(ip6("fe80::2")));
        assert_eq!(o.default_gateway(2), None);
        assert_eq!(o.neighbour(3, ip6("fe80::1")), Some([2, 0, 0, 0, 1, 1]));
        assert_eq!(o.neighbour(4, ip6("fe80::2")), None);
        assert_eq!(
            o.delegations(),
            vec![(ip6("2001:db8:1:100::"), 56), (ip6("2001:db8:2:200::"), 56)]
        );
        assert_eq!(o.prefixes_of(2), vec![(ip6("2001:db8:1:100::"), 64)]);
        assert_eq!(
            o.prefixes_of(3),
            vec![],
            "a /128 is no prefix a LAN carries"
        );
    }

    #[test]
    fn the_kernel_keeps_the_lan_and_the_routers_addresses_but_not_uplinks_or_blackholes() {
        let o = router6();
        assert_eq!(
            o.kernel_destinations(&[3, 4]),
            vec![
                (ip6("2001:db8:1:100::"), 64),
                (ip6("2001:db8:1:100::1"), 128)
            ]
        );
    }

    #[test]
    fn prefixes_nest() {
        let d = (ip6("2001:db8:1:100::"), 56);
        assert!(within((ip6("2001:db8:1:1ab::"), 64), d));
        assert!(!within((ip6("2001:db8:1:200::"), 64), d));
        assert!(!within((ip6("2001:db8:1::"), 48), d));
        assert_eq!(mask6(ip6("2001:db8:1:1ab::5"), 56), ip6("2001:db8:1:100::"));
        assert_eq!(mask6(ip6("2001:db8::5"), 0), Ipv6Addr::UNSPECIFIED);
    }
}
