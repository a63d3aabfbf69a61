//! The traffic generator of the forwarding benchmarks (forward.rs, l3.rs,
//! scale.rs): one UDP frame per flow, from the client's eth0, on a thread
//! pinned to the router's CPU. Either way the frames reach the router's
//! lan0 as XDP frames (`ndo_xdp_xmit` from the client's end), as from a
//! NIC, and the router's work runs in softirq on that CPU.
//!
//! Two ways to make them, from one stamp (`bench_gen`'s):
//!
//! - **live**: `bench_gen` in live-frames `BPF_PROG_TEST_RUN`s, each frame
//!   stamped in the kernel and sent with `XDP_TX`: about 75 ns a frame.
//! - **tap**: where the kernel refuses live-frames test runs (some hardened
//!   builds answer `EPERM`), the frames `bench_gen` stamps are made in
//!   advance with ordinary test runs and written, one `write` each, into a
//!   tap device in the client's namespace, whose own XDP program
//!   (`bench_tap`) redirects them to the client's eth0. The
//!   generator's time per frame is a system call's, so rates are lower;
//!   the router's time per frame is the same work as with live frames.
//!   (An AF_PACKET sender would hand lan0 skbs, which veth copies into a
//!   page with XDP's headroom before any XDP program runs: a cost no NIC
//!   has, charged to every XDP way.)
//!
//! Owns the choice and the sending; the caller owns the namespace, the
//! thread's CPU and the samples around a window.

use std::{
    fs::File,
    os::fd::AsRawFd,
    sync::{
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
        Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use aya::programs::{xdp::XdpLinkId, TestRun, TestRunAttrs, TestRunOptions, Xdp, XdpMode};
use lb_tests::tun;

use super::object::{self, BenchObject};

/// Frames per live-frames test run call while warming up, and per batch
/// within a run.
pub const GEN_CHUNK: u32 = 1 << 16;
const GEN_BATCH: u32 = 64;
/// How often a write that the tap refused is tried again before the
/// window fails.
const WRITE_RETRIES: u32 = 1000;
/// Taps made so far in this process: each gets a name of its own.
static TAPS: AtomicU32 = AtomicU32::new(0);

/// How this kernel lets the benchmark make frames.
#[derive(Clone, Debug)]
pub enum Source {
    Live,
    /// Frames through a tap; the kernel refused a live-frames test run
    /// with this.
    Tap(String),
}

impl Source {
    /// Ask the kernel: one live-frames test run of `bench_sink`, which
    /// drops its one frame (nothing is sent anywhere), arriving on the
    /// loopback device.
    pub fn probe() -> Result<Source> {
        let sink = BenchObject::load(&["bench_sink"])?;
        let frame = object::Udp {
            src_mac: [2, 0, 0, 0, 0, 1],
            dst_mac: [2, 0, 0, 0, 0, 2],
            src: [10, 10, 0, 2].into(),
            dst: [198, 51, 100, 10].into(),
            src_port: 1024,
            dst_port: 9,
            ttl: 64,
        }
        .frame();
        let md = xdp_md(frame.len(), LOOPBACK);
        match live_run(
            sink.xdp("bench_sink")?,
            &frame,
            &md,
            1,
            &AtomicBool::new(false),
        ) {
            Ok(_) => Ok(Source::Live),
            Err(e) => Ok(Source::Tap(format!("{:#}", e.root_cause()))),
        }
    }

    /// One paragraph for the report: how the frames were made.
    pub fn describe(&self) -> String {
        match self {
            Source::Live => {
                "Frames: `bench_gen` in live-frames test runs, sent with `XDP_TX`.".into()
            }
            Source::Tap(why) => format!(
                "Frames: this kernel refuses live-frames test runs ({why}), so the frames \
                 `bench_gen` stamps were made in advance and written, one `write` each, \
                 into a tap device in the client's namespace, whose XDP program redirects \
                 them to the client's eth0: they reach lan0 as XDP frames, as before, but \
                 the generator's time per frame is now a system call's (its column), so \
                 every rate is lower and the ratios of rates are diluted by it. The \
                 router's time per frame is the same work as with live frames: compare \
                 ways by it."
            ),
        }
    }
}

/// The loopback device's ifindex, in every namespace.
const LOOPBACK: u32 = 1;

/// One generator: `bench_gen` with its stamp, and, for a tap, the frames
/// it stamps and the program that forwards them.
pub struct Generator {
    object: BenchObject,
    frame: Vec<u8>,
    tap: Option<TapFrames>,
    /// Frames written into a tap so far.
    sent: AtomicU64,
}

struct TapFrames {
    frames: Vec<Vec<u8>>,
    /// `bench_tap`, attached to each tap while it sends.
    forward: Mutex<BenchObject>,
}

impl Generator {
    /// `object` (`bench_gen`, stamped to make `flows` flows from `frame`)
    /// as `source` sends.
    pub fn new(object: BenchObject, frame: Vec<u8>, flows: u16, source: &Source) -> Result<Self> {
        let tap = match source {
            Source::Live => None,
            Source::Tap(_) => {
                let gen = object.xdp("bench_gen")?;
                let frames = (0..flows)
                    .map(|_| object::run_once(gen, &frame).map(|(_, out)| out))
                    .collect::<Result<Vec<_>>>()
                    .context("stamping the tap's frames")?;
                let forward = BenchObject::load(&["bench_tap"])?;
                Some(TapFrames {
                    frames,
                    forward: Mutex::new(forward),
                })
            }
        };
        Ok(Generator {
            object,
            frame,
            tap,
            sent: AtomicU64::new(0),
        })
    }

    /// Frames generated so far (stamped in the kernel, or written into a tap).
    pub fn generated(&self) -> Result<u64> {
        match self.tap {
            None => self.object.counter("SEQ"),
            Some(_) => Ok(self.sent.load(Ordering::Relaxed)),
        }
    }

    /// Send for `length`, as if from `ifindex` (the client's eth0), in
    /// the calling thread (in the client's namespace, pinned); first warm
    /// up for `warmup`, then call `before`; returns what `before` gave.
    /// A live generator sizes one test run from the warm-up's rate (each
    /// run sets up and tears down a page pool, whose teardown waits for an
    /// RCU grace period), so its window ends about `length` later.
    pub fn send_for<T>(
        &self,
        ifindex: u32,
        warmup: Duration,
        length: Duration,
        interrupted: &AtomicBool,
        before: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        let device = self.open_tap(ifindex)?;
        let rate = self.warm_up(device.as_ref(), ifindex, warmup, interrupted)?;
        let sample = before()?;
        match &device {
            None => self.live(ifindex, rate * length.as_secs_f64(), interrupted)?,
            Some(device) => {
                let end = Instant::now() + length;
                while Instant::now() < end {
                    self.tap_round(device, interrupted)?;
                }
            }
        }
        Ok(sample)
    }

    /// Send until `stopping` is set (live: one long run, which the caller
    /// ends with a signal once `stopping` is set; `margin` sizes it), in
    /// the calling thread; `started` is called after the warm-up.
    pub fn send_until(
        &self,
        ifindex: u32,
        warmup: Duration,
        margin: Duration,
        stopping: &AtomicBool,
        interrupted: &AtomicBool,
        started: impl FnOnce(),
    ) -> Result<()> {
        let device = self.open_tap(ifindex)?;
        let rate = self.warm_up(device.as_ref(), ifindex, warmup, interrupted)?;
        started();
        match &device {
            None => match self.live(ifindex, 2.0 * rate * margin.as_secs_f64(), stopping) {
                // Stopped by the caller's signal.
                Err(_) if stopping.load(Ordering::Relaxed) => Ok(()),
                other => other,
            },
            Some(device) => {
                while !stopping.load(Ordering::Relaxed) {
                    match self.tap_round(device, stopping) {
                        Err(_) if stopping.load(Ordering::Relaxed) => break,
                        other => drop(other?),
                    }
                }
                Ok(())
            }
        }
    }

    /// The tap this generator sends through, new, leading to `ifindex`;
    /// `None` for a live generator.
    fn open_tap(&self, ifindex: u32) -> Result<Option<Tap<'_>>> {
        self.tap
            .as_ref()
            .map(|tap| Tap::open(tap, ifindex))
            .transpose()
    }

    /// Send for `warmup` (through `device`, or live as if from
    /// `ifindex`); the rate it reached, frames a second.
    fn warm_up(
        &self,
        device: Option<&Tap>,
        ifindex: u32,
        warmup: Duration,
        interrupted: &AtomicBool,
    ) -> Result<f64> {
        let start = Instant::now();
        let (mut frames, mut busy_ns) = (0u64, 0u64);
        match device {
            None => {
                let gen = self.object.xdp("bench_gen")?;
                let md = xdp_md(self.frame.len(), ifindex);
                while start.elapsed() < warmup {
                    let ns = live_run(gen, &self.frame, &md, GEN_CHUNK, interrupted)?;
                    frames += u64::from(GEN_CHUNK);
                    busy_ns += ns * u64::from(GEN_CHUNK);
                }
            }
            Some(device) => {
                while start.elapsed() < warmup {
                    frames += self.tap_round(device, interrupted)?;
                }
                busy_ns = start.elapsed().as_nanos() as u64;
            }
        }
        Ok(frames as f64 * 1e9 / busy_ns.max(1) as f64)
    }

    /// One live-frames run of about `repeat` frames.
    fn live(&self, ifindex: u32, repeat: f64, interrupted: &AtomicBool) -> Result<()> {
        let gen = self.object.xdp("bench_gen")?;
        let md = xdp_md(self.frame.len(), ifindex);
        let repeat = repeat.clamp(f64::from(GEN_CHUNK), f64::from(u32::MAX)) as u32;
        live_run(gen, &self.frame, &md, repeat, interrupted).map(drop)
    }

    /// Every frame once into the tap; counted as sent.
    fn tap_round(&self, device: &Tap, interrupted: &AtomicBool) -> Result<u64> {
        if interrupted.load(Ordering::Relaxed) {
            bail!("interrupted");
        }
        for frame in &device.frames.frames {
            device.write(frame)?;
        }
        let sent = device.frames.frames.len() as u64;
        self.sent.fetch_add(sent, Ordering::Relaxed);
        Ok(sent)
    }
}

/// `struct xdp_md` for a frame of `len` bytes arriving on `ifindex`: data,
/// data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
pub fn xdp_md(len: usize, ifindex: u32) -> Vec<u8> {
    [0, len as u32, 0, ifindex, 0, 0]
        .iter()
        .flat_map(|w| w.to_ne_bytes())
        .collect()
}

/// One live-frames test run of `gen`: `repeat` frames, as if they
/// arrived on the interface in `md`, each given the program's verdict
/// (`bench_gen`: `XDP_TX`, sent back out of it). Returns the kernel's time
/// per frame, in ns.
pub fn live_run(
    gen: &Xdp,
    frame: &[u8],
    md: &[u8],
    repeat: u32,
    interrupted: &AtomicBool,
) -> Result<u64> {
    let run = gen.test_run(TestRunOptions {
        data_in: Some(frame),
        ctx_in: Some(md),
        repeat,
        attrs: TestRunAttrs::new().xdp_live_frames(GEN_BATCH),
        ..TestRunOptions::default()
    });
    match run {
        Ok(result) => Ok(result.duration.as_nanos() as u64),
        // A signal (Ctrl-C) ends the run early with EINTR.
        Err(_) if interrupted.load(Ordering::Relaxed) => bail!("interrupted"),
        Err(e) => Err(e).context("live-frames test run"),
    }
}

/// A tap device in the calling thread's namespace with `bench_tap` on it, sending whatever is written into it out of one device. It goes
/// when dropped (the program first, then the device with its file).
struct Tap<'a> {
    file: File,
    name: String,
    /// What it sends, and the program that forwards it.
    frames: &'a TapFrames,
    link: Option<XdpLinkId>,
}

impl<'a> Tap<'a> {
    /// A new tap whose frames leave by `ifindex` (the client's eth0).
    fn open(frames: &'a TapFrames, ifindex: u32) -> Result<Tap<'a>> {
        let name = format!("lbgen{}", TAPS.fetch_add(1, Ordering::Relaxed));
        let file = tun::open(
            &name,
            tun::Kind::Tap,
            tun::Options {
                nonblocking: true,
                offloads: false,
            },
        )?;
        let mut tap = Tap {
            file,
            name,
            frames,
            link: None,
        };
        set_up(&tap.name)?;
        let mut forward = frames
            .forward
            .lock()
            .map_err(|_| anyhow::anyhow!("the tap's program lock is poisoned"))?;
        // The device map resolves the ifindex in this thread's namespace.
        forward.set_port(0, ifindex)?;
        tap.link = Some(
            forward
                .xdp_mut("bench_tap")?
                .attach(&tap.name, XdpMode::Driver)
                .with_context(|| format!("attaching bench_tap to tap {}", tap.name))?,
        );
        drop(forward);
        Ok(tap)
    }

    /// Write one frame; a refused write is tried again, a bounded number
    /// of times.
    fn write(&self, frame: &[u8]) -> Result<()> {
        for _ in 0..WRITE_RETRIES {
            // SAFETY: `frame` is valid for `len` bytes through the call; the
            // kernel only reads it.
            let n =
                unsafe { libc::write(self.file.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
            if n >= 0 {
                return Ok(());
            }
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EAGAIN | libc::ENOBUFS | libc::EINTR) => std::thread::yield_now(),
                _ => {
                    return Err(e)
                        .with_context(|| format!("writing a frame into tap {}", self.name))
                }
            }
        }
        bail!("tap {} refused a frame {WRITE_RETRIES} times", self.name)
    }
}

impl Drop for Tap<'_> {
    fn drop(&mut self) {
        if let (Some(link), Ok(mut forward)) = (self.link.take(), self.frames.forward.lock()) {
            if let Ok(program) = forward.xdp_mut("bench_tap") {
                // The device goes with its file next, and the program's
                // attachment with it if this failed.
                let _ = program.detach(link);
            }
        }
    }
}

/// Set device `name` up (`SIOCSIFFLAGS`), in the calling thread's
/// namespace.
fn set_up(name: &str) -> Result<()> {
    // SAFETY: socket has no preconditions; the descriptor is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("opening a socket for SIOCSIFFLAGS");
    }
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    let socket = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: a zeroed ifreq is valid; the name fits (checked by tun::open).
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (to, from) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *to = from as libc::c_char;
    }
    // SAFETY: `req` is a valid ifreq, live for both calls.
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("reading {name}'s flags"));
    }
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: as above.
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &req) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("setting {name} up"));
    }
    Ok(())
}
