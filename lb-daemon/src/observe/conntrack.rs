//! What the kernel's connection tracking holds for one connection, asked
//! over ctnetlink (`IPCTNL_MSG_CT_GET`), for `lbctl explain`.
//!
//! The data plane asks conntrack the same question on its new-flow path
//! (`bpf_xdp_ct_lookup`) and leaves a connection conntrack holds to the
//! kernel; this tells the operator which connection that is: a port
//! forward (its original destination is not where the packet comes from),
//! and the uplink it came in on (lbd's connmark, see `slowpath`). The
//! request and the reading of the answer are pure and tested without a
//! kernel. Both families: the tuple's addresses say which.
//!
//! It changes a connection in one way only, [`forget`]: when lbd moves
//! the kernel's IPv6 to another uplink, the LAN's connections the kernel
//! translated for the old one are forgotten, so that their next packet
//! starts a new connection, translated for the new uplink (IPv6's prefix
//! translation, unlike IPv4's masquerade, never lets go of a connection
//! whose way out changed).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{Context, Result};
use netlink_sys::protocols::NETLINK_NETFILTER;

use crate::observe::nlmsg::{self, NLA_F_NESTED, NLM_F_REQUEST};

/// `NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_GET`.
const CT_GET: u16 = (1 << 8) | 1;
/// `NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_DELETE`.
const CT_DELETE: u16 = (1 << 8) | 2;
const NFNETLINK_V0: u8 = 0;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_MARK: u16 = 8;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;

/// One direction of a connection; both addresses of one family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuple {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
}

/// A connection as conntrack holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Connection {
    /// As its first packet came.
    pub original: Tuple,
    /// As its answers are expected to come (after NAT).
    pub reply: Tuple,
    pub mark: u32,
}

impl Connection {
    /// Whether its original destination was rewritten (DNAT: a port
    /// forward), and to what.
    pub fn forwarded_to(&self) -> Option<(IpAddr, u16)> {
        let to = (self.reply.src, self.reply.src_port);
        (to != (self.original.dst, self.original.dst_port)).then_some(to)
    }
}

/// The request for the connection `tuple` belongs to (either direction:
/// conntrack finds a connection by the tuples of both).
fn request(tuple: &Tuple, seq: u32) -> Vec<u8> {
    about(CT_GET, NLM_F_REQUEST, tuple, seq)
}

/// A message of `kind` about the connection whose original tuple is
/// `tuple`.
fn about(kind: u16, flags: u16, tuple: &Tuple, seq: u32) -> Vec<u8> {
    let octets = |a: IpAddr| match a {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    };
    let (family, src, dst) = match tuple.src {
        IpAddr::V4(_) => (AF_INET, CTA_IP_V4_SRC, CTA_IP_V4_DST),
        IpAddr::V6(_) => (AF_INET6, CTA_IP_V6_SRC, CTA_IP_V6_DST),
    };
    let ip = [
        nlmsg::attribute(src, &octets(tuple.src)),
        nlmsg::attribute(dst, &octets(tuple.dst)),
    ]
    .concat();
    let proto = [
        nlmsg::attribute(CTA_PROTO_NUM, &[tuple.proto]),
        nlmsg::attribute(CTA_PROTO_SRC_PORT, &tuple.src_port.to_be_bytes()),
        nlmsg::attribute(CTA_PROTO_DST_PORT, &tuple.dst_port.to_be_bytes()),
    ]
    .concat();
    let orig = [
        nlmsg::attribute(CTA_TUPLE_IP | NLA_F_NESTED, &ip),
        nlmsg::attribute(CTA_TUPLE_PROTO | NLA_F_NESTED, &proto),
    ]
    .concat();
    nlmsg::message(
        kind,
        flags,
        seq,
        [family, NFNETLINK_V0, 0, 0],
        &[(CTA_TUPLE_ORIG | NLA_F_NESTED, &orig)],
    )
}

/// A tuple from its nested attributes.
fn tuple(value: &[u8]) -> Result<Tuple> {
    let mut t = Tuple {
        src: Ipv4Addr::UNSPECIFIED.into(),
        dst: Ipv4Addr::UNSPECIFIED.into(),
        src_port: 0,
        dst_port: 0,
        proto: 0,
    };
    let addr = |v: &[u8]| -> Result<IpAddr> {
        Ok(<[u8; 4]>::try_from(v.get(..4).context("a short IPv4 address")?)?.into())
    };
    let addr6 = |v: &[u8]| -> Result<IpAddr> {
        let octets = <[u8; 16]>::try_from(v.get(..16).context("a short IPv6 address")?)?;
        Ok(Ipv6Addr::from(octets).into())
    };
    let port = |v: &[u8]| -> Result<u16> {
        Ok(u16::from_be_bytes(
            v.get(..2).context("a short port")?.try_into()?,
        ))
    };
    for (kind, v) in nlmsg::attributes(value)? {
        match kind {
            CTA_TUPLE_IP => {
                for (k, v) in nlmsg::attributes(v)? {
                    match k {
                        CTA_IP_V4_SRC => t.src = addr(v)?,
                        CTA_IP_V4_DST => t.dst = addr(v)?,
                        CTA_IP_V6_SRC => t.src = addr6(v)?,
                        CTA_IP_V6_DST => t.dst = addr6(v)?,
                        _ => {}
                    }
                }
            }
            CTA_TUPLE_PROTO => {
                for (k, v) in nlmsg::attributes(v)? {
                    match k {
                        CTA_PROTO_NUM => t.proto = *v.first().context("no protocol")?,
                        CTA_PROTO_SRC_PORT => t.src_port = port(v)?,
                        CTA_PROTO_DST_PORT => t.dst_port = port(v)?,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Ok(t)
}

/// The connection in the kernel's answer.
fn connection(reply: &[u8]) -> Result<Connection> {
    let attrs = nlmsg::reply_attributes(reply)?;
    let find = |kind| {
        attrs
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, v)| *v)
            .with_context(|| format!("no attribute {kind} in conntrack's answer"))
    };
    let mark = attrs
        .iter()
        .find(|(k, _)| *k == CTA_MARK)
        .and_then(|(_, v)| v.get(..4))
        .map_or(0, |v| u32::from_be_bytes([v[0], v[1], v[2], v[3]]));
    Ok(Connection {
        original: tuple(find(CTA_TUPLE_ORIG)?)?,
        reply: tuple(find(CTA_TUPLE_REPLY)?)?,
        mark,
    })
}

/// The connection conntrack holds for `tuple`, if any (blocking).
pub fn lookup(tuple: &Tuple) -> Result<Option<Connection>> {
    let socket = nlmsg::open(NETLINK_NETFILTER).context("ctnetlink")?;
    let reply = nlmsg::ask(&socket, &request(tuple, 1))?;
    match connection(&reply) {
        Ok(c) => Ok(Some(c)),
        Err(e)
            if e.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.raw_os_error() == Some(libc::ENOENT)) =>
        {
            Ok(None)
        }
        Err(e) => Err(e).context("asking conntrack for a connection"),
    }
}

/// Every IPv6 connection conntrack holds (blocking: one dump).
pub fn all6() -> Result<Vec<Connection>> {
    let socket = nlmsg::open(NETLINK_NETFILTER).context("ctnetlink")?;
    let request = nlmsg::message(
        CT_GET,
        NLM_F_REQUEST | nlmsg::NLM_F_DUMP,
        1,
        [AF_INET6, NFNETLINK_V0, 0, 0],
        &[],
    );
    nlmsg::dump(&socket, &request)
        .context("dumping conntrack's IPv6 connections")?
        .iter()
        .map(|m| connection(m))
        .collect()
}

/// The LAN's connections the kernel forwards out: from `lan`'s prefix to
/// a global address outside it (not the router, not the LAN itself).
pub fn leaving(connections: &[Connection], lan: (Ipv6Addr, u8)) -> Vec<Tuple> {
    let inside = |a: IpAddr| match a {
        IpAddr::V6(a) => crate::observe::kernel6::within((a, 128), lan),
        IpAddr::V4(_) => false,
    };
    let global = |a: IpAddr| match a {
        IpAddr::V6(a) => !lb_common::kernels_scope6(&a.octets()),
        IpAddr::V4(_) => false,
    };
    connections
        .iter()
        .map(|c| c.original)
        .filter(|t| inside(t.src) && !inside(t.dst) && global(t.dst))
        .collect()
}

/// Make conntrack forget each connection of `tuples` (by original
/// tuple); one that is gone already is no error. Returns how many were
/// forgotten.
pub fn forget(tuples: &[Tuple]) -> Result<usize> {
    let socket = nlmsg::open(NETLINK_NETFILTER).context("ctnetlink")?;
    let mut forgotten = 0;
    for (seq, t) in tuples.iter().enumerate() {
        let msg = about(
            CT_DELETE,
            NLM_F_REQUEST | nlmsg::NLM_F_ACK,
            t,
            seq as u32 + 1,
        );
        match nlmsg::ask(&socket, &msg).and_then(|reply| nlmsg::reply_attributes(&reply).map(drop))
        {
            Ok(()) => forgotten += 1,
            Err(e)
                if e.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.raw_os_error() == Some(libc::ENOENT)) => {}
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "making conntrack forget {}:{} -> {}:{}",
                        t.src, t.src_port, t.dst, t.dst_port
                    )
                })
            }
        }
    }
    Ok(forgotten)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lans_forwarded_ipv6_connections_are_told_from_the_rest() {
        let a = |s: &str| -> IpAddr { s.parse().expect("an address") };
        let c = |src: &str, dst: &str| {
            let t = Tuple {
                src: a(src),
                dst: a(dst),
                src_port: 1000,
                dst_port: 2000,
                proto: 50,
            };
            Connection {
                original: t,
                reply: t,
                mark: 0,
            }
        };
        let lan = ("2001:db8:1:1000::".parse().expect("v6"), 64);
        let all = [
            c("2001:db8:1:1000::5", "2001:db8:ff::10"),
            c("2001:db8:1:1000::5", "2001:db8:1:1000::1"),
            c("2001:db8:1:1000::5", "ff02::1"),
            c("2001:db8:ff::10", "2001:db8:1:1000::5"),
            c("2001:db8:1:ffff::2", "2001:db8:ff::10"),
        ];
        let out = leaving(&all, lan);
        assert_eq!(out, [all[0].original], "only the LAN's, to the internet");
        let req = about(CT_DELETE, NLM_F_REQUEST | nlmsg::NLM_F_ACK, &out[0], 1);
        assert_eq!(u16::from_ne_bytes([req[4], req[5]]), CT_DELETE);
        assert_eq!(req[16], AF_INET6);
    }

    fn t(src: [u8; 4], sp: u16, dst: [u8; 4], dp: u16) -> Tuple {
        Tuple {
            src: src.into(),
            dst: dst.into(),
            src_port: sp,
            dst_port: dp,
            proto: 17,
        }
    }

    #[test]
    fn a_port_forward_is_read_from_the_answer_and_told_apart() {
        let original = t([198, 51, 100, 10], 5555, [100, 64, 2, 2], 9090);
        let reply = t([10, 10, 0, 2], 9000, [198, 51, 100, 10], 5555);
        // The kernel's answer has the shape of our request, with both
        // tuples and the mark.
        let req = request(&original, 1);
        let orig_attr = nlmsg::reply_attributes(&req).expect("parses")[0].1.to_vec();
        let reply_attr = nlmsg::reply_attributes(&request(&reply, 1)).expect("parses")[0]
            .1
            .to_vec();
        let answer = nlmsg::message(
            0x100,
            0,
            1,
            [AF_INET, 0, 0, 0],
            &[
                (CTA_TUPLE_ORIG | NLA_F_NESTED, &orig_attr),
                (CTA_TUPLE_REPLY | NLA_F_NESTED, &reply_attr),
                (CTA_MARK, &0x0002_0000u32.to_be_bytes()),
            ],
        );
        let c = connection(&answer).expect("reads");
        assert_eq!(
            (c.original, c.reply, c.mark),
            (original, reply, 0x0002_0000)
        );
        assert_eq!(
            c.forwarded_to(),
            Some((Ipv4Addr::new(10, 10, 0, 2).into(), 9000))
        );
        // A connection to the router itself is no forward.
        let own = Connection {
            original,
            reply: t([100, 64, 2, 2], 9090, [198, 51, 100, 10], 5555),
            mark: 0,
        };
        assert_eq!(own.forwarded_to(), None);
    }

    #[test]
    fn an_ipv6_connection_is_asked_and_read_with_ipv6_attributes() {
        let a = |s: &str| -> IpAddr { s.parse().expect("an address") };
        let original = Tuple {
            src: a("2001:db8:1:1ab::10"),
            dst: a("2001:db8:ff::10"),
            src_port: 40000,
            dst_port: 443,
            proto: 6,
        };
        let req = request(&original, 1);
        // The family in the nfgenmsg (after the 16-byte netlink header).
        assert_eq!(req[16], AF_INET6);
        let orig_attr = nlmsg::reply_attributes(&req).expect("parses")[0].1.to_vec();
        let reply = Tuple {
            src: original.dst,
            dst: original.src,
            src_port: 443,
            dst_port: 40000,
            proto: 6,
        };
        let reply_attr = nlmsg::reply_attributes(&request(&reply, 1)).expect("parses")[0]
            .1
            .to_vec();
        let answer = nlmsg::message(
            0x100,
            0,
            1,
            [AF_INET6, 0, 0, 0],
            &[
                (CTA_TUPLE_ORIG | NLA_F_NESTED, &orig_attr),
                (CTA_TUPLE_REPLY | NLA_F_NESTED, &reply_attr),
            ],
        );
        let c = connection(&answer).expect("reads");
        assert_eq!((c.original, c.reply), (original, reply));
        assert_eq!(c.forwarded_to(), None);
    }
}
