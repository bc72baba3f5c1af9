//! Summaries of measured samples for the benchmarks' tables.

/// The median (the upper one of an even count); NaN when empty. Sorts `v`.
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

/// The 95th percentile (nearest rank); NaN when empty. Sorts `v`.
pub fn p95(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() as f64 * 0.95).ceil() as usize).clamp(1, v.len()) - 1]
}

/// The largest sample; NaN when empty.
pub fn max(v: &[f64]) -> f64 {
    v.iter().copied().reduce(f64::max).unwrap_or(f64::NAN)
}

/// The machine's load averages over 1, 5 and 15 minutes, as the kernel
/// prints them (`/proc/loadavg`, first three fields).
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries() {
        let mut v = vec![5.0, 1.0, 3.0, 2.0, 4.0];
        assert_eq!(median(&mut v), 3.0);
        assert_eq!(p95(&mut v), 5.0);
        assert_eq!(max(&v), 5.0);
        assert_eq!(median(&mut [2.0, 1.0]), 2.0);
        assert!(median(&mut []).is_nan() && p95(&mut []).is_nan() && max(&[]).is_nan());
    }
}
