//! Per-environment counters seen at this replica (check-ins answered and refused, the last
//! one, the last heartbeat written behind), and their sharded exposition on
//! `/metrics/agents`. The fleet counts into them; the heartbeat write-behind drains them.

use std::fmt::Write as _;

use dashmap::DashMap;
use store::EnvId;

/// Per-environment counters seen at this replica.
#[derive(Clone, Copy, Debug, Default)]
pub struct AgentStat {
    pub last_checkin_ms: u64,
    /// Last heartbeat written to the store.
    pub flushed_ms: u64,
    pub checkins: u64,
    pub refused: u64,
}

#[derive(Default)]
pub struct AgentStats {
    map: DashMap<EnvId, AgentStat>,
}

impl AgentStats {
    pub(crate) fn answered(&self, id: EnvId, now_ms: u64) {
        let mut s = self.map.entry(id).or_default();
        s.last_checkin_ms = s.last_checkin_ms.max(now_ms);
        s.checkins += 1;
    }

    pub(crate) fn refused(&self, id: EnvId) {
        self.map.entry(id).or_default().refused += 1;
    }

    pub fn last_checkin_ms(&self, id: EnvId) -> Option<u64> {
        self.map
            .get(&id)
            .map(|s| s.last_checkin_ms)
            .filter(|&t| t > 0)
    }

    /// The last check-in seen here (0 if only refused ones were), for the idle sweep.
    pub(crate) fn last_seen_ms(&self, id: EnvId) -> Option<u64> {
        self.map.get(&id).map(|s| s.last_checkin_ms)
    }

    pub fn forget(&self, id: EnvId) {
        self.map.remove(&id);
    }

    /// (environments seen, environments seen within `window_ms`).
    pub fn counts(&self, now_ms: u64, window_ms: u64) -> (usize, usize) {
        let recent = self
            .map
            .iter()
            .filter(|s| s.last_checkin_ms + window_ms >= now_ms)
            .count();
        (self.map.len(), recent)
    }

    pub fn shard(&self, shard: u64, shards: u64) -> Vec<(EnvId, AgentStat)> {
        self.map
            .iter()
            .filter(|e| e.key() % shards.max(1) == shard)
            .map(|e| (*e.key(), *e.value()))
            .collect()
    }

    /// Heartbeats not yet written, marking them written. Restored by [`Self::unflush`]
    /// if the write fails.
    pub(crate) fn take_dirty(&self) -> Vec<(EnvId, u64)> {
        let mut out = Vec::new();
        for mut e in self.map.iter_mut() {
            if e.last_checkin_ms > e.flushed_ms {
                e.flushed_ms = e.last_checkin_ms;
                out.push((*e.key(), e.last_checkin_ms));
            }
        }
        out
    }

    pub(crate) fn unflush(&self, beats: &[(EnvId, u64)]) {
        for (id, _) in beats {
            if let Some(mut s) = self.map.get_mut(id) {
                s.flushed_ms = 0;
            }
        }
    }
}

/// Per-agent series of one shard, in the Prometheus text format.
pub fn render_agents(stats: &AgentStats, shard: u64, shards: u64) -> String {
    let mut rows = stats.shard(shard, shards);
    rows.sort_unstable_by_key(|(id, _)| *id);
    let mut text = String::with_capacity(64 + rows.len() * 200);
    let families: [(&str, &str, &str); 3] = [
        (
            "edgeplane_agent_checkins_total",
            "counter",
            "Check-ins answered, per environment",
        ),
        (
            "edgeplane_agent_refused_total",
            "counter",
            "Check-ins refused, per environment",
        ),
        (
            "edgeplane_agent_last_checkin_timestamp_seconds",
            "gauge",
            "Unix time of the last answered check-in, per environment",
        ),
    ];
    for (i, (name, kind, help)) in families.iter().enumerate() {
        let _ = writeln!(text, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (id, s) in &rows {
            let value = match i {
                0 => s.checkins as f64,
                1 => s.refused as f64,
                _ => s.last_checkin_ms as f64 / 1000.0,
            };
            let _ = writeln!(text, "{name}{{endpoint=\"{id}\"}} {value}");
        }
    }
    text
}
