//! `tuna compare`'s report rendered by a real SVG renderer (resvg): every panel draws something,
//! and every text element lies inside its canvas, checked twice: by the text's own position,
//! anchor and an estimate of its width (always), and by the boxes resvg lays out with real fonts
//! (where the machine has fonts; without any, usvg drops all text and that check says so). Both
//! checks are shown to fail on SVGs whose text runs off the canvas. Also: the written files, the
//! HTML's self-containment, and the awkward inputs (an untrained baseline with 0 parameters, one
//! method, NaN and missing values, long names).

#[path = "common/render.rs"]
mod render;

use serde_json::json;
use tuna::compare_cmd::{write, Row, FILES};
use tuna::compare_report::{panels, Curves, CHAR_W, PANELS};

fn row(method: &str, params: usize, steps: u64, acc: Option<f64>, ckpt: u64) -> Row {
    serde_json::from_value(json!({
        "method": method, "model": "all-MiniLM-L6-v2", "task": "classify",
        "trainable_params": params, "base_params": 22_713_216, "steps": steps,
        "final_train_loss": if steps > 0 { Some(0.41) } else { None },
        "eval_loss": 0.45, "eval_accuracy": acc, "eval_perplexity": null,
        "train_tokens": steps * 600, "train_seconds": steps as f64 * 0.4,
        "tokens_per_s": if steps > 0 { 1500.0 + params as f64 / 1e4 } else { 0.0 },
        "peak_rss_bytes": 250_000_000u64 + params as u64 * 30, "checkpoint_bytes": ckpt,
        "stopped_early": false, "export": "adapter", "lr": 3e-3, "warmup": 10,
        "run_dir": method,
    }))
    .unwrap()
}

/// Curves with evaluations every 50 steps and a training loss each step.
fn curves(steps: u64, end_acc: f64) -> Curves {
    let mut c = Curves::default();
    for s in 1..=steps {
        c.train_loss.push((s as f64, 0.7 - 0.3 * s as f64 / steps as f64 + 0.05 * ((s * 7) % 5) as f64 / 5.0));
        if s % 50 == 0 || s == steps {
            let f = s as f64 / steps as f64;
            c.eval_accuracy.push((s as f64, 0.5 + (end_acc - 0.5) * f));
            c.eval_loss.push((s as f64, 0.69 - 0.25 * f));
        }
    }
    c
}

/// The default comparison's shape: the untrained baseline and the five methods.
fn five() -> (Vec<Row>, Vec<Curves>) {
    let rows = vec![
        row("prompt-engineered", 0, 0, Some(0.55), 0),
        row("full", 22_713_986, 100, Some(0.802), 90_900_000),
        row("prompt", 8450, 100, Some(0.742), 34_100),
        row("prefix", 92_930, 100, Some(0.798), 372_100),
        row("houlsby", 300_674, 100, Some(0.778), 1_258_000),
        row("lora", 74_498, 100, Some(0.762), 301_400),
    ];
    let accs = [0.0, 0.802, 0.742, 0.798, 0.778, 0.762];
    let curves = rows.iter().zip(accs).map(|(r, a)| if r.run.steps == 0 { Curves::default() } else { curves(100, a) });
    let c = curves.collect();
    (rows, c)
}

/// The awkward cases: one method; NaN, missing and absent values with long and markup names; no
/// accuracy at all (the panels plot the eval loss); curves missing for a trained method.
fn awkward() -> Vec<(&'static str, Vec<Row>, Vec<Curves>)> {
    let mut nan = row("lora-with-a-very-long-method-name-that-goes-on-and-on", 74_498, 100, Some(f64::NAN), 301_400);
    nan.run.eval_loss = Some(f64::NAN);
    nan.run.tokens_per_s = f64::NAN;
    let mut no_eval = row("houlsby <&> \"quoted\"", 300_674, 100, None, 1_258_000);
    no_eval.run.eval_loss = None;
    let mut loss_only = vec![row("lora", 74_498, 60, None, 301_400), row("prefix", 92_930, 60, None, 372_100)];
    loss_only[1].run.eval_loss = Some(0.39);
    vec![
        ("one method", vec![row("lora", 74_498, 100, Some(0.76), 301_400)], vec![curves(100, 0.76)]),
        ("one untrained method", vec![row("prompt-engineered", 0, 0, Some(0.55), 0)], vec![Curves::default()]),
        (
            "NaN, missing, long names",
            vec![
                row("prompt-engineered 2-shot", 0, 0, None, 0),
                nan,
                no_eval,
                row("full", 22_713_986, 1, Some(0.6), 9e7 as u64),
            ],
            vec![Curves::default(), Curves::default(), curves(100, 0.7), curves(1, 0.6)],
        ),
        ("eval loss only", loss_only, vec![curves(60, 0.7), Curves::default()]),
    ]
}

/// `<text>` elements as (content, left, top, right, bottom) by their attributes: position, anchor,
/// font size (the root's unless given), a `rotate(a cx cy)` transform, and [`CHAR_W`] per character
/// (scaled by the font size), with ascent 0.8 and descent 0.25 of the font size.
fn estimated_text_boxes(svg: &str) -> Vec<(String, [f64; 4])> {
    let attr = |tag: &str, name: &str| -> Option<String> {
        let key = format!(" {name}=\"");
        let i = tag.find(&key)? + key.len();
        Some(tag[i..i + tag[i..].find('"')?].to_string())
    };
    let root = &svg[..svg.find('>').unwrap()];
    let base: f64 = attr(root, "font-size").map_or(16.0, |v| v.parse().unwrap());
    let mut out = Vec::new();
    for part in svg.split("<text").skip(1) {
        let tag = &part[..part.find('>').unwrap()];
        let text = &part[tag.len() + 1..part.find("</text>").expect("a closed <text>")];
        let plain = text.replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", "\"").replace("&amp;", "&");
        let num = |n: &str| attr(tag, n).map_or(0.0, |v| v.parse::<f64>().unwrap());
        let (x, y) = (num("x"), num("y"));
        let fs = attr(tag, "font-size").map_or(base, |v| v.parse().unwrap());
        let w = plain.chars().count() as f64 * CHAR_W * fs / 12.0;
        let x0 = match attr(tag, "text-anchor").as_deref() {
            Some("middle") => x - w / 2.0,
            Some("end") => x - w,
            _ => x,
        };
        let mut corners = [(x0, y - 0.8 * fs), (x0 + w, y - 0.8 * fs), (x0, y + 0.25 * fs), (x0 + w, y + 0.25 * fs)];
        if let Some(t) = attr(tag, "transform") {
            let args: Vec<f64> = t
                .trim_start_matches("rotate(")
                .trim_end_matches(')')
                .split([' ', ','])
                .filter(|s| !s.is_empty())
                .map(|s| s.parse().unwrap())
                .collect();
            assert!(t.starts_with("rotate(") && args.len() == 3, "unexpected transform {t}");
            let (a, cx, cy) = (args[0].to_radians(), args[1], args[2]);
            for (px, py) in corners.iter_mut() {
                let (dx, dy) = (*px - cx, *py - cy);
                (*px, *py) = (cx + dx * a.cos() - dy * a.sin(), cy + dx * a.sin() + dy * a.cos());
            }
        }
        let b = corners
            .iter()
            .fold([f64::INFINITY, f64::INFINITY, f64::NEG_INFINITY, f64::NEG_INFINITY], |b, &(px, py)| {
                [b[0].min(px), b[1].min(py), b[2].max(px), b[3].max(py)]
            });
        out.push((plain, b));
    }
    out
}

fn canvas(svg: &str) -> (f64, f64) {
    let root = &svg[..svg.find('>').unwrap()];
    let get = |k: &str| {
        let i = root.find(&format!(" {k}=\"")).unwrap() + k.len() + 3;
        root[i..i + root[i..].find('"').unwrap()].parse::<f64>().unwrap()
    };
    (get("width"), get("height"))
}

/// What is wrong with `svg` as a panel: nothing drawn, a text outside the canvas (estimated, and
/// laid out by usvg when fonts were loaded), text lost in layout. Empty when all is well.
fn problems(svg: &str, opt: &resvg::usvg::Options, fonts: bool) -> Vec<String> {
    let mut bad = Vec::new();
    let (w, h) = canvas(svg);
    let (tree, pixmap) = render::render(svg, opt);
    let inked = pixmap
        .pixels()
        .iter()
        .filter(|p| p.alpha() > 0 && (p.red() < 240 || p.green() < 240 || p.blue() < 240))
        .count();
    if inked < 200 {
        bad.push(format!("only {inked} non-white pixels"));
    }
    let estimated = estimated_text_boxes(svg);
    for (text, b) in &estimated {
        if b[0] < 0.0 || b[1] < 0.0 || b[2] > w || b[3] > h {
            bad.push(format!("text {text:?} at {b:?} (estimated) leaves the {w}x{h} canvas"));
        }
    }
    if fonts {
        let laid = render::text_boxes(&tree);
        if laid.len() != estimated.len() {
            bad.push(format!("{} <text> elements, {} laid out", estimated.len(), laid.len()));
        }
        for b in laid {
            // Half a pixel of slack for glyph outlines on a boundary.
            if b[0] < -0.5 || b[1] < -0.5 || b[2] as f64 > w + 0.5 || b[3] as f64 > h + 0.5 {
                bad.push(format!("a text laid out at {b:?} leaves the {w}x{h} canvas"));
            }
        }
    }
    bad
}

#[test]
fn every_panel_renders_with_all_its_text_inside_the_canvas() {
    let (opt, fonts) = render::options();
    if fonts == 0 {
        eprintln!("no system fonts: text checked by its position, anchor and estimated width only");
    }
    let mut cases = vec![("five methods and the baseline", five().0, five().1)];
    cases.extend(awkward());
    for (name, rows, curves) in cases {
        for (file, svg) in PANELS.iter().zip(panels(&rows, &curves)) {
            let bad = problems(&svg, &opt, fonts > 0);
            assert!(bad.is_empty(), "{name}, {file}: {bad:#?}\n{svg}");
        }
    }
}

#[test]
fn the_checks_fail_on_text_off_the_canvas_and_on_a_blank_panel() {
    let (opt, fonts) = render::options();
    eprintln!("{fonts} font files loaded");
    let frame = "<rect x=\"10\" y=\"10\" width=\"180\" height=\"80\" fill=\"#1f77b4\"/>";
    let svg = |body: &str| {
        format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"200\" height=\"100\" font-family=\"DejaVu Sans, sans-serif\" font-size=\"12\">{frame}{body}</svg>")
    };
    assert!(problems(&svg("<text x=\"20\" y=\"50\">inside</text>"), &opt, fonts > 0).is_empty());
    let off = [
        "<text x=\"150\" y=\"50\">a label that runs past the right edge</text>",
        "<text x=\"10\" y=\"50\" text-anchor=\"end\">left of it</text>",
        "<text x=\"100\" y=\"5\" text-anchor=\"middle\">above</text>",
        "<text x=\"20\" y=\"50\" transform=\"rotate(-90 20 50)\" text-anchor=\"middle\">a long rotated title</text>",
    ];
    for body in off {
        let bad = problems(&svg(body), &opt, fonts > 0);
        assert!(bad.iter().any(|b| b.contains("(estimated) leaves")), "{body}: {bad:?}");
        if fonts > 0 {
            assert!(bad.iter().any(|b| b.contains("laid out at")), "{body}: {bad:?}");
        }
    }
    // Nothing drawn: a white page.
    let blank = "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"200\" height=\"100\"><rect width=\"100%\" height=\"100%\" fill=\"white\"/></svg>";
    assert!(problems(blank, &opt, fonts > 0).iter().any(|b| b.contains("non-white")));
}

#[test]
fn the_accuracy_panel_has_human_log_ticks_and_a_zero_for_the_baseline() {
    let (rows, curves) = five();
    let [acc, learning, speed, ckpt] = panels(&rows, &curves);
    let texts: Vec<String> = estimated_text_boxes(&acc).into_iter().map(|t| t.0).collect();
    for t in ["0", "1K", "10K", "100K", "1M", "10M", "100M", "trainable parameters (log scale)"] {
        assert!(texts.iter().any(|x| x == t), "{t} missing from {texts:?}");
    }
    // No log10 exponents as labels (the old axis read 3.8, 4.7, ...).
    assert!(!texts.iter().any(|x| x == "3.8" || x == "4.7"), "{texts:?}");
    assert_eq!(acc.matches("<circle").count(), 6);
    // The baseline (the first row) sits on the axis's 0, left of every trained method.
    let xs: Vec<f64> = acc.split("<circle cx=\"").skip(1).map(|p| p[..p.find('"').unwrap()].parse().unwrap()).collect();
    assert!(xs[1..].iter().all(|x| *x > xs[0] + 20.0), "{xs:?}");
    // One learning curve per trained method in each plot; the baseline is a dashed reference line.
    assert_eq!(learning.matches("<polyline").count(), 5 * 3);
    assert_eq!(learning.matches("stroke-dasharray").count(), 2 + 1, "two plots and the legend");
    assert!(speed.contains("no training") && speed.contains("238.4 MiB"));
    assert!(ckpt.contains("86.7 MiB") && ckpt.contains(">0 B<"));
}

#[test]
fn write_puts_the_report_and_panels_beside_the_table_and_reads_each_runs_curves() {
    let out = std::env::temp_dir().join(format!("tuna-report-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let (rows, _) = five();
    // Two of the runs have their metrics.jsonl (one with a NaN loss logged as null).
    std::fs::create_dir_all(out.join("lora")).unwrap();
    std::fs::write(
        out.join("lora/metrics.jsonl"),
        "{\"step\":1,\"split\":\"train\",\"loss\":0.7}\n{\"step\":2,\"split\":\"train\",\"loss\":null}\n\
         {\"step\":3,\"split\":\"train\",\"loss\":0.6}\n{\"step\":3,\"split\":\"eval\",\"loss\":0.5,\"accuracy\":0.7}\n",
    )
    .unwrap();
    std::fs::create_dir_all(out.join("full")).unwrap();
    std::fs::write(out.join("full/metrics.jsonl"), "{\"step\":1,\"split\":\"eval\",\"loss\":0.5,\"accuracy\":0.6}\n")
        .unwrap();
    let paths = write(&rows, &out).unwrap();
    assert_eq!(paths.len(), FILES.len());
    for (p, f) in paths.iter().zip(FILES) {
        assert_eq!(p, &out.join(f));
        assert!(std::fs::metadata(p).unwrap().len() > 100, "{f}");
    }
    for f in PANELS {
        assert!(FILES.contains(&f), "{f}");
    }
    let html = std::fs::read_to_string(out.join("compare.html")).unwrap();
    assert!(html.starts_with("<!DOCTYPE html>") && html.contains("<table>") && html.contains("<td>houlsby</td>"));
    // The header says what ran (the precision where the summaries record it).
    let md = std::fs::read_to_string(out.join("compare.md")).unwrap();
    assert!(md.starts_with("# tuna compare\n\nall-MiniLM-L6-v2, task classify, 100 steps\n\n| method |"), "{md}");
    let mut bf16 = rows.clone();
    for r in &mut bf16 {
        r.run.precision = Some("bf16".into());
    }
    write(&bf16, &out).unwrap();
    let md = std::fs::read_to_string(out.join("compare.md")).unwrap();
    assert!(md.starts_with("# tuna compare\n\nall-MiniLM-L6-v2, task classify, 100 steps, precision bf16\n"), "{md}");
    let html_bf16 = std::fs::read_to_string(out.join("compare.html")).unwrap();
    assert!(html_bf16.contains("<p>all-MiniLM-L6-v2, task classify, 100 steps, precision bf16</p>"), "{html_bf16}");
    write(&rows, &out).unwrap();
    assert_eq!(html.matches("<svg ").count(), 4);
    // Self-contained: nothing fetched (the only URL is the SVG namespace).
    let no_ns = html.replace("xmlns=\"http://www.w3.org/2000/svg\"", "");
    for fetch in ["http:", "https:", "src=", "href=", "url(", "<link", "<script", "@import"] {
        assert!(!no_ns.contains(fetch), "compare.html holds {fetch}");
    }
    // The panels inside the page are the files written beside it.
    for f in PANELS {
        assert!(html.contains(&std::fs::read_to_string(out.join(f)).unwrap()), "{f}");
    }
    // lora's log gives a train-loss line of two points (the null skipped) and one eval point;
    // full's a single eval point; the runs without a log are named in the legend.
    let learning = std::fs::read_to_string(out.join("compare-curves.svg")).unwrap();
    assert_eq!(learning.matches("<polyline").count(), 1, "{learning}");
    assert_eq!(learning.matches("(no metrics.jsonl)").count(), 3, "{learning}");
    // The rows' run folders are in compare.json; a row without one (an older comparison) reads no curves.
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("compare.json")).unwrap()).unwrap();
    assert_eq!(json[5]["run_dir"], "lora");
    let mut old = rows.clone();
    old.iter_mut().for_each(|r| r.run_dir = None);
    write(&old, &out).unwrap();
    let learning = std::fs::read_to_string(out.join("compare-curves.svg")).unwrap();
    assert_eq!(learning.matches("<polyline").count(), 0);
    std::fs::remove_dir_all(&out).unwrap();
}
