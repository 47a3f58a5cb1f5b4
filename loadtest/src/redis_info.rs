//! The Redis of a cluster under test (`--redis-url`): `INFO commandstats` and `INFO memory`
//! read at the start and the end of the steady window, so the report says what the fleet's
//! steady state costs Redis: commands per second, by command, and the memory it holds.

use std::collections::BTreeMap;

use anyhow::Context as _;
use tokio::time::Instant;

use crate::report::RedisFacts;

/// A connection to the Redis under test.
pub struct RedisInfo {
    conn: redis::aio::MultiplexedConnection,
}

impl RedisInfo {
    pub async fn connect(url: &str) -> anyhow::Result<Self> {
        let client = redis::Client::open(url).context("--redis-url")?;
        let conn = client
            .get_multiplexed_async_connection()
            .await
            .context("cannot connect to --redis-url")?;
        Ok(Self { conn })
    }

    /// Calls of each command so far.
    pub async fn calls(&mut self) -> anyhow::Result<BTreeMap<String, u64>> {
        let text: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut self.conn)
            .await?;
        Ok(parse_commandstats(&text))
    }

    async fn used_memory(&mut self) -> anyhow::Result<Option<u64>> {
        let text: String = redis::cmd("INFO")
            .arg("memory")
            .query_async(&mut self.conn)
            .await?;
        Ok(info_field(&text, "used_memory"))
    }

    /// Samples at `start` and `end`: the commands run in between, and the memory at `end`.
    pub async fn sample(mut self, start: Instant, end: Instant) -> anyhow::Result<RedisFacts> {
        tokio::time::sleep_until(start).await;
        let before = self.calls().await?;
        let at = Instant::now();
        tokio::time::sleep_until(end).await;
        let after = self.calls().await?;
        let secs = at.elapsed().as_secs_f64();
        let used_memory_bytes = self.used_memory().await?;
        let commands: BTreeMap<String, u64> = after
            .iter()
            .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0).min(*v)))
            .filter(|(_, n)| *n > 0)
            .collect();
        let total: u64 = commands.values().sum();
        Ok(RedisFacts {
            commands_per_sec: if secs > 0.0 { total as f64 / secs } else { 0.0 },
            commands,
            used_memory_bytes,
        })
    }
}

/// `cmdstat_<name>:calls=<n>,...` lines into calls by command.
fn parse_commandstats(text: &str) -> BTreeMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let (name, rest) = l.trim().strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest
                .split(',')
                .find_map(|kv| kv.strip_prefix("calls="))?
                .parse()
                .ok()?;
            Some((name.to_owned(), calls))
        })
        .collect()
}

/// A `name:value` field of `INFO`'s text.
fn info_field(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.trim().strip_prefix(name)?.strip_prefix(':'))
        .and_then(|v| v.parse().ok())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn info_text_is_read_by_field() {
        let stats = "# Commandstats\r\ncmdstat_evalsha:calls=45,usec=900,usec_per_call=20.00,rejected_calls=0,failed_calls=0\r\ncmdstat_ping:calls=3,usec=1\r\nnot a stat\r\n";
        let got = parse_commandstats(stats);
        assert_eq!(got.get("evalsha"), Some(&45));
        assert_eq!(got.get("ping"), Some(&3));
        assert_eq!(got.len(), 2);
        let mem =
            "# Memory\r\nused_memory:1048576\r\nused_memory_human:1.00M\r\nused_memory_rss:2\r\n";
        assert_eq!(info_field(mem, "used_memory"), Some(1_048_576));
        assert_eq!(info_field(mem, "used_memory_peak"), None);
    }
}
