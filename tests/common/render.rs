//! Rendering `tuna compare`'s SVG panels with resvg, shared by the report's test
//! (tests/compare_report.rs) and the README picture's program (examples/compare_report_png.rs).
//! Text needs fonts: they are read from the system's font folders by hand (no fontconfig).
#![allow(dead_code)] // each user takes its own subset

use resvg::{tiny_skia, usvg};

/// Options whose font database holds every TrueType/OpenType font under the usual font folders,
/// with the first one's family as the sans-serif fallback; the number of font files loaded (0: no
/// text can be laid out, usvg then drops every `<text>`).
pub fn options() -> (usvg::Options<'static>, usize) {
    let mut opt = usvg::Options::default();
    let mut files = Vec::new();
    for dir in ["/usr/share/fonts", "/usr/local/share/fonts", "/System/Library/Fonts", "/Library/Fonts"] {
        font_files(std::path::Path::new(dir), &mut files);
    }
    files.sort();
    // DejaVu Sans first when present (the panels ask for it by name).
    files.sort_by_key(|p| p.file_name().is_none_or(|n| n != "DejaVuSans.ttf"));
    let db = opt.fontdb_mut();
    for f in &files {
        if let Ok(data) = std::fs::read(f) {
            db.load_font_data(data);
        }
    }
    let first = db.faces().next().and_then(|f| f.families.first()).map(|f| f.0.clone());
    if let Some(family) = first {
        db.set_sans_serif_family(family);
    }
    (opt, files.len())
}

fn font_files(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            font_files(&p, out);
        } else if p.extension().is_some_and(|x| x.eq_ignore_ascii_case("ttf") || x.eq_ignore_ascii_case("otf")) {
            out.push(p);
        }
    }
}

/// The parsed tree and its rendering at its own size on a transparent pixmap.
pub fn render(svg: &str, opt: &usvg::Options) -> (usvg::Tree, tiny_skia::Pixmap) {
    let tree = usvg::Tree::from_str(svg, opt).unwrap_or_else(|e| panic!("usvg cannot parse the SVG ({e}):\n{svg}"));
    let size = tree.size().to_int_size();
    let mut pixmap = tiny_skia::Pixmap::new(size.width(), size.height()).expect("a non-empty canvas");
    resvg::render(&tree, tiny_skia::Transform::identity(), &mut pixmap.as_mut());
    (tree, pixmap)
}

/// The canvas bounding boxes (left, top, right, bottom) of every laid-out text node.
pub fn text_boxes(tree: &usvg::Tree) -> Vec<[f32; 4]> {
    fn walk(g: &usvg::Group, out: &mut Vec<[f32; 4]>) {
        for n in g.children() {
            match n {
                usvg::Node::Group(g) => walk(g, out),
                usvg::Node::Text(t) => {
                    let b = t.abs_bounding_box();
                    out.push([b.left(), b.top(), b.right(), b.bottom()]);
                }
                _ => {}
            }
        }
    }
    let mut out = Vec::new();
    walk(tree.root(), &mut out);
    out
}
