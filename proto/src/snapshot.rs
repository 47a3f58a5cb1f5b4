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
    Ok(codec::decode(&inflate(body)?, MAX_SNAPSHOT_BYTES)?)
}

/// What identifies a snapshot's content for deltas: the first 8 bytes of the SHA-256 of its
/// codec frame, taken with `taken_ms` set to 0 (the same engine seen twice has one digest).
pub fn digest(snap: &Snapshot) -> Result<u64, SnapshotError> {
    use sha2::{Digest as _, Sha256};
    let frame = if snap.taken_ms == 0 {
        codec::encode(snap)?
    } else {
        codec::encode(&Snapshot {
            taken_ms: 0,
            ..snap.clone()
        })?
    };
    let hash = Sha256::digest(&frame);
    let mut first = [0u8; 8];
    first.copy_from_slice(&hash[..8]);
    Ok(u64::from_be_bytes(first))
}

/// Changes to one list of a snapshot: entries added or changed (whole), and keys removed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Changes<T> {
    pub upsert: Vec<T>,
    pub remove: Vec<String>,
}

impl<T> Default for Changes<T> {
    fn default() -> Self {
        Self {
            upsert: Vec::new(),
            remove: Vec::new(),
        }
    }
}

impl<T> Changes<T> {
    pub fn is_empty(&self) -> bool {
        self.upsert.is_empty() && self.remove.is_empty()
    }
}

/// A snapshot as the changes from a base snapshot both sides hold. Stacks are not sent: they
/// are derived from the containers ([`Snapshot::normalise`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotDelta {
    /// [`digest`] of the snapshot this applies to.
    pub base: u64,
    /// [`digest`] of the result, checked after applying: a delta never leaves a wrong copy.
    pub result: u64,
    pub taken_ms: u64,
    /// Sent only when the engine's information changed.
    pub engine: Option<EngineInfo>,
    pub containers: Changes<Container>,
    pub images: Changes<Image>,
    pub volumes: Changes<Volume>,
    pub networks: Changes<Network>,
}

impl SnapshotDelta {
    /// Whether nothing but the time changed.
    pub fn is_empty(&self) -> bool {
        self.engine.is_none()
            && self.containers.is_empty()
            && self.images.is_empty()
            && self.volumes.is_empty()
            && self.networks.is_empty()
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeltaError {
    #[error("the delta applies to snapshot {expected:016x}, the one held is {held:016x}")]
    BaseMismatch { expected: u64, held: u64 },
    #[error("the delta gave snapshot {got:016x} instead of {expected:016x}")]
    ResultMismatch { expected: u64, got: u64 },
    #[error("snapshot: {0}")]
    Codec(String),
}

fn section_diff<T: Clone + PartialEq>(
    old: &[T],
    new: &[T],
    key: impl Fn(&T) -> &str,
) -> Changes<T> {
    let before: BTreeMap<&str, &T> = old.iter().map(|t| (key(t), t)).collect();
    let after: BTreeMap<&str, &T> = new.iter().map(|t| (key(t), t)).collect();
    Changes {
        upsert: new
            .iter()
            .filter(|t| before.get(key(t)) != Some(t))
            .cloned()
            .collect(),
        remove: before
            .keys()
            .filter(|k| !after.contains_key(*k))
            .map(|k| (*k).to_owned())
            .collect(),
    }
}

fn section_apply<T>(list: &mut Vec<T>, changes: Changes<T>, key: impl Fn(&T) -> &str) {
    let mut by_key: BTreeMap<String, T> = std::mem::take(list)
        .into_iter()
        .map(|t| (key(&t).to_owned(), t))
        .collect();
    for k in &changes.remove {
        by_key.remove(k);
    }
    for t in changes.upsert {
        by_key.insert(key(&t).to_owned(), t);
    }
    *list = by_key.into_values().collect();
}

/// The delta that turns `old` into `new` (both normalised).
pub fn diff(old: &Snapshot, new: &Snapshot) -> Result<SnapshotDelta, SnapshotError> {
    Ok(SnapshotDelta {
        base: digest(old)?,
        result: digest(new)?,
        taken_ms: new.taken_ms,
        engine: (old.engine != new.engine).then(|| new.engine.clone()),
        containers: section_diff(&old.containers, &new.containers, |c| &c.id),
        images: section_diff(&old.images, &new.images, |i| &i.id),
        volumes: section_diff(&old.volumes, &new.volumes, |v| &v.name),
        networks: section_diff(&old.networks, &new.networks, |n| &n.id),
    })
}

/// Applies `delta` to `base`; refuses a delta made against another base, and one whose result
/// is not the snapshot the agent holds.
pub fn apply(base: &Snapshot, delta: SnapshotDelta) -> Result<Snapshot, DeltaError> {
    let held = digest(base).map_err(|e| DeltaError::Codec(e.to_string()))?;
    if held != delta.base {
        return Err(DeltaError::BaseMismatch {
            expected: delta.base,
            held,
        });
    }
    let mut out = base.clone();
    out.taken_ms = delta.taken_ms;
    if let Some(engine) = delta.engine {
        out.engine = engine;
    }
    section_apply(&mut out.containers, delta.containers, |c| &c.id);
    section_apply(&mut out.images, delta.images, |i| &i.id);
    section_apply(&mut out.volumes, delta.volumes, |v| &v.name);
    section_apply(&mut out.networks, delta.networks, |n| &n.id);
    out.normalise();
    let got = digest(&out).map_err(|e| DeltaError::Codec(e.to_string()))?;
    if got != delta.result {
        return Err(DeltaError::ResultMismatch {
            expected: delta.result,
            got,
        });
    }
    Ok(out)
}

/// Codec frame of a delta, zstd-compressed.
pub fn compress_delta(delta: &SnapshotDelta) -> Result<Vec<u8>, SnapshotError> {
    let frame = codec::encode(delta)?;
    zstd::bulk::compress(&frame, ZSTD_LEVEL).map_err(|e| SnapshotError::Compression(e.to_string()))
}

/// The inverse of [`compress_delta`], bounded like [`decompress`].
pub fn decompress_delta(body: &[u8]) -> Result<SnapshotDelta, SnapshotError> {
    Ok(codec::decode(&inflate(body)?, MAX_SNAPSHOT_BYTES)?)
}

fn inflate(body: &[u8]) -> Result<Vec<u8>, SnapshotError> {
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
    Ok(frame)
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

    fn engine_with(containers: Vec<Container>) -> Snapshot {
        let mut s = Snapshot {
            taken_ms: 1,
            engine: EngineInfo {
                name: "edge-1".into(),
                version: "5.4".into(),
                ..EngineInfo::default()
            },
            containers,
            images: vec![Image {
                id: "sha256:1".into(),
                tags: vec!["busybox:latest".into()],
                size: 1,
                created: 2,
            }],
            volumes: vec![Volume {
                name: "data".into(),
                driver: "local".into(),
                mountpoint: "/v".into(),
            }],
            ..Snapshot::default()
        };
        s.normalise();
        s
    }

    #[test]
    fn a_delta_turns_the_base_into_the_new_snapshot() {
        let old = engine_with(vec![
            container("a", Some("shop"), "web", "running"),
            container("b", None, "", "running"),
        ]);
        let mut new = engine_with(vec![
            container("a", Some("shop"), "web", "exited"),
            container("c", None, "", "running"),
        ]);
        new.taken_ms = 99;
        new.volumes.clear();
        let delta = diff(&old, &new).unwrap();
        assert_eq!(delta.containers.upsert.len(), 2);
        assert_eq!(delta.containers.remove, vec!["b"]);
        assert_eq!(delta.volumes.remove, vec!["data"]);
        assert!(delta.images.is_empty() && delta.engine.is_none());
        let wire = compress_delta(&delta).unwrap();
        let applied = apply(&old, decompress_delta(&wire).unwrap()).unwrap();
        assert_eq!(applied, new);
        assert_eq!(applied.stacks[0].running, 0);
    }

    #[test]
    fn an_unchanged_engine_gives_an_empty_delta_and_the_same_digest() {
        let old = engine_with(vec![container("a", None, "", "running")]);
        let mut again = old.clone();
        again.taken_ms = 12345;
        assert_eq!(digest(&old).unwrap(), digest(&again).unwrap());
        let delta = diff(&old, &again).unwrap();
        assert!(delta.is_empty());
        assert_eq!(delta.base, delta.result);
    }

    #[test]
    fn a_delta_against_another_base_or_with_a_wrong_result_is_refused() {
        let old = engine_with(vec![container("a", None, "", "running")]);
        let new = engine_with(vec![container("a", None, "", "exited")]);
        let other = engine_with(vec![]);
        let delta = diff(&old, &new).unwrap();
        assert!(matches!(
            apply(&other, delta.clone()),
            Err(DeltaError::BaseMismatch { .. })
        ));
        let mut forged = delta;
        forged.containers.upsert[0].state = "paused".into();
        assert!(matches!(
            apply(&old, forged),
            Err(DeltaError::ResultMismatch { .. })
        ));
        assert!(decompress_delta(b"garbage").is_err());
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        fn snapshot() -> impl Strategy<Value = Snapshot> {
            (
                proptest::collection::btree_map("[a-f]{1,3}", ("[a-z]{0,4}", any::<bool>()), 0..8),
                proptest::collection::btree_set("[a-c]{1,2}", 0..4),
                any::<bool>(),
            )
                .prop_map(|(containers, volumes, engine)| {
                    let mut s = engine_with(
                        containers
                            .into_iter()
                            .map(|(id, (image, running))| Container {
                                image,
                                ..container(
                                    &id,
                                    running.then_some("p"),
                                    "svc",
                                    if running { "running" } else { "exited" },
                                )
                            })
                            .collect(),
                    );
                    s.volumes = volumes
                        .into_iter()
                        .map(|name| Volume {
                            name,
                            ..Volume::default()
                        })
                        .collect();
                    if engine {
                        s.engine.version = "6.0".into();
                    }
                    s.normalise();
                    s
                })
        }

        proptest! {
            #[test]
            fn diff_then_apply_is_the_identity(old in snapshot(), new in snapshot()) {
                let delta = diff(&old, &new).unwrap();
                prop_assert_eq!(delta.is_empty(), digest(&old).unwrap() == digest(&new).unwrap());
                prop_assert_eq!(apply(&old, delta).unwrap(), new);
            }
        }
    }
}
