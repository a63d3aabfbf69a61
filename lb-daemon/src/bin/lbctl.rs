//! lbctl: the operator's view of lbd.
//!
//! Exit codes: 0 success, 1 lbd refused the request or failed, 2 bad
//! command line, 3 lbd not reachable (or gone, under `events --follow`).

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use lb_daemon::control::api::{self, ClientError, Request, Response, Status, UplinkAction};
use lb_daemon::daemon::quota;

#[derive(Parser)]
#[command(name = "lbctl", version, about = "Control and inspect the lb daemon")]
struct Args {
    /// lbd's control socket.
    #[arg(long, global = true, default_value = api::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Uplinks with their state and counters.
    Status {
        /// Refresh every second, with per-uplink rates (Ctrl-C ends).
        #[arg(long)]
        watch: bool,
    },
    /// What happened recently: health transitions, lifecycle changes,
    /// operator actions, address and gateway changes.
    Events {
        /// Then keep printing new events as they happen (Ctrl-C ends).
        #[arg(long)]
        follow: bool,
    },
    /// Write lbctl's man page and shell completions into DIR (packaging).
    #[command(hide = true)]
    GenerateDocs { dir: PathBuf },
    /// Re-read lbd's configuration file and take it up without dropping a
    /// flow (as SIGHUP does); an invalid file changes nothing.
    Reload,
    /// Where a connection goes, and why: an existing flow's uplink, left
    /// to the kernel, or a new flow's bucket and uplink; for IPv6 also the
    /// source it leaves with (its own, or its NPTv6 translation). Decided
    /// by the data plane's own code on its own state.
    Explain {
        /// The client: ADDRESS[:PORT], an IPv6 address as [ADDRESS]:PORT or
        /// bare (ICMP echo: the identifier as port).
        #[arg(value_parser = endpoint)]
        src: (std::net::IpAddr, u16),
        /// The remote end, of the client's family: ADDRESS[:PORT].
        #[arg(value_parser = endpoint)]
        dst: (std::net::IpAddr, u16),
        /// tcp, udp or icmp (ICMPv6 for IPv6 addresses; icmpv6 says so too).
        #[arg(default_value = "tcp", value_parser = ["tcp", "udp", "icmp", "icmpv6"])]
        proto: String,
        /// The LAN port (or LAN) it comes in on, for rules on a LAN.
        #[arg(long)]
        lan: Option<String>,
        /// Its DSCP (0-63), for rules on DSCP.
        #[arg(long, value_parser = clap::value_parser!(u8).range(0..=63))]
        dscp: Option<u8>,
    },
    /// Connections in the flow table: client, remote, NAT address and
    /// port, uplink, state, idle time.
    Flows {
        /// Only this uplink's.
        #[arg(long)]
        uplink: Option<String>,
        /// Only this client's (an IPv4 address).
        #[arg(long)]
        client: Option<std::net::Ipv4Addr>,
        /// At most this many (the walk stops there).
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Change one uplink: takes effect in the data plane at once.
    Uplink {
        #[command(subcommand)]
        action: UplinkCommand,
    },
}

#[derive(Subcommand)]
enum UplinkCommand {
    /// Put an uplink back into service.
    Enable { name: String },
    /// Take an uplink out now; its flows move to other uplinks.
    Disable { name: String },
    /// No new flows; existing ones finish on it.
    Drain { name: String },
    /// Set the share of new flows (1-1000).
    Weight {
        name: String,
        #[arg(value_parser = clap::value_parser!(u32).range(1..=1000))]
        weight: u32,
    },
}

fn main() -> ExitCode {
    // Output cut short by a reader that went away (`lbctl status | head`)
    // ends lbctl quietly, as it does any Unix filter, instead of a panic.
    // SAFETY: setting a signal's disposition to its default, before any
    // thread exists.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let args = Args::parse_from(name_first(std::env::args_os().collect()));
    let request = match args.command {
        Command::Status { watch: true } if args.json => {
            eprintln!(
                "lbctl: status --watch draws a table every second, --json prints one status: \
                 give one of them"
            );
            return ExitCode::from(2);
        }
        Command::Status { watch: true } => return watch(&args.socket),
        Command::Status { watch: false } => Request::Status,
        Command::Reload => Request::Reload,
        Command::GenerateDocs { dir } => {
            use clap::CommandFactory as _;
            return match lb_daemon::control::docs::generate(Args::command(), "1", &dir) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("lbctl: {e:#}");
                    ExitCode::from(1)
                }
            };
        }
        Command::Explain {
            src,
            dst,
            proto,
            lan,
            dscp,
        } => {
            if src.0.is_ipv4() != dst.0.is_ipv4() {
                eprintln!(
                    "lbctl: explain {} to {}: give two IPv4 or two IPv6 addresses",
                    src.0, dst.0
                );
                return ExitCode::from(2);
            }
            let icmp = proto.starts_with("icmp");
            if proto == "icmpv6" && src.0.is_ipv4() {
                eprintln!(
                    "lbctl: explain {} to {}: icmpv6 is IPv6's; for IPv4 say icmp",
                    src.0, dst.0
                );
                return ExitCode::from(2);
            }
            // Balancing hashes the ports: a flow without them cannot exist.
            if !icmp && dst.1 == 0 {
                eprintln!(
                    "lbctl: explain {proto} to {}: give the remote port (ADDRESS:PORT, or \
                     [ADDRESS]:PORT for IPv6)",
                    dst.0
                );
                return ExitCode::from(2);
            }
            Request::Explain {
                lan,
                dscp,
                src: src.0,
                src_port: src.1,
                dst: dst.0,
                // ICMP echo has no destination port.
                dst_port: if icmp { 0 } else { dst.1 },
                proto: match proto.as_str() {
                    "udp" => 17,
                    _ if icmp && src.0.is_ipv6() => 58,
                    _ if icmp => 1,
                    _ => 6,
                },
            }
        }
        Command::Events { follow } => {
            return events(&args.socket, follow, args.json);
        }
        Command::Flows {
            uplink,
            client,
            limit,
        } => Request::Flows {
            uplink,
            client,
            limit,
        },
        Command::Uplink { action } => {
            let (name, action) = match action {
                UplinkCommand::Enable { name } => (name, UplinkAction::Enable),
                UplinkCommand::Disable { name } => (name, UplinkAction::Disable),
                UplinkCommand::Drain { name } => (name, UplinkAction::Drain),
                UplinkCommand::Weight { name, weight } => (name, UplinkAction::Weight { weight }),
            };
            Request::Uplink { name, action }
        }
    };
    match api::call(&args.socket, &request) {
        Ok(Response::Status(status)) => {
            if args.json {
                match serde_json::to_string_pretty(&status) {
                    Ok(s) => println!("{s}"),
                    Err(e) => {
                        eprintln!("lbctl: {e}");
                        return ExitCode::from(1);
                    }
                }
            } else {
                print_status(&status);
            }
            ExitCode::SUCCESS
        }
        Ok(Response::Flows(list)) => {
            if args.json {
                match serde_json::to_string_pretty(&list) {
                    Ok(s) => println!("{s}"),
                    Err(e) => {
                        eprintln!("lbctl: {e}");
                        return ExitCode::from(1);
                    }
                }
            } else {
                print_flows(&list);
            }
            ExitCode::SUCCESS
        }
        Ok(Response::Explained(e)) => {
            if args.json {
                match serde_json::to_string_pretty(&e) {
                    Ok(s) => println!("{s}"),
                    Err(err) => {
                        eprintln!("lbctl: {err}");
                        return ExitCode::from(1);
                    }
                }
            } else {
                println!(
                    "{}{}{}",
                    e.verdict,
                    e.uplink.map(|u| format!(" via {u}")).unwrap_or_default(),
                    e.source.map(|s| format!(" as {s}")).unwrap_or_default()
                );
                if let Some(policy) = &e.policy {
                    match e.rule {
                        Some(rule) => println!("  policy {policy}, by rule #{rule}"),
                        None => println!("  policy {policy}"),
                    }
                }
                for why in &e.why {
                    println!("  {why}");
                }
            }
            ExitCode::SUCCESS
        }
        Ok(Response::Events(_) | Response::Event(_)) => {
            eprintln!("lbctl: lbd sent events to a request for something else");
            ExitCode::from(1)
        }
        Ok(Response::Done { message }) => {
            if args.json {
                println!("{}", serde_json::json!({ "ok": true, "message": message }));
            } else {
                println!("{message}");
            }
            ExitCode::SUCCESS
        }
        Ok(Response::Error { message }) => {
            eprintln!("lbctl: {message}");
            ExitCode::from(1)
        }
        Err(e @ ClientError::NotRunning { .. }) => {
            eprintln!("lbctl: {e}");
            ExitCode::from(3)
        }
        Err(e) => {
            eprintln!("lbctl: {e}");
            ExitCode::from(1)
        }
    }
}

/// `lbctl status --watch`: the status every second, with the rates since
/// the last one.
fn watch(socket: &std::path::Path) -> ExitCode {
    let mut last: Option<(std::time::Instant, Status)> = None;
    loop {
        let status = match api::call(socket, &Request::Status) {
            Ok(Response::Status(s)) => *s,
            Ok(Response::Error { message }) => {
                eprintln!("lbctl: {message}");
                return ExitCode::from(1);
            }
            Ok(_) => {
                eprintln!("lbctl: lbd sent something else than a status");
                return ExitCode::from(1);
            }
            Err(e @ ClientError::NotRunning { .. }) => {
                eprintln!("lbctl: {e}");
                return ExitCode::from(3);
            }
            Err(e) => {
                eprintln!("lbctl: {e}");
                return ExitCode::from(1);
            }
        };
        let now = std::time::Instant::now();
        // Clear the terminal, then the status and the rates.
        print!("\x1b[2J\x1b[H");
        print_status(&status);
        if let Some((then, before)) = &last {
            let secs = now.duration_since(*then).as_secs_f64().max(1e-3);
            println!("\nrates over the last {secs:.1} s:");
            for (u, b) in status.uplinks.iter().zip(&before.uplinks) {
                let rate = |now: u64, was: u64| now.saturating_sub(was) as f64 / secs;
                println!(
                    "  {:<10} tx {:>10.0} pkt/s {:>10.2} Mbit/s   rx {:>10.0} pkt/s {:>10.2} Mbit/s   {:>6.0} new flows/s",
                    u.name,
                    rate(u.tx_packets, b.tx_packets),
                    rate(u.tx_bytes, b.tx_bytes) * 8.0 / 1e6,
                    rate(u.rx_packets, b.rx_packets),
                    rate(u.rx_bytes, b.rx_bytes) * 8.0 / 1e6,
                    rate(u.new_flows, b.new_flows),
                );
            }
        }
        last = Some((now, status));
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}

/// `ADDRESS[:PORT]` (IPv6: `[ADDRESS]:PORT`, or `ADDRESS` bare), the port
/// 0 when left out.
fn endpoint(text: &str) -> Result<(std::net::IpAddr, u16), String> {
    let bad_port = |_| format!("expected a port (0-65535) after ':', got {text:?}");
    if let Some(rest) = text.strip_prefix('[') {
        let (addr, port) = rest
            .split_once(']')
            .ok_or_else(|| format!("expected [IPv6 ADDRESS]:PORT, got {text:?}"))?;
        let addr: std::net::Ipv6Addr = addr
            .parse()
            .map_err(|_| format!("expected an IPv6 address inside [ ], got {text:?}"))?;
        let port = match port.strip_prefix(':') {
            Some(p) => p.parse().map_err(bad_port)?,
            None if port.is_empty() => 0,
            None => return Err(format!("expected ':PORT' after ']', got {text:?}")),
        };
        return Ok((addr.into(), port));
    }
    // A bare IPv6 address has colons of its own.
    if let Ok(addr) = text.parse::<std::net::Ipv6Addr>() {
        return Ok((addr.into(), 0));
    }
    let (addr, port) = text.split_once(':').unwrap_or((text, "0"));
    let addr: std::net::Ipv4Addr = addr.parse().map_err(|_| {
        format!("expected an IPv4 ADDRESS[:PORT] or an IPv6 [ADDRESS]:PORT, got {text:?}")
    })?;
    Ok((addr.into(), port.parse().map_err(bad_port)?))
}

/// `lbctl events [--follow]`: one line an event.
fn events(socket: &std::path::Path, follow: bool, json: bool) -> ExitCode {
    let print = |e: &lb_daemon::control::events::Event| {
        if json {
            if let Ok(line) = serde_json::to_string(e) {
                println!("{line}");
            }
        } else {
            println!(
                "{}  {:<9} {:<8} {}",
                e.at,
                e.kind,
                e.uplink.as_deref().unwrap_or("-"),
                e.message
            );
        }
    };
    let mut failed = None;
    // A follower waits as long as it takes for the next event.
    let timeout = (!follow).then(|| std::time::Duration::from_secs(5));
    let result = api::call_stream(socket, &Request::Events { follow }, timeout, |reply| {
        match reply {
            Response::Events(list) => list.iter().for_each(print),
            Response::Event(e) => print(&e),
            Response::Error { message } => {
                failed = Some(message);
                return false;
            }
            _ => {
                failed = Some("lbd sent something else than events".into());
                return false;
            }
        }
        follow
    });
    match (result, failed) {
        // A follower reads until lbd hangs up: it stopped, or started again.
        (Ok(()), None) if follow => {
            eprintln!("lbctl: lbd closed the event stream (it stopped or started again)");
            ExitCode::from(3)
        }
        (Ok(()), None) => ExitCode::SUCCESS,
        (Ok(()), Some(message)) => {
            eprintln!("lbctl: {message}");
            ExitCode::from(1)
        }
        (Err(e @ ClientError::NotRunning { .. }), _) => {
            eprintln!("lbctl: {e}");
            ExitCode::from(3)
        }
        (Err(e), _) => {
            eprintln!("lbctl: {e}");
            ExitCode::from(1)
        }
    }
}

fn print_flows(list: &api::FlowList) {
    println!(
        "{:<5} {:<21} {:<21} {:<21} {:<10} {:<11} {:>8}",
        "PROTO", "CLIENT", "REMOTE", "NAT", "UPLINK", "STATE", "IDLE_S"
    );
    for f in &list.flows {
        println!(
            "{:<5} {:<21} {:<21} {:<21} {:<10} {:<11} {:>8.1}",
            f.proto, f.client, f.remote, f.nat, f.uplink, f.state, f.idle_s
        );
    }
    let more = if list.truncated {
        " (stopped at the limit: there may be more; --limit)"
    } else {
        ""
    };
    println!(
        "{} flows shown, {} looked at{more}",
        list.flows.len(),
        list.walked
    );
}

fn print_status(s: &Status) {
    println!("classifier: {}", s.mode);
    println!(
        "{:<10} {:<8} {:<15} {:>6} {:>4} {:<8} {:<25} {:<6} {:>7} {:>8} {:>6} {:>7} {:>10} {:>12} {:>10} {:>12}  REASON",
        "UPLINK", "IFACE", "ADDRESS", "WEIGHT", "TIER", "ADMIN", "LIFECYCLE", "STATE", "BUCKETS", "RTT_MS", "LOSS%", "FLOWS",
        "TX_PKTS", "TX_BYTES", "RX_PKTS", "RX_BYTES"
    );
    for u in &s.uplinks {
        let rtt = u
            .rtt_ms
            .map_or_else(|| "-".to_string(), |r| format!("{r:.2}"));
        println!(
            "{:<10} {:<8} {:<15} {:>6} {:>4} {:<8} {:<25} {:<6} {:>7} {:>8} {:>6.1} {:>7} {:>10} {:>12} {:>10} {:>12}  {}",
            u.name, u.interface, u.address, u.weight, u.tier, u.admin, u.lifecycle, u.state, u.buckets, rtt, u.loss_percent,
            u.flows, u.tx_packets, u.tx_bytes, u.rx_packets, u.rx_bytes, u.reason
        );
    }
    let gateways: Vec<String> = s
        .uplinks
        .iter()
        .map(|u| {
            format!(
                "{} {} ({}) at {}, table {} rule {}",
                u.name, u.gateway, u.gateway_config, u.gateway_mac, u.table, u.rule_priority
            )
        })
        .collect();
    println!("gateways: {}", gateways.join("; "));
    match &s.lan_prefix6 {
        Some(lan) => {
            let sides: Vec<String> = s
                .uplinks
                .iter()
                .filter_map(|u| {
                    let v6 = u.ipv6.as_ref()?;
                    let health = if v6.health == "follows IPv4" {
                        String::new()
                    } else {
                        format!(" (IPv6 health {}: {})", v6.health, v6.reason)
                    };
                    Some(format!(
                        "{} {}{health} as {} (delegated {}), via {} at {}",
                        u.name,
                        v6.state,
                        v6.translated_to,
                        v6.delegated,
                        v6.gateway,
                        v6.gateway_mac
                    ))
                })
                .collect();
            println!("ipv6: the LAN carries {lan}; {}", sides.join("; "));
        }
        None => println!("ipv6: not balanced (the LAN carries no global prefix): the kernel's"),
    }
    let quotas: Vec<String> = s
        .uplinks
        .iter()
        .filter_map(|u| {
            let q = u.quota.as_ref()?;
            let state = if q.reached {
                format!("reached: {}", q.action)
            } else {
                format!("{} when reached", q.action)
            };
            Some(format!(
                "{} {} of {} this {} ({state}), renews {}",
                u.name,
                quota::human(q.used_bytes),
                quota::human(q.limit_bytes),
                q.period,
                quota::utc_text(q.next_period)
            ))
        })
        .collect();
    if !quotas.is_empty() {
        println!("quotas: {}", quotas.join("; "));
    }
    let passive: Vec<String> = s
        .uplinks
        .iter()
        .filter(|u| u.suspicions > 0 || u.syn_retries > 0)
        .map(|u| {
            format!(
                "{} {} bursts ({} proved false), {} SYNs sent again",
                u.name, u.suspicions, u.false_alarms, u.syn_retries
            )
        })
        .collect();
    if !passive.is_empty() {
        println!("traffic's suspicions: {}", passive.join("; "));
    }
    let egress: Vec<String> = s
        .uplinks
        .iter()
        .filter_map(|u| u.egress.as_ref())
        .chain(&s.lan_egress)
        .map(|e| match e.ring_drops {
            Some(n) if n > 0 => format!(
                "{} by {} ({}; {n} frames lost to its full ring)",
                e.device, e.path, e.why
            ),
            _ => format!("{} by {} ({})", e.device, e.path, e.why),
        })
        .collect();
    if !egress.is_empty() {
        println!("egress: {}", egress.join("; "));
    }
    for fault in &s.lan_faults {
        println!("LAN port not attached (its clients take the kernel's path): {fault}");
    }
    if let Some(why) = &s.no_ring_watch {
        println!("ring watch: none ({why}): a full ring drops what XDP_REDIRECT sends it");
    }
    if let Some(why) = &s.no_hand_over {
        println!(
            "too-big datagrams: not handed over ({why}): a UDP datagram too big for its uplink \
             without DF leaves translated by the kernel's slow path, from another port than its \
             flow's"
        );
    }
    if !s.kernel_destinations.is_empty() {
        println!("left to the kernel: {}", s.kernel_destinations.join(" "));
    }
    // The default policy alone is not worth a line until rules exist.
    if s.policies.len() > 1 {
        let policies: Vec<String> = s
            .policies
            .iter()
            .map(|p| {
                let list = |l: &[String]| {
                    if l.is_empty() {
                        "nothing".to_string()
                    } else {
                        l.join(",")
                    }
                };
                let six = if p.taking6 == p.taking || p.taking6.is_empty() {
                    String::new()
                } else {
                    format!(", IPv6 -> {}", list(&p.taking6))
                };
                format!(
                    "{} -> {}{six} ({} new flows, {} dropped, {} unreachable, {} sticky now; fallback {})",
                    p.name,
                    list(&p.taking),
                    p.new_flows,
                    p.dropped,
                    p.unreachable,
                    p.sticky_entries,
                    p.fallback
                )
            })
            .collect();
        println!("policies: {}", policies.join("; "));
    }
    println!(
        "flows expired: {}, evicted (table full): {}",
        s.flows_expired, s.flows_evicted
    );
    let inbound: Vec<String> = s
        .uplinks
        .iter()
        .filter(|u| u.inbound > 0)
        .map(|u| format!("{} {}", u.name, u.inbound))
        .collect();
    if !inbound.is_empty() {
        println!(
            "inbound connections (port forwards, the router's services; their replies leave the way they came): {}",
            inbound.join("; ")
        );
    }
    let six = match (&s.lan_prefix6, &s.slow_path6) {
        (Some(_), Some(u)) => format!(", IPv6 by {u}"),
        (Some(_), None) => ", IPv6 by the main table".to_string(),
        (None, _) => String::new(),
    };
    let by = |u: &Option<String>| u.clone().unwrap_or_else(|| "by the main table".into());
    let mut paths = if s.own_path == s.slow_path {
        format!(
            "slow path (ESP, GRE, fragments, the router's own traffic): {}{six}",
            by(&s.slow_path)
        )
    } else {
        format!(
            "slow path (ESP, GRE, fragments): {}{six}; the router's own traffic (not into a tunnel that is no WireGuard): {}",
            by(&s.slow_path),
            by(&s.own_path)
        )
    };
    if !s.tunnels_own.is_empty() {
        paths += &format!(
            "; the tunnels' own packets: {} ({})",
            by(&s.tunnels_own_path),
            s.tunnels_own.join(", ")
        );
    }
    println!(
        "{paths}; guard: {} packets dropped on their way out of an uplink with a source not its own",
        s.guard_dropped
    );
    let nonzero: Vec<String> = s
        .reasons
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(r, n)| format!("{r}={n}"))
        .collect();
    if !nonzero.is_empty() {
        println!("to kernel / dropped: {}", nonzero.join(" "));
    }
}

/// `lbctl uplink isp2 disable`, as an operator may say it, read as
/// `lbctl uplink disable isp2`: the name, then the verb, is swapped when
/// the word after `uplink` is no verb and the one after it is.
fn name_first(mut args: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    const VERBS: [&str; 5] = ["enable", "disable", "drain", "weight", "help"];
    // The words, by index: neither options nor `--socket`'s value.
    let mut words = Vec::new();
    let mut i = 1;
    while let Some(arg) = args.get(i) {
        match arg.to_str() {
            Some("--") => break,
            Some("--socket") => i += 2,
            Some(a) if a.starts_with('-') => i += 1,
            _ => {
                words.push(i);
                i += 1;
            }
        }
    }
    let is_verb = |i: usize| args[i].to_str().is_some_and(|a| VERBS.contains(&a));
    if let [command, name, verb, ..] = words[..] {
        if args[command] == "uplink" && !is_verb(name) && is_verb(verb) {
            args.swap(name, verb);
        }
    }
    args
}

#[cfg(test)]
mod tests {
    use super::{endpoint, name_first};

    #[test]
    fn an_uplinks_name_may_come_before_its_verb() {
        let read = |line: &str| -> String {
            let args = line.split(' ').map(Into::into).collect();
            let args: Vec<String> = name_first(args)
                .into_iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect();
            args.join(" ")
        };
        for (said, read_as) in [
            ("lbctl uplink isp2 disable", "lbctl uplink disable isp2"),
            ("lbctl uplink disable isp2", "lbctl uplink disable isp2"),
            ("lbctl uplink isp2 weight 5", "lbctl uplink weight isp2 5"),
            (
                "lbctl --socket /run/x.sock uplink isp2 drain",
                "lbctl --socket /run/x.sock uplink drain isp2",
            ),
            (
                "lbctl --json uplink isp2 enable",
                "lbctl --json uplink enable isp2",
            ),
            (
                "lbctl uplink --json isp2 enable",
                "lbctl uplink --json enable isp2",
            ),
            (
                "lbctl uplink isp2 --socket /run/x.sock drain",
                "lbctl uplink drain --socket /run/x.sock isp2",
            ),
            // Not an uplink command, or nothing to swap: as said.
            ("lbctl status", "lbctl status"),
            ("lbctl uplink isp2", "lbctl uplink isp2"),
            ("lbctl uplink isp2 isp3", "lbctl uplink isp2 isp3"),
            (
                "lbctl explain uplink disable",
                "lbctl explain uplink disable",
            ),
        ] {
            assert_eq!(read(said), read_as, "{said}");
        }
    }

    #[test]
    fn endpoints_of_both_families() {
        let ok = |t: &str| endpoint(t).map(|(a, p)| (a.to_string(), p));
        assert_eq!(ok("10.10.0.2:5555"), Ok(("10.10.0.2".into(), 5555)));
        assert_eq!(ok("10.10.0.2"), Ok(("10.10.0.2".into(), 0)));
        assert_eq!(
            ok("[2001:db8:1:1ab::10]:443"),
            Ok(("2001:db8:1:1ab::10".into(), 443))
        );
        assert_eq!(ok("[2001:db8::1]"), Ok(("2001:db8::1".into(), 0)));
        assert_eq!(ok("2001:db8::1"), Ok(("2001:db8::1".into(), 0)));
        for bad in [
            "10.10.0.2:x",
            "[2001:db8::1]:70000",
            "[2001:db8::1]443",
            "[10.0.0.1]:1",
            "host:80",
        ] {
            assert!(endpoint(bad).is_err(), "{bad}");
        }
    }
}
