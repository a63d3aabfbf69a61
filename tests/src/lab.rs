//! A running lab: namespaces, veth pairs, addresses, routes, and the
//! processes started in it.
//!
//! Owns bringing a [`LabDesc`] up as namespaces named `{prefix}{host}`, and
//! taking them down: on drop (also when a test panics), on a failed
//! [`Lab::up`], or by prefix after a crash ([`Lab::down`]); and the lab's
//! files directory ([`Lab::files_dir`]), which goes with it. Never touches
//! the host's own namespace: veth pairs are created directly inside their
//! namespaces, and everything else is configured from within them.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::desc::{LabDesc, Link};
use crate::netns;

/// Prefix of the long-lived interactive lab (`cargo xtask lab up`).
pub const LAB_PREFIX: &str = "lb-";

/// Every test prefix starts with this: `Lab::down(TEST_PREFIX_ROOT)` clears
/// what crashed test runs left behind (and the labs of tests still running).
pub const TEST_PREFIX_ROOT: &str = "lbt";

/// How long a spawned process gets to exit after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(3);

/// How long an interface that was set up gets to become operational.
const LINK_UP_TIMEOUT: Duration = Duration::from_secs(5);

/// Where labs keep the files of the processes they run (configurations,
/// leases, logs): `{temp}/lb-labs/{prefix}`, one directory per lab.
fn files_root() -> PathBuf {
    std::env::temp_dir().join("lb-labs")
}

/// A prefix no other lab of this or another test process uses, short enough
/// that `{prefix}{host}` stays readable: `lbt{pid}x{n}-`.
pub fn unique_prefix() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{TEST_PREFIX_ROOT}{}x{}-",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Packet and byte counters of one interface (`ip -s link`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LinkStats {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
}

struct LinkState {
    admin_up: bool,
    oper_up: bool,
}

/// A lab that is up. Dropping it tears it down, unless it was [`Lab::leak`]ed
/// or [`Lab::attach`]ed.
#[derive(Debug)]
pub struct Lab {
    desc: LabDesc,
    prefix: String,
    /// Host name to namespace name, for every host of `desc`.
    namespaces: BTreeMap<String, String>,
    /// Namespaces this value created and deletes on teardown.
    created: Vec<String>,
    children: Vec<Child>,
    /// Whether dropping this value tears the lab down.
    owned: bool,
}

impl Lab {
    /// Brings `desc` up as namespaces `{prefix}{host}`. On failure, removes
    /// whatever it had made and returns the error.
    pub fn up(desc: &LabDesc, prefix: &str) -> Result<Lab> {
        let mut lab = Lab::new(desc, prefix)?;
        lab.owned = true;
        // On error, `lab` is dropped here and tears down what it made.
        lab.build()
            .with_context(|| format!("bringing up lab {prefix}*"))?;
        Ok(lab)
    }

    /// A handle on a lab that is already up (e.g. from `cargo xtask lab up`).
    /// Dropping it leaves the lab up, but stops the processes it spawned.
    pub fn attach(desc: &LabDesc, prefix: &str) -> Result<Lab> {
        let lab = Lab::new(desc, prefix)?;
        let existing = netns::list()?;
        for ns in lab.namespaces.values() {
            ensure!(
                existing.contains(ns),
                "namespace {ns} does not exist: is lab {prefix}* up?"
            );
        }
        Ok(lab)
    }

    /// Deletes every namespace whose name starts with `prefix`, after killing
    /// the processes left inside. Safe to run twice, after a crash, or when
    /// nothing exists. Returns the names it deleted.
    pub fn down(prefix: &str) -> Result<Vec<String>> {
        ensure!(
            !prefix.is_empty(),
            "refusing to take down every namespace: the lab prefix is empty"
        );
        let doomed: Vec<String> = netns::list()?
            .into_iter()
            .filter(|ns| ns.starts_with(prefix))
            .collect();
        for ns in &doomed {
            remove_namespace(ns)?;
        }
        remove_files_dirs(prefix)?;
        Ok(doomed)
    }

    fn new(desc: &LabDesc, prefix: &str) -> Result<Lab> {
        ensure!(
            !prefix.is_empty()
                && prefix.len() <= 16
                && prefix
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')),
            "lab prefix `{prefix}` must be 1 to 16 characters of letters, digits, `-`, `_` or `.`"
        );
        Ok(Lab {
            namespaces: desc
                .hosts
                .keys()
                .map(|h| (h.clone(), format!("{prefix}{h}")))
                .collect(),
            desc: desc.clone(),
            prefix: prefix.to_owned(),
            created: Vec::new(),
            children: Vec::new(),
            owned: false,
        })
    }

    fn build(&mut self) -> Result<()> {
        for (host, ns) in self.namespaces.clone() {
            netns::add(&ns)?;
            self.created.push(ns);
            self.sh(&host, "ip link set dev lo up")?;
            // Before any interface exists, so that `conf.default.*` applies to all.
            for (key, value) in &self.desc.hosts[&host].sysctl {
                // Not `sh`: a value may hold spaces (ip_local_port_range).
                self.exec(&host, &["sysctl", "-qw", &format!("{key}={value}")])
                    .with_context(|| format!("setting {key} on {host}"))?;
            }
        }
        for (host, spec) in &self.desc.hosts {
            for iface in &spec.ifaces {
                let kind = iface.kind.as_str();
                self.sh(host, &format!("ip link add {} type {kind}", iface.name))?;
                self.configure(host, &iface.name)?;
            }
        }
        for link in &self.desc.links {
            self.add_link(link)
                .with_context(|| format!("setting up link {link}"))?;
        }
        // Last: a gateway is only reachable once its link is up.
        for (host, spec) in &self.desc.hosts {
            for route in &spec.routes {
                self.sh(host, &format!("ip route add {route}"))?;
            }
        }
        // The kernel starts transmitting on a veth only once its link watch
        // has seen the carrier, asynchronously; until then it drops.
        let all: Vec<(&str, &str)> = self
            .desc
            .links
            .iter()
            .flat_map(|l| l.ends())
            .map(|e| (e.host.as_str(), e.ifname.as_str()))
            .collect();
        self.wait_operational(&all)
    }

    fn add_link(&self, link: &Link) -> Result<()> {
        let (a, b) = (&link.a, &link.b);
        let (a_ns, b_ns) = (self.ns(&a.host)?, self.ns(&b.host)?);
        // Both ends are born in their namespaces: the host's own never sees them.
        // Said for both ends: an end left unsaid takes its peer's count.
        let queues = |end: &crate::desc::End| {
            let n = end.queues.unwrap_or(1);
            format!(" numtxqueues {n} numrxqueues {n}")
        };
        let veth = format!(
            "link add {} netns {a_ns}{} type veth peer name {} netns {b_ns}{}",
            a.ifname,
            queues(a),
            b.ifname,
            queues(b)
        );
        netns::run(Command::new("ip").args(veth.split_whitespace()))?;
        for end in link.ends() {
            let (host, ifname) = (end.host.as_str(), end.ifname.as_str());
            if let Some(mtu) = end.mtu {
                self.sh(host, &format!("ip link set dev {ifname} mtu {mtu}"))?;
            }
            if let Some(master) = &end.master {
                self.sh(host, &format!("ip link set dev {ifname} master {master}"))?;
            }
            if let Some(t) = &link.tbf {
                let (rate, burst, latency) = (&t.rate, &t.burst, &t.latency);
                let tbf = format!("rate {rate} burst {burst} latency {latency}");
                self.sh(
                    host,
                    &format!("tc qdisc replace dev {ifname} root tbf {tbf}"),
                )?;
            }
            self.configure(host, ifname)?;
        }
        // Offloads last, with both ends up: veth advertises that it can take
        // XDP-redirected frames (NDO_XMIT) only when its peer's GRO is turned
        // on while the pair is up; set earlier, GRO is on but every redirect
        // into the pair fails with EOPNOTSUPP.
        for end in link.ends() {
            let (host, ifname) = (end.host.as_str(), end.ifname.as_str());
            if !end.offload.is_empty() {
                let features: Vec<String> = end
                    .offload
                    .iter()
                    .map(|(feature, on)| format!("{feature} {}", if *on { "on" } else { "off" }))
                    .collect();
                self.sh(host, &format!("ethtool -K {ifname} {}", features.join(" ")))
                    .with_context(|| {
                        format!("setting offloads (`ethtool -k {ifname}` lists feature names)")
                    })?;
            }
        }
        Ok(())
    }

    /// Adds the described addresses of `host:ifname` and brings it up.
    fn configure(&self, host: &str, ifname: &str) -> Result<()> {
        for addr in self.desc.addresses(host, ifname) {
            self.sh(host, &format!("ip addr add {addr} dev {ifname}"))?;
        }
        self.sh(host, &format!("ip link set dev {ifname} up"))?;
        Ok(())
    }

    /// Runs a command line on `host`, split at whitespace: for the lab's own
    /// commands, whose words are names the description has checked.
    fn sh(&self, host: &str, line: &str) -> Result<String> {
        let words: Vec<&str> = line.split_whitespace().collect();
        self.exec(host, &words)
            .with_context(|| format!("on host {host}"))
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The lab's own directory for the files of the processes it runs,
    /// created on first use. It goes when the lab does (after its
    /// processes have stopped), so that two labs never share a lease file
    /// or a pid file, and nothing is left on the host.
    pub fn files_dir(&self) -> Result<PathBuf> {
        let dir = files_root().join(&self.prefix);
        std::fs::create_dir_all(&dir).with_context(|| {
            format!(
                "creating lab {}*'s files directory {}",
                self.prefix,
                dir.display()
            )
        })?;
        Ok(dir)
    }

    pub fn desc(&self) -> &LabDesc {
        &self.desc
    }

    /// The namespace name of `host`.
    pub fn ns(&self, host: &str) -> Result<&str> {
        match self.namespaces.get(host) {
            Some(ns) => Ok(ns),
            None => bail!(
                "lab {}* has no host `{host}`; hosts are: {}",
                self.prefix,
                self.namespaces
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }

    /// Runs `args` on `host` and returns its stdout.
    pub fn exec(&self, host: &str, args: &[&str]) -> Result<String> {
        netns::exec(self.ns(host)?, args)
    }

    /// Runs `args` on `host` and returns how it went, whatever its exit
    /// status (for tools whose output says why they failed).
    pub fn output(&self, host: &str, args: &[&str]) -> Result<std::process::Output> {
        std::process::Command::new("ip")
            .args(["netns", "exec", self.ns(host)?])
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .with_context(|| format!("running `{}` on {host}", args.join(" ")))
    }

    /// Starts a long-lived process on `host`; it is stopped on teardown, or
    /// earlier with [`Lab::stop`]. Returns its pid.
    pub fn spawn(&mut self, host: &str, args: &[&str]) -> Result<u32> {
        let child = netns::spawn(self.ns(host)?, args)?;
        let pid = child.id();
        self.children.push(child);
        Ok(pid)
    }

    /// As [`Lab::spawn`], in the host's network namespace only: the
    /// process keeps the host's mounts (its bpffs above all).
    pub fn spawn_net_only(&mut self, host: &str, args: &[&str]) -> Result<u32> {
        let child = netns::spawn_net_only(self.ns(host)?, args)?;
        let pid = child.id();
        self.children.push(child);
        Ok(pid)
    }

    /// As [`Lab::spawn_net_only`], with the process's stderr piped to the
    /// caller, who must read it: returns its pid and the reading end.
    pub fn spawn_net_only_piped(
        &mut self,
        host: &str,
        args: &[&str],
    ) -> Result<(u32, std::process::ChildStderr)> {
        let mut child = netns::spawn_net_only_piped(self.ns(host)?, args)?;
        let stderr = child
            .stderr
            .take()
            .context("a piped stderr of the spawned process")?;
        let pid = child.id();
        self.children.push(child);
        Ok((pid, stderr))
    }

    /// As [`Lab::exec`], in the host's network namespace only.
    pub fn exec_net_only(&self, host: &str, args: &[&str]) -> Result<String> {
        netns::exec_net_only(self.ns(host)?, args)
    }

    /// Stops a process started with [`Lab::spawn`]: SIGTERM, then SIGKILL
    /// if it has not exited after a grace period. Returns how it exited.
    pub fn stop(&mut self, pid: u32) -> Result<ExitStatus> {
        self.stop_with(pid, libc::SIGTERM)
    }

    /// As [`Lab::stop`], with `signal` (e.g. SIGINT) instead of SIGTERM.
    pub fn stop_with(&mut self, pid: u32, signal: libc::c_int) -> Result<ExitStatus> {
        let Some(index) = self.children.iter().position(|c| c.id() == pid) else {
            bail!("pid {pid} was not spawned by lab {}*", self.prefix);
        };
        stop_child(self.children.swap_remove(index), signal)
    }

    /// Sets `host:ifname` administratively up or down. Taking a link down
    /// makes the kernel delete the static routes through it, and its IPv6
    /// addresses (unless `keep_addr_on_down`), and it does not put them
    /// back: on the way up, this re-adds the interface's described
    /// addresses, then the host's described routes whose gateway lies on
    /// that interface.
    pub fn set_link_up(&self, host: &str, ifname: &str, up: bool) -> Result<()> {
        let state = if up { "up" } else { "down" };
        self.exec(host, &["ip", "link", "set", "dev", ifname, state])
            .with_context(|| format!("setting {host}:{ifname} {state}"))?;
        if !up {
            return Ok(());
        }
        let subnets = self.desc.addresses(host, ifname);
        for addr in &subnets {
            // `replace`: an IPv4 address survives going down, and stays.
            self.sh(host, &format!("ip addr replace {addr} dev {ifname}"))
                .with_context(|| format!("restoring {addr} after {ifname} came up"))?;
        }
        let routes = self
            .desc
            .hosts
            .get(host)
            .map(|h| h.routes.as_slice())
            .unwrap_or_default();
        let restore = routes
            .iter()
            .filter(|r| subnets.iter().any(|s| s.contains(r.via)));
        for route in restore {
            self.sh(host, &format!("ip route replace {route}"))
                .with_context(|| format!("restoring a route after {ifname} came up"))?;
        }
        // A veth end comes up only with its peer: wait for both, unless the
        // peer is administratively down (then neither will come up).
        match self.desc.peer(host, ifname) {
            Some(peer) if !self.link_state(&peer.host, &peer.ifname)?.admin_up => Ok(()),
            Some(peer) => self.wait_operational(&[(host, ifname), (&peer.host, &peer.ifname)]),
            None => self.wait_operational(&[(host, ifname)]),
        }
    }

    /// Packet and byte counters of `host:ifname`.
    pub fn link_stats(&self, host: &str, ifname: &str) -> Result<LinkStats> {
        #[derive(Deserialize)]
        struct Stats {
            stats64: Stats64,
        }
        #[derive(Deserialize)]
        struct Stats64 {
            rx: Counts,
            tx: Counts,
        }
        #[derive(Deserialize)]
        struct Counts {
            packets: u64,
            bytes: u64,
        }
        let Stats { stats64: s } = self.show_link(host, ifname, &["-s"])?;
        Ok(LinkStats {
            rx_packets: s.rx.packets,
            rx_bytes: s.rx.bytes,
            tx_packets: s.tx.packets,
            tx_bytes: s.tx.bytes,
        })
    }

    /// Whether `host:ifname` is administratively and operationally up.
    fn link_state(&self, host: &str, ifname: &str) -> Result<LinkState> {
        #[derive(Deserialize)]
        struct Shown {
            flags: Vec<String>,
            operstate: String,
        }
        let shown: Shown = self.show_link(host, ifname, &[])?;
        Ok(LinkState {
            admin_up: shown.flags.iter().any(|f| f == "UP"),
            // Interfaces without a carrier notion (lo, ifb) report UNKNOWN.
            oper_up: matches!(shown.operstate.as_str(), "UP" | "UNKNOWN"),
        })
    }

    /// Polls, with a bound, until `host:ifname` and its peer are
    /// operationally up again after something that restarts a device
    /// (such as a change of its queues).
    pub fn wait_up(&self, host: &str, ifname: &str) -> Result<()> {
        match self.desc.peer(host, ifname) {
            Some(peer) => self.wait_operational(&[(host, ifname), (&peer.host, &peer.ifname)]),
            None => self.wait_operational(&[(host, ifname)]),
        }
    }

    /// Polls, with a bound, until each of `ifaces` is operationally up.
    fn wait_operational(&self, ifaces: &[(&str, &str)]) -> Result<()> {
        let deadline = Instant::now() + LINK_UP_TIMEOUT;
        for &(host, ifname) in ifaces {
            while !self.link_state(host, ifname)?.oper_up {
                ensure!(
                    Instant::now() < deadline,
                    "{host}:{ifname} is not operationally up after {LINK_UP_TIMEOUT:?}: \
                     is its peer up? (`ip link show` in {})",
                    self.ns(host)?
                );
                thread::sleep(Duration::from_millis(10));
            }
        }
        Ok(())
    }

    /// `ip -j [EXTRA] link show dev IFNAME`, parsed.
    fn show_link<T: DeserializeOwned>(
        &self,
        host: &str,
        ifname: &str,
        extra: &[&str],
    ) -> Result<T> {
        let mut args = vec!["ip", "-j"];
        args.extend(extra);
        args.extend(["link", "show", "dev", ifname]);
        let json = self.exec(host, &args)?;
        let links: Vec<T> = serde_json::from_str(&json)
            .with_context(|| format!("parsing `{}` on {host}: {json}", args.join(" ")))?;
        links
            .into_iter()
            .next()
            .with_context(|| format!("`{}` on {host} listed no interface", args.join(" ")))
    }

    /// Keeps the lab, and the processes spawned in it, after this value is
    /// gone: for `cargo xtask lab up`. `Lab::down(prefix)` removes it.
    pub fn leak(mut self) {
        self.owned = false;
        self.children.clear();
    }

    fn teardown(&mut self) -> Result<()> {
        let mut failures = Vec::new();
        for child in self.children.drain(..) {
            if let Err(e) = stop_child(child, libc::SIGTERM) {
                failures.push(format!("{e:#}"));
            }
        }
        if self.owned {
            for ns in self.created.drain(..) {
                if let Err(e) = remove_namespace(&ns) {
                    failures.push(format!("{e:#}"));
                }
            }
            // Last: the processes that wrote there have stopped.
            if let Err(e) = remove_files_dir(&files_root().join(&self.prefix)) {
                failures.push(format!("{e:#}"));
            }
        }
        ensure!(
            failures.is_empty(),
            "tearing down lab {}*: {}",
            self.prefix,
            failures.join("; ")
        );
        Ok(())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            eprintln!(
                "warning: {e:#}; `cargo xtask lab down` or Lab::down(\"{}\") retries",
                self.prefix
            );
        }
    }
}

/// `sig` (SIGTERM, SIGINT), a bounded wait, then SIGKILL.
fn stop_child(mut child: Child, sig: libc::c_int) -> Result<ExitStatus> {
    let pid = child.id();
    if let Some(status) = child
        .try_wait()
        .with_context(|| format!("checking on pid {pid}"))?
    {
        return Ok(status);
    }
    signal(pid, sig)?;
    let deadline = Instant::now() + STOP_GRACE;
    while Instant::now() < deadline {
        if let Some(status) = child
            .try_wait()
            .with_context(|| format!("waiting for pid {pid}"))?
        {
            return Ok(status);
        }
        thread::sleep(Duration::from_millis(20));
    }
    child
        .kill()
        .with_context(|| format!("killing pid {pid}, which ignored signal {sig}"))?;
    child.wait().with_context(|| format!("reaping pid {pid}"))
}

fn signal(pid: u32, sig: libc::c_int) -> Result<()> {
    let raw = libc::pid_t::try_from(pid).with_context(|| format!("pid {pid} is out of range"))?;
    // SAFETY: kill has no memory-safety preconditions.
    if unsafe { libc::kill(raw, sig) } != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::ESRCH) {
            return Err(err).with_context(|| format!("sending signal {sig} to pid {pid}"));
        }
    }
    Ok(())
}

/// Removes the files directories of the labs whose prefix starts with
/// `prefix` (see [`Lab::files_dir`]).
fn remove_files_dirs(prefix: &str) -> Result<()> {
    let root = files_root();
    let entries = match std::fs::read_dir(&root) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("listing {}", root.display())),
    };
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {}", root.display()))?;
        if entry.file_name().to_string_lossy().starts_with(prefix) {
            remove_files_dir(&entry.path())?;
        }
    }
    Ok(())
}

fn remove_files_dir(dir: &std::path::Path) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing lab files directory {}", dir.display()))
        }
        _ => Ok(()),
    }
}

/// Kills what still runs in `ns` (never this process), then deletes it.
fn remove_namespace(ns: &str) -> Result<()> {
    let me = std::process::id();
    for pid in netns::pids(ns)? {
        if let Ok(pid) = u32::try_from(pid) {
            if pid != me {
                signal(pid, libc::SIGKILL)
                    .with_context(|| format!("killing a process left in namespace {ns}"))?;
            }
        }
    }
    netns::del(ns)
}
