//! lb's control plane: the `lbd` daemon and the `lbctl` CLI share this
//! library. One module per concern; see DESIGN.md "Control plane".

pub mod api;
pub mod balancer;
pub mod bench_support;
pub mod config;
pub mod conntrack;
pub mod daemon;
pub mod dataplane;
pub mod docs;
pub mod egress;
pub mod events;
pub mod flows;
pub mod health;
pub mod hooks;
pub mod kernel;
pub mod kfuncs;
pub mod linkwatch;
pub mod metrics;
pub mod netlink;
pub mod nlmsg;
pub mod passive;
pub mod pins;
pub mod probe;
pub mod quota;
pub mod slowpath;
pub mod uplink;
pub mod xdpcaps;
