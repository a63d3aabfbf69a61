//! Small netlink and socket helpers: which neighbour entries are usable,
//! provoking ARP resolution of a gateway (by sending it a datagram, as any
//! first packet to it would), binding a socket to an interface, and
//! whether an interface has carrier now.

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6, UdpSocket},
    os::fd::AsRawFd,
};

use anyhow::{Context, Result};
use rtnetlink::packet_route::{
    neighbour::{
        NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
    },
    AddressFamily,
};

/// An IPv4 neighbour whose Ethernet address the kernel holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Neighbour {
    pub ifindex: u32,
    pub ip: Ipv4Addr,
    pub mac: [u8; 6],
}

/// The neighbour in `msg`, if it is an IPv4 one with a usable Ethernet
/// address: not still being resolved, not failed (a failed entry may
/// still carry the address that stopped answering).
pub fn usable_neighbour(msg: &NeighbourMessage) -> Option<Neighbour> {
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
            NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => ip = Some(*a),
            NeighbourAttribute::LinkLayerAddress(b) => mac = <[u8; 6]>::try_from(b.as_slice()).ok(),
            _ => {}
        }
    }
    Some(Neighbour {
        ifindex: msg.header.ifindex,
        ip: ip?,
        mac: mac?,
    })
}

/// Where a bridge last heard a MAC address: one entry of its forwarding
/// database, as the bridge learned it from a frame (or an operator fixed
/// it), never one of its own addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct BridgeEntry {
    /// The bridge.
    pub bridge: u32,
    pub mac: [u8; 6],
    /// The port the MAC is behind.
    pub port: u32,
    /// The VLAN of the entry, on a bridge that filters VLANs.
    pub vlan: Option<u16>,
}

/// The bridge forwarding entry in `msg` (family `AF_BRIDGE`), if it is a
/// bridge's (not a device's own list) and not the bridge's own address.
pub fn bridge_entry(msg: &NeighbourMessage) -> Option<BridgeEntry> {
    // The bridge's entries name it (`NDA_MASTER`); a device's own list
    // (`NTF_SELF`) does not. The kernel sets no flag that tells them apart.
    if msg.header.family != AddressFamily::Bridge
        || msg.header.state == NeighbourState::Permanent
        || msg.header.flags.contains(NeighbourFlags::Own)
    {
        return None;
    }
    let mut bridge = None;
    let mut mac = None;
    let mut vlan = None;
    for attr in &msg.attributes {
        match attr {
            NeighbourAttribute::Controller(b) => bridge = Some(*b),
            NeighbourAttribute::LinkLayerAddress(b) => mac = <[u8; 6]>::try_from(b.as_slice()).ok(),
            NeighbourAttribute::Vlan(v) => vlan = Some(*v),
            _ => {}
        }
    }
    Some(BridgeEntry {
        bridge: bridge?,
        mac: mac?,
        port: msg.header.ifindex,
        vlan,
    })
}

/// Send one empty datagram to `gateway` (discard port) out of `ifname`, so
/// that the kernel resolves the gateway's MAC address.
pub fn poke(ifname: &str, gateway: Ipv4Addr) -> Result<()> {
    let sock = UdpSocket::bind("0.0.0.0:0")?;
    bind_to_device(&sock, ifname)?;
    sock.send_to(&[], SocketAddrV4::new(gateway, 9))?;
    Ok(())
}

/// As [`poke`], for an IPv6 next hop (neighbour discovery): its
/// link-local address is scoped to `ifindex`.
pub fn poke6(ifname: &str, ifindex: u32, gateway: Ipv6Addr) -> Result<()> {
    let sock = UdpSocket::bind("[::]:0")?;
    bind_to_device(&sock, ifname)?;
    sock.send_to(&[], SocketAddrV6::new(gateway, 9, 0, ifindex))?;
    Ok(())
}

/// `SO_BINDTODEVICE`: the socket's traffic leaves by `ifname` only.
pub fn bind_to_device(sock: &impl AsRawFd, ifname: &str) -> Result<()> {
    let name = ifname.as_bytes();
    // SAFETY: passing a pointer and length of a live byte slice.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_BINDTODEVICE,
            name.as_ptr().cast(),
            name.len() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("binding a socket to {ifname}"));
    }
    Ok(())
}

/// `RTM_GETLINK`.
const RTM_GETLINK: u16 = 18;
/// `IFF_UP` and `IFF_LOWER_UP` in `ifinfomsg`'s flags.
const IFF_UP: u32 = 0x1;
const IFF_LOWER_UP: u32 = 0x1_0000;

/// Whether interface `ifindex` is up with carrier this moment (asked of
/// the kernel, blocking: one request). For the ring watch's readings,
/// which come between rounds. Its flags, not its operational state nor a
/// link event: those follow a carrier change up to a second later
/// (the kernel's link watch), its `IFF_LOWER_UP` at once.
pub fn carries(ifindex: u32) -> Result<bool> {
    let socket =
        super::nlmsg::open(netlink_sys::protocols::NETLINK_ROUTE).context("netlink (route)")?;
    let reply = super::nlmsg::ask(&socket, &get_link(ifindex))?;
    link_carries(&reply).with_context(|| format!("reading interface {ifindex}'s link"))
}

/// The request for link `ifindex`: the netlink header, then `ifinfomsg`
/// (family, type, index, flags, change), no attributes.
fn get_link(ifindex: u32) -> Vec<u8> {
    const LEN: u32 = 16 + 16;
    let mut msg = Vec::with_capacity(LEN as usize);
    msg.extend_from_slice(&LEN.to_ne_bytes());
    msg.extend_from_slice(&RTM_GETLINK.to_ne_bytes());
    msg.extend_from_slice(&super::nlmsg::NLM_F_REQUEST.to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend_from_slice(&[0; 4]);
    msg.extend_from_slice(&ifindex.to_ne_bytes());
    msg.extend_from_slice(&[0; 8]);
    msg
}

/// Whether the link in `reply` (a `RTM_NEWLINK`, or the kernel's error)
/// is up with carrier.
fn link_carries(reply: &[u8]) -> Result<bool> {
    // An error (no such device) comes as attributes' error.
    let flags = match reply.get(4..6).map(|k| u16::from_ne_bytes([k[0], k[1]])) {
        Some(super::nlmsg::NLMSG_ERROR) => {
            super::nlmsg::reply_attributes(reply)?;
            anyhow::bail!("an acknowledgement where a link was asked for");
        }
        _ => reply.get(24..28).context("a short link message")?,
    };
    let flags = u32::from_ne_bytes([flags[0], flags[1], flags[2], flags[3]]);
    Ok(flags & IFF_UP != 0 && flags & IFF_LOWER_UP != 0)
}

#[cfg(test)]
mod tests {
    /// A `RTM_NEWLINK` answer with `flags`.
    fn new_link(flags: u32) -> Vec<u8> {
        let mut m = get_link(3);
        m[4..6].copy_from_slice(&16u16.to_ne_bytes());
        m[24..28].copy_from_slice(&flags.to_ne_bytes());
        m
    }

    #[test]
    fn a_link_carries_when_up_with_its_lower_layer_up() {
        let ask = get_link(3);
        assert_eq!(ask.len(), 32);
        assert_eq!(ask[20..24], 3u32.to_ne_bytes(), "the index in ifinfomsg");
        assert!(link_carries(&new_link(IFF_UP | IFF_LOWER_UP | 0x40)).expect("read"));
        assert!(
            !link_carries(&new_link(IFF_UP)).expect("read"),
            "no carrier"
        );
        assert!(
            !link_carries(&new_link(IFF_LOWER_UP)).expect("read"),
            "down"
        );
        assert!(link_carries(&new_link(IFF_UP)[..20]).is_err(), "cut short");
    }

    use super::*;

    fn entry(state: NeighbourState, attributes: Vec<NeighbourAttribute>) -> NeighbourMessage {
        let mut msg = NeighbourMessage::default();
        msg.header.ifindex = 4;
        msg.header.state = state;
        msg.attributes = attributes;
        msg
    }

    #[test]
    fn only_resolved_ipv4_neighbours_with_an_ethernet_address_are_usable() {
        let gw = Ipv4Addr::new(100, 64, 1, 1);
        let mac = [2, 0, 0x5e, 0, 1, 0x99];
        let attrs = || {
            vec![
                NeighbourAttribute::Destination(NeighbourAddress::Inet(gw)),
                NeighbourAttribute::LinkLayerAddress(mac.to_vec()),
            ]
        };
        let usable = Some(Neighbour {
            ifindex: 4,
            ip: gw,
            mac,
        });
        for state in [
            NeighbourState::Reachable,
            NeighbourState::Stale,
            NeighbourState::Delay,
            NeighbourState::Probe,
            NeighbourState::Permanent,
        ] {
            assert_eq!(
                usable_neighbour(&entry(state, attrs())),
                usable,
                "{state:?}"
            );
        }
        for state in [
            NeighbourState::Incomplete,
            NeighbourState::Failed,
            NeighbourState::None,
        ] {
            assert_eq!(usable_neighbour(&entry(state, attrs())), None, "{state:?}");
        }
        let v6 = NeighbourAttribute::Destination(NeighbourAddress::Inet6(std::net::Ipv6Addr::new(
            0xfe80, 0, 0, 0, 0, 0, 0, 1,
        )));
        let no_v4 = vec![v6, NeighbourAttribute::LinkLayerAddress(mac.to_vec())];
        assert_eq!(
            usable_neighbour(&entry(NeighbourState::Reachable, no_v4)),
            None
        );
        let short = vec![
            NeighbourAttribute::Destination(NeighbourAddress::Inet(gw)),
            NeighbourAttribute::LinkLayerAddress(vec![1, 2, 3]),
        ];
        assert_eq!(
            usable_neighbour(&entry(NeighbourState::Reachable, short)),
            None
        );
    }

    #[test]
    fn a_bridges_learned_entries_are_read_and_its_own_and_devices_lists_are_not() {
        let mac = [2, 0, 0, 0, 0, 7];
        let fdb = |state, flags, attrs: Vec<NeighbourAttribute>| {
            let mut msg = entry(state, attrs);
            msg.header.family = AddressFamily::Bridge;
            msg.header.flags = flags;
            msg
        };
        let attrs = || {
            vec![
                NeighbourAttribute::LinkLayerAddress(mac.to_vec()),
                NeighbourAttribute::Controller(2),
            ]
        };
        let learned = Some(BridgeEntry {
            bridge: 2,
            mac,
            port: 4,
            vlan: None,
        });
        for state in [
            NeighbourState::Reachable,
            NeighbourState::Stale,
            NeighbourState::Noarp,
        ] {
            let msg = fdb(state, NeighbourFlags::Controller, attrs());
            assert_eq!(bridge_entry(&msg), learned, "{state:?}");
        }
        // The bridge's own address, a device's own list, no bridge named,
        // and an IPv4 neighbour.
        let own = fdb(
            NeighbourState::Permanent,
            NeighbourFlags::Controller,
            attrs(),
        );
        let device = fdb(NeighbourState::Reachable, NeighbourFlags::Own, attrs());
        let unnamed = fdb(
            NeighbourState::Reachable,
            NeighbourFlags::empty(),
            vec![NeighbourAttribute::LinkLayerAddress(mac.to_vec())],
        );
        let mut inet = fdb(
            NeighbourState::Reachable,
            NeighbourFlags::Controller,
            attrs(),
        );
        inet.header.family = AddressFamily::Inet;
        for msg in [own, device, unnamed, inet] {
            assert_eq!(bridge_entry(&msg), None, "{msg:?}");
        }
    }
}
