//! The failover as a picture: per-uplink throughput of the established
//! flow around one upstream cut, lb above the Netwatch-style script, as an
//! SVG that BENCHMARKS.md shows. Only drawing here; the traces come from
//! the failover runs' own arrivals.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

/// Width of one bin of the trace.
const BIN: Duration = Duration::from_millis(20);
/// The window drawn, relative to the cut, in ms.
const FROM_MS: f64 = -250.0;
const TO_MS: f64 = 2500.0;

/// Datagrams per second through each uplink, in bins from `FROM_MS`, up to
/// the stream's last arrival.
#[derive(Clone, Debug)]
pub struct Trace {
    /// The bin of the stream's first arrival: nothing is drawn before it.
    pub first: usize,
    pub isp1: Vec<f64>,
    pub isp2: Vec<f64>,
}

impl Trace {
    /// From a stream's arrivals (sequence, when, source address) and the
    /// moment of the cut.
    pub fn of(
        arrivals: &[(u32, Instant, [u8; 4])],
        cut: Instant,
        isp1: [u8; 4],
        isp2: [u8; 4],
    ) -> Trace {
        let bins = ((TO_MS - FROM_MS) / BIN.as_secs_f64() / 1e3) as usize;
        let since_cut_ms = |t: Instant| -> f64 {
            if t >= cut {
                (t - cut).as_secs_f64() * 1e3
            } else {
                -((cut - t).as_secs_f64() * 1e3)
            }
        };
        let bin_of = |ms: f64| ((ms - FROM_MS) / (BIN.as_secs_f64() * 1e3)).max(0.0) as usize;
        let last = arrivals
            .iter()
            .map(|&(_, t, _)| since_cut_ms(t))
            .fold(FROM_MS, f64::max);
        let first = arrivals
            .iter()
            .map(|&(_, t, _)| since_cut_ms(t))
            .fold(TO_MS, f64::min);
        let used = (bin_of(last) + 1).min(bins);
        let mut trace = Trace {
            first: bin_of(first).min(used),
            isp1: vec![0.0; used],
            isp2: vec![0.0; used],
        };
        let per_datagram = 1.0 / BIN.as_secs_f64();
        for &(_, t, via) in arrivals {
            let bin = (since_cut_ms(t) - FROM_MS) / (BIN.as_secs_f64() * 1e3);
            if bin < 0.0 || bin as usize >= used {
                continue;
            }
            if via == isp1 {
                trace.isp1[bin as usize] += per_datagram;
            } else if via == isp2 {
                trace.isp2[bin as usize] += per_datagram;
            }
        }
        trace
    }
}

const WIDTH: f64 = 760.0;
const PANEL: f64 = 170.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 40.0;
const GAP: f64 = 60.0;
const ISP1_COLOUR: &str = "#1f77b4";
const ISP2_COLOUR: &str = "#ff7f0e";

/// One SVG with a panel per (title, trace), on the same axes.
pub fn svg(title: &str, panels: &[(String, &Trace)]) -> String {
    let height = TOP + panels.len() as f64 * (PANEL + GAP) + 30.0;
    let peak = panels
        .iter()
        .flat_map(|(_, t)| t.isp1.iter().chain(&t.isp2))
        .fold(1.0_f64, |a, &b| a.max(b));
    // A round top of the y axis: 1, 2 or 5 times a power of ten.
    let magnitude = 10f64.powf(peak.log10().floor());
    let top = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|&v| v >= peak)
        .unwrap_or(peak);
    let plot_w = WIDTH - LEFT - RIGHT;
    let x = |ms: f64| LEFT + (ms - FROM_MS) / (TO_MS - FROM_MS) * plot_w;

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{LEFT}" y="20" font-size="14" font-weight="bold">{}</text>"#,
        escape(title)
    );
    for (i, (name, trace)) in panels.iter().enumerate() {
        let y0 = TOP + i as f64 * (PANEL + GAP) + 20.0;
        let y = |v: f64| y0 + PANEL - v / top * PANEL;
        let _ = writeln!(
            s,
            r#"<text x="{LEFT}" y="{}" font-weight="bold">{}</text>"#,
            y0 - 6.0,
            escape(name)
        );
        // Axes, grid and labels.
        for k in 0..=4 {
            let v = top * f64::from(k) / 4.0;
            let _ = writeln!(
                s,
                r##"<line x1="{LEFT}" x2="{}" y1="{yy}" y2="{yy}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">{v:.0}</text>"##,
                WIDTH - RIGHT,
                LEFT - 6.0,
                y(v) + 4.0,
                yy = y(v)
            );
        }
        let mut ms = FROM_MS;
        while ms <= TO_MS {
            let _ = writeln!(
                s,
                r##"<line x1="{xx}" x2="{xx}" y1="{}" y2="{}" stroke="#999"/><text x="{xx}" y="{}" text-anchor="middle">{ms:.0}</text>"##,
                y(0.0),
                y(0.0) + 4.0,
                y(0.0) + 16.0,
                xx = x(ms)
            );
            ms += 250.0;
        }
        let _ = writeln!(
            s,
            r##"<line x1="{xx}" x2="{xx}" y1="{}" y2="{}" stroke="#c00" stroke-dasharray="4 3"/><text x="{}" y="{}" fill="#c00">cut</text>"##,
            y(top),
            y(0.0),
            x(0.0) + 4.0,
            y(top) + 12.0,
            xx = x(0.0)
        );
        for (values, colour) in [(&trace.isp1, ISP1_COLOUR), (&trace.isp2, ISP2_COLOUR)] {
            let points: Vec<String> = values
                .iter()
                .enumerate()
                .skip(trace.first)
                .map(|(b, &v)| {
                    let ms = FROM_MS + (b as f64 + 0.5) * BIN.as_secs_f64() * 1e3;
                    format!("{:.1},{:.1}", x(ms), y(v))
                })
                .collect();
            let _ = writeln!(
                s,
                r#"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{}"/>"#,
                points.join(" ")
            );
        }
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">ms after the cut; datagrams/s of the flow per uplink ({} ms bins)</text>"#,
            LEFT + plot_w / 2.0,
            y(0.0) + 32.0,
            BIN.as_millis()
        );
    }
    // Legend.
    for (i, (label, colour)) in [("through isp1", ISP1_COLOUR), ("through isp2", ISP2_COLOUR)]
        .iter()
        .enumerate()
    {
        let lx = LEFT + i as f64 * 115.0;
        let ly = height - 12.0;
        let _ = writeln!(
            s,
            r#"<line x1="{lx}" x2="{}" y1="{ly}" y2="{ly}" stroke="{colour}" stroke-width="3"/><text x="{}" y="{}">{label}</text>"#,
            lx + 20.0,
            lx + 25.0,
            ly + 4.0
        );
    }
    s.push_str("</svg>\n");
    s
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
