//! The control socket: the requests `lbctl` sends, the replies `lbd` gives,
//! and the framing (one JSON object per line over a Unix stream socket).
//!
//! Both sides use these types, so the protocol cannot drift. The server side
//! only parses and dispatches: it never decides anything itself.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use serde::{Deserialize, Serialize};

/// Default path of the control socket.
pub const DEFAULT_SOCKET: &str = "/run/lb/lbd.sock";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    Status,
    /// The recent events; with `follow`, then every new one as it comes
    /// (one reply line each, until the client goes).
    Events {
        follow: bool,
    },
    /// Re-read the configuration file and take it up (as SIGHUP does).
    Reload,
    /// Where a connection goes, and why.
    Explain {
        /// Both of one family. (Serialized as text, as the IPv4-only
        /// request was: an older lbctl's IPv4 request still parses.)
        src: std::net::IpAddr,
        src_port: u16,
        dst: std::net::IpAddr,
        dst_port: u16,
        /// IP protocol number (6, 17, 1; 58 for ICMPv6).
        proto: u8,
        /// The LAN port it comes in on, for rules on a LAN.
        #[serde(default)]
        lan: Option<String>,
        /// Its DSCP, for rules on DSCP.
        #[serde(default)]
        dscp: Option<u8>,
    },
    /// The flow table, filtered, at most `limit` flows.
    Flows {
        uplink: Option<String>,
        client: Option<std::net::Ipv4Addr>,
        limit: usize,
    },
    /// An operator's change to one uplink.
    Uplink {
        name: String,
        action: UplinkAction,
    },
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum UplinkAction {
    Enable,
    Disable,
    Drain,
    Weight { weight: u32 },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Response {
    Status(Box<Status>),
    Flows(FlowList),
    /// The recent events, oldest first.
    Events(Vec<crate::control::events::Event>),
    /// One new event, for a follower.
    Event(crate::control::events::Event),
    Explained(Explanation),
    Done {
        message: String,
    },
    Error {
        message: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    /// The classifier mode, as in the configuration.
    pub mode: String,
    pub uplinks: Vec<UplinkStatus>,
    /// Packets the fast path gave to the kernel or dropped, by reason.
    pub reasons: Vec<(String, u64)>,
    /// Flows removed after their idle timeout.
    pub flows_expired: u64,
    /// Flows the full table evicted (least recently used first).
    pub flows_evicted: u64,
    /// Where the data plane is pinned (it outlives lbd there).
    #[serde(default)]
    pub pinned_at: String,
    /// Flows of a pinned data plane this lbd adopted at start; none when it
    /// built a new one.
    #[serde(default)]
    pub adopted_flows: Option<u64>,
    /// The interfaces `lan_ingress` is attached to: the LAN interfaces, or
    /// a bridge's ports.
    #[serde(default)]
    pub lan_ports: Vec<String>,
    /// LAN ports `lan_ingress` could not be attached to (`port: why`):
    /// their clients take the kernel's path meanwhile.
    #[serde(default)]
    pub lan_faults: Vec<String>,
    /// The uplink that carries what the LAN sends through the kernel (ESP,
    /// GRE, fragments) and what the router itself sends unbound (its DNS
    /// forwarder, NTP, updates), as lbd's rules have it; none when no
    /// uplink is in service (the main table decides then).
    #[serde(default)]
    pub slow_path: Option<String>,
    /// The uplink that carries what else the router itself sends
    /// unbound: as `slow_path`, but no tunnel while a tunnel's own packets
    /// are not known apart (a tunnel that is no WireGuard); none: the main
    /// table decides.
    #[serde(default)]
    pub own_path: Option<String>,
    /// The tunnels whose own packets lbd routes apart, by their listen
    /// port: `NAME from UDP PORT`.
    #[serde(default)]
    pub tunnels_own: Vec<String>,
    /// The uplink (never a tunnel) that carries them; none: the main
    /// table's default route.
    #[serde(default)]
    pub tunnels_own_path: Option<String>,
    /// The same for the kernel's IPv6 while IPv6 is balanced: the uplink
    /// whose IPv6 is in service that lbd's IPv6 rules send it to.
    #[serde(default)]
    pub slow_path6: Option<String>,
    /// Packets lb's nftables guard dropped as they were about to leave an
    /// uplink with a source that is neither the uplink's own address nor
    /// a prefix routed through it (BCP38).
    #[serde(default)]
    pub guard_dropped: u64,
    /// Destinations the fast path leaves to the kernel (the router's own
    /// addresses, and what the main table routes other than by default).
    #[serde(default)]
    pub kernel_destinations: Vec<String>,
    /// How lb's replies leave each LAN port: XDP, or through a qdisc.
    #[serde(default)]
    pub lan_egress: Vec<EgressStatus>,
    /// The default policy and each `[[policy]]`.
    #[serde(default)]
    pub policies: Vec<PolicyStatus>,
    /// The prefix the LAN carries, while IPv6 is balanced; none: IPv6 is
    /// the kernel's.
    #[serde(default)]
    pub lan_prefix6: Option<String>,
    /// Why there is no ring watch (`lb_common::egress`), if there is none:
    /// devices then keep the path their qdiscs decide, full ring or not.
    #[serde(default)]
    pub no_ring_watch: Option<String>,
    /// Why a UDP datagram too big for its uplink without DF is not handed
    /// to the kernel with its flow's translation (`handed_too_big`), if
    /// it is not: the kernel's slow path then translates it.
    #[serde(default)]
    pub no_hand_over: Option<String>,
    /// Reconciler rounds since lbd started.
    #[serde(default)]
    pub rounds: u64,
    /// Routes and rules lbd added or removed (or tried to) since it
    /// started. A count that grows round after round, with nothing
    /// changing, says that lbd and the kernel (or another program)
    /// disagree about one of them.
    #[serde(default)]
    pub routing_changes: u64,
}

/// An uplink's IPv6 in `lbctl status`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Ipv6Status {
    /// active, drain or down, for IPv6 alone.
    pub state: String,
    /// Its global address on the WAN link.
    pub address: String,
    pub gateway: String,
    pub gateway_mac: String,
    /// The prefix delegated through it.
    pub delegated: String,
    /// The prefix its flows take in place of the LAN's (the LAN's own:
    /// untranslated).
    pub translated_to: String,
    /// Its IPv6 health (up, degraded, down) when it has IPv6 probes;
    /// `follows IPv4` without.
    #[serde(default)]
    pub health: String,
    /// Why its IPv6 health is what it is.
    #[serde(default)]
    pub reason: String,
}

/// One policy in `lbctl status`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PolicyStatus {
    pub name: String,
    /// The uplinks its live table gives new flows.
    pub taking: Vec<String>,
    /// The uplinks its live IPv6 table gives new IPv6 flows (empty while
    /// IPv6 is not balanced).
    #[serde(default)]
    pub taking6: Vec<String>,
    pub fallback: String,
    /// New flows it placed on one of its uplinks.
    pub new_flows: u64,
    /// New flows its `fallback = drop` dropped.
    pub dropped: u64,
    /// New flows its `fallback = unreachable` refused with an ICMP error.
    pub unreachable: u64,
    /// New flows a sticky entry placed.
    pub sticky_hits: u64,
    /// Sticky entries that still hold.
    pub sticky_entries: u64,
}

/// How lb's packets leave one device.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct EgressStatus {
    pub device: String,
    /// `xdp` (straight into the device) or `qdisc` (through its qdisc).
    pub path: String,
    /// Why: the qdisc that counts, or why none does, or that its ring
    /// overflowed (and for how long it takes its queue).
    pub why: String,
    /// Frames `XDP_REDIRECT` lost at it (to its full ring, or refused by
    /// it), as the ring watch counted them (since the data plane was
    /// built); none when not watched.
    #[serde(default)]
    pub ring_drops: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UplinkStatus {
    pub name: String,
    pub interface: String,
    /// Its IPv4 address now, or `-`.
    pub address: String,
    /// Its gateway now, or `-`.
    pub gateway: String,
    /// The gateway as configured: an address, or `auto`.
    #[serde(default)]
    pub gateway_config: String,
    /// Where it stands: waiting for carrier, for an address, for a
    /// gateway, gateway not resolved, probing, in service, down, disabled,
    /// draining.
    #[serde(default)]
    pub lifecycle: String,
    /// lbd's routing table for it, and its rule's priority.
    #[serde(default)]
    pub table: u32,
    #[serde(default)]
    pub rule_priority: u32,
    /// The gateway's Ethernet address, where the data plane sends to.
    #[serde(default)]
    pub gateway_mac: String,
    pub weight: u32,
    pub tier: u8,
    /// Operator state: enabled, disabled or drain.
    pub admin: String,
    /// Health: up, degraded or down; `-` while not probed.
    pub health: String,
    /// Why it is in its state (the last transition).
    pub reason: String,
    /// Health transitions since lbd started (a flapping line shows here).
    pub transitions: u64,
    /// Probe round-trip time, jitter and loss over the recent window.
    pub rtt_ms: Option<f64>,
    pub jitter_ms: Option<f64>,
    pub loss_percent: f64,
    /// What the data plane does with it: active, drain or down.
    pub state: String,
    /// Share of the bucket table (new flows), in buckets.
    pub buckets: u32,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub new_flows: u64,
    /// Flows pinned to this uplink now, both families.
    pub flows: u64,
    /// Of `flows`, the IPv6 ones.
    #[serde(default)]
    pub flows_ipv6: u64,
    /// Connections that came in on it (port forwards, the router's own
    /// services), as lb's nftables table counts them.
    #[serde(default)]
    pub inbound: u64,
    /// Replies translated back to clients.
    pub replies: u64,
    /// New flows dropped for want of a free NAT port.
    pub nat_failures: u64,
    /// How fast the last change of its state reached the data plane.
    #[serde(default)]
    pub last_change: Option<Reaction>,
    /// Its volume quota and the usage in the current period, if it has one.
    #[serde(default)]
    pub quota: Option<QuotaStatus>,
    /// How its packets leave: XDP, or through its qdisc; none until it is
    /// attached.
    #[serde(default)]
    pub egress: Option<EgressStatus>,
    /// Passive detection: bursts of probes the traffic asked for, how many
    /// of them proved the suspicion false, and SYNs sent again without an
    /// answer (as the data plane counts them).
    #[serde(default)]
    pub suspicions: u64,
    #[serde(default)]
    pub false_alarms: u64,
    #[serde(default)]
    pub syn_retries: u64,
    /// Its IPv6 side, while IPv6 is balanced.
    #[serde(default)]
    pub ipv6: Option<Ipv6Status>,
}

/// An uplink's quota as `status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct QuotaStatus {
    pub limit_bytes: u64,
    pub used_bytes: u64,
    /// day, week or month.
    pub period: String,
    /// When the current period began and the next begins (Unix seconds).
    pub period_start: u64,
    pub next_period: u64,
    /// drain or disable.
    pub action: String,
    /// Whether it was reached in this period (its action taken).
    pub reached: bool,
}

/// The path of one state change, from what lbd saw to the data plane.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Reaction {
    /// From the moment lbd read the kernel's event (or judged the probe
    /// round, or took the operator's command) to the moment the daemon
    /// took the change up, in microseconds.
    pub queued_us: u64,
    /// Writing the uplink's state to the data plane, in microseconds: from
    /// here on its traffic moves.
    pub write_us: u64,
    /// Then rebalancing and writing the bucket table, in microseconds.
    pub table_us: u64,
    /// When the data plane had it, on the machine's monotonic clock
    /// (`CLOCK_MONOTONIC`, ns), to line it up with what other processes saw.
    pub applied_monotonic_ns: u64,
}

/// Where a connection goes and why (`lbctl explain`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Explanation {
    /// `existing` (a flow pinned already), `kernel` (left to the kernel),
    /// `new` (a new flow, steered), `dropped` (no uplink takes it).
    pub verdict: String,
    /// The uplink it leaves by, if it is balanced.
    pub uplink: Option<String>,
    /// The bucket its hash falls into, for a new flow.
    pub bucket: Option<u32>,
    /// The policy that places it, for a new flow.
    #[serde(default)]
    pub policy: Option<String>,
    /// The `[[rule]]` (its number, from 1) that chose that policy.
    #[serde(default)]
    pub rule: Option<u32>,
    /// The source address it leaves with (IPv6: its own when it leaves
    /// untranslated, else its NPTv6 translation); none when not known
    /// here (IPv4: the uplink's address, with a NAT port of the data
    /// plane's choosing).
    #[serde(default)]
    pub source: Option<String>,
    /// The reasons, for people.
    pub why: Vec<String>,
}

/// Flows of the flow table, as `lbctl flows` shows them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FlowList {
    pub flows: Vec<FlowEntry>,
    /// Flows looked at to find them (all of them when fewer matched than
    /// the limit).
    pub walked: u64,
    /// Whether the walk stopped at the limit: there may be more.
    pub truncated: bool,
}

/// One connection: where it is pinned and how it is translated.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FlowEntry {
    /// `tcp`, `udp`, `icmp`.
    pub proto: String,
    /// The client, `address:port` (ICMP: the echo identifier as port).
    pub client: String,
    /// The remote end, `address:port`.
    pub remote: String,
    /// The address and port it has on its uplink.
    pub nat: String,
    pub uplink: String,
    /// `opening`, `established`, `closing` (TCP); `active` otherwise.
    pub state: String,
    /// Seconds since its last packet.
    pub idle_s: f64,
}

/// Why a request could not be answered.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "lbd is not running (no control socket at {path}: {source}); start it, or pass --socket"
    )]
    NotRunning {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "lbctl may not use lbd's control socket {path} ({source}): it is root's alone; run lbctl \
         as root (sudo lbctl ...)"
    )]
    Forbidden {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "lbd did not answer at {path} within {after:?}: it may be busy (a walk of a large flow \
         table); try again"
    )]
    Slow { path: String, after: Duration },
    #[error("talking to lbd at {path} failed: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("lbd sent a reply lbctl does not understand: {0}")]
    BadReply(serde_json::Error),
}

/// Send one request and read its reply (blocking; for lbctl and tests).
pub fn call(socket: &Path, req: &Request) -> Result<Response, ClientError> {
    let mut first = None;
    call_stream(socket, req, Some(Duration::from_secs(5)), |reply| {
        first = Some(reply);
        false
    })?;
    first.ok_or_else(|| ClientError::Io {
        path: socket.display().to_string(),
        source: std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "lbd closed without a reply",
        ),
    })
}

/// Send one request and hand each reply line to `on` until it returns
/// false or lbd closes the connection (`lbctl events --follow`). Each line
/// must come within `timeout`, if one is given.
pub fn call_stream(
    socket: &Path,
    req: &Request,
    timeout: Option<Duration>,
    mut on: impl FnMut(Response) -> bool,
) -> Result<(), ClientError> {
    let path = socket.display().to_string();
    let io = |source: std::io::Error| match (source.kind(), timeout) {
        // A read that timed out (`SO_RCVTIMEO` says EAGAIN).
        (std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut, Some(after)) => {
            ClientError::Slow {
                path: path.clone(),
                after,
            }
        }
        _ => ClientError::Io {
            path: path.clone(),
            source,
        },
    };
    let mut stream =
        UnixStream::connect(socket).map_err(|source| connect_error(path.clone(), source))?;
    stream.set_read_timeout(timeout).map_err(io)?;
    let mut line = serde_json::to_vec(req).map_err(ClientError::BadReply)?;
    line.push(b'\n');
    stream.write_all(&line).map_err(io)?;
    let mut reader = BufReader::new(stream);
    loop {
        let mut reply = String::new();
        if reader.read_line(&mut reply).map_err(io)? == 0 {
            return Ok(());
        }
        let reply = serde_json::from_str(&reply).map_err(ClientError::BadReply)?;
        if !on(reply) {
            return Ok(());
        }
    }
}

/// Why connecting to the control socket at `path` failed, for the
/// operator: not allowed, or no lbd there.
fn connect_error(path: String, source: std::io::Error) -> ClientError {
    match source.kind() {
        std::io::ErrorKind::PermissionDenied => ClientError::Forbidden { path, source },
        _ => ClientError::NotRunning { path, source },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_socket_lbctl_may_not_use_is_not_called_a_stopped_lbd() {
        let path = "/run/lbd.sock".to_string();
        let denied = std::io::Error::from_raw_os_error(libc::EACCES);
        let said = connect_error(path.clone(), denied).to_string();
        assert!(said.contains("root") && said.contains("sudo"), "{said}");
        let missing = std::io::Error::from_raw_os_error(libc::ENOENT);
        let said = connect_error(path, missing).to_string();
        assert!(said.starts_with("lbd is not running"), "{said}");
    }

    #[test]
    fn an_lbd_that_does_not_answer_in_time_is_called_slow() {
        let dir = std::env::temp_dir().join(format!("lbctl-slow-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a scratch directory");
        let socket = dir.join("lbd.sock");
        let _ = std::fs::remove_file(&socket);
        // Accepts (the kernel does, from the backlog) and never answers.
        let _listener = std::os::unix::net::UnixListener::bind(&socket).expect("binding");
        let after = Duration::from_millis(50);
        let got = call_stream(&socket, &Request::Status, Some(after), |_| false);
        let _ = std::fs::remove_dir_all(&dir);
        match got {
            Err(e @ ClientError::Slow { .. }) => {
                assert!(e.to_string().contains("did not answer"), "{e}")
            }
            other => panic!("a silent lbd gave {other:?}"),
        }
    }
}
