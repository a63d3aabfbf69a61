//! The kernel state lbd observes: one [`Observed`] snapshot, taken
//! whenever the kernel reports a change that may matter, of interfaces,
//! IPv4 addresses, IPv4 routes of every table, IPv4 neighbours, IPv4 rules
//! and qdiscs (IPv6's in `kernel6`). Nothing is read once: the reconciler
//! takes a new snapshot on every event and converges towards it.
//!
//! The questions lbd asks of a snapshot (which gateway, which destinations
//! the kernel keeps, which prefixes a LAN has) are pure functions, tested
//! without a kernel. It never changes anything; `reconcile::routing` owns
//! lbd's routes and rules.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
};

use anyhow::{Context, Result};
use futures::TryStreamExt;
use rtnetlink::{
    packet_core::{DefaultNla, Nla},
    packet_route::{
        address::AddressAttribute,
        link::{AfSpecInet6, AfSpecUnspec, LinkAttribute, LinkInfo, LinkLayerType, LinkMessage},
        route::{
            RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteType,
        },
        rule::{RuleAction, RuleAttribute, RuleFlags, RuleMessage},
        tc::{TcAttribute, TcHandle, TcMessage},
        AddressFamily,
    },
    Handle, IpVersion, RouteMessageBuilder,
};

use crate::observe::{
    kernel6::Observed6,
    linkwatch::is_up,
    netlink::{bridge_entry, usable_neighbour, BridgeEntry, Neighbour},
};

/// The route protocol number on lbd's routes and rules (`ip route show proto
/// 251`). Unassigned in iproute2's `rt_protos`.
pub const ROUTE_PROTOCOL: u8 = 251;
/// The main routing table.
pub const MAIN_TABLE: u32 = 254;
/// The local routing table (the router's own addresses).
pub const LOCAL_TABLE: u32 = 255;

/// An interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkFacts {
    pub name: String,
    pub index: u32,
    pub mac: Option<[u8; 6]>,
    /// Administratively up, with carrier (see `linkwatch::is_up`).
    pub up: bool,
    pub mtu: u32,
    /// Its IPv6 MTU (`net.ipv6.conf.<it>.mtu`: a router advertisement's
    /// MTU option sets it), when it has IPv6.
    pub ipv6_mtu: Option<u32>,
    /// Its kind (`bridge`, `veth`, ...), when the kernel says.
    pub kind: Option<String>,
    /// The bridge (or bond) it is a port of.
    pub master: Option<u32>,
    /// The device it sits on (a VLAN's parent), when it has one.
    pub lower: Option<u32>,
    /// It carries IP packets with no link-layer header (a tunnel such as
    /// WireGuard or tun, a raw-IP modem, PPP): no MAC, no neighbours.
    pub l3: bool,
}

#[cfg(test)]
impl LinkFacts {
    /// A link for tests: up, with carrier, MTU 1500, no MAC, on no other
    /// device.
    pub fn sample(index: u32, name: &str, kind: &str, master: Option<u32>) -> Self {
        LinkFacts {
            name: name.into(),
            index,
            mac: None,
            up: true,
            mtu: 1500,
            ipv6_mtu: None,
            kind: Some(kind.into()),
            master,
            lower: None,
            l3: false,
        }
    }
}

/// An IPv4 address on an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Address {
    pub ifindex: u32,
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
}

/// An IPv4 route, as far as lbd cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub table: u32,
    pub dst: Ipv4Addr,
    pub dst_len: u8,
    pub kind: RouteType,
    pub protocol: u8,
    pub gateway: Option<Ipv4Addr>,
    /// Output interfaces: one, or each next hop's of a multipath route.
    pub oifs: Vec<u32>,
    /// The metric.
    pub priority: u32,
    /// As dumped, for deleting it.
    pub message: RouteMessage,
}

/// A rule (IPv4's in [`Observed::rules`], IPv6's in `Observed6::rules`),
/// as far as lbd cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub priority: u32,
    /// Whether it looks a table up (the other actions: goto, nop,
    /// blackhole, unreachable, prohibit).
    pub looks_up: bool,
    pub table: u32,
    /// `from PREFIX`, of the rule's family.
    pub source: Option<(IpAddr, u8)>,
    pub iif: Option<String>,
    /// `suppress_prefixlength`, if set.
    pub suppress: Option<u32>,
    /// `fwmark MARK/MASK`, if set.
    pub fwmark: Option<(u32, u32)>,
    /// `ipproto N`, if set.
    pub ip_proto: Option<u8>,
    /// `sport FIRST-LAST`, if set.
    pub sport: Option<(u16, u16)>,
    /// It selects by something lbd never does (a destination, `oif`, a
    /// destination port, a uid range, ...).
    pub other: bool,
    pub protocol: u8,
    pub message: RuleMessage,
}

/// A qdisc as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qdisc {
    pub ifindex: u32,
    /// `major << 16 | minor`; the kernel's default qdiscs have 0.
    pub handle: u32,
    pub parent: u32,
    pub kind: String,
}

/// What the kernel holds now.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    pub links: Vec<LinkFacts>,
    pub addresses: Vec<Address>,
    pub routes: Vec<Route>,
    pub neighbours: Vec<Neighbour>,
    /// The bridges' forwarding entries: which port each MAC is behind.
    pub bridge_entries: Vec<BridgeEntry>,
    pub rules: Vec<Rule>,
    /// Every qdisc (root, ingress and inner ones).
    pub qdiscs: Vec<Qdisc>,
    /// IPv6: addresses, routes, neighbours.
    pub v6: Observed6,
    /// The listen ports of the WireGuard uplinks, by interface index
    /// (`observe::wireguard`, asked after the dump).
    pub wireguard_ports: BTreeMap<u32, u16>,
    /// The destinations of the IPsec policies that encrypt what leaves
    /// (`observe::xfrm`), both families; `None`: the kernel has no XFRM
    /// netlink (or lbd may not ask it).
    pub ipsec: Option<Vec<(IpAddr, u8)>>,
    /// The XDP features of each device with a link layer, by index
    /// (`observe::xdpcaps`); `None`: the kernel cannot say (before 6.3).
    pub xdp_features: Option<BTreeMap<u32, u64>>,
}

impl Observed {
    /// Dump everything lbd looks at.
    pub async fn take(handle: &Handle) -> Result<Observed> {
        let links: Vec<LinkMessage> = handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .context("listing interfaces over netlink")?;
        let addresses: Vec<_> = handle
            .address()
            .get()
            .execute()
            .try_collect()
            .await
            .context("listing addresses over netlink")?;
        let routes: Vec<RouteMessage> = handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute()
            .try_collect()
            .await
            .context("listing routes over netlink")?;
        let neighbours: Vec<_> = handle
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Inet)
            .execute()
            .try_collect()
            .await
            .context("listing neighbours over netlink")?;
        let bridge_entries: Vec<_> = handle
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Bridge)
            .execute()
            .try_collect()
            .await
            .context("listing the bridges' forwarding entries over netlink")?;
        let rules: Vec<RuleMessage> = handle
            .rule()
            .get(IpVersion::V4)
            .execute()
            .try_collect()
            .await
            .context("listing rules over netlink")?;
        let qdiscs: Vec<TcMessage> = handle
            .qdisc()
            .get()
            .execute()
            .try_collect()
            .await
            .context("listing qdiscs over netlink")?;
        let v6 = Observed6::take(handle, &addresses).await?;
        let ipsec = tokio::task::spawn_blocking(super::xfrm::kept_destinations)
            .await
            .context("asking for the IPsec policies")??;
        let links: Vec<LinkFacts> = links.iter().filter_map(link_facts).collect();
        let ethernet: Vec<u32> = links.iter().filter(|l| !l.l3).map(|l| l.index).collect();
        let xdp_features =
            tokio::task::spawn_blocking(move || super::xdpcaps::features_of(&ethernet))
                .await
                .context("asking for the devices' XDP features")??;
        Ok(Observed {
            v6,
            ipsec,
            xdp_features,
            links,
            addresses: addresses
                .iter()
                .flat_map(|msg| {
                    let (ifindex, prefix_len) = (msg.header.index, msg.header.prefix_len);
                    // `Local` is the address itself (`Address` is the peer's
                    // on point-to-point links such as PPPoE).
                    msg.attributes.iter().filter_map(move |a| match a {
                        AddressAttribute::Local(IpAddr::V4(addr)) => Some(Address {
                            ifindex,
                            addr: *addr,
                            prefix_len,
                        }),
                        _ => None,
                    })
                })
                .collect(),
            routes: routes.into_iter().filter_map(route).collect(),
            neighbours: neighbours.iter().filter_map(usable_neighbour).collect(),
            bridge_entries: bridge_entries.iter().filter_map(bridge_entry).collect(),
            rules: rules.into_iter().filter_map(rule).collect(),
            qdiscs: qdiscs.iter().filter_map(qdisc).collect(),
            wireguard_ports: BTreeMap::new(),
        })
    }

    pub fn link(&self, name: &str) -> Option<&LinkFacts> {
        self.links.iter().find(|l| l.name == name)
    }

    /// The interfaces that frames from a LAN arrive on: the interface
    /// itself, or, for a bridge, its ports (XDP sees frames on the ports;
    /// a bridge has no XDP of its own to redirect into). By index, with
    /// their names.
    pub fn lan_ports(&self, lan: &str) -> Vec<(u32, String)> {
        let Some(link) = self.link(lan) else {
            return Vec::new();
        };
        if link.kind.as_deref() != Some("bridge") {
            return vec![(link.index, link.name.clone())];
        }
        self.links
            .iter()
            .filter(|l| l.master == Some(link.index))
            .map(|l| (l.index, l.name.clone()))
            .collect()
    }

    /// The first (primary) IPv4 address of interface `ifindex`.
    pub fn address_of(&self, ifindex: u32) -> Option<Ipv4Addr> {
        self.addresses
            .iter()
            .find(|a| a.ifindex == ifindex)
            .map(|a| a.addr)
    }

    /// Every IPv4 address of interface `ifindex`.
    pub fn addresses_of(&self, ifindex: u32) -> Vec<Ipv4Addr> {
        self.addresses
            .iter()
            .filter(|a| a.ifindex == ifindex)
            .map(|a| a.addr)
            .collect()
    }

    /// The next hop of the kernel's default route through `ifindex`, in any
    /// table but lbd's own: the main table's first, then the lowest metric.
    pub fn default_gateway(&self, ifindex: u32) -> Option<Ipv4Addr> {
        self.routes
            .iter()
            .filter(|r| {
                r.dst_len == 0
                    && r.kind == RouteType::Unicast
                    && r.protocol != ROUTE_PROTOCOL
                    && r.oifs == [ifindex]
                    && r.gateway.is_some()
            })
            .min_by_key(|r| (r.table != MAIN_TABLE, r.priority))
            .and_then(|r| r.gateway)
    }

    /// Whether the kernel says device `ifindex` takes no frames redirected
    /// by XDP (no `ndo_xdp_xmit`); `false` where it cannot say.
    pub fn no_redirect(&self, ifindex: u32) -> bool {
        self.xdp_features
            .as_ref()
            .and_then(|f| f.get(&ifindex))
            .is_some_and(|f| f & super::xdpcaps::NDO_XMIT == 0)
    }

    /// The Ethernet address the kernel holds for `ip` on `ifindex`.
    pub fn neighbour(&self, ifindex: u32, ip: Ipv4Addr) -> Option<[u8; 6]> {
        self.neighbours
            .iter()
            .find(|n| n.ifindex == ifindex && n.ip == ip)
            .map(|n| n.mac)
    }

    /// Destinations the kernel keeps, which the fast path must hand to it:
    /// the router's own addresses (the local table), and everything the
    /// main table and `lookup_tables` route other than by a default route
    /// (connected LAN subnets, static routes, VPN routes), unless it leaves
    /// through an uplink: that traffic is the internet's, and is NATed like
    /// the rest.
    pub fn kernel_destinations(
        &self,
        uplinks: &[u32],
        lookup_tables: &[u32],
    ) -> BTreeSet<(Ipv4Addr, u8)> {
        self.routes
            .iter()
            .filter(|r| {
                if r.table == LOCAL_TABLE {
                    return r.kind == RouteType::Local;
                }
                (r.table == MAIN_TABLE || lookup_tables.contains(&r.table))
                    && r.dst_len > 0
                    && r.protocol != ROUTE_PROTOCOL
                    && !r.oifs.iter().any(|oif| uplinks.contains(oif))
            })
            .map(|r| (r.dst, r.dst_len))
            .collect()
    }

    /// The subnets connected to the interfaces `ifindexes`, or to VLANs
    /// on them (the main table's routes of kind link through them: a LAN's
    /// prefixes). The data plane sees a VLAN's frames, tagged, on its
    /// parent, so a LAN configured as `lan0` with its subnet on `lan0.10`
    /// is guarded like one with its subnet on `lan0`.
    pub fn connected(&self, ifindexes: &[u32]) -> Vec<(Ipv4Addr, u8)> {
        let vlans = self.links.iter().filter(|l| {
            l.kind.as_deref() == Some("vlan") && l.lower.is_some_and(|p| ifindexes.contains(&p))
        });
        let ifindexes: Vec<u32> = ifindexes
            .iter()
            .copied()
            .chain(vlans.map(|l| l.index))
            .collect();
        let mut out: Vec<(Ipv4Addr, u8)> = self
            .routes
            .iter()
            .filter(|r| {
                r.table == MAIN_TABLE
                    && r.kind == RouteType::Unicast
                    && r.dst_len > 0
                    && r.gateway.is_none()
                    && r.oifs.len() == 1
                    && r.oifs.iter().all(|oif| ifindexes.contains(oif))
            })
            .map(|r| (r.dst, r.dst_len))
            .collect();
        out.sort();
        out.dedup();
        out
    }
}

fn link_facts(msg: &LinkMessage) -> Option<LinkFacts> {
    let mut name = None;
    let mut mac = None;
    let mut mtu = 1500;
    let mut ipv6_mtu = None;
    let mut kind = None;
    let mut master = None;
    let mut lower = None;
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::IfName(n) => name = Some(n.clone()),
            LinkAttribute::Address(b) => mac = <[u8; 6]>::try_from(b.as_slice()).ok(),
            LinkAttribute::Mtu(m) => mtu = *m,
            LinkAttribute::AfSpecUnspec(families) => ipv6_mtu = ipv6_mtu_of(families),
            LinkAttribute::Controller(m) => master = Some(*m),
            LinkAttribute::Link(l) => lower = Some(*l),
            LinkAttribute::LinkInfo(infos) => {
                kind = infos.iter().find_map(|i| match i {
                    LinkInfo::Kind(k) => Some(k.to_string()),
                    _ => None,
                });
            }
            _ => {}
        }
    }
    let l3 = matches!(
        msg.header.link_layer_type,
        LinkLayerType::None | LinkLayerType::Rawip | LinkLayerType::Ppp
    );
    Some(LinkFacts {
        name: name?,
        index: msg.header.index,
        mac,
        up: is_up(msg),
        mtu,
        ipv6_mtu,
        kind,
        master,
        lower,
        l3,
    })
}

/// The IPv6 MTU in a link's per-family attributes, if it has IPv6.
fn ipv6_mtu_of(families: &[AfSpecUnspec]) -> Option<u32> {
    families.iter().find_map(|f| match f {
        AfSpecUnspec::Inet6(attrs) => attrs.iter().find_map(|a| match a {
            AfSpecInet6::DevConf(conf) => u32::try_from(conf.mtu6).ok().filter(|&m| m > 0),
            _ => None,
        }),
        _ => None,
    })
}

fn qdisc(msg: &TcMessage) -> Option<Qdisc> {
    let number = |h: TcHandle| (u32::from(h.major) << 16) | u32::from(h.minor);
    let kind = msg.attributes.iter().find_map(|a| match a {
        TcAttribute::Kind(k) => Some(k.clone()),
        _ => None,
    })?;
    Some(Qdisc {
        ifindex: u32::try_from(msg.header.index).ok()?,
        handle: number(msg.header.handle),
        parent: number(msg.header.parent),
        kind,
    })
}

fn protocol_number(p: RouteProtocol) -> u8 {
    u8::from(p)
}

fn route(msg: RouteMessage) -> Option<Route> {
    let RouteHeader {
        address_family,
        destination_prefix_length,
        table,
        protocol,
        kind,
        ..
    } = msg.header;
    if address_family != AddressFamily::Inet {
        return None;
    }
    let mut r = Route {
        table: u32::from(table),
        dst: Ipv4Addr::UNSPECIFIED,
        dst_len: destination_prefix_length,
        kind,
        protocol: protocol_number(protocol),
        gateway: None,
        oifs: Vec::new(),
        priority: 0,
        message: msg.clone(),
    };
    for attr in &msg.attributes {
        match attr {
            RouteAttribute::Table(t) => r.table = *t,
            RouteAttribute::Destination(RouteAddress::Inet(a)) => r.dst = *a,
            RouteAttribute::Gateway(RouteAddress::Inet(a)) => r.gateway = Some(*a),
            RouteAttribute::Oif(i) => r.oifs.push(*i),
            RouteAttribute::Priority(p) => r.priority = *p,
            RouteAttribute::MultiPath(hops) => {
                r.oifs.extend(hops.iter().map(|h| h.interface_index));
            }
            _ => {}
        }
    }
    Some(r)
}

/// A rule as lbd sees it, of either family (each dump asks for one).
pub(crate) fn rule(msg: RuleMessage) -> Option<Rule> {
    if !matches!(
        msg.header.family,
        AddressFamily::Inet | AddressFamily::Inet6
    ) {
        return None;
    }
    let mut r = Rule {
        priority: 0,
        looks_up: msg.header.action == RuleAction::ToTable,
        table: u32::from(msg.header.table),
        source: None,
        iif: None,
        suppress: None,
        fwmark: None,
        ip_proto: None,
        sport: None,
        other: msg.header.dst_len != 0
            || msg.header.tos != 0
            || msg.header.flags.contains(RuleFlags::Invert),
        protocol: 0,
        message: msg.clone(),
    };
    for attr in &msg.attributes {
        match attr {
            RuleAttribute::Priority(p) => r.priority = *p,
            RuleAttribute::Table(t) => r.table = *t,
            RuleAttribute::Source(a) => r.source = Some((*a, msg.header.src_len)),
            RuleAttribute::Protocol(p) => r.protocol = protocol_number(*p),
            RuleAttribute::Iifname(n) => r.iif = Some(n.clone()),
            // The kernel says -1 of a rule without one (Linux 6.18 sends
            // suppress_prefixlength so with every rule).
            RuleAttribute::SuppressPrefixLen(n) => r.suppress = Some(*n).filter(|&n| n != UNSET),
            RuleAttribute::SuppressIfGroup(group) if *group != UNSET => r.other = true,
            RuleAttribute::FwMark(m) => {
                let mask = r.fwmark.map_or(u32::MAX, |(_, mask)| mask);
                r.fwmark = Some((*m, mask));
            }
            RuleAttribute::FwMask(mask) => {
                let mark = r.fwmark.map_or(0, |(mark, _)| mark);
                r.fwmark = Some((mark, *mask));
            }
            RuleAttribute::IpProtocol(p) => r.ip_proto = Some(u8::from(*p)),
            RuleAttribute::SourcePortRange(range) => r.sport = Some((range.start, range.end)),
            RuleAttribute::Destination(_)
            | RuleAttribute::Oifname(_)
            | RuleAttribute::DestinationPortRange(_)
            | RuleAttribute::UidRange(_)
            | RuleAttribute::TunId(_)
            | RuleAttribute::L3MDev(_) => r.other = true,
            // What this netlink crate does not know (a newer kernel's
            // DSCP, flow label, port masks) is a match lbd never sets.
            RuleAttribute::Other(nla) if narrows(nla) => r.other = true,
            _ => {}
        }
    }
    Some(r)
}

/// A rule's `suppress_prefixlength` or `suppress_ifgroup` that is not
/// set, as the kernel reports it (-1).
const UNSET: u32 = u32::MAX;

/// Linux's `FRA_SPORT_MASK` and `FRA_DPORT_MASK` (6.15), which this
/// netlink crate does not know.
const FRA_SPORT_MASK: u16 = 28;
const FRA_DPORT_MASK: u16 = 29;

/// Whether `nla`, a rule attribute this netlink crate does not know, is a
/// match of its own. A port mask of all ones is none: the kernel reports
/// one with every port range set without a mask (lbd's `sport PORT`).
fn narrows(nla: &DefaultNla) -> bool {
    let mut value = vec![0; nla.value_len()];
    nla.emit_value(&mut value);
    !(matches!(nla.kind(), FRA_SPORT_MASK | FRA_DPORT_MASK) && value == [0xff, 0xff])
}

/// A router's snapshot and the means to make others, for tests here and
/// in `reconcile`.
#[cfg(test)]
pub(crate) mod fixtures {
    use super::*;

    pub fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap_or(Ipv4Addr::UNSPECIFIED)
    }

    pub fn route_in(
        table: u32,
        dst: &str,
        len: u8,
        gw: Option<&str>,
        oif: u32,
        proto: u8,
    ) -> Route {
        Route {
            table,
            dst: ip(dst),
            dst_len: len,
            kind: RouteType::Unicast,
            protocol: proto,
            gateway: gw.map(ip),
            oifs: vec![oif],
            priority: 0,
            message: RouteMessage::default(),
        }
    }

    pub const DHCP: u8 = 16;
    pub const KERNEL: u8 = 2;
    pub const WAN1: u32 = 3;
    pub const WAN2: u32 = 4;
    pub const LAN: u32 = 2;
    pub const VPN: u32 = 9;

    pub fn router() -> Observed {
        let mut local = route_in(LOCAL_TABLE, "100.64.1.2", 32, None, WAN1, KERNEL);
        local.kind = RouteType::Local;
        let mut broadcast = route_in(LOCAL_TABLE, "10.10.0.255", 32, None, LAN, KERNEL);
        broadcast.kind = RouteType::Broadcast;
        Observed {
            routes: vec![
                route_in(MAIN_TABLE, "0.0.0.0", 0, Some("100.64.1.1"), WAN1, DHCP),
                route_in(102, "0.0.0.0", 0, Some("100.64.2.1"), WAN2, DHCP),
                route_in(MAIN_TABLE, "100.64.1.0", 30, None, WAN1, KERNEL),
                route_in(MAIN_TABLE, "10.10.0.0", 24, None, LAN, KERNEL),
                route_in(MAIN_TABLE, "172.16.0.0", 12, Some("10.8.0.1"), VPN, 4),
                route_in(4000, "0.0.0.0", 0, Some("100.64.1.9"), WAN1, ROUTE_PROTOCOL),
                local,
                broadcast,
            ],
            ..Observed::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{fixtures::*, *};
    use rtnetlink::packet_route;

    #[test]
    fn a_links_ipv6_mtu_is_read_from_its_inet6_settings() {
        let mut conf = rtnetlink::packet_route::link::Inet6DevConf::default();
        conf.mtu6 = 1480;
        let families = [
            AfSpecUnspec::Inet(Vec::new()),
            AfSpecUnspec::Inet6(vec![AfSpecInet6::DevConf(conf)]),
        ];
        assert_eq!(ipv6_mtu_of(&families), Some(1480));
        assert_eq!(ipv6_mtu_of(&families[..1]), None, "no IPv6");
        conf.mtu6 = 0;
        let unset = [AfSpecUnspec::Inet6(vec![AfSpecInet6::DevConf(conf)])];
        assert_eq!(ipv6_mtu_of(&unset), None);
    }

    #[test]
    fn a_rule_is_read_as_the_kernel_says_it_and_more_than_lbd_sets_is_someone_elses() {
        let base = || {
            let mut msg = RuleMessage::default();
            msg.header.family = AddressFamily::Inet;
            msg.header.action = RuleAction::ToTable;
            // As Linux 6.18 sends it: `suppress_prefixlength` -1 (unset)
            // with every rule.
            msg.attributes = vec![
                RuleAttribute::Priority(4000),
                RuleAttribute::Table(4000),
                RuleAttribute::SuppressPrefixLen(u32::MAX),
            ];
            msg
        };
        let plain = rule(base()).expect("an IPv4 rule");
        assert!(!plain.other && plain.looks_up);
        assert_eq!((plain.priority, plain.table), (4000, 4000));
        assert_eq!(plain.suppress, None, "-1 is no suppress_prefixlength");
        let mut unset = base();
        unset
            .attributes
            .push(RuleAttribute::SuppressIfGroup(u32::MAX));
        assert!(!rule(unset).expect("an IPv4 rule").other, "-1 is no group");
        let mut group = base();
        group.attributes.push(RuleAttribute::SuppressIfGroup(5));
        assert!(
            rule(group).expect("an IPv4 rule").other,
            "suppress_ifgroup 5"
        );

        let mut tos = base();
        tos.header.tos = 0x10;
        let mut invert = base();
        invert.header.flags |= RuleFlags::Invert;
        // Attributes this netlink crate does not know, as Linux 6.18
        // sends them: FRA_DSCP (25); FRA_SPORT_MASK (28) of a mask.
        let with = |kind: u16, value: &[u8]| {
            let mut msg = base();
            msg.attributes
                .push(RuleAttribute::IpProtocol(packet_route::IpProtocol::Udp));
            msg.attributes.push(RuleAttribute::SourcePortRange(
                packet_route::rule::RulePortRange {
                    start: 36762,
                    end: 36762,
                },
            ));
            msg.attributes
                .push(RuleAttribute::Other(DefaultNla::new(kind, value.to_vec())));
            rule(msg).expect("an IPv4 rule")
        };
        for (what, msg) in [("tos", tos), ("not", invert)] {
            assert!(rule(msg).expect("an IPv4 rule").other, "{what}");
        }
        assert!(with(25, &[10]).other, "dscp");
        assert!(with(FRA_SPORT_MASK, &[0xff, 0x00]).other, "a port mask");
        // What the kernel says of lbd's own `sport PORT`: a mask of all
        // ones, no match of its own.
        let own = with(FRA_SPORT_MASK, &[0xff, 0xff]);
        assert!(!own.other, "lbd's own transport rule");
        assert_eq!(own.sport, Some((36762, 36762)));
    }

    #[test]
    fn the_gateway_is_the_default_routes_next_hop_in_any_table_but_lbds() {
        let o = router();
        assert_eq!(o.default_gateway(WAN1), Some(ip("100.64.1.1")));
        assert_eq!(o.default_gateway(WAN2), Some(ip("100.64.2.1")));
        assert_eq!(o.default_gateway(LAN), None);
    }

    #[test]
    fn a_lans_prefixes_are_its_connected_routes() {
        assert_eq!(router().connected(&[LAN]), [(ip("10.10.0.0"), 24)]);
        assert!(
            router().connected(&[VPN]).is_empty(),
            "a gateway route is not connected"
        );
    }

    #[test]
    fn a_vlan_on_a_lan_brings_its_subnet_to_the_lan() {
        const VLAN: u32 = 12;
        let mut o = router();
        let link = |index, kind: &str, lower| LinkFacts {
            name: format!("if{index}"),
            index,
            mac: None,
            up: true,
            mtu: 1500,
            ipv6_mtu: None,
            kind: Some(kind.into()),
            master: None,
            lower,
            l3: false,
        };
        o.links.push(link(LAN, "veth", None));
        o.links.push(link(VLAN, "vlan", Some(LAN)));
        // A VLAN on the VPN's device is not the LAN's.
        o.links.push(link(13, "vlan", Some(VPN)));
        o.routes
            .push(route_in(MAIN_TABLE, "10.20.0.0", 24, None, VLAN, KERNEL));
        o.routes
            .push(route_in(MAIN_TABLE, "10.30.0.0", 24, None, 13, KERNEL));
        assert_eq!(
            o.connected(&[LAN]),
            [(ip("10.10.0.0"), 24), (ip("10.20.0.0"), 24)]
        );
    }

    #[test]
    fn the_kernel_keeps_local_connected_static_and_vpn_routes_but_not_uplinks() {
        let kept = router().kernel_destinations(&[WAN1, WAN2], &[]);
        let want: BTreeSet<_> = [
            (ip("100.64.1.2"), 32),
            (ip("10.10.0.0"), 24),
            (ip("172.16.0.0"), 12),
        ]
        .into_iter()
        .collect();
        assert_eq!(kept, want);
        // A table named in lookup_tables counts too.
        let mut o = router();
        o.routes
            .push(route_in(77, "192.0.2.0", 24, Some("10.8.0.1"), VPN, 4));
        assert!(o
            .kernel_destinations(&[WAN1, WAN2], &[77])
            .contains(&(ip("192.0.2.0"), 24)));
        assert!(!o
            .kernel_destinations(&[WAN1, WAN2], &[])
            .contains(&(ip("192.0.2.0"), 24)));
    }
}
