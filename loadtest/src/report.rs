//! What a run measured ([`SimResult`], mergeable across worker processes) and the JSON report
//! built from it ([`Report`]). Pure arithmetic, tested without any network.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use base64::Engine as _;
use hdrhistogram::serialization::{Deserializer, Serializer as _, V2Serializer};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Highest latency recorded, in microseconds (one hour); larger values saturate.
const LATENCY_MAX_US: u64 = 3_600_000_000;

/// A latency histogram in microseconds, 3 significant digits.
pub fn new_latency_histogram() -> Histogram<u64> {
    // The bounds are constants that hdrhistogram accepts; fall back to an auto-resizing one
    // rather than panic if that ever changes.
    Histogram::new_with_bounds(1, LATENCY_MAX_US, 3).unwrap_or_else(|_| {
        let mut h = Histogram::new(3).unwrap_or_else(|_| unreachable!("3 sigfig is valid"));
        h.auto(true);
        h
    })
}

/// Serializes a histogram as base64 of the HdrHistogram V2 encoding (what workers send).
pub fn histogram_to_base64(h: &Histogram<u64>) -> Result<String, String> {
    let mut buf = Vec::new();
    V2Serializer::new()
        .serialize(h, &mut buf)
        .map_err(|e| format!("cannot serialize histogram: {e:?}"))?;
    Ok(base64::engine::general_purpose::STANDARD.encode(buf))
}

pub fn histogram_from_base64(text: &str) -> Result<Histogram<u64>, String> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|e| format!("histogram is not base64: {e}"))?;
    let mut h: Histogram<u64> = Deserializer::new()
        .deserialize(&mut bytes.as_slice())
        .map_err(|e| format!("cannot decode histogram: {e:?}"))?;
    h.auto(true);
    Ok(h)
}

/// The raw measurements of one simulation (one process, or several merged).
#[derive(Debug, Clone)]
pub struct SimResult {
    pub agents: u64,
    /// Agents whose last check-in succeeded, at the end.
    pub connected: u64,
    /// Successful check-ins inside the steady window.
    pub polls: u64,
    /// Successful check-ins over the whole run (ramp included).
    pub polls_total: u64,
    /// Failed check-ins over the whole run.
    pub errors: u64,
    pub errors_by_kind: BTreeMap<String, u64>,
    /// Latency of steady-window check-ins, microseconds.
    pub latency_us: Histogram<u64>,
    /// TCP payload bytes of all agents inside the steady window.
    pub steady_bytes_read: u64,
    pub steady_bytes_written: u64,
    /// Sum and count of the handshake bytes of each agent's first connection.
    pub handshake_bytes_sum: u64,
    pub handshakes: u64,
    /// Connections opened after the first one, inside the steady window.
    pub steady_reconnects: u64,
    /// Length of the steady window actually measured, seconds.
    pub steady_secs: f64,
    /// Held check-ins only: steady-window ones answered before their hold was over.
    pub held_early: u64,
    /// Held check-ins only: how long after the end of the expected hold (interval − 250 ms)
    /// each steady-window answer came, microseconds.
    pub hold_overshoot_us: Histogram<u64>,
    /// CPU seconds the simulating process(es) spent inside the steady window.
    pub client_cpu_seconds: Option<f64>,
}

impl SimResult {
    pub fn empty(agents: u64) -> Self {
        Self {
            agents,
            connected: 0,
            polls: 0,
            polls_total: 0,
            errors: 0,
            errors_by_kind: BTreeMap::new(),
            latency_us: new_latency_histogram(),
            steady_bytes_read: 0,
            steady_bytes_written: 0,
            handshake_bytes_sum: 0,
            handshakes: 0,
            steady_reconnects: 0,
            steady_secs: 0.0,
            held_early: 0,
            hold_overshoot_us: new_latency_histogram(),
            client_cpu_seconds: None,
        }
    }

    /// Adds another process's result (same run, another slice of agents).
    pub fn merge(&mut self, other: &SimResult) -> Result<(), String> {
        self.agents += other.agents;
        self.connected += other.connected;
        self.polls += other.polls;
        self.polls_total += other.polls_total;
        self.errors += other.errors;
        for (kind, n) in &other.errors_by_kind {
            *self.errors_by_kind.entry(kind.clone()).or_default() += n;
        }
        self.latency_us.auto(true);
        self.latency_us
            .add(&other.latency_us)
            .map_err(|e| format!("cannot merge histograms: {e:?}"))?;
        self.steady_bytes_read += other.steady_bytes_read;
        self.steady_bytes_written += other.steady_bytes_written;
        self.handshake_bytes_sum += other.handshake_bytes_sum;
        self.handshakes += other.handshakes;
        self.steady_reconnects += other.steady_reconnects;
        // Workers measure the same window; keep the longest so rates are not overstated.
        self.steady_secs = self.steady_secs.max(other.steady_secs);
        self.held_early += other.held_early;
        self.client_cpu_seconds = match (self.client_cpu_seconds, other.client_cpu_seconds) {
            (Some(a), Some(b)) => Some(a + b),
            (a, b) => a.or(b),
        };
        self.hold_overshoot_us.auto(true);
        self.hold_overshoot_us
            .add(&other.hold_overshoot_us)
            .map_err(|e| format!("cannot merge histograms: {e:?}"))?;
        Ok(())
    }

    pub fn to_wire(&self) -> Result<SimResultWire, String> {
        Ok(SimResultWire {
            agents: self.agents,
            connected: self.connected,
            polls: self.polls,
            polls_total: self.polls_total,
            errors: self.errors,
            errors_by_kind: self.errors_by_kind.clone(),
            latency_us_hdr_v2_base64: histogram_to_base64(&self.latency_us)?,
            steady_bytes_read: self.steady_bytes_read,
            steady_bytes_written: self.steady_bytes_written,
            handshake_bytes_sum: self.handshake_bytes_sum,
            handshakes: self.handshakes,
            steady_reconnects: self.steady_reconnects,
            steady_secs: self.steady_secs,
            held_early: self.held_early,
            hold_overshoot_us_hdr_v2_base64: Some(histogram_to_base64(&self.hold_overshoot_us)?),
            client_cpu_seconds: self.client_cpu_seconds,
        })
    }
}

/// [`SimResult`] as a worker process prints it (JSON, histogram in base64 V2).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SimResultWire {
    pub agents: u64,
    pub connected: u64,
    pub polls: u64,
    pub polls_total: u64,
    pub errors: u64,
    pub errors_by_kind: BTreeMap<String, u64>,
    pub latency_us_hdr_v2_base64: String,
    pub steady_bytes_read: u64,
    pub steady_bytes_written: u64,
    pub handshake_bytes_sum: u64,
    pub handshakes: u64,
    pub steady_reconnects: u64,
    pub steady_secs: f64,
    #[serde(default)]
    pub held_early: u64,
    #[serde(default)]
    pub hold_overshoot_us_hdr_v2_base64: Option<String>,
    #[serde(default)]
    pub client_cpu_seconds: Option<f64>,
}

impl SimResultWire {
    pub fn into_result(self) -> Result<SimResult, String> {
        Ok(SimResult {
            agents: self.agents,
            connected: self.connected,
            polls: self.polls,
            polls_total: self.polls_total,
            errors: self.errors,
            errors_by_kind: self.errors_by_kind,
            latency_us: histogram_from_base64(&self.latency_us_hdr_v2_base64)?,
            steady_bytes_read: self.steady_bytes_read,
            steady_bytes_written: self.steady_bytes_written,
            handshake_bytes_sum: self.handshake_bytes_sum,
            handshakes: self.handshakes,
            steady_reconnects: self.steady_reconnects,
            steady_secs: self.steady_secs,
            held_early: self.held_early,
            hold_overshoot_us: match &self.hold_overshoot_us_hdr_v2_base64 {
                Some(text) => histogram_from_base64(text)?,
                None => new_latency_histogram(),
            },
            client_cpu_seconds: self.client_cpu_seconds,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LatencyMs {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

impl LatencyMs {
    pub fn from_histogram(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self {
                p50: 0.0,
                p90: 0.0,
                p99: 0.0,
                p999: 0.0,
                max: 0.0,
                mean: 0.0,
            };
        }
        let ms = |us: u64| round3(us as f64 / 1000.0);
        Self {
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
            mean: round3(h.mean() / 1000.0),
        }
    }
}

/// Figures about the server's processes (summed), when their pids are known.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ServerFacts {
    pub rss_before: Option<u64>,
    pub rss_after: Option<u64>,
    /// CPU seconds (user + system) spent inside the steady window.
    pub cpu_seconds: Option<f64>,
    /// How many processes these figures sum.
    pub processes: usize,
}

/// What the steady window cost the cluster's Redis (`--redis-url`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RedisFacts {
    pub commands_per_sec: f64,
    /// Calls by command inside the window.
    pub commands: BTreeMap<String, u64>,
    /// `used_memory` at the end of the window.
    pub used_memory_bytes: Option<u64>,
}

/// Facts about the run that the simulation does not know.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunFacts {
    pub mode: String,
    /// Held check-ins (`--held`).
    pub held: bool,
    pub interval_secs: u64,
    pub ramp_secs: f64,
    pub create_secs: f64,
    pub workers: u32,
    pub server: ServerFacts,
    pub redis: Option<RedisFacts>,
    pub target: String,
}

/// The JSON report (`--report FILE`). Field names are part of the load-test contract.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub target: String,
    pub mode: String,
    pub agents: u64,
    /// Agents whose last check-in succeeded at the end of the run.
    pub connected_agents: u64,
    /// Successful check-ins inside the steady window.
    pub polls: u64,
    /// Failed check-ins over the whole run (ramp included).
    pub errors: u64,
    pub errors_by_kind: BTreeMap<String, u64>,
    pub polls_per_sec: f64,
    pub poll_latency_ms: LatencyMs,
    /// TCP payload, both directions, steady window, per agent.
    pub bytes_per_agent_per_sec: f64,
    pub bytes_read_per_agent_per_sec: f64,
    pub bytes_written_per_agent_per_sec: f64,
    /// TCP payload of the TLS handshake of an agent's first connection.
    pub handshake_bytes_per_agent: f64,
    pub steady_reconnects: u64,
    pub server_rss_bytes: Option<u64>,
    pub server_rss_bytes_before: Option<u64>,
    pub server_rss_per_agent_bytes: Option<f64>,
    pub server_cpu_seconds: Option<f64>,
    pub polls_per_server_cpu_second: Option<f64>,
    /// CPU seconds the load generator itself (all its processes) spent in the window: on a
    /// machine shared by both sides, what the server could not have.
    #[serde(default)]
    pub client_cpu_seconds: Option<f64>,
    /// Server CPU seconds per 1,000 check-ins in the window.
    #[serde(default)]
    pub server_cpu_seconds_per_1000_polls: Option<f64>,
    /// Server processes whose memory and CPU are summed (`--server-pid a,b,c`).
    #[serde(default)]
    pub server_processes: usize,
    /// The cluster's Redis in the window (`--redis-url`).
    #[serde(default)]
    pub redis: Option<RedisFacts>,
    /// Length of the steady window (after the ramp), seconds.
    pub duration_secs: f64,
    pub ramp_secs: f64,
    pub interval_secs: u64,
    /// Time to create the environments through the admin API, seconds.
    pub create_secs: f64,
    pub workers: u32,
    pub notes: Vec<String>,
    /// Held check-ins (`--held`): agents check in on `/edge/h`, where the server holds an idle
    /// answer for up to the interval minus 250 ms, so `poll_latency_ms` is the time to each
    /// answer, hold included; `hold_overshoot_ms` is the server's latency past the hold.
    #[serde(default)]
    pub held: bool,
    /// With `--held`: how long after the end of the expected hold (interval − 250 ms) the
    /// steady-window answers came.
    #[serde(default)]
    pub hold_overshoot_ms: Option<LatencyMs>,
    /// With `--held`: steady-window held check-ins answered before their hold was over (a
    /// tunnel was wanted, or the server did not hold them). 0 for an idle fleet.
    #[serde(default)]
    pub held_early_answers: Option<u64>,
    /// Edge stacks (`--stacks`, `--stack-at`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stacks: Option<StacksFacts>,
}

/// What the run did with edge stacks.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StacksFacts {
    /// Stacks every agent held through the steady window (`--stacks`).
    pub held_stacks: u32,
    /// Desired-state fetches, stack reports and failures of either (this process's agents;
    /// not counted in worker processes).
    pub fetches: u64,
    pub reports: u64,
    pub errors: u64,
    /// The stack created in the steady window (`--stack-at`).
    pub rollout: Option<StackRolloutFacts>,
}

/// One stack rolled out all at once to every agent of the run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StackRolloutFacts {
    pub targets: u64,
    /// Targets `running` at the end (all, unless it timed out).
    pub running: u64,
    /// From the create call to the last target `running`.
    pub secs_to_all_running: Option<f64>,
    /// The same in check-in intervals.
    pub intervals_to_all_running: Option<f64>,
    /// Server CPU (all its processes) from the create call to all running.
    pub server_cpu_seconds: Option<f64>,
    pub server_cpu_ms_per_environment: Option<f64>,
    /// Redis commands (`--redis-url`) from the create call to all running.
    pub redis_commands: Option<u64>,
    pub redis_commands_per_environment: Option<f64>,
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn ratio(num: f64, den: f64) -> f64 {
    if den > 0.0 {
        round3(num / den)
    } else {
        0.0
    }
}

impl Report {
    pub fn build(sim: &SimResult, facts: &RunFacts) -> Self {
        let agents = sim.agents as f64;
        let secs = sim.steady_secs;
        let per_agent_sec = |bytes: u64| ratio(bytes as f64, agents * secs);
        let server = facts.server;
        let rss_per_agent = match (server.rss_before, server.rss_after) {
            (Some(before), Some(after)) if sim.agents > 0 => {
                Some(round3((after as f64 - before as f64) / agents))
            }
            _ => None,
        };
        let polls_per_cpu = server
            .cpu_seconds
            .filter(|cpu| *cpu > 0.0)
            .map(|cpu| ratio(sim.polls as f64, cpu));
        let mut notes = vec![
            "polls, polls_per_sec, poll_latency_ms and bytes count only the steady window after the ramp; errors count the whole run".to_owned(),
            "bytes are TCP payload (TLS records) in both directions, without TCP/IP headers; handshake_bytes_per_agent is the TLS handshake of each agent's first connection".to_owned(),
        ];
        if facts.held {
            notes.push("held: each agent's first check-in (and the first after an error) is plain, then every check-in is held (/edge/h) and the next one goes out one interval after the previous one was sent; poll_latency_ms is the time to the answer, dominated by the server's hold (interval - 250 ms); hold_overshoot_ms is how long after the end of that hold the answer came; held_early_answers counts held check-ins answered before their hold was over; polls (and polls_per_sec, polls_per_server_cpu_second) count check-ins sent and answered inside the window, so they fall short of the real rate by about hold/duration, while bytes count everything on the wire inside the window; server_rss_bytes is read 300 ms before the end of the window, with the held check-ins pending".to_owned());
        }
        Self {
            target: facts.target.clone(),
            mode: facts.mode.clone(),
            agents: sim.agents,
            connected_agents: sim.connected,
            polls: sim.polls,
            errors: sim.errors,
            errors_by_kind: sim.errors_by_kind.clone(),
            polls_per_sec: ratio(sim.polls as f64, secs),
            poll_latency_ms: LatencyMs::from_histogram(&sim.latency_us),
            bytes_per_agent_per_sec: per_agent_sec(
                sim.steady_bytes_read + sim.steady_bytes_written,
            ),
            bytes_read_per_agent_per_sec: per_agent_sec(sim.steady_bytes_read),
            bytes_written_per_agent_per_sec: per_agent_sec(sim.steady_bytes_written),
            handshake_bytes_per_agent: ratio(sim.handshake_bytes_sum as f64, sim.handshakes as f64),
            steady_reconnects: sim.steady_reconnects,
            server_rss_bytes: server.rss_after,
            server_rss_bytes_before: server.rss_before,
            server_rss_per_agent_bytes: rss_per_agent,
            server_cpu_seconds: server.cpu_seconds.map(round3),
            polls_per_server_cpu_second: polls_per_cpu,
            server_cpu_seconds_per_1000_polls: server
                .cpu_seconds
                .filter(|_| sim.polls > 0)
                .map(|cpu| round3(cpu * 1000.0 / sim.polls as f64)),
            server_processes: server.processes,
            client_cpu_seconds: sim.client_cpu_seconds.map(round3),
            redis: facts.redis.clone(),
            duration_secs: round3(secs),
            ramp_secs: round3(facts.ramp_secs),
            interval_secs: facts.interval_secs,
            create_secs: round3(facts.create_secs),
            workers: facts.workers,
            notes,
            held: facts.held,
            hold_overshoot_ms: facts
                .held
                .then(|| LatencyMs::from_histogram(&sim.hold_overshoot_us)),
            held_early_answers: facts.held.then_some(sim.held_early),
            stacks: None,
        }
    }

    /// A few lines for people.
    pub fn human(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "agents {} (connected {}), interval {} s, steady window {} s after a {} s ramp, {} worker(s)",
            self.agents, self.connected_agents, self.interval_secs, self.duration_secs, self.ramp_secs, self.workers
        );
        let _ = writeln!(
            s,
            "polls {} ({} /s), errors {}{}",
            self.polls,
            self.polls_per_sec,
            self.errors,
            if self.errors_by_kind.is_empty() {
                String::new()
            } else {
                format!(" {:?}", self.errors_by_kind)
            }
        );
        let l = &self.poll_latency_ms;
        let _ = writeln!(s, "latency ms p50 {} p99 {} max {}", l.p50, l.p99, l.max);
        if let Some(o) = &self.hold_overshoot_ms {
            let _ = writeln!(
                s,
                "held check-ins: answered after the hold by ms p50 {} p99 {} max {}; answered early {}",
                o.p50,
                o.p99,
                o.max,
                self.held_early_answers.unwrap_or(0)
            );
        }
        let _ = writeln!(
            s,
            "bytes/agent/s {} (read {}, written {}), handshake bytes/agent {}, reconnects {}",
            self.bytes_per_agent_per_sec,
            self.bytes_read_per_agent_per_sec,
            self.bytes_written_per_agent_per_sec,
            self.handshake_bytes_per_agent,
            self.steady_reconnects
        );
        if let Some(rss) = self.server_rss_bytes {
            let _ = writeln!(
                s,
                "server rss {} MiB (before {} MiB, {} B/agent{}), cpu {} s, polls per cpu-second {}, cpu-s per 1000 polls {}",
                rss / (1 << 20),
                self.server_rss_bytes_before.map_or(0, |b| b / (1 << 20)),
                self.server_rss_per_agent_bytes.unwrap_or(0.0),
                if self.server_processes > 1 {
                    format!(", {} processes", self.server_processes)
                } else {
                    String::new()
                },
                self.server_cpu_seconds.unwrap_or(0.0),
                self.polls_per_server_cpu_second.unwrap_or(0.0),
                self.server_cpu_seconds_per_1000_polls.unwrap_or(0.0)
            );
        }
        if let Some(cpu) = self.client_cpu_seconds {
            let _ = writeln!(s, "load generator cpu {cpu} s in the window");
        }
        if let Some(r) = &self.redis {
            let top: Vec<String> = r.commands.iter().map(|(k, v)| format!("{k} {v}")).collect();
            let _ = writeln!(
                s,
                "redis {:.1} commands/s ({}), used memory {} MiB",
                r.commands_per_sec,
                top.join(", "),
                r.used_memory_bytes.map_or(0, |b| b / (1 << 20))
            );
        }
        let _ = write!(s, "environments created in {} s", self.create_secs);
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sim_with(latencies_ms: &[u64]) -> SimResult {
        let mut s = SimResult::empty(10);
        for ms in latencies_ms {
            s.latency_us.record(ms * 1000).unwrap();
        }
        s.polls = latencies_ms.len() as u64;
        s
    }

    #[test]
    fn percentiles() {
        let sim = sim_with(&(1..=100).collect::<Vec<_>>());
        let l = LatencyMs::from_histogram(&sim.latency_us);
        assert!((l.p50 - 50.0).abs() < 0.1, "{l:?}");
        assert!((l.p99 - 99.0).abs() < 0.1, "{l:?}");
        assert!((l.max - 100.0).abs() < 0.1, "{l:?}");
        assert!((l.mean - 50.5).abs() < 0.1, "{l:?}");
    }

    #[test]
    fn empty_histogram_reports_zeros() {
        let l = LatencyMs::from_histogram(&new_latency_histogram());
        assert_eq!(l.p99, 0.0);
        assert_eq!(l.max, 0.0);
    }

    #[test]
    fn merge_adds_counts_and_histograms() {
        let mut a = sim_with(&[1, 2, 3]);
        a.errors = 2;
        a.errors_by_kind.insert("timeout".into(), 2);
        a.steady_bytes_read = 100;
        a.handshake_bytes_sum = 3000;
        a.handshakes = 10;
        a.steady_secs = 10.0;
        let mut b = sim_with(&[100]);
        b.errors = 1;
        b.errors_by_kind.insert("timeout".into(), 1);
        b.errors_by_kind.insert("busy".into(), 1);
        b.steady_bytes_written = 50;
        b.handshake_bytes_sum = 3300;
        b.handshakes = 10;
        b.steady_secs = 10.5;
        a.merge(&b).unwrap();
        assert_eq!(a.agents, 20);
        assert_eq!(a.polls, 4);
        assert_eq!(a.errors, 3);
        assert_eq!(a.errors_by_kind["timeout"], 3);
        assert_eq!(a.errors_by_kind["busy"], 1);
        assert_eq!(a.latency_us.len(), 4);
        assert!((a.latency_us.max() as f64 - 100_000.0).abs() < 100.0);
        assert_eq!(a.steady_bytes_read + a.steady_bytes_written, 150);
        assert_eq!(a.steady_secs, 10.5);
        let r = Report::build(&a, &RunFacts::default());
        assert_eq!(r.handshake_bytes_per_agent, 315.0);
    }

    #[test]
    fn histogram_survives_the_wire() {
        let mut s = sim_with(&[5, 7, 250, 4000]);
        s.errors_by_kind.insert("connect".into(), 4);
        let json = serde_json::to_string(&s.to_wire().unwrap()).unwrap();
        let back: SimResultWire = serde_json::from_str(&json).unwrap();
        let back = back.into_result().unwrap();
        assert_eq!(back.latency_us.len(), 4);
        assert_eq!(
            back.latency_us.value_at_quantile(0.5),
            s.latency_us.value_at_quantile(0.5)
        );
        assert_eq!(back.latency_us.max(), s.latency_us.max());
        assert_eq!(back.errors_by_kind, s.errors_by_kind);
        assert!(histogram_from_base64("not base64!").is_err());
        assert!(histogram_from_base64("AAAA").is_err());
    }

    #[test]
    fn per_agent_figures() {
        let mut sim = sim_with(&[1; 200]);
        sim.agents = 100;
        sim.polls = 200;
        sim.steady_secs = 10.0;
        sim.steady_bytes_read = 40_000;
        sim.steady_bytes_written = 60_000;
        let facts = RunFacts {
            server: ServerFacts {
                rss_before: Some(10_000_000),
                rss_after: Some(12_000_000),
                cpu_seconds: Some(0.5),
                processes: 1,
            },
            interval_secs: 5,
            ..RunFacts::default()
        };
        let r = Report::build(&sim, &facts);
        assert_eq!(r.polls_per_sec, 20.0);
        assert_eq!(r.bytes_per_agent_per_sec, 100.0);
        assert_eq!(r.bytes_read_per_agent_per_sec, 40.0);
        assert_eq!(r.bytes_written_per_agent_per_sec, 60.0);
        assert_eq!(r.server_rss_per_agent_bytes, Some(20_000.0));
        assert_eq!(r.polls_per_server_cpu_second, Some(400.0));
        assert_eq!(r.server_cpu_seconds_per_1000_polls, Some(2.5));
        assert_eq!(r.server_rss_bytes, Some(12_000_000));

        // Unknown server: no server figures, and no division by zero anywhere.
        let r = Report::build(&SimResult::empty(0), &RunFacts::default());
        assert_eq!(r.server_rss_per_agent_bytes, None);
        assert_eq!(r.polls_per_server_cpu_second, None);
        assert_eq!(r.bytes_per_agent_per_sec, 0.0);
        assert_eq!(r.polls_per_sec, 0.0);
    }

    #[test]
    fn held_figures_are_reported_merged_and_sent_by_workers() {
        let mut a = sim_with(&[4750, 4751]);
        a.hold_overshoot_us.record(1_000).unwrap();
        a.hold_overshoot_us.record(2_000).unwrap();
        let mut b = sim_with(&[4752]);
        b.held_early = 1;
        b.hold_overshoot_us.record(40_000).unwrap();
        let b = b.to_wire().unwrap();
        let b: SimResultWire = serde_json::from_str(&serde_json::to_string(&b).unwrap()).unwrap();
        a.merge(&b.into_result().unwrap()).unwrap();
        assert_eq!(a.held_early, 1);
        assert_eq!(a.hold_overshoot_us.len(), 3);

        let held = RunFacts {
            held: true,
            ..RunFacts::default()
        };
        let r = Report::build(&a, &held);
        assert!(r.held);
        assert_eq!(r.held_early_answers, Some(1));
        let over = r.hold_overshoot_ms.unwrap();
        assert!((over.max - 40.0).abs() < 0.1, "{over:?}");
        assert!(r.notes.iter().any(|n| n.starts_with("held:")));
        assert!(r.human().contains("held check-ins"));

        // Plain runs: no held figures, and the report says so.
        let r = Report::build(&a, &RunFacts::default());
        assert!(!r.held);
        assert_eq!(r.held_early_answers, None);
        assert_eq!(r.hold_overshoot_ms, None);
        assert!(!r.human().contains("held check-ins"));

        // A worker line or report from before `--held` still reads.
        let mut old = serde_json::to_value(a.to_wire().unwrap()).unwrap();
        let obj = old.as_object_mut().unwrap();
        obj.remove("held_early");
        obj.remove("hold_overshoot_us_hdr_v2_base64");
        let back: SimResultWire = serde_json::from_value(old).unwrap();
        let back = back.into_result().unwrap();
        assert_eq!(back.held_early, 0);
        assert!(back.hold_overshoot_us.is_empty());
        let mut report = serde_json::to_value(&r).unwrap();
        let obj = report.as_object_mut().unwrap();
        for f in ["held", "hold_overshoot_ms", "held_early_answers"] {
            obj.remove(f);
        }
        let back: Report = serde_json::from_value(report).unwrap();
        assert!(!back.held);
    }

    #[test]
    fn json_has_the_contract_fields() {
        let r = Report::build(&sim_with(&[1, 2]), &RunFacts::default());
        let v = serde_json::to_value(&r).unwrap();
        for field in [
            "agents",
            "polls",
            "errors",
            "errors_by_kind",
            "polls_per_sec",
            "bytes_per_agent_per_sec",
            "handshake_bytes_per_agent",
            "server_rss_bytes",
            "server_rss_bytes_before",
            "server_rss_per_agent_bytes",
            "server_cpu_seconds",
            "polls_per_server_cpu_second",
            "duration_secs",
            "interval_secs",
            "create_secs",
            "held",
        ] {
            assert!(v.get(field).is_some(), "missing {field}");
        }
        for q in ["p50", "p99", "max"] {
            assert!(v["poll_latency_ms"].get(q).is_some(), "missing {q}");
        }
        assert!(!r.human().is_empty());
    }
}
