//! `lbctl flows` on a full table: lbd in the lab with a flow table of
//! [`FLOWS`] entries, filled from here through the pinned map, and the time
//! lbctl takes to answer (spawning lbctl included), bounded by its limit
//! and walking the whole table when the filter matches nothing.

use std::{
    path::Path,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use aya::maps::{HashMap, Map, MapData};
use lb_common::maps::{name, FlowKey, FlowValue};
use lb_daemon::dataplane::pins::Pins;
use lb_tests::{
    daemon::{LabConfig, Lbd},
    Lab, LabDesc,
};

const PREFIX: &str = "lbq-";
/// Flows in the table: a million.
pub const FLOWS: u32 = 1 << 20;

/// One `lbctl flows` command and how long it took (median of the runs).
#[derive(Clone, Debug)]
pub struct Listing {
    pub command: String,
    pub time: Duration,
    /// Flows it printed.
    pub shown: usize,
}

pub fn measure(runs: u32, interrupted: &AtomicBool) -> Result<Vec<Listing>> {
    Lab::down(PREFIX)?;
    let desc = LabDesc::shipped("default").context("loading lab default")?;
    let mut lab = Lab::up(&desc, PREFIX)?;
    let sections = format!("[flows]\nmax = {FLOWS}");
    let config = LabConfig {
        sections: &sections,
        ..LabConfig::default()
    };
    let lbd = Lbd::start(&mut lab, &config.render())?;
    let measured = fill(lbd.bpffs()).and_then(|()| {
        let mut listings = Vec::new();
        for args in [
            vec!["flows"],
            vec!["flows", "--uplink", "isp2", "--limit", "1000"],
            // No such client: the walk goes through the whole table.
            vec!["flows", "--client", "10.99.0.1"],
        ] {
            ensure!(!interrupted.load(Ordering::Relaxed), "interrupted");
            let mut times = Vec::new();
            let mut shown = 0;
            for _ in 0..runs {
                let started = Instant::now();
                let out = lbd.lbctl(&args)?;
                times.push(started.elapsed());
                shown = out.lines().filter(|l| l.contains("10.10.")).count();
            }
            times.sort();
            let listing = Listing {
                command: format!("lbctl {}", args.join(" ")),
                time: times[times.len() / 2],
                shown,
            };
            println!(
                "  {:<45} {:>8.1} ms, {} flows shown",
                listing.command,
                listing.time.as_secs_f64() * 1e3,
                listing.shown
            );
            listings.push(listing);
        }
        Ok(listings)
    });
    let stopped = lbd.stop(&mut lab);
    drop(lab);
    let listings = measured?;
    stopped?;
    Ok(listings)
}

/// Put [`FLOWS`] UDP flows from LAN clients 10.10.x.y into the table, half
/// on each uplink, seen just now.
fn fill(bpffs: &Path) -> Result<()> {
    let path = Pins::new(bpffs).map(name::FLOWS);
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    let mut flows: HashMap<MapData, FlowKey, FlowValue> =
        HashMap::try_from(Map::HashMap(data)).context("FLOWS is not a hash map")?;
    let now = lb_daemon::daemon::clock_ns(libc::CLOCK_MONOTONIC_COARSE);
    let started = Instant::now();
    for i in 0..FLOWS {
        let key = FlowKey {
            src_addr: [10, 10, (i >> 16) as u8 | 0x80, (i >> 8) as u8],
            dst_addr: [198, 51, 100, 10],
            src_port: (1024 + (i & 0xff) as u16).to_be_bytes(),
            dst_port: 53u16.to_be_bytes(),
            proto: 17,
            _pad: [0; 3],
        };
        let value = FlowValue {
            last_seen_ns: now,
            uplink: i % 2,
            nat_port: (20000 + (i % 10000) as u16).to_be_bytes(),
            tcp_state: 0,
            epoch: 0,
        };
        flows
            .insert(key, value, 0)
            .with_context(|| format!("adding flow {i} of {FLOWS}"))?;
    }
    println!(
        "  filled the flow table with {FLOWS} flows in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
