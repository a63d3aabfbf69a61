//! A million-prefix file (`[[rule]] dst_file`) loaded and reloaded the way
//! lbd does it: the configuration read and checked (the file parsed), then
//! the rules and the prefix trie converged (`reconcile::policies`), into a
//! data plane of its own; and what the trie costs the kernel per prefix.

use std::{io::Write, time::Instant};

use anyhow::{Context, Result};
use lb_daemon::{config, dataplane::Dataplane, reconcile::policies::Policies};

use super::cost::{million_prefixes, SET_PREFIXES};

/// What loading and reloading the file took.
pub struct PrefixLoad {
    pub prefixes: usize,
    /// Reading and checking the configuration with the file, ms.
    pub parse_ms: u128,
    /// Converging the data plane to it from nothing, ms.
    pub load_ms: u128,
    /// The same for a file of as many other prefixes, replacing it.
    pub reload_parse_ms: u128,
    pub reload_ms: u128,
    /// Unreclaimable kernel memory the loaded trie took, per prefix
    /// (`SUnreclaim` in /proc/meminfo before and after the first load).
    pub bytes_per_prefix: u64,
}

const CONFIG: &str = r#"
[[lan]]
interface = "lo"
[[uplink]]
name = "isp1"
interface = "bench-nowhere"
[[policy]]
name = "partner"
uplinks = ["isp1"]
[[rule]]
dst_file = "prefixes.txt"
policy = "partner"
"#;

pub fn measure() -> Result<PrefixLoad> {
    let dir = std::env::temp_dir().join(format!("lb-bench-prefixes-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let result = measure_in(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn measure_in(dir: &std::path::Path) -> Result<PrefixLoad> {
    let config_path = dir.join("lbd.toml");
    std::fs::write(&config_path, CONFIG).context("writing the bench configuration")?;
    let prefixes = dir.join("prefixes.txt");
    let set = million_prefixes();
    write_file(&prefixes, set.iter().copied())?;

    let mut dp = Dataplane::load(1024).context("loading a data plane")?;
    let mut policies = Policies::default();
    let slab_before = unreclaimable()?;
    let started = Instant::now();
    let first = config::load(&config_path).context("reading the bench configuration")?;
    let parse_ms = started.elapsed().as_millis();
    let started = Instant::now();
    policies.converge(&first, &mut dp)?;
    let load_ms = started.elapsed().as_millis();
    let slab_after = unreclaimable()?;

    // Another million: every address moved by one /24.
    write_file(
        &prefixes,
        set.iter().map(|&(a, l)| {
            (
                a.wrapping_add(1 << 8) & (u32::MAX << (32 - u32::from(l))),
                l,
            )
        }),
    )?;
    let started = Instant::now();
    let second = config::load(&config_path).context("reading the bench configuration again")?;
    let reload_parse_ms = started.elapsed().as_millis();
    let started = Instant::now();
    policies.converge(&second, &mut dp)?;
    let reload_ms = started.elapsed().as_millis();

    let load = PrefixLoad {
        prefixes: SET_PREFIXES,
        parse_ms,
        load_ms,
        reload_parse_ms,
        reload_ms,
        bytes_per_prefix: slab_after.saturating_sub(slab_before) / SET_PREFIXES as u64,
    };
    println!(
        "  {} prefixes: read in {} ms, loaded in {} ms; another file read in {} ms, reloaded in {} ms; {} bytes per prefix",
        load.prefixes, load.parse_ms, load.load_ms, load.reload_parse_ms, load.reload_ms, load.bytes_per_prefix
    );
    Ok(load)
}

pub fn write_file(path: &std::path::Path, prefixes: impl Iterator<Item = (u32, u8)>) -> Result<()> {
    let mut out = std::io::BufWriter::new(
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
    );
    for (addr, len) in prefixes {
        writeln!(out, "{}/{len}", std::net::Ipv4Addr::from(addr))?;
    }
    out.flush().context("writing the prefix file")
}

/// `SUnreclaim` of /proc/meminfo, in bytes.
fn unreclaimable() -> Result<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo")?;
    text.lines()
        .find_map(|l| l.strip_prefix("SUnreclaim:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .context("no SUnreclaim in /proc/meminfo")
}
