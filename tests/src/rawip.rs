//! A raw-IP link between two lab namespaces, standing in for an LTE modem
//! in raw-IP mode (a QMI or MBIM `wwan0`): a tun device at each end
//! (`IFF_TUN`, no packet information: bare IP packets, no link-layer
//! header, `ARPHRD_NONE`) and a relay thread between them, as the modem's
//! firmware and the operator's network are between the router and the
//! internet.
//!
//! Both tun devices are opened with offloads (`tun::Options::offloads`):
//! packets cross them as the kernel holds them, large TCP segments with
//! partial checksums included, the way a modem driver or a tunnel that
//! merges segments (GRO; kernel WireGuard does) hands them to the router.
//! The relay copies each packet with its `virtio_net_hdr` unchanged.
//!
//! Owns the two tun devices (they go when it is dropped: they are not
//! persistent) and the relay. Never touches a device it did not create.

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::{lab::Lab, netns::in_netns, tun};

/// `TUNSETCARRIER`: `_IOW('T', 226, int)`.
const TUNSETCARRIER: libc::c_ulong = 0x4004_54e2;
/// How often the relay looks at its stop flag.
const TICK: Duration = Duration::from_millis(100);
/// Largest packet relayed, with its `virtio_net_hdr`: a merged segment
/// is at most an IP packet's 64 KiB.
const MAX_PACKET: usize = 65_536 + tun::VNET_HDR_LEN;

/// One end: a host, the tun device's name there and its address (with
/// its prefix length, `10.77.0.2/30`).
#[derive(Debug, Clone, Copy)]
pub struct End<'a> {
    pub host: &'a str,
    pub ifname: &'a str,
    pub address: &'a str,
}

/// A running raw-IP link. Dropping it stops the relay and removes both
/// devices.
pub struct RawIpLink {
    ends: [Arc<File>; 2],
    /// Whether the modem has its network: without, nothing passes.
    connected: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    relay: Option<JoinHandle<()>>,
}

impl RawIpLink {
    /// Creates the tun device of each end in its host, addresses it, brings
    /// it up, and relays packets between them, with `mtu` on both.
    pub fn start(lab: &Lab, a: End<'_>, b: End<'_>, mtu: u32) -> Result<RawIpLink> {
        let mut ends = Vec::new();
        for end in [a, b] {
            let ns = lab.ns(end.host)?;
            let file = in_netns(ns, || {
                tun::open(
                    end.ifname,
                    tun::Kind::Tun,
                    tun::Options {
                        nonblocking: false,
                        offloads: true,
                    },
                )
            })?;
            let mtu = mtu.to_string();
            for cmd in [
                vec!["ip", "link", "set", "dev", end.ifname, "mtu", &mtu],
                vec!["ip", "addr", "add", end.address, "dev", end.ifname],
                vec!["ip", "link", "set", "dev", end.ifname, "up"],
            ] {
                lab.exec(end.host, &cmd)
                    .with_context(|| format!("setting up {} on {}", end.ifname, end.host))?;
            }
            ends.push(Arc::new(file));
        }
        let [a_file, b_file]: [Arc<File>; 2] = ends
            .try_into()
            .map_err(|_| anyhow::anyhow!("two ends expected"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let connected = Arc::new(AtomicBool::new(true));
        let relay = {
            let (a, b) = (Arc::clone(&a_file), Arc::clone(&b_file));
            let (stop, connected) = (Arc::clone(&stop), Arc::clone(&connected));
            thread::spawn(move || relay(&a, &b, &connected, &stop))
        };
        Ok(RawIpLink {
            ends: [a_file, b_file],
            connected,
            stop,
            relay: Some(relay),
        })
    }

    /// The first end's carrier: down is what a modem that lost its network
    /// shows the router; meanwhile nothing passes either way.
    pub fn set_carrier(&self, up: bool) -> Result<()> {
        self.connected.store(up, Ordering::Relaxed);
        let on: libc::c_int = i32::from(up);
        // SAFETY: TUNSETCARRIER takes a pointer to an int, live for the
        // call; the descriptor is the tun device's.
        let rc = unsafe { libc::ioctl(self.ends[0].as_raw_fd(), TUNSETCARRIER, &on) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("TUNSETCARRIER");
        }
        Ok(())
    }
}

impl Drop for RawIpLink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(relay) = self.relay.take() {
            if relay.join().is_err() {
                eprintln!("warning: the raw-IP relay panicked");
            }
        }
    }
}

/// Copies every packet from each end to the other until `stop`; while not
/// `connected`, reads and drops them.
fn relay(a: &File, b: &File, connected: &AtomicBool, stop: &AtomicBool) {
    let mut buf = vec![0u8; MAX_PACKET];
    let ms = libc::c_int::try_from(TICK.as_millis()).unwrap_or(libc::c_int::MAX);
    while !stop.load(Ordering::Relaxed) {
        let mut fds = [a.as_raw_fd(), b.as_raw_fd()].map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        });
        // SAFETY: `fds` is a valid array of two pollfds for the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) };
        if n <= 0 {
            continue;
        }
        for (from, to) in [(0, b), (1, a)] {
            if fds[from].revents & libc::POLLIN == 0 {
                continue;
            }
            let src = if from == 0 { a } else { b };
            let on = connected.load(Ordering::Relaxed);
            if let Err(e) = pass_one(src, on.then_some(to), &mut buf) {
                eprintln!("raw-IP relay: {e:#}");
            }
        }
    }
}

/// One packet from `from` to `to` (`None`: dropped). A write refused
/// because the other end has no carrier (or is down) loses the packet, as
/// a modem would.
fn pass_one(mut from: &File, to: Option<&File>, buf: &mut [u8]) -> Result<()> {
    let n = match from.read(buf) {
        Ok(n) => n,
        Err(e) if e.kind() == ErrorKind::Interrupted || e.kind() == ErrorKind::WouldBlock => {
            return Ok(())
        }
        Err(e) => bail!("reading: {e}"),
    };
    let Some(mut to) = to else {
        return Ok(());
    };
    match to.write(&buf[..n]) {
        Ok(_) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EIO) => Ok(()),
        Err(e) => bail!("writing {n} bytes: {e}"),
    }
}
