//! Per-packet cost of lb's programs with `BPF_PROG_TEST_RUN`: the real
//! verifier-approved `lan_ingress` and `wan_ingress` with the real maps, no
//! interfaces, set up as lb-daemon/tests/xdp_test_run.rs does.
//!
//! A test run repeats the program on one buffer and keeps what it wrote
//! (rewritten addresses, a decremented TTL), so timing lb directly would
//! time whatever path the 60th rewrite of a packet takes. Instead lb-bench's
//! `bench_run` restores the frame (and, for new flows, makes each
//! repetition a flow never seen before) and tail-calls the program under
//! test; the same harness tail-calling `bench_nop` is timed as well, and
//! its cost subtracted. Every measurement checks lb's counters: each
//! repetition must have taken the path it is reported under.

use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::{ensure, Context, Result};
use aya::programs::ProgramFd;
use lb_common::policy::Policy;
use lb_common::{
    hash,
    maps::{program, uplink_state, Uplink6, UplinkInfo},
    npt::Npt,
    reason,
    table::{self, Table},
    DEFAULT_MAX_FLOWS, MAX_UPLINKS,
};
use lb_daemon::{config, dataplane::Dataplane, reconcile::policies::Policies};

use super::object::{self, BenchObject, Stamp, Udp, Udp6, XDP_PASS, XDP_REDIRECT};

/// Timed test runs per path; the median is reported.
const RUNS: usize = 7;

const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const ROUTER_LAN_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 2);
const ROUTER_LAN: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 1);
const SERVER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
const LAN6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0x100, 0, 0, 0, 0);
const ISP2_6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0x200, 0, 0, 0, 0);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0x100, 0x1234, 0x5678, 0x9abc, 0xdef0);
const SERVER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 0x10);
/// New flows go to 198.18.0.0/16 (RFC 2544's benchmarking range), one
/// destination per 16,384 source ports, so none repeats within a run.
const FRESH_DST: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 0);
/// The flows taken in turn go to an address just past the new flows' /16
/// (still RFC 2544's range), from the forwarding bench generator's ports.
const IN_TURN_DST: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);
const FRESH_PORTS: u16 = 16_384;
const FRESH_ADDRS: u16 = 65_535;
const NAT_PORTS: (u16, u16) = (20_000, 29_999);
const LOCAL_PORTS: (u16, u16) = (32_768, 60_999);
/// `wan_ingress` test runs arrive on loopback, which stands for both
/// uplinks; the ifindex map keeps the last one set, so replies belong to
/// this uplink.
const REPLY_UPLINK: u32 = 1;
/// Flow table size for new flows without eviction (about 200 MB of maps),
/// and repetitions per run there: all runs together fit into the table.
const ROOMY_TABLE: u32 = 1 << 20;
const ROOMY_REPEAT: u32 = 100_000;
/// The NAT table of the data plane whose flow table evicts: room for
/// every new flow of the runs, as lbd's collector keeps room in it (it
/// never evicts; full, a new flow would go to the kernel). The new-flow
/// row runs `ROOMY_REPEAT` repetitions there too.
const NAT_ROOM: u32 = 1 << 20;

/// The cost of one path.
pub struct Cost {
    pub path: &'static str,
    pub program: &'static str,
    pub verdict: &'static str,
    /// Repetitions per test run.
    pub repeat: u32,
    /// ns per packet with the harness's cost subtracted: median, min, max.
    pub median_ns: i64,
    pub min_ns: i64,
    pub max_ns: i64,
}

pub struct Costs {
    pub runs: usize,
    /// ns per packet of the harness alone (restore + tail call), median,
    /// restoring a fixed frame and making each repetition a new flow.
    pub harness_ns: u64,
    pub harness_varied_ns: u64,
    /// Flow table size of the "no eviction" row.
    pub roomy_table: u32,
    /// Flows of the "in turn" row: as many as the forwarding bench's
    /// generator cycles through.
    pub in_turn_flows: u16,
    pub paths: Vec<Cost>,
}

impl Costs {
    pub fn get(&self, path: &str) -> Option<&Cost> {
        self.paths.iter().find(|c| c.path == path)
    }
}

pub const NEW_FLOW: &str = "new flow";
pub const NEW_FLOW_ROOMY: &str = "new flow, no eviction";
pub const ESTABLISHED: &str = "established outbound";
pub const REPLY: &str = "reply inbound";
pub const PASS_LOCAL: &str = "pass-through: to the router";
pub const PASS_ARP: &str = "pass-through: ARP";
pub const KERNEL_CONNECTION: &str = "a port forward's reply, after its first packet";
pub const NEW_FLOW_RULES_16: &str = "new flow, no eviction, 16 rules";
pub const NEW_FLOW_RULES_256: &str = "new flow, no eviction, 256 rules";
pub const NEW_FLOW_RULES_SET: &str = "new flow, no eviction, 256 rules and a 1,000,000-prefix set";
pub const ESTABLISHED6: &str = "established outbound, IPv6 (NPTv6)";
pub const REPLY6: &str = "reply inbound, IPv6 (NPTv6)";
pub const ESTABLISHED_RULES: &str = "established outbound, 256 rules and a 1,000,000-prefix set";
pub const ESTABLISHED_IN_TURN: &str = "established outbound, the generator's flows in turn";

/// Prefixes of the set in the rules rows.
pub const SET_PREFIXES: usize = 1_000_000;

/// The connection conntrack holds for the kernel-connection path: a
/// "LAN server" answering an "internet client" (over loopback, in the
/// measuring thread's own network namespace, between two addresses put on
/// it: loopback's own 127/8 is the kernel's before conntrack is asked).
const FORWARDED_SERVER: (Ipv4Addr, u16) = (Ipv4Addr::new(192, 0, 2, 1), 9000);
const FORWARDED_CLIENT: (Ipv4Addr, u16) = (Ipv4Addr::new(192, 0, 2, 2), 40_000);

/// What every repetition of a path must have done, by lb's counters.
#[derive(Clone, Copy, Debug)]
enum Expect {
    /// Forwarded out of an uplink; a new flow each time, or none.
    Forwarded { new_flows: bool },
    /// Translated back to the client.
    Reply,
    /// Passed to the kernel for `reason`.
    Passed(u32),
}

#[derive(Clone)]
struct Path {
    name: &'static str,
    program: &'static str,
    frame: Vec<u8>,
    stamp: Stamp,
    verdict: u32,
    expect: Expect,
    /// Untimed repetitions first (to fill the flow table).
    warmup: u32,
}

/// Measure every path, on a thread pinned to `cpu`.
pub fn measure(repeat: u32, flows: u16, cpu: usize) -> Result<Costs> {
    std::thread::scope(|s| {
        s.spawn(|| {
            super::pin_to_cpu(cpu)?;
            track_a_connection()?;
            measure_here(repeat, flows)
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Move the calling thread into a network namespace of its own (test runs
/// then see its conntrack; it goes with the thread) and make conntrack
/// track one UDP connection there, from [`FORWARDED_CLIENT`] to
/// [`FORWARDED_SERVER`]: what the kernel holds for a port forward.
fn track_a_connection() -> Result<()> {
    // SAFETY: unshare changes only the calling thread's namespaces.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error()).context("unshare(CLONE_NEWNET)");
    }
    // Children forked from this thread are in its namespace.
    for args in [
        &["ip", "link", "set", "lo", "up"][..],
        &["ip", "addr", "add", "192.0.2.1/32", "dev", "lo"],
        &["ip", "addr", "add", "192.0.2.2/32", "dev", "lo"],
        &["nft", "add table ip bench"],
        &[
            "nft",
            "add chain ip bench out { type filter hook output priority 0; ct state new counter; }",
        ],
    ] {
        let out = std::process::Command::new(args[0])
            .args(&args[1..])
            .output()
            .with_context(|| format!("running {} (cargo xtask setup installs it)", args[0]))?;
        ensure!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let socket = std::net::UdpSocket::bind(FORWARDED_CLIENT)?;
    socket.send_to(b"in", FORWARDED_SERVER)?;
    Ok(())
}

fn measure_here(repeat: u32, in_turn_flows: u16) -> Result<Costs> {
    let mut dp = dataplane()?;
    let mut bench = BenchObject::load(&["bench_run", "bench_nop"])?;
    let (client_port, nat_port) = flow_on_reply_uplink(&mut dp)?;
    let reply_uplink = uplink_info(REPLY_UPLINK);
    let outbound = Udp {
        src_mac: CLIENT_MAC,
        dst_mac: ROUTER_LAN_MAC,
        src: CLIENT,
        dst: SERVER,
        src_port: client_port,
        dst_port: 53,
        ttl: 64,
    };
    let reply = Udp {
        src_mac: reply_uplink.gw_mac,
        dst_mac: reply_uplink.src_mac,
        src: SERVER,
        dst: reply_uplink.addr.into(),
        src_port: 53,
        dst_port: nat_port,
        ttl: 60,
    }
    .frame();
    let to_router = Udp {
        dst: ROUTER_LAN,
        dst_port: 22,
        ..outbound
    }
    .frame();
    let arp = object::arp(CLIENT_MAC, CLIENT, ROUTER_LAN);
    let forwarded_reply = Udp {
        src: FORWARDED_SERVER.0,
        dst: FORWARDED_CLIENT.0,
        src_port: FORWARDED_SERVER.1,
        dst_port: FORWARDED_CLIENT.1,
        ..outbound
    }
    .frame();
    let fresh = Udp {
        dst: FRESH_DST,
        src_port: 1024,
        ..outbound
    }
    .frame();
    // The forwarding bench's flows, one after the other, as its generator
    // sends them: each flow was last touched as many packets before as
    // there are flows.
    let in_turn = Udp {
        dst: IN_TURN_DST,
        src_port: super::forward::GEN_PORT_BASE,
        ..outbound
    }
    .frame();
    let outbound = outbound.frame();
    let (outbound6, reply6) = flow6_on_reply_uplink(&mut dp)?;

    // The harness alone, restoring a fixed frame and varying the flow.
    let nop = bench.xdp("bench_nop")?.fd()?.try_clone()?;
    let harness_frames = HarnessFrames {
        fixed: (Stamp::fixed(&outbound)?, outbound.clone()),
        varied: (
            Stamp::flows(&fresh, FRESH_PORTS, FRESH_ADDRS)?,
            fresh.clone(),
        ),
    };

    let paths = [
        Path {
            name: ESTABLISHED,
            program: program::LAN_INGRESS,
            stamp: Stamp::fixed(&outbound)?,
            frame: outbound,
            verdict: XDP_REDIRECT,
            expect: Expect::Forwarded { new_flows: false },
            warmup: 0,
        },
        Path {
            name: REPLY,
            program: program::WAN_INGRESS,
            stamp: Stamp::fixed(&reply)?,
            frame: reply,
            verdict: XDP_REDIRECT,
            expect: Expect::Reply,
            warmup: 0,
        },
        Path {
            name: ESTABLISHED6,
            program: program::LAN_INGRESS,
            stamp: Stamp::fixed(&outbound6)?,
            frame: outbound6,
            verdict: XDP_REDIRECT,
            expect: Expect::Forwarded { new_flows: false },
            warmup: 0,
        },
        Path {
            name: REPLY6,
            program: program::WAN_INGRESS,
            stamp: Stamp::fixed(&reply6)?,
            frame: reply6,
            verdict: XDP_REDIRECT,
            expect: Expect::Reply,
            warmup: 0,
        },
        Path {
            name: PASS_LOCAL,
            program: program::LAN_INGRESS,
            stamp: Stamp::fixed(&to_router)?,
            frame: to_router,
            verdict: XDP_PASS,
            expect: Expect::Passed(reason::PASS_LOCAL),
            warmup: 0,
        },
        Path {
            name: PASS_ARP,
            program: program::LAN_INGRESS,
            stamp: Stamp::fixed(&arp)?,
            frame: arp,
            verdict: XDP_PASS,
            expect: Expect::Passed(reason::PASS_NOT_IPV4),
            warmup: 0,
        },
        // Its first packet asks conntrack and remembers the answer; the
        // rest are timed.
        Path {
            name: KERNEL_CONNECTION,
            program: program::LAN_INGRESS,
            stamp: Stamp::fixed(&forwarded_reply)?,
            frame: forwarded_reply,
            verdict: XDP_PASS,
            expect: Expect::Passed(reason::PASS_KERNEL_CONNECTION),
            warmup: 1,
        },
        // One untimed round makes every flow; each timed repetition then
        // finds the one the generator would send next.
        Path {
            name: ESTABLISHED_IN_TURN,
            program: program::LAN_INGRESS,
            stamp: Stamp::flows(&in_turn, in_turn_flows, 1)?,
            frame: in_turn,
            verdict: XDP_REDIRECT,
            expect: Expect::Forwarded { new_flows: false },
            warmup: u32::from(in_turn_flows),
        },
        // Last: it evicts the flows above from the full table.
        Path {
            name: NEW_FLOW,
            program: program::LAN_INGRESS,
            stamp: Stamp::flows(&fresh, FRESH_PORTS, FRESH_ADDRS)?,
            frame: fresh,
            verdict: XDP_REDIRECT,
            expect: Expect::Forwarded { new_flows: true },
            warmup: 2 * DEFAULT_MAX_FLOWS,
        },
    ];
    let [ref warm @ .., ref new_flow] = paths;
    let (harness, mut costs) =
        measure_in_rounds(&mut bench, &mut dp, &nop, &harness_frames, warm, repeat)?;
    const _: () =
        assert!(2 * DEFAULT_MAX_FLOWS as usize + ROOMY_REPEAT as usize * RUNS < NAT_ROOM as usize);
    costs.push(measure_path(
        &mut bench,
        &mut dp,
        new_flow,
        ROOMY_REPEAT,
        &harness,
    )?);

    // New flows again, into a table big enough never to evict: what the
    // eviction above costs. Fewer repetitions, so the table holds them all.
    const _: () = assert!(ROOMY_REPEAT as usize * RUNS < ROOMY_TABLE as usize);
    let mut roomy = Dataplane::load_sized(ROOMY_TABLE, ROOMY_TABLE)
        .context("a data plane with a large flow table")?;
    configure(&mut roomy)?;
    let new_flow = paths
        .iter()
        .find(|p| p.name == NEW_FLOW)
        .context("the new-flow path")?;
    let path = Path {
        name: NEW_FLOW_ROOMY,
        warmup: 0,
        ..new_flow.clone()
    };
    costs.push(measure_path(
        &mut bench,
        &mut roomy,
        &path,
        ROOMY_REPEAT,
        &harness,
    )?);

    drop(roomy);

    // The same new flows with the operator's rules: none of them matches
    // (each fails on its last field), and the last rows look the
    // destination up in a million-prefix file's trie.
    let dir = std::env::temp_dir().join(format!("lb-bench-rules-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let set = dir.join("prefixes.txt");
    super::prefixes::write_file(&set, million_prefixes().into_iter())?;
    for (name, rules, with_set) in [
        (NEW_FLOW_RULES_16, 16, false),
        (NEW_FLOW_RULES_256, 256, false),
        (NEW_FLOW_RULES_SET, 256, true),
    ] {
        let mut dp = Dataplane::load_sized(ROOMY_TABLE, ROOMY_TABLE)
            .context("a data plane with a large flow table")?;
        configure(&mut dp)?;
        let ruled = with_rules(&mut dp, &dir, rules, with_set.then_some(set.as_path()));
        if let Err(e) = ruled {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        let path = Path {
            name,
            warmup: 0,
            ..new_flow.clone()
        };
        costs.push(measure_path(
            &mut bench,
            &mut dp,
            &path,
            ROOMY_REPEAT,
            &harness,
        )?);
        if with_set {
            // Established flows never look at the rules.
            let (client_port, _) = flow_on_reply_uplink(&mut dp)?;
            let frame = Udp {
                src_mac: CLIENT_MAC,
                dst_mac: ROUTER_LAN_MAC,
                src: CLIENT,
                dst: SERVER,
                src_port: client_port,
                dst_port: 53,
                ttl: 64,
            }
            .frame();
            let path = Path {
                name: ESTABLISHED_RULES,
                program: program::LAN_INGRESS,
                stamp: Stamp::fixed(&frame)?,
                frame,
                verdict: XDP_REDIRECT,
                expect: Expect::Forwarded { new_flows: false },
                warmup: 0,
            };
            costs.push(measure_path(&mut bench, &mut dp, &path, repeat, &harness)?);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);

    Ok(Costs {
        runs: RUNS,
        harness_ns: harness.fixed.max(0) as u64,
        harness_varied_ns: harness.varied.max(0) as u64,
        roomy_table: ROOMY_TABLE,
        in_turn_flows,
        paths: costs,
    })
}

/// The harness's own cost per packet (`bench_run` tail-calling
/// `bench_nop`), for a fixed frame and for one that varies the flow.
struct Harness {
    fixed: i64,
    varied: i64,
}

/// The harness's frames: a fixed one, and one it makes a new flow of.
struct HarnessFrames {
    fixed: (Stamp, Vec<u8>),
    varied: (Stamp, Vec<u8>),
}

impl Harness {
    /// What the harness adds to `path`'s runs.
    fn of(&self, path: &Path) -> i64 {
        if path.stamp.varies() {
            self.varied
        } else {
            self.fixed
        }
    }
}

/// Time `paths` in [`RUNS`] rounds, each of which times the harness alone
/// (tail-calling `nop`) and then every path once, less that round's
/// harness. A burst of load from elsewhere on this shared machine then
/// lands on one round of every path, not on every run of one path. Returns
/// the harness's medians, for the paths timed one by one after these.
fn measure_in_rounds(
    bench: &mut BenchObject,
    dp: &mut Dataplane,
    nop: &ProgramFd,
    frames: &HarnessFrames,
    paths: &[Path],
    repeat: u32,
) -> Result<(Harness, Vec<Cost>)> {
    for path in paths {
        aim(bench, dp, path)?;
        warm_up(bench, path)?;
    }
    let (mut fixed, mut varied) = (Vec::new(), Vec::new());
    let mut ns = vec![Vec::new(); paths.len()];
    for _ in 0..RUNS {
        bench.set_target(nop)?;
        let round = Harness {
            fixed: harness_run(bench, &frames.fixed, repeat)?,
            varied: harness_run(bench, &frames.varied, repeat)?,
        };
        fixed.push(round.fixed);
        varied.push(round.varied);
        for (path, ns) in paths.iter().zip(&mut ns) {
            aim(bench, dp, path)?;
            ns.push(run(bench, dp, path, repeat)? - round.of(path));
        }
    }
    let harness = Harness {
        fixed: median(&fixed),
        varied: median(&varied),
    };
    let costs = paths
        .iter()
        .zip(&ns)
        .map(|(path, ns)| cost(path, repeat, ns))
        .collect();
    Ok((harness, costs))
}

/// One run of the harness alone on `(stamp, frame)`, `repeat` repetitions:
/// ns per packet.
fn harness_run(
    bench: &mut BenchObject,
    (stamp, frame): &(Stamp, Vec<u8>),
    repeat: u32,
) -> Result<i64> {
    bench.set_stamp(stamp)?;
    let (verdict, t) = object::time(bench.xdp("bench_run")?, frame, repeat)?;
    ensure!(
        verdict == XDP_PASS,
        "the harness with bench_nop returned {verdict}"
    );
    Ok(t as i64)
}

/// Time `path` [`RUNS`] times, `repeat` repetitions each, checking lb's
/// counters after each run.
fn measure_path(
    bench: &mut BenchObject,
    dp: &mut Dataplane,
    path: &Path,
    repeat: u32,
    harness: &Harness,
) -> Result<Cost> {
    aim(bench, dp, path)?;
    warm_up(bench, path)?;
    let mut ns = Vec::new();
    for _ in 0..RUNS {
        ns.push(run(bench, dp, path, repeat)? - harness.of(path));
    }
    Ok(cost(path, repeat, &ns))
}

/// Point the harness at `path`'s program and frame.
fn aim(bench: &mut BenchObject, dp: &mut Dataplane, path: &Path) -> Result<()> {
    let fd = dp.xdp(path.program)?.fd()?.try_clone()?;
    bench.set_target(&fd)?;
    bench.set_stamp(&path.stamp)
}

/// `path`'s untimed repetitions, if it has any.
fn warm_up(bench: &mut BenchObject, path: &Path) -> Result<()> {
    if path.warmup > 0 {
        object::time(bench.xdp("bench_run")?, &path.frame, path.warmup)
            .with_context(|| format!("{}: warming up", path.name))?;
    }
    Ok(())
}

/// One timed run of `path` (the harness aimed at it): ns per packet,
/// harness included, once lb's counters say every repetition took it.
fn run(bench: &BenchObject, dp: &Dataplane, path: &Path, repeat: u32) -> Result<i64> {
    let before = Counters::read(dp)?;
    let (verdict, t) = object::time(bench.xdp("bench_run")?, &path.frame, repeat)?;
    let after = Counters::read(dp)?;
    ensure!(
        verdict == path.verdict,
        "{}: {} returned {verdict}, expected {}",
        path.name,
        path.program,
        path.verdict
    );
    after
        .check(&before, path.expect, u64::from(repeat))
        .with_context(|| format!("{}: not every repetition took this path", path.name))?;
    Ok(t as i64)
}

/// `path`'s cost from its runs' ns per packet (harness subtracted).
fn cost(path: &Path, repeat: u32, ns: &[i64]) -> Cost {
    let cost = Cost {
        path: path.name,
        program: path.program,
        verdict: if path.verdict == XDP_PASS {
            "XDP_PASS"
        } else {
            "XDP_REDIRECT"
        },
        repeat,
        median_ns: median(ns),
        min_ns: ns.iter().copied().min().unwrap_or_default(),
        max_ns: ns.iter().copied().max().unwrap_or_default(),
    };
    println!("  {:<40} {:>5} ns/packet", cost.path, cost.median_ns);
    cost
}

pub fn median(values: &[i64]) -> i64 {
    let mut v = values.to_vec();
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

fn uplink_info(index: u32) -> UplinkInfo {
    let n = index as u8 + 1;
    UplinkInfo {
        // Loopback: any existing device will do, test runs never transmit.
        ifindex: 1,
        state: uplink_state::ACTIVE,
        addr: [100, 64, n, 2],
        src_mac: [0x02, 0xaa, 0, 0, n, 2],
        gw_mac: [0x02, 0xbb, 0, 0, n, 1],
        mtu: 1500,
        flags: 0,
        epoch: 0,
    }
}

/// lb's data plane with the default flow table, two uplinks sharing the
/// buckets 1:1 and the LAN's addresses left to the kernel.
fn dataplane() -> Result<Dataplane> {
    let mut dp = Dataplane::load_sized(DEFAULT_MAX_FLOWS, NAT_ROOM)?;
    configure(&mut dp)?;
    Ok(dp)
}

fn configure(dp: &mut Dataplane) -> Result<()> {
    dp.set_classifier(0x1234_5678, hash::mode::FIVE_TUPLE)?;
    dp.set_nat_ports(NAT_PORTS, LOCAL_PORTS)?;
    dp.add_lan(1)?;
    for i in 0..2 {
        dp.set_uplink(i, &uplink_info(i))?;
    }
    dp.add_bypass(ROUTER_LAN, 32)?;
    dp.add_bypass(Ipv4Addr::new(10, 10, 0, 0), 24)?;
    let mut weights = [0u32; MAX_UPLINKS as usize];
    weights[..2].fill(1);
    let mut t: Table = table::empty();
    table::rebalance(&mut t, &weights);
    dp.set_buckets(&t)?;
    // IPv6: the LAN carries uplink 0's prefix; uplink 1 translates.
    for i in 0..2 {
        let to = if i == 0 { LAN6 } else { ISP2_6 };
        let six = Uplink6 {
            state: uplink_state::ACTIVE,
            gw_mac: uplink_info(i).gw_mac,
            ipv6_mtu: 0,
            _pad: [0; 4],
            out: Npt::new(LAN6.octets(), to.octets(), 64).context("a translation")?,
            back: Npt::new(to.octets(), LAN6.octets(), 64).context("a translation")?,
        };
        dp.set_uplink6(i, &six)?;
    }
    dp.set_buckets6(&t)?;
    dp.set_ipv6(true)
}

/// An IPv6 flow pinned to [`REPLY_UPLINK`] (translated there): its
/// outbound frame, and a reply to it.
fn flow6_on_reply_uplink(dp: &mut Dataplane) -> Result<(Vec<u8>, Vec<u8>)> {
    let uplink = uplink_info(REPLY_UPLINK);
    for port in 5000..5200u16 {
        let frame = Udp6 {
            src_mac: CLIENT_MAC,
            dst_mac: ROUTER_LAN_MAC,
            src: CLIENT6,
            dst: SERVER6,
            src_port: port,
            dst_port: 53,
            hop_limit: 64,
        }
        .frame();
        let (verdict, out) = object::run_once(dp.xdp(program::LAN_INGRESS)?, &frame)?;
        ensure!(
            verdict == XDP_REDIRECT && out.len() >= 54,
            "lan_ingress did not forward a new IPv6 flow (verdict {verdict})"
        );
        if out[6..12] == uplink.src_mac {
            let public: [u8; 16] = out[22..38].try_into().context("an address")?;
            ensure!(
                public[..8] == ISP2_6.octets()[..8],
                "the IPv6 flow left uplink {REPLY_UPLINK} untranslated"
            );
            let reply = Udp6 {
                src_mac: uplink.gw_mac,
                dst_mac: uplink.src_mac,
                src: SERVER6,
                dst: public.into(),
                src_port: 53,
                dst_port: port,
                hop_limit: 60,
            }
            .frame();
            return Ok((frame, reply));
        }
    }
    anyhow::bail!("none of 200 IPv6 flows was pinned to uplink {REPLY_UPLINK}")
}

/// `n` rules, compiled and written by lbd's own code, that no bench frame
/// (UDP from the client to port 53) matches: each matches it in all but
/// its destination port. With `set` (a prefix file in `dir`), the last
/// one asks instead for the destination to be in it (a million prefixes,
/// none covering the frames'), so each new flow also pays a lookup in
/// that trie.
fn with_rules(
    dp: &mut Dataplane,
    dir: &std::path::Path,
    n: u32,
    set: Option<&std::path::Path>,
) -> Result<()> {
    let uplink_2 = {
        let mut w = [0u32; MAX_UPLINKS as usize];
        w[1] = 1;
        let mut t: Table = table::empty();
        table::rebalance(&mut t, &w);
        t
    };
    let policy = Policy {
        takers: lb_daemon::dataplane::takers(&uplink_2),
        ..Policy::default()
    };
    dp.set_policy(lb_daemon::dataplane::Family::V4, 1, Some(&uplink_2), policy)?;
    let mut text = String::from(
        "[[lan]]\ninterface = \"lo\"\n[[uplink]]\nname = \"a\"\ninterface = \"bench-a\"\n\
         [[uplink]]\nname = \"b\"\ninterface = \"bench-b\"\n\
         [[policy]]\nname = \"p\"\nuplinks = [\"b\"]\n",
    );
    let client_net = Ipv4Addr::from(u32::from(CLIENT) & 0xffff_ff00);
    for i in 0..n {
        text += &format!("[[rule]]\nsrc = \"{client_net}/24\"\nproto = \"udp\"\n");
        match set {
            Some(file) if i == n - 1 => text += &format!("dst_file = \"{}\"\n", file.display()),
            _ => text += &format!("dst_port = {}\n", 1000 + i),
        }
        text += "policy = \"p\"\n";
    }
    let path = dir.join("lbd.toml");
    std::fs::write(&path, text).context("writing the bench's rules")?;
    let config = config::load(&path).context("reading the bench's rules")?;
    let started = std::time::Instant::now();
    let written = Policies::default().converge(&config, dp)?;
    if set.is_some() {
        println!(
            "  ({written} prefixes written in {} ms)",
            started.elapsed().as_millis()
        );
    }
    Ok(())
}

/// [`SET_PREFIXES`] prefixes (/16 to /32, most /24) spread over the
/// address space, none covering the bench's destinations (198.18.0.0/15)
/// or the LAN: (network, length).
pub fn million_prefixes() -> Vec<(u32, u8)> {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut sets: Vec<(u32, u8)> = Vec::with_capacity(SET_PREFIXES);
    while sets.len() < SET_PREFIXES {
        // xorshift64*: reproducible, no dependency.
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let r = x.wrapping_mul(0x2545_f491_4f6c_dd1d);
        let len = match (r >> 40) % 8 {
            0 => 16 + ((r >> 44) % 8) as u8,
            1 => 25 + ((r >> 44) % 8) as u8,
            _ => 24,
        };
        let mask = u32::MAX << (32 - u32::from(len));
        let addr = (r as u32) & mask;
        let first = addr >> 24;
        if first == 0 || first == 10 || first >= 224 || addr >> 17 == 0xc612 >> 1 {
            continue;
        }
        sets.push((addr, len));
    }
    sets
}

/// Open flows from the client until one is pinned to [`REPLY_UPLINK`];
/// returns its client port and NAT port.
fn flow_on_reply_uplink(dp: &mut Dataplane) -> Result<(u16, u16)> {
    let uplink = uplink_info(REPLY_UPLINK);
    for port in 5000..5200u16 {
        let frame = Udp {
            src_mac: CLIENT_MAC,
            dst_mac: ROUTER_LAN_MAC,
            src: CLIENT,
            dst: SERVER,
            src_port: port,
            dst_port: 53,
            ttl: 64,
        }
        .frame();
        let (verdict, out) = object::run_once(dp.xdp(program::LAN_INGRESS)?, &frame)?;
        ensure!(
            verdict == XDP_REDIRECT && out.len() >= 36,
            "lan_ingress did not forward a new UDP flow (verdict {verdict})"
        );
        if out[6..12] == uplink.src_mac {
            object::check_ipv4_udp(&out).context("lan_ingress's output")?;
            return Ok((port, u16::from_be_bytes([out[34], out[35]])));
        }
    }
    anyhow::bail!("none of 200 flows was pinned to uplink {REPLY_UPLINK}")
}

/// lb's counters, summed over uplinks and CPUs.
struct Counters {
    tx_packets: u64,
    new_flows: u64,
    nat_failures: u64,
    replies: u64,
    reasons: [u64; reason::COUNT as usize],
}

impl Counters {
    fn read(dp: &Dataplane) -> Result<Counters> {
        let mut c = Counters {
            tx_packets: 0,
            new_flows: 0,
            nat_failures: 0,
            replies: 0,
            reasons: dp.reasons()?,
        };
        for i in 0..2 {
            let s = dp.uplink_stats(i)?;
            c.tx_packets += s.tx_packets;
            c.new_flows += s.new_flows;
            c.nat_failures += s.nat_failures;
            c.replies += s.replies;
        }
        Ok(c)
    }

    /// That the `n` repetitions between `before` and `self` all did what
    /// `expect` says.
    fn check(&self, before: &Counters, expect: Expect, n: u64) -> Result<()> {
        let tx = self.tx_packets - before.tx_packets;
        let new = self.new_flows - before.new_flows;
        let failed = self.nat_failures - before.nat_failures;
        let replies = self.replies - before.replies;
        match expect {
            Expect::Forwarded { new_flows } => {
                let want_new = if new_flows { n } else { 0 };
                ensure!(
                    tx == n && new == want_new && failed == 0,
                    "{n} repetitions: {tx} forwarded, {new} new flows (want {want_new}), {failed} NAT failures"
                );
            }
            Expect::Reply => {
                ensure!(
                    replies == n,
                    "{n} repetitions: {replies} replies translated"
                );
            }
            Expect::Passed(why) => {
                let passed = self.reasons[why as usize] - before.reasons[why as usize];
                ensure!(
                    passed == n,
                    "{n} repetitions: {passed} passed for reason {why}"
                );
            }
        }
        Ok(())
    }
}
