//! Named network namespaces and the commands run inside them.
//!
//! Owns `ip netns add/del/list/pids`, running a command in a namespace (and
//! reporting its stderr when it fails), spawning a long-lived one, and
//! entering a namespace from a fresh thread ([`in_netns`]). Never changes
//! the host's own namespace and never calls `setns` on a thread it did not
//! create: the caller's threads stay where they are.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::thread;

use anyhow::{bail, Context, Result};

/// Where `ip netns add` bind-mounts a namespace.
const NETNS_DIR: &str = "/run/netns";

/// Tools every lab shells out to, with the package that provides them
/// (`cargo xtask setup` installs them all; tools that only some tests use,
/// iperf3 or dnsmasq, fail those tests by name when missing).
const TOOLS: [(&str, &str); 6] = [
    ("ip", "iproute2"),
    ("tc", "iproute2"),
    ("sysctl", "procps"),
    ("ethtool", "ethtool"),
    ("nft", "nftables"),
    ("nsenter", "util-linux"),
];

/// The environment variable that turns a missing prerequisite of a test
/// (root, a lab's tool) from a skip into a failure: set to anything but
/// `0` or nothing, a test that cannot run fails, naming what is missing.
/// `cargo xtask test` (CI) sets it; a plain `cargo test` skips, loudly.
pub const REQUIRE_PREREQUISITES: &str = "LB_REQUIRE_PREREQUISITES";

/// Whether [`REQUIRE_PREREQUISITES`] is set: a missing prerequisite fails.
pub fn prerequisites_required() -> bool {
    std::env::var_os(REQUIRE_PREREQUISITES).is_some_and(|v| !v.is_empty() && v != "0")
}

/// Runs `cmd` to completion; returns its stdout, or an error with its stderr.
pub(crate) fn run(cmd: &mut Command) -> Result<String> {
    let shown = format!(
        "{} {}",
        cmd.get_program().to_string_lossy(),
        cmd.get_args()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not start `{shown}`: is it installed and on PATH?"))?;
    if !out.status.success() {
        bail!(
            "`{shown}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip netns add NAME`.
pub fn add(name: &str) -> Result<()> {
    run(Command::new("ip").args(["netns", "add", name]))
        .with_context(|| format!("creating namespace {name} (if it exists already, a lab with this prefix is still up: take it down)"))?;
    Ok(())
}

/// `ip netns del NAME`. The namespace lives on, nameless, while a process or
/// socket still holds it.
pub fn del(name: &str) -> Result<()> {
    run(Command::new("ip").args(["netns", "del", name]))
        .with_context(|| format!("deleting namespace {name}"))?;
    Ok(())
}

/// Names of all named namespaces (`ip netns list`).
pub fn list() -> Result<Vec<String>> {
    let out = run(Command::new("ip").args(["netns", "list"])).context("listing namespaces")?;
    // Lines read `NAME` or `NAME (id: N)`.
    Ok(out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

/// Processes whose network namespace is `ns` (`ip netns pids`).
pub fn pids(ns: &str) -> Result<Vec<i32>> {
    let out = run(Command::new("ip").args(["netns", "pids", ns]))
        .with_context(|| format!("listing processes in namespace {ns}"))?;
    out.split_whitespace()
        .map(|p| {
            p.parse()
                .with_context(|| format!("`ip netns pids {ns}` printed `{p}`, not a pid"))
        })
        .collect()
}

/// Runs `args` in `ns` (`ip netns exec NS ARGS...`) and returns its stdout.
pub fn exec(ns: &str, args: &[&str]) -> Result<String> {
    run(Command::new("ip").args(["netns", "exec", ns]).args(args))
}

/// Starts `args` in `ns`'s network namespace only (`nsenter --net`), with
/// stdin closed and stdout/stderr inherited: unlike `ip netns exec`, it
/// keeps the host's mounts, so its /sys/fs/bpf is the host's bpffs, where
/// what it pins outlives it (lbd's data plane).
pub fn spawn_net_only(ns: &str, args: &[&str]) -> Result<Child> {
    spawn_net_only_with(ns, args, Stdio::inherit())
}

/// As [`spawn_net_only`], with its stderr piped: the child's `stderr` is
/// the reading end, for the caller to read (it must: a full pipe stops the
/// child).
pub fn spawn_net_only_piped(ns: &str, args: &[&str]) -> Result<Child> {
    spawn_net_only_with(ns, args, Stdio::piped())
}

fn spawn_net_only_with(ns: &str, args: &[&str], stderr: Stdio) -> Result<Child> {
    let netns = format!("--net={}", Path::new(NETNS_DIR).join(ns).display());
    Command::new("nsenter")
        .arg(&netns)
        .arg("--")
        .args(args)
        .stdin(Stdio::null())
        .stderr(stderr)
        .spawn()
        .with_context(|| format!("starting `{}` in namespace {ns}", args.join(" ")))
}

/// Runs `args` in `ns`'s network namespace only (see [`spawn_net_only`])
/// and returns its stdout.
pub fn exec_net_only(ns: &str, args: &[&str]) -> Result<String> {
    let netns = format!("--net={}", Path::new(NETNS_DIR).join(ns).display());
    run(Command::new("nsenter").arg(&netns).arg("--").args(args))
}

/// Starts `args` in `ns` with stdin closed and stdout/stderr inherited.
/// `ip netns exec` execs the program, so the child's pid is the program's.
pub fn spawn(ns: &str, args: &[&str]) -> Result<Child> {
    Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("starting `{}` in namespace {ns}", args.join(" ")))
}

/// Runs `f` on a fresh thread that has joined the network namespace `ns`,
/// and returns its result (a panic in `f` is resumed on the caller).
///
/// Sockets that `f` creates belong to `ns` for their whole life and can be
/// used from any thread afterwards: this is how tests talk from inside a lab.
pub fn in_netns<T, F>(ns: &str, f: F) -> Result<T>
where
    T: Send,
    F: FnOnce() -> Result<T> + Send,
{
    let path = Path::new(NETNS_DIR).join(ns);
    let file = File::open(&path)
        .with_context(|| format!("opening {} (does namespace {ns} exist?)", path.display()))?;
    thread::scope(|s| {
        let worker = s.spawn(move || {
            // SAFETY: `file` is an open namespace file for the whole call, and
            // setns(CLONE_NEWNET) moves only this thread, which ends with `f`.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                return Err(std::io::Error::last_os_error())
                    .with_context(|| format!("entering namespace {ns} (setns)"));
            }
            f()
        });
        worker
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Moves the calling thread into the network namespace `ns` for the rest
/// of its life. Only for threads the caller started and that end with their
/// work (as [`in_netns`]'s worker does): a thread of a pool would carry the
/// namespace into unrelated work.
pub fn enter_for_good(ns: &str) -> Result<()> {
    let path = Path::new(NETNS_DIR).join(ns);
    let file = File::open(&path)
        .with_context(|| format!("opening {} (does namespace {ns} exist?)", path.display()))?;
    // SAFETY: `file` is an open namespace file; setns(CLONE_NEWNET) moves
    // only this thread.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("entering namespace {ns} (setns)"));
    }
    Ok(())
}

/// Whether lab tests can run here: `if !require_root("my_test") { return
/// Ok(()); }`. When they cannot, either the test fails, naming what is
/// missing (with [`REQUIRE_PREREQUISITES`] set, as under `cargo xtask
/// test`), or it is skipped, said on the terminal past the test harness's
/// capture so that a skip is never silent.
///
/// # Panics
///
/// When a prerequisite is missing and [`REQUIRE_PREREQUISITES`] is set.
pub fn require_root(test: &str) -> bool {
    let Some(reason) = missing_prerequisite() else {
        return true;
    };
    if prerequisites_required() {
        panic!("{test} cannot run: {reason} ({REQUIRE_PREREQUISITES} is set: a missing prerequisite fails the test)");
    }
    skipped(test, &reason);
    false
}

/// Says that `test` was skipped and why, on the process's stderr itself:
/// `eprintln!` in a test is captured and shown only when it fails.
pub fn skipped(test: &str, reason: &str) {
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {test}: {reason} (with {REQUIRE_PREREQUISITES}=1, as under `cargo xtask test`, this fails)"
    );
}

/// Those of `tools` ((command, Debian package)) that are not on PATH, as
/// "`tool` (package P)" for a message.
pub fn missing_tools(tools: &[(&str, &str)]) -> Vec<String> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    tools
        .iter()
        .filter(|(tool, _)| !std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()))
        .map(|(tool, package)| format!("`{tool}` (package {package})"))
        .collect()
}

fn missing_prerequisite() -> Option<String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        return Some(format!("lab tests create network namespaces and need root (euid is {euid}); run them with sudo"));
    }
    let missing = missing_tools(&TOOLS);
    (!missing.is_empty()).then(|| {
        format!(
            "not on PATH: {}; `cargo xtask setup` installs them",
            missing.join(", ")
        )
    })
}
