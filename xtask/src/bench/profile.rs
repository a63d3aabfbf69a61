//! Where the router's time per frame goes: one more window of lb and of
//! the bare redirect, each under a timer-sampled profile of the CPU that
//! generator and router share (`perf record -e cpu-clock`: it needs no
//! PMU counters, which the VMs this runs on often lack).
//!
//! It owns the profiler's process and file, and the grouping of kernel
//! symbols into what lb adds (its flow lookup, its ring watch, its own
//! program); it never judges a speed. A symbol's time per frame is its
//! share of the CPU's samples times the CPU's time per frame (1 / rate:
//! generator and router keep that CPU busy), so the figures of the two
//! ways compare as the forwarding table's router times do.

use std::{
    collections::BTreeMap,
    os::unix::process::ExitStatusExt,
    path::Path,
    process::{Child, Command, Stdio},
    sync::atomic::AtomicBool,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};

use super::forward::{Rig, Way};

/// Samples a second: enough for a few thousand samples a window.
const FREQUENCY: &str = "2000";
/// How long the profiler may take to write its file once told to stop.
const STOP_LIMIT: Duration = Duration::from_secs(30);
/// Symbols below this share of the samples are left out of the report.
pub const PERCENT_LIMIT: &str = "0.05";

/// What lb adds to a bare redirect, by the kernel symbols it is spent in.
/// BPF programs appear as `bpf_prog_<tag>_<name>`, written `bpf:<name>`.
pub const GROUPS: &[(&str, &[&str])] = &[
    (
        "hash-table walks of lb's lookups (the flow table's grows with the flows)",
        &[
            "lookup_nulls_elem_raw",
            "__htab_map_lookup_elem",
            "htab_map_hash",
        ],
    ),
    (
        "the ring watch (tracepoint dispatch, its program)",
        &[
            "bpf_trace_run5",
            "__bpf_trace_xdp_devmap_xmit",
            "bpf:ring_watch",
        ],
    ),
    ("lb's program `lan_ingress`", &["bpf:lan_ingress"]),
    ("the bare redirect's program", &["bpf:bench_redirect"]),
];

/// One way's profile.
pub struct Profile {
    pub way: Way,
    /// The window's rate, frames a second.
    pub pps: f64,
    /// ns per frame by symbol.
    pub symbols: BTreeMap<String, f64>,
}

impl Profile {
    /// ns per frame in `symbols`.
    pub fn sum(&self, symbols: &[&str]) -> f64 {
        // From +0: an empty float sum is -0, which prints as "-0".
        symbols
            .iter()
            .filter_map(|s| self.symbols.get(*s))
            .fold(0.0, |sum, ns| sum + ns)
    }
}

/// A window of `way` on `rig`, `length` long, profiled on `cpu`.
pub fn record(
    rig: &mut Rig,
    way: Way,
    cpu: usize,
    length: Duration,
    interrupted: &AtomicBool,
) -> Result<Profile> {
    let file = std::env::temp_dir().join(format!("lb-bench-{}-{cpu}.perf", std::process::id()));
    let profiled = rig.with_way(way, |rig| {
        let perf = Perf::start(cpu, &file)?;
        let window = rig.traffic(length, interrupted);
        let stopped = perf.stop();
        let window = window?;
        stopped?;
        Ok(window)
    });
    let symbols = profiled.and_then(|window| {
        let shares = shares(&file)?;
        ensure!(window.pps > 0.0, "no frame got through while profiling");
        let per_frame = 1e9 / window.pps;
        Ok((
            window.pps,
            shares
                .into_iter()
                .map(|(symbol, pct)| (symbol, pct / 100.0 * per_frame))
                .collect(),
        ))
    });
    let _ = std::fs::remove_file(&file);
    let (pps, symbols) = symbols.with_context(|| format!("profiling {}", way.label()))?;
    Ok(Profile { way, pps, symbols })
}

/// `perf record`, sampling one CPU, itself kept off that CPU.
struct Perf {
    child: Child,
}

impl Perf {
    fn start(cpu: usize, file: &Path) -> Result<Perf> {
        let elsewhere = if cpu == 0 { 1 } else { 0 };
        let child = Command::new("taskset")
            .args(["-c", &elsewhere.to_string(), "perf", "record", "-q"])
            .args(["-e", "cpu-clock", "-F", FREQUENCY, "-C", &cpu.to_string()])
            .arg("-o")
            .arg(file)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("running perf record (cargo xtask setup installs linux-perf)")?;
        Ok(Perf { child })
    }

    /// SIGINT, as at a terminal: perf writes its file and exits.
    fn stop(mut self) -> Result<()> {
        let pid = libc::pid_t::try_from(self.child.id()).context("perf's process id")?;
        // SAFETY: a signal to our own child, which has not been reaped.
        if unsafe { libc::kill(pid, libc::SIGINT) } != 0 {
            return Err(std::io::Error::last_os_error()).context("stopping perf record");
        }
        let deadline = Instant::now() + STOP_LIMIT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                // After writing its file perf raises the signal again, to
                // end as a stopped program does.
                if status.success() || status.signal() == Some(libc::SIGINT) {
                    return Ok(());
                }
                let mut err = String::new();
                if let Some(mut e) = self.child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                bail!("perf record failed ({status}): {}", err.trim());
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!("perf record did not stop within {STOP_LIMIT:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Perf {
    fn drop(&mut self) {
        // Only after a failed stop: a profiler left running would sample
        // the rest of the benchmark.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Each symbol's share of the samples in `file`, in percent.
fn shares(file: &Path) -> Result<Vec<(String, f64)>> {
    let out = Command::new("perf")
        .args(["report", "--stdio", "--no-children", "--sort", "sym", "-q"])
        .args(["--percent-limit", PERCENT_LIMIT, "-i"])
        .arg(file)
        .output()
        .context("running perf report")?;
    ensure!(
        out.status.success(),
        "perf report: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let shares: Vec<_> = text.lines().filter_map(parse_line).collect();
    ensure!(!shares.is_empty(), "perf report listed no symbol");
    Ok(shares)
}

/// `    12.34%  [k] lookup_nulls_elem_raw` as (`lookup_nulls_elem_raw`,
/// 12.34); a BPF program's `bpf_prog_<tag>_<name>` as `bpf:<name>`.
fn parse_line(line: &str) -> Option<(String, f64)> {
    let mut words = line.split_whitespace();
    let pct = words.next()?.strip_suffix('%')?.parse().ok()?;
    let _space = words.next()?;
    let symbol = words.collect::<Vec<_>>().join(" ");
    if symbol.is_empty() {
        return None;
    }
    let symbol = match symbol
        .strip_prefix("bpf_prog_")
        .and_then(|s| s.split_once('_'))
    {
        Some((_tag, name)) => format!("bpf:{name}"),
        None => symbol,
    };
    Some((symbol, pct))
}

#[cfg(test)]
mod tests {
    use super::parse_line;

    #[test]
    fn a_report_line_reads_as_its_symbol_and_share() {
        assert_eq!(
            parse_line("    12.34%  [k] lookup_nulls_elem_raw"),
            Some(("lookup_nulls_elem_raw".to_string(), 12.34))
        );
        assert_eq!(
            parse_line("     0.50%  [k] bpf_prog_9c249f6e1ab5a26b_lan_ingress"),
            Some(("bpf:lan_ingress".to_string(), 0.5))
        );
        assert_eq!(
            parse_line("     1.00%  [.] 0x00007f00"),
            Some(("0x00007f00".to_string(), 1.0))
        );
        assert_eq!(parse_line("# Samples: 8K of event 'cpu-clock'"), None);
        assert_eq!(parse_line(""), None);
    }
}
