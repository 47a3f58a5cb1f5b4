//! Snapshots of an agent's engine: what runs there, normalised and sorted so that an unchanged
//! engine gives an identical snapshot (and identical bytes).
//!
//! On the wire a snapshot travels as [`SnapshotUpload`] inside a signed frame (see
//! [`crate::proof`]) to [`SNAPSHOT_PATH`]; its body is the codec frame of a [`Snapshot`],
//! compressed with zstd ([`compress`] / [`decompress`], both bounded). The control plane keeps
//! the latest one per environment and serves it as JSON.

use std::collections::BTreeMap;
use std::io::Read;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::codec::{self, CodecError};

/// Route an agent posts snapshots to.
pub const SNAPSHOT_PATH: &str = "/edge/s";
/// Largest signed upload frame accepted (compressed).
pub const MAX_UPLOAD_FRAME: usize = 1024 * 1024;
/// Largest snapshot once decompressed.
pub const MAX_SNAPSHOT_BYTES: usize = 16 * 1024 * 1024;
const ZSTD_LEVEL: i32 = 3;

/// An engine's state at one instant.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Snapshot {
    /// When the agent took it, ms since the Unix epoch (agent clock, server-corrected).
    pub taken_ms: u64,
    pub engine: EngineInfo,
    /// Sorted by id.
    pub containers: Vec<Container>,
    /// Sorted by id.
    pub images: Vec<Image>,
    /// Sorted by name.
    pub volumes: Vec<Volume>,
    /// Sorted by name.
    pub networks: Vec<Network>,
    /// Compose stacks recognised by their labels, sorted by name.
    pub stacks: Vec<Stack>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EngineInfo {
    pub name: String,
    pub version: String,
    pub api_version: String,
    pub os: String,
    pub arch: String,
    pub kernel_version: String,
    pub cpus: u32,
    pub memory_bytes: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Container {
    pub id: String,
    /// Without the leading `/`, sorted.
    pub names: Vec<String>,
    pub image: String,
    pub image_id: String,
    pub command: String,
    /// `created`, `running`, `paused`, `restarting`, `exited`, `dead`, ...
    pub state: String,
    /// Seconds since the Unix epoch.
    pub created: i64,
    pub labels: BTreeMap<String, String>,
    /// `host_ip:public->private/proto` (or `private/proto`), sorted.
    pub ports: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Image {
    pub id: String,
    /// Sorted.
    pub tags: Vec<String>,
    pub size: i64,
    pub created: i64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Volume {
    pub name: String,
    pub driver: String,
    pub mountpoint: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Network {
    pub id: String,
    pub name: String,
    pub driver: String,
    pub scope: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Stack {
    pub name: String,
    /// Sorted, deduplicated service names.
    pub services: Vec<String>,
    pub containers: u32,
    pub running: u32,
}

/// Compose's project label.
pub const COMPOSE_PROJECT_LABEL: &str = "com.docker.compose.project";
/// Compose's service label.
pub const COMPOSE_SERVICE_LABEL: &str = "com.docker.compose.service";

impl Snapshot {
    /// Sorts every list and derives the stacks from the containers' compose labels, so that
    /// equal engines give equal snapshots whatever order the engine listed things in.
    pub fn normalise(&mut self) {
        for c in &mut self.containers {
            for n in &mut c.names {
                if let Some(stripped) = n.strip_prefix('/') {
                    *n = stripped.to_owned();
                }
            }
            c.names.sort();
            c.ports.sort();
        }
        self.containers.sort_by(|a, b| a.id.cmp(&b.id));
        for i in &mut self.images {
            i.tags.sort();
        }
        self.images.sort_by(|a, b| a.id.cmp(&b.id));
        self.volumes.sort_by(|a, b| a.name.cmp(&b.name));
        self.networks
            .sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
        let mut stacks: BTreeMap<&str, Stack> = BTreeMap::new();
        for c in &self.containers {
            if let Some(project) = c.labels.get(COMPOSE_PROJECT_LABEL) {
                let s = stacks.entry(project).or_insert_with(|| Stack {
                    name: project.clone(),
                    ..Stack::default()
                });
                s.containers += 1;
                if c.state == "running" {
                    s.running += 1;
                }
                if let Some(service) = c.labels.get(COMPOSE_SERVICE_LABEL) {
                    s.services.push(service.clone());
                }
            }
        }
        self.stacks = stacks
            .into_values()
            .map(|mut s| {
                s.services.sort();
                s.services.dedup();
                s
            })
            .collect();
    }
}

/// Posted (signed) to [`SNAPSHOT_PATH`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotUpload {
    pub endpoint_id: u64,
    pub edge_id: Uuid,
    /// Full ms timestamp of the request (the MAC covers it; freshness is checked).
    pub timestamp_ms: u64,
    /// [`compress`]ed snapshot.
    pub body: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot: {0}")]
    Codec(#[from] CodecError),
    #[error("snapshot is not valid zstd data: {0}")]
    Compression(String),
    #[error("snapshot is larger than {MAX_SNAPSHOT_BYTES} bytes once decompressed")]
    TooLarge,
}

/// Codec frame of `snap`, zstd-compressed.
pub fn compress(snap: &Snapshot) -> Result<Vec<u8>, SnapshotError> {
    let frame = codec::encode(snap)?;
    zstd::bulk::compress(&frame, ZSTD_LEVEL).map_err(|e| SnapshotError::Compression(e.to_string()))
}

/// The inverse of [`compress`], refusing output over [`MAX_SNAPSHOT_BYTES`] without
/// allocating it (a zstd bomb stops at the limit).
pub fn decompress(body: &[u8]) -> Result<Snapshot, SnapshotError> {
    let decoder = zstd::stream::read::Decoder::new(body)
        .map_err(|e| SnapshotError::Compression(e.to_string()))?;
    let mut frame = Vec::new();
    decoder
        .take(MAX_SNAPSHOT_BYTES as u64 + 1)
        .read_to_end(&mut frame)
        .map_err(|e| SnapshotError::Compression(e.to_string()))?;
    if frame.len() > MAX_SNAPSHOT_BYTES {
        return Err(SnapshotError::TooLarge);
    }
    Ok(codec::decode(&frame, MAX_SNAPSHOT_BYTES)?)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn container(id: &str, project: Option<&str>, service: &str, state: &str) -> Container {
        let mut labels = BTreeMap::new();
        if let Some(p) = project {
            labels.insert(COMPOSE_PROJECT_LABEL.to_owned(), p.to_owned());
            labels.insert(COMPOSE_SERVICE_LABEL.to_owned(), service.to_owned());
        }
        Container {
            id: id.into(),
            names: vec![format!("/{id}-name")],
            state: state.into(),
            labels,
            ..Container::default()
        }
    }

    #[test]
    fn normalising_makes_order_irrelevant() {
        let mut a = Snapshot {
            containers: vec![
                container("b", Some("shop"), "web", "running"),
                container("a", Some("shop"), "db", "exited"),
                container("c", None, "", "running"),
            ],
            ..Snapshot::default()
        };
        let mut b = a.clone();
        b.containers.reverse();
        a.normalise();
        b.normalise();
        assert_eq!(a, b);
        assert_eq!(compress(&a).unwrap(), compress(&b).unwrap());
        assert_eq!(a.containers[0].names, vec!["a-name"]);
        assert_eq!(a.stacks.len(), 1);
        assert_eq!(a.stacks[0].services, vec!["db", "web"]);
        assert_eq!((a.stacks[0].containers, a.stacks[0].running), (2, 1));
    }

    #[test]
    fn compression_roundtrips_and_refuses_garbage() {
        let mut s = Snapshot {
            taken_ms: 5,
            containers: (0..20)
                .map(|i| container(&format!("{i:064}"), None, "", "running"))
                .collect(),
            ..Snapshot::default()
        };
        s.normalise();
        let body = compress(&s).unwrap();
        assert!(body.len() < codec::encode(&s).unwrap().len());
        assert_eq!(decompress(&body).unwrap(), s);
        assert!(decompress(b"not zstd").is_err());
        assert!(decompress(&[]).is_err());
    }

    #[test]
    fn a_decompression_bomb_stops_at_the_limit() {
        let zeros = vec![0u8; MAX_SNAPSHOT_BYTES + 10];
        let bomb = zstd::bulk::compress(&zeros, 3).unwrap();
        assert!(bomb.len() < 4096);
        assert!(matches!(decompress(&bomb), Err(SnapshotError::TooLarge)));
    }
}
