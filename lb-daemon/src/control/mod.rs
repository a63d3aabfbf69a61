//! The operator's side of lbd: the control socket's protocol (`api`),
//! Prometheus metrics, the event history, hooks run on transitions, and
//! the man pages and completions. Nothing here writes the kernel.

pub mod api;
pub mod docs;
pub mod events;
pub mod hooks;
pub mod metrics;
pub mod socket;
