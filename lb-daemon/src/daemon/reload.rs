//! Reloads (SIGHUP and `lbctl reload`): the file read and validated
//! whole, then taken up in place (a change of the view and a round), or by
//! starting lbd again in place when what changed cannot be taken up live.
//! An invalid file changes nothing.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use super::{lock, Daemon, Reconfigured};
use crate::{config, control::api::Response};

/// Reloads: SIGHUP and `lbctl reload`.
#[derive(Clone)]
pub struct Reloader {
    /// The configuration file.
    pub path: PathBuf,
    /// The kernel's ephemeral ports, which NAT keeps clear of.
    pub local_ports: (u16, u16),
    /// The reconciler's wake-up, for the kernel's side of a reload.
    pub changed: Arc<tokio::sync::Notify>,
}

impl Reloader {
    /// Re-read and validate the file whole, then take it up: in place, or
    /// (`true`) by starting again. An invalid file changes nothing and is
    /// refused with what `lbd --check` would say.
    pub fn reload(&self, daemon: &Mutex<Daemon>) -> (Response, bool) {
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
        let checked = new.clone();
        let mut d = match lock(daemon, "the daemon's state") {
            Ok(d) => d,
            Err(e) => return refuse(format!("{e:#}")),
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
            Ok(Reconfigured::NeedsRestart(what)) => {
                let what = what.join(", ");
                // The new lbd checks the machine as it starts and exits on
                // a refusal, which would leave the data plane with nobody
                // to fail it over: asked here first, without the lock.
                drop(d);
                let machine = match tokio::runtime::Handle::try_current() {
                    Ok(runtime) => runtime.block_on(super::checks::refuse_now(&checked)),
                    Err(e) => Err(anyhow::anyhow!("no runtime to ask the kernel on: {e}")),
                };
                if let Err(e) = machine {
                    return refuse(format!("starting again for {what} would be refused: {e:#}"));
                }
                let mut d = match lock(daemon, "the daemon's state") {
                    Ok(d) => d,
                    Err(e) => return refuse(format!("{e:#}")),
                };
                // The next lbd reads the quotas' usage from the file.
                d.save_quota();
                let message = format!(
                    "reloading by starting again, for {what}: the new lbd adopts the data plane, no flow is dropped"
                );
                (Response::Done { message }, true)
            }
            Err(e) => refuse(format!("{e:#}")),
        }
    }

    /// Start this lbd again in place (same pid, same arguments): the data
    /// plane stays pinned and the new one adopts it. Returns only if that
    /// fails.
    pub fn restart_in_place(&self, socket: &Path) {
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
