//! `cargo xtask bench`: what lb costs per packet; how many packets per
//! second a lab router forwards with lb, with the Linux kernel doing the
//! same job (nftables PCC, policy routing, masquerade; for IPv6 ip6tables'
//! SNPT/DNPT beside lb's NPTv6) and with a bare XDP redirect; latency
//! under load with and without a shaper; and how fast lb fails over beside
//! a Netwatch-style script, all in one run; prints the tables and writes
//! BENCHMARKS.md. A benchmark, not a test: it reports what it measures,
//! targets met or not.
//!
//! The benchmark links lb-daemon (lb's data plane and the embedded lb-bench
//! object), whose build script needs the eBPF toolchain that `cargo xtask
//! setup` installs. So the everyday xtask is built without it: this command
//! runs setup, builds lbd and an xtask with the `bench` feature (release),
//! and runs that one, which does the work:
//!
//! - [`object`]: the lb-bench XDP object, the frames it stamps, test runs.
//! - [`cost`]: ns per packet of each path through lb's programs, rules
//!   and prefix sets included.
//! - [`prefixes`]: a million-prefix file loaded and reloaded.
//! - [`forward`]: Mpps through the lab router, four ways for IPv4 and two
//!   for IPv6 (the kernel's and lb's, both translating).
//! - [`l3`]: Mpps and router time through an L3 uplink (a tun device, and
//!   a `wireguard-go` tunnel for WireGuard's own cost), lb's hand-off path
//!   beside the kernel's way.
//! - [`latency`]: a ping's round trip beside saturating uploads, with the
//!   router's shaper and without.
//! - [`scale`]: Mpps through the lab router with its work spread over two
//!   CPUs (multi-queue veth), beside one, for the kernel's way, lb and a
//!   bare redirect.
//! - [`clients`]: 60,000 client addresses opening 200,000 flows through
//!   lbd: new flows per second, the spread against the weights, NAT
//!   failures, every translation checked, and the tables' memory.
//! - [`tcp`]: TCP goodput through the lab router (8 streams up, 8 down,
//!   wire-size frames), the kernel's way, lb and a bare redirect, with
//!   retransmits and every counter that says where frames were lost.
//! - [`failover`]: failover times, lb beside a Netwatch-style script.
//! - [`flows`]: `lbctl flows` on a table of a million flows.
//! - [`picture`]: the failover as an SVG of per-uplink throughput.
//! - [`report`]: the tables, and BENCHMARKS.md.

#[cfg(feature = "bench")]
mod clients;
#[cfg(feature = "bench")]
mod cost;
#[cfg(feature = "bench")]
mod failover;
#[cfg(feature = "bench")]
mod flows;
#[cfg(feature = "bench")]
mod forward;
#[cfg(feature = "bench")]
mod gen;
#[cfg(feature = "bench")]
mod l3;
#[cfg(feature = "bench")]
mod latency;
#[cfg(feature = "bench")]
mod object;
#[cfg(feature = "bench")]
mod picture;
#[cfg(feature = "bench")]
mod prefixes;
#[cfg(feature = "bench")]
mod profile;
#[cfg(feature = "bench")]
mod report;
#[cfg(feature = "bench")]
mod scale;
#[cfg(feature = "bench")]
mod tcp;

use anyhow::Result;

/// What to measure and for how long; the defaults are the published run.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Measured windows per way of forwarding (the median is reported).
    #[arg(long, default_value_t = 5)]
    pub runs: u32,
    /// Length of each window, in seconds.
    #[arg(long, default_value_t = 3)]
    pub seconds: u64,
    /// Distinct UDP flows the generator cycles through (and the per-packet
    /// part's row of flows taken in turn).
    #[arg(long, default_value_t = 4096)]
    pub flows: u32,
    /// Repetitions of each BPF_PROG_TEST_RUN measurement.
    #[arg(long, default_value_t = 1_000_000)]
    pub repeat: u32,
    /// CPU the generator (and with it the router's softirq work) runs on;
    /// the last CPU if not given.
    #[arg(long)]
    pub cpu: Option<usize>,
    /// Failovers per failure and way (the median is reported).
    #[arg(long, default_value_t = 7)]
    pub failover_runs: u32,
    /// Measure only these parts (repeat the flag for more); the results are
    /// printed, and BENCHMARKS.md is left as it is.
    #[arg(long, value_enum)]
    pub only: Vec<Part>,
}

/// The benchmark's parts, in the order they run.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// Per-packet cost with BPF_PROG_TEST_RUN.
    Cost,
    /// Packets per second through the lab router.
    Forward,
    /// Failover times.
    Failover,
    /// `lbctl flows` on a million flows.
    Flows,
    /// A ping's round trip beside saturating uploads, with and without a
    /// shaper.
    Latency,
    /// TCP goodput, retransmits and drops through the lab router.
    Tcp,
    /// Packets per second through an L3 uplink (tun, WireGuard).
    L3,
    /// Packets per second with the router's work on one CPU and on two
    /// (multi-queue veth), and the scaling.
    Scale,
    /// 60,000 clients opening 200,000 flows: new flows per second, spread,
    /// NAT failures, memory.
    Clients,
}

#[cfg(feature = "bench")]
impl Args {
    /// Whether this run measures `part`.
    fn measures(&self, part: Part) -> bool {
        self.only.is_empty() || self.only.contains(&part)
    }
}

/// Without the `bench` feature: install what is missing, build the real
/// benchmark, and run it with the same arguments.
#[cfg(not(feature = "bench"))]
pub fn run(_args: &Args) -> Result<()> {
    use anyhow::{ensure, Context};

    crate::setup::run()?;
    println!("bench: building lbd and the benchmark (release)");
    crate::cmd(
        "cargo",
        &[
            "build",
            "--release",
            "--package",
            "lb-daemon",
            "--bins",
            "--package",
            "xtask",
            "--features",
            "xtask/bench",
        ],
    )?;
    let bin = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| crate::root().join("target"))
        .join("release");
    // Everything after the program name, starting with `bench`.
    let mut child = std::process::Command::new(bin.join("xtask"))
        .args(std::env::args_os().skip(1))
        .env("LB_BIN_DIR", &bin)
        // lbd starts and stops once per round: keep its log to warnings
        // (and, as lbd's own default does, netlink_proto's to errors).
        .env(
            "RUST_LOG",
            std::env::var_os("RUST_LOG").unwrap_or_else(|| "warn,netlink_proto=error".into()),
        )
        .current_dir(crate::root())
        .spawn()
        .with_context(|| format!("starting {}", bin.join("xtask").display()))?;
    // The benchmark moves to a session of its own (`prioritize`), out of
    // reach of the terminal's Ctrl-C: pass it on, so it tears its lab down.
    let pid = child.id().to_string();
    ctrlc::set_handler(move || {
        let _ = std::process::Command::new("kill")
            .args(["-INT", &pid])
            .status();
    })
    .context("installing the Ctrl-C handler")?;
    let status = child.wait().context("waiting for the benchmark")?;
    ensure!(status.success(), "the benchmark failed ({status})");
    Ok(())
}

/// With the `bench` feature: measure, print, and write BENCHMARKS.md.
#[cfg(feature = "bench")]
pub fn run(args: &Args) -> Result<()> {
    use anyhow::{ensure, Context};

    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    ensure!(
        euid == 0,
        "the benchmark loads XDP programs and builds network namespaces: run it as root"
    );
    ensure!(
        args.runs > 0
            && args.seconds > 0
            && args.flows > 0
            && args.repeat > 0
            && args.failover_runs > 0,
        "--runs, --seconds, --flows, --repeat and --failover-runs must be positive"
    );
    let cpus = std::thread::available_parallelism()
        .context("counting CPUs")?
        .get();
    let cpu = args.cpu.unwrap_or(cpus - 1);
    ensure!(cpu < cpus, "--cpu {cpu}: this machine has {cpus} CPUs");

    let machine = report::Machine::probe(prioritize())?;
    let interrupted = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = interrupted.clone();
    ctrlc::set_handler(move || flag.store(true, std::sync::atomic::Ordering::Relaxed))
        .context("installing the Ctrl-C handler")?;

    let mut report = report::Report::new(machine, args, cpu)?;
    if args.measures(Part::Cost) {
        println!(
            "bench: per-packet cost with BPF_PROG_TEST_RUN ({} repetitions each)",
            args.repeat
        );
        let flows = forward::generator_flows(args.flows)?;
        report.costs = Some(cost::measure(args.repeat, flows, cpu)?);
        println!("bench: a million-prefix file, loaded and reloaded");
        report.prefixes = Some(prefixes::measure()?);
    }
    let source = if args.measures(Part::Forward)
        || args.measures(Part::L3)
        || args.measures(Part::Scale)
    {
        let source = gen::Source::probe()?;
        if let gen::Source::Tap(why) = &source {
            println!(
                "bench: this kernel refuses live-frames test runs ({why}): the generator writes its frames into a tap"
            );
        }
        report.generator = Some(source.clone());
        source
    } else {
        gen::Source::Live
    };
    if args.measures(Part::Forward) {
        println!("bench: packets per second through the lab router");
        (report.ways, report.profiles) = forward::measure(args, cpu, &source, &interrupted)?;
    }
    if args.measures(Part::Failover) {
        println!("bench: failover times: lb, a Netwatch-style script, the kernel alone");
        report.failovers = failover::measure(args.failover_runs, &interrupted)?;
        println!("bench: restarts of lbd under a running stream");
        report.restarts = failover::restarts(args.failover_runs, &interrupted)?;
    }
    if args.measures(Part::Latency) {
        println!("bench: latency under load, with and without a shaper");
        report.latency = latency::measure(args.failover_runs, &interrupted)?;
    }
    if args.measures(Part::Tcp) {
        println!(
            "bench: TCP goodput through the lab router ({} streams each way)",
            tcp::STREAMS
        );
        report.tcp = tcp::measure(args.runs, args.seconds, &interrupted)?;
    }
    if args.measures(Part::L3) {
        println!("bench: packets per second through an L3 uplink (tun, wireguard-go)");
        report.l3 = l3::measure(args, cpu, &source, &interrupted)?;
    }
    if args.measures(Part::Scale) {
        println!("bench: packets per second with the router's work on 1 CPU and on 2");
        report.scale = Some(scale::measure(args, cpu, &source, &interrupted)?);
    }
    if args.measures(Part::Clients) {
        println!(
            "bench: {} clients opening {} flows through lbd",
            clients::CLIENTS,
            clients::FLOWS
        );
        report.clients = Some(clients::measure(args, cpu, &interrupted)?);
    }
    if args.measures(Part::Flows) {
        println!("bench: lbctl flows on {} flows", flows::FLOWS);
        report.flows = flows::measure(args.failover_runs, &interrupted)?;
    }

    let text = report.markdown();
    println!("\n{text}");
    // With --only, the published files stay; the picture goes to target/.
    let dir = if args.only.is_empty() {
        let path = crate::root().join("BENCHMARKS.md");
        std::fs::write(&path, &text).with_context(|| format!("writing {}", path.display()))?;
        println!("bench: wrote {}", path.display());
        crate::root()
    } else {
        println!("bench: --only given: BENCHMARKS.md left as it is");
        crate::root().join("target")
    };
    if let Some(svg) = report.failover_svg() {
        let path = dir.join(report::FAILOVER_SVG);
        std::fs::write(&path, svg).with_context(|| format!("writing {}", path.display()))?;
        println!("bench: wrote {}", path.display());
    }
    Ok(())
}

/// Nice value of the benchmark's scheduling group.
#[cfg(feature = "bench")]
const NICE: i32 = -10;

/// Give the benchmark more of the CPU than other work on the machine (a
/// compiler next door would otherwise take half of the generator's CPU).
/// With autogroup scheduling, nice values count only within a session, so
/// this process starts a session of its own and lowers that group's nice
/// value; lbd, started from here, belongs to it too. Returns what it did,
/// for the report.
#[cfg(feature = "bench")]
fn prioritize() -> String {
    // SAFETY: setsid has no preconditions; it fails (and changes nothing)
    // when this process leads a process group.
    if unsafe { libc::setsid() } < 0 {
        return "default priority (could not start a session of its own)".into();
    }
    match std::fs::write("/proc/self/autogroup", NICE.to_string()) {
        Ok(()) => format!("its own scheduling group at nice {NICE}"),
        // No autogroup scheduling: the generator's thread nice value counts.
        Err(_) => format!("generator thread at nice {NICE}"),
    }
}

/// Pin the calling thread to `cpu`.
#[cfg(feature = "bench")]
fn pin_to_cpu(cpu: usize) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes
    // within it for cpu < CPU_SETSIZE (callers pass a CPU that exists), and
    // sched_setaffinity(0) changes only the calling thread.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        use anyhow::Context;
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("pinning a thread to CPU {cpu}"));
    }
    Ok(())
}
