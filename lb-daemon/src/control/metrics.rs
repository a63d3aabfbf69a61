//! Prometheus metrics: what `lbctl status` shows, as a scrape target on
//! `[metrics] listen` (loopback by default; off without the key).
//!
//! Owns the mapping from a [`Status`] to metric families (names, help,
//! labels, types) and the small HTTP endpoint that serves them. The text
//! exposition is the `prometheus-client` crate's; nothing here formats a
//! metric by hand. Each scrape takes a fresh status: the counters are the
//! data plane's own, never kept twice.

use std::net::SocketAddr;

use anyhow::{Context, Result};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge, MetricType},
    registry::Registry,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use crate::control::api::{QuotaStatus, Status, UplinkStatus};

/// A status, as metric families.
#[derive(Debug)]
struct Snapshot(Status);

type Labels = Vec<(&'static str, String)>;

impl Snapshot {
    fn uplink_labels(u: &UplinkStatus) -> Labels {
        vec![("uplink", u.name.clone())]
    }
}

/// One metric family: its name (counters without `_total`, which the
/// encoder adds), help, type and samples.
fn family(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    samples: impl IntoIterator<Item = (Labels, f64)>,
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in samples {
        let sample = metric.encode_family(&labels)?;
        match kind {
            MetricType::Counter => ConstCounter::new(value).encode(sample)?,
            _ => ConstGauge::new(value).encode(sample)?,
        }
    }
    Ok(())
}

/// A family with one sample per uplink: name, help, type, value.
type UplinkFamily = (
    &'static str,
    &'static str,
    MetricType,
    fn(&UplinkStatus) -> f64,
);

/// The families with one sample per uplink, in the order they are exposed.
const PER_UPLINK: &[UplinkFamily] = &[
    (
        "lb_uplink_in_service",
        "1 while the uplink takes new flows (in service, or degraded), else 0",
        MetricType::Gauge,
        |u| f64::from(u8::from(u.state == "active")),
    ),
    (
        "lb_uplink_health_up",
        "1 while the uplink's probes say up or degraded, else 0",
        MetricType::Gauge,
        |u| f64::from(u8::from(u.health == "up" || u.health == "degraded")),
    ),
    (
        "lb_uplink_transitions",
        "Health transitions since lbd started",
        MetricType::Counter,
        |u| u.transitions as f64,
    ),
    (
        "lb_uplink_weight",
        "The uplink's weight",
        MetricType::Gauge,
        |u| f64::from(u.weight),
    ),
    (
        "lb_uplink_buckets",
        "Buckets of the table that send new flows to the uplink",
        MetricType::Gauge,
        |u| f64::from(u.buckets),
    ),
    (
        "lb_uplink_loss_ratio",
        "Probes lost over the recent window, 0 to 1",
        MetricType::Gauge,
        |u| u.loss_percent / 100.0,
    ),
    (
        "lb_uplink_tx_packets",
        "Packets the fast path sent out of the uplink",
        MetricType::Counter,
        |u| u.tx_packets as f64,
    ),
    (
        "lb_uplink_tx_bytes",
        "Bytes (whole frames) the fast path sent out of the uplink",
        MetricType::Counter,
        |u| u.tx_bytes as f64,
    ),
    (
        "lb_uplink_rx_packets",
        "Packets arriving on the uplink",
        MetricType::Counter,
        |u| u.rx_packets as f64,
    ),
    (
        "lb_uplink_rx_bytes",
        "Bytes arriving on the uplink",
        MetricType::Counter,
        |u| u.rx_bytes as f64,
    ),
    (
        "lb_uplink_new_flows",
        "Flows pinned to the uplink (new, or moved to it)",
        MetricType::Counter,
        |u| u.new_flows as f64,
    ),
    (
        "lb_uplink_nat_failures",
        "New flows dropped for want of a free NAT port",
        MetricType::Counter,
        |u| u.nat_failures as f64,
    ),
    (
        "lb_uplink_replies",
        "Replies translated back to a client",
        MetricType::Counter,
        |u| u.replies as f64,
    ),
    (
        "lb_uplink_inbound_connections",
        "Connections that came in on the uplink (port forwards, the router's own services)",
        MetricType::Counter,
        |u| u.inbound as f64,
    ),
    (
        "lb_uplink_suspicions",
        "Bursts of probes the traffic asked for (passive detection)",
        MetricType::Counter,
        |u| u.suspicions as f64,
    ),
    (
        "lb_uplink_false_alarms",
        "Bursts whose probes answered: the traffic's suspicion was false",
        MetricType::Counter,
        |u| u.false_alarms as f64,
    ),
    (
        "lb_uplink_syn_retries",
        "SYNs sent again without an answer on the uplink",
        MetricType::Counter,
        |u| u.syn_retries as f64,
    ),
    (
        "lb_uplink_flows",
        "Flows pinned to the uplink now",
        MetricType::Gauge,
        |u| u.flows as f64,
    ),
];

/// A family with one sample per uplink and address family, labelled
/// `family="ipv4"` or `family="ipv6"`: name, help, and the value for each
/// family (`None`: no sample, e.g. IPv6 while it is not balanced).
///
/// These are new families beside the older per-uplink ones, never a
/// `family` label added to those: `lb_uplink_in_service{uplink="isp1"}`
/// and `sum(lb_uplink_in_service)` must keep returning what dashboards and
/// alerts were written against (one series an uplink; IPv4's state, which
/// is the uplink's), and `lb_uplink_flows` keeps counting both families.
/// Here `sum by (uplink) (lb_uplink_family_flows)` is `lb_uplink_flows`,
/// and `lb_uplink_family_in_service{family="ipv4"}` is
/// `lb_uplink_in_service`.
type FamilyFamily = (
    &'static str,
    &'static str,
    fn(&UplinkStatus) -> Option<f64>,
    fn(&UplinkStatus) -> Option<f64>,
);

const PER_FAMILY: &[FamilyFamily] = &[
    (
        "lb_uplink_family_in_service",
        "1 while the uplink takes new flows of the address family, else 0; no ipv6 sample while IPv6 is not balanced",
        |u| Some(f64::from(u8::from(u.state == "active"))),
        |u| {
            u.ipv6
                .as_ref()
                .map(|six| f64::from(u8::from(six.state == "active")))
        },
    ),
    (
        "lb_uplink_family_flows",
        "Flows of the address family pinned to the uplink now",
        |u| Some(u.flows.saturating_sub(u.flows_ipv6) as f64),
        |u| Some(u.flows_ipv6 as f64),
    ),
];

/// A family with one sample for the whole router: name, help, type, value.
type RouterFamily = (&'static str, &'static str, MetricType, fn(&Status) -> f64);

const PER_ROUTER: &[RouterFamily] = &[
    (
        "lb_reconcile_rounds",
        "Reconciler rounds since lbd started",
        MetricType::Counter,
        |s| s.rounds as f64,
    ),
    (
        "lb_routing_changes",
        "Routes and rules lbd added or removed (or tried to) since it started; growing with nothing changing, it says lbd and the kernel or another program disagree",
        MetricType::Counter,
        |s| s.routing_changes as f64,
    ),
    (
        "lb_flows_expired",
        "Flows removed after their idle timeout",
        MetricType::Counter,
        |s| s.flows_expired as f64,
    ),
    (
        "lb_flows_evicted",
        "Flows the full table evicted",
        MetricType::Counter,
        |s| s.flows_evicted as f64,
    ),
    (
        "lb_ipv6_balanced",
        "1 while lb balances IPv6 (it knows the prefix the LAN carries), else 0: IPv6 is the kernel's",
        MetricType::Gauge,
        |s| f64::from(u8::from(s.lan_prefix6.is_some())),
    ),
    (
        "lb_guard_dropped_packets",
        "Packets dropped on their way out of an uplink with a source that is not the uplink's own nor routed through it (BCP38)",
        MetricType::Counter,
        |s| s.guard_dropped as f64,
    ),
];

/// A family with one sample per policy: name, help, type, value.
type PolicyFamily = (
    &'static str,
    &'static str,
    MetricType,
    fn(&crate::control::api::PolicyStatus) -> f64,
);

const PER_POLICY: &[PolicyFamily] = &[
    (
        "lb_policy_new_flows",
        "New flows the policy placed on one of its uplinks",
        MetricType::Counter,
        |p| p.new_flows as f64,
    ),
    (
        "lb_policy_dropped_flows",
        "New flows dropped by the policy's fallback = drop",
        MetricType::Counter,
        |p| p.dropped as f64,
    ),
    (
        "lb_policy_unreachable_flows",
        "New flows refused with an ICMP error by the policy's fallback = unreachable",
        MetricType::Counter,
        |p| p.unreachable as f64,
    ),
    (
        "lb_policy_sticky_hits",
        "New flows a sticky entry of the policy placed",
        MetricType::Counter,
        |p| p.sticky_hits as f64,
    ),
    (
        "lb_policy_sticky_entries",
        "Sticky clients of the policy that still hold",
        MetricType::Gauge,
        |p| p.sticky_entries as f64,
    ),
];

/// A family with one sample per uplink that has a quota.
type QuotaFamily = (&'static str, &'static str, fn(&QuotaStatus) -> f64);

const PER_QUOTA: &[QuotaFamily] = &[
    (
        "lb_uplink_quota_bytes",
        "The uplink's volume quota per period",
        |q| q.limit_bytes as f64,
    ),
    (
        "lb_uplink_quota_used_bytes",
        "Bytes the uplink carried (both ways) in the current quota period",
        |q| q.used_bytes as f64,
    ),
    (
        "lb_uplink_quota_reached",
        "1 while the uplink's quota is reached and its action in force",
        |q| f64::from(u8::from(q.reached)),
    ),
];

impl Collector for Snapshot {
    /// The tables above, and the families whose labels say more than the
    /// uplink (its lifecycle, a device, a reason) or whose samples may be
    /// missing (round-trip times before the first probe answers).
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = &self.0;
        let e = &mut encoder;
        let uplink = Snapshot::uplink_labels;
        family(
            e,
            "lb_build_info",
            "lb's version",
            MetricType::Gauge,
            [(
                vec![("version", env!("CARGO_PKG_VERSION").to_string())],
                1.0,
            )],
        )?;
        family(
            e,
            "lb_uplink_lifecycle",
            "Where the uplink stands (1 for its current lifecycle)",
            MetricType::Gauge,
            s.uplinks.iter().map(|u| {
                let mut labels = uplink(u);
                labels.push(("lifecycle", u.lifecycle.clone()));
                (labels, 1.0)
            }),
        )?;
        for &(name, help, kind, value) in PER_UPLINK {
            family(
                e,
                name,
                help,
                kind,
                s.uplinks.iter().map(|u| (uplink(u), value(u))),
            )?;
        }
        for &(name, help, ipv4, ipv6) in PER_FAMILY {
            let samples = s.uplinks.iter().flat_map(|u| {
                [("ipv4", ipv4(u)), ("ipv6", ipv6(u))]
                    .into_iter()
                    .filter_map(move |(family, value)| {
                        let mut labels = uplink(u);
                        labels.push(("family", family.to_string()));
                        Some((labels, value?))
                    })
            });
            family(e, name, help, MetricType::Gauge, samples)?;
        }
        family(
            e,
            "lb_uplink_rtt_seconds",
            "Probe round-trip time over the recent window",
            MetricType::Gauge,
            s.uplinks
                .iter()
                .filter_map(|u| u.rtt_ms.map(|r| (uplink(u), r / 1e3))),
        )?;
        family(
            e,
            "lb_uplink_jitter_seconds",
            "Probe round-trip time jitter over the recent window",
            MetricType::Gauge,
            s.uplinks
                .iter()
                .filter_map(|u| u.jitter_ms.map(|j| (uplink(u), j / 1e3))),
        )?;
        for &(name, help, value) in PER_QUOTA {
            let samples = s
                .uplinks
                .iter()
                .filter_map(|u| Some((uplink(u), value(u.quota.as_ref()?))));
            family(e, name, help, MetricType::Gauge, samples)?;
        }
        // How lb's packets leave each device: 1 through its qdisc, 0 by XDP.
        let egress = s
            .uplinks
            .iter()
            .filter_map(|u| u.egress.as_ref())
            .chain(&s.lan_egress)
            .map(|out| {
                (
                    vec![("device", out.device.clone())],
                    f64::from(u8::from(out.path == "qdisc")),
                )
            });
        family(
            e,
            "lb_egress_qdisc",
            "1 when lb's packets leave the device through its qdisc, 0 by XDP",
            MetricType::Gauge,
            egress,
        )?;
        let ring_drops = s
            .uplinks
            .iter()
            .filter_map(|u| u.egress.as_ref())
            .chain(&s.lan_egress)
            .filter_map(|out| Some((vec![("device", out.device.clone())], out.ring_drops? as f64)));
        family(
            e,
            "lb_egress_ring_drops",
            "Frames XDP_REDIRECT lost at the device: to its full ring (it then takes its queue for a while), or refused by it (without carrier, its path stays)",
            MetricType::Counter,
            ring_drops,
        )?;
        family(
            e,
            "lb_packets",
            "Packets the fast path gave to the kernel (pass_*) or dropped (drop_*), by reason",
            MetricType::Counter,
            s.reasons
                .iter()
                .map(|(reason, n)| (vec![("reason", reason.clone())], *n as f64)),
        )?;
        for &(name, help, kind, value) in PER_POLICY {
            family(
                e,
                name,
                help,
                kind,
                s.policies
                    .iter()
                    .map(|p| (vec![("policy", p.name.clone())], value(p))),
            )?;
        }
        for &(name, help, kind, value) in PER_ROUTER {
            family(e, name, help, kind, [(Vec::new(), value(s))])?;
        }
        Ok(())
    }
}

/// The exposition of `status`, in Prometheus' text format.
pub fn render(status: Status) -> Result<String> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Snapshot(status)));
    let mut text = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut text, &registry)
        .context("encoding the metrics")?;
    Ok(text)
}

/// Serve `GET /metrics` on `listen`, each scrape from `status()`.
pub async fn serve(
    listen: SocketAddr,
    status: impl Fn() -> Result<Status> + Send + Sync + Clone + 'static,
) -> Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening for metrics scrapes on {listen}"))?;
    log::info!("metrics on http://{listen}/metrics");
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                super::accept_failed("metrics", &e).await;
                continue;
            }
        };
        let status = status.clone();
        tokio::spawn(async move {
            if let Err(e) = answer(stream, status).await {
                log::debug!("a metrics scrape failed: {e:#}");
            }
        });
    }
}

/// Longest request head read from a scraper.
const MAX_REQUEST: usize = 8 * 1024;

async fn answer(mut stream: TcpStream, status: impl Fn() -> Result<Status>) -> Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST {
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), stream.read(&mut buf))
            .await
            .context("a scraper too slow to ask")??;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let (code, kind, body) = if head.starts_with(b"GET /metrics ") {
        match tokio::task::block_in_place(&status).and_then(render) {
            Ok(text) => (
                "200 OK",
                prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
                text,
            ),
            Err(e) => (
                "500 Internal Server Error",
                "text/plain",
                format!("{e:#}\n"),
            ),
        }
    } else {
        (
            "404 Not Found",
            "text/plain",
            "lbd serves /metrics\n".to_string(),
        )
    };
    let reply = format!(
        "HTTP/1.1 {code}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(reply.as_bytes()).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::{
        io::Write,
        process::{Command, Stdio},
    };

    use super::*;
    use crate::control::api::Ipv6Status;

    fn uplink(name: &str, flows: u64, flows_ipv6: u64, ipv6: Option<&str>) -> UplinkStatus {
        UplinkStatus {
            name: name.into(),
            interface: format!("wan-{name}"),
            address: "-".into(),
            gateway: "-".into(),
            gateway_config: "auto".into(),
            lifecycle: "in service".into(),
            table: 4000,
            rule_priority: 4000,
            gateway_mac: "-".into(),
            weight: 1,
            tier: 0,
            admin: "enabled".into(),
            health: "up".into(),
            reason: "probes answer".into(),
            transitions: 0,
            rtt_ms: None,
            jitter_ms: None,
            loss_percent: 0.0,
            state: "active".into(),
            buckets: 2048,
            tx_packets: 0,
            tx_bytes: 0,
            rx_packets: 0,
            rx_bytes: 0,
            new_flows: 0,
            flows,
            flows_ipv6,
            inbound: 0,
            replies: 0,
            nat_failures: 0,
            last_change: None,
            quota: None,
            egress: None,
            suspicions: 0,
            false_alarms: 0,
            syn_retries: 0,
            ipv6: ipv6.map(|state| Ipv6Status {
                state: state.into(),
                address: "-".into(),
                gateway: "-".into(),
                gateway_mac: "-".into(),
                delegated: "-".into(),
                translated_to: "-".into(),
                health: "follows IPv4".into(),
                reason: String::new(),
            }),
        }
    }

    fn status(uplinks: Vec<UplinkStatus>, lan_prefix6: Option<&str>) -> Status {
        Status {
            mode: "5-tuple".into(),
            uplinks,
            reasons: Vec::new(),
            flows_expired: 0,
            flows_evicted: 0,
            pinned_at: "/sys/fs/bpf/lb".into(),
            adopted_flows: None,
            lan_ports: Vec::new(),
            lan_faults: Vec::new(),
            slow_path: None,
            own_path: None,
            tunnels_own: Vec::new(),
            tunnels_own_path: None,
            rounds: 0,
            routing_changes: 0,
            slow_path6: None,
            guard_dropped: 0,
            kernel_destinations: Vec::new(),
            lan_egress: Vec::new(),
            policies: Vec::new(),
            lan_prefix6: lan_prefix6.map(str::to_string),
            no_ring_watch: None,
            no_hand_over: None,
        }
    }

    /// `promtool check metrics` (Debian's prometheus package) on `text`.
    fn promtool(text: &str) {
        let mut child = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("promtool runs (install Debian's prometheus package)");
        child
            .stdin
            .take()
            .expect("promtool's stdin")
            .write_all(text.as_bytes())
            .expect("promtool reads the metrics");
        let out = child.wait_with_output().expect("promtool ends");
        assert!(
            out.status.success(),
            "promtool check metrics: {}{}\n{text}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The sample of `series` (name and labels, as exposed), if any.
    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn ipv6_state_and_flows_have_a_family_label_and_the_older_series_stay_as_they_were() {
        let text = render(status(
            vec![
                uplink("isp1", 10, 4, Some("active")),
                uplink("isp2", 7, 0, Some("down")),
            ],
            Some("2001:db8:1:1ab::/64"),
        ))
        .expect("renders");
        promtool(&text);
        for (series, value) in [
            (
                r#"lb_uplink_family_in_service{uplink="isp1",family="ipv4"}"#,
                1.0,
            ),
            (
                r#"lb_uplink_family_in_service{uplink="isp1",family="ipv6"}"#,
                1.0,
            ),
            (
                r#"lb_uplink_family_in_service{uplink="isp2",family="ipv6"}"#,
                0.0,
            ),
            (
                r#"lb_uplink_family_flows{uplink="isp1",family="ipv4"}"#,
                6.0,
            ),
            (
                r#"lb_uplink_family_flows{uplink="isp1",family="ipv6"}"#,
                4.0,
            ),
            (
                r#"lb_uplink_family_flows{uplink="isp2",family="ipv6"}"#,
                0.0,
            ),
            // Unchanged: one series an uplink, both families' flows.
            (r#"lb_uplink_in_service{uplink="isp2"}"#, 1.0),
            (r#"lb_uplink_flows{uplink="isp1"}"#, 10.0),
            ("lb_ipv6_balanced", 1.0),
        ] {
            assert_eq!(sample(&text, series), Some(value), "{series} in\n{text}");
        }
        assert!(
            !text.contains(r#"lb_uplink_in_service{uplink="isp1",family"#),
            "no label added to an older family"
        );
    }

    #[test]
    fn without_ipv6_balanced_there_is_no_ipv6_state_sample() {
        let text = render(status(vec![uplink("isp1", 3, 0, None)], None)).expect("renders");
        promtool(&text);
        assert_eq!(sample(&text, "lb_ipv6_balanced"), Some(0.0));
        assert_eq!(
            sample(
                &text,
                r#"lb_uplink_family_in_service{uplink="isp1",family="ipv6"}"#
            ),
            None
        );
        assert_eq!(
            sample(
                &text,
                r#"lb_uplink_family_flows{uplink="isp1",family="ipv4"}"#
            ),
            Some(3.0)
        );
    }
}
