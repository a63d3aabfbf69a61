//! lbd inside a lab: write its configuration, start it in the router
//! namespace, wait (bounded) until it answers, and query it with lbctl.
//!
//! Uses the binaries cargo built for this workspace (`cargo xtask test`
//! builds them before the tests run). Never touches the host's /run/lb:
//! each daemon gets its own directory and control socket.

use std::{
    path::{Path, PathBuf},
    process::Command,
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
        let mut text = format!(
            "[daemon]\nsocket = \"{{socket}}\"\nbpffs = \"{{bpffs}}\"\n{}\n{}\n",
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

/// What `lbd --check` and lbd's start say when they refuse `config` in
/// `lab`'s router: (the check's error, the start's error); an empty string
/// where one did not refuse (see [`refusals_within`]).
pub fn refusals(lab: &Lab, config: &str) -> Result<(String, String)> {
    refusals_within(lab, config, START_TIMEOUT)
}

/// What `lbd --check` and lbd's start say when they refuse `config`,
/// waiting no longer than `limit`: a `lbd` (or `lbd --check`) that has
/// neither refused nor finished by then counts as not refusing; a start that runs is stopped (SIGTERM), and what it left in
/// the kernel removed (`lbd --teardown`, its pins). For checks that lbd
/// may not make yet: the test then fails, it does not hang.
pub fn refusals_within(lab: &Lab, config: &str, limit: Duration) -> Result<(String, String)> {
    let dir = std::env::temp_dir().join(format!("{}refused", lab.prefix()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let file = dir.join("lbd.toml");
    let (text, _, bpffs) = fill(config, lab, &dir);
    std::fs::write(&file, text).with_context(|| format!("writing {}", file.display()))?;
    let lbd = bin_dir().join("lbd");
    let netns = format!("--net=/run/netns/{}", lab.ns("router")?);
    let refusal = |check: bool| -> Result<String> {
        // Its stderr into a file: a pipe nobody reads while it runs could
        // fill and stop it.
        let log = dir.join(if check {
            "check.stderr"
        } else {
            "start.stderr"
        });
        let stderr =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut cmd = Command::new("nsenter");
        cmd.arg(&netns)
            .arg("--")
            .arg(&lbd)
            .arg("--config")
            .arg(&file);
        if check {
            cmd.arg("--check");
        }
        // nsenter without --fork execs lbd: the child's pid is lbd's.
        let mut child = cmd
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(stderr)
            .spawn()
            .context("starting lbd with nsenter")?;
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
        let said = || std::fs::read_to_string(&log).unwrap_or_default();
        match status {
            Some(status) if status.success() => Ok(String::new()),
            Some(status) => Ok(format!("lbd exited with {status}: {}", said().trim())),
            None => {
                eprintln!(
                    "lbd{} still ran after {limit:?}: stopping it; it said: {}",
                    if check { " --check" } else { "" },
                    said().trim()
                );
                stop_started(&mut child)?;
                let teardown = Command::new("nsenter")
                    .arg(&netns)
                    .arg("--")
                    .arg(&lbd)
                    .arg("--teardown")
                    .arg("--config")
                    .arg(&file)
                    .stdin(std::process::Stdio::null())
                    .output()
                    .context("running lbd --teardown")?;
                if !teardown.status.success() {
                    eprintln!(
                        "warning: lbd --teardown: {}",
                        String::from_utf8_lossy(&teardown.stderr).trim()
                    );
                }
                if let Err(e) = std::fs::remove_dir_all(&bpffs) {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        eprintln!("warning: removing {}: {e}", bpffs.display());
                    }
                }
                Ok(String::new())
            }
        }
    };
    let said = (refusal(true), refusal(false));
    let _ = std::fs::remove_dir_all(&dir);
    Ok((said.0?, said.1?))
}

/// SIGTERM to a process started by [`refusals_within`], a bounded wait,
/// then SIGKILL.
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
        let pid = lab.spawn_net_only("router", &args)?;
        let me = Lbd {
            pid,
            dir,
            socket,
            config: config_path,
            bpffs,
        };
        me.wait_answering()?;
        Ok(me)
    }

    /// Start lbd again (after [`Lbd::stop_keeping`] or [`Lbd::kill`]) with
    /// the same configuration: it adopts the data plane left pinned.
    pub fn restart(&mut self, lab: &mut Lab) -> Result<()> {
        let lbd = bin_dir().join("lbd");
        self.pid = lab.spawn_net_only("router", &[path(&lbd)?, "--config", path(&self.config)?])?;
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
        let status = lab.stop(self.pid)?;
        ensure!(status.success(), "lbd exited with {status}");
        Ok(())
    }

    /// Kill lbd (SIGKILL), as a crash or the OOM killer does.
    pub fn kill(&self, lab: &mut Lab) -> Result<()> {
        let pid = self.pid.to_string();
        lab.exec("router", &["kill", "-KILL", &pid])?;
        let _ = lab.stop(self.pid);
        Ok(())
    }

    /// `lbd --teardown` with this daemon's configuration.
    pub fn teardown(&self, lab: &Lab) -> Result<String> {
        let lbd = bin_dir().join("lbd");
        lab.exec_net_only(
            "router",
            &[path(&lbd)?, "--teardown", "--config", path(&self.config)?],
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

    /// Run lbctl against this daemon; its stdout on success.
    pub fn lbctl(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(bin_dir().join("lbctl"))
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .context("running lbctl")?;
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

    /// Stop the daemon (SIGTERM, then SIGKILL after a grace period).
    /// Stop the daemon (SIGTERM, then SIGKILL after a grace period), and
    /// remove everything it left in the kernel (`lbd --teardown`).
    pub fn stop(self, lab: &mut Lab) -> Result<()> {
        let status = lab.stop(self.pid)?;
        // Dropping `self` removes its directory.
        ensure!(status.success(), "lbd exited with {status}");
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
