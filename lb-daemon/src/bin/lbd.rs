//! lbd: the lb daemon. Validates its configuration, sets up (or adopts) the
//! XDP data plane, keeps it converged, and serves the control socket.
//!
//! Stopping (SIGTERM, SIGINT) leaves the data plane forwarding, pinned on
//! bpffs, with lbd's routes, rules and nftables guard: the next lbd adopts
//! it with its flows. `lbd --teardown` removes all of it.
//!
//! Exit codes: 0 clean shutdown, 64 bad configuration (nothing was touched),
//! 1 any other failure.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::Parser;
use lb_daemon::{
    config,
    daemon::{self, Daemon},
};

const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "lbd",
    version,
    about = "lb daemon: XDP multi-WAN load balancing with failover",
    long_about = "lb daemon: XDP multi-WAN load balancing with failover.\n\n\
        lbd spreads the LAN's new connections over the router's uplinks in an XDP \
        program, NATs them to the chosen uplink's address and forwards them; it probes \
        every uplink and moves new connections off one that fails. It follows the \
        uplinks' interfaces, addresses and gateways as they come and go (DHCP, PPPoE, \
        late modems).\n\n\
        Signals: SIGHUP reloads the configuration (as `lbctl reload`; an invalid file \
        changes nothing). SIGTERM and SIGINT stop lbd and leave the data plane \
        forwarding, pinned in the bpffs directory, for the next lbd to adopt with its \
        flows; `lbd --teardown` removes it.\n\n\
        Files: /etc/lb/lbd.toml (configuration; the package's copy documents every \
        key), /run/lb/lbd.sock (control socket, see \
        lbctl(1)), /sys/fs/bpf/lb (the pinned data plane)."
)]
struct Args {
    /// Configuration file.
    #[arg(short, long, default_value = "/etc/lb/lbd.toml")]
    config: PathBuf,
    /// Only validate the configuration, and check that the interfaces that
    /// exist now can take XDP-redirected frames, then exit (0 if both hold,
    /// 64 if the file is invalid, 1 if an interface would be refused).
    #[arg(long)]
    check: bool,
    /// Remove everything lbd owns in the kernel (the pinned data plane, so
    /// its programs detach; lbd's routing tables and rules; its nftables
    /// table), then exit. Stop lbd first. Without this, stopping lbd leaves
    /// the data plane forwarding for the next lbd to adopt.
    #[arg(long, conflicts_with = "check")]
    teardown: bool,
    /// Write lbd's man page and shell completions into DIR, then exit (for
    /// packaging).
    #[arg(long, value_name = "DIR", hide = true)]
    generate_docs: Option<PathBuf>,
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(
        env_logger::Env::default().default_filter_or("info,netlink_proto=error"),
    )
    .init();
    let args = Args::parse();
    if let Some(dir) = &args.generate_docs {
        use clap::CommandFactory as _;
        return match lb_daemon::control::docs::generate(Args::command(), "8", dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("lbd: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let config = match config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("lbd: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // NAT ports must never be ports the router's own sockets may take.
    let local_ports = match config::read_local_port_range() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("lbd: reading the kernel's ephemeral port range failed: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(conflict) = config::nat_range_conflict(&config.nat, local_ports) {
        eprintln!("lbd: {}: {conflict}", args.config.display());
        return ExitCode::from(EXIT_CONFIG);
    }
    // Allowed, but surely not meant: said before anything else.
    for warning in &config.warnings {
        eprintln!("lbd: warning: {warning}");
    }
    if args.check {
        println!("{}: configuration is valid", args.config.display());
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("lbd: starting the async runtime failed: {e}");
            return ExitCode::FAILURE;
        }
    };
    if args.check {
        // The interfaces as they are now: one that cannot take redirected
        // frames would be refused at start.
        return match runtime.block_on(lb_daemon::daemon::check_machine(&config)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("lbd: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    if args.teardown {
        return match runtime.block_on(Daemon::teardown(&config)) {
            Ok(()) => {
                println!(
                    "lbd: removed the data plane pinned at {}, lbd's routing tables and rules, and its nftables table",
                    config.daemon.bpffs.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("lbd: tearing down: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let result = runtime.block_on(daemon::run::run(config, local_ports, args.config.clone()));
    // Whatever still runs (a flow collection, a client's request) gets a
    // moment to end; none may hold the exit.
    runtime.shutdown_timeout(SHUTDOWN_GRACE);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lbd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// How long tasks still running at exit get to end.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
