//! `tuna compare`'s report: `compare.html` (the table and four panels, self-contained) and each
//! panel as its own SVG: the eval metric against trainable parameters (`compare.svg`), learning
//! curves from each method's `metrics.jsonl` (`compare-curves.svg`), tokens/s and peak memory
//! (`compare-speed.svg`) and checkpoint size (`compare-checkpoint.svg`). Hand-written SVG: one
//! function per panel over a shared [`Scale`].

use crate::compare_cmd::Row;
use serde_json::Value;
use std::fmt::Write as _;
use std::path::Path;

/// The panels' files, in the report's order (the first is the accuracy scatter).
pub const PANELS: [&str; 4] = ["compare.svg", "compare-curves.svg", "compare-speed.svg", "compare-checkpoint.svg"];

const FONT: f64 = 12.0;
/// The width a character is taken to have when laying out labels (DejaVu Sans and Helvetica
/// average about 0.55 em; digits and capitals are wider).
pub const CHAR_W: f64 = 0.62 * FONT;
/// Method names longer than this are cut (with an ellipsis) in the panels; the table has them whole.
const NAME_MAX: usize = 24;
const COLORS: [&str; 10] =
    ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];

/// A method's learning curves as (step, value) points; empty for a run that trained nothing or
/// whose log is missing.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Curves {
    /// The eval accuracy at each evaluation (absent for a task without one).
    pub eval_accuracy: Vec<(f64, f64)>,
    pub eval_loss: Vec<(f64, f64)>,
    pub train_loss: Vec<(f64, f64)>,
}

impl Curves {
    /// The curves in a run folder's `metrics.jsonl`; a missing or unreadable log gives none (with
    /// a warning for an unreadable one: the report goes on without that method's curves).
    pub fn read(dir: &Path) -> Curves {
        let path = dir.join("metrics.jsonl");
        if !path.exists() {
            return Curves::default();
        }
        match tuna_trainer::read_log(&path) {
            Ok(lines) => Curves::from_lines(&lines),
            Err(e) => {
                eprintln!("warning: the report leaves out the learning curves of {}: {e}", dir.display());
                Curves::default()
            }
        }
    }

    /// The curves of a log's parsed lines (`{"step":N,"split":"train"|"eval",...}`); a value that
    /// is absent, `null` (not finite when logged) or not a number is skipped.
    pub fn from_lines(lines: &[serde_json::Map<String, Value>]) -> Curves {
        let mut c = Curves::default();
        for l in lines {
            let Some(step) = l.get("step").and_then(Value::as_u64) else { continue };
            let get = |k: &str| l.get(k).and_then(Value::as_f64).filter(|v| v.is_finite()).map(|v| (step as f64, v));
            match l.get("split").and_then(Value::as_str) {
                Some("train") => c.train_loss.extend(get("loss")),
                Some("eval") => {
                    c.eval_loss.extend(get("loss"));
                    c.eval_accuracy.extend(get("accuracy"));
                }
                _ => {}
            }
        }
        c
    }

    fn is_empty(&self) -> bool {
        self.eval_accuracy.is_empty() && self.eval_loss.is_empty() && self.train_loss.is_empty()
    }
}

/// A count for people: `0`, `950`, `10K`, `1.5K`, `100K`, `22.7M`, `3B`.
pub fn human(x: f64) -> String {
    if !x.is_finite() {
        return "n/a".into();
    }
    let a = x.abs();
    let (div, unit) = match a {
        a if a >= 1e9 => (1e9, "B"),
        a if a >= 1e6 => (1e6, "M"),
        a if a >= 1e3 => (1e3, "K"),
        _ => (1.0, ""),
    };
    let v = x / div;
    // One decimal where it says something (1.5K, 22.7M), none where it would be .0 or for
    // three-digit values (150K); small plain numbers keep up to three significant digits.
    let s = if div == 1.0 && a < 100.0 && a.fract() != 0.0 {
        let d = if a >= 10.0 { 1 } else { 2 };
        trim_zeros(format!("{v:.d$}"))
    } else if v.abs() >= 100.0 || (v * 10.0).round() % 10.0 == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    };
    s + unit
}

fn trim_zeros(s: String) -> String {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// Text for SVG and HTML: `&`, `<`, `>` and quotes escaped.
pub fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// A method name as the panels show it: cut to [`NAME_MAX`] characters.
fn short(name: &str) -> String {
    if name.chars().count() <= NAME_MAX {
        name.to_string()
    } else {
        name.chars().take(NAME_MAX - 1).collect::<String>() + "…"
    }
}

/// The laid-out width of `s` in pixels (see [`CHAR_W`]).
fn text_w(s: &str) -> f64 {
    s.chars().count() as f64 * CHAR_W
}

/// An axis: where a value falls (0 to 1 along the axis) and the ticks to label.
#[derive(Debug, Clone, PartialEq)]
pub enum Scale {
    Linear {
        lo: f64,
        hi: f64,
        step: f64,
    },
    /// Decades `10^lo` to `10^hi`; with `zero`, the axis starts with a labelled 0 set apart from
    /// the decades (a log axis has no place for 0 otherwise).
    Log {
        lo: i32,
        hi: i32,
        zero: bool,
    },
}

/// The share of a log axis given to its 0 position (and the gap after it).
const ZERO_GAP: f64 = 0.1;

impl Scale {
    /// A linear axis over the finite `values` with round ticks (about five); `from_zero` starts
    /// it at 0 (bars). No finite value: 0 to 1.
    pub fn linear(values: &[f64], from_zero: bool) -> Scale {
        let fin: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
        let mut lo = fin.iter().copied().fold(f64::INFINITY, f64::min);
        let mut hi = fin.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        if fin.is_empty() {
            (lo, hi) = (0.0, 1.0);
        }
        if from_zero {
            lo = lo.min(0.0);
            hi = hi.max(0.0);
        }
        if hi - lo < 1e-12 * hi.abs().max(1.0) {
            // One value (or all equal): a band around it.
            let d = if hi == 0.0 { 1.0 } else { hi.abs() * 0.1 };
            (lo, hi) = if from_zero && lo >= 0.0 { (0.0, hi + d) } else { (lo - d, hi + d) };
        }
        Scale::nice(lo, hi, false)
    }

    /// A step axis: 0 to `max` (at least 1) with whole-number ticks.
    pub fn steps(max: f64) -> Scale {
        Scale::nice(0.0, if max.is_finite() { max.max(1.0) } else { 1.0 }, true)
    }

    /// `lo` to `hi` widened to round ticks, about five: steps of 1, 2, 2.5 or 5 times a power of
    /// ten (`whole`: no 2.5 and at least 1).
    fn nice(lo: f64, hi: f64, whole: bool) -> Scale {
        let raw = (hi - lo) / 5.0;
        let mag = 10f64.powf(raw.log10().floor());
        let mults: &[f64] = if whole { &[1.0, 2.0, 5.0, 10.0] } else { &[1.0, 2.0, 2.5, 5.0, 10.0] };
        let mut step = mults.iter().map(|m| m * mag).find(|s| *s >= raw * (1.0 - 1e-9)).unwrap_or(10.0 * mag);
        if whole {
            step = step.max(1.0).round();
        }
        // The small tolerance keeps a bound that is a tick (0.8 / 0.02 = 40.000000000000004) one.
        let lo = ((lo / step) + 1e-9).floor() * step;
        let hi = ((hi / step) - 1e-9).ceil() * step;
        Scale::Linear { lo, hi, step }
    }

    /// A log axis over the decades around the positive finite `values`; a 0 among them adds the
    /// 0 position. Negative values have no place (see [`Scale::frac`]).
    pub fn log(values: &[f64]) -> Scale {
        let pos: Vec<f64> = values.iter().copied().filter(|v| v.is_finite() && *v > 0.0).collect();
        let zero = values.contains(&0.0);
        if pos.is_empty() {
            return Scale::Log { lo: 0, hi: 1, zero };
        }
        let lo = pos.iter().copied().fold(f64::INFINITY, f64::min).log10().floor() as i32;
        let hi = pos.iter().copied().fold(f64::NEG_INFINITY, f64::max).log10().ceil() as i32;
        Scale::Log { lo, hi: hi.max(lo + 1), zero }
    }

    /// Where `v` falls along the axis (0 to 1); `None` for a value it cannot show (not finite,
    /// or not positive on a log axis without 0).
    pub fn frac(&self, v: f64) -> Option<f64> {
        if !v.is_finite() {
            return None;
        }
        match *self {
            Scale::Linear { lo, hi, .. } => Some((v - lo) / (hi - lo)),
            Scale::Log { zero: true, .. } if v == 0.0 => Some(0.0),
            Scale::Log { .. } if v <= 0.0 => None,
            Scale::Log { lo, hi, zero } => {
                let f = (v.log10() - lo as f64) / (hi - lo) as f64;
                Some(if zero { ZERO_GAP + (1.0 - ZERO_GAP) * f } else { f })
            }
        }
    }

    /// The ticks: (position 0 to 1, label). Log axes label each decade (10K, 100K, 1M).
    pub fn ticks(&self) -> Vec<(f64, String)> {
        match *self {
            Scale::Linear { lo, hi, step } => {
                let n = ((hi - lo) / step).round() as i64;
                let decimals = (-step.log10().floor()).max(0.0) as usize + usize::from(step.log10().fract() != 0.0);
                (0..=n)
                    .map(|k| {
                        let v = lo + k as f64 * step;
                        let label = if v.abs() >= 1000.0 { human(v) } else { trim_zeros(format!("{v:.decimals$}")) };
                        ((v - lo) / (hi - lo), label)
                    })
                    .collect()
            }
            Scale::Log { lo, hi, zero } => {
                let mut t: Vec<(f64, String)> = if zero { vec![(0.0, "0".into())] } else { Vec::new() };
                // Every decade, or every other one on a long axis.
                let every = if hi - lo > 8 { 2 } else { 1 };
                for e in (lo..=hi).filter(|e| (e - lo) % every == 0) {
                    let v = 10f64.powi(e);
                    t.push((self.frac(v).unwrap_or(0.0), human(v)));
                }
                t
            }
        }
    }
}

/// A plot area in pixels and its two scales; the scales span the area less an inset of
/// [`INSET`] on each side, so that points at the ends of a scale stay off the frame.
struct Area {
    x: f64,
    y: f64,
    w: f64,
    h: f64,
    sx: Scale,
    sy: Scale,
}

const INSET: f64 = 0.04;

/// A fraction of a scale as a fraction of the plot area.
fn inset(f: f64) -> f64 {
    INSET + f * (1.0 - 2.0 * INSET)
}

impl Area {
    fn px(&self, v: f64) -> Option<f64> {
        self.sx.frac(v).map(|f| self.x + inset(f) * self.w)
    }
    fn py(&self, v: f64) -> Option<f64> {
        self.sy.frac(v).map(|f| self.y + self.h - inset(f) * self.h)
    }

    /// The frame, grid lines, tick labels and axis titles.
    fn axes(&self, s: &mut String, xtitle: &str, ytitle: &str) {
        let (x, y, w, h) = (self.x, self.y, self.w, self.h);
        for (f, label) in self.sx.ticks() {
            let px = x + inset(f) * w;
            let _ = writeln!(
                s,
                "<line x1=\"{px:.1}\" y1=\"{y:.1}\" x2=\"{px:.1}\" y2=\"{:.1}\" stroke=\"#e5e5e5\"/>\n<text x=\"{px:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
                y + h,
                y + h + 16.0,
                esc(&label)
            );
        }
        for (f, label) in self.sy.ticks() {
            let py = y + h - inset(f) * h;
            let _ = writeln!(
                s,
                "<line x1=\"{x:.1}\" y1=\"{py:.1}\" x2=\"{:.1}\" y2=\"{py:.1}\" stroke=\"#e5e5e5\"/>\n<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
                x + w,
                x - 5.0,
                py + 4.0,
                esc(&label)
            );
        }
        let _ = writeln!(
            s,
            "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{w:.1}\" height=\"{h:.1}\" fill=\"none\" stroke=\"#333\"/>"
        );
        if let Scale::Log { zero: true, .. } = self.sx {
            // The break between 0 and the first decade.
            let bx = x + inset(ZERO_GAP / 2.0) * w;
            let _ = writeln!(
                s,
                "<path d=\"M{:.1} {:.1} l6 -8 M{:.1} {:.1} l6 -8\" stroke=\"#333\"/>",
                bx - 5.0,
                y + h + 4.0,
                bx,
                y + h + 4.0
            );
        }
        if !xtitle.is_empty() {
            let _ = writeln!(
                s,
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
                x + w / 2.0,
                y + h + 34.0,
                esc(xtitle)
            );
        }
        if !ytitle.is_empty() {
            let (tx, ty) = (x - 48.0, y + h / 2.0);
            let _ = writeln!(
                s,
                "<text x=\"{tx:.1}\" y=\"{ty:.1}\" transform=\"rotate(-90 {tx:.1} {ty:.1})\" text-anchor=\"middle\">{}</text>",
                esc(ytitle)
            );
        }
    }
}

fn open(w: f64, h: f64, title: &str) -> String {
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" font-family=\"DejaVu Sans, Helvetica, Arial, sans-serif\" font-size=\"{FONT}\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"12\" y=\"22\" font-size=\"14\" font-weight=\"bold\">{}</text>\n",
        esc(title)
    )
}

/// The eval metric the panels plot: accuracy when a method has one, else eval loss.
fn metric(rows: &[Row]) -> (&'static str, bool) {
    if rows.iter().any(|r| r.run.eval_accuracy.is_some()) {
        ("eval accuracy", true)
    } else {
        ("eval loss", false)
    }
}

fn row_metric(r: &Row, accuracy: bool) -> Option<f64> {
    if accuracy { r.run.eval_accuracy } else { r.run.eval_loss }.filter(|v| v.is_finite())
}

/// Panel 1: the eval metric (y) against trainable parameters (x, log scale with human ticks and a
/// 0 position for a method that trains nothing), one labelled point per method with a metric.
pub fn accuracy_svg(rows: &[Row]) -> String {
    let (name, acc) = metric(rows);
    let (w, h) = (720.0, 420.0);
    // (params, metric, label, row index: each method keeps its colour across the panels)
    let pts: Vec<(f64, f64, String, usize)> = rows
        .iter()
        .enumerate()
        .filter_map(|(i, r)| row_metric(r, acc).map(|m| (r.run.trainable_params as f64, m, short(&r.run.method), i)))
        .collect();
    let missing: Vec<&str> =
        rows.iter().filter(|r| row_metric(r, acc).is_none()).map(|r| r.run.method.as_str()).collect();
    let area = Area {
        x: 80.0,
        y: 40.0,
        w: w - 110.0,
        h: h - 120.0,
        sx: Scale::log(&pts.iter().map(|p| p.0).collect::<Vec<_>>()),
        sy: Scale::linear(&pts.iter().map(|p| p.1).collect::<Vec<_>>(), false),
    };
    let mut s = open(w, h, &format!("{name} against trainable parameters"));
    area.axes(&mut s, "trainable parameters (log scale)", name);
    // Labels right of their point (left near the right edge), moved down or up past the labels
    // already placed.
    let mut placed: Vec<(f64, f64, f64, f64)> = Vec::new();
    for (x, y, label, i) in &pts {
        let (Some(px), Some(py)) = (area.px(*x), area.py(*y)) else { continue };
        let color = COLORS[i % COLORS.len()];
        let _ = writeln!(s, "<circle cx=\"{px:.1}\" cy=\"{py:.1}\" r=\"5\" fill=\"{color}\"/>");
        let tw = text_w(label);
        let right = px + 8.0 + tw <= w - 8.0;
        let lx = if right { px + 8.0 } else { px - 8.0 - tw };
        let mut ly = py - 6.0;
        for k in 0..12 {
            let off = if k % 2 == 0 { 7.0 * k as f64 } else { -7.0 * (k + 1) as f64 };
            let cand = (py - 6.0 + off).clamp(area.y + FONT, area.y + area.h - 4.0);
            if !placed.iter().any(|&(x0, y0, x1, y1)| lx < x1 && lx + tw > x0 && cand > y0 && cand - FONT < y1) {
                ly = cand;
                break;
            }
        }
        placed.push((lx, ly - FONT, lx + tw, ly));
        let anchor = if right { "start" } else { "end" };
        let tx = if right { lx } else { lx + tw };
        let _ = writeln!(s, "<text x=\"{tx:.1}\" y=\"{ly:.1}\" text-anchor=\"{anchor}\">{}</text>", esc(label));
    }
    let mut notes = Vec::new();
    if pts.iter().any(|p| p.0 == 0.0) {
        notes.push("0: trains nothing (prompting the untrained model)".to_string());
    }
    if !missing.is_empty() {
        notes.push(format!("no {name}: {}", missing.iter().map(|m| short(m)).collect::<Vec<_>>().join(", ")));
    }
    note(&mut s, &notes.join("; "), w, h - 12.0);
    s + "</svg>\n"
}

/// A grey note at the bottom left, cut to the canvas width.
fn note(s: &mut String, text: &str, w: f64, y: f64) {
    if text.is_empty() {
        return;
    }
    let max = ((w - 24.0) / CHAR_W) as usize;
    let t =
        if text.chars().count() > max { text.chars().take(max - 1).collect::<String>() + "…" } else { text.into() };
    let _ = writeln!(s, "<text x=\"12\" y=\"{y:.1}\" fill=\"#555\">{}</text>", esc(&t));
}

/// Panel 2: learning curves against step, one line per method: the eval accuracy (when the task
/// has one), the eval loss and the training loss. A method that trains nothing is a dashed
/// reference line at its eval value.
pub fn curves_svg(rows: &[Row], curves: &[Curves]) -> String {
    let (_, acc) = metric(rows);
    // Each plot: its title, its curve, and the value of an untrained row (its reference line).
    type Pick = fn(&Curves) -> &Vec<(f64, f64)>;
    type Untrained = Option<fn(&Row) -> Option<f64>>;
    let mut plots: Vec<(&str, Pick, Untrained)> = Vec::new();
    if acc {
        plots.push(("eval accuracy", |c| &c.eval_accuracy, Some(|r| r.run.eval_accuracy)));
    }
    plots.push(("eval loss", |c| &c.eval_loss, Some(|r| r.run.eval_loss)));
    plots.push(("train loss", |c| &c.train_loss, None));
    let (pw, ph, top, gap) = (240.0, 220.0, 44.0, 78.0);
    let w = 20.0 + plots.len() as f64 * (pw + gap);
    // The legend below, in columns as wide as its longest entry.
    let entries: Vec<String> = rows
        .iter()
        .zip(curves)
        .map(|(r, c)| {
            let why = match (r.run.steps, c.is_empty()) {
                (0, _) => " (untrained, dashed)",
                (_, true) => " (no metrics.jsonl)",
                _ => "",
            };
            short(&r.run.method) + why
        })
        .collect();
    let colw = entries.iter().map(|e| text_w(e)).fold(100.0, f64::max) + 40.0;
    let cols = ((w - 24.0) / colw).floor().max(1.0) as usize;
    let legend_rows = rows.len().div_ceil(cols);
    let h = top + ph + 56.0 + legend_rows as f64 * 18.0 + 10.0;
    let empty = rows.iter().zip(curves).all(|(r, c)| c.is_empty() && r.run.steps > 0);
    let mut s = open(w, h, "learning curves");
    let max_step = rows.iter().map(|r| r.run.steps as f64).fold(1.0, f64::max);
    for (k, (title, pick, reference)) in plots.iter().enumerate() {
        let mut ys: Vec<f64> = curves.iter().flat_map(|c| pick(c).iter().map(|p| p.1)).collect();
        if let Some(f) = reference {
            ys.extend(rows.iter().filter(|r| r.run.steps == 0).filter_map(f));
        }
        let area = Area {
            x: gap + k as f64 * (pw + gap),
            y: top,
            w: pw,
            h: ph,
            sx: Scale::steps(max_step),
            sy: Scale::linear(&ys, false),
        };
        area.axes(&mut s, "step", title);
        for (i, (r, c)) in rows.iter().zip(curves).enumerate() {
            let color = COLORS[i % COLORS.len()];
            if r.run.steps == 0 {
                if let Some(py) = reference.and_then(|f| f(r)).and_then(|v| area.py(v)) {
                    let _ = writeln!(
                        s,
                        "<line x1=\"{:.1}\" y1=\"{py:.1}\" x2=\"{:.1}\" y2=\"{py:.1}\" stroke=\"{color}\" stroke-dasharray=\"5 4\"/>",
                        area.x,
                        area.x + area.w
                    );
                }
                continue;
            }
            let pts: Vec<(f64, f64)> = pick(c).iter().filter_map(|&(x, y)| Some((area.px(x)?, area.py(y)?))).collect();
            let width = if *title == "train loss" { 1.0 } else { 2.0 };
            if pts.len() > 1 {
                let d: Vec<String> = pts.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
                let _ = writeln!(
                    s,
                    "<polyline points=\"{}\" fill=\"none\" stroke=\"{color}\" stroke-width=\"{width}\"/>",
                    d.join(" ")
                );
            }
            if *title != "train loss" || pts.len() == 1 {
                for (x, y) in &pts {
                    let _ = writeln!(s, "<circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"3\" fill=\"{color}\"/>");
                }
            }
        }
    }
    let ly = top + ph + 56.0;
    for (i, (r, e)) in rows.iter().zip(&entries).enumerate() {
        let (x, y) = (12.0 + (i % cols) as f64 * colw, ly + (i / cols) as f64 * 18.0);
        let color = COLORS[i % COLORS.len()];
        let dash = if r.run.steps == 0 { " stroke-dasharray=\"5 4\"" } else { "" };
        let _ = writeln!(
            s,
            "<line x1=\"{x:.1}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"{color}\" stroke-width=\"2\"{dash}/>\n<text x=\"{:.1}\" y=\"{y:.1}\">{}</text>",
            y - 4.0,
            x + 18.0,
            y - 4.0,
            x + 24.0,
            esc(e)
        );
    }
    if empty {
        note(&mut s, "no method's run folder has a metrics.jsonl", w, top - 8.0);
    }
    s + "</svg>\n"
}

/// Horizontal bars, one per method, on `scale` (fractions of the bar area), valued by `value`
/// and labelled by `label`; method names in a column on the left when `names`.
struct Bars<'a> {
    rows: &'a [Row],
    x: f64,
    w: f64,
    top: f64,
    title: &'a str,
    scale: Scale,
}

const BAR_H: f64 = 22.0;

impl Bars<'_> {
    /// The bars' share of their area (the rest holds the value labels).
    const SPAN: f64 = 0.72;

    fn draw(&self, s: &mut String, value: impl Fn(&Row) -> Option<f64>, label: impl Fn(&Row) -> String) {
        let (x, w, top) = (self.x, self.w * Self::SPAN, self.top);
        let bottom = top + self.rows.len() as f64 * BAR_H;
        let _ =
            writeln!(s, "<text x=\"{x:.1}\" y=\"{:.1}\" font-weight=\"bold\">{}</text>", top - 10.0, esc(self.title));
        for (f, t) in self.scale.ticks() {
            let px = x + f * w;
            let _ = writeln!(
                s,
                "<line x1=\"{px:.1}\" y1=\"{top:.1}\" x2=\"{px:.1}\" y2=\"{bottom:.1}\" stroke=\"#e5e5e5\"/>\n<text x=\"{px:.1}\" y=\"{:.1}\" text-anchor=\"middle\" fill=\"#555\">{}</text>",
                bottom + 15.0,
                esc(&t)
            );
        }
        for (i, r) in self.rows.iter().enumerate() {
            let y = top + i as f64 * BAR_H;
            let color = COLORS[i % COLORS.len()];
            let end = match value(r).and_then(|v| self.scale.frac(v)) {
                Some(f) => {
                    let bw = (f.clamp(0.0, 1.0) * w).max(1.0);
                    let _ = writeln!(
                        s,
                        "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{bw:.1}\" height=\"{:.1}\" fill=\"{color}\"/>",
                        y + 3.0,
                        BAR_H - 6.0
                    );
                    x + bw
                }
                None => x,
            };
            let _ = writeln!(s, "<text x=\"{:.1}\" y=\"{:.1}\">{}</text>", end + 4.0, y + 15.0, esc(&label(r)));
        }
        let _ = writeln!(s, "<line x1=\"{x:.1}\" y1=\"{top:.1}\" x2=\"{x:.1}\" y2=\"{bottom:.1}\" stroke=\"#333\"/>");
    }
}

/// The method names' column of a bar panel (right-aligned at `x`).
fn names(s: &mut String, rows: &[Row], x: f64, top: f64) {
    for (i, r) in rows.iter().enumerate() {
        let _ = writeln!(
            s,
            "<text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            top + i as f64 * BAR_H + 15.0,
            esc(&short(&r.run.method))
        );
    }
}

fn name_col(rows: &[Row]) -> f64 {
    rows.iter().map(|r| text_w(&short(&r.run.method))).fold(60.0, f64::max) + 20.0
}

/// Panel 3: training throughput (tokens/s) and peak memory per method, as bars.
pub fn speed_svg(rows: &[Row]) -> String {
    let left = name_col(rows);
    let (area, top) = (270.0, 64.0);
    let w = left + 2.0 * area + 30.0;
    let h = top + rows.len() as f64 * BAR_H + 40.0;
    let tps = |r: &Row| (r.run.steps > 0).then_some(r.run.tokens_per_s).filter(|v| v.is_finite());
    let mem = |r: &Row| Some(r.run.peak_rss_bytes as f64 / (1024.0 * 1024.0));
    let mut s = open(w, h, "training speed and memory");
    names(&mut s, rows, left - 8.0, top);
    let speed = Bars {
        rows,
        x: left,
        w: area,
        top,
        title: "tokens/s (training)",
        scale: Scale::linear(&rows.iter().filter_map(tps).collect::<Vec<_>>(), true),
    };
    speed.draw(&mut s, tps, |r| match tps(r) {
        Some(v) => human(v.round()),
        None if r.run.steps == 0 => "no training".into(),
        None => "n/a".into(),
    });
    let memory = Bars {
        rows,
        x: left + area + 20.0,
        w: area,
        top,
        title: "peak memory (MiB)",
        scale: Scale::linear(&rows.iter().filter_map(mem).collect::<Vec<_>>(), true),
    };
    memory.draw(&mut s, mem, |r| tuna_trainer::human_bytes(r.run.peak_rss_bytes));
    s + "</svg>\n"
}

/// Panel 4: checkpoint (exported weights) bytes per method, as bars on a log scale.
pub fn checkpoint_svg(rows: &[Row]) -> String {
    let left = name_col(rows);
    let (area, top) = (560.0, 64.0);
    let w = left + area + 30.0;
    let h = top + rows.len() as f64 * BAR_H + 40.0;
    let bytes = |r: &Row| Some(r.run.checkpoint_bytes as f64);
    let mut s = open(w, h, "checkpoint size");
    names(&mut s, rows, left - 8.0, top);
    let bars = Bars {
        rows,
        x: left,
        w: area,
        top,
        title: "checkpoint bytes (log scale)",
        scale: Scale::log(&rows.iter().filter_map(bytes).collect::<Vec<_>>()),
    };
    bars.draw(&mut s, bytes, |r| tuna_trainer::human_bytes(r.run.checkpoint_bytes));
    s + "</svg>\n"
}

/// The four panels in [`PANELS`]' order.
pub fn panels(rows: &[Row], curves: &[Curves]) -> [String; 4] {
    [accuracy_svg(rows), curves_svg(rows, curves), speed_svg(rows), checkpoint_svg(rows)]
}

/// A markdown table (as [`crate::compare_cmd::table`] writes it) as an HTML table; right-aligned
/// columns (`---:`) stay right-aligned.
fn html_table(md: &str) -> String {
    let cells = |l: &str| -> Vec<String> {
        l.trim().trim_start_matches('|').trim_end_matches('|').split('|').map(|c| c.trim().to_string()).collect()
    };
    let lines: Vec<&str> = md.lines().filter(|l| l.trim_start().starts_with('|')).collect();
    let Some((head, rest)) = lines.split_first() else { return String::new() };
    let right: Vec<bool> = rest.first().map_or(Vec::new(), |l| cells(l).iter().map(|c| c.ends_with(':')).collect());
    let row = |l: &str, tag: &str| -> String {
        let mut s = String::from("<tr>");
        for (i, c) in cells(l).iter().enumerate() {
            let class = if right.get(i).copied().unwrap_or(false) { " class=\"num\"" } else { "" };
            let _ = write!(s, "<{tag}{class}>{}</{tag}>", esc(c));
        }
        s + "</tr>\n"
    };
    let mut s = format!("<table>\n<thead>{}</thead>\n<tbody>\n", row(head, "th"));
    for l in rest.iter().skip(1) {
        s += &row(l, "td");
    }
    s + "</tbody>\n</table>\n"
}

/// What the comparison ran: the model, the task, the steps and the precision (`--precision`, and
/// `--base-precision` where not f32; a summary from before they were recorded names none).
pub fn heading(rows: &[Row]) -> String {
    let Some(r) = rows.first() else { return String::new() };
    let steps = rows.iter().map(|r| r.run.steps).max().unwrap_or(0);
    let mut s = format!("{}, task {}, {steps} steps", r.run.model, r.run.task);
    // The trained methods' (the baseline trains nothing and records none). Without --precision,
    // CUDA's default (bf16) leaves full fine-tuning with --train-patterns in f32: then each
    // method's is named.
    let given: Vec<(&str, &str)> =
        rows.iter().filter_map(|r| Some((r.run.method.as_str(), r.run.precision.as_deref()?))).collect();
    match given.first() {
        Some((_, p)) if given.iter().all(|(_, q)| q == p) => {
            let _ = write!(s, ", precision {p}");
        }
        Some(_) => {
            let each: Vec<String> = given.iter().map(|(m, p)| format!("{m} {p}")).collect();
            let _ = write!(s, ", precision {}", each.join(" / "));
        }
        None => {}
    }
    if let Some(b) = rows.iter().find_map(|r| r.run.base_precision.as_deref()).filter(|b| *b != "f32") {
        let _ = write!(s, ", base precision {b}");
    }
    s
}

/// `compare.md`: the heading (see [`heading`]) above the table.
pub fn markdown(rows: &[Row], table_md: &str) -> String {
    format!("# tuna compare\n\n{}\n\n{table_md}", heading(rows))
}

/// `compare.html`: a heading naming the model, task and precision, the table, and the panels
/// inline (no network resources).
pub fn html(rows: &[Row], table_md: &str, panels: &[String]) -> String {
    let what = heading(rows);
    let mut s = String::from(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>tuna compare</title>\n<style>\n\
         body { font-family: \"DejaVu Sans\", Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }\n\
         table { border-collapse: collapse; margin: 1em 0; font-size: 14px; }\n\
         th, td { border-bottom: 1px solid #ddd; padding: 4px 10px; text-align: left; }\n\
         th.num, td.num { text-align: right; font-variant-numeric: tabular-nums; }\n\
         figure { margin: 1.5em 0; }\n\
         svg { max-width: 100%; height: auto; }\n\
         </style>\n</head>\n<body>\n<h1>tuna compare</h1>\n",
    );
    let _ = writeln!(s, "<p>{}</p>", esc(&what));
    s += &html_table(table_md);
    let captions = [
        "The eval metric against trainable parameters (log scale).",
        "Learning curves from each method's metrics.jsonl.",
        "Training throughput and peak memory of each method's process.",
        "Bytes of each method's exported weights (log scale).",
    ];
    for (svg, cap) in panels.iter().zip(captions) {
        let _ = write!(s, "<figure>\n{svg}<figcaption>{cap}</figcaption>\n</figure>\n");
    }
    s + "</body>\n</html>\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_read_as_people_write_them() {
        let cases = [
            (0.0, "0"),
            (7.0, "7"),
            (950.0, "950"),
            (0.25, "0.25"),
            (1e4, "10K"),
            (1500.0, "1.5K"),
            (1e5, "100K"),
            (150_000.0, "150K"),
            (1e6, "1M"),
            (22_713_986.0, "22.7M"),
            (1e7, "10M"),
            (3e9, "3B"),
            (f64::NAN, "n/a"),
        ];
        for (x, want) in cases {
            assert_eq!(human(x), want, "{x}");
        }
    }

    #[test]
    fn log_axis_labels_decades_and_sets_zero_apart() {
        let s = Scale::log(&[8450.0, 74498.0, 22_713_986.0]);
        assert_eq!(s, Scale::Log { lo: 3, hi: 8, zero: false });
        let labels: Vec<String> = s.ticks().into_iter().map(|t| t.1).collect();
        assert_eq!(labels, ["1K", "10K", "100K", "1M", "10M", "100M"]);
        let z = Scale::log(&[0.0, 1e4, 1e6]);
        let t = z.ticks();
        assert_eq!(t[0], (0.0, "0".to_string()));
        assert_eq!(z.frac(1e4), Some(ZERO_GAP));
        assert_eq!(z.frac(1e6), Some(1.0));
        // A negative or non-finite value has no place; without a 0 among the values, neither does 0.
        assert_eq!(z.frac(-1.0), None);
        assert_eq!(s.frac(0.0), None);
        assert_eq!(s.frac(f64::NAN), None);
        // Only zeros (or nothing): still an axis.
        assert!(Scale::log(&[0.0]).ticks().len() >= 2);
    }

    #[test]
    fn linear_axis_has_round_ticks_covering_the_values() {
        let s = Scale::linear(&[0.742, 0.802], false);
        let t = s.ticks();
        assert!(t.len() >= 3 && t.len() <= 8, "{t:?}");
        assert_eq!(t.first().unwrap().0, 0.0);
        assert!((t.last().unwrap().0 - 1.0).abs() < 1e-9);
        assert!(s.frac(0.742).unwrap() >= 0.0 && s.frac(0.802).unwrap() <= 1.0);
        assert!(t.iter().all(|(_, l)| l.len() <= 5), "{t:?}");
        // One value, no value, NaN: a usable band.
        for v in [&[0.5][..], &[], &[f64::NAN]] {
            let s = Scale::linear(v, false);
            let Scale::Linear { lo, hi, .. } = s else { unreachable!() };
            assert!(hi > lo, "{v:?}: {s:?}");
        }
        // Steps: whole-number ticks, even for a short run.
        for max in [1.0, 3.0, 12.0, 60.0, 100.0] {
            let t = Scale::steps(max).ticks();
            assert!(t.iter().all(|(_, l)| l.parse::<u64>().is_ok()), "{max}: {t:?}");
            assert!((2..=7).contains(&t.len()), "{max}: {t:?}");
        }
        let bars = Scale::linear(&[1433.0, 2719.0], true);
        assert_eq!(bars.frac(0.0), Some(0.0));
        assert_eq!(bars.ticks().last().unwrap().1, "3K");
    }

    #[test]
    fn curves_come_from_the_metrics_lines_skipping_missing_values() {
        let text = r#"{"step":1,"split":"train","loss":0.9,"lr":0.1}
{"step":2,"split":"train","loss":null}
{"step":2,"split":"eval","loss":0.7,"accuracy":0.5}
{"step":3,"split":"eval","loss":0.6}"#;
        let lines: Vec<_> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        let c = Curves::from_lines(&lines);
        assert_eq!(c.train_loss, [(1.0, 0.9)]);
        assert_eq!(c.eval_loss, [(2.0, 0.7), (3.0, 0.6)]);
        assert_eq!(c.eval_accuracy, [(2.0, 0.5)]);
        assert_eq!(Curves::read(Path::new("/nonexistent-tuna-run")), Curves::default());
    }

    #[test]
    fn long_names_are_cut_and_markup_escaped() {
        let long = "a-method-with-a-very-long-name-indeed";
        assert_eq!(short(long).chars().count(), NAME_MAX);
        assert!(short(long).ends_with('…'));
        assert_eq!(short("lora"), "lora");
        assert_eq!(esc("a<b & \"c\""), "a&lt;b &amp; &quot;c&quot;");
    }

    #[test]
    fn the_markdown_table_becomes_an_html_table() {
        let md = "| method | params |\n|---|---:|\n| lora | 74498 |\n| a<b | 0 |\n";
        let h = html_table(md);
        assert!(h.contains("<th>method</th><th class=\"num\">params</th>"), "{h}");
        assert!(h.contains("<td>lora</td><td class=\"num\">74498</td>"), "{h}");
        assert!(h.contains("<td>a&lt;b</td>"), "{h}");
        assert_eq!(h.matches("<tr>").count(), 3);
    }
}
