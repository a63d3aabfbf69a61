//! One uplink as lbd sees it: how far it is from carrying traffic (its
//! [`Lifecycle`]), from what the kernel says about it (its [`Facts`]), its
//! health and the operator's say, and from that the state the data plane
//! gets.
//!
//! Pure: no kernel, no data plane, no clock. The daemon gathers the facts
//! (`kernel::Observed`) and the health (`health`), and acts on what this
//! module concludes.

use std::fmt;

use lb_common::maps::uplink_state;

use crate::{health::State as Health, observe::facts::Facts};

/// The operator's say over an uplink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admin {
    Enabled,
    Disabled,
    Drain,
}

impl Admin {
    /// As `lbctl`, hooks and the status say it.
    pub fn as_str(self) -> &'static str {
        match self {
            Admin::Enabled => "enabled",
            Admin::Disabled => "disabled",
            Admin::Drain => "drain",
        }
    }
}

/// How far an uplink is from carrying traffic, first missing thing first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifecycle {
    /// Its interface does not exist (yet).
    WaitingInterface,
    WaitingCarrier,
    WaitingAddress,
    /// No gateway: none configured, and no default route through it.
    WaitingGateway,
    /// The gateway does not answer ARP (yet).
    GatewayUnresolved,
    /// Ready, and its probes have not yet had `rise` good rounds.
    Probing,
    InService,
    /// In service, but over a loss or latency limit.
    Degraded,
    /// Its probes fail.
    Down,
    /// The operator's doing.
    Disabled,
    Draining,
    /// lbd could not set it up (its XDP attachment, its probes): kept out
    /// of service, tried again every round. Its reason says what failed.
    Faulty,
}

impl Lifecycle {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::WaitingInterface => "waiting for its interface",
            Self::WaitingCarrier => "waiting for carrier",
            Self::WaitingAddress => "waiting for an address",
            Self::WaitingGateway => "waiting for a gateway",
            Self::GatewayUnresolved => "gateway not resolved",
            Self::Probing => "probing",
            Self::InService => "in service",
            Self::Degraded => "in service, degraded",
            Self::Down => "down",
            Self::Disabled => "disabled",
            Self::Draining => "draining",
            Self::Faulty => "not set up",
        }
    }

    /// The state the data plane gets: only an uplink in service takes new
    /// flows; a draining one keeps its flows while it could carry them.
    pub fn dataplane_state(self) -> u32 {
        match self {
            Self::InService | Self::Degraded => uplink_state::ACTIVE,
            Self::Draining => uplink_state::DRAIN,
            _ => uplink_state::DOWN,
        }
    }
}

impl fmt::Display for Lifecycle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where an uplink stands. `health` is `None` while no health monitor runs
/// (its facts are incomplete); `proven` says whether its health has been up
/// since its monitor started, which tells probing from down.
pub fn lifecycle(admin: Admin, facts: &Facts, health: Option<Health>, proven: bool) -> Lifecycle {
    let ready = if facts.ifindex.is_none() || facts.mac.is_none() {
        Err(Lifecycle::WaitingInterface)
    } else if !facts.carrier {
        Err(Lifecycle::WaitingCarrier)
    } else if facts.addr.is_none() {
        Err(Lifecycle::WaitingAddress)
    } else if facts.gateway.is_none() && !facts.l3 {
        Err(Lifecycle::WaitingGateway)
    } else if facts.gateway_mac.is_none() {
        Err(Lifecycle::GatewayUnresolved)
    } else {
        Ok(match health {
            None => Lifecycle::Probing,
            Some(Health::Up) => Lifecycle::InService,
            Some(Health::Degraded) => Lifecycle::Degraded,
            Some(Health::Down) if proven => Lifecycle::Down,
            Some(Health::Down) => Lifecycle::Probing,
        })
    };
    match (admin, ready) {
        (Admin::Disabled, _) => Lifecycle::Disabled,
        (Admin::Drain, Ok(Lifecycle::InService | Lifecycle::Degraded)) => Lifecycle::Draining,
        (_, Ok(l) | Err(l)) => l,
    }
}

/// The state the data plane gets for the IPv6 of an uplink with IPv6
/// probes of its own: in service while its link is up and its IPv6
/// health is up (or degraded), whatever its IPv4 does.
pub fn state6(admin: Admin, carrier: bool, health6: Option<Health>) -> u32 {
    match (admin, carrier, health6) {
        (Admin::Disabled, ..) | (_, false, _) | (_, _, None | Some(Health::Down)) => {
            uplink_state::DOWN
        }
        (Admin::Drain, ..) => uplink_state::DRAIN,
        (Admin::Enabled, ..) => uplink_state::ACTIVE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::observe::facts::fixtures::ready;

    #[test]
    fn the_first_missing_thing_is_the_state() {
        let l = |f: Facts| lifecycle(Admin::Enabled, &f, Some(Health::Up), true);
        assert_eq!(l(Facts::default()), Lifecycle::WaitingInterface);
        assert_eq!(
            l(Facts {
                carrier: false,
                addr: None,
                ..ready()
            }),
            Lifecycle::WaitingCarrier
        );
        assert_eq!(
            l(Facts {
                addr: None,
                ..ready()
            }),
            Lifecycle::WaitingAddress
        );
        assert_eq!(
            l(Facts {
                gateway: None,
                gateway_mac: None,
                ..ready()
            }),
            Lifecycle::WaitingGateway
        );
        assert_eq!(
            l(Facts {
                gateway_mac: None,
                ..ready()
            }),
            Lifecycle::GatewayUnresolved
        );
        assert_eq!(l(ready()), Lifecycle::InService);
    }

    #[test]
    fn ipv6_with_probes_of_its_own_stands_apart() {
        use uplink_state::{ACTIVE, DOWN, DRAIN};
        let on = Admin::Enabled;
        assert_eq!(state6(on, true, Some(Health::Up)), ACTIVE);
        assert_eq!(state6(on, true, Some(Health::Degraded)), ACTIVE);
        assert_eq!(state6(on, true, Some(Health::Down)), DOWN);
        assert_eq!(state6(on, true, None), DOWN, "no monitor: not proven");
        assert_eq!(state6(on, false, Some(Health::Up)), DOWN, "no carrier");
        assert_eq!(state6(Admin::Drain, true, Some(Health::Up)), DRAIN);
        assert_eq!(state6(Admin::Disabled, true, Some(Health::Up)), DOWN);
    }

    #[test]
    fn health_and_the_operator() {
        let f = ready();
        assert_eq!(
            lifecycle(Admin::Enabled, &f, None, false),
            Lifecycle::Probing
        );
        assert_eq!(
            lifecycle(Admin::Enabled, &f, Some(Health::Down), false),
            Lifecycle::Probing
        );
        assert_eq!(
            lifecycle(Admin::Enabled, &f, Some(Health::Down), true),
            Lifecycle::Down
        );
        assert_eq!(
            lifecycle(Admin::Drain, &f, Some(Health::Up), true),
            Lifecycle::Draining
        );
        assert_eq!(
            lifecycle(Admin::Drain, &f, Some(Health::Down), true),
            Lifecycle::Down,
            "a dead uplink does not keep its flows by draining"
        );
        assert_eq!(
            lifecycle(Admin::Disabled, &f, Some(Health::Up), true),
            Lifecycle::Disabled
        );
        assert_eq!(Lifecycle::Draining.dataplane_state(), uplink_state::DRAIN);
        assert_eq!(Lifecycle::Probing.dataplane_state(), uplink_state::DOWN);
        assert_eq!(Lifecycle::Degraded.dataplane_state(), uplink_state::ACTIVE);
    }
}
