//! Packets per second through the lab router with its work spread over
//! two CPUs, beside the same with one, for the kernel's way, lb and a bare
//! redirect (forward.rs's ways, rig and generator, on a lab of its own).
//!
//! The lab: forward.rs's, with its three forwarding links (client:eth0 --
//! router:lan0, router:wanN -- ispN:down0) made again as veth pairs of
//! [`QUEUES`] queues each way, and XPS sending CPU n's transmissions to
//! queue n on every one of them, so that no queue is shared by two CPUs.
//!
//! Spreading: veth has no RSS. A frame sent into a veth pair (by XDP, as
//! the generator's are) lands in the peer's receive queue of the sending
//! CPU (`smp_processor_id() % queues`), and that queue's NAPI runs on the
//! CPU that woke it; the kernel's skb path follows the transmit queue,
//! which XPS ties to the CPU too. So the CPU that generates a frame is the
//! one that forwards it, in softirq, through its own queue. Each CPU has a
//! generator of its own (`bench_gen` in live-frames test runs, pinned)
//! with its own half of the flows, as RSS gives each queue its own flows:
//! a flow is only ever seen on one CPU. With one CPU, one generator makes
//! all the flows on `--cpu`.
//!
//! What the figure means on a small machine: the generator shares each CPU
//! with the router's work (as in forward.rs: it is paced by the router, and
//! its time is counted apart from the router's, as system time against
//! softirq time). "2 CPUs" is thus twice (generator + router) against one
//! (generator + router), on a machine that has nothing else left for
//! anything else: other work on the machine takes from the 2-CPU windows
//! and not only from one CPU, which the report shows as "other". The
//! router's own time per frame (softirq ns) says whether forwarding got
//! dearer per frame when both CPUs do it (shared cache lines, locks); the
//! scaling ratio of the rate says what the whole lab gained.
//!
//! Each round runs every way once, both CPU counts one after the other with
//! the way set up once. It owns its lab (namespaces `lbs-*`) for the length
//! of its run and never leaves any of it behind; it never judges a speed.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::Duration,
};

use anyhow::{bail, ensure, Context, Result};
use lb_tests::{in_netns, Lab, LabDesc};

use super::{
    forward::{generator_thread, Rig, Way, Window, GEN_PORT_BASE, WARMUP},
    gen::{Generator, Source},
    Args,
};

/// Namespace prefix of this part's lab: its own, so that it never meets
/// forward.rs's `lbb-` lab.
const PREFIX: &str = "lbs-";
const LAB: &str = "default";
/// Queues each way on the forwarding links: one per CPU used.
const QUEUES: usize = 2;
/// The links made multi-queue: (host, ifname) at both ends.
const LINKS: [[(&str, &str); 2]; 3] = [
    [("client", "eth0"), ("router", "lan0")],
    [("router", "wan1"), ("isp1", "down0")],
    [("router", "wan2"), ("isp2", "down0")],
];
/// The ways measured, in the order they run.
pub const WAYS: [Way; 3] = [Way::Kernel, Way::Lb, Way::Bare];
/// Between the generators' warm-up and the window's first sample.
const SETTLE: Duration = Duration::from_millis(200);
/// How long a generator may take to report its warm-up done: a bound, so
/// that a generator that hangs fails the benchmark instead of hanging it.
const READY: Duration = Duration::from_secs(30);

/// One way's windows with one CPU and with two.
pub struct WayScale {
    pub way: Way,
    pub one: Vec<Window>,
    pub two: Vec<Window>,
}

/// What this part measured.
pub struct Scale {
    /// The CPU of the one-CPU windows, and those of the two-CPU windows.
    pub one_cpu: usize,
    pub cpus: Vec<usize>,
    pub flows: u32,
    pub ways: Vec<WayScale>,
}

/// A generator and its CPU.
struct Gen {
    gen: Generator,
    cpu: usize,
}

/// Bring the multi-queue lab up, measure every way `args.runs` times with
/// one CPU and with two, and take the lab down again (also on error).
pub fn measure(
    args: &Args,
    cpu: usize,
    source: &Source,
    interrupted: &AtomicBool,
) -> Result<Scale> {
    let cpus = std::thread::available_parallelism()
        .context("counting CPUs")?
        .get();
    ensure!(
        cpus >= QUEUES,
        "spreading over {QUEUES} CPUs needs {QUEUES} CPUs; this machine has {cpus}"
    );
    let flows = u16::try_from(args.flows)
        .ok()
        .filter(|&f| f >= 2 && u32::from(GEN_PORT_BASE) + u32::from(f) <= 20_000)
        .with_context(|| {
            format!(
                "--flows {}: between 2 and {}",
                args.flows,
                20_000 - GEN_PORT_BASE
            )
        })?;
    quiet_signal()?;
    Lab::down(PREFIX)?;
    let desc = LabDesc::shipped(LAB).with_context(|| format!("loading lab {LAB}"))?;
    let mut lab = Lab::up(&desc, PREFIX)?;
    for link in LINKS {
        requeue(&lab, link)?;
    }
    let spread: Vec<usize> = (0..QUEUES).collect();
    let mut ways: Vec<WayScale> = WAYS
        .iter()
        .map(|&way| WayScale {
            way,
            one: Vec::new(),
            two: Vec::new(),
        })
        .collect();
    {
        let mut rig = Rig::new(&mut lab, args.flows, cpu, source)?;
        let single = [Gen {
            gen: rig.generator(GEN_PORT_BASE, flows)?,
            cpu,
        }];
        // Each CPU its own part of the flows, as RSS would give them.
        let per_cpu = flows / QUEUES as u16;
        let mut both = Vec::new();
        for (n, &cpu) in spread.iter().enumerate() {
            let first = GEN_PORT_BASE + n as u16 * per_cpu;
            both.push(Gen {
                gen: rig.generator(first, per_cpu)?,
                cpu,
            });
        }
        let length = Duration::from_secs(args.seconds);
        for round in 1..=args.runs {
            for result in &mut ways {
                ensure!(!interrupted.load(Ordering::Relaxed), "interrupted");
                let (one, two) = rig
                    .with_way(result.way, |rig| {
                        let one = window(rig, &single, length, interrupted)?;
                        let two = window(rig, &both, length, interrupted)?;
                        Ok((one, two))
                    })
                    .with_context(|| format!("round {round}, {}", result.way.label()))?;
                println!(
                    "  round {round}/{}: {:<52} {:>6.3} Mpps on 1 CPU, {:>6.3} on {QUEUES} ({:.2}x)",
                    args.runs,
                    result.way.label(),
                    one.pps / 1e6,
                    two.pps / 1e6,
                    two.pps / one.pps.max(1.0)
                );
                result.one.push(one);
                result.two.push(two);
            }
        }
        // The rig's programs detach here, before the lab goes.
    }
    drop(lab);
    Ok(Scale {
        one_cpu: cpu,
        cpus: spread,
        flows: args.flows,
        ways,
    })
}

/// Make the veth pair `link` again with [`QUEUES`] queues each way, its
/// ends as the lab describes them (addresses, the routes through them,
/// offloads), and XPS mapping CPU n to transmit queue n at both ends.
fn requeue(lab: &Lab, [(a_host, a_if), (b_host, b_if)]: [(&str, &str); 2]) -> Result<()> {
    let queues = QUEUES.to_string();
    let b_ns = lab.ns(b_host)?;
    lab.exec(a_host, &["ip", "link", "del", "dev", a_if])
        .with_context(|| format!("removing {a_host}:{a_if}"))?;
    #[rustfmt::skip]
    let add = [
        "ip", "link", "add", a_if, "numtxqueues", &queues, "numrxqueues", &queues,
        "type", "veth", "peer", "name", b_if, "numtxqueues", &queues, "numrxqueues", &queues,
        "netns", b_ns,
    ];
    lab.exec(a_host, &add).with_context(|| {
        format!("making {a_host}:{a_if} -- {b_host}:{b_if} with {QUEUES} queues")
    })?;
    // Addresses and the routes through them, as the lab had them; the
    // second end waits for both to be up.
    lab.set_link_up(a_host, a_if, true)?;
    lab.set_link_up(b_host, b_if, true)?;
    // Offloads last, with both ends up (see lb_tests::lab: a veth takes
    // redirected frames only when its peer's GRO was turned on while up).
    for (host, ifname) in [(a_host, a_if), (b_host, b_if)] {
        let end = lab
            .desc()
            .peer(host, ifname)
            .and_then(|peer| lab.desc().peer(&peer.host, &peer.ifname))
            .with_context(|| format!("{host}:{ifname} is no end of a link of lab {LAB}"))?;
        if !end.offload.is_empty() {
            let mut args = vec!["ethtool", "-K", ifname];
            for (feature, on) in &end.offload {
                args.extend([feature.as_str(), if *on { "on" } else { "off" }]);
            }
            lab.exec(host, &args)
                .with_context(|| format!("setting offloads on {host}:{ifname}"))?;
        }
        for queue in 0..QUEUES {
            let path = format!("/sys/class/net/{ifname}/queues/tx-{queue}/xps_cpus");
            let mask = format!("{:x}", 1u64 << queue);
            lab.exec(host, &["sh", "-c", &format!("echo {mask} > {path}")])
                .with_context(|| format!("XPS on {host}:{ifname} (is CONFIG_XPS set?)"))?;
        }
    }
    Ok(())
}

/// One window with every generator of `gens` running on its CPU: each
/// warms up, then starts one long live-frames run; the window is sampled
/// while all run, and then each is stopped with a signal.
fn window(rig: &Rig, gens: &[Gen], length: Duration, interrupted: &AtomicBool) -> Result<Window> {
    let ns = rig.lab.ns("client")?;
    let stopping = AtomicBool::new(false);
    let (ready_tx, ready) = mpsc::channel::<libc::pid_t>();
    std::thread::scope(|s| {
        let threads: Vec<_> = gens
            .iter()
            .map(|gen| {
                let ready_tx = ready_tx.clone();
                let stopping = &stopping;
                s.spawn(move || {
                    in_netns(ns, || {
                        generate(rig, gen, &ready_tx, length, stopping, interrupted)
                    })
                })
            })
            .collect();
        drop(ready_tx);
        let measured = sample_window(rig, gens, &ready, length);
        // Stop them all, measured or not: every run ends within its size.
        stopping.store(true, Ordering::Relaxed);
        let started = measured
            .as_ref()
            .map_or(&[][..], |(_, tids)| tids.as_slice());
        for &tid in started.iter().chain(&ready.try_iter().collect::<Vec<_>>()) {
            stop(tid);
        }
        let mut ended = Ok(());
        for thread in threads {
            let result = match thread.join() {
                Ok(result) => result,
                Err(_) => Err(anyhow::anyhow!("a generator thread panicked")),
            };
            ended = ended.and(result);
        }
        let (window, _) = measured?;
        ended?;
        Ok(window)
    })
}

/// Wait for every generator's warm-up, then sample the window. Returns it
/// and the generators' thread ids.
fn sample_window(
    rig: &Rig,
    gens: &[Gen],
    ready: &mpsc::Receiver<libc::pid_t>,
    length: Duration,
) -> Result<(Window, Vec<libc::pid_t>)> {
    let mut tids = Vec::new();
    while tids.len() < gens.len() {
        match ready.recv_timeout(READY) {
            Ok(tid) => tids.push(tid),
            // A generator failed (its error comes from its thread), or hangs.
            Err(_) => {
                for &tid in &tids {
                    stop(tid);
                }
                bail!("a generator did not start its run");
            }
        }
    }
    std::thread::sleep(SETTLE);
    let generators: Vec<&Generator> = gens.iter().map(|g| &g.gen).collect();
    let before = rig.sample(&generators)?;
    std::thread::sleep(length);
    let after = rig.sample(&generators)?;
    let cpus: Vec<usize> = gens.iter().map(|g| g.cpu).collect();
    Ok((after.since_on(&before, &cpus)?, tids))
}

/// One generator's thread (in the client's namespace): pinned, warmed up,
/// then one run long enough for the window and a margin, which the window
/// stops with a signal when it has its samples.
fn generate(
    rig: &Rig,
    gen: &Gen,
    ready: &mpsc::Sender<libc::pid_t>,
    length: Duration,
    stopping: &AtomicBool,
    interrupted: &AtomicBool,
) -> Result<()> {
    generator_thread(gen.cpu)?;
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    // A live run is sized for the settle, the window and a warm-up's
    // margin; it is stopped long before it ends.
    gen.gen
        .send_until(
            rig.client_eth0,
            WARMUP,
            SETTLE + length + WARMUP,
            stopping,
            interrupted,
            // The window may have given up already: then nobody listens.
            || {
                let _ = ready.send(tid);
            },
        )
        .with_context(|| format!("the generator on CPU {}", gen.cpu))
}

/// Interrupt the test run of thread `tid` of this process (its syscall
/// returns EINTR: the handler of [`quiet_signal`] does nothing).
fn stop(tid: libc::pid_t) {
    // SAFETY: tgkill only sends a signal; a thread that has ended already
    // makes it fail with ESRCH, which changes nothing.
    unsafe {
        libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, STOP_SIGNAL);
    }
}

const STOP_SIGNAL: libc::c_int = libc::SIGUSR1;

extern "C" fn ignore(_: libc::c_int) {}

/// A handler for [`STOP_SIGNAL`] that does nothing, installed without
/// SA_RESTART, so that the signal ends a test run early and nothing else.
fn quiet_signal() -> Result<()> {
    // SAFETY: a zeroed sigaction is valid (empty mask, no flags); the
    // handler is an `extern "C"` function that touches nothing.
    let rc = unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = ignore as *const () as usize;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(STOP_SIGNAL, &action, std::ptr::null_mut())
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("installing a SIGUSR1 handler");
    }
    Ok(())
}

impl Scale {
    /// The section of the report: the table and what it means;
    /// `gen_note` says how the frames were made, when not as the text says.
    pub fn markdown(&self, md: &mut String, gen_note: &str) {
        use std::fmt::Write as _;

        let median = |windows: &[Window], figure: fn(&Window) -> f64| {
            let mut v: Vec<f64> = windows.iter().map(figure).collect();
            v.sort_by(f64::total_cmp);
            v.get(v.len() / 2).copied().unwrap_or(0.0)
        };
        let runs = self.ways.first().map_or(0, |w| w.one.len());
        let cpus: Vec<String> = self.cpus.iter().map(usize::to_string).collect();
        let _ = write!(
            md,
            "## Both CPUs: forwarding spread over {n} CPUs\n\n\
             The lab router of the table above, its forwarding links (client -- lan0,\n\
             wanN -- ispN) made again as veth pairs of {n} queues each way, with XPS\n\
             tying CPU n to transmit queue n. veth has no RSS: a frame lands in the\n\
             peer's receive queue of the CPU that sent it, whose NAPI runs on that CPU,\n\
             so each CPU forwards what it generates, in softirq, through queues of its\n\
             own. 1 CPU: one `bench_gen` on CPU {one} making all {flows} flows; {n} CPUs:\n\
             one on each of CPUs {cpus}, each with its own half of the flows (as RSS\n\
             keeps a flow on one queue). Median of {runs} windows; each way is set up\n\
             once per round for both windows.\n\n\
             The generator shares each CPU with the router's work and is paced by it:\n\
             Mpps is what generator and router together did on that many CPUs, on a\n\
             machine with nothing else to spare (\"other\" is the share of the measured\n\
             CPUs that other work took). The router's time per frame (softirq, summed\n\
             over the CPUs used) says whether forwarding got dearer per frame with two\n\
             CPUs at it; the generator's time per frame is apart.\n\n\
             \"Scaling, others out\" divides each rate by the share of the measured\n\
             CPUs that other work left to the benchmark: the scaling had the lab had\n\
             the CPUs to itself.\n\n\
             {gen_note}\
             | way | Mpps, 1 CPU | Mpps, {n} CPUs | scaling | scaling, others out | router ns/frame, 1 / {n} | generator ns/frame, 1 / {n} | other, 1 / {n} |\n\
             | --- | --- | --- | --- | --- | --- | --- | --- |\n",
            n = self.cpus.len(),
            one = self.one_cpu,
            flows = self.flows,
            cpus = cpus.join(" and "),
        );
        for w in &self.ways {
            let (one, two) = (median(&w.one, |w| w.pps), median(&w.two, |w| w.pps));
            let alone = |w: &Window| w.pps / (1.0 - w.other_pct / 100.0).max(0.01);
            let (one_alone, two_alone) = (median(&w.one, alone), median(&w.two, alone));
            let _ = writeln!(
                md,
                "| {} | {:.3} | {:.3} | {:.2}x | {:.2}x | {:.0} / {:.0} | {:.0} / {:.0} | {:.0} % / {:.0} % |",
                w.way.label(),
                one / 1e6,
                two / 1e6,
                two / one.max(1.0),
                two_alone / one_alone.max(1.0),
                median(&w.one, |w| w.softirq_ns),
                median(&w.two, |w| w.softirq_ns),
                median(&w.one, |w| w.system_ns),
                median(&w.two, |w| w.system_ns),
                median(&w.one, |w| w.other_pct),
                median(&w.two, |w| w.other_pct),
            );
        }
        md.push('\n');
    }
}
