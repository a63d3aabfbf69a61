//! Link and neighbour events: a netlink subscription to the kernel's link
//! and neighbour notifications (`RTNLGRP_LINK`, `RTNLGRP_NEIGH`) that tells
//! each subscriber when its interface's operational state or carrier
//! changes, and when the Ethernet address the kernel holds for a watched
//! gateway changes (the ISP swapped its router, or a VRRP pair failed
//! over), as it happens.
//!
//! Owns the multicast netlink socket and the notion of an interface being
//! "up" for lb ([`is_up`]: administratively up, with carrier, and an
//! operational state of up or unknown). Event-driven: the kernel pushes a
//! message on every change; the only dumps are one at start, to catch up
//! with what changed before the watch ran, and one after the socket's buffer
//! overflowed and messages were lost.
//!
//! It never polls, never changes an interface or a neighbour, and never
//! judges an uplink's health: it reports edges (up -> down, down -> up) of
//! watched interfaces and the addresses of watched gateways only, and
//! `health` and the daemon decide what they mean.

use std::collections::HashMap;
use std::io;
use std::net::Ipv4Addr;

use futures::channel::mpsc::UnboundedReceiver;
use futures::{StreamExt, TryStreamExt};
use rtnetlink::packet_core::{NetlinkMessage, NetlinkPayload};
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkMessage, State};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::proto::Connection;
use rtnetlink::sys::SocketAddr;
use rtnetlink::{Handle, MulticastGroup};
use tokio::sync::mpsc;

use crate::netlink::{usable_neighbour, Neighbour};

/// A watched interface went up or down.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkEvent {
    pub ifindex: u32,
    pub ifname: String,
    /// See [`is_up`].
    pub up: bool,
    /// When lbd read the kernel's message: where the time lbd takes to
    /// react starts.
    pub at: tokio::time::Instant,
}

/// The Ethernet address the kernel holds for a watched gateway, on each
/// change of its neighbour entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayEvent {
    /// The uplink the gateway belongs to, as given to
    /// [`LinkWatch::watch_gateway`].
    pub uplink: usize,
    pub gateway: Ipv4Addr,
    pub mac: [u8; 6],
}

#[derive(Debug, thiserror::Error)]
pub enum LinkWatchError {
    #[error("cannot subscribe to netlink link and neighbour events")]
    Subscribe(#[source] io::Error),
    #[error("listing interfaces over netlink failed")]
    Dump(#[source] rtnetlink::Error),
    #[error("listing neighbours over netlink failed")]
    NeighbourDump(#[source] rtnetlink::Error),
    #[error("the netlink socket for link events closed")]
    Closed,
}

/// Whether `link` can carry traffic: administratively up (`IFF_UP`), with
/// carrier (`IFF_LOWER_UP`, and `IFLA_CARRIER` when present), and an
/// operational state of up, or unknown for drivers that do not report one.
pub fn is_up(link: &LinkMessage) -> bool {
    let flags = link.header.flags;
    flags.contains(LinkFlags::Up)
        && flags.contains(LinkFlags::LowerUp)
        && link.attributes.iter().all(|attribute| match attribute {
            LinkAttribute::OperState(state) => matches!(state, State::Up | State::Unknown),
            LinkAttribute::Carrier(carrier) => *carrier != 0,
            _ => true,
        })
}

fn name_of(link: &LinkMessage) -> Option<&str> {
    link.attributes
        .iter()
        .find_map(|attribute| match attribute {
            LinkAttribute::IfName(name) => Some(name.as_str()),
            _ => None,
        })
}

struct Watched {
    ifname: String,
    /// As last reported to (or believed by) the subscriber.
    up: bool,
    events: mpsc::Sender<LinkEvent>,
}

/// A watched gateway: whose it is, and who is told.
struct Gateway {
    uplink: usize,
    events: mpsc::Sender<GatewayEvent>,
}

/// Watched gateways by (interface index, gateway address).
type Gateways = HashMap<(u32, Ipv4Addr), Gateway>;

type Messages = UnboundedReceiver<(NetlinkMessage<RouteNetlinkMessage>, SocketAddr)>;

/// The subscription, and who is told about which interface.
///
/// Subscribe first, then read the interfaces' state and build the health
/// checks, then [`run`](LinkWatch::run): changes in between wait in the
/// socket, and the dump at the start of `run` catches up with the rest.
pub struct LinkWatch {
    connection: Connection<RouteNetlinkMessage>,
    handle: Handle,
    messages: Messages,
    watched: HashMap<u32, Watched>,
    gateways: Gateways,
}

impl LinkWatch {
    /// Opens a netlink socket in the current network namespace and joins
    /// the link and neighbour notification groups. Nothing is read until
    /// [`run`](Self::run).
    pub fn subscribe() -> Result<Self, LinkWatchError> {
        let (connection, handle, messages) =
            rtnetlink::new_multicast_connection(&[MulticastGroup::Link, MulticastGroup::Neigh])
                .map_err(LinkWatchError::Subscribe)?;
        Ok(Self {
            connection,
            handle,
            messages,
            watched: HashMap::new(),
            gateways: HashMap::new(),
        })
    }

    /// Reports on `events` the Ethernet address of `gateway` on interface
    /// `ifindex` whenever the kernel's neighbour entry for it changes (its
    /// state, mostly; the subscriber looks for a new address, and a change
    /// it failed to apply comes round again). Entries being resolved or
    /// failed are not reported: the last address that worked stays.
    pub fn watch_gateway(
        &mut self,
        ifindex: u32,
        gateway: Ipv4Addr,
        uplink: usize,
        events: mpsc::Sender<GatewayEvent>,
    ) {
        self.gateways
            .insert((ifindex, gateway), Gateway { uplink, events });
    }

    /// Reports changes of interface `ifindex` (called `ifname`) on `events`.
    /// `up` is what the subscriber believes now; if the interface is found
    /// otherwise when `run` starts, that is reported at once.
    pub fn watch(&mut self, ifindex: u32, ifname: &str, up: bool, events: mpsc::Sender<LinkEvent>) {
        self.watched.insert(
            ifindex,
            Watched {
                ifname: ifname.to_owned(),
                up,
                events,
            },
        );
    }

    /// Reports changes until every subscriber has dropped its receiver
    /// (`Ok`, noticed at the next link message) or the socket fails. Must
    /// run on the tokio runtime.
    pub async fn run(self) -> Result<(), LinkWatchError> {
        let Self {
            connection,
            handle,
            mut messages,
            mut watched,
            mut gateways,
        } = self;
        // Ends by itself once `handle` and `messages` are dropped.
        tokio::spawn(connection);

        catch_up(&handle, &mut watched).await?;
        catch_up_gateways(&handle, &mut gateways).await?;
        while !watched.is_empty() || !gateways.is_empty() {
            let Some((message, _)) = messages.next().await else {
                return Err(LinkWatchError::Closed);
            };
            watched.retain(|_, w| !w.events.is_closed());
            gateways.retain(|_, g| !g.events.is_closed());
            match message.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) => {
                    let up = is_up(&link);
                    update(&mut watched, link.header.index, name_of(&link), up).await;
                }
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(link)) => {
                    update(&mut watched, link.header.index, name_of(&link), false).await;
                }
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNeighbour(neighbour)) => {
                    if let Some(neighbour) = usable_neighbour(&neighbour) {
                        update_gateway(&mut gateways, neighbour).await;
                    }
                }
                NetlinkPayload::Overrun(_) => {
                    log::warn!("netlink link or neighbour events were lost (socket buffer full); re-reading interfaces and neighbours");
                    catch_up(&handle, &mut watched).await?;
                    catch_up_gateways(&handle, &mut gateways).await?;
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// Dumps every interface and reports the watched ones whose state is not
/// what their subscriber believes; a watched interface that is gone is down.
async fn catch_up(
    handle: &Handle,
    watched: &mut HashMap<u32, Watched>,
) -> Result<(), LinkWatchError> {
    let mut links = handle.link().get().execute();
    let mut current: HashMap<u32, (Option<String>, bool)> = HashMap::new();
    while let Some(link) = links.try_next().await.map_err(LinkWatchError::Dump)? {
        if watched.contains_key(&link.header.index) {
            let name = name_of(&link).map(str::to_owned);
            current.insert(link.header.index, (name, is_up(&link)));
        }
    }
    let indexes: Vec<u32> = watched.keys().copied().collect();
    for ifindex in indexes {
        let (name, up) = current.remove(&ifindex).unwrap_or((None, false));
        update(watched, ifindex, name.as_deref(), up).await;
    }
    Ok(())
}

/// Dumps the IPv4 neighbours and reports the watched gateways'.
async fn catch_up_gateways(handle: &Handle, gateways: &mut Gateways) -> Result<(), LinkWatchError> {
    if gateways.is_empty() {
        return Ok(());
    }
    let mut dump = handle
        .neighbours()
        .get()
        .set_address_family(AddressFamily::Inet)
        .execute();
    let mut found = Vec::new();
    while let Some(message) = dump
        .try_next()
        .await
        .map_err(LinkWatchError::NeighbourDump)?
    {
        found.extend(usable_neighbour(&message));
    }
    for neighbour in found {
        update_gateway(gateways, neighbour).await;
    }
    Ok(())
}

/// Tells a watched gateway's subscriber its address; forgets subscribers
/// that are gone.
async fn update_gateway(gateways: &mut Gateways, neighbour: Neighbour) {
    let key = (neighbour.ifindex, neighbour.ip);
    let Some(entry) = gateways.get(&key) else {
        return;
    };
    let event = GatewayEvent {
        uplink: entry.uplink,
        gateway: neighbour.ip,
        mac: neighbour.mac,
    };
    if entry.events.send(event).await.is_err() {
        gateways.remove(&key);
    }
}

/// Records the state of `ifindex` and tells its subscriber when it changed;
/// forgets subscribers that are gone.
async fn update(watched: &mut HashMap<u32, Watched>, ifindex: u32, name: Option<&str>, up: bool) {
    let Some(entry) = watched.get_mut(&ifindex) else {
        return;
    };
    if let Some(name) = name {
        if entry.ifname != name {
            entry.ifname = name.to_owned();
        }
    }
    if entry.up == up {
        return;
    }
    entry.up = up;
    let event = LinkEvent {
        ifindex,
        ifname: entry.ifname.clone(),
        up,
        at: tokio::time::Instant::now(),
    };
    log::debug!(
        "link {} (index {ifindex}) is {}",
        event.ifname,
        if up { "up" } else { "down" }
    );
    if entry.events.send(event).await.is_err() {
        watched.remove(&ifindex);
    }
}

/// Network namespaces for root tests: created with a unique `hdev-` name,
/// deleted on drop, entered from threads of their own.
#[cfg(test)]
pub(crate) mod testns {
    use std::fs::File;
    use std::os::fd::AsRawFd;
    use std::process::{Command, Stdio};
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::thread;

    static NEXT: AtomicU32 = AtomicU32::new(0);

    pub(crate) struct NetNs {
        name: String,
    }

    impl NetNs {
        /// A new namespace, or `None` after printing why the test is
        /// skipped (not root, or no `ip`).
        pub(crate) fn create(test: &str) -> Option<NetNs> {
            // SAFETY: geteuid has no preconditions and cannot fail.
            if unsafe { libc::geteuid() } != 0 {
                eprintln!("SKIPPED {test}: needs root to create network namespaces");
                return None;
            }
            let name = format!(
                "hdev-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            );
            match run(&["netns", "add", &name]) {
                Ok(_) => Some(NetNs { name }),
                Err(e) => {
                    eprintln!("SKIPPED {test}: cannot create a network namespace: {e}");
                    None
                }
            }
        }

        pub(crate) fn name(&self) -> &str {
            &self.name
        }

        /// `ip -n NAME ARGS...`, panicking with its stderr on failure.
        pub(crate) fn ip(&self, args: &[&str]) -> String {
            let mut all = vec!["-n", &self.name];
            all.extend_from_slice(args);
            run(&all).unwrap_or_else(|e| panic!("{e}"))
        }

        /// The index of interface `ifname` in this namespace.
        pub(crate) fn ifindex(&self, ifname: &str) -> u32 {
            let out = self.ip(&["-o", "link", "show", "dev", ifname]);
            out.split(':')
                .next()
                .and_then(|n| n.trim().parse().ok())
                .unwrap_or_else(|| panic!("no index in {out:?}"))
        }

        /// Whether `ip` shows `ifname` with carrier (`LOWER_UP`).
        pub(crate) fn has_carrier(&self, ifname: &str) -> bool {
            self.ip(&["-o", "link", "show", "dev", ifname])
                .contains("LOWER_UP")
        }

        /// Runs `f` on a new thread inside this namespace.
        pub(crate) fn spawn<F, R>(&self, f: F) -> thread::JoinHandle<R>
        where
            F: FnOnce() -> R + Send + 'static,
            R: Send + 'static,
        {
            let path = format!("/run/netns/{}", self.name);
            thread::spawn(move || {
                let file = File::open(&path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
                // SAFETY: `file` is an open namespace file; setns moves only
                // this thread, which this function created.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
                f()
            })
        }
    }

    impl Drop for NetNs {
        fn drop(&mut self) {
            if let Err(e) = run(&["netns", "del", &self.name]) {
                eprintln!("warning: {e}");
            }
        }
    }

    fn run(args: &[&str]) -> Result<String, String> {
        let out = Command::new("ip")
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run ip: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "`ip {}` failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc as std_mpsc;
    use std::time::{Duration, Instant};

    use super::testns::NetNs;
    use super::*;

    fn link(flags: LinkFlags, attributes: Vec<LinkAttribute>) -> LinkMessage {
        let mut link = LinkMessage::default();
        link.header.index = 7;
        link.header.flags = flags;
        link.attributes = attributes;
        link
    }

    #[test]
    fn what_up_means() {
        let up_flags = LinkFlags::Up | LinkFlags::LowerUp | LinkFlags::Running;
        let name = LinkAttribute::IfName("wan1".into());
        assert!(is_up(&link(up_flags, vec![name.clone()])));
        assert!(is_up(&link(
            up_flags,
            vec![
                LinkAttribute::OperState(State::Up),
                LinkAttribute::Carrier(1)
            ]
        )));
        assert!(is_up(&link(
            up_flags,
            vec![LinkAttribute::OperState(State::Unknown)]
        )));
        assert!(!is_up(&link(LinkFlags::Up, vec![])), "no carrier");
        assert!(!is_up(&link(LinkFlags::LowerUp, vec![])), "admin down");
        assert!(!is_up(&link(
            up_flags,
            vec![LinkAttribute::OperState(State::LowerLayerDown)]
        )));
        assert!(!is_up(&link(
            up_flags,
            vec![LinkAttribute::OperState(State::Dormant)]
        )));
        assert!(!is_up(&link(up_flags, vec![LinkAttribute::Carrier(0)])));
        assert_eq!(name_of(&link(up_flags, vec![name])), Some("wan1"));
        assert_eq!(name_of(&link(up_flags, vec![])), None);
    }

    /// Runs `ip -n NS ARGS...` and waits for the next event, at most
    /// `within`; the event and how long it took since the command started.
    fn provoke(
        ns: &NetNs,
        args: &[&str],
        events: &std_mpsc::Receiver<LinkEvent>,
        within: Duration,
    ) -> (LinkEvent, Duration) {
        let start = Instant::now();
        ns.ip(args);
        let event = events.recv_timeout(within).unwrap_or_else(|e| {
            panic!(
                "no link event within {within:?} of `ip {}`: {e}",
                args.join(" ")
            )
        });
        (event, start.elapsed())
    }

    /// A veth pair in a namespace of its own: taking the peer down takes
    /// the watched end's carrier away, and the event arrives in
    /// milliseconds (veth carrier changes are urgent for the kernel's
    /// linkwatch, as they are on physical NICs unless another link event
    /// happened within the last second).
    #[test]
    fn carrier_changes_arrive_at_once() {
        let Some(ns) = NetNs::create("linkwatch::carrier_changes_arrive_at_once") else {
            return;
        };
        ns.ip(&["link", "add", "v0", "type", "veth", "peer", "name", "v1"]);
        ns.ip(&["link", "set", "v0", "up"]);
        ns.ip(&["link", "set", "v1", "up"]);
        let ifindex = ns.ifindex("v0");
        let deadline = Instant::now() + Duration::from_secs(5);
        while !ns.has_carrier("v0") {
            assert!(Instant::now() < deadline, "v0 never got carrier");
            std::thread::yield_now();
        }

        let (forward, events) = std_mpsc::channel();
        let (ready_tx, ready) = std_mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let watcher = ns.spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            runtime.block_on(async move {
                let mut watch = LinkWatch::subscribe().expect("subscribed");
                let (tx, mut rx) = mpsc::channel(16);
                watch.watch(ifindex, "v0", true, tx);
                let running = tokio::spawn(watch.run());
                ready_tx.send(()).expect("test waiting");
                tokio::select! {
                    () = async {
                        while let Some(event) = rx.recv().await {
                            if forward.send(event).is_err() {
                                break;
                            }
                        }
                    } => {}
                    _ = stopped => {}
                }
                running.abort();
            });
        });
        ready
            .recv_timeout(Duration::from_secs(5))
            .expect("watcher subscribed");

        // A bound for a test that must end, not a speed target: the
        // events come in milliseconds, on a busy machine in more.
        let bound = Duration::from_secs(10);
        let (event, took) = provoke(&ns, &["link", "set", "v1", "down"], &events, bound);
        eprintln!("carrier loss reported {took:?} after `ip link set v1 down` started");
        assert_eq!(
            (event.ifindex, event.ifname.as_str(), event.up),
            (ifindex, "v0", false)
        );
        let (event, took) = provoke(&ns, &["link", "set", "v1", "up"], &events, bound);
        eprintln!("carrier back reported {took:?} after `ip link set v1 up` started");
        assert!(event.up, "{event:?}");
        let (event, _) = provoke(&ns, &["link", "set", "v0", "down"], &events, bound);
        assert!(!event.up, "admin down: {event:?}");
        // Changes of other interfaces, and changes that keep v0 down, are
        // not reported.
        ns.ip(&["link", "set", "v1", "mtu", "1400"]);
        ns.ip(&["link", "set", "v0", "mtu", "1400"]);
        assert!(events.recv_timeout(Duration::from_millis(200)).is_err());

        let _ = stop.send(());
        watcher.join().expect("watcher thread");
    }

    #[test]
    fn catches_up_with_changes_before_run() {
        let Some(ns) = NetNs::create("linkwatch::catches_up_with_changes_before_run") else {
            return;
        };
        ns.ip(&["link", "add", "v0", "type", "veth", "peer", "name", "v1"]);
        let ifindex = ns.ifindex("v0");
        let (forward, events) = std_mpsc::channel();
        let watcher = ns.spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            runtime.block_on(async move {
                let mut watch = LinkWatch::subscribe().expect("subscribed");
                let (tx, mut rx) = mpsc::channel(16);
                // Believed up, but v0 was never set up.
                watch.watch(ifindex, "v0", true, tx);
                let running = tokio::spawn(watch.run());
                let first = tokio::time::timeout(Duration::from_secs(2), rx.recv()).await;
                let _ = forward.send(first.ok().flatten());
                // Dropping the last receiver ends the watch.
                drop(rx);
                let _ = forward.send(None);
                tokio::time::timeout(Duration::from_secs(2), running)
                    .await
                    .map(|joined| joined.map(|result| result.is_ok()))
            })
        });
        let first = events
            .recv_timeout(Duration::from_secs(5))
            .expect("a result");
        assert_eq!(
            first.map(|e| (e.ifindex, e.ifname, e.up)),
            Some((ifindex, "v0".to_string(), false))
        );
        let _ = events.recv_timeout(Duration::from_secs(5));
        // Nudge: the watch notices its last subscriber is gone on the next
        // message.
        ns.ip(&["link", "set", "v0", "up"]);
        let ended = watcher.join().expect("watcher thread");
        assert!(matches!(ended, Ok(Ok(true))), "{ended:?}");
    }
}
