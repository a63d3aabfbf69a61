//! Many clients, as a traffic generator tests a router: [`CLIENTS`] client
//! addresses (a /16 routed to the LAN side) opening [`FLOWS`] flows through
//! lbd, as fast as they can be offered, and what lb made of them: the new
//! flows per second it took, the spread over the uplinks against their
//! weights, NAT failures, every flow's translation checked, and the flow
//! tables' memory against what the README states.
//!
//! The lab is forward.rs's rig (static neighbours, `bench_sink` counting
//! and dropping on each ISP's down0) with lbd configured for the load: a
//! flow table of [`MAX_FLOWS`] entries, uplink weights [`WEIGHTS`], no
//! probes (the sinks drop them). The router routes [`CLIENT_NET`] to the
//! client host, as a router routes a downstream LAN.
//!
//! Generator: `bench_gen` can vary only a flow's source port and the low
//! half of its destination, not its source address; so the clients' first
//! datagrams are built here, one distinct UDP datagram per flow (a client's
//! flows from distinct ephemeral ports, to [`SERVERS`] server endpoints),
//! and sent as raw frames on the client's eth0 from an AF_PACKET socket
//! (`sendmmsg`, qdisc bypassed) by a thread pinned to one CPU. Each frame
//! opens one flow; the router's work (lb's new-flow path: classifier,
//! bucket, NAT port, both tables, redirect) runs in softirq on the same CPU
//! right after each send, so the generator is paced by the router and
//! never outruns it: the rate is what generator and router together
//! sustain on one CPU, and the router's softirq time per new flow says
//! what lb alone costs (1e9 / that is its rate with a CPU to itself).
//!
//! Every round starts lbd afresh (an empty table), opens all the flows
//! once, and checks the tables: every flow in `FLOWS` must have its reverse
//! entry in `NAT_REV` leading back to its own client address and port on
//! its own uplink, with a NAT port that is the client's own or in lbd's
//! range. A flow translated wrongly fails the benchmark; figures never do.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    os::fd::{AsFd, AsRawFd},
    path::Path,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use aya::maps::{Array, HashMap, Map, MapData};
use lb_common::maps::{name, FlowKey, FlowValue, NatKey, NatValue, UplinkInfo};
use lb_daemon::dataplane::pins::Pins;
use lb_tests::{
    daemon::{LabConfig, Lbd},
    in_netns, Lab, LabDesc,
};

use super::{
    forward::{generator_thread, mac, Rig, Sample, Window},
    gen::Source,
    object::Udp,
    Args,
};

const PREFIX: &str = "lbc-";
const LAB: &str = "default";
/// Client addresses, and the flows they open.
pub const CLIENTS: u32 = 60_000;
pub const FLOWS: u32 = 200_000;
/// The clients' network, routed by the router to the client host.
const CLIENT_NET: &str = "10.20.0.0/16";
const CLIENT_BASE: Ipv4Addr = Ipv4Addr::new(10, 20, 0, 0);
const CLIENT_HOST: &str = "10.10.0.2";
/// Server endpoints: addresses in two documentation ranges, each with two
/// ports (QUIC and DNS), none of them routed by the router but by default.
const SERVER_ADDRS: u32 = 500;
const SERVER_PORTS: [u16; 2] = [443, 53];
pub const SERVERS: u32 = SERVER_ADDRS * SERVER_PORTS.len() as u32;
/// The clients' ephemeral ports (Linux's default `ip_local_port_range`).
const EPHEMERAL: (u16, u16) = (32_768, 60_999);
/// lbd's flow table, room for all the flows; and its NAT range (lbd's
/// default, said here to check the translations against).
pub const MAX_FLOWS: u32 = 1 << 18;
const NAT_RANGE: (u16, u16) = (20_000, 29_999);
/// Uplink weights, isp1 and isp2.
pub const WEIGHTS: [u32; 2] = [3, 1];
/// Frames per `sendmmsg`.
const BATCH: usize = 256;
/// After the last frame, before the counters are read: the router has
/// forwarded what it took by then.
const SETTLE: Duration = Duration::from_millis(300);
/// How long lbd gets to put both uplinks in service.
const READY: Duration = Duration::from_secs(10);
/// The README's figure: bytes of kernel memory per flow (both tables).
pub const README_BYTES_PER_FLOW: u64 = 180;

/// One round: lbd started afresh, every flow opened once.
#[derive(Clone, Debug)]
pub struct Round {
    /// Generator and router on one CPU: the sinks' rate, router and
    /// generator time per new flow.
    pub window: Window,
    /// The same frames sent again, each now of a flow lb knows: the path's
    /// cost without the new-flow work.
    pub established: Window,
    /// Frames sent, and how long sending them took.
    pub sent: u64,
    pub sending: Duration,
    /// Flows in lb's table afterwards, per uplink (in `WEIGHTS` order).
    pub flows: [u64; 2],
    /// New flows lb counted, NAT failures per uplink, and packets dropped
    /// with `drop_nat_exhausted`.
    pub new_flows: u64,
    pub nat_failures: u64,
    pub nat_exhausted: u64,
    /// Flows whose source port had to change (the client's was taken).
    pub ports_changed: u64,
}

/// What this part measured.
pub struct Clients {
    pub cpu: usize,
    pub rounds: Vec<Round>,
    /// Kernel memory of `FLOWS` and `NAT_REV` (memlock), bytes, for
    /// [`MAX_FLOWS`] entries each.
    pub flows_bytes: u64,
    pub nat_bytes: u64,
}

pub fn measure(args: &Args, cpu: usize, interrupted: &AtomicBool) -> Result<Clients> {
    Lab::down(PREFIX)?;
    let desc = LabDesc::shipped(LAB).with_context(|| format!("loading lab {LAB}"))?;
    let mut lab = Lab::up(&desc, PREFIX)?;
    lab.exec(
        "router",
        &["ip", "route", "add", CLIENT_NET, "via", CLIENT_HOST],
    )
    .with_context(|| format!("routing {CLIENT_NET} to the client"))?;
    let frames = frames(&lab)?;
    let eth0 = super::forward::ifindex(&lab, "client", "eth0")?;
    // The rig's own generators are not used here: no live run is made.
    let rig = Rig::new(&mut lab, args.flows, cpu, &Source::Live)?;
    let uplinks = format!("[flows]\nmax = {MAX_FLOWS}");
    let weights = WEIGHTS.map(|w| format!("weight = {w}"));
    let config = LabConfig {
        sections: &uplinks,
        uplinks: &[(1, &weights[0]), (2, &weights[1])],
        ..LabConfig::default()
    }
    .render();
    let mut rounds = Vec::new();
    let mut memory = (0, 0);
    for round in 1..=args.runs {
        ensure!(!interrupted.load(Ordering::Relaxed), "interrupted");
        let lbd = Lbd::start(rig.lab, &config)?;
        let measured = open_all(&rig, &lbd, &frames, eth0, cpu)
            .and_then(|r| Ok((r, table_memory(lbd.bpffs())?)));
        let stopped = lbd.stop(rig.lab);
        let (r, bytes) = measured.with_context(|| format!("round {round}"))?;
        stopped?;
        println!(
            "  round {round}/{}: {} new flows in {:.3} s: {:.0} flows/s; isp1 {:.1} %, \
             NAT failures {}, router {:.0} ns per new flow",
            args.runs,
            r.sent,
            r.sending.as_secs_f64(),
            r.rate(),
            100.0 * share(&r.flows, 0),
            r.nat_failures,
            r.window.softirq_ns
        );
        rounds.push(r);
        memory = bytes;
    }
    drop(rig);
    drop(lab);
    Ok(Clients {
        cpu,
        rounds,
        flows_bytes: memory.0,
        nat_bytes: memory.1,
    })
}

impl Round {
    /// New flows per second: frames sent (each a new flow) over the time
    /// sending them took, the router's work on each included.
    pub fn rate(&self) -> f64 {
        self.sent as f64 / self.sending.as_secs_f64().max(1e-9)
    }
}

/// Share of uplink `n` in `flows`.
fn share(flows: &[u64; 2], n: usize) -> f64 {
    flows[n] as f64 / flows.iter().sum::<u64>().max(1) as f64
}

/// Flow `f`: client `f % CLIENTS` (10.20.0.1 on), from an ephemeral port
/// of its own for each of its flows, to server endpoint `f % SERVERS`.
fn flow(f: u32) -> (Ipv4Addr, u16, Ipv4Addr, u16) {
    let client = f % CLIENTS;
    let nth = f / CLIENTS;
    let span = u32::from(EPHEMERAL.1 - EPHEMERAL.0) + 1;
    // Distinct for a client's flows (nth < 4, 7919 * 3 < span), spread
    // over the range across clients, as real clients' ports are.
    let port = EPHEMERAL.0 + ((nth * 7919 + client * 13) % span) as u16;
    let src = Ipv4Addr::from(u32::from(CLIENT_BASE) + 1 + client);
    let server = f % SERVERS;
    let addr = server % SERVER_ADDRS;
    let dst = if addr < SERVER_ADDRS / 2 {
        Ipv4Addr::new(198, 51, 100, 1 + addr as u8)
    } else {
        Ipv4Addr::new(203, 0, 113, 1 + (addr - SERVER_ADDRS / 2) as u8)
    };
    let dport = SERVER_PORTS[(server / SERVER_ADDRS) as usize];
    (src, port, dst, dport)
}

/// Every flow's first datagram, as a frame from the client to the router.
fn frames(lab: &Lab) -> Result<Vec<Vec<u8>>> {
    const _: () = assert!(CLIENTS < 65_534 && SERVER_ADDRS / 2 < 255);
    const _: () = assert!(FLOWS / CLIENTS < 4);
    let (eth0, lan0) = (mac(lab, "client", "eth0")?, mac(lab, "router", "lan0")?);
    Ok((0..FLOWS)
        .map(|f| {
            let (src, src_port, dst, dst_port) = flow(f);
            Udp {
                src_mac: eth0,
                dst_mac: lan0,
                src,
                dst,
                src_port,
                dst_port,
                ttl: 64,
            }
            .frame()
        })
        .collect())
}

/// Wait for lbd, open every flow once, and check what lb made of them.
fn open_all(rig: &Rig, lbd: &Lbd, frames: &[Vec<u8>], eth0: u32, cpu: usize) -> Result<Round> {
    for n in 1..=2 {
        lbd.wait_lifecycle(&format!("isp{n}"), "in service", READY)?;
    }
    let (before, sent, sending) = send_all(rig, frames, eth0, cpu)?;
    std::thread::sleep(SETTLE);
    let after = rig.sample(&[])?;
    let window = after.since_on(&before, &[cpu])?;
    let tables = check_tables(lbd)?;
    // The same frames again: now every one is a packet of a flow lb knows,
    // on the same path (the raw socket, veth, lan0's XDP, the redirect).
    let (before, _, _) = send_all(rig, frames, eth0, cpu)?;
    std::thread::sleep(SETTLE);
    let established = rig.sample(&[])?.since_on(&before, &[cpu])?;
    let status = lbd.status()?;
    let mut new_flows = 0;
    let mut nat_failures = 0;
    for uplink in status["uplinks"]
        .as_array()
        .context("no uplinks in status")?
    {
        new_flows += uplink["new_flows"].as_u64().context("no new_flows")?;
        nat_failures += uplink["nat_failures"].as_u64().context("no nat_failures")?;
    }
    Ok(Round {
        window,
        established,
        sent,
        sending,
        flows: tables.flows,
        new_flows,
        nat_failures,
        nat_exhausted: lbd.reason("drop_nat_exhausted")?,
        ports_changed: tables.ports_changed,
    })
}

/// Send every frame once from the client's eth0 on `cpu`: the sample
/// before, frames sent, and how long sending them took.
fn send_all(
    rig: &Rig,
    frames: &[Vec<u8>],
    eth0: u32,
    cpu: usize,
) -> Result<(Sample, u64, Duration)> {
    in_netns(rig.lab.ns("client")?, || {
        generator_thread(cpu)?;
        let socket = RawSocket::bound(eth0)?;
        let before = rig.sample(&[])?;
        let started = Instant::now();
        let sent = socket.send_all(frames)?;
        Ok((before, sent, started.elapsed()))
    })
}

/// What the tables hold, checked.
struct Tables {
    flows: [u64; 2],
    ports_changed: u64,
}

/// Every flow of ours in `FLOWS`, and its translation through `NAT_REV`:
/// back to its own client address and port, on its own uplink, with a NAT
/// port that is the client's own or within lbd's range. Anything else is
/// a mis-translation, and an error.
fn check_tables(lbd: &Lbd) -> Result<Tables> {
    let pins = Pins::new(lbd.bpffs());
    let flows: HashMap<MapData, FlowKey, FlowValue> =
        HashMap::try_from(Map::HashMap(open(&pins, name::FLOWS)?)).context("FLOWS")?;
    let nat: HashMap<MapData, NatKey, NatValue> =
        HashMap::try_from(Map::HashMap(open(&pins, name::NAT_REV)?)).context("NAT_REV")?;
    let uplinks: Array<MapData, UplinkInfo> =
        Array::try_from(Map::Array(open(&pins, name::UPLINKS)?)).context("UPLINKS")?;
    // The uplinks by the data plane's index: isp1 is 100.64.1.2, isp2 .2.2.
    let mut slot = BTreeMap::new();
    for index in 0..uplinks.len() {
        let info = uplinks.get(&index, 0).context("reading UPLINKS")?;
        for n in 0..2u8 {
            if info.addr == [100, 64, n + 1, 2] {
                slot.insert(index, usize::from(n));
            }
        }
    }
    ensure!(slot.len() == 2, "UPLINKS has no entries for isp1 and isp2");
    let client_net = u32::from(CLIENT_BASE) >> 16;
    let (mut counts, mut ports_changed) = ([0u64; 2], 0);
    for entry in flows.iter() {
        let (key, value) = entry.context("walking FLOWS")?;
        if u32::from(Ipv4Addr::from(key.src_addr)) >> 16 != client_net {
            continue;
        }
        let client = format!(
            "{}:{} -> {}:{}",
            Ipv4Addr::from(key.src_addr),
            u16::from_be_bytes(key.src_port),
            Ipv4Addr::from(key.dst_addr),
            u16::from_be_bytes(key.dst_port)
        );
        let n = *slot
            .get(&value.uplink)
            .with_context(|| format!("flow {client} on uplink {} of none", value.uplink))?;
        let nat_port = u16::from_be_bytes(value.nat_port);
        if value.nat_port != key.src_port {
            ensure!(
                (NAT_RANGE.0..=NAT_RANGE.1).contains(&nat_port),
                "flow {client} translated to port {nat_port}, outside {}-{}",
                NAT_RANGE.0,
                NAT_RANGE.1
            );
            ports_changed += 1;
        }
        let reverse = NatKey {
            nat_addr: [100, 64, n as u8 + 1, 2],
            remote_addr: key.dst_addr,
            nat_port: value.nat_port,
            remote_port: key.dst_port,
            proto: key.proto,
            _pad: [0; 3],
        };
        let back = nat.get(&reverse, 0).with_context(|| {
            format!(
                "flow {client} (port {nat_port} on isp{}) has no reverse entry",
                n + 1
            )
        })?;
        ensure!(
            back.client_addr == key.src_addr
                && back.client_port == key.src_port
                && back.uplink == value.uplink,
            "flow {client} on isp{} port {nat_port}: replies would go to {}:{}",
            n + 1,
            Ipv4Addr::from(back.client_addr),
            u16::from_be_bytes(back.client_port)
        );
        counts[n] += 1;
    }
    Ok(Tables {
        flows: counts,
        ports_changed,
    })
}

fn open(pins: &Pins, map: &str) -> Result<MapData> {
    let path = pins.map(map);
    MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))
}

/// Kernel memory (memlock, from fdinfo) of `FLOWS` and `NAT_REV`.
fn table_memory(bpffs: &Path) -> Result<(u64, u64)> {
    let pins = Pins::new(bpffs);
    let memlock = |map: &str| -> Result<u64> {
        let data = open(&pins, map)?;
        let fd = data.fd().as_fd().as_raw_fd();
        let path = format!("/proc/self/fdinfo/{fd}");
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        text.lines()
            .find_map(|l| l.strip_prefix("memlock:"))
            .and_then(|v| v.trim().parse().ok())
            .with_context(|| format!("no memlock in {path} (map {map})"))
    };
    Ok((memlock(name::FLOWS)?, memlock(name::NAT_REV)?))
}

/// An AF_PACKET socket that sends whole frames on one interface, past its
/// qdisc.
struct RawSocket {
    fd: std::os::fd::OwnedFd,
}

impl RawSocket {
    fn bound(ifindex: u32) -> Result<RawSocket> {
        // SAFETY: socket has no preconditions; a valid descriptor is owned
        // from here on.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("opening an AF_PACKET socket");
        }
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        // SAFETY: a zeroed sockaddr_ll is valid; bind reads `len` bytes of it.
        let rc = unsafe {
            let mut addr: libc::sockaddr_ll = std::mem::zeroed();
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_ifindex = ifindex as i32;
            libc::bind(
                fd.as_raw_fd(),
                std::ptr::addr_of!(addr).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("binding an AF_PACKET socket to ifindex {ifindex}"));
        }
        let one: libc::c_int = 1;
        // SAFETY: the option value is a c_int that lives through the call.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_QDISC_BYPASS,
                std::ptr::addr_of!(one).cast(),
                std::mem::size_of::<libc::c_int>() as u32,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("PACKET_QDISC_BYPASS");
        }
        Ok(RawSocket { fd })
    }

    /// Send every frame once, [`BATCH`] at a time; returns how many went.
    fn send_all(&self, frames: &[Vec<u8>]) -> Result<u64> {
        let mut sent = 0u64;
        for batch in frames.chunks(BATCH) {
            let mut iovs: Vec<libc::iovec> = batch
                .iter()
                .map(|f| libc::iovec {
                    iov_base: f.as_ptr() as *mut libc::c_void,
                    iov_len: f.len(),
                })
                .collect();
            let mut msgs: Vec<libc::mmsghdr> = iovs
                .iter_mut()
                .map(|iov| {
                    // SAFETY: a zeroed mmsghdr is valid (no name, no control).
                    let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                    m.msg_hdr.msg_iov = iov;
                    m.msg_hdr.msg_iovlen = 1;
                    m
                })
                .collect();
            let mut done = 0;
            let mut refusals = 0;
            while done < msgs.len() {
                let rest = &mut msgs[done..];
                // SAFETY: `rest` points at valid mmsghdrs whose iovecs point
                // at frames that outlive the call; the kernel only reads them.
                let n = unsafe {
                    libc::sendmmsg(self.fd.as_raw_fd(), rest.as_mut_ptr(), rest.len() as u32, 0)
                };
                if n < 0 {
                    let e = std::io::Error::last_os_error();
                    match e.raw_os_error() {
                        // The device is busy: try again, a bounded number of times.
                        Some(libc::ENOBUFS | libc::EAGAIN | libc::EINTR) if refusals < 1000 => {
                            refusals += 1;
                            std::thread::yield_now();
                            continue;
                        }
                        _ => return Err(e).context("sendmmsg on the client's eth0"),
                    }
                }
                done += n as usize;
            }
            sent += done as u64;
        }
        if sent != frames.len() as u64 {
            bail!("sent {sent} of {} frames", frames.len());
        }
        Ok(sent)
    }
}

impl Clients {
    /// The section of the report: the table and what it means.
    pub fn markdown(&self, md: &mut String) {
        use std::fmt::Write as _;

        let median = |figure: &dyn Fn(&Round) -> f64| {
            let mut v: Vec<f64> = self.rounds.iter().map(figure).collect();
            v.sort_by(f64::total_cmp);
            v.get(v.len() / 2).copied().unwrap_or(0.0)
        };
        let total: u32 = WEIGHTS.iter().sum();
        let wanted = |n: usize| 100.0 * f64::from(WEIGHTS[n]) / f64::from(total);
        let _ = write!(
            md,
            "## Many clients\n\n\
             {clients} client addresses in {net} (routed by the router to the client\n\
             host) open {flows} UDP flows through lbd (`[flows] max = {max}`, weights\n\
             isp1 {w1} : isp2 {w2}, NAT range {n0}-{n1}), one datagram each, to {servers}\n\
             server endpoints, each client from ephemeral ports of its own. `bench_gen`\n\
             cannot vary a source address, so the frames are built in advance and sent\n\
             raw (AF_PACKET, `sendmmsg`, qdisc bypassed) from the client's eth0 by a\n\
             thread pinned to CPU {cpu}; the router's work runs in softirq on that CPU\n\
             after each send, so the generator is paced by lb and never outruns it: the\n\
             rate is what generator and router together sustain on one CPU, and 1e9 /\n\
             router ns is lb's rate with the CPU to itself. Each of {runs} rounds starts lbd\n\
             afresh (an empty table); every flow's translation is checked in the\n\
             tables (its `NAT_REV` entry leads back to its own client address and port\n\
             on its own uplink, its NAT port is the client's own or in the range).\n\
             \"Ports changed\": flows whose NAT port is not the client's; the clients'\n\
             ephemeral ports lie in the router's own `ip_local_port_range`, which lb\n\
             never keeps (the router's sockets could take them), so every flow takes a\n\
             port of the NAT range: {range_size} per uplink and server endpoint.\n\n\
             | round | new flows/s | router ns/new flow | router ns/packet of a known flow | generator ns/new flow | flows held / lb's new flows | isp1 (want {p1:.1} %) | isp2 (want {p2:.1} %) | ports changed | NAT failures | drop_nat_exhausted |\n\
             | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
            clients = CLIENTS,
            net = CLIENT_NET,
            flows = FLOWS,
            max = MAX_FLOWS,
            w1 = WEIGHTS[0],
            w2 = WEIGHTS[1],
            n0 = NAT_RANGE.0,
            n1 = NAT_RANGE.1,
            servers = SERVERS,
            cpu = self.cpu,
            runs = self.rounds.len(),
            p1 = wanted(0),
            p2 = wanted(1),
            range_size = NAT_RANGE.1 - NAT_RANGE.0 + 1,
        );
        for (i, r) in self.rounds.iter().enumerate() {
            let _ = writeln!(
                md,
                "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {} / {} | {:.2} % | {:.2} % | {} | {} | {} |",
                i + 1,
                r.rate(),
                r.window.softirq_ns,
                r.established.softirq_ns,
                r.window.system_ns,
                r.flows.iter().sum::<u64>(),
                r.new_flows,
                100.0 * share(&r.flows, 0),
                100.0 * share(&r.flows, 1),
                r.ports_changed,
                r.nat_failures,
                r.nat_exhausted,
            );
        }
        let off = median(&|r| (100.0 * share(&r.flows, 0) - wanted(0)).abs());
        let router_ns = median(&|r| r.window.softirq_ns);
        let known_ns = median(&|r| r.established.softirq_ns);
        let per_flow = (self.flows_bytes + self.nat_bytes) as f64 / f64::from(MAX_FLOWS);
        let _ = write!(
            md,
            "\nMedian: {rate:.0} new flows/s with generator and router on one CPU; lb's\n\
             own {router_ns:.0} ns per new flow is {alone:.0} new flows/s with a CPU to itself.\n\
             The same frames sent again (each now a packet of a flow lb knows, the\n\
             same path: raw socket, veth's copy of an skb into an XDP frame, lb,\n\
             the redirect, the sink) cost the router {known_ns:.0} ns: opening a flow\n\
             costs lb about {extra:.0} ns more than forwarding a packet of one.\n\
             Spread: {off:.2} points from the weights (target: within 2). Memory: `FLOWS`\n\
             {fm:.1} MiB and `NAT_REV` {nm:.1} MiB of kernel memory (memlock) for {max}\n\
             entries each, {per_flow:.0} bytes per flow of the table's size, allocated\n\
             whether used or not; the README states about {readme} bytes per flow.\n\n",
            rate = median(&Round::rate),
            alone = 1e9 / router_ns.max(1.0),
            extra = router_ns - known_ns,
            fm = self.flows_bytes as f64 / 1048576.0,
            nm = self.nat_bytes as f64 / 1048576.0,
            max = MAX_FLOWS,
            readme = README_BYTES_PER_FLOW,
        );
    }
}
