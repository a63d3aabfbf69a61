//! WireGuard uplinks' own packets: the UDP port each WireGuard device
//! sends its encrypted packets from (its listen port), as `wg show IFACE
//! listen-port` says it for kernel WireGuard and wireguard-go alike. lbd
//! routes what the router sends from that port by an uplink that is no
//! tunnel (`reconcile::routing`), and the rest of the router's own traffic
//! may then use the tunnel.
//!
//! Owns the answers, by interface index: a device keeps its port until it
//! is made again (a new index), so `wg` runs once per device, and again
//! after [`REFRESH`] (a `wg set IFACE listen-port` in between) or, for a
//! device with no answer (no WireGuard: OpenVPN's tun; no `wg`; a
//! wireguard-go not listening yet), after [`RETRY`].
//!
//! WireGuard sends from the local address it last heard its peer on, so
//! its packets would stay on a line lbd moved them off (the `from` rule of
//! that line's address comes first) until a handshake of its own went
//! unanswered, 15 to 20 s later. [`forget_sources`] makes it send its
//! next packet unbound, by lbd's rule: the one change lbd makes to a
//! tunnel, each peer's endpoint set again to what it is.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::{process::Command, sync::Notify};

/// How long an answer holds: a `wg set IFACE listen-port` is followed
/// within it (meanwhile the tunnel's packets, from a port lbd does not
/// know, go where the router's own go).
const REFRESH: Duration = Duration::from_secs(5);
/// How long no answer, or a failed asking, holds.
const RETRY: Duration = Duration::from_secs(3);
/// How long `wg` may take to answer.
const ASK_TIMEOUT: Duration = Duration::from_secs(1);
/// A known port is kept through this many failed askings in a row (a
/// busy machine, a `wg` that timed out): only a device that keeps not
/// answering loses it.
const KEEP_THROUGH_FAILURES: u32 = 3;

/// The listen ports of WireGuard devices, as last asked. `wg` is asked in
/// the background: a round never waits for it.
pub struct Ports {
    state: Mutex<State>,
    /// Rung when an answer changed what is known: the reconciler's
    /// wake-up, for a round that routes by it.
    changed: Arc<Notify>,
}

#[derive(Default)]
struct State {
    answers: HashMap<u32, Answer>,
    /// An asking is under way.
    asking: bool,
}

#[derive(Clone, Copy)]
struct Answer {
    port: Option<u16>,
    asked: Instant,
    /// Failed askings since the last answer.
    failures: u32,
}

impl Ports {
    /// Ports that ring `changed` when what they know changes.
    pub fn new(changed: Arc<Notify>) -> Ports {
        Ports {
            state: Mutex::default(),
            changed,
        }
    }

    /// The listen ports of `devices` (index, name) that are WireGuard, by
    /// index. A device seen for the first time is asked about at once,
    /// and waited for (at most [`ASK_TIMEOUT`]): the first round after a
    /// start, or after a tunnel came up, routes its packets apart
    /// already. Those not asked lately are asked in the background: a
    /// refresh never holds a round.
    pub async fn of(self: &Arc<Self>, devices: &[(u32, String)]) -> BTreeMap<u32, u16> {
        let (new, stale) = {
            let mut state = self.lock();
            // Devices that are gone (or no uplink's now) are forgotten.
            state
                .answers
                .retain(|index, _| devices.iter().any(|(i, _)| i == index));
            let (new, known): (Vec<_>, Vec<_>) = devices
                .iter()
                .cloned()
                .partition(|(index, _)| !state.answers.contains_key(index));
            let stale: Vec<_> = known
                .into_iter()
                .filter(|(index, _)| state.answers.get(index).is_some_and(Answer::stale))
                .collect();
            (new, stale)
        };
        if !new.is_empty() {
            self.ask_all(new).await;
        }
        let mut state = self.lock();
        if !stale.is_empty() && !state.asking {
            state.asking = true;
            let ports = Arc::clone(self);
            let done = OnDrop({
                let ports = Arc::clone(self);
                move || ports.lock().asking = false
            });
            tokio::spawn(async move {
                let _done = done;
                ports.ask_all(stale).await;
            });
        }
        state
            .answers
            .iter()
            .filter_map(|(&index, a)| Some((index, a.port?)))
            .collect()
    }

    /// Ask `wg` about `devices`, all at once, and keep the answers.
    async fn ask_all(&self, devices: Vec<(u32, String)>) {
        let asked = futures::future::join_all(devices.iter().map(|(_, name)| ask(name))).await;
        let mut changed = false;
        {
            let mut state = self.lock();
            for ((index, name), asked) in devices.iter().zip(asked) {
                let before = state.answers.get(index).copied();
                let answer = match asked {
                    Ok(port) => Answer {
                        port: Some(port),
                        asked: Instant::now(),
                        failures: 0,
                    },
                    Err(why) => {
                        log::debug!("{name}: no WireGuard listen port: {why}");
                        let failures = before.map_or(1, |b| b.failures + 1);
                        Answer {
                            port: before
                                .and_then(|b| b.port)
                                .filter(|_| failures < KEEP_THROUGH_FAILURES),
                            asked: Instant::now(),
                            failures,
                        }
                    }
                };
                state.answers.insert(*index, answer);
                if before.map(|b| b.port) != Some(answer.port) {
                    changed = true;
                    say(name, answer.port);
                }
            }
        }
        if changed {
            self.changed.notify_one();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is plain values: one a panic left behind is still
        // whole.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Answer {
    fn stale(&self) -> bool {
        let holds = if self.port.is_some() && self.failures == 0 {
            REFRESH
        } else {
            RETRY
        };
        self.asked.elapsed() >= holds
    }
}

/// Tell the operator what lbd now knows of device `name`'s port.
fn say(name: &str, port: Option<u16>) {
    match port {
        Some(port) => log::info!(
            "{name}: WireGuard sends its own packets from UDP port {port}; they leave by an \
             uplink that is no tunnel, and the router's other traffic may go through {name}"
        ),
        None => log::info!(
            "{name}: no WireGuard listen port known (`wg show {name} listen-port`); the \
             router's own traffic stays out of tunnels"
        ),
    }
}

/// How long after the tunnels' own packets got a new way out each
/// WireGuard uplink is made to send afresh again and again: a packet its
/// peer sent before it heard from the new way makes WireGuard take the
/// old one back. A round trip to its peer, with room to spare.
const FORGET_SPAN: Duration = Duration::from_secs(3);
/// How often within [`FORGET_SPAN`]: each `wg set` is two processes, and
/// a peer that roams between its `wg show` and its `wg set` gets its old
/// endpoint back until it sends again.
const FORGET_EVERY: Duration = Duration::from_millis(500);

/// The forgetting of the WireGuard uplinks' sources ([`forget_sources`])
/// after their own packets got a new way out: in the background, one at a
/// time, at most every [`FORGET_EVERY`] for [`FORGET_SPAN`].
#[derive(Default)]
pub struct Sources {
    state: Mutex<Forgetting>,
}

#[derive(Default)]
struct Forgetting {
    /// Until when the uplinks are made to send afresh.
    until: Option<Instant>,
    /// When they were last.
    last: Option<Instant>,
    /// A forgetting is under way.
    busy: bool,
    /// A move no forgetting has started after yet (a move while one was
    /// under way waits for the next round, which tells it at once).
    unsaid: bool,
}

impl Forgetting {
    /// Whether to make them send afresh at `now` (`Some`: and whether a
    /// move is news to say); `moved`: their own packets got a new way out
    /// since the last round.
    fn due(&mut self, moved: bool, now: Instant) -> Option<bool> {
        if moved {
            self.until = Some(now + FORGET_SPAN);
            self.last = None;
            self.unsaid = true;
        }
        if self.until.is_none_or(|until| now > until) {
            self.until = None;
            return None;
        }
        if self.busy || self.last.is_some_and(|last| now < last + FORGET_EVERY) {
            return None;
        }
        self.last = Some(now);
        self.busy = true;
        Some(std::mem::take(&mut self.unsaid))
    }
}

/// Runs its closure when dropped: a background task that holds it lets
/// the next one start however it ends (a panic, a runtime shutting down).
struct OnDrop<F: FnMut()>(F);

impl<F: FnMut()> Drop for OnDrop<F> {
    fn drop(&mut self) {
        (self.0)()
    }
}

impl Sources {
    /// After a round that routed the tunnels' own packets (`moved`: by
    /// another way than the round before): make `devices` (their names,
    /// asked only when due) send afresh, in the background, when due.
    pub fn after_round(self: &Arc<Self>, moved: bool, devices: impl FnOnce() -> Vec<String>) {
        let Some(moved) = self.lock().due(moved, Instant::now()) else {
            return;
        };
        let devices = devices();
        let done = OnDrop({
            let sources = Arc::clone(self);
            move || sources.lock().busy = false
        });
        tokio::spawn(async move {
            let _done = done;
            let told = futures::future::join_all(devices.iter().map(|d| forget_sources(d))).await;
            for (name, told) in devices.iter().zip(told) {
                match told {
                    Ok(peers) if moved => log::info!(
                        "{name}: WireGuard's own packets take their new way out from the next \
                         one ({peers} peers told to send unbound)"
                    ),
                    Ok(_) => {}
                    Err(e) => log::warn!(
                        "{name}: could not make WireGuard send by its new way out ({e}); it \
                         keeps its old one until a handshake of its own goes unanswered"
                    ),
                }
            }
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Forgetting> {
        // Plain values: one a panic left behind is still whole.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Makes WireGuard device `name` forget the local address it sends from
/// (see above); returns how many peers it told.
pub async fn forget_sources(name: &str) -> Result<usize, String> {
    let shown = wg(&["show", name, "endpoints"]).await?;
    let peers = endpoints(&shown);
    if peers.is_empty() {
        return Ok(0);
    }
    // (A peer removed between the two calls would come back, endpoint
    // only: this `wg` has no `update-only`. A reconfiguration racing lbd's
    // failover is that rare.)
    let mut args = vec!["set", name];
    for (key, endpoint) in &peers {
        args.extend(["peer", key.as_str(), "endpoint", endpoint.as_str()]);
    }
    wg(&args).await?;
    Ok(peers.len())
}

/// Device `name`'s listen port, as `wg` says it.
async fn ask(name: &str) -> Result<u16, String> {
    listen_port(&wg(&["show", name, "listen-port"]).await?)
}

/// `wg ARGS`' output, or why there is none.
async fn wg(args: &[&str]) -> Result<String, String> {
    let out = Command::new("wg").args(args).kill_on_drop(true).output();
    let out = tokio::time::timeout(ASK_TIMEOUT, out)
        .await
        .map_err(|_| format!("`wg` did not answer within {ASK_TIMEOUT:?}"))?
        .map_err(|e| format!("could not run `wg` (wireguard-tools): {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "`wg {}` says: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The peers with an endpoint in `wg show IFACE endpoints`' answer (a
/// line per peer: its public key, a tab, `ADDRESS:PORT` or `(none)`), as
/// `wg set` takes them back. A line of any other shape is left out.
fn endpoints(answer: &str) -> Vec<(String, String)> {
    answer
        .lines()
        .filter_map(|line| {
            let (key, endpoint) = line.split_once('\t')?;
            let key_ok = key.len() == 44
                && key
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='));
            let endpoint_ok = endpoint.parse::<std::net::SocketAddr>().is_ok();
            (key_ok && endpoint_ok).then(|| (key.to_owned(), endpoint.to_owned()))
        })
        .collect()
}

/// The port in `wg show IFACE listen-port`'s answer: a number, 0 when the
/// device does not listen (it then sends nothing of its own).
fn listen_port(answer: &str) -> Result<u16, String> {
    match answer.trim().parse::<u16>() {
        Ok(0) => Err("it does not listen".into()),
        Ok(port) => Ok(port),
        Err(_) => Err(format!("unexpected answer {:?}", answer.trim())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listen_port_is_read_and_anything_else_refused() {
        assert_eq!(listen_port("51820\n"), Ok(51820));
        assert!(listen_port("0\n").is_err());
        assert!(listen_port("").is_err());
        assert!(listen_port("70000").is_err());
        assert!(listen_port("interface: wg0").is_err());
    }

    #[test]
    fn peers_with_an_endpoint_are_read_and_anything_else_left_out() {
        let key = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";
        let answer = format!(
            "{key}\t100.66.0.2:51820\n\
             {key}\t[2001:db8::1]:51820\n\
             {key}\t(none)\n\
             {key}\t100.66.0.2:51820 --help\n\
             short\t100.66.0.2:51820\n\
             no tab here\n"
        );
        assert_eq!(
            endpoints(&answer),
            [
                (key.to_owned(), "100.66.0.2:51820".to_owned()),
                (key.to_owned(), "[2001:db8::1]:51820".to_owned()),
            ]
        );
    }

    #[tokio::test]
    async fn devices_no_longer_asked_about_are_forgotten_and_a_port_outlives_a_failed_asking() {
        let ports = Arc::new(Ports::new(Arc::default()));
        let fresh = |port, failures| Answer {
            port,
            asked: Instant::now(),
            failures,
        };
        ports.lock().answers.insert(7, fresh(Some(51820), 0));
        let known = ports.of(&[(7, "wg0".into())]).await;
        assert_eq!(
            known,
            BTreeMap::from([(7, 51820)]),
            "a fresh answer is kept"
        );
        assert!(!ports.lock().asking, "nothing to ask");
        assert!(ports.of(&[]).await.is_empty());
        assert!(ports.lock().answers.is_empty());

        // A device no `wg` knows (none here by this name): its port is
        // kept through failed askings, then given up.
        let name = "lbt-no-such-wg";
        ports.lock().answers.insert(8, fresh(Some(51820), 0));
        for failures in 1..=KEEP_THROUGH_FAILURES {
            ports.ask_all(vec![(8, name.into())]).await;
            let answer = ports.lock().answers[&8];
            assert_eq!(answer.failures, failures);
            let kept = failures < KEEP_THROUGH_FAILURES;
            assert_eq!(answer.port.is_some(), kept, "after {failures} failures");
        }
    }

    #[test]
    fn sources_are_forgotten_at_a_move_then_now_and_then_for_a_while() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut f = Forgetting::default();
        assert_eq!(f.due(false, at(0)), None, "nothing moved yet");
        assert_eq!(f.due(true, at(0)), Some(true), "a move: at once, said");
        assert_eq!(f.due(false, at(10)), None, "under way");
        f.busy = false;
        assert_eq!(f.due(false, at(100)), None, "too soon after");
        assert_eq!(f.due(false, at(600)), Some(false), "again, a while after");
        f.busy = false;
        assert_eq!(f.due(true, at(700)), Some(true), "another move: at once");
        // A move while a forgetting is under way: told, and said, in the
        // next round.
        assert_eq!(f.due(true, at(710)), None, "under way");
        f.busy = false;
        assert_eq!(f.due(false, at(720)), Some(true), "the next round");
        f.busy = false;
        let end = 710 + FORGET_SPAN.as_millis() as u64;
        assert_eq!(f.due(false, at(end)), Some(false), "until the span is over");
        f.busy = false;
        assert_eq!(f.due(false, at(end + 600)), None, "and no longer");
        assert!(f.until.is_none());
    }
}
