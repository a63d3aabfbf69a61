//! Hooks: the operator's commands run on every uplink state change, the
//! counterpart of Netwatch's up/down scripts.
//!
//! A hook is an argv (no shell, so nothing in an uplink name or a reason can
//! be interpreted), gets the event in `LB_*` environment variables, and is
//! killed when it outlives its timeout. Hooks run in the background: a slow
//! hook never delays failover.

use std::time::Duration;

use tokio::process::Command;

/// One state change, as hooks see it.
#[derive(Debug, Clone)]
pub struct Event {
    /// What happened: `health` (a health transition; `state` is the new
    /// health) or `quota` (a quota reached or renewed; `state` is the
    /// uplink's admin state: drain, disabled, enabled).
    pub kind: &'static str,
    pub uplink: String,
    pub interface: String,
    pub state: String,
    pub previous: String,
    pub reason: String,
    pub rtt_ms: Option<f64>,
    pub loss_percent: f64,
}

impl Event {
    /// The environment a hook runs with.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("LB_EVENT", self.kind.to_string()),
            ("LB_UPLINK", self.uplink.clone()),
            ("LB_INTERFACE", self.interface.clone()),
            ("LB_STATE", self.state.clone()),
            ("LB_PREVIOUS_STATE", self.previous.clone()),
            ("LB_REASON", self.reason.clone()),
            (
                "LB_RTT_MS",
                self.rtt_ms.map_or_else(String::new, |r| format!("{r:.3}")),
            ),
            ("LB_LOSS_PERCENT", format!("{:.1}", self.loss_percent)),
        ]
    }
}

/// Start every hook for `event` in the background.
pub fn run_all(hooks: &[Vec<String>], timeout: Duration, event: &Event) {
    for argv in hooks {
        let argv = argv.clone();
        let event = event.clone();
        tokio::spawn(async move { run_one(&argv, timeout, &event).await });
    }
}

async fn run_one(argv: &[String], timeout: Duration, event: &Event) {
    let Some((program, args)) = argv.split_first() else {
        return;
    };
    let mut cmd = Command::new(program);
    cmd.args(args).envs(event.env()).kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            log::warn!(
                "hook {program} for uplink {}: could not start: {e}",
                event.uplink
            );
            return;
        }
    };
    match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) if status.success() => {
            log::debug!("hook {program} for uplink {} done", event.uplink)
        }
        Ok(Ok(status)) => log::warn!(
            "hook {program} for uplink {} exited with {status}",
            event.uplink
        ),
        Ok(Err(e)) => log::warn!("hook {program} for uplink {}: {e}", event.uplink),
        Err(_) => {
            let _ = child.kill().await;
            log::warn!(
                "hook {program} for uplink {} killed after {timeout:?}",
                event.uplink
            );
        }
    }
}
