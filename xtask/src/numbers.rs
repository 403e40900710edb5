//! Reading numbers out of what the bench runs print: alloctrace's JSON reports (xtask has no
//! JSON parser, on purpose: it builds with the machine's stock toolchain and no
//! dependencies) and the workload's own timing line.

/// The first `"key": number` in a JSON text.
pub fn number(json: &str, key: &str) -> Option<f64> {
    let at = json.find(&format!("\"{key}\":"))? + key.len() + 3;
    let rest = json[at..].trim_start();
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-' || c == 'e'))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// The workload's own timing line, `ns_per_pair=N`; `under` names the run in the error.
pub fn ns_per_pair(stdout: &str, under: &str) -> Result<f64, String> {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("ns_per_pair="))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| format!("the workload under {under} printed no ns_per_pair: {stdout}"))
}

/// The median of `values` (the upper one of an even count), their least and greatest; sorts
/// them. Empty values give NaN.
pub fn median_range(values: &mut [f64]) -> (f64, f64, f64) {
    values.sort_by(f64::total_cmp);
    match (values.first(), values.last()) {
        (Some(&min), Some(&max)) => (values[values.len() / 2], min, max),
        _ => (f64::NAN, f64::NAN, f64::NAN),
    }
}
