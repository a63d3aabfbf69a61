//! lbd inside a lab: write its configuration, start it in the router
//! namespace, wait (bounded) until it answers, and query it with lbctl.
//!
//! Uses the binaries cargo built for this workspace (`cargo xtask test`
//! builds them before the tests run). Never touches the host's /run/lb:
//! each daemon gets its own directory and control socket.

use std::{
    fs::File,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{ChildStderr, Command, ExitStatus, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU32, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

use crate::Lab;

/// How long lbd gets to load, attach and answer.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// Where cargo put the workspace's binaries for this profile.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("LB_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("debug")
}

/// An lbd configuration for the shipped labs, from their address plan:
/// uplink N is `ispN` on `wanN` with gateway 100.64.N.1. `{socket}` is left
/// for [`Lbd::start`] to fill in.
#[derive(Debug, Clone, Copy)]
pub struct LabConfig<'a> {
    /// More keys for `[daemon]` (e.g. `hooks = ...`).
    pub daemon: &'a str,
    /// Whole sections, e.g. `[flows]` with its keys.
    pub sections: &'a str,
    pub lans: &'a [&'a str],
    /// Uplink number and the lines to add to its `[[uplink]]` (weight,
    /// tier, `[[uplink.probe]]` tables).
    pub uplinks: &'a [(u8, &'a str)],
    /// Leave the gateways to lbd (`auto`: the DHCP lab) instead of naming
    /// 100.64.N.1.
    pub auto_gateway: bool,
}

impl Default for LabConfig<'_> {
    /// Both uplinks with their defaults, LAN lan0.
    fn default() -> Self {
        LabConfig {
            daemon: "",
            sections: "",
            lans: &["lan0"],
            uplinks: &[(1, ""), (2, "")],
            auto_gateway: false,
        }
    }
}

impl LabConfig<'_> {
    pub fn render(&self) -> String {
        // Every lbd of a test keeps its state (quotas' usage, what the
        // operator said) in its own directory, never in the host's
        // /var/lib/lb, where one test's `lbctl uplink disable` would
        // outlive it into the next.
        let state = if self.daemon.contains("state_dir") {
            ""
        } else {
            "state_dir = \"{state}\"\n"
        };
        let mut text = format!(
            "[daemon]\nsocket = \"{{socket}}\"\nbpffs = \"{{bpffs}}\"\n{state}{}\n{}\n",
            self.daemon, self.sections
        );
        for lan in self.lans {
            text += &format!("\n[[lan]]\ninterface = \"{lan}\"\n");
        }
        for (n, extra) in self.uplinks {
            let gateway = if self.auto_gateway {
                String::new()
            } else {
                format!("gateway = \"100.64.{n}.1\"\n")
            };
            text += &format!(
                "\n[[uplink]]\nname = \"isp{n}\"\ninterface = \"wan{n}\"\n{gateway}{extra}\n"
            );
        }
        text
    }
}

/// A running lbd. Stopped when the lab is torn down, or by [`Lbd::stop`];
/// its directory, and the data plane it pinned, go when this value does.
pub struct Lbd {
    pid: u32,
    dir: PathBuf,
    socket: PathBuf,
    config: PathBuf,
    /// Where it pins its data plane: one per lab, on the host's bpffs.
    bpffs: PathBuf,
    /// What the current (or last) run writes to stderr.
    stderr: Said,
}

/// What one run of lbd wrote to its stderr, read as it comes by a thread
/// that also passes each line on (to the test's output, which the harness
/// shows when the test fails), and whether lbd (and whatever inherited its
/// stderr) has closed it.
#[derive(Clone, Default)]
struct Said {
    text: Arc<Mutex<String>>,
    closed: Arc<AtomicBool>,
}

impl Said {
    /// Reads `stderr` of lbd `pid` on a thread of its own until it closes.
    fn read(stderr: ChildStderr, pid: u32) -> Said {
        let said = Said::default();
        let (text, closed) = (said.text.clone(), said.closed.clone());
        // Spawned from the caller's thread, the reader writes into the
        // same test output.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("lbd[{pid}]: {line}");
                if let Ok(mut t) = text.lock() {
                    t.push_str(&line);
                    t.push('\n');
                }
            }
            closed.store(true, Ordering::Release);
        });
        said
    }

    fn text(&self) -> String {
        self.text.lock().map(|t| t.clone()).unwrap_or_default()
    }
}

/// How a run of lbd ended when it was stopped: its exit status and what
/// it wrote to stderr in that run.
#[derive(Debug)]
pub struct Ended {
    pub status: ExitStatus,
    pub stderr: String,
    /// Whether `stderr` is all of it: the pipe closed after lbd exited
    /// (not when a child of lbd's, a hook, still holds it open).
    pub stderr_complete: bool,
}

/// A configuration for lbd in `lab`, with `{socket}`, `{bpffs}` and
/// `{state}` filled in: its socket and state directory in `dir`, and a data
/// plane pin directory of the lab's own (bpffs is shared by every
/// namespace).
pub fn fill(config: &str, lab: &Lab, dir: &Path) -> (String, PathBuf, PathBuf) {
    let socket = dir.join("lbd.sock");
    let bpffs = Path::new("/sys/fs/bpf").join(format!("{}lb", lab.prefix()));
    let text = config
        .replace("{socket}", &socket.display().to_string())
        .replace("{bpffs}", &bpffs.display().to_string())
        .replace("{state}", &dir.join("state").display().to_string());
    (text, socket, bpffs)
}

/// How long a run of lbd that is expected to end by itself (`--check`,
/// `--teardown`, a start that must be refused) gets before it counts as
/// hanging: a bound so that a regression fails a test instead of hanging
/// it, not a speed target.
pub const RUN_TIMEOUT: Duration = START_TIMEOUT;

/// How a run of lbd that ended by itself went.
#[derive(Debug)]
pub struct Ran {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Ran {
    /// Its stdout when it succeeded; else an error with its exit status
    /// and stderr.
    pub fn ok(self) -> Result<String> {
        ensure!(
            self.status.success(),
            "lbd exited with {}: {}",
            self.status,
            self.stderr.trim()
        );
        Ok(self.stdout)
    }

    /// What it said when it refused (`lbd exited with STATUS: STDERR`); an
    /// empty string when it succeeded.
    pub fn refusal(&self) -> String {
        if self.status.success() {
            String::new()
        } else {
            format!("lbd exited with {}: {}", self.status, self.stderr.trim())
        }
    }
}

/// Runs lbd with `args` in `lab`'s router (its network namespace only, so
/// with the host's bpffs, as [`Lbd::start`] does) and waits at most
/// `limit` for it to end. An lbd that still runs then is stopped
/// (SIGTERM, then SIGKILL) and the run is an error that says what it
/// printed: the test fails, it does not hang.
pub fn run_lbd(lab: &Lab, args: &[&str], limit: Duration) -> Result<Ran> {
    match run_within(lab, args, limit)? {
        Ok(ran) => Ok(ran),
        Err(said) => bail!(
            "`lbd {}` still ran after {limit:?}, so it was stopped; it said: {}",
            args.join(" "),
            said.trim()
        ),
    }
}

/// As [`run_lbd`]: `Err` (in `Ok`) with what lbd wrote to stderr when it
/// still ran after `limit` and was stopped.
fn run_within(lab: &Lab, args: &[&str], limit: Duration) -> Result<Result<Ran, String>> {
    static RUNS: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "{}run{}",
        lab.prefix(),
        RUNS.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let ran = run_into(lab, args, limit, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    ran
}

fn run_into(lab: &Lab, args: &[&str], limit: Duration, dir: &Path) -> Result<Result<Ran, String>> {
    // Its output into files: a pipe nobody reads while it runs could fill
    // and stop it.
    let (out_path, err_path) = (dir.join("stdout"), dir.join("stderr"));
    let file = |p: &Path| File::create(p).with_context(|| format!("creating {}", p.display()));
    let lbd = bin_dir().join("lbd");
    // nsenter without --fork execs lbd: the child's pid is lbd's.
    let mut child = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", lab.ns("router")?))
        .arg("--")
        .arg(&lbd)
        .args(args)
        .stdin(Stdio::null())
        .stdout(file(&out_path)?)
        .stderr(file(&err_path)?)
        .spawn()
        .with_context(|| format!("starting `{} {}`", lbd.display(), args.join(" ")))?;
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().context("waiting for lbd")? {
            break Some(status);
        }
        if Instant::now() >= deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    if status.is_none() {
        stop_started(&mut child)?;
    }
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    Ok(match status {
        Some(status) => Ok(Ran {
            status,
            stdout: read(&out_path),
            stderr: read(&err_path),
        }),
        None => Err(read(&err_path)),
    })
}

/// What `lbd --check` and lbd's start say when they refuse `config` in
/// `lab`'s router: (the check's error, the start's error); an empty string
/// where one did not refuse (see [`refusals_within`]).
pub fn refusals(lab: &Lab, config: &str) -> Result<(String, String)> {
    refusals_within(lab, config, START_TIMEOUT)
}

/// What `lbd --check` says when it refuses `config`; an empty string when
/// it accepts it. A check that has not ended after [`RUN_TIMEOUT`] is an
/// error.
pub fn check_refusal(lab: &Lab, config: &str) -> Result<String> {
    refusal(lab, config, true, RUN_TIMEOUT)
}

/// What lbd's start says when it refuses `config`; an empty string when
/// it started instead (and was stopped, and what it left in the kernel
/// removed, after [`START_TIMEOUT`]).
pub fn start_refusal(lab: &Lab, config: &str) -> Result<String> {
    refusal(lab, config, false, START_TIMEOUT)
}

/// What `lbd --check` and lbd's start say when they refuse `config`,
/// waiting no longer than `limit`: a `lbd` (or `lbd --check`) that has
/// neither refused nor finished by then counts as not refusing; a start
/// that runs is stopped (SIGTERM), and what it left in the kernel removed
/// (`lbd --teardown`, its pins). For checks that lbd may not make yet: the
/// test then fails, it does not hang.
pub fn refusals_within(lab: &Lab, config: &str, limit: Duration) -> Result<(String, String)> {
    let check = refusal(lab, config, true, limit);
    let start = refusal(lab, config, false, limit);
    Ok((check?, start?))
}

/// What lbd (`check`: `lbd --check`) says when it refuses `config`, as
/// [`refusals_within`] says.
fn refusal(lab: &Lab, config: &str, check: bool, limit: Duration) -> Result<String> {
    let dir = std::env::temp_dir().join(format!(
        "{}refused{}",
        lab.prefix(),
        if check { "check" } else { "start" }
    ));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let said = refusal_in(lab, config, check, limit, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    said
}

fn refusal_in(lab: &Lab, config: &str, check: bool, limit: Duration, dir: &Path) -> Result<String> {
    let file = dir.join("lbd.toml");
    let (text, _, bpffs) = fill(config, lab, dir);
    std::fs::write(&file, text).with_context(|| format!("writing {}", file.display()))?;
    let mut args = vec!["--config", path(&file)?];
    if check {
        args.push("--check");
    }
    let said = match run_within(lab, &args, limit)? {
        Ok(ran) => return Ok(ran.refusal()),
        Err(said) => said,
    };
    eprintln!(
        "lbd{} still ran after {limit:?}: stopped it; it said: {}",
        if check { " --check" } else { "" },
        said.trim()
    );
    if let Err(e) =
        run_lbd(lab, &["--teardown", "--config", path(&file)?], RUN_TIMEOUT).and_then(Ran::ok)
    {
        eprintln!("warning: lbd --teardown: {e:#}");
    }
    if let Err(e) = std::fs::remove_dir_all(&bpffs) {
        if e.kind() != std::io::ErrorKind::NotFound {
            eprintln!("warning: removing {}: {e}", bpffs.display());
        }
    }
    Ok(String::new())
}

/// SIGTERM to a process started by [`run_within`], a bounded wait, then
/// SIGKILL.
fn stop_started(child: &mut std::process::Child) -> Result<()> {
    let pid = libc::pid_t::try_from(child.id()).context("lbd's pid is out of range")?;
    // SAFETY: kill has no memory-safety preconditions; `pid` is our child,
    // not yet reaped, so it names that process.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if child.try_wait().context("waiting for lbd")?.is_some() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().context("killing lbd")?;
    child.wait().context("reaping lbd")?;
    Ok(())
}

impl Lbd {
    /// Start lbd in `lab`'s router with `config` (TOML) and wait until it
    /// answers `lbctl status`. A `{socket}` in `config` is replaced by this
    /// daemon's own socket path.
    pub fn start(lab: &mut Lab, config: &str) -> Result<Lbd> {
        Self::start_with_env(lab, config, &[])
    }

    /// As [`Lbd::start`], with `env` (`NAME=value`) added to lbd's
    /// environment (systemd's `NOTIFY_SOCKET`, `RUST_LOG`).
    pub fn start_with_env(lab: &mut Lab, config: &str, env: &[&str]) -> Result<Lbd> {
        let lbd = bin_dir().join("lbd");
        ensure!(
            lbd.exists(),
            "{} not found: build it first (`cargo build -p lb-daemon --bins`; `cargo xtask test` does)",
            lbd.display()
        );
        let dir = std::env::temp_dir().join(format!("{}lbd", lab.prefix()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let config_path = dir.join("lbd.toml");
        let (text, socket, bpffs) = fill(config, lab, &dir);
        std::fs::write(&config_path, text)
            .with_context(|| format!("writing {}", config_path.display()))?;
        // In the router's network namespace, with the host's bpffs: the
        // data plane it pins outlives it, as on a router.
        let mut args = vec!["env"];
        args.extend_from_slice(env);
        args.extend([path(&lbd)?, "--config", path(&config_path)?]);
        let (pid, stderr) = lab.spawn_net_only_piped("router", &args)?;
        let me = Lbd {
            pid,
            dir,
            socket,
            config: config_path,
            bpffs,
            stderr: Said::read(stderr, pid),
        };
        me.wait_answering()?;
        Ok(me)
    }

    /// Start lbd again (after [`Lbd::stop_keeping`] or [`Lbd::kill`]) with
    /// the same configuration: it adopts the data plane left pinned.
    pub fn restart(&mut self, lab: &mut Lab) -> Result<()> {
        let lbd = bin_dir().join("lbd");
        let (pid, stderr) =
            lab.spawn_net_only_piped("router", &[path(&lbd)?, "--config", path(&self.config)?])?;
        self.pid = pid;
        self.stderr = Said::read(stderr, pid);
        self.wait_answering()
    }

    /// As [`Lbd::restart`], with another configuration (an operator's
    /// change between two runs).
    pub fn restart_with(&mut self, lab: &mut Lab, config: &str) -> Result<()> {
        self.write_config(lab, config)?;
        self.restart(lab)
    }

    /// Replace the configuration file (for a reload).
    pub fn write_config(&self, lab: &Lab, config: &str) -> Result<()> {
        let (text, _, _) = fill(config, lab, &self.dir);
        std::fs::write(&self.config, text)
            .with_context(|| format!("writing {}", self.config.display()))
    }

    /// Send lbd a signal (`HUP`, ...).
    pub fn signal(&self, lab: &Lab, signal: &str) -> Result<()> {
        let pid = self.pid.to_string();
        lab.exec("router", &["kill", &format!("-{signal}"), &pid])
            .map(|_| ())
    }

    /// Stop lbd with SIGTERM, as a restart or an upgrade does: the data
    /// plane keeps forwarding.
    pub fn stop_keeping(&self, lab: &mut Lab) -> Result<()> {
        let ended = self.stop_with(lab, libc::SIGTERM)?;
        ensure!(
            ended.status.success(),
            "lbd exited with {}; it said: {}",
            ended.status,
            ended.stderr.trim()
        );
        Ok(())
    }

    /// Stop lbd with `signal` (SIGTERM as systemd does, SIGINT as Ctrl-C
    /// does) and return how it ended; the data plane stays. Bounded: an
    /// lbd that has not exited after the lab's grace period is killed
    /// (its status then says SIGKILL), and its stderr is waited for a
    /// bounded while only (see [`Ended::stderr_complete`]).
    pub fn stop_with(&self, lab: &mut Lab, signal: libc::c_int) -> Result<Ended> {
        let status = lab.stop_with(self.pid, signal)?;
        let closed = crate::stream::wait_for(
            "lbd's stderr to close after it exited",
            Duration::from_secs(5),
            || Ok(self.stderr.closed.load(Ordering::Acquire)),
        );
        Ok(Ended {
            status,
            stderr: self.stderr.text(),
            stderr_complete: closed.is_ok(),
        })
    }

    /// What lbd wrote to stderr so far in its current (or last) run.
    pub fn stderr(&self) -> String {
        self.stderr.text()
    }

    /// Kill lbd (SIGKILL), as a crash or the OOM killer does.
    pub fn kill(&self, lab: &mut Lab) -> Result<()> {
        let pid = self.pid.to_string();
        lab.exec("router", &["kill", "-KILL", &pid])?;
        let _ = lab.stop(self.pid);
        Ok(())
    }

    /// `lbd --teardown` with this daemon's configuration (bounded: see
    /// [`run_lbd`]); its stdout.
    pub fn teardown(&self, lab: &Lab) -> Result<String> {
        self.run_teardown(lab)?.ok().context("lbd --teardown")
    }

    /// `lbd --teardown` with this daemon's configuration, however it ends.
    pub fn run_teardown(&self, lab: &Lab) -> Result<Ran> {
        run_lbd(
            lab,
            &["--teardown", "--config", path(&self.config)?],
            RUN_TIMEOUT,
        )
    }

    fn wait_answering(&self) -> Result<()> {
        let me = self;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match me.lbctl(&["status", "--json"]) {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    return Err(e.context(format!("lbd did not answer within {START_TIMEOUT:?}")))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// Where it pins its data plane.
    pub fn bpffs(&self) -> &Path {
        &self.bpffs
    }

    /// lbctl against this daemon, to its end.
    fn run_lbctl(&self, args: &[&str]) -> Result<std::process::Output> {
        Command::new(bin_dir().join("lbctl"))
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .context("running lbctl")
    }

    /// Run lbctl against this daemon; its stdout on success.
    pub fn lbctl(&self, args: &[&str]) -> Result<String> {
        let out = self.run_lbctl(args)?;
        if !out.status.success() {
            bail!(
                "lbctl {} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// lbctl against this daemon, which must refuse: its exit code and
    /// what it said on stderr.
    pub fn lbctl_refused(&self, args: &[&str]) -> Result<(i32, String)> {
        let out = self.run_lbctl(args)?;
        ensure!(
            !out.status.success(),
            "lbctl {} was accepted: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout).trim()
        );
        let code = out.status.code().with_context(|| {
            format!("lbctl {} ended by a signal: {}", args.join(" "), out.status)
        })?;
        Ok((code, String::from_utf8_lossy(&out.stderr).into_owned()))
    }

    /// Start lbctl against this daemon and leave it running (`events
    /// --follow`), its stdout piped.
    pub fn lbctl_spawn(&self, args: &[&str]) -> Result<std::process::Child> {
        Command::new(bin_dir().join("lbctl"))
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .context("starting lbctl")
    }

    /// `lbctl status --json`, parsed.
    pub fn status(&self) -> Result<Value> {
        let text = self.lbctl(&["status", "--json"])?;
        serde_json::from_str(&text).context("parsing lbctl status --json")
    }

    /// A counter of uplink `name` from `lbctl status --json`.
    pub fn uplink_counter(&self, name: &str, counter: &str) -> Result<u64> {
        let status = self.status()?;
        let uplinks = status["uplinks"]
            .as_array()
            .context("no uplinks in status")?;
        let uplink = uplinks
            .iter()
            .find(|u| u["name"] == name)
            .with_context(|| format!("uplink {name} not in status"))?;
        uplink[counter]
            .as_u64()
            .with_context(|| format!("uplink {name} has no counter {counter}"))
    }

    /// How many packets the data plane gave to the kernel or dropped for
    /// `reason` (a name such as `pass_no_mapping`), from `lbctl status --json`.
    pub fn reason(&self, reason: &str) -> Result<u64> {
        let status = self.status()?;
        let reasons = status["reasons"]
            .as_array()
            .context("no reasons in status")?;
        reasons
            .iter()
            .find(|r| r[0] == reason)
            .and_then(|r| r[1].as_u64())
            .with_context(|| format!("reason {reason} not in status: {}", status["reasons"]))
    }

    /// When the data plane got uplink `name`'s current state, if lbd
    /// changed it since it started (`last_change` in `lbctl status`).
    pub fn changed_at(&self, name: &str) -> Result<Option<Instant>> {
        let status = self.status()?;
        let uplink = status["uplinks"]
            .as_array()
            .and_then(|u| u.iter().find(|u| u["name"] == name))
            .with_context(|| format!("uplink {name} not in status"))?;
        Ok(uplink["last_change"]["applied_monotonic_ns"]
            .as_u64()
            .map(crate::stream::instant_of_monotonic_ns))
    }

    /// Uplink `name`'s entry in `lbctl status --json`.
    pub fn uplink(&self, name: &str) -> Result<Value> {
        let status = self.status()?;
        status["uplinks"]
            .as_array()
            .and_then(|u| u.iter().find(|u| u["name"] == name))
            .cloned()
            .with_context(|| format!("uplink {name} not in status"))
    }

    /// Wait until uplink `name`'s lifecycle is `lifecycle` (as `lbctl
    /// status` says it), at most `limit`; how long it took.
    pub fn wait_lifecycle(&self, name: &str, lifecycle: &str, limit: Duration) -> Result<Duration> {
        let start = Instant::now();
        let mut last = Value::Null;
        while start.elapsed() < limit {
            last = self.uplink(name)?;
            if last["lifecycle"] == lifecycle {
                return Ok(start.elapsed());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!(
            "uplink {name} not {lifecycle} after {limit:?}: {} ({})",
            last["lifecycle"],
            last["reason"]
        )
    }

    /// Wait until lbd has run `rounds` rounds in a row that changed no
    /// route and no rule, at most `limit`: lbd and the kernel agree on
    /// what lbd owns. A route or rule that lbd reads back as other than
    /// it made it is removed and added again round after round, and this
    /// fails, with the counts.
    pub fn wait_steady(&self, rounds: u64, limit: Duration) -> Result<()> {
        let read = || -> Result<(u64, u64)> {
            let status = self.status()?;
            let count = |key: &str| {
                status[key]
                    .as_u64()
                    .with_context(|| format!("no {key} in lbctl status"))
            };
            Ok((count("rounds")?, count("routing_changes")?))
        };
        let start = Instant::now();
        let first = read()?;
        let mut since = first;
        let mut last = since;
        while start.elapsed() < limit {
            last = read()?;
            if last.1 != since.1 {
                since = last;
            } else if last.0 >= since.0 + rounds {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        ensure!(
            last.0 > first.0,
            "lbd completed no round in {limit:?} ({} so far): its log says why",
            last.0
        );
        bail!(
            "lbd changed routes or rules within every {rounds} rounds for {limit:?}: {} changes \
             in {} rounds so far (`ip monitor rule route` in the router shows which)",
            last.1,
            last.0
        )
    }

    /// Stop the daemon (SIGTERM, then SIGKILL after a grace period), and
    /// remove everything it left in the kernel (`lbd --teardown`).
    pub fn stop(self, lab: &mut Lab) -> Result<()> {
        // Dropping `self` removes its directory.
        self.stop_keeping(lab)?;
        self.teardown(lab)?;
        Ok(())
    }
}

impl Drop for Lbd {
    /// Removes the daemon's directory (config and socket), also when a test
    /// fails before [`Lbd::stop`]; the lab stops the process itself.
    fn drop(&mut self) {
        // The pinned data plane, if a failed test left it: unpinning its
        // links detaches its programs.
        if let Err(e) = std::fs::remove_dir_all(&self.bpffs) {
            if e.kind() != std::io::ErrorKind::NotFound {
                eprintln!("warning: removing {}: {e}", self.bpffs.display());
            }
        }
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                eprintln!("warning: removing {}: {e}", self.dir.display());
            }
        }
    }
}

fn path(p: &Path) -> Result<&str> {
    p.to_str()
        .with_context(|| format!("path {} is not UTF-8", p.display()))
}
