//! Reading the daemons' logs (tracing's text format, with ANSI colours):
//! the lines one node logged about another since a point in time, with
//! prefixes shown as node names.

use std::time::{SystemTime, UNIX_EPOCH};

use netns_tests::mesh::Mesh;

/// `s` without ANSI escape sequences (`ESC [ ... letter`).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Seconds since midnight (UTC) of a line's `2026-12-01T19:40:42.79Z` stamp.
fn stamp(line: &str) -> Option<f64> {
    let time = line.split_whitespace().next()?.split_once('T')?.1;
    let time = time.strip_suffix('Z')?;
    let mut parts = time.split(':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let s: f64 = parts.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}

/// Seconds since midnight (UTC) of `t`.
pub(crate) fn day_secs(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() % 86_400.0)
}

/// The lines node `i` logged from byte `from` of its log on that mention
/// node `about`'s prefix (every line if None), as
/// "+T.T s message" with T counted from `base` (seconds since midnight
/// UTC) and prefixes replaced by node names. At most `max` lines.
pub(crate) fn lines(
    m: &Mesh,
    i: usize,
    from: usize,
    about: Option<usize>,
    base: f64,
    max: usize,
) -> Vec<String> {
    let log = m.log(i);
    let want = about.map(|a| m.nodes[a].prefix.clone());
    log.get(from..)
        .unwrap_or_default()
        .lines()
        .map(strip_ansi)
        .filter(|l| want.as_ref().is_none_or(|p| l.contains(p.as_str())))
        .take(max)
        .map(|l| {
            let at = stamp(&l).map_or(f64::NAN, |s| {
                // Across midnight the difference wraps.
                let d = s - base;
                if d < -43_200.0 {
                    d + 86_400.0
                } else {
                    d
                }
            });
            let mut text = l.split_once(": ").map_or(l.as_str(), |x| x.1).to_string();
            for n in &m.nodes {
                text = text.replace(&format!("peer={}", n.prefix), &format!("peer={}", n.name));
                text = text.replace(&n.prefix, &n.name);
            }
            format!("{at:+.1} s {text}")
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_tracing_line() {
        let l = "\u{1b}[2m2026-12-01T19:40:42.791793Z\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m re6stnet::daemon: tunnel";
        let s = strip_ansi(l);
        assert_eq!(
            s,
            "2026-12-01T19:40:42.791793Z  INFO re6stnet::daemon: tunnel"
        );
        let t = stamp(&s).unwrap_or_default();
        assert!((t - (19.0 * 3600.0 + 40.0 * 60.0 + 42.791793)).abs() < 1e-6);
    }
}
