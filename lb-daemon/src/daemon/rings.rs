//! The ring watch's tick: every few milliseconds, what `XDP_REDIRECT` lost
//! to each device's full ring, read from the data plane and handed to
//! `egress` (its `overflow` hysteresis), which moves a device whose ring
//! overflows to its queue and back. Like a health verdict, it changes the
//! view and writes the data plane's part at once (the `EGRESS` entry), by
//! the same owner that rounds write it with, so that a round keeps it.

use std::time::Instant;

use anyhow::Result;

use super::Daemon;

impl Daemon {
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
