//! What the soak writes: the CSV as rows come, the JSON (rows, settings, summary), one line
//! per row for the terminal, and the verdict on each series.
//!
//! The rules. A series is judged on the rows after the warm-up, by the least-squares line
//! through them: its `change` is the growth that line shows over the judged span.
//! - Memory (`rss_mib`) is flat when it changes by less than 10 % of its median, or by less
//!   than 8 MiB (allocator noise at this size). What the program holds (`allocated_mib`,
//!   jemalloc's count: live data, without the allocator's free pages) is flat when it changes
//!   by less than 10 % of its median, or by less than 1 MiB.
//! - Counts of things held (`fds`, `threads`, `actors`, `connections_*`, `held_queued`, the
//!   fleet's maps, `in_flight`, gateway tunnels and streams) are flat when they change by
//!   less than 5 % of their maximum plus 2 (one tunnel more or less is not a leak).
//! - Wake-ups (`wake_p50_ms`, `wake_p99_ms`) are flat when the trend adds less than 50 % of
//!   their median plus 100 ms over the run; and no wake-up may fail.
//! - Held check-ins must keep being held: `held_share` never falls below 0.5 in a judged row
//!   (the old defect took it to 0 after a few minutes).
//!
//! After the teardown the fleet's maps and the held queue must be back to what the real
//! agents alone would leave (at most a few entries), and the open fds near where they were.

use std::io::Write as _;
use std::path::Path;

use testkit::stats::{round3, trend};

use super::sample::Row;
use super::*;

/// The CSV file, its header written with the first row.
pub(crate) struct Csv {
    file: std::fs::File,
    header: bool,
}

impl Csv {
    pub(crate) fn create(path: &Path) -> Self {
        Self {
            file: std::fs::File::create(path).expect("soak CSV"),
            header: false,
        }
    }

    pub(crate) fn write(&mut self, row: &Row) {
        if !self.header {
            let names: Vec<&str> = row.values.iter().map(|(n, _)| *n).collect();
            writeln!(self.file, "{},errors", names.join(",")).expect("write CSV");
            self.header = true;
        }
        let values: Vec<String> = row
            .values
            .iter()
            .map(|(_, v)| {
                if v.is_finite() {
                    round3(*v).to_string()
                } else {
                    String::new()
                }
            })
            .collect();
        writeln!(self.file, "{},{}", values.join(","), row.errors.len()).expect("write CSV");
        let _ = self.file.flush();
    }
}

/// One row for the terminal: the figures a reader watches.
pub(crate) fn human(row: &Row) -> String {
    let f = |name: &str| {
        let v = row.get(name);
        if v.is_finite() {
            format!("{}", round3(v))
        } else {
            "-".to_owned()
        }
    };
    let mut line = format!(
        "t={}s rss={}MiB fds={} thr={} cpu={}% held={} share={} conn={} pend={} tun={} \
         wake n={} p50={} p99={} max={} err={} calls={}",
        f("t_s"),
        f("rss_mib"),
        f("fds"),
        f("threads"),
        f("cpu_pct"),
        f("held_queued"),
        f("held_share"),
        f("connections_open"),
        f("connections_pending"),
        f("gw_tunnels_open"),
        f("wake_n"),
        f("wake_p50_ms"),
        f("wake_p99_ms"),
        f("wake_max_ms"),
        f("wake_errors"),
        f("calls"),
    );
    for e in row.errors.iter().take(3) {
        line.push_str("\n  ! ");
        line.push_str(e);
    }
    line
}

/// `<OUT>.json`: settings, rows, the row after teardown, the load test's report, the summary.
pub(crate) fn write_json(
    s: &Settings,
    rows: &[Row],
    after: Option<&Row>,
    summary: &Value,
    complete: bool,
) {
    let doc = json!({
        "complete": complete,
        "settings": s.json(),
        "rows": rows.iter().map(Row::json).collect::<Vec<_>>(),
        "after_teardown": after.map(Row::json),
        "summary": summary,
    });
    let text = serde_json::to_string_pretty(&doc).expect("soak JSON");
    std::fs::write(s.path(".json"), text).expect("write soak JSON");
}

/// How a series is judged.
#[derive(Clone, Copy)]
enum Rule {
    Memory,
    Live,
    Count,
    Latency,
}

const SERIES: &[(&str, Rule)] = &[
    ("rss_mib", Rule::Memory),
    ("allocated_mib", Rule::Live),
    ("fds", Rule::Count),
    ("threads", Rule::Count),
    ("actors", Rule::Count),
    ("connections_open", Rule::Count),
    ("connections_pending", Rule::Count),
    ("gw_tunnels_open", Rule::Count),
    ("gw_streams_open", Rule::Count),
    ("held_queued", Rule::Count),
    ("map_tunnels", Rule::Count),
    ("map_tunnel_waiters", Rule::Count),
    ("map_wanted", Rule::Count),
    ("map_unknown", Rule::Count),
    ("in_flight", Rule::Count),
    ("agent_rss_max_mib", Rule::Memory),
    ("wake_p50_ms", Rule::Latency),
    ("wake_p99_ms", Rule::Latency),
];

fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.to_vec();
    v.sort_by(f64::total_cmp);
    testkit::stats::percentile(&v, 0.5)
}

/// One series: first, last, min, max, median, trend over the judged rows and the verdict.
fn judge(name: &str, rule: Rule, rows: &[&Row]) -> Value {
    let points: Vec<(f64, f64)> = rows
        .iter()
        .map(|r| (r.get("t_s"), r.get(name)))
        .filter(|(_, y)| y.is_finite())
        .collect();
    if points.len() < 2 {
        return json!({ "verdict": "not measured", "points": points.len() });
    }
    let ys: Vec<f64> = points.iter().map(|(_, y)| *y).collect();
    let (min, max) = ys
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), y| {
            (lo.min(*y), hi.max(*y))
        });
    let med = median(&ys);
    let t = trend(&points);
    let change = t.map_or(0.0, |t| t.change);
    let allowed = match rule {
        Rule::Memory => (0.10 * med).max(8.0),
        Rule::Live => (0.10 * med).max(1.0),
        Rule::Count => 0.05 * max + 2.0,
        Rule::Latency => 0.5 * med + 100.0,
    };
    let flat = change < allowed;
    json!({
        "first": round3(ys[0]),
        "last": round3(ys[ys.len() - 1]),
        "min": round3(min),
        "max": round3(max),
        "median": round3(med),
        "trend_per_hour": round3(t.map_or(0.0, |t| t.slope * 3600.0)),
        "change_over_run": round3(change),
        "allowed_change": round3(allowed),
        "verdict": if flat { "flat" } else { "grows" },
    })
}

/// The summary: every series judged, the wake-ups of the whole run, the held share, what
/// teardown left, and `"ok"` when all of it holds.
pub(crate) fn summary(s: &Settings, rows: &[Row], after: &Row, loadtest: &Value) -> Value {
    let judged: Vec<&Row> = rows
        .iter()
        .filter(|r| r.get("t_s") >= s.warmup as f64)
        .collect();
    let mut series = serde_json::Map::new();
    let mut growing = Vec::new();
    for (name, rule) in SERIES {
        let v = judge(name, *rule, &judged);
        if v["verdict"] == "grows" {
            growing.push((*name).to_owned());
        }
        series.insert((*name).to_owned(), v);
    }
    let total = |name: &str| {
        rows.iter()
            .map(|r| r.get(name))
            .filter(|v| v.is_finite())
            .sum::<f64>()
    };
    let wakes = total("wake_n");
    let wake_errors = total("wake_errors");
    let call_errors = total("call_errors");
    let never_closed = total("never_closed");
    let min_held_share = judged
        .iter()
        .map(|r| r.get("held_share"))
        .filter(|v| v.is_finite())
        .fold(f64::INFINITY, f64::min);
    let held_kept = min_held_share >= 0.5 || s.agents == 0;
    // After teardown only the real agents' environments (stopped) remain.
    let leftovers: Vec<String> = [
        "held_queued",
        "map_tunnel_waiters",
        "map_wanted",
        "in_flight",
        "connections_pending",
    ]
    .iter()
    .filter(|n| after.get(n) > (s.real_agents as f64) + 2.0)
    .map(|n| format!("{n} = {}", after.get(n)))
    .collect();
    let ok = growing.is_empty()
        && wakes > 0.0
        && wake_errors == 0.0
        && call_errors == 0.0
        && held_kept
        && leftovers.is_empty()
        && loadtest.get("failed").is_none();
    json!({
        "ok": ok,
        "growing": growing,
        "wakes": wakes,
        "wake_errors": wake_errors,
        "docker_calls": total("calls"),
        "docker_call_errors": call_errors,
        "tunnels_never_closed": never_closed,
        "tunnels_opened": total("tunnels_opened"),
        "min_held_share": if min_held_share.is_finite() { json!(round3(min_held_share)) } else { Value::Null },
        "left_after_teardown": leftovers,
        "series": series,
        "loadtest": loadtest,
    })
}

/// The summary for the terminal.
pub(crate) fn summary_text(summary: &Value) -> String {
    let mut out = format!(
        "soak {}: {} wake-ups ({} failed), {} Docker calls ({} failed), {} tunnels opened, min held share {}",
        if summary["ok"] == true { "OK" } else { "FAILED" },
        summary["wakes"],
        summary["wake_errors"],
        summary["docker_calls"],
        summary["docker_call_errors"],
        summary["tunnels_opened"],
        summary["min_held_share"],
    );
    if let Some(series) = summary["series"].as_object() {
        for (name, v) in series {
            out.push_str(&format!(
                "\n  {name:<20} {:<12} first {} last {} min {} max {} change {} (allowed {})",
                v["verdict"].as_str().unwrap_or("?"),
                v["first"],
                v["last"],
                v["min"],
                v["max"],
                v["change_over_run"],
                v["allowed_change"],
            ));
        }
    }
    if let Some(left) = summary["left_after_teardown"]
        .as_array()
        .filter(|l| !l.is_empty())
    {
        out.push_str(&format!("\n  left after teardown: {left:?}"));
    }
    out
}
