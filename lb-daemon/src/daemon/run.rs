//! lbd's life after its start: the one loop that turns what happens
//! (signals, health verdicts, the passive signals' tick, the quota tick,
//! the flow collector, the operator's connections) into changes of the
//! view and rounds of the reconciler, which runs beside it on every
//! kernel event and once a second; and a stop that ends the reconciler's
//! round before the runtime goes.

use std::{
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::Result;
use futures::FutureExt;
use tokio::signal::unix::{signal, SignalKind};

use super::{clock_ns, reload::Reloader, round, Daemon, KernelLink};
use crate::{
    config::Config,
    control::{
        api::Response,
        metrics,
        socket::{bind_control_socket, serve, status_of},
    },
    dataplane::flows::FlowTables,
};

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

/// How often the ring watch's counts are read (one map lookup per device
/// lb sends to) besides when it wakes lbd: the resolution of a device's
/// hold (see `reconcile::overflow`).
const RING_INTERVAL: Duration = Duration::from_millis(100);

/// How often the reconciler converges without being woken by the kernel:
/// a safety net, and the pace of asking for unresolved gateways.
const RECONCILE_INTERVAL: Duration = Duration::from_secs(1);

/// How long the reconciler lets a kernel event settle before its round.
/// One change comes as a burst of messages (a carrier loss: the link's,
/// then its routes', addresses' and neighbours'), which one round then
/// reads; and the carrier's fast path (linkwatch, the uplink's health
/// monitor, `Daemon::on_health`), woken by the burst's first message,
/// usually reaches the data plane meanwhile instead of queueing behind a
/// round's netlink dumps and convergence on the runtime's two workers and
/// the daemon's lock (a lab test, debug build: 2.4 ms behind a round,
/// 0.15 ms without). A round already under way (the 1 s tick's) can
/// still hold it up.
const SETTLE: Duration = Duration::from_millis(2);

pub async fn run(config: Config, local_ports: (u16, u16), config_path: PathBuf) -> Result<()> {
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
    let reconciler = tokio::spawn(converge_forever(daemon.clone(), kernel.clone(), stopping));
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
    let mut rings = tokio::time::interval(RING_INTERVAL);
    rings.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut ring_events = match daemon.lock() {
        Ok(mut d) => d.ring_events(),
        Err(_) => anyhow::bail!("the daemon's state is unusable"),
    };
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
                    log::warn!("quota: {e:#}; tried again in a second");
                },
                Err(_) => break,
            },
            _ = passive.tick() => match daemon.lock() {
                Ok(mut d) => if let Err(e) = d.passive_tick() {
                    log::warn!("passive detection: reading the data plane's signals failed: {e:#}");
                },
                Err(_) => break,
            },
            () = ring_events.next() => match daemon.lock() {
                Ok(mut d) => if let Err(e) = d.ring_tick() {
                    log::warn!("ring watch: reading or applying its counts failed: {e:#}");
                },
                Err(_) => break,
            },
            _ = rings.tick() => match daemon.lock() {
                Ok(mut d) => if let Err(e) = d.ring_tick() {
                    log::warn!("ring watch: reading or applying its counts failed: {e:#}");
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
                Err(e) => crate::control::accept_failed("control socket", &e).await,
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
async fn converge_forever(
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
            () = kernel.changed.notified() => {
                tokio::time::sleep(SETTLE).await;
                // What the burst's later messages asked for, this round
                // reads: their wake-up is spent here, not on a second
                // round.
                let _ = kernel.changed.notified().now_or_never();
            }
            _ = tick.tick() => {}
        }
        let done = round(&daemon, &kernel).await.and_then(|errors| {
            anyhow::ensure!(errors.is_empty(), "{}", errors.join("; "));
            Ok(())
        });
        if let Ok(mut d) = daemon.lock() {
            d.say_ipv6_changes();
        }
        match done {
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

impl Daemon {
    /// Tell each uplink's IPv6 state change that the round wrote
    /// (`reconcile::ipv6`), in the log and the events: IPv6 can go down
    /// while IPv4 stays up (a lost delegation, an unresolved next hop),
    /// and no other event says so.
    // Here rather than in `converge_ipv6`, which another change holds
    // now: a change written outside a round (the carrier fast path) is
    // told after the next round, which that change itself asks for.
    fn say_ipv6_changes(&mut self) {
        let lan = self.ipv6.lan();
        for change in self.ipv6.take_changes() {
            let Some(u) = self.uplinks.get(change.index) else {
                continue;
            };
            let said = crate::reconcile::ipv6::change_text(&change, &u.facts6, lan);
            log::info!("uplink {}: {said}", u.cfg.name);
            self.history.say("ipv6", Some(&u.cfg.name), said);
        }
    }
}

/// Remove expired flows, without holding the daemon.
fn collect_expired(tables: &Mutex<FlowTables>) {
    let Ok(mut tables) = tables.lock() else {
        return;
    };
    match tables.collect_expired(clock_ns(libc::CLOCK_MONOTONIC_COARSE)) {
        Ok(0) => {}
        Ok(n) => log::debug!("collected {n} expired flows"),
        Err(e) => log::warn!("collecting expired flows failed: {e:#}"),
    }
}
