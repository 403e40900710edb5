//! The report as a flame graph (SVG, drawn by inferno from the folded stacks).
//!
//! Frames are drawn in inferno's memory palette (greens); the allocating frame of each
//! leaking site is red, so leaks are the first thing the eye finds. The subtitle carries
//! each process's verdict.

use std::io::{self, Write};

use inferno::flamegraph::{self, Options, Palette, color::BasicPalette, color::PaletteMap};

use super::{
    Report,
    folded::{self, LEAK_MARK},
};
use crate::cli::Weight;

/// The colour of leaking frames.
const LEAK_RED: flamegraph::color::Color = flamegraph::color::Color {
    r: 0xe0,
    g: 0x30,
    b: 0x30,
};

pub fn write(report: &Report, weight: Weight, out: &mut dyn Write) -> io::Result<()> {
    let stacks = folded::stacks(report, weight);
    let lines: Vec<String> = stacks.iter().map(|(s, v)| format!("{s} {v}")).collect();
    let mut palette = PaletteMap::default();
    for stack in stacks.keys() {
        if let Some(leaf) = stack.rsplit(';').next().filter(|f| f.ends_with(LEAK_MARK)) {
            palette.insert(leaf, LEAK_RED);
        }
    }
    let what = match weight {
        Weight::Live => "live bytes",
        Weight::Allocated => "allocated bytes",
        Weight::Count => "live allocations",
    };
    if lines.is_empty() {
        return empty(out, what);
    }
    let mut options = Options::default();
    options.title = format!("alloctrace: {what} by call stack (leaking sites in red)");
    options.subtitle = Some(subtitle(report));
    options.count_name = folded::unit(weight).to_owned();
    options.colors = Palette::Basic(BasicPalette::Mem);
    options.hash = true; // the same function gets the same colour in every graph
    options.deterministic = true;
    options.palette_map = Some(&mut palette);
    flamegraph::from_lines(&mut options, lines.iter().map(String::as_str), out)
        .map_err(io::Error::other)
}

/// `pid 1234 (server): LEAK · pid 99 (worker): STABLE`, after a partial result's warning.
fn subtitle(report: &Report) -> String {
    let verdicts = report
        .processes
        .iter()
        .map(|p| {
            format!(
                "pid {} ({}): {}",
                p.pid,
                p.comm,
                super::text::verdict_word(p.verdict)
            )
        })
        .collect::<Vec<_>>()
        .join(" · ");
    if report.partial {
        format!("{} · {verdicts}", folded::PARTIAL)
    } else {
        verdicts
    }
}

/// A valid SVG saying there is nothing to draw (inferno draws an error instead).
fn empty(out: &mut dyn Write, what: &str) -> io::Result<()> {
    writeln!(
        out,
        "<?xml version=\"1.0\" standalone=\"no\"?>\n\
         <svg version=\"1.1\" width=\"1200\" height=\"60\" xmlns=\"http://www.w3.org/2000/svg\">\n\
         <text x=\"600\" y=\"34\" text-anchor=\"middle\" font-family=\"Verdana\" font-size=\"14\">\
         alloctrace: no {what} to draw</text>\n</svg>"
    )
}
