//! An SVG of containers running over time, one line per simulation.

use std::fmt::Write as _;

use crate::Outcome;

const W: f64 = 720.0;
const H: f64 = 420.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 150.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;
const COLOURS: [&str; 6] = ["#d62728", "#9467bd", "#ff7f0e", "#1f77b4", "#2ca02c", "#8c564b"];

/// The plot of `outcomes` (containers running against seconds), titled `title`.
pub fn svg(title: &str, outcomes: &[Outcome]) -> String {
    let end = outcomes.iter().map(|o| o.seconds_all_running).filter(|s| s.is_finite()).fold(1.0_f64, f64::max) * 1.05;
    let first = outcomes.iter().map(|o| o.seconds_first_running).filter(|s| s.is_finite() && *s > 0.0).fold(end, f64::min);
    // Systems seconds and minutes apart share a plot on a log scale.
    let log = end / first > 20.0;
    let start = if log { 10f64.powf((first * 0.8).log10().floor()) } else { 0.0 };
    let most = outcomes.iter().map(|o| o.running.len()).max().unwrap_or(1).max(1) as f64;
    let (pw, ph) = (W - LEFT - RIGHT, H - TOP - BOTTOM);
    let x = |s: f64| if log { LEFT + (s.max(start) / start).log10() / (end / start).log10() * pw } else { LEFT + s / end * pw };
    let y = |n: f64| TOP + ph - n / most * ph;
    let mut out = String::new();
    let _ = writeln!(out, r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#);
    let _ = writeln!(out, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(out, r#"<text x="{}" y="22" text-anchor="middle" font-size="14">{}</text>"#, LEFT + pw / 2.0, escape(title));
    // Axes, ticks and grid.
    let _ = writeln!(out, r##"<path d="M{LEFT},{TOP} V{} H{}" fill="none" stroke="#333"/>"##, TOP + ph, LEFT + pw);
    let ticks: Vec<f64> = if log {
        let mut v = Vec::new();
        let mut decade = start;
        while decade <= end {
            v.extend([1.0, 2.0, 5.0].iter().map(|m| m * decade).filter(|t| *t <= end));
            decade *= 10.0;
        }
        v
    } else {
        let step = nice_step(end);
        (0..).map(|i| i as f64 * step).take_while(|t| *t <= end).collect()
    };
    for t in ticks {
        let _ = writeln!(
            out,
            r##"<line x1="{0:.1}" y1="{TOP}" x2="{0:.1}" y2="{1}" stroke="#eee"/><text x="{0:.1}" y="{2}" text-anchor="middle">{3}</text>"##,
            x(t),
            TOP + ph,
            TOP + ph + 16.0,
            trim(t)
        );
    }
    for i in 0..=4 {
        let n = most * i as f64 / 4.0;
        let _ = writeln!(out, r#"<text x="{}" y="{:.1}" text-anchor="end">{}</text>"#, LEFT - 6.0, y(n) + 4.0, n.round());
    }
    let _ = writeln!(
        out,
        r#"<text x="{}" y="{}" text-anchor="middle">seconds since the invocations{}</text>"#,
        LEFT + pw / 2.0,
        H - 12.0,
        if log { " (log scale)" } else { "" }
    );
    let _ =
        writeln!(out, r#"<text x="16" y="{}" text-anchor="middle" transform="rotate(-90 16 {})">containers running</text>"#, TOP + ph / 2.0, TOP + ph / 2.0);
    for (i, o) in outcomes.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let mut d = format!("M{:.1},{:.1}", x(start), y(0.0));
        // A step where the count rises; the starts of one pixel are one step.
        let mut pending = None;
        for (n, s) in o.running.iter().enumerate() {
            let at = x(*s);
            if let Some((px, count)) = pending {
                if at - px >= 1.0 {
                    let _ = write!(d, " H{px:.1} V{:.1}", y(count));
                    pending = None;
                }
            }
            pending = Some((pending.map_or(at, |(px, _)| px), (n + 1) as f64));
        }
        if let Some((px, count)) = pending {
            let _ = write!(d, " H{px:.1} V{:.1}", y(count));
        }
        let _ = write!(d, " H{:.1}", x(end));
        let _ = writeln!(out, r#"<path d="{d}" fill="none" stroke="{colour}" stroke-width="2"/>"#);
        let ly = TOP + 14.0 + 18.0 * i as f64;
        let _ = writeln!(
            out,
            r#"<line x1="{0}" y1="{1}" x2="{2}" y2="{1}" stroke="{colour}" stroke-width="2"/><text x="{3}" y="{4}">{5} ({6:.1} s)</text>"#,
            LEFT + pw + 10.0,
            ly,
            LEFT + pw + 30.0,
            LEFT + pw + 36.0,
            ly + 4.0,
            escape(o.system),
            o.seconds_all_running
        );
    }
    out.push_str("</svg>\n");
    out
}

fn nice_step(end: f64) -> f64 {
    let raw = end / 8.0;
    let mag = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * mag).find(|s| *s >= raw).unwrap_or(10.0 * mag)
}

fn trim(t: f64) -> String {
    let s = format!("{t:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_owned()
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}
