//! One row of the time series: the control plane from `/proc` and `/metrics`, the real
//! agents' memory, and the wake-ups of the window.

use testkit::api::{allocator_bytes, metric_delta, metric_sum};
use testkit::bench::{cpu_seconds, open_fds, rss_bytes, threads};
use testkit::stats::{percentile, round3};

use super::wake::Wakes;
use super::*;

/// Named values in a fixed order (the CSV's columns); NaN where nothing was measured.
#[derive(Clone, Debug, Default)]
pub(crate) struct Row {
    pub(crate) values: Vec<(&'static str, f64)>,
    /// What failed in the window (wake-ups, Docker calls, tunnels that stayed open, scrapes).
    pub(crate) errors: Vec<String>,
}

impl Row {
    fn put(&mut self, name: &'static str, v: f64) {
        self.values.push((name, v));
    }

    pub(crate) fn get(&self, name: &str) -> f64 {
        self.values
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(f64::NAN, |(_, v)| *v)
    }

    pub(crate) fn json(&self) -> Value {
        let mut m: serde_json::Map<String, Value> = self
            .values
            .iter()
            .map(|(n, v)| {
                let v = if v.is_finite() {
                    json!(round3(*v))
                } else {
                    Value::Null
                };
                ((*n).to_owned(), v)
            })
            .collect();
        m.insert("errors".into(), json!(self.errors));
        Value::Object(m)
    }
}

/// Gauges read as they are: (column, metric sample name).
const GAUGES: &[(&str, &str)] = &[
    ("actors", "edgeplane_fleet_actors"),
    ("agents_recent", "edgeplane_fleet_agents_recent"),
    ("connections_open", "edgeplane_connections_open"),
    ("connections_pending", "edgeplane_connections_pending"),
    ("gw_tunnels_open", "edgeplane_gateway_tunnels_open"),
    ("gw_streams_open", "edgeplane_gateway_streams_open"),
    ("gw_connections_open", "edgeplane_gateway_connections_open"),
    ("held_queued", "edgeplane_fleet_held_checkins"),
    ("map_tunnels", "edgeplane_fleet_entries{map=\"tunnels\"}"),
    (
        "map_tunnel_waiters",
        "edgeplane_fleet_entries{map=\"tunnel_waiters\"}",
    ),
    ("map_wanted", "edgeplane_fleet_entries{map=\"wanted\"}"),
    ("map_unknown", "edgeplane_fleet_entries{map=\"unknown\"}"),
    ("in_flight", "edgeplane_fleet_checkins_in_flight"),
];

/// Counters as counts per window: (column, prefix of the samples summed).
const COUNTS: &[(&str, &str)] = &[
    (
        "tunnels_opened",
        "edgeplane_gateway_handshakes_total{kind=\"agent\",result=\"accepted\"}",
    ),
    ("tunnels_closed", "edgeplane_gateway_tunnel_closes_total"),
    (
        "docker_2xx",
        "edgeplane_docker_proxy_requests_total{class=\"2xx\"}",
    ),
    ("docker_all", "edgeplane_docker_proxy_requests_total"),
    ("tunnel_waits", "edgeplane_tunnel_wait_seconds_count"),
    ("store_errors", "edgeplane_store_errors_total"),
    ("conn_refused", "edgeplane_api_connections_refused_total"),
    (
        "conn_timed_out",
        "edgeplane_api_connections_timed_out_total",
    ),
    ("conn_evicted", "edgeplane_connections_evicted_total"),
    (
        "gw_renew_failures",
        "edgeplane_gateway_lease_renew_failures_total",
    ),
];

const CHECKINS: &str = "edgeplane_checkin_requests_total";

pub(crate) struct Sampler {
    api: reqwest::Client,
    metrics_url: String,
    pid: u32,
    agents: Vec<u32>,
    before: Samples,
    at: Instant,
    cpu: f64,
}

impl Sampler {
    pub(crate) fn new(_s: &Settings, cp: &CpProcess, agents: Vec<u32>) -> Self {
        Self {
            api: http_with_timeout(Duration::from_secs(20)),
            metrics_url: cp.metrics_url.clone(),
            pid: cp.pid(),
            agents,
            before: Samples::new(),
            at: Instant::now(),
            cpu: 0.0,
        }
    }

    /// The counters and CPU time the first window starts from.
    pub(crate) async fn start(&mut self) {
        self.before = try_metric_samples(&self.api, &self.metrics_url)
            .await
            .unwrap_or_default();
        self.at = Instant::now();
        self.cpu = cpu_seconds(self.pid).unwrap_or(f64::NAN);
    }

    /// A row at `t_s` seconds; `wakes` are the probes' results of the window (none after the
    /// run).
    pub(crate) async fn row(&mut self, t_s: f64, wakes: Option<&Wakes>) -> Row {
        let mut row = Row::default();
        let now = Instant::now();
        let dt = now.duration_since(self.at).as_secs_f64().max(1e-3);
        let mib = |b: Option<u64>| b.map_or(f64::NAN, |b| b as f64 / (1024.0 * 1024.0));
        let num = |n: Option<usize>| n.map_or(f64::NAN, |n| n as f64);
        row.put("t_s", t_s);
        row.put("rss_mib", mib(rss_bytes(self.pid)));
        row.put("fds", num(open_fds(self.pid)));
        row.put("threads", num(threads(self.pid)));
        let cpu = cpu_seconds(self.pid).unwrap_or(f64::NAN);
        row.put("cpu_pct", (cpu - self.cpu) / dt * 100.0);
        row.put("cpu_s", cpu);
        let agent_rss: Vec<f64> = self.agents.iter().map(|&p| mib(rss_bytes(p))).collect();
        row.put(
            "agent_rss_max_mib",
            agent_rss.iter().copied().fold(f64::NAN, f64::max),
        );

        let m = match try_metric_samples(&self.api, &self.metrics_url).await {
            Ok(m) => m,
            Err(e) => {
                row.errors.push(format!("scrape: {e}"));
                Samples::new()
            }
        };
        for (col, name) in GAUGES {
            row.put(col, m.get(*name).copied().unwrap_or(f64::NAN));
        }
        // What the program holds against what the allocator keeps resident.
        let allocator = allocator_bytes(&m);
        for (col, kind) in [
            ("allocated_mib", "allocated"),
            ("allocator_resident_mib", "resident"),
        ] {
            let bytes = allocator.get(kind);
            row.put(col, bytes.map_or(f64::NAN, |b| b / (1024.0 * 1024.0)));
        }
        // Check-ins by result, per second over the window; `held_share` is the held part of
        // the check-ins not answered with credentials (the old defect: holds stopped being held).
        let checkins = metric_delta(&self.before, &m, CHECKINS);
        let result = |r: &str| metric_sum(&checkins, &format!("{CHECKINS}{{result=\"{r}\"}}"));
        let (held, idle, required) = (result("held"), result("idle"), result("required"));
        let all = metric_sum(&checkins, CHECKINS);
        row.put("held_per_s", held / dt);
        row.put("idle_per_s", idle / dt);
        row.put("required_per_s", required / dt);
        row.put("other_results", all - held - idle - required);
        row.put("held_share", held / (held + idle).max(1.0));
        for (col, prefix) in COUNTS {
            row.put(
                col,
                metric_sum(&metric_delta(&self.before, &m, prefix), prefix),
            );
        }
        let wait = metric_delta(&self.before, &m, "edgeplane_tunnel_wait_seconds");
        let waits = metric_sum(&wait, "edgeplane_tunnel_wait_seconds_count");
        row.put(
            "tunnel_wait_mean_ms",
            metric_sum(&wait, "edgeplane_tunnel_wait_seconds_sum") / waits.max(1.0) * 1000.0,
        );

        if let Some(w) = wakes {
            let mut ok: Vec<f64> = w
                .wakes
                .iter()
                .filter(|x| x.error.is_none())
                .map(|x| x.ms)
                .collect();
            ok.sort_by(f64::total_cmp);
            row.put("wake_n", w.wakes.len() as f64);
            row.put("wake_errors", (w.wakes.len() - ok.len()) as f64);
            row.put("wake_p50_ms", percentile(&ok, 0.50));
            row.put("wake_p90_ms", percentile(&ok, 0.90));
            row.put("wake_p99_ms", percentile(&ok, 0.99));
            row.put("wake_max_ms", ok.last().copied().unwrap_or(f64::NAN));
            row.put("calls", w.calls as f64);
            row.put("call_errors", w.call_errors.len() as f64);
            row.put("never_closed", w.never_closed.len() as f64);
            row.errors.extend(
                w.wakes
                    .iter()
                    .filter_map(|x| {
                        let e = x.error.as_ref()?;
                        Some(format!(
                            "wake env {} at {:.1} s: {e} after {:.0} ms",
                            x.env, x.at_s, x.ms
                        ))
                    })
                    .chain(w.call_errors.iter().cloned())
                    .chain(w.never_closed.iter().cloned()),
            );
        }
        if !m.is_empty() {
            self.before = m;
        }
        self.at = now;
        self.cpu = cpu;
        row
    }
}
