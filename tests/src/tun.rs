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
const IFF_VNET_HDR: libc::c_short = 0x4000;
/// `TUNSETOFFLOAD`: `_IOW('T', 208, unsigned int)`.
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
/// The offloads a `TUNSETOFFLOAD` grants: partial checksums, TCP
/// segmentation over IPv4 and IPv6.
const TUN_F_CSUM: libc::c_ulong = 0x01;
const TUN_F_TSO4: libc::c_ulong = 0x02;
const TUN_F_TSO6: libc::c_ulong = 0x04;
/// Bytes of the `virtio_net_hdr` in front of each packet on a device opened
/// with offloads (the kernel's default header size).
pub const VNET_HDR_LEN: usize = 10;

/// What the device carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Bare IP packets, no link-layer header (`ARPHRD_NONE`).
    Tun,
    /// Ethernet frames.
    Tap,
}

/// How a device's file behaves.
#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    /// Reads and writes that would wait fail with `WouldBlock` instead.
    pub nonblocking: bool,
    /// Each packet crosses the file behind a `virtio_net_hdr`
    /// ([`VNET_HDR_LEN`] bytes), and may be a large TCP segment with a
    /// partial checksum (the transport checksum field holds the
    /// pseudo-header's sum; whoever sends it on finishes it), both ways:
    /// what a driver that merges segments (GRO, as kernel WireGuard does)
    /// hands the kernel.
    pub offloads: bool,
}

/// A new device `ifname` of `kind`, without packet information, in the
/// calling thread's namespace.
pub fn open(ifname: &str, kind: Kind, options: Options) -> Result<File> {
    ensure!(
        !ifname.is_empty() && ifname.len() < libc::IFNAMSIZ,
        "tun device name {ifname:?}: 1 to 15 bytes"
    );
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(if options.nonblocking {
            libc::O_NONBLOCK
        } else {
            0
        })
        .open("/dev/net/tun")
        .context("opening /dev/net/tun (is the tun module there?)")?;
    let flags = match kind {
        Kind::Tun => IFF_TUN,
        Kind::Tap => IFF_TAP,
    } | IFF_NO_PI
        | if options.offloads { IFF_VNET_HDR } else { 0 };
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
    if options.offloads {
        let offloads = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6;
        // SAFETY: TUNSETOFFLOAD takes its argument by value; the descriptor
        // is the device's.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETOFFLOAD, offloads) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("granting {ifname} its offloads (TUNSETOFFLOAD)"));
        }
    }
    Ok(file)
}
