//! `lan_ingress` and `wan_ingress` on crafted packets, through the kernel's
//! `BPF_PROG_TEST_RUN`: the real verifier-approved program, the real maps,
//! no interfaces. Packets are built and checked with `etherparse`, so the
//! checksums are verified by code independent of the data plane's.
//!
//! Needs root (loading BPF); without it every test says so and skips.

use std::net::Ipv4Addr;

use aya::programs::{TestRun, TestRunOptions};
use etherparse::{IpHeaders, Ipv4Header, PacketBuilder, SlicedPacket, TransportSlice};
use lb_common::{
    hash,
    maps::{program, uplink_state, UplinkInfo},
    reason,
    table::{self, Table},
    MAX_UPLINKS,
};
use lb_daemon::dataplane::Dataplane;

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;

const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const ROUTER_LAN_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const CLIENT: [u8; 4] = [10, 10, 0, 2];
const SERVER: [u8; 4] = [198, 51, 100, 10];
const ROUTER_LAN: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 1);

fn uplink_info(n: u8, state: u32) -> UplinkInfo {
    UplinkInfo {
        // Loopback: any existing device will do, test runs never transmit.
        ifindex: 1,
        state,
        addr: [100, 64, n, 2],
        src_mac: [0x02, 0xaa, 0, 0, n, 2],
        gw_mac: [0x02, 0xbb, 0, 0, n, 1],
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!("SKIPPED: BPF_PROG_TEST_RUN tests need root to load programs");
    }
    root
}

/// A data plane with two uplinks sharing the buckets 1:1.
struct Harness {
    dp: Dataplane,
}

impl Harness {
    fn new(states: [u32; 2]) -> Self {
        let mut dp = Dataplane::load(1024).expect("load the XDP object");
        dp.set_classifier(0x1234_5678, hash::mode::FIVE_TUPLE)
            .expect("settings");
        for (i, state) in states.iter().enumerate() {
            dp.set_uplink(i as u32, &uplink_info(i as u8 + 1, *state))
                .expect("uplink");
        }
        dp.add_bypass(ROUTER_LAN, 32).expect("bypass");
        dp.add_bypass(Ipv4Addr::new(10, 10, 0, 0), 24)
            .expect("bypass");
        let mut weights = [0u32; MAX_UPLINKS as usize];
        for (i, state) in states.iter().enumerate() {
            weights[i] = u32::from(*state == uplink_state::ACTIVE);
        }
        let mut t: Table = table::empty();
        table::rebalance(&mut t, &weights);
        dp.set_buckets(&t).expect("buckets");
        Self { dp }
    }

    /// Run `prog` once on `frame`: the verdict and the frame that came out.
    fn run(&mut self, prog: &str, frame: &[u8]) -> (u32, Vec<u8>) {
        let mut out = vec![0u8; frame.len() + 256];
        let xdp = self.dp.xdp(prog).expect("program");
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..Default::default()
        };
        let result = xdp.test_run(opts).expect("BPF_PROG_TEST_RUN");
        out.truncate(result.data_size_out as usize);
        (result.return_value, out)
    }

    fn lan(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        self.run(program::LAN_INGRESS, frame)
    }

    fn reason(&self, r: u32) -> u64 {
        self.dp.reasons().expect("reasons")[r as usize]
    }
}

fn udp(src_port: u16, ttl: u8) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, ROUTER_LAN_MAC)
        .ipv4(CLIENT, SERVER, ttl)
        .udp(src_port, 53);
    build(b, b"query")
}

fn tcp(src_port: u16) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, ROUTER_LAN_MAC)
        .ipv4(CLIENT, SERVER, 64)
        .tcp(src_port, 443, 1000, 65535)
        .syn();
    build(b, b"")
}

fn build<B: Builder>(b: B, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    b.write_to(&mut v, payload);
    v
}

/// etherparse's final builder steps all have `write`; one trait to call it.
trait Builder {
    fn write_to(self, out: &mut Vec<u8>, payload: &[u8]);
}
macro_rules! builder {
    ($($t:ty),*) => {$(
        impl Builder for etherparse::PacketBuilderStep<$t> {
            fn write_to(self, out: &mut Vec<u8>, payload: &[u8]) {
                self.write(out, payload).expect("build packet");
            }
        }
    )*};
}
builder!(
    etherparse::UdpHeader,
    etherparse::TcpHeader,
    etherparse::Icmpv4Header
);

/// Check what `lan_ingress` sent: new MACs, TTL one less, valid IP and L4
/// checksums, and everything else as it came in.
fn assert_forwarded(input: &[u8], output: &[u8], uplink: &UplinkInfo) {
    let pin = SlicedPacket::from_ethernet(input).expect("input parses");
    let pout = SlicedPacket::from_ethernet(output).expect("output parses");
    let eth = match &pout.link {
        Some(etherparse::LinkSlice::Ethernet2(e)) => e.to_header(),
        other => panic!("no Ethernet header out: {other:?}"),
    };
    assert_eq!(
        eth.destination, uplink.gw_mac,
        "destination MAC is the gateway's"
    );
    assert_eq!(eth.source, uplink.src_mac, "source MAC is the uplink's");
    assert!(pout.vlan.is_none(), "no VLAN tag leaves by an uplink");
    let (Some(etherparse::NetSlice::Ipv4(ip_in)), Some(etherparse::NetSlice::Ipv4(ip_out))) =
        (&pin.net, &pout.net)
    else {
        panic!("IPv4 in and out");
    };
    let (hin, hout) = (ip_in.header().to_header(), ip_out.header().to_header());
    assert_eq!(hout.time_to_live, hin.time_to_live - 1, "TTL decremented");
    assert_eq!(
        hout.header_checksum,
        hout.calc_header_checksum(),
        "IP header checksum valid"
    );
    let mut expect = hin.clone();
    expect.time_to_live -= 1;
    expect.header_checksum = expect.calc_header_checksum();
    assert_eq!(hout, expect, "nothing else in the IP header changed");
    assert_eq!(
        ip_in.payload().payload,
        ip_out.payload().payload,
        "payload untouched"
    );
    match &pout.transport {
        Some(TransportSlice::Udp(u)) => {
            let calc = u
                .to_header()
                .calc_checksum_ipv4(&hout, u.payload())
                .expect("udp checksum");
            assert_eq!(u.checksum(), calc, "UDP checksum valid");
        }
        Some(TransportSlice::Tcp(t)) => {
            let calc = t
                .to_header()
                .calc_checksum_ipv4(&hout, t.payload())
                .expect("tcp checksum");
            assert_eq!(t.checksum(), calc, "TCP checksum valid");
        }
        Some(TransportSlice::Icmpv4(_)) => {}
        other => panic!("unexpected transport {other:?}"),
    }
}

/// Which uplink a forwarded frame went to, by its source MAC.
fn uplink_of(output: &[u8]) -> u8 {
    output[6 + 4]
}

#[test]
fn every_packet_of_a_flow_leaves_by_the_same_uplink_and_flows_spread() {
    if !is_root() {
        return;
    }
    let mut h = Harness::new([uplink_state::ACTIVE; 2]);
    let mut used = [0u32; 3];
    for port in 40_000..40_064u16 {
        let frame = if port % 2 == 0 {
            udp(port, 64)
        } else {
            tcp(port)
        };
        let (verdict, first) = h.lan(&frame);
        assert_eq!(verdict, XDP_REDIRECT);
        let uplink = uplink_of(&first);
        assert_forwarded(&frame, &first, &uplink_info(uplink, uplink_state::ACTIVE));
        for _ in 0..5 {
            let (verdict, again) = h.lan(&frame);
            assert_eq!(verdict, XDP_REDIRECT);
            assert_eq!(again, first, "same flow, same uplink, same bytes");
        }
        used[uplink as usize] += 1;
    }
    assert!(
        used[1] > 10 && used[2] > 10,
        "64 flows spread over both uplinks: {used:?}"
    );
    let stats = h.dp.uplink_stats(0).expect("stats");
    assert_eq!(stats.new_flows, u64::from(used[1]));
    assert_eq!(stats.tx_packets, 6 * u64::from(used[1]));
}

#[test]
fn ip_options_and_icmp_echo_are_forwarded() {
    if !is_root() {
        return;
    }
    let mut h = Harness::new([uplink_state::ACTIVE; 2]);
    let mut ip = Ipv4Header::new(0, 64, etherparse::IpNumber::UDP, CLIENT, SERVER).expect("header");
    ip.options = [1u8, 1, 1, 0][..].try_into().expect("options"); // NOP NOP NOP END
    let b = PacketBuilder::ethernet2(CLIENT_MAC, ROUTER_LAN_MAC)
        .ip(IpHeaders::Ipv4(ip, Default::default()))
        .udp(5000, 53);
    let frame = build(b, b"with options");
    let (verdict, out) = h.lan(&frame);
    assert_eq!(verdict, XDP_REDIRECT);
    assert_forwarded(
        &frame,
        &out,
        &uplink_info(uplink_of(&out), uplink_state::ACTIVE),
    );

    let echo = build(
        PacketBuilder::ethernet2(CLIENT_MAC, ROUTER_LAN_MAC)
            .ipv4(CLIENT, SERVER, 64)
            .icmpv4_echo_request(77, 1),
        b"ping",
    );
    let (verdict, out) = h.lan(&echo);
    assert_eq!(verdict, XDP_REDIRECT);
    assert_forwarded(
        &echo,
        &out,
        &uplink_info(uplink_of(&out), uplink_state::ACTIVE),
    );
}

#[test]
fn vlan_tag_is_removed_on_the_way_out() {
    if !is_root() {
        return;
    }
    let mut h = Harness::new([uplink_state::ACTIVE; 2]);
    let b = PacketBuilder::ethernet2(CLIENT_MAC, ROUTER_LAN_MAC)
        .single_vlan(etherparse::VlanId::try_new(42).expect("vlan id"))
        .ipv4(CLIENT, SERVER, 64)
        .udp(6000, 53);
    let frame = build(b, b"tagged");
    let (verdict, out) = h.lan(&frame);
    assert_eq!(verdict, XDP_REDIRECT);
    assert_eq!(out.len(), frame.len() - 4);
    assert_forwarded(
        &frame,
        &out,
        &uplink_info(uplink_of(&out), uplink_state::ACTIVE),
    );
}

#[test]
fn what_the_fast_path_does_not_handle_passes_untouched() {
    if !is_root() {
        return;
    }
    let mut h = Harness::new([uplink_state::ACTIVE; 2]);
    let arp: Vec<u8> = [
        &[0xff; 6][..],
        &CLIENT_MAC,
        &[0x08, 0x06],
        &[0, 1, 8, 0, 6, 4, 0, 1],
        &CLIENT_MAC,
        &CLIENT,
        &[0; 6],
        &[10, 10, 0, 1],
    ]
    .concat();
    let ipv6 = build(
        PacketBuilder::ethernet2(CLIENT_MAC, ROUTER_LAN_MAC)
            .ipv6([0xfd; 16], [0xfe; 16], 64)
            .udp(1, 2),
        b"v6",
    );
    let full = udp(7000, 64);
    let truncated_ip = full[..14 + 12].to_vec();
    let truncated_l4 = {
        // Cut inside the UDP header, and make the IP length agree.
        let mut f = full[..14 + 20 + 2].to_vec();
        f[16..18].copy_from_slice(&22u16.to_be_bytes());
        f
    };
    // The kernel's test run wants at least an Ethernet header; this is one
    // that announces IPv4 and carries nothing.
    let runt = full[..14].to_vec();
    let mut lying_length = full.clone();
    lying_length[16..18].copy_from_slice(&1500u16.to_be_bytes());
    let mut fragment = full.clone();
    fragment[20] |= 0x20; // more fragments
    let to_router = build(
        PacketBuilder::ethernet2(CLIENT_MAC, ROUTER_LAN_MAC)
            .ipv4(CLIENT, ROUTER_LAN.octets(), 64)
            .udp(7001, 22),
        b"",
    );
    let lan_neighbour = build(
        PacketBuilder::ethernet2(CLIENT_MAC, ROUTER_LAN_MAC)
            .ipv4(CLIENT, [10, 10, 0, 3], 64)
            .udp(7002, 22),
        b"",
    );
    let ttl_one = udp(7003, 1);
    let gre = {
        let mut f = full.clone();
        f[23] = 47;
        f
    };

    let cases: [(&str, &[u8], u32); 11] = [
        ("ARP", &arp, reason::PASS_NOT_IPV4),
        ("IPv6", &ipv6, reason::PASS_NOT_IPV4),
        (
            "truncated IPv4 header",
            &truncated_ip,
            reason::PASS_MALFORMED,
        ),
        (
            "truncated UDP header",
            &truncated_l4,
            reason::PASS_MALFORMED,
        ),
        ("Ethernet header only", &runt, reason::PASS_MALFORMED),
        (
            "IP length beyond the frame",
            &lying_length,
            reason::PASS_MALFORMED,
        ),
        ("fragment", &fragment, reason::PASS_FRAGMENT),
        ("to the router", &to_router, reason::PASS_LOCAL),
        ("to another LAN host", &lan_neighbour, reason::PASS_LOCAL),
        ("TTL 1", &ttl_one, reason::PASS_TTL),
        ("GRE", &gre, reason::PASS_UNSUPPORTED),
    ];
    for (what, frame, why) in cases {
        let before = h.reason(why);
        let (verdict, out) = h.lan(frame);
        assert_eq!(verdict, XDP_PASS, "{what}: to the kernel");
        assert_eq!(out, frame, "{what}: untouched");
        assert_eq!(
            h.reason(why),
            before + 1,
            "{what}: counted as {}",
            reason::NAMES[why as usize]
        );
    }
}

#[test]
fn no_uplink_up_drops_and_counts() {
    if !is_root() {
        return;
    }
    let mut h = Harness::new([uplink_state::DOWN; 2]);
    let (verdict, _) = h.lan(&udp(8000, 64));
    assert_eq!(verdict, XDP_DROP);
    assert_eq!(h.reason(reason::DROP_NO_UPLINK), 1);
}

#[test]
fn flows_of_a_downed_uplink_move_and_drained_ones_stay() {
    if !is_root() {
        return;
    }
    let mut h = Harness::new([uplink_state::ACTIVE; 2]);
    // Find one flow on each uplink.
    let mut on = [None, None];
    for port in 9000..9100u16 {
        let (_, out) = h.lan(&udp(port, 64));
        on[uplink_of(&out) as usize - 1].get_or_insert(port);
    }
    let (Some(p1), Some(p2)) = (on[0], on[1]) else {
        panic!("no flow on one uplink: {on:?}")
    };

    // Drain uplink 1: its flow stays.
    h.dp.set_uplink_state(0, uplink_state::DRAIN)
        .expect("drain");
    assert_eq!(
        uplink_of(&h.lan(&udp(p1, 64)).1),
        1,
        "drained uplink keeps its flow"
    );
    // Down: the flow moves to uplink 2 once the table no longer points at 1.
    h.dp.set_uplink_state(0, uplink_state::DOWN).expect("down");
    let mut t = table::empty();
    let mut w = [0u32; MAX_UPLINKS as usize];
    w[1] = 1;
    table::rebalance(&mut t, &w);
    h.dp.set_buckets(&t).expect("buckets");
    assert_eq!(
        uplink_of(&h.lan(&udp(p1, 64)).1),
        2,
        "flow of a dead uplink moves"
    );
    assert_eq!(
        uplink_of(&h.lan(&udp(p2, 64)).1),
        2,
        "flow on a live uplink stays"
    );
    assert_eq!(h.dp.uplink_stats(0).expect("stats").moved_away, 1);
}

#[test]
fn wan_ingress_counts_and_passes() {
    if !is_root() {
        return;
    }
    let mut h = Harness::new([uplink_state::ACTIVE; 2]);
    let frame = udp(53, 60);
    let (verdict, out) = h.run(program::WAN_INGRESS, &frame);
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(out, frame);
}
