//! Roaming: clients that move from one port of a LAN bridge to another (a
//! phone walking from the router's own Wi-Fi to an access point on a LAN
//! port, a laptop plugged in elsewhere). The data plane sends a flow's
//! replies out of the port its first packet came in by (`NatValue` and
//! `FlowValue6` keep it); after a move they would go where the client no
//! longer is, and its connections would stall. The bridge hears the
//! client on its new port from the first frame that reaches it (an ARP
//! request, the access point's update frame on association) and says so
//! (a netlink event, which starts a round); lbd then points the client's
//! flows at that port, as the bridge itself now does for the kernel's
//! traffic.
//!
//! Pure: [`Roaming::moves`] compares where each LAN client's MAC is now
//! with where it was last round (a MAC new since then counts: it may
//! have moved before a round saw it). The walk of the flow tables that follows
//! is `dataplane::flows`'; [`Waiting`] keeps the moves that rounds find
//! while a walk runs for the next one. Only the LAN bridges' events wake
//! a round ([`lan_bridges`] names them to the link watch). Moves while
//! lbd was not running are not seen: the first round only learns where
//! everyone is.

use std::collections::{BTreeMap, BTreeSet};

use crate::{config::LanConfig, observe::kernel::Observed};

/// A client heard on another port of its LAN's bridge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    /// Increases with every round that finds moves: the walks that follow
    /// them may run out of order, and an older one must not undo a newer.
    pub generation: u64,
    pub mac: [u8; 6],
    /// The port it is behind now.
    pub to: u32,
    /// Every port of its bridge: only flows that came in by one of them
    /// follow (the same MAC on another LAN is another matter).
    pub ports: Vec<u32>,
}

/// Where each client of a LAN bridge was last round.
#[derive(Debug, Default)]
pub struct Roaming {
    /// By (bridge, MAC): its port. `None` before the first round.
    seen: Option<BTreeMap<(u32, [u8; 6]), u32>>,
    /// Rounds that found moves so far.
    generation: u64,
}

/// How many MACs the bridges no longer hold are remembered (each where it
/// was last heard): beyond it, only those they hold now (a guest network
/// whose phones each come with a random MAC would grow it forever).
const REMEMBERED: usize = 4096;

impl Roaming {
    /// The clients of the LAN bridges that are behind another port than
    /// last round.
    pub fn moves(&mut self, lans: &[LanConfig], observed: &Observed) -> Vec<Move> {
        let bridges = lan_bridges(lans, observed);
        // A MAC the bridge holds behind two ports (two VLANs) says
        // nothing about where its flows' replies belong: left out.
        let mut now = BTreeMap::new();
        let mut twice = BTreeSet::new();
        for e in &observed.bridge_entries {
            let Some(ports) = bridges.get(&e.bridge) else {
                continue;
            };
            // On a bridge that filters VLANs, a port may carry the LAN
            // tagged and another untagged: a flow's replies cannot just
            // change ports. Such clients' flows are not followed.
            if e.vlan.is_some() {
                continue;
            }
            if !ports.contains(&e.port) {
                continue;
            }
            if let Some(other) = now.insert((e.bridge, e.mac), e.port) {
                if other != e.port {
                    twice.insert((e.bridge, e.mac));
                }
            }
        }
        for key in &twice {
            now.remove(key);
        }
        // A MAC heard for the first time since the first round may have
        // roamed before lbd's round saw it where it was: its flows are
        // asked too (a new device has none, and all the round's moves
        // share one walk of the tables).
        let generation = self.generation + 1;
        let moves: Vec<Move> = match &self.seen {
            None => Vec::new(),
            Some(before) => now
                .iter()
                .filter(|(key, port)| before.get(key) != Some(*port))
                .map(|(&(bridge, mac), &to)| Move {
                    generation,
                    mac,
                    to,
                    ports: bridges.get(&bridge).cloned().unwrap_or_default(),
                })
                .collect(),
        };
        if !moves.is_empty() {
            self.generation = generation;
        }
        // A MAC the bridge forgot (aged out) is remembered where it was:
        // its next entry, on another port, is still a move.
        let mut seen = self.seen.take().unwrap_or_default();
        seen.retain(|(bridge, _), _| bridges.contains_key(bridge));
        if seen.len() > REMEMBERED {
            seen.retain(|key, _| now.contains_key(key));
        }
        seen.extend(now);
        self.seen = Some(seen);
        moves
    }
}

/// Moves waiting for the walk of the flow tables that follows them. One
/// walk runs at a time and takes every move that waits when it starts, so
/// that rounds finding moves while a big table is walked (each walk takes
/// seconds at a million flows) add to the next walk instead of queueing
/// walks of their own. A client that moves again before its walk keeps
/// its newest move only (a client by its MAC and its bridge's ports: the
/// same MAC on another LAN is another client). A walk that failed leaves
/// what waits for the next round to start again.
#[derive(Debug, Default)]
pub struct Waiting {
    moves: Vec<Move>,
    walking: bool,
}

impl Waiting {
    /// Adds `moves` (maybe none); whether the caller is to start a walk:
    /// moves wait and none runs.
    pub fn add(&mut self, moves: Vec<Move>) -> bool {
        for m in moves {
            self.moves
                .retain(|w| (w.mac, &w.ports) != (m.mac, &m.ports));
            self.moves.push(m);
        }
        if self.walking || self.moves.is_empty() {
            return false;
        }
        self.walking = true;
        true
    }

    /// The moves for the running walk to follow next; `None` ends it.
    pub fn take(&mut self) -> Option<Vec<Move>> {
        if self.moves.is_empty() {
            self.walking = false;
            return None;
        }
        Some(std::mem::take(&mut self.moves))
    }

    /// The running walk failed (or never ran): the moves it had taken are
    /// lost with it; those that wait start the next walk.
    pub fn give_up(&mut self) {
        self.walking = false;
    }
}

/// The LANs that are bridges, by ifindex, with their ports' ifindexes:
/// the bridges whose clients are followed.
pub fn lan_bridges(lans: &[LanConfig], observed: &Observed) -> BTreeMap<u32, Vec<u32>> {
    lans.iter()
        .filter_map(|lan| observed.link(&lan.interface))
        .filter(|link| link.kind.as_deref() == Some("bridge"))
        .map(|link| {
            let ports = observed
                .lan_ports(&link.name)
                .into_iter()
                .map(|(ifindex, _)| ifindex)
                .collect();
            (link.index, ports)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::{kernel::LinkFacts, netlink::BridgeEntry};

    fn link(index: u32, name: &str, kind: &str, master: Option<u32>) -> LinkFacts {
        LinkFacts::sample(index, name, kind, master)
    }

    const PHONE: [u8; 6] = [0x02, 0, 0, 0, 0, 0x42];
    const LAPTOP: [u8; 6] = [0x02, 0, 0, 0, 0, 0x43];

    fn observed(entries: &[([u8; 6], u32)]) -> Observed {
        Observed {
            links: vec![
                link(2, "br-lan", "bridge", None),
                link(3, "lan1", "veth", Some(2)),
                link(4, "wlan0", "veth", Some(2)),
                link(5, "docker0", "bridge", None),
                link(6, "veth9", "veth", Some(5)),
            ],
            bridge_entries: entries
                .iter()
                .map(|&(mac, port)| BridgeEntry {
                    bridge: if port == 6 { 5 } else { 2 },
                    mac,
                    port,
                    vlan: None,
                })
                .collect(),
            ..Observed::default()
        }
    }

    fn lans() -> Vec<LanConfig> {
        vec![LanConfig {
            prefix6: None,
            interface: "br-lan".into(),
        }]
    }

    #[test]
    fn a_client_heard_on_another_port_of_its_bridge_is_a_move() {
        let mut roaming = Roaming::default();
        // The first round learns where everyone is.
        assert!(roaming
            .moves(&lans(), &observed(&[(PHONE, 4), (LAPTOP, 3)]))
            .is_empty());
        assert!(roaming
            .moves(&lans(), &observed(&[(PHONE, 4), (LAPTOP, 3)]))
            .is_empty());
        // The phone walks from the router's Wi-Fi to the access point on
        // lan1.
        let moves = roaming.moves(&lans(), &observed(&[(PHONE, 3), (LAPTOP, 3)]));
        assert_eq!(
            moves,
            [Move {
                generation: 1,
                mac: PHONE,
                to: 3,
                ports: vec![3, 4]
            }]
        );
        // Said once.
        assert!(roaming
            .moves(&lans(), &observed(&[(PHONE, 3), (LAPTOP, 3)]))
            .is_empty());
        // A device heard for the first time since: asked too (it may have
        // moved before a round saw it).
        const TABLET: [u8; 6] = [0x02, 0, 0, 0, 0, 0x44];
        let moves = roaming.moves(&lans(), &observed(&[(PHONE, 3), (LAPTOP, 3), (TABLET, 4)]));
        assert_eq!(moves.len(), 1);
        assert_eq!((moves[0].mac, moves[0].to), (TABLET, 4));
        assert_eq!(moves[0].generation, 2, "a later round's moves are newer");
        // Aged out, then back on Wi-Fi: still a move.
        assert!(roaming.moves(&lans(), &observed(&[(LAPTOP, 3)])).is_empty());
        let moves = roaming.moves(&lans(), &observed(&[(PHONE, 4), (LAPTOP, 3)]));
        assert_eq!(moves.len(), 1);
        assert_eq!(moves[0].to, 4);
    }

    #[test]
    fn other_bridges_and_macs_behind_two_ports_are_no_moves() {
        let mut roaming = Roaming::default();
        roaming.moves(&lans(), &observed(&[(PHONE, 6), (LAPTOP, 3)]));
        // Another bridge's client (not a LAN) and a MAC behind two ports.
        let moves = roaming.moves(&lans(), &observed(&[(LAPTOP, 3), (LAPTOP, 4)]));
        assert!(moves.is_empty(), "{moves:?}");
    }

    #[test]
    fn one_walk_at_a_time_takes_every_waiting_move_the_newest_per_client() {
        let to = |mac, to, generation| Move {
            generation,
            mac,
            to,
            ports: vec![3, 4, 5],
        };
        let mut waiting = Waiting::default();
        assert!(!waiting.add(Vec::new()), "nothing to walk for");
        assert!(waiting.add(vec![to(PHONE, 4, 1)]), "starts a walk");
        assert_eq!(waiting.take(), Some(vec![to(PHONE, 4, 1)]));
        // Rounds during the walk add to the next one; the phone moved on.
        assert!(!waiting.add(vec![to(PHONE, 5, 2), to(LAPTOP, 4, 2)]));
        assert!(!waiting.add(vec![to(PHONE, 3, 3)]));
        assert_eq!(
            waiting.take(),
            Some(vec![to(LAPTOP, 4, 2), to(PHONE, 3, 3)])
        );
        assert_eq!(waiting.take(), None, "the walk ends");
        // The same MAC on another LAN's bridge is another client.
        let elsewhere = Move {
            ports: vec![7, 8],
            ..to(PHONE, 8, 4)
        };
        assert!(waiting.add(vec![to(PHONE, 4, 4), elsewhere.clone()]));
        assert_eq!(waiting.take(), Some(vec![to(PHONE, 4, 4), elsewhere]));
        // A walk fails; what rounds added meanwhile waits for the next.
        assert!(!waiting.add(vec![to(LAPTOP, 5, 5)]));
        waiting.give_up();
        assert!(waiting.add(Vec::new()), "the next round starts a walk");
        assert_eq!(waiting.take(), Some(vec![to(LAPTOP, 5, 5)]));
        assert_eq!(waiting.take(), None);
        assert!(!waiting.add(Vec::new()), "nothing waits");
    }
}
