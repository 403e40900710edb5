//! Progress bars on stderr for the steps a user waits through: attaching to many processes,
//! symbolizing a large report. Hidden when stderr is not a terminal, so logs, pipes and CI
//! output never get control characters; cleared when done, so only the results remain.

use std::io::IsTerminal as _;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A bar of `len` steps saying `what` is going on; hidden unless stderr is a terminal.
pub fn bar(what: &'static str, len: u64) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let style = ProgressStyle::with_template("alloctrace: {msg} [{bar:30}] {pos}/{len} {elapsed}")
        .map_or_else(
            |_| ProgressStyle::default_bar(),
            |s| s.progress_chars("=> "),
        );
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    bar.set_style(style);
    bar.set_message(what);
    bar
}
