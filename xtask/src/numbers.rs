//! Reading numbers out of alloctrace's JSON reports: xtask has no JSON parser, on purpose
//! (it builds with the machine's stock toolchain and no dependencies).

/// The first `"key": number` in a JSON text.
pub fn number(json: &str, key: &str) -> Option<f64> {
    let at = json.find(&format!("\"{key}\":"))? + key.len() + 3;
    let rest = json[at..].trim_start();
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-' || c == 'e'))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}
