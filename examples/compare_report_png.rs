//! The README's picture of `tuna compare`'s report: the report's panels (compare.svg,
//! compare-curves.svg, compare-speed.svg, compare-checkpoint.svg), stacked on one white page and
//! rendered with resvg into a PNG. The report is first written again from the folder's
//! compare.json and run folders with this build's code (so a comparison made by an older tuna,
//! whose rows name no run folder, gets the panels too: a row's folder is then its method's).
//!
//! ```sh
//! cargo run --example compare_report_png -- runs/compare docs/compare-report.png
//! ```
//!
//! test.sh: build only (it needs a comparison's folder)

#[path = "../tests/common/render.rs"]
mod render;

use tuna::compare_report::PANELS;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [dir, png] = args.as_slice() else {
        anyhow::bail!("usage: compare_report_png <compare folder> <out.png>");
    };
    let (opt, fonts) = render::options();
    if fonts == 0 {
        anyhow::bail!("no fonts found: the panels' text could not be drawn");
    }
    let json = std::path::Path::new(dir).join("compare.json");
    let text = std::fs::read_to_string(&json).map_err(|e| anyhow::anyhow!("{}: {e}", json.display()))?;
    let mut rows: Vec<tuna::compare_cmd::Row> = serde_json::from_str(&text)?;
    for r in rows.iter_mut().filter(|r| r.run_dir.is_none()) {
        r.run_dir = Some(r.run.method.clone()).filter(|m| std::path::Path::new(dir).join(m).is_dir());
    }
    tuna::compare_cmd::write(&rows, std::path::Path::new(dir))?;
    // Each panel at its own size, one under the other, centred on the widest.
    let mut panels = Vec::new();
    for f in PANELS {
        let p = std::path::Path::new(dir).join(f);
        let svg = std::fs::read_to_string(&p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
        let (tree, _) = render::render(&svg, &opt);
        panels.push((svg, tree.size().width(), tree.size().height()));
    }
    let width = panels.iter().map(|p| p.1).fold(0.0, f32::max);
    let height: f32 = panels.iter().map(|p| p.2 + 10.0).sum();
    let mut page = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\"><rect width=\"100%\" height=\"100%\" fill=\"white\"/>"
    );
    let mut y = 0.0;
    for (svg, w, h) in &panels {
        // The panel's root element placed as a nested <svg> at its offset.
        let inner = svg.replacen("<svg ", &format!("<svg x=\"{}\" y=\"{y}\" ", (width - w) / 2.0), 1);
        page += &inner;
        y += h + 10.0;
    }
    page += "</svg>";
    let (_, pixmap) = render::render(&page, &opt);
    pixmap.save_png(png)?;
    println!("wrote {png} ({}x{})", pixmap.width(), pixmap.height());
    Ok(())
}
