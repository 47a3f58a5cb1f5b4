//! Statistics of samples (`testkit::stats`), throughput, and per-thread CPU time (from /proc;
//! no profiler needed).

use super::*;

pub(crate) use testkit::stats::{line, round3, summary};

pub(crate) fn mb_per_s(bytes: u64, d: Duration) -> f64 {
    (bytes as f64 / 1e6 / d.as_secs_f64() * 10.0).round() / 10.0
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
