//! Statistics benches report: percentiles and summaries of samples in milliseconds, and the
//! trend of a series over time (is it flat, or does it grow?).

use std::time::Duration;

use serde_json::{json, Value};

/// The `q` quantile (0..=1) of `sorted` by the nearest-rank rule; NaN when empty.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

/// p50/p90/p99/max/min/mean of samples in milliseconds, and their count.
pub fn summary(samples: &[f64]) -> Value {
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    let mean = s.iter().sum::<f64>() / s.len().max(1) as f64;
    json!({
        "n": s.len(),
        "p50_ms": round3(percentile(&s, 0.50)),
        "p90_ms": round3(percentile(&s, 0.90)),
        "p99_ms": round3(percentile(&s, 0.99)),
        "max_ms": round3(s.last().copied().unwrap_or(f64::NAN)),
        "min_ms": round3(s.first().copied().unwrap_or(f64::NAN)),
        "mean_ms": round3(mean),
    })
}

/// A [`summary`] on one line.
pub fn line(s: &Value) -> String {
    format!(
        "p50 {} ms, p90 {} ms, p99 {} ms, max {} ms (n={})",
        s["p50_ms"], s["p90_ms"], s["p99_ms"], s["max_ms"], s["n"]
    )
}

pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// How a series `(t, y)` moved: its least-squares slope (per unit of `t`), and what that slope
/// amounts to over the span of `t`. `None` with fewer than two points or no spread in `t`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Trend {
    pub slope: f64,
    /// `slope` times the span of `t`: the growth the fitted line shows over the series.
    pub change: f64,
}

pub fn trend(points: &[(f64, f64)]) -> Option<Trend> {
    let n = points.len() as f64;
    if points.len() < 2 {
        return None;
    }
    let (mt, my) = points
        .iter()
        .fold((0.0, 0.0), |(a, b), (t, y)| (a + t / n, b + y / n));
    let (cov, var) = points.iter().fold((0.0, 0.0), |(c, v), (t, y)| {
        (c + (t - mt) * (y - my), v + (t - mt) * (t - mt))
    });
    if var <= 0.0 {
        return None;
    }
    let slope = cov / var;
    let (lo, hi) = points
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), (t, _)| {
            (lo.min(*t), hi.max(*t))
        });
    Some(Trend {
        slope,
        change: slope * (hi - lo),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let s: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&s, 0.5), 50.0);
        assert_eq!(percentile(&s, 0.99), 99.0);
        assert_eq!(percentile(&s, 1.0), 100.0);
        assert_eq!(percentile(&[7.0], 0.0), 7.0);
        assert!(percentile(&[], 0.5).is_nan());
        let v = summary(&[3.0, 1.0, 2.0]);
        assert_eq!(
            (v["n"].as_u64(), v["p50_ms"].as_f64()),
            (Some(3), Some(2.0))
        );
    }

    #[test]
    fn trends_of_flat_and_growing_series() {
        let flat: Vec<(f64, f64)> = (0..10)
            .map(|i| (f64::from(i), if i % 2 == 0 { 5.0 } else { 6.0 }))
            .collect();
        let t = trend(&flat).unwrap();
        assert!(t.change.abs() < 0.6, "{t:?}");
        let growing: Vec<(f64, f64)> = (0..=10)
            .map(|i| (f64::from(i), 2.0 * f64::from(i)))
            .collect();
        let t = trend(&growing).unwrap();
        assert!((t.slope - 2.0).abs() < 1e-9 && (t.change - 20.0).abs() < 1e-9);
        assert_eq!(trend(&[(1.0, 1.0)]), None);
        assert_eq!(trend(&[(1.0, 1.0), (1.0, 2.0)]), None);
    }
}
