//! Opening tun and tap devices in the calling thread's namespace: the
//! raw-IP link (rawip.rs) and the benchmarks' L3 sink and frame source.
//!
//! Owns the `TUNSETIFF` call and nothing else. A device lives while its
//! file is open (none is made persistent).

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt as _;

use anyhow::{ensure, Context, Result};

/// `TUNSETIFF` from `<linux/if_tun.h>`: `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TUN: libc::c_short = 0x0001;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;

/// What the device carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Bare IP packets, no link-layer header (`ARPHRD_NONE`).
    Tun,
    /// Ethernet frames.
    Tap,
}

/// A new device `ifname` of `kind`, without packet information, in the
/// calling thread's namespace; its file non-blocking if `nonblocking`.
pub fn open(ifname: &str, kind: Kind, nonblocking: bool) -> Result<File> {
    ensure!(
        !ifname.is_empty() && ifname.len() < libc::IFNAMSIZ,
        "tun device name {ifname:?}: 1 to 15 bytes"
    );
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(if nonblocking { libc::O_NONBLOCK } else { 0 })
        .open("/dev/net/tun")
        .context("opening /dev/net/tun (is the tun module there?)")?;
    let flags = match kind {
        Kind::Tun => IFF_TUN,
        Kind::Tap => IFF_TAP,
    } | IFF_NO_PI;
    // struct ifreq: the name, then the flags (a short) in the union.
    let mut req = [0u8; 40];
    req[..ifname.len()].copy_from_slice(ifname.as_bytes());
    req[16..18].copy_from_slice(&flags.to_ne_bytes());
    // SAFETY: `req` is a zeroed ifreq-sized buffer, live for the call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, req.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("creating {kind:?} device {ifname} (TUNSETIFF)"));
    }
    Ok(file)
}
