//! Netlink messages of the shape that generic netlink and nfnetlink share:
//! the netlink header, a 4-byte family header, then attributes (type,
//! length, value, padded to 4 bytes; nested ones hold attributes).
//!
//! Owns building such requests and reading the attributes of a reply (or
//! the kernel's error), as pure functions tested without a kernel, and one
//! blocking request-and-answer on a socket. `xdpcaps` and `conntrack` speak
//! through it; rtnetlink's own crate speaks the rest.

use anyhow::{Context, Result};
use netlink_sys::{Socket, SocketAddr};

pub const NLM_F_REQUEST: u16 = 0x1;
/// Ask for an acknowledgement (an error message with errno 0).
pub const NLM_F_ACK: u16 = 0x4;
/// A dump: every object of the kind, in as many messages as it takes.
pub const NLM_F_DUMP: u16 = 0x300;
pub const NLMSG_ERROR: u16 = 0x2;
const NLMSG_DONE: u16 = 0x3;
const NLMSG_HEADER: usize = 16;
/// The family header after the netlink header (genl's command and version,
/// nfnetlink's family, version and resource id).
const FAMILY_HEADER: usize = 4;
/// Marks an attribute whose value holds attributes.
pub const NLA_F_NESTED: u16 = 0x8000;
/// The type bits of an attribute's type (without the nested and
/// byte-order flags).
const NLA_TYPE_MASK: u16 = 0x3fff;

/// One attribute, padded.
pub fn attribute(kind: u16, value: &[u8]) -> Vec<u8> {
    let len = 4 + value.len();
    let mut out = Vec::with_capacity(len.next_multiple_of(4));
    out.extend_from_slice(&(len as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(value);
    out.resize(len.next_multiple_of(4), 0);
    out
}

/// A netlink message of type `kind` with `flags`, the family header
/// `header` and `attrs`.
pub fn message(
    kind: u16,
    flags: u16,
    seq: u32,
    header: [u8; FAMILY_HEADER],
    attrs: &[(u16, &[u8])],
) -> Vec<u8> {
    let mut body = header.to_vec();
    for (k, value) in attrs {
        body.extend_from_slice(&attribute(*k, value));
    }
    let mut msg = Vec::with_capacity(NLMSG_HEADER + body.len());
    msg.extend_from_slice(&((NLMSG_HEADER + body.len()) as u32).to_ne_bytes());
    msg.extend_from_slice(&kind.to_ne_bytes());
    msg.extend_from_slice(&flags.to_ne_bytes());
    msg.extend_from_slice(&seq.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend_from_slice(&body);
    msg
}

/// The attributes in `run` (a message's, or a nested attribute's value),
/// by type without flags.
pub fn attributes(mut run: &[u8]) -> Result<Vec<(u16, &[u8])>> {
    let mut out = Vec::new();
    while run.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([run[0], run[1]]));
        let kind = u16::from_ne_bytes([run[2], run[3]]) & NLA_TYPE_MASK;
        let value = run.get(4..len).context("a truncated netlink attribute")?;
        out.push((kind, value));
        run = run.get(len.next_multiple_of(4)..).unwrap_or_default();
    }
    Ok(out)
}

/// The attributes of the first message in `reply`, or the kernel's error.
pub fn reply_attributes(reply: &[u8]) -> Result<Vec<(u16, &[u8])>> {
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
        // Errno 0 is an acknowledgement (`NLM_F_ACK`): no attributes.
        if errno == 0 {
            return Ok(Vec::new());
        }
        // The io::Error itself, not its text: callers tell errnos apart
        // (conntrack's ENOENT is "no such connection").
        return Err(std::io::Error::from_raw_os_error(-errno).into());
    }
    attributes(msg.get(NLMSG_HEADER + FAMILY_HEADER..).unwrap_or_default())
}

/// A blocking netlink socket of `protocol`, bound and connected to the
/// kernel.
pub fn open(protocol: isize) -> Result<Socket> {
    let mut socket = Socket::new(protocol).context("opening a netlink socket")?;
    socket.bind_auto().context("binding a netlink socket")?;
    socket
        .connect(&SocketAddr::new(0, 0))
        .context("connecting a netlink socket")?;
    Ok(socket)
}

/// Send `msg` and read the kernel's answer.
pub fn ask(socket: &Socket, msg: &[u8]) -> Result<Vec<u8>> {
    socket.send(msg, 0).context("sending a netlink request")?;
    let (reply, _) = socket.recv_from_full().context("reading a netlink reply")?;
    Ok(reply)
}

/// The messages in one datagram of a reply, each whole (headers too).
pub fn messages(mut datagram: &[u8]) -> Result<Vec<&[u8]>> {
    let mut out = Vec::new();
    while datagram.len() >= NLMSG_HEADER {
        let len = u32::from_ne_bytes(datagram[0..4].try_into()?) as usize;
        if len < NLMSG_HEADER {
            anyhow::bail!("a netlink message of {len} bytes");
        }
        out.push(datagram.get(..len).context("a truncated netlink message")?);
        datagram = datagram.get(len.next_multiple_of(4)..).unwrap_or_default();
    }
    Ok(out)
}

/// A message's type.
fn kind(msg: &[u8]) -> u16 {
    msg.get(4..6)
        .map_or(0, |k| u16::from_ne_bytes([k[0], k[1]]))
}

/// Send the dump request `msg` and read every message of the answer up to
/// the kernel's "done"; the kernel's error if it sends one.
pub fn dump(socket: &Socket, msg: &[u8]) -> Result<Vec<Vec<u8>>> {
    socket
        .send(msg, 0)
        .context("sending a netlink dump request")?;
    let mut out = Vec::new();
    loop {
        let (datagram, _) = socket.recv_from_full().context("reading a netlink dump")?;
        for m in messages(&datagram)? {
            match kind(m) {
                NLMSG_DONE => return Ok(out),
                NLMSG_ERROR => {
                    reply_attributes(m)?;
                }
                _ => out.push(m.to_vec()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_is_a_netlink_message_with_padded_attributes() {
        let msg = message(0x1a, NLM_F_REQUEST, 7, [1, 1, 0, 0], &[(1, &[1, 2, 3])]);
        assert_eq!(msg.len(), 16 + 4 + 8);
        assert_eq!(u32::from_ne_bytes(msg[0..4].try_into().expect("4")), 28);
        assert_eq!(u16::from_ne_bytes([msg[4], msg[5]]), 0x1a);
        assert_eq!(msg[16], 1);
        assert_eq!(
            u16::from_ne_bytes([msg[20], msg[21]]),
            7,
            "attribute length"
        );
        assert_eq!(&msg[24..28], &[1, 2, 3, 0], "padded");
    }

    #[test]
    fn replies_are_parsed_nested_attributes_too_and_errors_said() {
        let inner = attribute(2, &[9, 9]);
        let reply = message(
            0x1a,
            0,
            1,
            [0; 4],
            &[(3, &7u64.to_ne_bytes()), (1 | NLA_F_NESTED, &inner)],
        );
        let attrs = reply_attributes(&reply).expect("parses");
        assert_eq!(attrs[0], (3, &7u64.to_ne_bytes()[..]));
        assert_eq!(attrs[1].0, 1, "the nested flag is not part of the type");
        assert_eq!(
            attributes(attrs[1].1).expect("nested"),
            [(2, &[9u8, 9][..])]
        );
        // An error message: ENODEV.
        let mut error = message(NLMSG_ERROR, 0, 1, [0; 4], &[]);
        error.truncate(16);
        error.extend_from_slice(&(-libc::ENODEV).to_ne_bytes());
        let len = error.len() as u32;
        error[0..4].copy_from_slice(&len.to_ne_bytes());
        let said = reply_attributes(&error).expect_err("an error");
        assert_eq!(
            said.downcast_ref::<std::io::Error>()
                .and_then(std::io::Error::raw_os_error),
            Some(libc::ENODEV),
            "the errno, for callers to tell apart"
        );
        assert!(reply_attributes(&[1, 2, 3]).is_err(), "short");
    }

    #[test]
    fn an_acknowledgement_is_no_error() {
        let ack = message(NLMSG_ERROR, 0, 1, 0i32.to_ne_bytes(), &[]);
        assert_eq!(reply_attributes(&ack).expect("an ack").len(), 0);
        let enoent = message(NLMSG_ERROR, 0, 1, (-libc::ENOENT).to_ne_bytes(), &[]);
        let e = reply_attributes(&enoent).expect_err("an error");
        assert_eq!(
            e.downcast_ref::<std::io::Error>()
                .and_then(|e| e.raw_os_error()),
            Some(libc::ENOENT)
        );
    }

    #[test]
    fn a_dumps_datagram_splits_into_its_messages() {
        let a = message(0x100, 2, 1, [10, 0, 0, 0], &[(1, &[1, 2, 3])]);
        let b = message(0x100, 2, 1, [10, 0, 0, 0], &[(2, &[4; 8])]);
        let done = message(NLMSG_DONE, 2, 1, [0; 4], &[]);
        let datagram = [a.clone(), b.clone(), done].concat();
        let found = messages(&datagram).expect("splits");
        assert_eq!(found, [&a[..], &b[..], &datagram[a.len() + b.len()..]]);
        assert_eq!(kind(found[2]), NLMSG_DONE);
        let mut bad = a.clone();
        bad[0..4].copy_from_slice(&8u32.to_ne_bytes());
        assert!(messages(&bad).is_err(), "a length below the header's");
    }
}
