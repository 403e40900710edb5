use ratatui::{Terminal, backend::TestBackend, crossterm::event::KeyEvent};

use super::*;
use crate::{cli::Weight, report::tests::example_report};

fn view_in(dir: &std::path::Path) -> View {
    let snapshots = Snapshots::new(
        crate::cli::Format::Json,
        Weight::Live,
        Some(dir.join("snapshot.json")),
    );
    let mut view = View::new(Duration::from_secs(1), snapshots, false);
    view.update(example_report());
    view
}

/// The screen as text, one line per row.
fn screen(view: &mut View) -> String {
    let mut terminal = Terminal::new(TestBackend::new(140, 30)).expect("test terminal");
    terminal.draw(|f| view.draw(f)).expect("draws");
    let buffer = terminal.backend().buffer().clone();
    let mut text = String::new();
    for y in 0..buffer.area.height {
        for x in 0..buffer.area.width {
            text.push_str(buffer[(x, y)].symbol());
        }
        text.push('\n');
    }
    text
}

fn press(view: &mut View, code: KeyCode) -> Next {
    view.key(KeyEvent::new(code, KeyModifiers::NONE))
}

#[test]
fn shows_processes_sites_and_verdicts() {
    let dir = std::env::temp_dir();
    let mut view = view_in(&dir);
    let text = screen(&mut view);
    assert!(text.contains("alloctrace top · 1 process"), "{text}");
    assert!(text.contains("server"), "{text}");
    assert!(text.contains("LEAK"), "{text}");
    assert!(text.contains("node_alloc (node.h:7)"), "{text}");
    assert!(text.contains("+2.50 KiB/s"), "{text}");
    assert!(text.contains("sort: live bytes"), "{text}");
}

#[test]
fn keys_sort_drill_into_a_stack_and_quit() {
    let dir = std::env::temp_dir();
    let mut view = view_in(&dir);
    assert_eq!(press(&mut view, KeyCode::Char('a')), Next::Continue);
    let text = screen(&mut view);
    assert!(text.contains("sort: allocated bytes"), "{text}");
    // Sorted by allocated bytes the 9.77 KiB temporary site comes first; select it.
    press(&mut view, KeyCode::Home);
    press(&mut view, KeyCode::Enter);
    let text = screen(&mut view);
    assert!(text.contains("stack (innermost first)"), "{text}");
    assert!(
        text.contains("handler_14 (/src/app/net/http.c:114)"),
        "{text}"
    );
    assert!(text.contains("stack truncated by the capture"), "{text}");
    press(&mut view, KeyCode::Esc);
    assert!(!screen(&mut view).contains("stack (innermost first)"));
    press(&mut view, KeyCode::Char('s'));
    assert!(screen(&mut view).contains("sort: live allocations"));
    assert_eq!(press(&mut view, KeyCode::Char('q')), Next::Quit);
    let ctrl_c = KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL);
    assert_eq!(view.key(ctrl_c), Next::Quit);
}

#[test]
fn w_writes_the_current_report() {
    let dir = std::env::temp_dir().join(format!("alloctrace-top-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let mut view = view_in(&dir);
    press(&mut view, KeyCode::Char('w'));
    let written = std::fs::read_to_string(dir.join("snapshot.json")).expect("written");
    let report: serde_json::Value = serde_json::from_str(&written).expect("JSON");
    assert_eq!(report["processes"][0]["pid"], 42);
    assert!(screen(&mut view).contains("wrote "));
    let _ = std::fs::remove_dir_all(&dir);
}
