//! What `alloctrace top` shows, and what keys do to it: pure state and drawing (ratatui),
//! no terminal set-up. The only I/O is writing a report file when `w` is pressed.

use std::time::Duration;

use ratatui::{
    Frame,
    crossterm::event::{KeyCode, KeyEvent, KeyModifiers},
    layout::{Constraint, Layout, Rect},
    style::{Color, Modifier, Style},
    text::{Line, Span},
    widgets::{Block, Borders, Cell, Paragraph, Row, Table, TableState, Wrap},
};

use super::Snapshots;
use crate::{
    analysis::{ProcessVerdict, SiteVerdict, growth, rate},
    report::{
        ProcessReport, Report, SiteReport,
        text::{bytes, count, growth as growth_text, per_allocation, verdict_word},
    },
};

/// What the caller does after a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    Continue,
    Quit,
}

/// The order of the sites table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sort {
    /// Live bytes, biggest first.
    Live,
    /// Growth rate of live bytes, fastest first.
    Growth,
    /// Bytes allocated over the trace.
    Allocated,
    /// Live allocations.
    Count,
}

impl Sort {
    fn next(self) -> Self {
        match self {
            Self::Live => Self::Growth,
            Self::Growth => Self::Allocated,
            Self::Allocated => Self::Count,
            Self::Count => Self::Live,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Live => "live bytes",
            Self::Growth => "growth",
            Self::Allocated => "allocated bytes",
            Self::Count => "live allocations",
        }
    }
}

/// The view's state: the latest report and what the user chose to see of it.
pub struct View {
    report: Option<Report>,
    interval: Duration,
    sort: Sort,
    /// The selected site, by identity, so it stays selected as the order changes.
    selected: Option<String>,
    table: TableState,
    /// Showing the selected site's stack instead of the sites table.
    detail: bool,
    /// The last thing a key did (`wrote …`), shown in the footer.
    status: String,
    /// Tracing has stopped (processes exited, or --duration): the last report stays.
    finished: bool,
    snapshots: Snapshots,
    /// The traced process was started by `top -- CMD`.
    pub started_command: bool,
}

impl View {
    pub fn new(interval: Duration, snapshots: Snapshots, started_command: bool) -> Self {
        Self {
            report: None,
            interval,
            sort: Sort::Live,
            selected: None,
            table: TableState::default(),
            detail: false,
            status: String::new(),
            finished: false,
            snapshots,
            started_command,
        }
    }

    pub fn update(&mut self, report: Report) {
        self.report = Some(report);
    }

    /// Tracing stopped on its own: keep showing the last report until the user quits.
    pub fn ended(&mut self) {
        if !self.finished {
            self.finished = true;
            self.status = "tracing ended (processes exited or --duration); q quits".into();
        }
    }

    /// Pids of the traced processes still running, as of the last report.
    pub fn live_pids(&self) -> Vec<u32> {
        self.report
            .iter()
            .flat_map(|r| &r.processes)
            .filter(|p| !p.exited)
            .map(|p| p.pid)
            .collect()
    }

    /// Applies a key.
    pub fn key(&mut self, key: KeyEvent) -> Next {
        let ctrl_c =
            key.modifiers.contains(KeyModifiers::CONTROL) && matches!(key.code, KeyCode::Char('c'));
        match key.code {
            _ if ctrl_c => return Next::Quit,
            KeyCode::Char('q') => return Next::Quit,
            KeyCode::Esc | KeyCode::Backspace | KeyCode::Left if self.detail => {
                self.detail = false;
            }
            KeyCode::Esc => return Next::Quit,
            KeyCode::Enter | KeyCode::Right => self.detail = self.selected_site().is_some(),
            KeyCode::Up | KeyCode::Char('k') => self.step(-1),
            KeyCode::Down | KeyCode::Char('j') => self.step(1),
            KeyCode::PageUp => self.step(-10),
            KeyCode::PageDown => self.step(10),
            KeyCode::Home => self.step(isize::MIN / 2),
            KeyCode::End => self.step(isize::MAX / 2),
            KeyCode::Char('s') => self.sort = self.sort.next(),
            KeyCode::Char('l') => self.sort = Sort::Live,
            KeyCode::Char('g') => self.sort = Sort::Growth,
            KeyCode::Char('a') => self.sort = Sort::Allocated,
            KeyCode::Char('c') => self.sort = Sort::Count,
            KeyCode::Char('w') => self.snapshot(),
            _ => {}
        }
        Next::Continue
    }

    fn snapshot(&mut self) {
        let Some(report) = &self.report else {
            return;
        };
        self.status = match self.snapshots.write(report) {
            Ok(path) => format!("wrote {}", path.display()),
            Err(err) => format!("error: {err}"),
        };
    }

    /// Moves the selection by `by` rows, within the table.
    fn step(&mut self, by: isize) {
        let rows = self.rows();
        if rows.is_empty() {
            return;
        }
        let at = self.position(&rows) as isize;
        let to = (at.saturating_add(by)).clamp(0, rows.len() as isize - 1) as usize;
        self.selected = Some(site_key(rows[to].0, rows[to].1));
    }

    /// Index of the selected site in `rows` (the first when it is gone).
    fn position(&self, rows: &[(&ProcessReport, &SiteReport)]) -> usize {
        self.selected
            .as_ref()
            .and_then(|key| rows.iter().position(|(p, s)| &site_key(p, s) == key))
            .unwrap_or(0)
    }

    fn selected_site(&self) -> Option<(&ProcessReport, &SiteReport)> {
        let rows = self.rows();
        let at = self.position(&rows);
        rows.get(at).copied()
    }

    /// Every site of every process, in the chosen order.
    fn rows(&self) -> Vec<(&ProcessReport, &SiteReport)> {
        let mut rows: Vec<(&ProcessReport, &SiteReport)> = self
            .report
            .iter()
            .flat_map(|r| &r.processes)
            .flat_map(|p| p.sites.iter().map(move |s| (p, s)))
            .collect();
        let sort = self.sort;
        rows.sort_by(|a, b| {
            let key = |(_, s): &(&ProcessReport, &SiteReport)| match sort {
                Sort::Live => s.live_bytes as f64,
                Sort::Growth => site_rate(s).unwrap_or(f64::MIN),
                Sort::Allocated => s.total_bytes as f64,
                Sort::Count => s.live_allocations as f64,
            };
            key(b).total_cmp(&key(a))
        });
        rows
    }

    pub fn draw(&mut self, frame: &mut Frame<'_>) {
        let processes = self.report.as_ref().map_or(0, |r| r.processes.len());
        let [title, procs, sites, footer] = Layout::vertical([
            Constraint::Length(1),
            Constraint::Length(processes.clamp(1, 6) as u16 + 3),
            Constraint::Min(5),
            Constraint::Length(1),
        ])
        .areas(frame.area());
        frame.render_widget(Paragraph::new(self.title_line()), title);
        frame.render_widget(self.process_table(), procs);
        if self.detail
            && let Some((p, s)) = self.selected_site()
        {
            frame.render_widget(detail(p, s), sites);
        } else {
            self.draw_sites(frame, sites);
        }
        let keys = "↑↓ select · Enter stack · s sort (l g a c) · w write report · q quit";
        let text = if self.status.is_empty() {
            keys.to_owned()
        } else {
            format!("{} · {keys}", self.status)
        };
        frame.render_widget(Paragraph::new(text).style(dim()), footer);
    }

    fn title_line(&self) -> Line<'static> {
        let Some(r) = &self.report else {
            return Line::from("alloctrace top: waiting for the first report");
        };
        let mut spans = vec![Span::styled("alloctrace top", bold())];
        spans.push(Span::raw(format!(
            " · {} · {:.1} s · {} events, {} dropped · every {} · sort: {}",
            count(r.processes.len(), "process", "processes"),
            r.duration_s,
            r.events.received,
            r.events.dropped,
            crate::analysis::seconds(self.interval.as_secs_f64()),
            self.sort.name()
        )));
        if r.partial {
            spans.push(Span::styled(
                " · PARTIAL",
                verdict_style(Some(ProcessVerdict::Leak)),
            ));
        }
        Line::from(spans)
    }

    fn process_table(&self) -> Table<'static> {
        let header = Row::new([
            "PID",
            "COMMAND",
            "VERDICT",
            "LIVE",
            "GROWTH",
            "PEAK",
            "FOOTPRINT",
            "SITES",
        ])
        .style(bold());
        let rows = self.report.iter().flat_map(|r| &r.processes).map(|p| {
            let growth = process_rate(p).map_or_else(|| "—".to_owned(), rate);
            let exited = if p.exited { " (exited)" } else { "" };
            Row::new([
                Cell::from(p.pid.to_string()),
                Cell::from(format!("{}{exited}", p.comm)),
                Cell::from(verdict_word(p.verdict)).style(verdict_style(p.verdict)),
                Cell::from(bytes(p.live_bytes)),
                Cell::from(growth),
                Cell::from(bytes(p.peak_live_bytes)),
                Cell::from(p.footprint_bytes.map_or_else(|| "—".to_owned(), bytes)),
                Cell::from(p.sites_total.to_string()),
            ])
        });
        let widths = [
            Constraint::Length(7),
            Constraint::Min(12),
            Constraint::Length(13),
            Constraint::Length(10),
            Constraint::Length(13),
            Constraint::Length(10),
            Constraint::Length(10),
            Constraint::Length(6),
        ];
        Table::new(rows, widths)
            .header(header)
            .block(Block::default().borders(Borders::ALL).title(" processes "))
    }

    fn draw_sites(&mut self, frame: &mut Frame<'_>, area: Rect) {
        let rows = self.rows();
        let at = self.position(&rows);
        let header = Row::new([
            "PID",
            "VERDICT",
            "LIVE",
            "GROWTH",
            "LIVE ALLOCS",
            "EACH",
            "ALLOCATED",
            "SITE",
        ])
        .style(bold());
        let table_rows: Vec<Row<'static>> = rows.iter().map(|(p, s)| site_row(p, s)).collect();
        let widths = [
            Constraint::Length(7),
            Constraint::Length(9),
            Constraint::Length(9),
            Constraint::Length(12),
            Constraint::Length(11),
            Constraint::Length(9),
            Constraint::Length(9),
            Constraint::Min(20),
        ];
        let title = format!(" sites ({}) ", rows.len());
        let table = Table::new(table_rows, widths)
            .header(header)
            .block(Block::default().borders(Borders::ALL).title(title))
            .row_highlight_style(Style::default().add_modifier(Modifier::REVERSED));
        self.table.select((!rows.is_empty()).then_some(at));
        frame.render_stateful_widget(table, area, &mut self.table);
    }
}

fn site_row(p: &ProcessReport, s: &SiteReport) -> Row<'static> {
    let estimated = s.recorded_allocations != s.total_allocations;
    let each = per_allocation(s.live_bytes, s.live_allocations, estimated)
        .or_else(|| per_allocation(s.total_bytes, s.total_allocations, estimated))
        .map_or_else(String::new, |e| e.trim_end_matches(" each").to_owned());
    Row::new([
        Cell::from(p.pid.to_string()),
        Cell::from(site_verdict(s)).style(site_style(s.assessment.verdict)),
        Cell::from(bytes(s.live_bytes)),
        Cell::from(site_rate(s).map_or_else(|| "—".to_owned(), rate)),
        Cell::from(s.live_allocations.to_string()),
        Cell::from(each),
        Cell::from(bytes(s.total_bytes)),
        Cell::from(site_name(s)),
    ])
}

/// The selected site: verdict, numbers, evidence, growth and its whole stack.
fn detail(p: &ProcessReport, s: &SiteReport) -> Paragraph<'static> {
    let estimated = s.recorded_allocations != s.total_allocations;
    let mut lines = vec![
        Line::from(vec![
            Span::styled(
                site_verdict(s).to_uppercase(),
                site_style(s.assessment.verdict),
            ),
            Span::raw(format!(" · pid {} ({}) · {}", p.pid, p.comm, site_name(s))),
        ]),
        Line::from(format!(
            "live {} in {}{} · allocated {} in {}",
            bytes(s.live_bytes),
            count(s.live_allocations as usize, "allocation", "allocations"),
            per_allocation(s.live_bytes, s.live_allocations, estimated)
                .map_or_else(String::new, |e| format!(", {e}")),
            bytes(s.total_bytes),
            count(s.total_allocations as usize, "allocation", "allocations"),
        )),
        Line::from(format!("evidence: {}", s.assessment.evidence)),
    ];
    if let Some(rate) = site_rate(s) {
        lines.push(Line::from(format!("growth {}", growth_text(rate))));
    }
    if let Some(ty) = &s.allocated_type {
        lines.push(Line::from(format!("allocates: {ty}")));
    }
    lines.push(Line::from(""));
    lines.push(Line::styled("stack (innermost first):", bold()));
    for f in &s.frames {
        let location = match (&f.file, f.line) {
            (Some(file), Some(line)) => format!(" ({file}:{line})"),
            _ => f
                .module
                .as_deref()
                .map(|m| format!(" [{}]", m.rsplit('/').next().unwrap_or(m)))
                .unwrap_or_default(),
        };
        let inlined = if f.inlined { " [inlined]" } else { "" };
        let text = format!("  {}{location}{inlined}", f.function);
        let runtime = crate::report::text::is_runtime(f);
        lines.push(if runtime {
            Line::styled(text, dim())
        } else {
            Line::from(text)
        });
    }
    if s.frames.is_empty() {
        lines.push(Line::from("  <stack unknown>"));
    }
    if s.stack_truncated {
        lines.push(Line::from("  … stack truncated by the capture"));
    }
    Paragraph::new(lines).wrap(Wrap { trim: false }).block(
        Block::default()
            .borders(Borders::ALL)
            .title(" site (Esc: back) "),
    )
}

/// A site's identity across reports: its process and its frames.
fn site_key(p: &ProcessReport, s: &SiteReport) -> String {
    let mut key = format!("{}:{:?}", p.pid, s.kind);
    for f in &s.frames {
        key.push_str(&format!(";{}:{:?}", f.function, f.line));
    }
    key
}

/// `leak_request (leak_loop.c:21)`: the allocating frame.
fn site_name(s: &SiteReport) -> String {
    let Some(f) = s.frames.first() else {
        return "<stack unknown>".to_owned();
    };
    match (&f.file, f.line) {
        (Some(file), Some(line)) => {
            let file = file.rsplit('/').next().unwrap_or(file);
            format!("{} ({file}:{line})", f.function)
        }
        _ => f.function.clone(),
    }
}

fn site_verdict(s: &SiteReport) -> &'static str {
    match s.assessment.verdict {
        SiteVerdict::Leak => "LEAK",
        SiteVerdict::Stable if s.assessment.one_time => "one-time",
        SiteVerdict::Stable => "stable",
        SiteVerdict::Temporary => "temporary",
    }
}

fn site_rate(s: &SiteReport) -> Option<f64> {
    s.assessment.growth.as_ref().map(|g| g.bytes_per_s)
}

/// The slope of a process's live bytes over its series.
fn process_rate(p: &ProcessReport) -> Option<f64> {
    let points: Vec<(u64, u64)> = p
        .series
        .iter()
        .map(|pt| ((pt.t_s * 1e9) as u64, pt.live_bytes))
        .collect();
    growth::fit(&points).map(|g| g.bytes_per_s)
}

fn bold() -> Style {
    Style::default().add_modifier(Modifier::BOLD)
}

fn dim() -> Style {
    Style::default().add_modifier(Modifier::DIM)
}

fn verdict_style(v: Option<ProcessVerdict>) -> Style {
    let color = match v {
        Some(ProcessVerdict::Leak) => Color::Red,
        Some(ProcessVerdict::Fragmentation) => Color::Yellow,
        Some(ProcessVerdict::Stable) => Color::Green,
        None => Color::Magenta,
    };
    bold().fg(color)
}

fn site_style(v: SiteVerdict) -> Style {
    match v {
        SiteVerdict::Leak => bold().fg(Color::Red),
        SiteVerdict::Stable => Style::default(),
        SiteVerdict::Temporary => dim(),
    }
}

#[cfg(test)]
mod tests;
