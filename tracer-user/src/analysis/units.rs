//! Numbers in words: sizes, rates, durations and sampled estimates, as evidence shows them.

/// `12.3 KiB/s`-style rate, per minute when slow.
pub fn rate(bytes_per_s: f64) -> String {
    if bytes_per_s.abs() < 1024.0 {
        format!("{}/min", bytes_text_signed(bytes_per_s * 60.0))
    } else {
        format!("{}/s", bytes_text_signed(bytes_per_s))
    }
}

pub fn bytes_text_signed(v: f64) -> String {
    let sign = if v < 0.0 { "-" } else { "+" };
    format!("{sign}{}", bytes_text(v.abs() as u64))
}

/// Bytes in binary units with three significant digits (`64 B`, `1.50 KiB`, `10.0 MiB`).
pub fn bytes_text(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    let digits = if value >= 100.0 {
        0
    } else if value >= 10.0 {
        1
    } else {
        2
    };
    format!("{value:.digits$} {}", UNITS[unit])
}

/// A byte count as known: exact, or `≈ 76.0 MiB ± 12.0 MiB` for a sampled estimate with
/// variance `var` (the ± is the 95 % interval's half-width).
pub fn bytes_estimate(bytes: u64, var: f64) -> String {
    match half_width(var) {
        None => bytes_text(bytes),
        Some(h) => format!("≈ {} ± {}", bytes_text(bytes), bytes_text(h.round() as u64)),
    }
}

/// Half-width of the 95 % normal interval of an estimate with variance `var`; `None` when
/// the number is exact.
pub fn half_width(var: f64) -> Option<f64> {
    (var > 0.0).then(|| Z95 * var.sqrt())
}

/// The 97.5th percentile of the standard normal distribution.
pub const Z95: f64 = 1.959_964;

/// `40 µs`, `850 ms`, `12.0 s`, `3.5 min`.
pub fn seconds(s: f64) -> String {
    if s < 0.001 {
        format!("{:.0} µs", s * 1e6)
    } else if s < 1.0 {
        format!("{:.0} ms", s * 1000.0)
    } else if s < 120.0 {
        format!("{s:.1} s")
    } else {
        format!("{:.1} min", s / 60.0)
    }
}

/// `1 allocation`, `2 allocations`.
pub fn count(n: usize, one: &str, many: &str) -> String {
    plural(n as u64, one, many)
}

/// `1 allocation`, `2 allocations`.
pub fn plural(n: u64, one: &str, many: &str) -> String {
    if n == 1 {
        format!("1 {one}")
    } else {
        format!("{n} {many}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimates_carry_their_interval_only_when_sampled() {
        assert_eq!(bytes_estimate(2048, 0.0), "2.00 KiB");
        // σ = 1 KiB → ± 1.96 KiB
        assert_eq!(
            bytes_estimate(10 << 20, 1024.0 * 1024.0),
            "≈ 10.0 MiB ± 1.96 KiB"
        );
        assert_eq!(plural(1, "site", "sites"), "1 site");
        assert_eq!(plural(3, "site", "sites"), "3 sites");
    }
}
