//! The pipeline's picture: loss curves of every training stage and a bar chart of task
//! completion per stage labelled with its size, as one self-contained SVG.

use std::fmt::Write as _;

use crate::train::fit::LogPoint;

/// One bar: a stage's name, size and task completion (0..1).
pub struct Bar {
    /// Stage name.
    pub name: String,
    /// Size label (e.g. "4.98M params, 19.0 MiB").
    pub size: String,
    /// Task completion in 0..1.
    pub value: f64,
}

const COLORS: [&str; 5] = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd"];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// Round values for a log axis from `lo` to `hi`: 1, 2 and 5 times powers of ten; only powers
/// of ten past two decades; every whole multiple below a factor of 5.
fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    if !(lo > 0.0 && hi > lo && lo.is_finite() && hi.is_finite()) {
        return vec![];
    }
    let within = |steps: &[f64]| {
        let mut out = vec![];
        for e in lo.log10().floor() as i32..=hi.log10().ceil() as i32 {
            for m in steps {
                let v = m * 10f64.powi(e);
                if v >= lo * (1.0 - 1e-9) && v <= hi * (1.0 + 1e-9) {
                    out.push(v);
                }
            }
        }
        out
    };
    match hi / lo {
        r if r > 100.0 => within(&[1.0]),
        r if r > 5.0 => within(&[1.0, 2.0, 5.0]),
        // Less than a factor of 5: every whole multiple of the power of ten.
        _ => within(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]),
    }
}

/// A tick value as people write it: `0.01`, `0.2`, `5`, `20`.
fn tick_label(v: f64) -> String {
    let digits = (-v.log10().floor()).max(0.0) as usize;
    format!("{v:.digits$}")
}

/// Renders the SVG. `curves` are (name, points); train loss is drawn thin, validation loss
/// thick with dots. Loss is on a log scale.
pub fn svg(title: &str, curves: &[(String, Vec<LogPoint>)], bars: &[Bar]) -> String {
    let (w, h) = (960.0, 450.0);
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = write!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = write!(s, r#"<text x="{}" y="22" font-size="16" text-anchor="middle">{}</text>"#, w / 2.0, esc(title));
    // Left panel: loss curves, x = fraction of each stage's steps, y = log loss.
    let (x0, y0, pw, ph) = (60.0, 50.0, 400.0, 310.0);
    let losses: Vec<f64> = curves
        .iter()
        .flat_map(|(_, pts)| pts.iter().flat_map(|p| [Some(p.train_loss), p.val_loss]).flatten())
        .filter(|v| v.is_finite() && *v > 0.0)
        .collect();
    let lo = losses.iter().cloned().fold(f64::INFINITY, f64::min).max(1e-4).ln();
    let hi = losses.iter().cloned().fold(0.0, f64::max).max(1e-3).ln();
    let span = (hi - lo).max(1e-6);
    let y_of = |v: f64| y0 + ph - (v.max(1e-4).ln() - lo) / span * ph;
    let _ = write!(s, r##"<rect x="{x0}" y="{y0}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>"##);
    let _ = write!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">training progress (share of each stage's steps)</text>"#,
        x0 + pw / 2.0,
        y0 + ph + 30.0
    );
    let _ = write!(
        s,
        r#"<text x="16" y="{}" transform="rotate(-90 16 {})" text-anchor="middle">loss (log scale)</text>"#,
        y0 + ph / 2.0,
        y0 + ph / 2.0
    );
    for v in log_ticks(lo.exp(), hi.exp()) {
        let y = y_of(v);
        let _ = write!(
            s,
            r##"<line x1="{x0}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#eee"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            x0 + pw,
            x0 - 4.0,
            y + 4.0,
            tick_label(v)
        );
    }
    for (i, (name, pts)) in curves.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let last = pts.last().map_or(1, |p| p.step.max(1)) as f64;
        let x_of = |step: usize| x0 + step as f64 / last * pw;
        let train: Vec<String> = pts.iter().map(|p| format!("{:.1},{:.1}", x_of(p.step), y_of(p.train_loss))).collect();
        let _ =
            write!(s, r#"<polyline fill="none" stroke="{color}" stroke-opacity="0.45" points="{}"/>"#, train.join(" "));
        let val: Vec<(f64, f64)> = pts.iter().filter_map(|p| p.val_loss.map(|v| (x_of(p.step), y_of(v)))).collect();
        let line: Vec<String> = val.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
        let _ = write!(s, r#"<polyline fill="none" stroke="{color}" stroke-width="2.5" points="{}"/>"#, line.join(" "));
        for (x, y) in &val {
            let _ = write!(s, r#"<circle cx="{x:.1}" cy="{y:.1}" r="2.5" fill="{color}"/>"#);
        }
        let ly = y0 + 16.0 + 16.0 * i as f64;
        let _ = write!(
            s,
            r#"<line x1="{}" x2="{}" y1="{ly}" y2="{ly}" stroke="{color}" stroke-width="2.5"/><text x="{}" y="{}">{} (thick: validation)</text>"#,
            x0 + pw - 190.0,
            x0 + pw - 170.0,
            x0 + pw - 165.0,
            ly + 4.0,
            esc(name)
        );
    }
    // Right panel: task completion bars.
    let (bx0, by0, bw, bh) = (540.0, 50.0, 390.0, 310.0);
    let _ = write!(s, r##"<rect x="{bx0}" y="{by0}" width="{bw}" height="{bh}" fill="none" stroke="#888"/>"##);
    let _ = write!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">task completion on held-out commands (exact match)</text>"#,
        bx0 + bw / 2.0,
        by0 + bh + 50.0
    );
    for k in 0..=4 {
        let y = by0 + bh - bh * k as f64 / 4.0;
        let _ = write!(
            s,
            r##"<line x1="{bx0}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#eee"/><text x="{}" y="{:.1}" text-anchor="end">{}%</text>"##,
            bx0 + bw,
            bx0 - 4.0,
            y + 4.0,
            k * 25
        );
    }
    let n = bars.len().max(1) as f64;
    let slot = bw / n;
    for (i, b) in bars.iter().enumerate() {
        let bar_h = b.value.clamp(0.0, 1.0) * bh;
        let x = bx0 + slot * i as f64 + slot * 0.15;
        let y = by0 + bh - bar_h;
        let color = COLORS[i % COLORS.len()];
        let _ =
            write!(s, r#"<rect x="{x:.1}" y="{y:.1}" width="{:.1}" height="{bar_h:.1}" fill="{color}"/>"#, slot * 0.7);
        let cx = x + slot * 0.35;
        let _ = write!(
            s,
            r#"<text x="{cx:.1}" y="{:.1}" text-anchor="middle" font-weight="bold">{:.1}%</text>"#,
            y - 6.0,
            100.0 * b.value
        );
        let _ =
            write!(s, r#"<text x="{cx:.1}" y="{:.1}" text-anchor="middle">{}</text>"#, by0 + bh + 15.0, esc(&b.name));
        let _ = write!(
            s,
            r##"<text x="{cx:.1}" y="{:.1}" text-anchor="middle" font-size="10" fill="#555">{}</text>"##,
            by0 + bh + 29.0,
            esc(&b.size)
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_every_stage_and_escapes_text() {
        let pts = vec![
            LogPoint { step: 10, train_loss: 2.0, val_loss: None, lr: 1e-3 },
            LogPoint { step: 20, train_loss: 1.0, val_loss: Some(1.2), lr: 1e-3 },
        ];
        let bars = [
            Bar { name: "teacher".into(), size: "5M".into(), value: 0.97 },
            Bar { name: "a<b".into(), size: "1M".into(), value: 0.5 },
        ];
        let out = svg("t", &[("teacher".into(), pts)], &bars);
        assert!(out.starts_with("<svg") && out.ends_with("</svg>\n"));
        assert!(out.contains("97.0%") && out.contains("50.0%"));
        assert!(out.contains("a&lt;b") && !out.contains("a<b"));
        assert_eq!(out.matches("<circle").count(), 1, "one validation point");
    }

    #[test]
    fn loss_ticks_are_round_numbers_inside_the_range() {
        assert_eq!(log_ticks(0.3, 6.0), [0.5, 1.0, 2.0, 5.0]);
        assert_eq!(log_ticks(0.012, 10.7), [0.1, 1.0, 10.0]);
        assert_eq!(tick_label(0.30000000000000004), "0.3");
        assert!(log_ticks(1.0, 1.0).is_empty());
        let fine = log_ticks(0.25, 0.95);
        let want = [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9];
        assert!(fine.len() == want.len() && fine.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-12), "{fine:?}");
        let labels: Vec<String> = [0.01, 0.2, 5.0, 20.0].iter().map(|&v| tick_label(v)).collect();
        assert_eq!(labels, ["0.01", "0.2", "5", "20"]);
    }
}
