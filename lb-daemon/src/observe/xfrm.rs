//! The kernel's IPsec policies (XFRM, as strongSwan and libreswan install
//! them): the destinations of the outbound ones that encrypt (or block)
//! are the kernel's, like the destinations it routes itself. The fast path
//! would NAT a LAN client's packet to the branch office and send it to
//! the ISP in the clear, past the kernel's encryption.
//!
//! Owns the dump request and the reading of a policy message (pure
//! functions, tested without a kernel). Reads only; a kernel without
//! XFRM's netlink family has no policies.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::atomic::{AtomicBool, Ordering},
};

use anyhow::Result;

use crate::observe::nlmsg;

/// `NETLINK_XFRM`.
const NETLINK_XFRM: isize = 6;
/// `XFRM_MSG_GETPOLICY`: asked with a dump flag, every policy.
const XFRM_MSG_GETPOLICY: u16 = 0x15;
/// `XFRM_MSG_NEWPOLICY`: each policy of the dump.
const XFRM_MSG_NEWPOLICY: u16 = 0x13;
/// `struct xfrm_userpolicy_info`'s size, and where its fields lie: its
/// selector (destination address first, 16 bytes whatever the family;
/// family, destination prefix length), then lifetimes, priority, index,
/// direction and action.
const POLICY_INFO_LEN: usize = 168;
const SEL_FAMILY: usize = 40;
const SEL_PREFIXLEN_D: usize = 42;
const DIR: usize = 160;
const ACTION: usize = 161;
/// `XFRM_POLICY_OUT`: what leaves the router (forwarded packets too).
const POLICY_OUT: u8 = 1;
/// `XFRM_POLICY_BLOCK`.
const ACTION_BLOCK: u8 = 1;
/// `XFRMA_TMPL`: the transforms a policy applies (ESP, AH): present on
/// the policies that encrypt; absent on pass-through ones.
const XFRMA_TMPL: u16 = 5;
/// `XFRMA_MARK` (`struct xfrm_mark`: value, then mask) and `XFRMA_IF_ID`:
/// a policy that only takes what carries the mark, or what is routed into
/// its XFRM interface.
const XFRMA_MARK: u16 = 21;
const XFRMA_IF_ID: u16 = 31;
const NLMSG_HEADER: usize = 16;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

/// Set once the kernel said it has no XFRM netlink: not asked again,
/// since each try may have the kernel look for the module.
static UNAVAILABLE: AtomicBool = AtomicBool::new(false);
/// Set once lbd was told it may not ask (said once, asked again).
static REFUSED: AtomicBool = AtomicBool::new(false);

/// The destination prefixes of the outbound policies that encrypt or
/// block, as the kernel holds them now; `None` where the kernel has no
/// XFRM netlink or lbd may not ask it (`lbd --check` as a user): nothing
/// to keep, and no IPsec for lb's nftables table to let by. An error is
/// an error: an empty answer would hand the head office's traffic to the
/// fast path for a round.
pub fn kept_destinations() -> Result<Option<Vec<(IpAddr, u8)>>> {
    if UNAVAILABLE.load(Ordering::Relaxed) {
        return Ok(None);
    }
    let errno = |e: &anyhow::Error| {
        e.chain()
            .find_map(|c| c.downcast_ref::<std::io::Error>())
            .and_then(std::io::Error::raw_os_error)
    };
    // No XFRM netlink: no IPsec to keep, now or later. Not allowed to ask
    // (`lbd --check` as a user): said once, nothing kept this time.
    let cannot = |e: &anyhow::Error| match errno(e) {
        Some(libc::EPROTONOSUPPORT) => {
            UNAVAILABLE.store(true, Ordering::Relaxed);
            true
        }
        Some(libc::EPERM | libc::EACCES) => {
            if !REFUSED.swap(true, Ordering::Relaxed) {
                log::warn!(
                    "the kernel's IPsec policies could not be read ({e:#}): what they encrypt \
                     is not kept from the fast path until they can (lbd needs CAP_NET_ADMIN)"
                );
            }
            true
        }
        _ => false,
    };
    let socket = match nlmsg::open(NETLINK_XFRM) {
        Ok(socket) => socket,
        Err(e) if cannot(&e) => return Ok(None),
        Err(e) => return Err(e.context("opening an XFRM netlink socket")),
    };
    let mut request = Vec::with_capacity(NLMSG_HEADER);
    request.extend_from_slice(&(NLMSG_HEADER as u32).to_ne_bytes());
    request.extend_from_slice(&XFRM_MSG_GETPOLICY.to_ne_bytes());
    request.extend_from_slice(&(nlmsg::NLM_F_REQUEST | nlmsg::NLM_F_DUMP).to_ne_bytes());
    request.extend_from_slice(&1u32.to_ne_bytes());
    request.extend_from_slice(&0u32.to_ne_bytes());
    let messages = match nlmsg::dump(&socket, &request) {
        Ok(messages) => messages,
        Err(e) if cannot(&e) => return Ok(None),
        Err(e) => return Err(e.context("dumping the IPsec policies")),
    };
    Ok(Some(
        messages
            .iter()
            .filter_map(|m| kept_destination(m))
            .collect(),
    ))
}

/// The destination prefix of one policy message, if it is an outbound
/// policy that encrypts or blocks; `None` for any other, and for what
/// cannot be read as one.
fn kept_destination(msg: &[u8]) -> Option<(IpAddr, u8)> {
    let kind = u16::from_ne_bytes(msg.get(4..6)?.try_into().ok()?);
    if kind != XFRM_MSG_NEWPOLICY {
        return None;
    }
    let info = msg.get(NLMSG_HEADER..NLMSG_HEADER + POLICY_INFO_LEN)?;
    if info[DIR] != POLICY_OUT {
        return None;
    }
    let attrs = nlmsg::attributes(msg.get(NLMSG_HEADER + POLICY_INFO_LEN..)?).ok()?;
    // A route-based tunnel's policy (an XFRM interface's `if_id`, a VTI's
    // mark) takes only what is routed into its device, whose routes the
    // kernel keeps already; its selector is often everything (0.0.0.0/0).
    let route_based = attrs.iter().any(|(kind, value)| {
        *kind == XFRMA_IF_ID
            || (*kind == XFRMA_MARK && value.get(4..8).is_some_and(|m| m != [0; 4]))
    });
    if route_based {
        return None;
    }
    let encrypts = attrs.iter().any(|(kind, _)| *kind == XFRMA_TMPL);
    if !encrypts && info[ACTION] != ACTION_BLOCK {
        return None;
    }
    let family = u16::from_ne_bytes([info[SEL_FAMILY], info[SEL_FAMILY + 1]]);
    let len = info[SEL_PREFIXLEN_D];
    let addr = match family {
        AF_INET if len <= 32 => IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(&info[..4]).ok()?)),
        AF_INET6 if len <= 128 => {
            IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&info[..16]).ok()?))
        }
        _ => return None,
    };
    Some((addr, len))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A policy message as the kernel sends it: selector destination
    /// `dst`/`len` of `family`, direction `dir`, action `action`, with a
    /// template or not.
    fn policy(dst: &[u8], len: u8, family: u16, dir: u8, action: u8, tmpl: bool) -> Vec<u8> {
        let mut info = vec![0u8; POLICY_INFO_LEN];
        info[..dst.len()].copy_from_slice(dst);
        info[SEL_FAMILY..SEL_FAMILY + 2].copy_from_slice(&family.to_ne_bytes());
        info[SEL_PREFIXLEN_D] = len;
        info[DIR] = dir;
        info[ACTION] = action;
        if tmpl {
            info.extend_from_slice(&nlmsg::attribute(XFRMA_TMPL, &[0; 64]));
        }
        let mut msg = Vec::new();
        msg.extend_from_slice(&((NLMSG_HEADER + info.len()) as u32).to_ne_bytes());
        msg.extend_from_slice(&XFRM_MSG_NEWPOLICY.to_ne_bytes());
        msg.extend_from_slice(&[0; 10]);
        msg.extend_from_slice(&info);
        msg
    }

    /// `msg` with its netlink length set to what it holds.
    fn fixed_len(mut msg: Vec<u8>) -> Vec<u8> {
        let len = msg.len() as u32;
        msg[..4].copy_from_slice(&len.to_ne_bytes());
        msg
    }

    #[test]
    fn outbound_policies_that_encrypt_or_block_keep_their_destinations() {
        let branch = policy(&[10, 50, 0, 0], 16, AF_INET, POLICY_OUT, 0, true);
        assert_eq!(
            kept_destination(&branch),
            Some((IpAddr::V4(Ipv4Addr::new(10, 50, 0, 0)), 16))
        );
        let mut v6 = [0u8; 16];
        v6[..4].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8]);
        assert_eq!(
            kept_destination(&policy(&v6, 48, AF_INET6, POLICY_OUT, 0, true)),
            Some((IpAddr::V6(Ipv6Addr::from(v6)), 48))
        );
        let blocked = policy(
            &[10, 60, 0, 0],
            16,
            AF_INET,
            POLICY_OUT,
            ACTION_BLOCK,
            false,
        );
        assert!(kept_destination(&blocked).is_some());
        // Inbound and forward policies, pass-through ones, and what
        // cannot be read are not the fast path's business.
        assert_eq!(
            kept_destination(&policy(&[10, 50, 0, 0], 16, AF_INET, 0, 0, true)),
            None
        );
        assert_eq!(
            kept_destination(&policy(&[10, 50, 0, 0], 16, AF_INET, 2, 0, true)),
            None
        );
        assert_eq!(
            kept_destination(&policy(&[10, 10, 0, 0], 24, AF_INET, POLICY_OUT, 0, false)),
            None
        );
        assert_eq!(
            kept_destination(&policy(&[10, 50, 0, 0], 40, AF_INET, POLICY_OUT, 0, true)),
            None
        );
        assert_eq!(kept_destination(&branch[..100]), None);
        // Route-based tunnels' policies: by XFRM interface, or by mark.
        let mut if_id = policy(&[0; 4], 0, AF_INET, POLICY_OUT, 0, true);
        if_id.extend_from_slice(&nlmsg::attribute(XFRMA_IF_ID, &7u32.to_ne_bytes()));
        assert_eq!(kept_destination(&fixed_len(if_id)), None);
        let mut marked = policy(&[0; 4], 0, AF_INET, POLICY_OUT, 0, true);
        marked.extend_from_slice(&nlmsg::attribute(
            XFRMA_MARK,
            &[1, 0, 0, 0, 0xff, 0xff, 0xff, 0xff],
        ));
        assert_eq!(kept_destination(&fixed_len(marked)), None);
        // A mark attribute with no mask marks nothing.
        let mut unmarked = policy(&[10, 50, 0, 0], 16, AF_INET, POLICY_OUT, 0, true);
        unmarked.extend_from_slice(&nlmsg::attribute(XFRMA_MARK, &[0; 8]));
        assert!(kept_destination(&fixed_len(unmarked)).is_some());
    }
}
