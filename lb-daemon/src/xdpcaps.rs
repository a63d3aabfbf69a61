//! What the kernel says each device can do with XDP: the `netdev` generic
//! netlink family's `xdp-features` (Linux 6.3 and later). lbd redirects
//! into its uplinks and LAN ports; a device that cannot take redirected
//! frames (`NDO_XMIT`) would drop every one of them without a word, so lbd
//! refuses it, by name, and says what to do.
//!
//! Owns a blocking generic netlink socket for two requests: the family's
//! id, then one device's features. The message layout (netlink header,
//! generic header, attributes) is built and parsed here, by functions that
//! are tested without a kernel. Never changes anything.

use anyhow::{bail, Context, Result};
use netlink_sys::{protocols::NETLINK_GENERIC, Socket, SocketAddr};

/// `NETDEV_XDP_ACT_NDO_XMIT`: the device takes frames redirected to it.
pub const NDO_XMIT: u64 = 1 << 2;

const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
const NETDEV_CMD_DEV_GET: u8 = 1;
const NETDEV_A_DEV_IFINDEX: u16 = 1;
const NETDEV_A_DEV_XDP_FEATURES: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLMSG_ERROR: u16 = 0x2;
const NLMSG_HEADER: usize = 16;
const GENL_HEADER: usize = 4;

/// A netlink message with a generic netlink header and `attrs`.
fn request(family: u16, cmd: u8, seq: u32, attrs: &[(u16, &[u8])]) -> Vec<u8> {
    let mut body = vec![cmd, 1, 0, 0];
    for (kind, value) in attrs {
        let len = 4 + value.len();
        body.extend_from_slice(&(len as u16).to_ne_bytes());
        body.extend_from_slice(&kind.to_ne_bytes());
        body.extend_from_slice(value);
        body.resize(body.len().next_multiple_of(4), 0);
    }
    let mut msg = Vec::with_capacity(NLMSG_HEADER + body.len());
    msg.extend_from_slice(&((NLMSG_HEADER + body.len()) as u32).to_ne_bytes());
    msg.extend_from_slice(&family.to_ne_bytes());
    msg.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    msg.extend_from_slice(&seq.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend_from_slice(&body);
    msg
}

/// The attributes of the first message in `reply`, or the kernel's error.
fn attributes(reply: &[u8]) -> Result<Vec<(u16, &[u8])>> {
    let header = reply.get(..NLMSG_HEADER).context("a short netlink reply")?;
    let len = u32::from_ne_bytes(header[0..4].try_into()?) as usize;
    let kind = u16::from_ne_bytes(header[4..6].try_into()?);
    let msg = reply.get(..len).context("a truncated netlink reply")?;
    if kind == NLMSG_ERROR {
        let errno = i32::from_ne_bytes(
            msg.get(NLMSG_HEADER..NLMSG_HEADER + 4)
                .context("a short netlink error")?
                .try_into()?,
        );
        bail!("{}", std::io::Error::from_raw_os_error(-errno));
    }
    let mut rest = msg.get(NLMSG_HEADER + GENL_HEADER..).unwrap_or_default();
    let mut out = Vec::new();
    while rest.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([rest[0], rest[1]]));
        let kind = u16::from_ne_bytes([rest[2], rest[3]]) & 0x3fff;
        let value = rest.get(4..len).context("a truncated netlink attribute")?;
        out.push((kind, value));
        rest = rest.get(len.next_multiple_of(4)..).unwrap_or_default();
    }
    Ok(out)
}

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
        let mut socket =
            Socket::new(NETLINK_GENERIC).context("opening a generic netlink socket")?;
        socket
            .bind_auto()
            .context("binding a generic netlink socket")?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .context("connecting a generic netlink socket")?;
        let mut caps = XdpCaps {
            socket,
            family: GENL_ID_CTRL,
            seq: 0,
        };
        let reply = match caps.ask(CTRL_CMD_GETFAMILY, &[(CTRL_ATTR_FAMILY_NAME, b"netdev\0")]) {
            Ok(reply) => reply,
            Err(_) => return Ok(None),
        };
        let attrs = attributes(&reply)?;
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
        let msg = request(self.family, cmd, self.seq, attrs);
        self.socket
            .send(&msg, 0)
            .context("sending a netlink request")?;
        let (reply, _) = self
            .socket
            .recv_from_full()
            .context("reading a netlink reply")?;
        attributes(&reply)?;
        Ok(reply)
    }

    /// The XDP features of interface `ifindex`.
    pub fn features(&mut self, ifindex: u32) -> Result<u64> {
        let reply = self.ask(
            NETDEV_CMD_DEV_GET,
            &[(NETDEV_A_DEV_IFINDEX, &ifindex.to_ne_bytes())],
        )?;
        let attrs = attributes(&reply)?;
        let value = attrs
            .iter()
            .find(|(k, _)| *k == NETDEV_A_DEV_XDP_FEATURES)
            .map(|(_, v)| *v)
            .context("no xdp-features in the kernel's answer")?;
        let bytes: [u8; 8] = value.get(..8).context("a short xdp-features")?.try_into()?;
        Ok(u64::from_ne_bytes(bytes))
    }
}

/// Why frames redirected into `ifname` (of kind `kind`) would be lost, and
/// what to do; `None` when `features` say it takes them.
pub fn refusal(ifname: &str, kind: Option<&str>, features: u64) -> Option<String> {
    if features & NDO_XMIT != 0 {
        return None;
    }
    let what = match kind {
        Some("veth") => format!(
            "switch GRO on at its peer (`ethtool -K <peer of {ifname}> gro on`), or attach an XDP program there"
        ),
        Some("bridge") => "give lbd the bridge's ports instead".to_string(),
        _ => "its driver has no XDP redirect target (ndo_xdp_xmit); use a NIC whose driver has".to_string(),
    };
    Some(format!(
        "{ifname} cannot take frames redirected by XDP (the kernel's xdp-features lack ndo-xmit): every packet lb sent there would be lost; {what}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_is_a_netlink_message_with_padded_attributes() {
        let msg = request(
            0x1a,
            NETDEV_CMD_DEV_GET,
            7,
            &[(NETDEV_A_DEV_IFINDEX, &[1, 2, 3])],
        );
        assert_eq!(msg.len(), 16 + 4 + 8);
        assert_eq!(u32::from_ne_bytes(msg[0..4].try_into().expect("4")), 28);
        assert_eq!(u16::from_ne_bytes([msg[4], msg[5]]), 0x1a);
        assert_eq!(msg[16], NETDEV_CMD_DEV_GET);
        assert_eq!(
            u16::from_ne_bytes([msg[20], msg[21]]),
            7,
            "attribute length"
        );
        assert_eq!(&msg[24..28], &[1, 2, 3, 0], "padded");
    }

    #[test]
    fn replies_are_parsed_and_errors_said() {
        // A reply: header, generic header, one u64 attribute.
        let features = (NDO_XMIT | 1).to_ne_bytes();
        let reply = request(
            0x1a,
            NETDEV_CMD_DEV_GET,
            1,
            &[(NETDEV_A_DEV_XDP_FEATURES, &features)],
        );
        let attrs = attributes(&reply).expect("parses");
        assert_eq!(attrs, [(NETDEV_A_DEV_XDP_FEATURES, &features[..])]);
        // An error message: ENODEV.
        let mut error = request(NLMSG_ERROR, 0, 1, &[]);
        error.truncate(16);
        error.extend_from_slice(&(-libc::ENODEV).to_ne_bytes());
        let len = error.len() as u32;
        error[0..4].copy_from_slice(&len.to_ne_bytes());
        assert!(attributes(&error).is_err());
        assert!(attributes(&[1, 2, 3]).is_err(), "short");
    }

    #[test]
    fn a_device_without_ndo_xmit_is_refused_with_what_to_do() {
        assert_eq!(refusal("wan1", Some("veth"), NDO_XMIT | 3), None);
        let veth = refusal("wan1", Some("veth"), 3).expect("refused");
        assert!(veth.contains("wan1") && veth.contains("gro on"), "{veth}");
        let nic = refusal("eth1", None, 0).expect("refused");
        assert!(
            nic.contains("eth1") && nic.contains("ndo_xdp_xmit"),
            "{nic}"
        );
    }
}
