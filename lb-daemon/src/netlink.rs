//! What the kernel knows about interfaces and neighbours, through
//! rtnetlink: interface indexes, MAC and IPv4 addresses, and gateway MACs.
//!
//! Read-only towards the kernel's configuration: lb never adds addresses or
//! routes. The one thing it provokes is ARP resolution of a gateway, by
//! sending it a datagram, as any first packet to it would.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddrV4, UdpSocket},
    os::fd::AsRawFd,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use futures::TryStreamExt;
use rtnetlink::{
    packet_route::{
        address::AddressAttribute,
        link::{LinkAttribute, State},
        neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState},
        AddressFamily,
    },
    Handle,
};

/// An interface as lb needs it.
#[derive(Debug, Clone)]
pub struct Link {
    pub name: String,
    pub index: u32,
    pub mac: [u8; 6],
    /// Operationally up (carrier and admin state).
    pub up: bool,
    pub mtu: u32,
}

pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// Open a netlink connection; its I/O runs on the tokio runtime.
    pub fn connect() -> Result<Self> {
        let (conn, handle, _) =
            rtnetlink::new_connection().context("opening a netlink socket failed")?;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    /// The interface called `name`.
    pub async fn link(&self, name: &str) -> Result<Link> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        let msg = match links.try_next().await {
            Ok(Some(msg)) => msg,
            Ok(None) | Err(_) => bail!("interface {name} not found (see `ip link`; is lbd running in the right network namespace?)"),
        };
        let mut mac = [0u8; 6];
        let mut up = false;
        let mut mtu = 1500;
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::Mtu(m) => mtu = *m,
                LinkAttribute::Address(bytes) if bytes.len() == 6 => mac.copy_from_slice(bytes),
                LinkAttribute::OperState(state) => up = matches!(state, State::Up | State::Unknown),
                _ => {}
            }
        }
        if mac == [0; 6] {
            bail!("interface {name} has no Ethernet address; lb forwards only between Ethernet interfaces");
        }
        Ok(Link {
            name: name.to_string(),
            index: msg.header.index,
            mac,
            up,
            mtu,
        })
    }

    /// IPv4 addresses and prefix lengths on interface `index`, or on every
    /// interface when `index` is `None`.
    pub async fn ipv4_addresses(&self, index: Option<u32>) -> Result<Vec<(Ipv4Addr, u8)>> {
        let mut req = self.handle.address().get();
        if let Some(index) = index {
            req = req.set_link_index_filter(index);
        }
        let mut stream = req.execute();
        let mut out = Vec::new();
        while let Some(msg) = stream
            .try_next()
            .await
            .context("listing addresses over netlink failed")?
        {
            for attr in &msg.attributes {
                if let AddressAttribute::Local(IpAddr::V4(a))
                | AddressAttribute::Address(IpAddr::V4(a)) = attr
                {
                    let entry = (*a, msg.header.prefix_len);
                    if !out.contains(&entry) {
                        out.push(entry);
                    }
                }
            }
        }
        Ok(out)
    }

    /// The MAC address the neighbour table holds for `ip` on interface
    /// `index`, if it holds a usable one.
    pub async fn neighbour(&self, index: u32, ip: Ipv4Addr) -> Result<Option<[u8; 6]>> {
        let mut stream = self
            .handle
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Inet)
            .execute();
        while let Some(msg) = stream
            .try_next()
            .await
            .context("listing neighbours over netlink failed")?
        {
            if let Some(entry) = usable_neighbour(&msg) {
                if entry.ifindex == index && entry.ip == ip {
                    return Ok(Some(entry.mac));
                }
            }
        }
        Ok(None)
    }

    /// Resolve the MAC address of `gateway` on `link`, asking the kernel to
    /// ARP for it if it is not known yet; waits at most `wait`.
    pub async fn resolve_gateway(
        &self,
        link: &Link,
        gateway: Ipv4Addr,
        wait: Duration,
    ) -> Result<[u8; 6]> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut poked = false;
        loop {
            if let Some(mac) = self.neighbour(link.index, gateway).await? {
                return Ok(mac);
            }
            if !poked {
                poke(&link.name, gateway).with_context(|| {
                    format!(
                        "sending a packet to gateway {gateway} on {} to resolve it",
                        link.name
                    )
                })?;
                poked = true;
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "gateway {gateway} did not answer ARP on {} within {:?}; check the cable and the gateway address (`ip neigh show dev {}`)",
                    link.name,
                    wait,
                    link.name
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

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

/// Send one empty datagram to `gateway` (discard port) out of `ifname`, so
/// that the kernel resolves the gateway's MAC address.
fn poke(ifname: &str, gateway: Ipv4Addr) -> Result<()> {
    let sock = UdpSocket::bind("0.0.0.0:0")?;
    bind_to_device(&sock, ifname)?;
    sock.send_to(&[], SocketAddrV4::new(gateway, 9))?;
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

#[cfg(test)]
mod tests {
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
}
