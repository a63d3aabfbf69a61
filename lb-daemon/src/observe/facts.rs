//! What the kernel says about an uplink, as far as lb needs it to send
//! traffic through it: its interface, MAC, MTU and carrier, its address,
//! its gateway and the gateway's MAC, read from one snapshot. Pure.
//!
//! An L3 uplink (a tunnel, a raw-IP modem) has no link layer: no MAC, and
//! no gateway to resolve (the kernel routes into the device itself). Its
//! MAC and its gateway's are [`lb_common::NO_LINK_LAYER`], which the data
//! plane takes as "known", and its packets leave without an Ethernet
//! header (the hand-off path).

use std::net::Ipv4Addr;

use crate::{
    config::Gateway,
    observe::kernel::{LinkFacts, Observed},
};

/// What the kernel says about an uplink, as far as lb needs it to send
/// traffic through it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Facts {
    /// Its interface, when it exists.
    pub ifindex: Option<u32>,
    pub mac: Option<[u8; 6]>,
    pub mtu: u32,
    /// Administratively up with carrier.
    pub carrier: bool,
    /// Its IPv4 address: the NAT source of its flows.
    pub addr: Option<Ipv4Addr>,
    /// Its next hop.
    pub gateway: Option<Ipv4Addr>,
    /// The gateway's Ethernet address.
    pub gateway_mac: Option<[u8; 6]>,
    /// It is an L3 device: no Ethernet header, no gateway needed.
    pub l3: bool,
    /// It is a tunnel (WireGuard, a tun or tap device's VPN): its own packets are
    /// the router's own traffic, carried by another uplink.
    pub tunnel: bool,
    /// A WireGuard tunnel's listen port: the UDP port its own packets
    /// leave from. `None`: not known (not WireGuard, or not yet asked).
    pub transport_port: Option<u16>,
}

/// Device kinds (`ip -d link`) of uplinks whose packets ride inside the
/// router's own traffic: kernel WireGuard, and tun and tap devices (both
/// of kind `tun`), which a userspace VPN (wireguard-go, OpenVPN, ZeroTier)
/// drives through its own sockets; a tap is an Ethernet uplink, the rest
/// L3 ones. (The kernel's GRE and IPIP devices are no uplink here: their
/// link types are their own.)
const TUNNEL_KINDS: [&str; 2] = ["wireguard", "tun"];

/// Whether `link` is a tunnel (see [`TUNNEL_KINDS`]).
pub fn is_tunnel(link: &LinkFacts) -> bool {
    link.kind
        .as_deref()
        .is_some_and(|k| TUNNEL_KINDS.contains(&k))
}

impl Facts {
    /// The facts of the uplink on interface `ifname` with `gateway`, as
    /// `observed` has them. A gateway's Ethernet address the kernel no
    /// longer holds (its entry was flushed with a carrier loss, or is being
    /// re-resolved) is taken from `previous` while the gateway stays the
    /// same: the last address that worked is the best guess.
    pub fn observe(observed: &Observed, ifname: &str, gateway: Gateway, previous: &Facts) -> Facts {
        let Some(link) = observed.link(ifname) else {
            return Facts::default();
        };
        let addr = observed.address_of(link.index);
        if link.l3 {
            return Facts {
                ifindex: Some(link.index),
                mac: Some(lb_common::NO_LINK_LAYER),
                mtu: link.mtu,
                carrier: link.up,
                addr,
                // A configured one is honoured (a point-to-point peer);
                // none is needed.
                gateway: match gateway {
                    Gateway::Fixed(ip) => Some(ip),
                    Gateway::Auto => observed.default_gateway(link.index),
                },
                gateway_mac: Some(lb_common::NO_LINK_LAYER),
                l3: true,
                tunnel: is_tunnel(link),
                transport_port: observed.wireguard_ports.get(&link.index).copied(),
            };
        }
        let gateway = match gateway {
            Gateway::Fixed(ip) => Some(ip),
            Gateway::Auto => observed.default_gateway(link.index),
        };
        let same_gateway = previous.ifindex == Some(link.index) && previous.gateway == gateway;
        let gateway_mac = gateway
            .and_then(|gw| observed.neighbour(link.index, gw))
            .or(if same_gateway {
                previous.gateway_mac
            } else {
                None
            });
        Facts {
            ifindex: Some(link.index),
            mac: link.mac,
            mtu: link.mtu,
            carrier: link.up,
            addr,
            gateway,
            gateway_mac,
            l3: false,
            tunnel: is_tunnel(link),
            transport_port: observed.wireguard_ports.get(&link.index).copied(),
        }
    }

    /// Whether the kernel can route through it: up, with an address, and
    /// a next hop (an L3 uplink needs none: its route goes into the
    /// device). What lbd's table for it needs.
    pub fn routable(&self) -> bool {
        self.carrier && self.addr.is_some() && (self.gateway.is_some() || self.l3)
    }

    /// Everything needed to send through the uplink is known (whether it
    /// works is health's business).
    pub fn complete(&self) -> bool {
        self.ifindex.is_some()
            && self.mac.is_some()
            && self.addr.is_some()
            && (self.l3 || self.gateway.is_some())
            && self.gateway_mac.is_some()
    }
}

/// An uplink's facts for tests here and in `daemon`.
#[cfg(test)]
pub(crate) mod fixtures {
    use super::*;

    pub const GW: Ipv4Addr = Ipv4Addr::new(100, 64, 1, 1);

    /// The facts of an uplink ready to carry traffic.
    pub fn ready() -> Facts {
        Facts {
            ifindex: Some(3),
            mac: Some([2, 0, 0, 0, 0, 1]),
            mtu: 1500,
            carrier: true,
            addr: Some(Ipv4Addr::new(100, 64, 1, 2)),
            gateway: Some(GW),
            gateway_mac: Some([2, 0, 0, 0, 0, 2]),
            l3: false,
            tunnel: false,
            transport_port: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::{
        kernel::{Address, LinkFacts},
        netlink::Neighbour,
    };

    use super::fixtures::{ready, GW};

    #[test]
    fn facts_follow_the_kernel_and_keep_a_flushed_gateway_mac() {
        let mut o = Observed {
            links: vec![LinkFacts {
                name: "wan1".into(),
                index: 3,
                mac: Some([2, 0, 0, 0, 0, 1]),
                up: true,
                mtu: 1500,
                ipv6_mtu: None,
                kind: Some("veth".into()),
                master: None,
                lower: None,
                l3: false,
            }],
            addresses: vec![Address {
                ifindex: 3,
                addr: Ipv4Addr::new(100, 64, 1, 2),
                prefix_len: 30,
            }],
            neighbours: vec![Neighbour {
                ifindex: 3,
                ip: GW,
                mac: [2, 0, 0, 0, 0, 2],
            }],
            ..Observed::default()
        };
        let f = Facts::observe(&o, "wan1", Gateway::Fixed(GW), &Facts::default());
        assert_eq!(f, ready());
        assert_eq!(
            Facts::observe(&o, "wan9", Gateway::Fixed(GW), &f),
            Facts::default()
        );
        // Auto: no default route through wan1 yet.
        assert_eq!(Facts::observe(&o, "wan1", Gateway::Auto, &f).gateway, None);
        // The neighbour entry goes (carrier loss flushes it): kept.
        o.neighbours.clear();
        assert_eq!(
            Facts::observe(&o, "wan1", Gateway::Fixed(GW), &f).gateway_mac,
            f.gateway_mac
        );
        // Another gateway: not the old one's address.
        let other = Gateway::Fixed(Ipv4Addr::new(100, 64, 1, 5));
        assert_eq!(Facts::observe(&o, "wan1", other, &f).gateway_mac, None);
    }

    #[test]
    fn an_l3_uplink_needs_no_mac_and_no_gateway() {
        let o = Observed {
            links: vec![LinkFacts {
                name: "lte0".into(),
                index: 7,
                mac: None,
                up: true,
                mtu: 1420,
                ipv6_mtu: None,
                kind: Some("tun".into()),
                master: None,
                lower: None,
                l3: true,
            }],
            addresses: vec![Address {
                ifindex: 7,
                addr: Ipv4Addr::new(10, 77, 0, 2),
                prefix_len: 30,
            }],
            ..Observed::default()
        };
        let f = Facts::observe(&o, "lte0", Gateway::Auto, &Facts::default());
        assert!(f.l3 && f.complete(), "{f:?}");
        assert_eq!(f.gateway, None);
        assert_eq!(f.mac, Some(lb_common::NO_LINK_LAYER));
        assert_eq!(f.gateway_mac, Some(lb_common::NO_LINK_LAYER));
        assert_eq!(f.mtu, 1420);
        let lifecycle = crate::daemon::uplink::lifecycle(
            crate::daemon::uplink::Admin::Enabled,
            &f,
            Some(crate::health::State::Up),
            true,
        );
        assert_eq!(lifecycle.as_str(), "in service");
        // A tun device is a VPN's: a tunnel. A modem's raw-IP device (its
        // driver's, of no link kind) is not.
        assert!(f.tunnel);
        let mut modem = o.clone();
        modem.links[0].kind = None;
        assert!(!Facts::observe(&modem, "lte0", Gateway::Auto, &Facts::default()).tunnel);
        // An OpenVPN or ZeroTier tap: an Ethernet uplink, and a tunnel.
        let mut tap = o.clone();
        tap.links[0].l3 = false;
        tap.links[0].mac = Some([2, 0, 0, 0, 0, 7]);
        let f = Facts::observe(&tap, "lte0", Gateway::Auto, &Facts::default());
        assert!(!f.l3 && f.tunnel, "{f:?}");
        // A veth or a NIC is not.
        tap.links[0].kind = Some("veth".into());
        assert!(!Facts::observe(&tap, "lte0", Gateway::Auto, &Facts::default()).tunnel);
    }
}
