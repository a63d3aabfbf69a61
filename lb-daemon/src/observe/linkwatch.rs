//! Kernel events: one netlink subscription to the kernel's link, address,
//! route and neighbour notifications. It does two things with them:
//!
//! - It tells each watched interface's subscriber (an uplink's health
//!   monitor) when that interface's carrier comes or goes, as the message
//!   arrives: the fast path of a carrier loss, which must not wait for
//!   anything else.
//! - It wakes the reconciler ([`LinkWatch::changed`]) on anything that may
//!   change what lbd observes: interfaces appearing, going or changing,
//!   addresses, routes, neighbours on watched interfaces, and what bridges learn
//!   (a MAC heard on a port, or on another one). The reconciler
//!   then reads the whole picture again (`kernel::Observed`); these events
//!   say only *that* something changed.
//!
//! Owns the multicast netlink socket and the notion of an interface being
//! "up" for lb ([`is_up`]: administratively up, with carrier, and an
//! operational state of up or unknown). Interfaces are watched by name, so
//! one that appears later (a PPPoE session, a USB modem) or comes back
//! with a new index is followed. The only dumps are one at start, to catch
//! up with what changed before the watch ran, and one after the socket's
//! buffer overflowed and messages were lost.
//!
//! It never polls, never changes anything, and never judges an uplink's
//! health: `health` and the daemon decide what events mean.

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::sync::{Arc, Mutex, PoisonError};

use futures::channel::mpsc::UnboundedReceiver;
use futures::{StreamExt, TryStreamExt};
use rtnetlink::packet_core::{NetlinkMessage, NetlinkPayload};
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkMessage, State};
use rtnetlink::packet_route::neighbour::NeighbourMessage;
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::proto::Connection;
use rtnetlink::sys::SocketAddr;
use rtnetlink::{Handle, MulticastGroup};
use tokio::sync::{mpsc, Notify};

use super::netlink::bridge_entry;

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

#[derive(Debug, thiserror::Error)]
pub enum LinkWatchError {
    #[error("cannot subscribe to netlink link, address, route and neighbour events")]
    Subscribe(#[source] io::Error),
    #[error("listing interfaces over netlink failed")]
    Dump(#[source] rtnetlink::Error),
    #[error("the netlink socket for kernel events closed")]
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
    /// The interface watched.
    ifname: String,
    /// Its index when last seen (0: not seen yet).
    ifindex: u32,
    /// As last reported to (or believed by) the subscriber.
    up: bool,
    events: mpsc::Sender<LinkEvent>,
}

/// Who is told about which interface, by subscriber (an uplink's health
/// monitor of one family: two may watch one interface). Shared between the
/// watch and the daemon, which adds and removes subscribers as uplinks come
/// and go.
#[derive(Clone, Default)]
pub struct Watchers(Arc<Mutex<HashMap<String, Watched>>>);

impl Watchers {
    /// Reports carrier changes of interface `ifname` on `events` from now
    /// on, in place of what `subscriber` had before. `up` is what the
    /// subscriber believes now.
    pub fn watch(&self, subscriber: &str, ifname: &str, up: bool, events: mpsc::Sender<LinkEvent>) {
        self.lock().insert(
            subscriber.to_owned(),
            Watched {
                ifname: ifname.to_owned(),
                ifindex: 0,
                up,
                events,
            },
        );
    }

    /// Stops reporting to `subscriber`.
    pub fn unwatch(&self, subscriber: &str) {
        self.lock().remove(subscriber);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Watched>> {
        // The map stays consistent whatever a panicking holder did.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether `ifindex` is a watched interface's.
    fn has_index(&self, ifindex: u32) -> bool {
        self.lock().values().any(|w| w.ifindex == ifindex)
    }

    /// Records the state of interface `name` (index `ifindex`) and tells
    /// its subscribers if it changed; forgets subscribers that are gone.
    async fn update(&self, ifindex: u32, name: &str, up: bool) {
        let sends: Vec<_> = {
            let mut map = self.lock();
            map.retain(|_, w| !w.events.is_closed());
            map.values_mut()
                .filter(|w| w.ifname == name)
                .filter_map(|w| {
                    w.ifindex = ifindex;
                    if w.up == up {
                        return None;
                    }
                    w.up = up;
                    let event = LinkEvent {
                        ifindex,
                        ifname: name.to_owned(),
                        up,
                        at: tokio::time::Instant::now(),
                    };
                    Some((w.events.clone(), event))
                })
                .collect()
        };
        if !sends.is_empty() {
            log::debug!(
                "link {name} (index {ifindex}) is {}",
                if up { "up" } else { "down" }
            );
        }
        // Sent without the lock: a subscriber may be slow.
        for (events, event) in sends {
            let _ = events.send(event).await;
        }
    }

    /// An interface that is gone: down for its subscribers.
    async fn gone(&self, ifindex: u32) {
        let name = self
            .lock()
            .values()
            .find(|w| w.ifindex == ifindex)
            .map(|w| w.ifname.clone());
        if let Some(name) = name {
            self.update(ifindex, &name, false).await;
        }
    }
}

/// The bridges whose forwarding entries wake the reconciler: the LAN
/// bridges whose clients lbd follows when they roam (`reconcile::roaming`).
/// What other bridges learn (a container bridge, a VM's) is not lbd's
/// business, and a busy one would wake a round for every MAC it hears.
/// Empty until the daemon's first round names them (that round reads
/// every entry anyway).
#[derive(Clone, Default)]
pub struct Bridges(Arc<Mutex<BTreeSet<u32>>>);

impl Bridges {
    /// From now on, the bridges (ifindexes) to wake the reconciler for.
    pub fn follow(&self, bridges: impl IntoIterator<Item = u32>) {
        *self.lock() = bridges.into_iter().collect();
    }

    /// Whether `msg`, a neighbour message, is a forwarding entry lbd
    /// follows: on one of these bridges, untagged (roaming leaves a
    /// VLAN-filtering bridge's clients alone).
    fn wakes_for(&self, msg: &NeighbourMessage) -> bool {
        bridge_entry(msg).is_some_and(|e| e.vlan.is_none() && self.lock().contains(&e.bridge))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeSet<u32>> {
        // A set of numbers stays consistent whatever a panicking holder did.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

type Messages = UnboundedReceiver<(NetlinkMessage<RouteNetlinkMessage>, SocketAddr)>;

/// The subscription, who is told about which interface, and the
/// reconciler's wake-up.
///
/// Subscribe first, then read the kernel's state, then [`run`](Self::run):
/// changes in between wait in the socket, and the dump at the start of
/// `run` catches up with the rest.
pub struct LinkWatch {
    connection: Connection<RouteNetlinkMessage>,
    handle: Handle,
    messages: Messages,
    watchers: Watchers,
    bridges: Bridges,
    changed: Arc<Notify>,
}

impl LinkWatch {
    /// Opens a netlink socket in the current network namespace and joins
    /// the link, IPv4 and IPv6 address and route, and neighbour notification
    /// groups, and tc's (qdiscs). Nothing is read until [`run`](Self::run).
    pub fn subscribe() -> Result<Self, LinkWatchError> {
        let (connection, handle, messages) = rtnetlink::new_multicast_connection(&[
            MulticastGroup::Link,
            MulticastGroup::Neigh,
            MulticastGroup::Ipv4Ifaddr,
            MulticastGroup::Ipv4Route,
            MulticastGroup::Ipv6Ifaddr,
            MulticastGroup::Ipv6Route,
            MulticastGroup::Tc,
        ])
        .map_err(LinkWatchError::Subscribe)?;
        Ok(Self {
            connection,
            handle,
            messages,
            watchers: Watchers::default(),
            bridges: Bridges::default(),
            changed: Arc::new(Notify::new()),
        })
    }

    /// The subscribers to carrier changes, for adding and removing them.
    pub fn watchers(&self) -> Watchers {
        self.watchers.clone()
    }

    /// The bridges whose forwarding entries wake the reconciler, for the
    /// daemon to name.
    pub fn bridges(&self) -> Bridges {
        self.bridges.clone()
    }

    /// Notified (one stored wake-up, however many events) when anything
    /// that lbd observes may have changed.
    pub fn changed(&self) -> Arc<Notify> {
        self.changed.clone()
    }

    /// Reports changes until the socket fails. Must run on the tokio
    /// runtime.
    pub async fn run(self) -> Result<(), LinkWatchError> {
        let Self {
            connection,
            handle,
            mut messages,
            watchers,
            bridges,
            changed,
        } = self;
        // Ends by itself once `handle` and `messages` are dropped.
        tokio::spawn(connection);

        catch_up(&handle, &watchers).await?;
        changed.notify_one();
        loop {
            let Some((message, _)) = messages.next().await else {
                return Err(LinkWatchError::Closed);
            };
            let NetlinkPayload::InnerMessage(message) = message.payload else {
                if let NetlinkPayload::Overrun(_) = message.payload {
                    log::warn!(
                        "netlink events were lost (socket buffer full); re-reading the kernel's state"
                    );
                    catch_up(&handle, &watchers).await?;
                    changed.notify_one();
                }
                continue;
            };
            match &message {
                RouteNetlinkMessage::NewLink(link) => {
                    if let Some(name) = name_of(link) {
                        watchers.update(link.header.index, name, is_up(link)).await;
                    }
                    changed.notify_one();
                }
                RouteNetlinkMessage::DelLink(link) => {
                    watchers.gone(link.header.index).await;
                    changed.notify_one();
                }
                RouteNetlinkMessage::NewAddress(_)
                | RouteNetlinkMessage::DelAddress(_)
                | RouteNetlinkMessage::NewRoute(_)
                | RouteNetlinkMessage::DelRoute(_)
                | RouteNetlinkMessage::NewQueueDiscipline(_)
                | RouteNetlinkMessage::DelQueueDiscipline(_) => changed.notify_one(),
                // Neighbours come and go all the time on a LAN: only an
                // uplink's (its gateway's) matter.
                RouteNetlinkMessage::NewNeighbour(n) | RouteNetlinkMessage::DelNeighbour(n)
                    if watchers.has_index(n.header.ifindex) =>
                {
                    changed.notify_one();
                }
                // A LAN bridge learned a MAC, or heard it on another port
                // (a client that roamed between two of the LAN's ports):
                // the bridge says so once, not for every frame.
                RouteNetlinkMessage::NewNeighbour(n) if bridges.wakes_for(n) => {
                    changed.notify_one();
                }
                _ => {}
            }
        }
    }
}

/// Dumps every interface and reports the watched ones whose state is not
/// what their subscriber believes; a watched interface that is missing is
/// down.
async fn catch_up(handle: &Handle, watchers: &Watchers) -> Result<(), LinkWatchError> {
    let mut links = handle.link().get().execute();
    let mut current: HashMap<String, (u32, bool)> = HashMap::new();
    while let Some(link) = links.try_next().await.map_err(LinkWatchError::Dump)? {
        if let Some(name) = name_of(&link) {
            current.insert(name.to_owned(), (link.header.index, is_up(&link)));
        }
    }
    let names: std::collections::BTreeSet<String> =
        watchers.lock().values().map(|w| w.ifname.clone()).collect();
    for name in names {
        let (ifindex, up) = current.get(&name).copied().unwrap_or((0, false));
        watchers.update(ifindex, &name, up).await;
    }
    Ok(())
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
        /// skipped (not root, or no `ip`); under `cargo xtask test`
        /// (`LB_REQUIRE_PREREQUISITES` set) a missing prerequisite fails
        /// the test instead, naming it.
        pub(crate) fn create(test: &str) -> Option<NetNs> {
            let skip = |why: String| {
                let required = std::env::var("LB_REQUIRE_PREREQUISITES")
                    .is_ok_and(|v| !v.is_empty() && v != "0");
                assert!(!required, "{test}: {why}");
                eprintln!("SKIPPED {test}: {why}");
                None
            };
            // SAFETY: geteuid has no preconditions and cannot fail.
            if unsafe { libc::geteuid() } != 0 {
                return skip("needs root to create network namespaces".into());
            }
            let name = format!(
                "hdev-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            );
            match run(&["netns", "add", &name]) {
                Ok(_) => Some(NetNs { name }),
                Err(e) => skip(format!("cannot create a network namespace: {e}")),
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

    #[test]
    fn only_the_lan_bridges_untagged_entries_wake_a_round() {
        use rtnetlink::packet_route::neighbour::{NeighbourAttribute, NeighbourState};
        use rtnetlink::packet_route::AddressFamily;
        let fdb = |bridge: u32, vlan: Option<u16>| {
            let mut msg = NeighbourMessage::default();
            msg.header.family = AddressFamily::Bridge;
            msg.header.ifindex = 5;
            msg.header.state = NeighbourState::Reachable;
            msg.attributes = vec![
                NeighbourAttribute::LinkLayerAddress(vec![2, 0, 0, 0, 0, 0x42]),
                NeighbourAttribute::Controller(bridge),
            ];
            msg.attributes.extend(vlan.map(NeighbourAttribute::Vlan));
            msg
        };
        let bridges = Bridges::default();
        assert!(!bridges.wakes_for(&fdb(3, None)), "none named yet");
        bridges.follow([3]);
        assert!(bridges.wakes_for(&fdb(3, None)), "the LAN bridge");
        assert!(
            !bridges.wakes_for(&fdb(9, None)),
            "another bridge (docker0)"
        );
        assert!(!bridges.wakes_for(&fdb(3, Some(10))), "a VLAN's entry");
        let mut ip_neighbour = fdb(3, None);
        ip_neighbour.header.family = AddressFamily::Inet;
        assert!(!bridges.wakes_for(&ip_neighbour), "an IPv4 neighbour");
        bridges.follow([]);
        assert!(!bridges.wakes_for(&fdb(3, None)), "no longer a LAN");
    }

    /// A link watch in `ns` with subscribers for `watched` (name, believed
    /// up), on a thread of its own, subscribed before this returns. Its
    /// events arrive on the receiver; sending on the stopper ends it.
    fn spawn_watcher(
        ns: &NetNs,
        watched: &[(&str, bool)],
    ) -> (
        std_mpsc::Receiver<LinkEvent>,
        tokio::sync::oneshot::Sender<()>,
        std::thread::JoinHandle<()>,
    ) {
        let watched: Vec<(String, bool)> =
            watched.iter().map(|(n, up)| (n.to_string(), *up)).collect();
        let (forward, events) = std_mpsc::channel();
        let (ready_tx, ready) = std_mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let watcher = ns.spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            runtime.block_on(async move {
                let watch = LinkWatch::subscribe().expect("subscribed");
                let (tx, mut rx) = mpsc::channel(16);
                for (name, up) in &watched {
                    watch.watchers().watch(name, name, *up, tx.clone());
                }
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
        (events, stop, watcher)
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

        let (events, stop, watcher) = spawn_watcher(&ns, &[("v0", true)]);

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
    fn catches_up_with_changes_before_run_and_follows_an_interface_made_later() {
        let Some(ns) = NetNs::create(
            "linkwatch::catches_up_with_changes_before_run_and_follows_an_interface_made_later",
        ) else {
            return;
        };
        ns.ip(&["link", "add", "v0", "type", "veth", "peer", "name", "v1"]);
        let ifindex = ns.ifindex("v0");
        // Believed up, but v0 was never set up; p0 does not exist yet.
        let (events, stop, watcher) = spawn_watcher(&ns, &[("v0", true), ("p0", false)]);
        let bound = Duration::from_secs(10);
        let first = events.recv_timeout(bound).expect("a first event");
        assert_eq!(
            (first.ifindex, first.ifname.as_str(), first.up),
            (ifindex, "v0", false)
        );
        // An interface that appears later, and comes up, is reported.
        ns.ip(&["link", "add", "p0", "type", "veth", "peer", "name", "p1"]);
        ns.ip(&["link", "set", "p1", "up"]);
        let (event, _) = provoke(&ns, &["link", "set", "p0", "up"], &events, bound);
        assert_eq!(
            (event.ifindex, event.ifname.as_str(), event.up),
            (ns.ifindex("p0"), "p0", true)
        );
        let _ = stop.send(());
        watcher.join().expect("watcher thread");
    }
}
