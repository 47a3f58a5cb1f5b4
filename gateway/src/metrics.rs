//! The gateway's Prometheus series (`edgeplane_gateway_*`), registered into the registry the
//! embedding process serves on `/metrics`. Few label values: results and reasons are fixed
//! sets.

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// Handshake results (label `result` of `edgeplane_gateway_handshakes_total`).
pub(crate) mod result {
    pub const ACCEPTED: &str = "accepted";
    pub const BAD_CREDENTIALS: &str = "bad_credentials";
    pub const MISMATCH: &str = "mismatch";
    pub const UNAVAILABLE: &str = "unavailable";
    pub const NOT_AUTHORIZED: &str = "not_authorized";
    pub const MALFORMED: &str = "malformed";
    pub const TIMEOUT: &str = "timeout";
    pub const TLS_ERROR: &str = "tls_error";
    /// Dropped at once: not admitted (`edgeplane_gateway_connections_refused_total` says why).
    pub const OVERLOADED: &str = "overloaded";
    /// Let go while pending, to make room for a newer connection.
    pub const EVICTED: &str = "evicted";

    pub const ALL: [&str; 10] = [
        ACCEPTED,
        BAD_CREDENTIALS,
        MISMATCH,
        UNAVAILABLE,
        NOT_AUTHORIZED,
        MALFORMED,
        TIMEOUT,
        TLS_ERROR,
        OVERLOADED,
        EVICTED,
    ];
}

/// Handshake kinds (label `kind`): before the hello is read the kind is unknown.
pub(crate) mod kind {
    pub const AGENT: &str = "agent";
    pub const DIAL: &str = "dial";
    pub const UNKNOWN: &str = "unknown";

    pub const ALL: [&str; 3] = [AGENT, DIAL, UNKNOWN];
}

#[derive(Clone)]
pub struct GatewayMetrics {
    pub tunnels_open: IntGauge,
    pub handshakes: IntCounterVec,
    pub dial_sessions_open: IntGauge,
    pub streams_open: IntGauge,
    pub streams: IntCounter,
    pub tunnel_closes: IntCounterVec,
    pub renew_failures: IntCounter,
    /// Connections not admitted, by reason (`crate::admission::Refused::label`).
    pub refused: IntCounterVec,
    /// Connections held now, and those of them that proved nothing yet.
    pub connections_open: IntGauge,
    pub connections_pending: IntGauge,
}

impl GatewayMetrics {
    /// Creates the series and registers them into `registry` (fails if they already are).
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = Self {
            tunnels_open: IntGauge::new(
                "edgeplane_gateway_tunnels_open",
                "Agent tunnels held by this gateway",
            )?,
            handshakes: IntCounterVec::new(
                Opts::new(
                    "edgeplane_gateway_handshakes_total",
                    "Connections to the tunnel listener by kind (agent, dial, unknown) and result",
                ),
                &["kind", "result"],
            )?,
            dial_sessions_open: IntGauge::new(
                "edgeplane_gateway_dial_sessions_open",
                "Dial sessions of control-plane replicas open on this gateway",
            )?,
            streams_open: IntGauge::new(
                "edgeplane_gateway_streams_open",
                "Streams to agents open through this gateway",
            )?,
            streams: IntCounter::new(
                "edgeplane_gateway_streams_total",
                "Streams to agents opened through this gateway",
            )?,
            tunnel_closes: IntCounterVec::new(
                Opts::new(
                    "edgeplane_gateway_tunnel_closes_total",
                    "Tunnels closed, by reason",
                ),
                &["reason"],
            )?,
            renew_failures: IntCounter::new(
                "edgeplane_gateway_lease_renew_failures_total",
                "Lease renewals (tunnel locations or registration) that failed",
            )?,
            refused: IntCounterVec::new(
                Opts::new(
                    "edgeplane_gateway_connections_refused_total",
                    "Connections to the tunnel listener dropped at once by admission, by reason",
                ),
                &["reason"],
            )?,
            connections_open: IntGauge::new(
                "edgeplane_gateway_connections_open",
                "Connections to the tunnel listener held now",
            )?,
            connections_pending: IntGauge::new(
                "edgeplane_gateway_connections_pending",
                "Connections to the tunnel listener that proved nothing yet",
            )?,
        };
        // Every labelled series exists from the start, at 0: an alert on `increase()` sees
        // the first one.
        for k in kind::ALL {
            for r in result::ALL {
                m.handshakes.with_label_values(&[k, r]);
            }
        }
        for r in crate::admission::Refused::ALL {
            m.refused.with_label_values(&[r.label()]);
        }
        for r in crate::server::EndReason::ALL {
            m.tunnel_closes.with_label_values(&[r.label()]);
        }
        registry.register(Box::new(m.tunnels_open.clone()))?;
        registry.register(Box::new(m.refused.clone()))?;
        registry.register(Box::new(m.connections_open.clone()))?;
        registry.register(Box::new(m.connections_pending.clone()))?;
        registry.register(Box::new(m.handshakes.clone()))?;
        registry.register(Box::new(m.dial_sessions_open.clone()))?;
        registry.register(Box::new(m.streams_open.clone()))?;
        registry.register(Box::new(m.streams.clone()))?;
        registry.register(Box::new(m.tunnel_closes.clone()))?;
        registry.register(Box::new(m.renew_failures.clone()))?;
        Ok(m)
    }

    pub(crate) fn refused(&self, reason: &str) {
        self.refused.with_label_values(&[reason]).inc();
    }

    pub(crate) fn handshake(&self, kind: &str, result: &str) {
        self.handshakes.with_label_values(&[kind, result]).inc();
    }
}

/// Increments a gauge now and decrements it when dropped.
pub(crate) struct GaugeGuard(IntGauge);

impl GaugeGuard {
    pub(crate) fn new(gauge: &IntGauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The `process_*` series every Prometheus client library exports (CPU seconds, resident and
/// virtual memory, open and maximum file descriptors, start time), read from `/proc/self` at
/// scrape time, and `edgeplane_build_info{binary, version}` (always 1): both binaries
/// register it into the registry they serve.
pub struct ProcessCollector {
    descs: Vec<prometheus::core::Desc>,
    build_info: prometheus::IntGaugeVec,
}

/// The `process_*` names and their help, in the order [`ProcessCollector`] reports them.
const PROCESS_SERIES: [(&str, &str, prometheus::proto::MetricType); 6] = {
    use prometheus::proto::MetricType::{COUNTER, GAUGE};
    [
        (
            "process_cpu_seconds_total",
            "Total user and system CPU time spent in seconds.",
            COUNTER,
        ),
        (
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
            GAUGE,
        ),
        (
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes.",
            GAUGE,
        ),
        (
            "process_open_fds",
            "Number of open file descriptors.",
            GAUGE,
        ),
        (
            "process_max_fds",
            "Maximum number of open file descriptors.",
            GAUGE,
        ),
        (
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds.",
            GAUGE,
        ),
    ]
};

impl ProcessCollector {
    /// `binary`: the program's name (`control-plane`, `tunnel-gateway`).
    pub fn new(binary: &str) -> Result<Self, prometheus::Error> {
        let descs = PROCESS_SERIES
            .iter()
            .map(|(name, help, _)| {
                prometheus::core::Desc::new(
                    (*name).to_owned(),
                    (*help).to_owned(),
                    vec![],
                    Default::default(),
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        let build_info = prometheus::IntGaugeVec::new(
            Opts::new(
                "edgeplane_build_info",
                "Always 1: the binary and its version (a changed version marks a deploy)",
            ),
            &["binary", "version"],
        )?;
        build_info
            .with_label_values(&[binary, env!("CARGO_PKG_VERSION")])
            .set(1);
        Ok(Self { descs, build_info })
    }

    /// The values of [`PROCESS_SERIES`] now; `None` where `/proc` does not tell (not Linux).
    fn read() -> [Option<f64>; 6] {
        let stat = std::fs::read_to_string("/proc/self/stat").ok();
        let stat = stat.as_deref().and_then(parse_stat);
        let open_fds = std::fs::read_dir("/proc/self/fd")
            .ok()
            .map(|d| d.count() as f64);
        let max_fds = std::fs::read_to_string("/proc/self/limits")
            .ok()
            .and_then(|l| {
                l.lines()
                    .find(|l| l.starts_with("Max open files"))
                    .and_then(|l| l.split_whitespace().nth(3)?.parse::<f64>().ok())
            });
        match stat {
            Some(s) => [
                Some(s.cpu_seconds),
                Some(s.rss_bytes),
                Some(s.vsize_bytes),
                open_fds,
                max_fds,
                Some(s.start_time_seconds),
            ],
            None => [None, None, None, open_fds, max_fds, None],
        }
    }
}

impl prometheus::core::Collector for ProcessCollector {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        let mut d: Vec<_> = self.descs.iter().collect();
        d.extend(self.build_info.desc());
        d
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        let mut out = Vec::with_capacity(PROCESS_SERIES.len() + 1);
        for ((name, help, kind), value) in PROCESS_SERIES.iter().zip(Self::read()) {
            let Some(value) = value else { continue };
            let mut m = prometheus::proto::Metric::default();
            if *kind == prometheus::proto::MetricType::COUNTER {
                let mut c = prometheus::proto::Counter::default();
                c.set_value(value);
                m.set_counter(c);
            } else {
                let mut g = prometheus::proto::Gauge::default();
                g.set_value(value);
                m.set_gauge(g);
            }
            let mut f = prometheus::proto::MetricFamily::default();
            f.set_name((*name).to_owned());
            f.set_help((*help).to_owned());
            f.set_field_type(*kind);
            f.mut_metric().push(m);
            out.push(f);
        }
        out.extend(self.build_info.collect());
        out
    }
}

struct Stat {
    cpu_seconds: f64,
    rss_bytes: f64,
    vsize_bytes: f64,
    start_time_seconds: f64,
}

/// `/proc/self/stat`: fields after the command's closing parenthesis (which may itself
/// contain spaces and parentheses).
fn parse_stat(stat: &str) -> Option<Stat> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After ")": state is field 3 of proc(5), so field n is f[n - 3].
    let num = |n: usize| f.get(n - 3)?.parse::<f64>().ok();
    // Linux reports these in clock ticks and pages; sysconf is not reachable without unsafe
    // code here, and both are these values on every Linux this runs on (x86_64, aarch64 with
    // 4 KiB pages).
    const TICKS: f64 = 100.0;
    const PAGE: f64 = 4096.0;
    let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("btime "))
            .and_then(|v| v.trim().parse::<f64>().ok())
    })?;
    Some(Stat {
        cpu_seconds: (num(14)? + num(15)?) / TICKS,
        vsize_bytes: num(23)?,
        rss_bytes: num(24)? * PAGE,
        start_time_seconds: boot + num(22)? / TICKS,
    })
}

#[cfg(test)]
mod process_tests {
    use super::*;
    use prometheus::core::Collector as _;

    #[test]
    fn the_process_series_are_read_from_proc() {
        let c = ProcessCollector::new("test").expect("collector");
        let families = c.collect();
        let names: Vec<&str> = families.iter().map(|f| f.name()).collect();
        for (name, _, _) in PROCESS_SERIES {
            assert!(names.contains(&name), "{name} in {names:?}");
        }
        assert!(names.contains(&"edgeplane_build_info"));
        let value = |n: &str| {
            let f = families.iter().find(|f| f.name() == n).expect(n);
            let m = &f.get_metric()[0];
            if f.get_field_type() == prometheus::proto::MetricType::COUNTER {
                m.get_counter().get_value()
            } else {
                m.get_gauge().get_value()
            }
        };
        assert!(value("process_resident_memory_bytes") > 1e6);
        assert!(value("process_open_fds") >= 3.0);
        assert!(value("process_max_fds") >= value("process_open_fds"));
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs_f64();
        let start = value("process_start_time_seconds");
        assert!(
            start <= now + 1.0 && start > now - 86_400.0,
            "{start} vs {now}"
        );
    }

    #[test]
    fn a_command_with_parentheses_is_parsed() {
        let line = "42 (a (b) c) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 8 0 1000 123456789 2000 18446744073709551615";
        let s = parse_stat(line).expect("parsed");
        assert_eq!(s.cpu_seconds, 3.0);
        assert_eq!(s.vsize_bytes, 123456789.0);
        assert_eq!(s.rss_bytes, 2000.0 * 4096.0);
    }
}
