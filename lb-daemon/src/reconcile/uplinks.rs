//! Each uplink's entry in the data plane (`UPLINKS`): its interface, its
//! state (active, drain, down), its address and address epoch, its and its
//! gateway's MACs, its MTU. The first kind a round converges: an uplink
//! that lost its address or its health is down before anything else
//! changes.
//!
//! [`wanted`] is pure; [`converge`] writes an entry whose state alone
//! changed with one state write (the carrier fast path's write, too), any
//! other change with one entry write, and records what it wrote.

use std::net::Ipv4Addr;

use anyhow::{Context, Result};
use lb_common::maps::{uplink_state, UplinkInfo};

use crate::{dataplane::Dataplane, observe::facts::Facts};

/// The entry an uplink with `facts` should have, in `state`, with address
/// epoch `epoch`, given what the data plane has (`written`): a full entry
/// once its interface and MAC are known; without an interface, the entry
/// it had, down (its flows move); nothing if it never had one.
pub fn wanted(
    facts: &Facts,
    state: u32,
    epoch: u32,
    flags: u16,
    written: Option<UplinkInfo>,
) -> Option<UplinkInfo> {
    match (facts.ifindex, facts.mac) {
        (Some(ifindex), Some(mac)) => Some(UplinkInfo {
            ifindex,
            state,
            addr: facts.addr.unwrap_or(Ipv4Addr::UNSPECIFIED).octets(),
            src_mac: mac,
            gw_mac: facts.gateway_mac.unwrap_or_default(),
            mtu: u16::try_from(facts.mtu).unwrap_or(u16::MAX),
            flags,
            epoch,
        }),
        _ => written.map(|info| UplinkInfo {
            state: uplink_state::DOWN,
            ..info
        }),
    }
}

/// Make uplink `index`'s entry `wanted`, from `written` (what the data
/// plane has), which it then records.
pub fn converge(
    index: u32,
    written: &mut Option<UplinkInfo>,
    wanted: Option<UplinkInfo>,
    dataplane: &mut Dataplane,
) -> Result<()> {
    let (Some(info), before) = (wanted, *written) else {
        return Ok(());
    };
    if before == Some(info) {
        return Ok(());
    }
    match before {
        Some(old)
            if UplinkInfo {
                state: info.state,
                ..old
            } == info =>
        {
            dataplane
                .set_uplink_state(index, info.state)
                .context("writing its state")?
        }
        _ => dataplane
            .set_uplink(index, &info)
            .context("writing its entry")?,
    }
    *written = Some(info);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> Facts {
        Facts {
            ifindex: Some(3),
            mac: Some([2, 0, 0, 0, 0, 1]),
            addr: Some(Ipv4Addr::new(100, 64, 1, 2)),
            gateway_mac: Some([2, 0, 0, 0, 0, 9]),
            mtu: 1500,
            ..Facts::default()
        }
    }

    #[test]
    fn an_uplink_without_its_interface_keeps_its_entry_down() {
        let up = wanted(&facts(), uplink_state::ACTIVE, 1, 0, None).expect("an entry");
        assert_eq!(
            (up.ifindex, up.state, up.epoch),
            (3, uplink_state::ACTIVE, 1)
        );
        assert_eq!(up.addr, [100, 64, 1, 2]);
        let gone = Facts::default();
        let down = wanted(&gone, uplink_state::ACTIVE, 1, 0, Some(up)).expect("kept");
        assert_eq!(
            down,
            UplinkInfo {
                state: uplink_state::DOWN,
                ..up
            }
        );
        assert_eq!(wanted(&gone, uplink_state::ACTIVE, 1, 0, None), None);
    }
}
