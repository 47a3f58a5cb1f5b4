//! The admin REST API calls the load test needs: bulk-create environments, delete them.

use std::time::Duration;

use anyhow::{bail, Context as _};
use futures_util::stream::{self, StreamExt as _};
use serde::{Deserialize, Serialize};

/// The control plane accepts at most this many environments per bulk call.
pub const BULK_LIMIT: usize = 1000;
/// Deletions in flight at once.
pub const DELETE_CONCURRENCY: usize = 32;

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct NewEnvironment<'a> {
    name: &'a str,
    checkin_interval: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    mode: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ping_interval: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    snapshot_interval: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    command_interval: Option<u64>,
}

/// The fields of a created environment the load test uses.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreatedEnvironment {
    pub id: u64,
    pub edge_key: String,
}

#[derive(Debug, Clone)]
pub struct AdminClient {
    http: reqwest::Client,
    target: String,
    api_key: String,
}

impl AdminClient {
    /// `insecure`: accept any certificate (a self-signed control plane); otherwise the
    /// certificate must be publicly trusted.
    pub fn new(target: &str, api_key: &str, insecure: bool) -> anyhow::Result<Self> {
        // Reuse the agent's verifier: insecure accepts anything, otherwise webpki roots.
        let tls = edge_agent::tls::client_config([0; 32], insecure)?;
        let http = reqwest::Client::builder()
            .use_preconfigured_tls((*tls).clone())
            .timeout(Duration::from_secs(120))
            .build()
            .context("cannot build the admin HTTP client")?;
        Ok(Self {
            http,
            target: target.trim_end_matches('/').to_owned(),
            api_key: api_key.to_owned(),
        })
    }

    /// Creates `names.len()` environments, [`BULK_LIMIT`] per call, in order.
    pub async fn create(
        &self,
        names: &[String],
        interval_secs: u64,
        async_mode: bool,
        mut progress: impl FnMut(usize),
    ) -> anyhow::Result<Vec<CreatedEnvironment>> {
        let mut out = Vec::with_capacity(names.len());
        for chunk in names.chunks(BULK_LIMIT) {
            let body: Vec<NewEnvironment<'_>> = chunk
                .iter()
                .map(|name| {
                    let async_interval = async_mode.then_some(interval_secs);
                    NewEnvironment {
                        name,
                        checkin_interval: interval_secs,
                        mode: async_mode.then_some("async"),
                        ping_interval: async_interval,
                        snapshot_interval: async_interval,
                        command_interval: async_interval,
                    }
                })
                .collect();
            let url = format!("{}/api/endpoints/bulk", self.target);
            let resp = self
                .http
                .post(&url)
                .header("X-API-Key", &self.api_key)
                .json(&body)
                .send()
                .await
                .with_context(|| format!("POST {url}"))?;
            let status = resp.status();
            if status.as_u16() != 201 && !status.is_success() {
                let text = resp.text().await.unwrap_or_default();
                bail!("POST {url} answered {status}: {}", short(&text));
            }
            let created: Vec<CreatedEnvironment> = resp.json().await.with_context(|| {
                format!("POST {url}: answer is not a JSON array of environments")
            })?;
            if created.len() != chunk.len() {
                bail!(
                    "POST {url} created {} environments, asked for {}",
                    created.len(),
                    chunk.len()
                );
            }
            out.extend(created);
            progress(out.len());
        }
        Ok(out)
    }

    /// Deletes environments, [`DELETE_CONCURRENCY`] at a time. Returns how many failed.
    pub async fn delete(&self, ids: &[u64]) -> usize {
        stream::iter(ids.iter().copied())
            .map(|id| async move {
                let url = format!("{}/api/endpoints/{id}", self.target);
                match self
                    .http
                    .delete(&url)
                    .header("X-API-Key", &self.api_key)
                    .send()
                    .await
                {
                    Ok(r) if r.status().is_success() => true,
                    Ok(r) => {
                        tracing::warn!(id, status = %r.status(), "cannot delete environment");
                        false
                    }
                    Err(e) => {
                        tracing::warn!(id, error = %e, "cannot delete environment");
                        false
                    }
                }
            })
            .buffer_unordered(DELETE_CONCURRENCY)
            .filter(|ok| std::future::ready(!ok))
            .count()
            .await
    }
}

impl AdminClient {
    async fn post_json(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> anyhow::Result<serde_json::Value> {
        let url = format!("{}{path}", self.target);
        let resp = self
            .http
            .post(&url)
            .header("X-API-Key", &self.api_key)
            .json(body)
            .send()
            .await
            .with_context(|| format!("POST {url}"))?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        if !status.is_success() {
            bail!("POST {url} answered {status}: {}", short(&text));
        }
        serde_json::from_str(&text).with_context(|| format!("POST {url}: answer is not JSON"))
    }

    /// A static edge group of `ids`: its id.
    pub async fn create_group(&self, name: &str, ids: &[u64]) -> anyhow::Result<u64> {
        let v = self
            .post_json(
                "/api/edge_groups",
                &serde_json::json!({"name": name, "dynamic": false, "environmentIds": ids}),
            )
            .await?;
        v["id"].as_u64().context("edge group answer without an id")
    }

    /// An edge stack of one small service for `group`: its id.
    pub async fn create_stack(&self, name: &str, group: u64) -> anyhow::Result<u64> {
        let compose = "services:\n  app:\n    image: registry.local/kiosk:1.0\n    restart: unless-stopped\n    environment:\n      DEVICE: ${EDGE_ENV_NAME}\n";
        let v = self
            .post_json(
                "/api/edge_stacks",
                &serde_json::json!({"name": name, "compose": compose, "edgeGroupIds": [group]}),
            )
            .await?;
        v["id"].as_u64().context("edge stack answer without an id")
    }

    /// A stack's targets and how many of them run its rollout's version.
    pub async fn stack_running(&self, id: u64) -> anyhow::Result<(u64, u64)> {
        let url = format!("{}/api/edge_stacks/{id}", self.target);
        let v: serde_json::Value = self
            .http
            .get(&url)
            .header("X-API-Key", &self.api_key)
            .send()
            .await
            .with_context(|| format!("GET {url}"))?
            .json()
            .await
            .with_context(|| format!("GET {url}: answer is not JSON"))?;
        Ok((
            v["targets"].as_u64().unwrap_or(0),
            v["counts"]["running"].as_u64().unwrap_or(0),
        ))
    }

    /// Deletes stacks, then a group (best effort).
    pub async fn delete_stacks(&self, stacks: &[u64], group: Option<u64>) {
        for id in stacks {
            let _ = self
                .http
                .delete(format!("{}/api/edge_stacks/{id}", self.target))
                .header("X-API-Key", &self.api_key)
                .send()
                .await;
        }
        if let Some(g) = group {
            let _ = self
                .http
                .delete(format!("{}/api/edge_groups/{g}", self.target))
                .header("X-API-Key", &self.api_key)
                .send()
                .await;
        }
    }
}

fn short(text: &str) -> String {
    text.chars().take(300).collect()
}
