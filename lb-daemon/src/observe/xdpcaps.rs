//! What the kernel says each device can do with XDP: the `netdev` generic
//! netlink family's `xdp-features` (Linux 6.3 and later). lbd redirects
//! into its uplinks and LAN ports; a device that cannot take redirected
//! frames (`NDO_XMIT`: a Wi-Fi radio, a DSA switch port, a veth whose peer
//! has neither GRO nor XDP) would drop every one of them without a word,
//! so lb sends to it by its qdisc instead (`reconcile::egress`), and lbd
//! says so, by name, with the way to the fast path.
//!
//! Owns a blocking generic netlink socket for two requests: the family's
//! id, then one device's features (messages built and read by `nlmsg`).
//! Never changes anything.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use netlink_sys::{protocols::NETLINK_GENERIC, Socket};

use crate::observe::nlmsg::{self, NLM_F_REQUEST};

/// `NETDEV_XDP_ACT_NDO_XMIT`: the device takes frames redirected to it.
pub const NDO_XMIT: u64 = 1 << 2;

const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
const NETDEV_CMD_DEV_GET: u8 = 1;
const NETDEV_A_DEV_IFINDEX: u16 = 1;
const NETDEV_A_DEV_XDP_FEATURES: u16 = 3;
/// The generic netlink header's version field.
const GENL_VERSION: u8 = 1;

/// A blocking line to the `netdev` family.
pub struct XdpCaps {
    socket: Socket,
    family: u16,
    seq: u32,
}

impl XdpCaps {
    /// `None` when the kernel has no `netdev` family (before 6.3): it
    /// cannot say, and nothing is checked.
    pub fn open() -> Result<Option<XdpCaps>> {
        let socket = nlmsg::open(NETLINK_GENERIC).context("the generic netlink family")?;
        let mut caps = XdpCaps {
            socket,
            family: GENL_ID_CTRL,
            seq: 0,
        };
        let reply = match caps.ask(CTRL_CMD_GETFAMILY, &[(CTRL_ATTR_FAMILY_NAME, b"netdev\0")]) {
            Ok(reply) => reply,
            Err(_) => return Ok(None),
        };
        let attrs = nlmsg::reply_attributes(&reply)?;
        let Some(id) = attrs
            .iter()
            .find(|(k, _)| *k == CTRL_ATTR_FAMILY_ID)
            .and_then(|(_, v)| v.get(..2))
        else {
            return Ok(None);
        };
        caps.family = u16::from_ne_bytes([id[0], id[1]]);
        Ok(Some(caps))
    }

    fn ask(&mut self, cmd: u8, attrs: &[(u16, &[u8])]) -> Result<Vec<u8>> {
        self.seq += 1;
        let msg = nlmsg::message(
            self.family,
            NLM_F_REQUEST,
            self.seq,
            [cmd, GENL_VERSION, 0, 0],
            attrs,
        );
        let reply = nlmsg::ask(&self.socket, &msg)?;
        nlmsg::reply_attributes(&reply)?;
        Ok(reply)
    }

    /// The XDP features of interface `ifindex`.
    pub fn features(&mut self, ifindex: u32) -> Result<u64> {
        let reply = self.ask(
            NETDEV_CMD_DEV_GET,
            &[(NETDEV_A_DEV_IFINDEX, &ifindex.to_ne_bytes())],
        )?;
        let attrs = nlmsg::reply_attributes(&reply)?;
        let value = attrs
            .iter()
            .find(|(k, _)| *k == NETDEV_A_DEV_XDP_FEATURES)
            .map(|(_, v)| *v)
            .context("no xdp-features in the kernel's answer")?;
        let bytes: [u8; 8] = value.get(..8).context("a short xdp-features")?.try_into()?;
        Ok(u64::from_ne_bytes(bytes))
    }
}

/// The XDP features of each of `ifindexes` the kernel answers for; `None`
/// when the kernel cannot say (no netdev family: before 6.3). A device
/// gone between the dump and the question is left out.
pub fn features_of(ifindexes: &[u32]) -> Result<Option<BTreeMap<u32, u64>>> {
    let Some(mut caps) = XdpCaps::open()? else {
        return Ok(None);
    };
    Ok(Some(
        ifindexes
            .iter()
            .filter_map(|&i| caps.features(i).ok().map(|f| (i, f)))
            .collect(),
    ))
}

/// What it means that frames redirected into `ifname` (of kind `kind`)
/// would be lost there, and how to give it the fast way; `None` when
/// `features` say it takes them.
pub fn slow_way(ifname: &str, kind: Option<&str>, features: u64) -> Option<String> {
    if features & NDO_XMIT != 0 {
        return None;
    }
    let what = match kind {
        Some("veth") => format!(
            "switch GRO on at its peer (`ethtool -K <peer of {ifname}> gro on`), or attach an XDP program there"
        ),
        Some("bridge") => "give lbd the bridge's ports instead".to_string(),
        _ => "use a NIC whose driver has an XDP redirect target (ndo_xdp_xmit)".to_string(),
    };
    Some(format!(
        "{ifname} takes no frames redirected by XDP (the kernel's xdp-features lack ndo-xmit): lb's packets reach it by its qdisc, through lb's tc program, slower than XDP; for the fast way, {what}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_without_ndo_xmit_is_said_with_the_way_to_the_fast_path() {
        assert_eq!(slow_way("wan1", Some("veth"), NDO_XMIT | 3), None);
        let veth = slow_way("wan1", Some("veth"), 3).expect("said");
        assert!(veth.contains("wan1") && veth.contains("gro on"), "{veth}");
        let nic = slow_way("eth1", None, 0).expect("said");
        assert!(
            nic.contains("eth1") && nic.contains("ndo_xdp_xmit") && nic.contains("by its qdisc"),
            "{nic}"
        );
    }
}
