//! The ring watch's tick: what `XDP_REDIRECT` lost at each device, read
//! from the data plane and handed to `egress` (its `overflow`
//! hysteresis), which moves a device whose ring overflows to its queue and
//! back. Frames lost at a device without carrier (a LAN port whose client
//! went away) are no full ring: said, and its path left alone. It runs
//! when the watch wakes lbd (a ring just overflowed: a wake-up on
//! `RING_EVENTS`) and every 100 ms (holds end; a wake-up lost to a full
//! buffer is caught). Like a health verdict, it changes the view
//! and writes the data plane's part at once (the `EGRESS` entry), by the
//! same owner that rounds write it with, so that a round keeps it.

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::Instant,
};

use anyhow::Result;
use aya::maps::{MapData, RingBuf};
use tokio::io::{unix::AsyncFd, Interest};

use super::Daemon;

/// The ring watch's wake-ups, as lbd waits for them.
pub struct RingEvents(Option<AsyncFd<RingBuf<MapData>>>);

impl RingEvents {
    /// Until the ring watch says a ring overflowed (never, without one).
    pub async fn next(&mut self) {
        let Some(fd) = self.0.as_mut() else {
            return std::future::pending().await;
        };
        match fd.readable_mut().await {
            Ok(mut ready) => {
                while ready.get_inner_mut().next().is_some() {}
                ready.clear_ready();
            }
            Err(e) => {
                log::warn!(
                    "the ring watch's wake-ups failed ({e}): lbd looks every 100 ms instead"
                );
                self.0 = None;
            }
        }
    }
}

impl Daemon {
    /// The ring watch's wake-ups, for the one loop that waits for them.
    pub fn ring_events(&mut self) -> RingEvents {
        let events = self.dataplane.take_ring_events().and_then(|events| {
            // SAFETY: the ring buffer owns its map's descriptor, open and
            // the same for as long as it lives, and it lives in the AsyncFd.
            unsafe { AsyncFd::register_with_interest(events, Interest::READABLE) }
                .map_err(|e| {
                    log::warn!(
                        "waiting for the ring watch's wake-ups ({}): lbd looks every 100 ms instead",
                        e.into_parts().1
                    )
                })
                .ok()
        });
        RingEvents(events)
    }

    pub fn ring_tick(&mut self) -> Result<()> {
        if self.dataplane.ring_watch() != Ok(true) {
            return Ok(());
        }
        if let Some(devices) = self.egress.rings_to_watch() {
            if let Err(e) = self.dataplane.watch_rings(&devices) {
                self.egress.rewatch();
                return Err(e);
            }
        }
        let now = Instant::now();
        for ifindex in self.egress.ring_devices() {
            let Some(count) = self.dataplane.ring_drops(ifindex)? else {
                // Lost (a data plane replaced under lbd): made again.
                self.egress.rewatch();
                continue;
            };
            // A device without carrier (a LAN port whose client went
            // away) loses whatever is sent to it: no full ring, and its
            // queue would not help. Asked only when frames were lost.
            if self.egress.ring_rose(ifindex, count) && !carries(ifindex) {
                let name = self
                    .egress
                    .ring_device_name(ifindex)
                    .map_or_else(|| format!("interface {ifindex}"), str::to_owned);
                if let Some(lost) = self.egress.ring_lost_while_down(ifindex, count, now) {
                    log::info!(
                        "{name}: XDP_REDIRECT lost {lost} frames to it while it had no carrier \
                         (not a full ring: its path stays)"
                    );
                }
                continue;
            }
            if let Some((ifindex, out)) = self.egress.ring_reading(ifindex, count, now) {
                if let Err(e) = self.dataplane.set_egress(ifindex, out) {
                    // Mend from what the map really holds, as a round does.
                    self.egress
                        .seed(self.dataplane.egress_entries().unwrap_or_default());
                    return Err(e);
                }
            }
        }
        Ok(())
    }
}

/// Whether device `ifindex` has carrier; a device lbd cannot ask about
/// is taken to have it (its lost frames then count as a full ring's, as
/// before lbd asked), said once. Blocking, one netlink request: asked
/// only of a device whose count rose, at most once a tick each.
fn carries(ifindex: u32) -> bool {
    static SAID: AtomicBool = AtomicBool::new(false);
    tokio::task::block_in_place(|| crate::observe::netlink::carries(ifindex)).unwrap_or_else(|e| {
        if !SAID.swap(true, Ordering::Relaxed) {
            log::warn!("{e:#}: frames lost at a device are taken for a full ring's");
        }
        true
    })
}
