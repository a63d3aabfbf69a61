//! lb's control plane: the `lbd` daemon and the `lbctl` CLI share this
//! library. The tree is the architecture (DESIGN.md, "Control plane"):
//!
//! - [`config`]: the TOML file, validated as a whole into a typed config.
//! - [`daemon`]: the view (uplinks and their lifecycle, operator actions,
//!   quotas, status, explain) and the loop that runs rounds.
//! - [`reconcile`]: one module per kind lbd owns in the kernel, each what
//!   it wants (pure) and how it converges; one round calls them in order.
//! - [`observe`]: what lbd reads from the kernel (netlink, XDP features,
//!   conntrack).
//! - [`dataplane`]: the XDP object: loading, pins and adoption, maps, flow
//!   walks.
//! - [`health`]: probes, passive detection, the health state machine.
//! - [`control`]: the operator's side: socket protocol, metrics, events,
//!   hooks, man pages.

pub mod config;
pub mod control;
pub mod daemon;
pub mod dataplane;
pub mod health;
pub mod observe;
pub mod reconcile;
