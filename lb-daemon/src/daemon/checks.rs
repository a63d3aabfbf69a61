//! What lbd refuses about the machine before it touches anything (at
//! start, and for `lbd --check`): routing tables and rule priorities that
//! are someone else's, a LAN that is missing or given as a bridge port, routed
//! prefixes that are a LAN's, uplinks with an ingress shaper; and says
//! which interfaces take no redirected frames (lb's packets reach them by
//! their qdisc). Reads the kernel, changes nothing.

use anyhow::{bail, Context, Result};

use crate::{
    config::Config,
    observe::kernel::Observed,
    reconcile::{egress, routing},
};

/// Everything lbd refuses about the machine before it touches anything:
/// routing tables or rule priorities of someone else's, a LAN interface
/// that does not exist, and what [`check_machine`] checks besides.
pub(super) fn refuse(config: &Config, observed: &Observed) -> Result<()> {
    let clashes = routing::clashes(observed, &config.routing, config.uplinks.len());
    if !clashes.is_empty() {
        bail!("{}", clashes.join("; "));
    }
    for lan in &config.lans {
        observed.link(&lan.interface).with_context(|| {
            format!(
                "LAN interface {} not found (see `ip link`; is lbd running in the right network namespace?)",
                lan.interface
            )
        })?;
    }
    check_lans(config, observed)?;
    say_slow_targets(config, observed);
    check_ingress_shapers(config, observed)?;
    for u in &config.uplinks {
        if observed.link(&u.interface).and_then(|l| l.kind.as_deref()) == Some("bridge") {
            bail!(
                "uplink {}: {} is a bridge, and XDP cannot send into a bridge; give lbd the \
                 bridge's port towards the ISP instead",
                u.name,
                u.interface
            );
        }
    }
    Ok(())
}

/// [`refuse`], on what the kernel holds now: asked by a reload that
/// starts lbd again, before it does, so that a configuration the new lbd
/// would refuse never takes the place of a running one.
pub(super) async fn refuse_now(config: &Config) -> Result<()> {
    let (conn, handle, _) =
        rtnetlink::new_connection().context("opening a netlink socket failed")?;
    tokio::spawn(conn);
    let observed = Observed::take(&handle).await?;
    refuse(config, &observed)
}

/// What `lbd --check` can say of the machine besides the file, as the
/// start does: a LAN given as a bridge port, an uplink's ingress shaper
/// (refused), and which uplinks and LAN ports take no redirected frames
/// (said). Reads the kernel, changes nothing.
pub async fn check_machine(config: &Config) -> Result<()> {
    let (conn, handle, _) =
        rtnetlink::new_connection().context("opening a netlink socket failed")?;
    tokio::spawn(conn);
    let observed = Observed::take(&handle).await?;
    check_lans(config, &observed)?;
    say_slow_targets(config, &observed);
    check_ingress_shapers(config, &observed)
}

/// Refuse a LAN given as a port of a bridge (the kernel routes its
/// traffic as the bridge's, so rules and addresses are the bridge's: give
/// the bridge, and lbd works on its ports), and an uplink's `routed`
/// prefix that overlaps a LAN's (it would be the LAN's and the ISP's at
/// once). LANs that do not exist yet are not checked here.
pub(super) fn check_lans(config: &Config, observed: &Observed) -> Result<()> {
    let mut refused = Vec::new();
    let mut lan_indexes = Vec::new();
    for lan in &config.lans {
        let Some(link) = observed.link(&lan.interface) else {
            continue;
        };
        lan_indexes.push(link.index);
        let bridge = link
            .master
            .and_then(|m| observed.links.iter().find(|l| l.index == m))
            .filter(|m| m.kind.as_deref() == Some("bridge"));
        if let Some(bridge) = bridge {
            refused.push(format!(
                "LAN interface {} is a port of bridge {b}: give the bridge ([[lan]] interface = \"{b}\"); \
                 the LAN's addresses and routes are the bridge's, and lbd works on all its ports",
                lan.interface,
                b = bridge.name
            ));
        }
    }
    let lan_prefixes = observed.connected(&lan_indexes);
    for u in &config.uplinks {
        for r in &u.routed {
            if let Some((addr, len)) = lan_prefixes.iter().find(|(a, l)| r.overlaps(*a, *l)) {
                refused.push(format!(
                    "{}:{}: uplink {:?} key routed: {r} overlaps the LAN's {addr}/{len}; a prefix \
                     routed through an uplink is not a LAN's (lb would translate the LAN's)",
                    config.file, r.line, u.name
                ));
            }
        }
    }
    if !refused.is_empty() {
        bail!("{}", refused.join("; "));
    }
    Ok(())
}

/// Refuse an uplink with an ingress shaper (an `ingress` qdisc feeding an
/// IFB, as SQM sets up): XDP forwards replies before it, so it would
/// silently shape nothing. `[uplink.shape] download` is the way lb shapes
/// downloads.
pub(super) fn check_ingress_shapers(config: &Config, observed: &Observed) -> Result<()> {
    let refused: Vec<String> = config
        .uplinks
        .iter()
        .filter_map(|u| {
            let link = observed.link(&u.interface)?;
            egress::ingress_shaper(&observed.qdiscs, link.index, &u.name, &u.interface)
        })
        .collect();
    if !refused.is_empty() {
        bail!("{}", refused.join("; "));
    }
    Ok(())
}

/// Say which interfaces lb would redirect into (an uplink, a LAN port)
/// the kernel says take no redirected frames: lb's packets reach those by
/// their qdisc (`reconcile::egress`), slower than XDP, and the operator is
/// told how to give them the fast way. Interfaces that do not exist yet
/// are said by nobody; a kernel without the netdev family (before 6.3)
/// cannot say.
pub(super) fn say_slow_targets(config: &Config, observed: &Observed) {
    let Some(features) = &observed.xdp_features else {
        log::info!("the kernel does not report XDP features (before Linux 6.3): redirect targets not checked");
        return;
    };
    let uplinks = config.uplinks.iter().map(|u| u.interface.clone());
    let lan_ports = config
        .lans
        .iter()
        .flat_map(|l| observed.lan_ports(&l.interface))
        .map(|(_, name)| name);
    for ifname in uplinks.chain(lan_ports) {
        let Some(link) = observed.link(&ifname) else {
            continue;
        };
        if link.l3 {
            // No Ethernet header, no XDP into it: lb sends to it by its
            // qdisc (lb's tc program) and takes its replies at tc ingress.
            log::info!(
                "{ifname}: an L3 device (no link-layer header): lb's packets reach it by the \
                 hand-off path (tc), its replies are translated at its tc ingress"
            );
            continue;
        }
        let Some(&features) = features.get(&link.index) else {
            continue;
        };
        if let Some(said) =
            crate::observe::xdpcaps::slow_way(&ifname, link.kind.as_deref(), features)
        {
            log::warn!("{said}");
        }
    }
}
