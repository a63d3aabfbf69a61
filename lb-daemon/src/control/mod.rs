//! The operator's side of lbd: the control socket's protocol (`api`),
//! Prometheus metrics, the event history, hooks run on transitions, and
//! the man pages and completions. Nothing here writes the kernel.

pub mod api;
pub mod docs;
pub mod events;
pub mod hooks;
pub mod metrics;
pub mod socket;

/// How long a listener rests after a failed `accept` (out of file
/// descriptors, most likely): the failure would come straight back, and
/// the loop would spin.
const ACCEPT_PAUSE: std::time::Duration = std::time::Duration::from_millis(100);

/// Say that `what`'s `accept` failed, and rest before the next one: a
/// listener lives on through a failed connection.
pub async fn accept_failed(what: &str, e: &std::io::Error) {
    log::warn!("{what}: accepting a connection failed: {e}; trying again");
    tokio::time::sleep(ACCEPT_PAUSE).await;
}
