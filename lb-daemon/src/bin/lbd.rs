//! lbd: the lb daemon. Validates its configuration, sets up (or adopts) the
//! XDP data plane, keeps it converged, and serves the control socket.
//!
//! Stopping (SIGTERM, SIGINT) leaves the data plane forwarding, pinned on
//! bpffs, with lbd's routes, rules and nftables guard: the next lbd adopts
//! it with its flows. `lbd --teardown` removes all of it.
//!
//! Exit codes: 0 clean shutdown, 64 bad configuration (nothing was touched),
//! 1 any other failure.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use clap::Parser;
use lb_daemon::{
    config,
    control::api::{Request, Response},
    control::metrics,
    daemon::{self, Daemon, KernelLink, Reconfigured},
    dataplane::flows::FlowTables,
};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    signal::unix::{signal, SignalKind},
};

const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "lbd",
    version,
    about = "lb daemon: XDP multi-WAN load balancing with failover",
    long_about = "lb daemon: XDP multi-WAN load balancing with failover.\n\n\
        lbd spreads the LAN's new connections over the router's uplinks in an XDP \
        program, NATs them to the chosen uplink's address and forwards them; it probes \
        every uplink and moves new connections off one that fails. It follows the \
        uplinks' interfaces, addresses and gateways as they come and go (DHCP, PPPoE, \
        late modems).\n\n\
        Signals: SIGHUP reloads the configuration (as `lbctl reload`; an invalid file \
        changes nothing). SIGTERM and SIGINT stop lbd and leave the data plane \
        forwarding, pinned in the bpffs directory, for the next lbd to adopt with its \
        flows; `lbd --teardown` removes it.\n\n\
        Files: /etc/lb/lbd.toml (configuration; the package's copy documents every \
        key), /run/lb/lbd.sock (control socket, see \
        lbctl(1)), /sys/fs/bpf/lb (the pinned data plane)."
)]
struct Args {
    /// Configuration file.
    #[arg(short, long, default_value = "/etc/lb/lbd.toml")]
    config: PathBuf,
    /// Only validate the configuration, and check that the interfaces that
    /// exist now can take XDP-redirected frames, then exit (0 if both hold,
    /// 64 if the file is invalid, 1 if an interface would be refused).
    #[arg(long)]
    check: bool,
    /// Remove everything lbd owns in the kernel (the pinned data plane, so
    /// its programs detach; lbd's routing tables and rules; its nftables
    /// table), then exit. Stop lbd first. Without this, stopping lbd leaves
    /// the data plane forwarding for the next lbd to adopt.
    #[arg(long, conflicts_with = "check")]
    teardown: bool,
    /// Write lbd's man page and shell completions into DIR, then exit (for
    /// packaging).
    #[arg(long, value_name = "DIR", hide = true)]
    generate_docs: Option<PathBuf>,
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(
        env_logger::Env::default().default_filter_or("info,netlink_proto=error"),
    )
    .init();
    let args = Args::parse();
    if let Some(dir) = &args.generate_docs {
        use clap::CommandFactory as _;
        return match lb_daemon::control::docs::generate(Args::command(), "8", dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("lbd: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let config = match config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("lbd: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // NAT ports must never be ports the router's own sockets may take.
    let local_ports = match config::read_local_port_range() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("lbd: reading the kernel's ephemeral port range failed: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(conflict) = config::nat_range_conflict(&config.nat, local_ports) {
        eprintln!("lbd: {}: {conflict}", args.config.display());
        return ExitCode::from(EXIT_CONFIG);
    }
    if args.check {
        println!("{}: configuration is valid", args.config.display());
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("lbd: starting the async runtime failed: {e}");
            return ExitCode::FAILURE;
        }
    };
    if args.check {
        // The interfaces as they are now: one that cannot take redirected
        // frames would be refused at start.
        return match runtime.block_on(lb_daemon::daemon::check_machine(&config)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("lbd: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    if args.teardown {
        return match runtime.block_on(Daemon::teardown(&config)) {
            Ok(()) => {
                println!(
                    "lbd: removed the data plane pinned at {}, lbd's routing tables and rules, and its nftables table",
                    config.daemon.bpffs.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("lbd: tearing down: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let result = runtime.block_on(run(config, local_ports, args.config.clone()));
    // Whatever still runs (a flow collection, a client's request) gets a
    // moment to end; none may hold the exit.
    runtime.shutdown_timeout(SHUTDOWN_GRACE);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lbd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// How long tasks still running at exit get to end.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// How often expired flows are collected (at most).
const GC_INTERVAL: Duration = Duration::from_secs(1);

/// A collection starts no sooner than this many times the last one's
/// duration after that one started: the collector's share of a core is at
/// most 1 / GC_DUTY.
const GC_DUTY: u32 = 10;

/// How often the quotas' usage is brought up to date from the data plane's
/// counters (each reading is one map lookup per uplink with a quota).
const QUOTA_INTERVAL: Duration = Duration::from_secs(1);

/// How often the data plane's signals are read for passive failure
/// detection (one per-CPU map lookup per uplink): the resolution of its
/// suspicion.
const PASSIVE_INTERVAL: Duration = Duration::from_millis(10);

/// How often the reconciler converges without being woken by the kernel:
/// a safety net, and the pace of asking for unresolved gateways.
const RECONCILE_INTERVAL: Duration = Duration::from_secs(1);

async fn run(config: config::Config, local_ports: (u16, u16), config_path: PathBuf) -> Result<()> {
    log::info!("lbd {} starting", env!("CARGO_PKG_VERSION"));
    let socket = config.daemon.socket.clone();
    let listener = bind_control_socket(&socket)?;
    let (daemon, mut events, kernel, collector) = match Daemon::start(config, local_ports).await {
        Ok((d, events, kernel)) => {
            let collector = d.flow_tables();
            (Arc::new(Mutex::new(d)), events, kernel, collector)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&socket);
            return Err(e);
        }
    };
    log::info!("ready; control socket {}", socket.display());
    // systemd's Type=notify: ready now (nothing happens without systemd).
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    let (stop_reconciling, stopping) = tokio::sync::watch::channel(false);
    let reconciler = tokio::spawn(reconcile_forever(daemon.clone(), kernel.clone(), stopping));
    let metrics_listen = daemon.lock().ok().and_then(|d| d.config.metrics);
    if let Some(listen) = metrics_listen {
        let daemon = daemon.clone();
        tokio::spawn(async move {
            let status = move || status_of(&daemon);
            if let Err(e) = metrics::serve(listen, status).await {
                log::error!("metrics: {e:#}");
            }
        });
    }

    let mut gc = tokio::time::interval(GC_INTERVAL);
    let mut quota = tokio::time::interval(QUOTA_INTERVAL);
    let mut passive = tokio::time::interval(PASSIVE_INTERVAL);
    passive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    // The collection walks the whole flow table with one syscall per entry:
    // it runs off the async runtime, one at a time, on handles of its own,
    // without holding the daemon. On a big table a walk takes seconds
    // (3.6 s on a million flows, see BENCHMARKS.md): the next one waits
    // GC_DUTY times as long as the last took, so that the collector keeps
    // to a tenth of a core and leaves the flow table to `lbctl flows`.
    let mut gc_task: Option<tokio::task::JoinHandle<()>> = None;
    let gc_took = Arc::new(AtomicU64::new(0));
    let mut gc_started = Instant::now();
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let reloader = Reloader {
        path: config_path,
        local_ports,
        changed: kernel.changed.clone(),
    };
    loop {
        tokio::select! {
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = sighup.recv() => {
                let (said, restart) = tokio::task::block_in_place(|| reloader.reload(&daemon));
                match said {
                    Response::Error { message } => log::error!("reload (SIGHUP) refused: {message}"),
                    Response::Done { message } => log::info!("{message}"),
                    _ => {}
                }
                if restart {
                    reloader.restart_in_place(&socket);
                }
            },
            _ = gc.tick() => if gc_task.as_ref().is_none_or(|t| t.is_finished())
                && gc_started.elapsed() >= Duration::from_nanos(gc_took.load(Ordering::Relaxed)) * GC_DUTY
            {
                let (collector, took) = (collector.clone(), gc_took.clone());
                gc_started = Instant::now();
                gc_task = Some(tokio::task::spawn_blocking(move || {
                    let started = Instant::now();
                    collect_expired(&collector);
                    let nanos = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
                    took.store(nanos, Ordering::Relaxed);
                }));
            },
            // The usage file is written from here now and then: off the
            // async workers, as the reload's file reading is.
            _ = quota.tick() => match daemon.lock() {
                Ok(mut d) => if let Err(e) = tokio::task::block_in_place(|| d.account_quota()) {
                    log::warn!("quota: reading the data plane's counters failed: {e:#}");
                },
                Err(_) => break,
            },
            _ = passive.tick() => match daemon.lock() {
                Ok(mut d) => if let Err(e) = d.passive_tick() {
                    log::warn!("passive detection: reading the data plane's signals failed: {e:#}");
                },
                Err(_) => break,
            },
            Some(event) = events.health.recv() => {
                match daemon.lock() {
                    Ok(mut d) => if let Err(e) = d.on_health(event) {
                        log::error!("applying a health change failed: {e:#}");
                    },
                    Err(_) => break,
                }
                // The data plane has it; the kernel's side (the slow path's
                // routing) follows in the reconciler.
                kernel.changed.notify_one();
            },
            conn = listener.accept() => match conn {
                Ok((stream, _)) => {
                    tokio::spawn(serve(stream, daemon.clone(), kernel.changed.clone(), reloader.clone()));
                }
                Err(e) => log::warn!("control socket accept failed: {e}"),
            },
        }
    }
    // The reconciler ends its round (it may be inside `block_in_place`,
    // where aborting cannot reach it) before the runtime goes: a round that
    // outlived the runtime would find its timers gone, and panic.
    let _ = stop_reconciling.send(true);
    if let Err(e) = reconciler.await {
        log::warn!("the reconciler ended badly: {e}");
    }
    let pinned = daemon
        .lock()
        .map(|d| d.config.daemon.bpffs.display().to_string())
        .unwrap_or_default();
    log::info!(
        "stopping: the data plane keeps forwarding (pinned at {pinned}), with lbd's routes, rules and guard; health checks stop until lbd runs again; `lbd --teardown` removes it all"
    );
    if let Ok(mut d) = daemon.lock() {
        d.save_quota();
    }
    let _ = std::fs::remove_file(&socket);
    drop(daemon);
    Ok(())
}

/// Converge on every kernel event, and once a second, until `stopping`.
async fn reconcile_forever(
    daemon: Arc<Mutex<Daemon>>,
    kernel: KernelLink,
    mut stopping: tokio::sync::watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(RECONCILE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            biased;
            _ = stopping.changed() => return,
            () = kernel.changed.notified() => {}
            _ = tick.tick() => {}
        }
        match daemon::reconcile(&daemon, &kernel).await {
            Ok(()) => {
                if failing {
                    log::info!("converged again");
                }
                failing = false;
            }
            // Said once, not once a second.
            Err(e) if !failing => {
                log::warn!("converging failed: {e:#}; retrying on every change and once a second");
                failing = true;
            }
            Err(e) => log::debug!("converging failed again: {e:#}"),
        }
    }
}

/// Remove expired flows, without holding the daemon.
fn collect_expired(tables: &Mutex<FlowTables>) {
    let Ok(mut tables) = tables.lock() else {
        return;
    };
    match tables.collect_expired(daemon::clock_ns(libc::CLOCK_MONOTONIC_COARSE)) {
        Ok(0) => {}
        Ok(n) => log::debug!("collected {n} expired flows"),
        Err(e) => log::warn!("collecting expired flows failed: {e:#}"),
    }
}

/// Bind the control socket, refusing to start beside a running lbd.
fn bind_control_socket(path: &Path) -> Result<UnixListener> {
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        bail!(
            "another lbd is already running (its control socket {} answers); stop it first",
            path.display()
        );
    }
    // A socket file nobody answers on is left over from a crash.
    let _ = std::fs::remove_file(path);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("binding control socket {}", path.display()))?;
    // Root only: the socket changes how the router forwards.
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .with_context(|| format!("restricting {} to root", path.display()))?;
    Ok(listener)
}

/// Answer requests on one connection, one JSON line each; an operator's
/// change wakes the reconciler (`changed`) for the kernel's side of it.
async fn serve(
    stream: UnixStream,
    daemon: Arc<Mutex<Daemon>>,
    changed: Arc<tokio::sync::Notify>,
    reloader: Reloader,
) {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if let Ok(Request::Events { follow: true }) = serde_json::from_str::<Request>(&line) {
            follow_events(&mut write, &daemon).await;
            return;
        }
        if let Ok(Request::Reload) = serde_json::from_str::<Request>(&line) {
            let (said, restart) = tokio::task::block_in_place(|| reloader.reload(&daemon));
            if let Ok(mut out) = serde_json::to_vec(&said) {
                out.push(b'\n');
                let _ = write.write_all(&out).await;
                let _ = write.flush().await;
            }
            if restart {
                let socket = daemon.lock().map(|d| d.config.daemon.socket.clone());
                if let Ok(socket) = socket {
                    reloader.restart_in_place(&socket);
                }
            }
            continue;
        }
        let response = match serde_json::from_str::<Request>(&line) {
            // A status walks the flow table: let the runtime move other
            // tasks off this thread meanwhile.
            Ok(req) => {
                let changes = matches!(req, Request::Uplink { .. });
                let response = tokio::task::block_in_place(|| handle(req, &daemon));
                if changes {
                    changed.notify_one();
                }
                response
            }
            Err(e) => Response::Error {
                message: format!("bad request: {e}"),
            },
        };
        let Ok(mut out) = serde_json::to_vec(&response) else {
            break;
        };
        out.push(b'\n');
        if write.write_all(&out).await.is_err() {
            break;
        }
    }
}

/// Reloads: SIGHUP and `lbctl reload`.
#[derive(Clone)]
struct Reloader {
    path: PathBuf,
    local_ports: (u16, u16),
    changed: Arc<tokio::sync::Notify>,
}

impl Reloader {
    /// Re-read and validate the file whole, then take it up: in place, or
    /// (`true`) by starting again. An invalid file changes nothing and is
    /// refused with what `lbd --check` would say.
    fn reload(&self, daemon: &Mutex<Daemon>) -> (Response, bool) {
        let refuse = |message: String| {
            (
                Response::Error {
                    message: format!("reload refused, nothing changed: {message}"),
                },
                false,
            )
        };
        let new = match config::load(&self.path) {
            Ok(c) => c,
            Err(e) => return refuse(e.to_string()),
        };
        if let Some(conflict) = config::nat_range_conflict(&new.nat, self.local_ports) {
            return refuse(format!("{}: {conflict}", self.path.display()));
        }
        let Ok(mut d) = daemon.lock() else {
            return refuse("daemon state is poisoned; restart lbd".into());
        };
        match d.reconfigure(new) {
            Ok(Reconfigured::Applied(done)) => {
                self.changed.notify_one();
                let message = if done.is_empty() {
                    "reloaded: nothing changed".to_string()
                } else {
                    format!("reloaded: {}", done.join("; "))
                };
                (Response::Done { message }, false)
            }
            Ok(Reconfigured::NeedsRestart(what)) => (
                {
                    // The next lbd reads the quotas' usage from the file.
                    d.save_quota();
                    Response::Done {
                    message: format!(
                        "reloading by starting again, for {}: the new lbd adopts the data plane, no flow is dropped",
                        what.join(", ")
                    ),
                    }
                },
                true,
            ),
            Err(e) => refuse(format!("{e:#}")),
        }
    }

    /// Start this lbd again in place (same pid, same arguments): the data
    /// plane stays pinned and the new one adopts it. Returns only if that
    /// fails.
    fn restart_in_place(&self, socket: &Path) {
        use std::os::unix::process::CommandExt as _;
        log::info!("starting again to take up the new configuration (the data plane stays)");
        let _ = std::fs::remove_file(socket);
        let exe = match std::env::current_exe() {
            Ok(exe) => exe,
            Err(e) => {
                log::error!("cannot find lbd's own executable to start again: {e}");
                return;
            }
        };
        let error = std::process::Command::new(exe)
            .args(std::env::args_os().skip(1))
            .exec();
        log::error!("starting again failed: {error}; this lbd goes on with the old configuration");
    }
}

/// `lbctl events --follow`: the recent events, then each new one, until
/// the client goes. A follower too slow to keep up is told how many it
/// missed.
async fn follow_events(write: &mut tokio::net::unix::OwnedWriteHalf, daemon: &Mutex<Daemon>) {
    let Ok((recent, mut new)) = daemon.lock().map(|d| d.events()) else {
        return;
    };
    let mut reply = Response::Events(recent);
    loop {
        let Ok(mut out) = serde_json::to_vec(&reply) else {
            return;
        };
        out.push(b'\n');
        if write.write_all(&out).await.is_err() {
            return;
        }
        reply = match new.recv().await {
            Ok(event) => Response::Event(event),
            Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                Response::Event(lb_daemon::control::events::Event {
                    at: lb_daemon::control::events::rfc3339(std::time::SystemTime::now()),
                    kind: "daemon".into(),
                    uplink: None,
                    message: format!("{missed} events missed: this follower was too slow"),
                })
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        };
    }
}

/// A whole status: the daemon's part under its lock, the flow counts
/// after letting go of it.
fn status_of(daemon: &Mutex<Daemon>) -> Result<lb_daemon::control::api::Status> {
    let draft = daemon
        .lock()
        .map_err(|_| anyhow::anyhow!("daemon state is poisoned; restart lbd"))?
        .status()?;
    draft.finish()
}

fn handle(req: Request, daemon: &Mutex<Daemon>) -> Response {
    let Ok(mut d) = daemon.lock() else {
        return Response::Error {
            message: "daemon state is poisoned; restart lbd".into(),
        };
    };
    match req {
        Request::Status => {
            let draft = d.status();
            // The flow count walks the whole table: not while holding the
            // daemon, or health changes would wait for it.
            drop(d);
            match draft.and_then(|draft| draft.finish()) {
                Ok(s) => Response::Status(s),
                Err(e) => Response::Error {
                    message: format!("{e:#}"),
                },
            }
        }
        Request::Events { .. } => Response::Events(d.events().0),
        // Answered by `serve` itself: it may start lbd again.
        Request::Reload => Response::Error {
            message: "reload is answered elsewhere".into(),
        },
        Request::Explain {
            src,
            src_port,
            dst,
            dst_port,
            proto,
        } => {
            let key = lb_common::maps::FlowKey {
                src_addr: src.octets(),
                dst_addr: dst.octets(),
                src_port: src_port.to_be_bytes(),
                dst_port: dst_port.to_be_bytes(),
                proto,
                _pad: [0; 3],
            };
            match d.explain(&key) {
                Ok(e) => Response::Explained(e),
                Err(e) => Response::Error {
                    message: format!("{e:#}"),
                },
            }
        }
        Request::Flows {
            uplink,
            client,
            limit,
        } => {
            let query = d.flow_query();
            // The walk: not while holding the daemon.
            drop(d);
            match query.run(uplink.as_deref(), client, limit) {
                Ok(list) => Response::Flows(list),
                Err(e) => Response::Error {
                    message: format!("{e:#}"),
                },
            }
        }
        Request::Uplink { name, action } => match d.operate(&name, action) {
            Ok(message) => Response::Done { message },
            Err(e) => Response::Error {
                message: format!("{e:#}"),
            },
        },
    }
}
