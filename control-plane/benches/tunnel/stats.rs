//! Statistics of samples, and per-thread CPU time (from /proc; no profiler needed).

use super::*;

pub(crate) fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

/// p50/p90/p99/max/mean of samples in milliseconds.
pub(crate) fn summary(samples: &[f64]) -> Value {
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

pub(crate) fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub(crate) fn mb_per_s(bytes: u64, d: Duration) -> f64 {
    (bytes as f64 / 1e6 / d.as_secs_f64() * 10.0).round() / 10.0
}

pub(crate) fn line(s: &Value) -> String {
    format!(
        "p50 {} ms, p90 {} ms, p99 {} ms, max {} ms (n={})",
        s["p50_ms"], s["p90_ms"], s["p99_ms"], s["max_ms"], s["n"]
    )
}

// ---------------------------------------------------------------------------------------------
// Per-thread CPU time (from /proc; no profiler needed)

/// `tid -> (name, ns on CPU)` of every thread of this process.
pub(crate) fn thread_cpu() -> BTreeMap<u32, (String, u64)> {
    let mut out = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for entry in dir.flatten() {
        let Ok(tid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let p = entry.path();
        let name = std::fs::read_to_string(p.join("comm"))
            .map(|s| s.trim().to_owned())
            .unwrap_or_default();
        let ns = std::fs::read_to_string(p.join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0);
        out.insert(tid, (name, ns));
    }
    out
}

/// CPU seconds per thread between two [`thread_cpu`] readings, busiest first (threads that
/// used less than 1 ms left out), names made unique with the thread id.
pub(crate) fn cpu_delta(
    before: &BTreeMap<u32, (String, u64)>,
    after: &BTreeMap<u32, (String, u64)>,
) -> Vec<(String, f64)> {
    let mut v: Vec<(String, f64)> = after
        .iter()
        .map(|(tid, (name, ns))| {
            let was = before.get(tid).map_or(0, |(_, b)| *b);
            (format!("{name}#{tid}"), ns.saturating_sub(was) as f64 / 1e9)
        })
        .filter(|(_, s)| *s >= 0.001)
        .collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1));
    v
}
