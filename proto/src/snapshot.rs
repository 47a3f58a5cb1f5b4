//! Snapshots of an agent's engine: what runs there, normalised and sorted so that an unchanged
//! engine gives an identical snapshot (and identical bytes).
//!
//! On the wire a snapshot travels as [`SnapshotUpload`] inside a signed frame (see
//! [`crate::proof`]) to [`SNAPSHOT_PATH`]; its body is the codec frame of a [`Snapshot`],
//! compressed with zstd ([`compress`] / [`decompress`], both bounded). The control plane keeps
//! the latest one per environment and serves it as JSON.
//!
//! Decoded sizes are bounded as well as encoded ones: every list, map and string of a snapshot
//! or a delta has a bound (`MAX_*` below), checked on its length prefix before anything of it
//! is built (see [`codec::bound`]), and a snapshot holds at most [`MAX_SNAPSHOT_ITEMS`] list
//! and map entries in all. [`Snapshot::normalise`] clips what an engine reports to these
//! bounds, so an agent never sends a snapshot the server refuses.

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
pub const MAX_SNAPSHOT_BYTES: usize = codec::MAX_READ_FRAME;
/// Largest zstd window a body may ask for (`2^24` = [`MAX_SNAPSHOT_BYTES`]): the decompressor
/// reserves its window up front, and zstd's own default would allow 128 MiB.
const ZSTD_WINDOW_LOG_MAX: u32 = 24;

const ZSTD_LEVEL: i32 = 3;

/// Most containers in a snapshot (and container upserts, or removals, in a delta). Stacks
/// are derived from containers, so there are at most as many, each with at most as many
/// services.
pub const MAX_CONTAINERS: usize = 50_000;
/// Most images in a snapshot.
pub const MAX_IMAGES: usize = 50_000;
/// Most volumes in a snapshot.
pub const MAX_VOLUMES: usize = 50_000;
/// Most networks in a snapshot.
pub const MAX_NETWORKS: usize = 10_000;
/// Most names of one container (its own, and one per legacy link).
pub const MAX_CONTAINER_NAMES: usize = 256;
/// Most labels of one container (compose sets about ten; images add their own).
pub const MAX_LABELS: usize = 1_024;
/// Most ports of one container: a published range counts one per port and address family.
pub const MAX_PORTS: usize = 65_536;
/// Most tags of one image.
pub const MAX_IMAGE_TAGS: usize = 4_096;
/// Longest string in a snapshot (ids, names, commands, label keys and values, ...), in bytes.
pub const MAX_SNAPSHOT_TEXT: usize = 64 * 1024;
/// Most list and map entries in a normalised snapshot, all its lists and maps together: the
/// codec's [`codec::MAX_ITEMS`] less the most keys a delta removes, so that a delta (its
/// entries plus removed keys) always fits the codec's budget too.
pub const MAX_SNAPSHOT_ITEMS: usize =
    codec::MAX_ITEMS - (MAX_CONTAINERS + MAX_IMAGES + MAX_VOLUMES + MAX_NETWORKS);

/// An engine's state at one instant.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Snapshot {
    /// When the agent took it, ms since the Unix epoch (agent clock, server-corrected).
    pub taken_ms: u64,
    pub engine: EngineInfo,
    /// Sorted by id.
    #[serde(deserialize_with = "de::upserts")]
    pub containers: Vec<Container>,
    /// Sorted by id.
    #[serde(deserialize_with = "de::upserts")]
    pub images: Vec<Image>,
    /// Sorted by name.
    #[serde(deserialize_with = "de::upserts")]
    pub volumes: Vec<Volume>,
    /// Sorted by name.
    #[serde(deserialize_with = "de::upserts")]
    pub networks: Vec<Network>,
    /// Compose stacks recognised by their labels, sorted by name.
    #[serde(deserialize_with = "de::stacks")]
    pub stacks: Vec<Stack>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EngineInfo {
    #[serde(deserialize_with = "de::text")]
    pub name: String,
    #[serde(deserialize_with = "de::text")]
    pub version: String,
    #[serde(deserialize_with = "de::text")]
    pub api_version: String,
    #[serde(deserialize_with = "de::text")]
    pub os: String,
    #[serde(deserialize_with = "de::text")]
    pub arch: String,
    #[serde(deserialize_with = "de::text")]
    pub kernel_version: String,
    pub cpus: u32,
    pub memory_bytes: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Container {
    #[serde(deserialize_with = "de::text")]
    pub id: String,
    /// Without the leading `/`, sorted.
    #[serde(deserialize_with = "de::names")]
    pub names: Vec<String>,
    #[serde(deserialize_with = "de::text")]
    pub image: String,
    #[serde(deserialize_with = "de::text")]
    pub image_id: String,
    #[serde(deserialize_with = "de::text")]
    pub command: String,
    /// `created`, `running`, `paused`, `restarting`, `exited`, `dead`, ...
    #[serde(deserialize_with = "de::text")]
    pub state: String,
    /// Seconds since the Unix epoch.
    pub created: i64,
    #[serde(deserialize_with = "de::labels")]
    pub labels: BTreeMap<String, String>,
    /// `host_ip:public->private/proto` (or `private/proto`), sorted.
    #[serde(deserialize_with = "de::ports")]
    pub ports: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Image {
    #[serde(deserialize_with = "de::text")]
    pub id: String,
    /// Sorted.
    #[serde(deserialize_with = "de::tags")]
    pub tags: Vec<String>,
    pub size: i64,
    pub created: i64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Volume {
    #[serde(deserialize_with = "de::text")]
    pub name: String,
    #[serde(deserialize_with = "de::text")]
    pub driver: String,
    #[serde(deserialize_with = "de::text")]
    pub mountpoint: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Network {
    #[serde(deserialize_with = "de::text")]
    pub id: String,
    #[serde(deserialize_with = "de::text")]
    pub name: String,
    #[serde(deserialize_with = "de::text")]
    pub driver: String,
    #[serde(deserialize_with = "de::text")]
    pub scope: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Stack {
    #[serde(deserialize_with = "de::text")]
    pub name: String,
    /// Sorted, deduplicated service names.
    #[serde(deserialize_with = "de::services")]
    pub services: Vec<String>,
    pub containers: u32,
    pub running: u32,
}

/// A list of a snapshot that a delta changes: its name in errors, its bound, the key its
/// entries are sorted and diffed by.
pub trait Section: Clone + PartialEq + serde::de::DeserializeOwned {
    const NAME: &'static str;
    const MAX: usize;
    fn key(&self) -> &str;
}

impl Section for Container {
    const NAME: &'static str = "containers";
    const MAX: usize = MAX_CONTAINERS;
    fn key(&self) -> &str {
        &self.id
    }
}

impl Section for Image {
    const NAME: &'static str = "images";
    const MAX: usize = MAX_IMAGES;
    fn key(&self) -> &str {
        &self.id
    }
}

impl Section for Volume {
    const NAME: &'static str = "volumes";
    const MAX: usize = MAX_VOLUMES;
    fn key(&self) -> &str {
        &self.name
    }
}

impl Section for Network {
    const NAME: &'static str = "networks";
    const MAX: usize = MAX_NETWORKS;
    fn key(&self) -> &str {
        &self.id
    }
}

/// The `deserialize_with` helpers of the types above: each refuses a list, map or string over
/// its bound as soon as its length is read.
mod de {
    use std::collections::BTreeMap;

    use serde::de::{DeserializeSeed, Deserializer};

    use super::*;
    use crate::codec::bound::{List, Map, Plain, Text};

    const fn text_of(what: &'static str) -> Text {
        Text {
            what,
            max: MAX_SNAPSHOT_TEXT,
        }
    }

    const fn strings(what: &'static str, max: usize) -> List<Text> {
        List {
            what,
            max,
            elem: text_of(what),
        }
    }

    pub fn text<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
        text_of("snapshot text").deserialize(d)
    }

    pub fn names<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
        strings("container names", MAX_CONTAINER_NAMES).deserialize(d)
    }

    pub fn ports<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
        strings("container ports", MAX_PORTS).deserialize(d)
    }

    pub fn labels<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
        Map {
            what: "container labels",
            max: MAX_LABELS,
            key: text_of("container labels"),
            value: text_of("container labels"),
        }
        .deserialize(d)
    }

    pub fn tags<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
        strings("image tags", MAX_IMAGE_TAGS).deserialize(d)
    }

    pub fn services<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
        strings("stack services", MAX_CONTAINERS).deserialize(d)
    }

    pub fn stacks<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Stack>, D::Error> {
        List {
            what: "stacks",
            max: MAX_CONTAINERS,
            elem: Plain::new(),
        }
        .deserialize(d)
    }

    /// A section's entries: a snapshot's list, or a delta's upserts.
    pub fn upserts<'de, D: Deserializer<'de>, T: Section>(d: D) -> Result<Vec<T>, D::Error> {
        List {
            what: T::NAME,
            max: T::MAX,
            elem: Plain::new(),
        }
        .deserialize(d)
    }

    /// A delta's removed keys of a section.
    pub fn removed<'de, T: Section, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
        strings(T::NAME, T::MAX).deserialize(d)
    }
}

/// Compose's project label.
pub const COMPOSE_PROJECT_LABEL: &str = "com.docker.compose.project";
/// Compose's service label.
pub const COMPOSE_SERVICE_LABEL: &str = "com.docker.compose.service";

/// What [`Snapshot::normalise`] cut to fit the bounds (nothing, for any real engine but the
/// most extreme). An agent logs it when it is not empty.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Clipped {
    /// List and map entries dropped (containers, labels, ports, ...).
    pub entries: usize,
    /// Strings cut to [`MAX_SNAPSHOT_TEXT`] bytes.
    pub strings: usize,
}

impl std::fmt::Display for Clipped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} list entries dropped and {} strings cut to fit the snapshot bounds",
            self.entries, self.strings
        )
    }
}

/// Cuts `s` to [`MAX_SNAPSHOT_TEXT`] bytes on a character boundary; whether it did.
fn clip_text(s: &mut String) -> bool {
    if s.len() <= MAX_SNAPSHOT_TEXT {
        return false;
    }
    let mut end = MAX_SNAPSHOT_TEXT;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    true
}

impl Clipped {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    fn text(&mut self, s: &mut String) {
        self.strings += usize::from(clip_text(s));
    }

    fn texts<'a>(&mut self, all: impl IntoIterator<Item = &'a mut String>) {
        for s in all {
            self.text(s);
        }
    }

    fn list<T>(&mut self, list: &mut Vec<T>, max: usize) {
        if list.len() > max {
            self.entries += list.len() - max;
            list.truncate(max);
        }
    }

    /// Keeps at most `max` labels, compose's own first (stacks are derived from them), then
    /// the others in key order.
    fn labels(&mut self, labels: &mut BTreeMap<String, String>, max: usize) {
        if labels.len() <= max {
            return;
        }
        self.entries += labels.len() - max;
        let mut rest = std::mem::take(labels);
        let compose: Vec<(String, String)> = [COMPOSE_PROJECT_LABEL, COMPOSE_SERVICE_LABEL]
            .iter()
            .filter_map(|k| rest.remove_entry(*k))
            .collect();
        let others = max.saturating_sub(compose.len());
        *labels = compose
            .into_iter()
            .take(max)
            .chain(rest.into_iter().take(others))
            .collect();
    }
}

impl Snapshot {
    /// Sorts every list and derives the stacks from the containers' compose labels, so that
    /// equal engines give equal snapshots whatever order the engine listed things in; clips
    /// what is over a bound (the first entries in sort order are kept) and says what it cut.
    /// Normalising a normalised snapshot changes nothing.
    pub fn normalise(&mut self) -> Clipped {
        let mut clipped = Clipped::default();
        let e = &mut self.engine;
        clipped.texts([
            &mut e.name,
            &mut e.version,
            &mut e.api_version,
            &mut e.os,
            &mut e.arch,
            &mut e.kernel_version,
        ]);
        for c in &mut self.containers {
            clipped.texts([
                &mut c.id,
                &mut c.image,
                &mut c.image_id,
                &mut c.command,
                &mut c.state,
            ]);
            clipped.texts(&mut c.names);
            clipped.texts(&mut c.ports);
            if c.labels
                .iter()
                .any(|(k, v)| k.len() > MAX_SNAPSHOT_TEXT || v.len() > MAX_SNAPSHOT_TEXT)
            {
                c.labels = std::mem::take(&mut c.labels)
                    .into_iter()
                    .map(|(mut k, mut v)| {
                        clipped.texts([&mut k, &mut v]);
                        (k, v)
                    })
                    .collect();
            }
            for n in &mut c.names {
                let stripped = n.trim_start_matches('/');
                if stripped.len() != n.len() {
                    *n = stripped.to_owned();
                }
            }
            c.names.sort();
            c.ports.sort();
            clipped.list(&mut c.names, MAX_CONTAINER_NAMES);
            clipped.list(&mut c.ports, MAX_PORTS);
            clipped.labels(&mut c.labels, MAX_LABELS);
        }
        self.containers.sort_by(|a, b| a.id.cmp(&b.id));
        clipped.list(&mut self.containers, MAX_CONTAINERS);
        for i in &mut self.images {
            clipped.text(&mut i.id);
            clipped.texts(&mut i.tags);
            i.tags.sort();
            clipped.list(&mut i.tags, MAX_IMAGE_TAGS);
        }
        self.images.sort_by(|a, b| a.id.cmp(&b.id));
        clipped.list(&mut self.images, MAX_IMAGES);
        for v in &mut self.volumes {
            clipped.texts([&mut v.name, &mut v.driver, &mut v.mountpoint]);
        }
        self.volumes.sort_by(|a, b| a.name.cmp(&b.name));
        clipped.list(&mut self.volumes, MAX_VOLUMES);
        for n in &mut self.networks {
            clipped.texts([&mut n.id, &mut n.name, &mut n.driver, &mut n.scope]);
        }
        self.networks
            .sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
        clipped.list(&mut self.networks, MAX_NETWORKS);
        self.derive_stacks();
        if self.clip_entries(&mut clipped) {
            self.derive_stacks();
        }
        clipped
    }

    /// Keeps the entries of the containers' and images' own lists within what
    /// [`MAX_SNAPSHOT_ITEMS`] leaves once the objects and the stacks (derived already; at
    /// most one stack and one service per container) are counted, the first in sort order;
    /// whether it dropped any (then the stacks are derived again: a compose label may be gone).
    fn clip_entries(&mut self, clipped: &mut Clipped) -> bool {
        let stacks: usize = self.stacks.iter().map(|s| 1 + s.services.len()).sum();
        let objects = self.containers.len()
            + stacks
            + self.images.len()
            + self.volumes.len()
            + self.networks.len();
        let mut left = MAX_SNAPSHOT_ITEMS.saturating_sub(objects);
        let inner: usize = self
            .containers
            .iter()
            .map(|c| c.names.len() + c.labels.len() + c.ports.len())
            .chain(self.images.iter().map(|i| i.tags.len()))
            .sum();
        if inner <= left {
            return false;
        }
        for c in &mut self.containers {
            let keep = c.names.len().min(left);
            clipped.list(&mut c.names, keep);
            left -= keep;
            let keep = c.labels.len().min(left);
            clipped.labels(&mut c.labels, keep);
            left -= keep;
            let keep = c.ports.len().min(left);
            clipped.list(&mut c.ports, keep);
            left -= keep;
        }
        for i in &mut self.images {
            let keep = i.tags.len().min(left);
            clipped.list(&mut i.tags, keep);
            left -= keep;
        }
        true
    }

    fn derive_stacks(&mut self) {
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

/// The inverse of [`compress`]. Decoded as it is inflated, never inflated whole: a body
/// whose decompressed frame breaks a bound (more than [`MAX_SNAPSHOT_BYTES`], or a list
/// announcing more entries than allowed) is refused when the first bytes past the bound come
/// out of the decompressor, however much more it would have inflated to.
pub fn decompress(body: &[u8]) -> Result<Snapshot, SnapshotError> {
    inflate_decode(body).0
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

/// Changes to one list of a snapshot: entries added or changed (whole), and keys removed;
/// each at most the list's own bound ([`Section::MAX`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(bound(deserialize = "T: Section"))]
pub struct Changes<T> {
    #[serde(deserialize_with = "de::upserts")]
    pub upsert: Vec<T>,
    #[serde(deserialize_with = "de::removed::<T, _>")]
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

fn section_diff<T: Section>(old: &[T], new: &[T]) -> Changes<T> {
    let before: BTreeMap<&str, &T> = old.iter().map(|t| (t.key(), t)).collect();
    let after: BTreeMap<&str, &T> = new.iter().map(|t| (t.key(), t)).collect();
    Changes {
        upsert: new
            .iter()
            .filter(|t| before.get(t.key()) != Some(t))
            .cloned()
            .collect(),
        remove: before
            .keys()
            .filter(|k| !after.contains_key(*k))
            .map(|k| (*k).to_owned())
            .collect(),
    }
}

fn section_apply<T: Section>(list: &mut Vec<T>, changes: Changes<T>) {
    let mut by_key: BTreeMap<String, T> = std::mem::take(list)
        .into_iter()
        .map(|t| (t.key().to_owned(), t))
        .collect();
    for k in &changes.remove {
        by_key.remove(k);
    }
    for t in changes.upsert {
        by_key.insert(t.key().to_owned(), t);
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
        containers: section_diff(&old.containers, &new.containers),
        images: section_diff(&old.images, &new.images),
        volumes: section_diff(&old.volumes, &new.volumes),
        networks: section_diff(&old.networks, &new.networks),
    })
}

/// Applies `delta` to `base`; refuses a delta made against another base, and one whose result
/// is not the snapshot the agent holds (normalising the result clips it to the bounds, so a
/// delta that would grow past them fails the result check).
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
    section_apply(&mut out.containers, delta.containers);
    section_apply(&mut out.images, delta.images);
    section_apply(&mut out.volumes, delta.volumes);
    section_apply(&mut out.networks, delta.networks);
    let _clipped = out.normalise();
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
    inflate_decode(body).0
}

/// Decodes the codec frame in the zstd `body` as it is inflated; also says how many bytes
/// were inflated.
fn inflate_decode<T: serde::de::DeserializeOwned>(body: &[u8]) -> (Result<T, SnapshotError>, u64) {
    let compression = |e: std::io::Error| SnapshotError::Compression(e.to_string());
    let mut zstd = match zstd::stream::read::Decoder::with_buffer(body) {
        Ok(zstd) => zstd,
        Err(e) => return (Err(compression(e)), 0),
    };
    if let Err(e) = zstd.window_log_max(ZSTD_WINDOW_LOG_MAX) {
        return (Err(compression(e)), 0);
    }
    let mut inflated = Tally {
        inner: zstd,
        bytes: 0,
    };
    let decoded = codec::decode_from_read(&mut inflated, MAX_SNAPSHOT_BYTES);
    let decoded = decoded.map_err(|e| match e {
        CodecError::TooLarge { .. } => SnapshotError::TooLarge,
        CodecError::Read(e) => SnapshotError::Compression(e),
        other => SnapshotError::Codec(other),
    });
    (decoded, inflated.bytes)
}

/// Counts the bytes a reader gave.
struct Tally<R> {
    inner: R,
    bytes: u64,
}

impl<R: Read> Read for Tally<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }
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
        // A valid frame, then zeros past the limit.
        let mut frame = codec::encode(&Snapshot::default()).unwrap();
        frame.resize(MAX_SNAPSHOT_BYTES + 10, 0);
        let bomb = zstd::bulk::compress(&frame, 3).unwrap();
        assert!(bomb.len() < 4096);
        let (decoded, inflated) = inflate_decode::<Snapshot>(&bomb);
        assert!(
            matches!(decoded, Err(SnapshotError::TooLarge)),
            "{decoded:?}"
        );
        assert!(inflated <= (MAX_SNAPSHOT_BYTES + codec::READ_AHEAD) as u64);
        // Zeros alone are refused on their first byte (no protocol version 0).
        let zeros = zstd::bulk::compress(&vec![0u8; MAX_SNAPSHOT_BYTES + 10], 3).unwrap();
        let (decoded, inflated) = inflate_decode::<Snapshot>(&zeros);
        assert!(matches!(
            decoded,
            Err(SnapshotError::Codec(CodecError::Version { got: 0 }))
        ));
        assert!(inflated <= codec::READ_AHEAD as u64);
    }

    #[test]
    fn a_body_asking_for_a_window_over_16_mib_is_refused() {
        use std::io::Write as _;
        let frame = codec::encode(&Snapshot::default()).unwrap();
        // Streamed without its size: the header names the window, 2^26 bytes.
        let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
        enc.window_log(26).unwrap();
        enc.write_all(&frame).unwrap();
        let wide = enc.finish().unwrap();
        let e = decompress(&wide).unwrap_err();
        assert!(matches!(e, SnapshotError::Compression(_)), "{e}");
        // The same with the usual window decodes.
        let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
        enc.window_log(ZSTD_WINDOW_LOG_MAX).unwrap();
        enc.write_all(&frame).unwrap();
        assert_eq!(
            decompress(&enc.finish().unwrap()).unwrap(),
            Snapshot::default()
        );
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

    /// A frame of a snapshot whose containers list announces `count` empty containers and
    /// holds them: 9 zero bytes each (empty strings, lists and maps, `created` 0).
    fn empty_containers_frame(count: u32) -> Vec<u8> {
        let head = codec::encode(&Snapshot::default()).unwrap();
        // version, taken_ms, six engine strings, cpus, memory: then the containers' length.
        assert_eq!(head.len(), 15);
        let mut frame = head[..10].to_vec();
        frame.push(252); // bincode varint: a u32 follows
        frame.extend_from_slice(&count.to_le_bytes());
        frame.resize(frame.len() + 9 * count as usize, 0);
        frame.extend_from_slice(&head[11..]); // images, volumes, networks, stacks: empty
        frame
    }

    fn limit_error(e: SnapshotError) -> String {
        match e {
            SnapshotError::Codec(CodecError::Limit(text)) => text,
            other => panic!("expected a limit error, got {other}"),
        }
    }

    #[test]
    fn a_small_body_inflating_to_millions_of_empty_containers_is_refused_unbuilt() {
        let count = 1_800_000;
        let frame = empty_containers_frame(count);
        assert!(frame.len() <= MAX_SNAPSHOT_BYTES);
        let body = zstd::bulk::compress(&frame, ZSTD_LEVEL).unwrap();
        assert!(body.len() < 4096, "{} bytes", body.len());
        let (decoded, inflated) = inflate_decode::<Snapshot>(&body);
        // Refused on the announced length: the count is only known before any is built.
        assert_eq!(
            limit_error(decoded.unwrap_err()),
            format!("containers: {count} entries, more than the limit of {MAX_CONTAINERS}")
        );
        // ... and having inflated one buffer of the 16 MB it holds.
        assert!(
            inflated <= codec::READ_AHEAD as u64,
            "inflated {inflated} bytes of {}",
            frame.len()
        );
        // The same bytes as a delta's upserts, and as the codec frame alone.
        let e = codec::decode::<Snapshot>(&frame, MAX_SNAPSHOT_BYTES).unwrap_err();
        assert!(matches!(e, CodecError::Limit(_)), "{e}");
        assert_eq!(
            e.to_string(),
            format!("message exceeds a decode limit: containers: {count} entries, more than the limit of {MAX_CONTAINERS}")
        );
    }

    #[test]
    fn nested_lists_of_tiny_entries_are_refused_by_the_entry_budget() {
        // 40 containers of 30,000 empty ports each: every list is within its bound, but
        // 1.2 M entries are more than one message may hold.
        let mut frame = codec::encode(&Snapshot::default()).unwrap()[..10].to_vec();
        frame.push(40);
        for _ in 0..40 {
            frame.extend_from_slice(&[0; 8]); // id .. labels
            frame.push(251); // ports: a u16 follows
            frame.extend_from_slice(&30_000u16.to_le_bytes());
            frame.resize(frame.len() + 30_000, 0);
        }
        frame.extend_from_slice(&[0; 4]);
        let body = zstd::bulk::compress(&frame, ZSTD_LEVEL).unwrap();
        let e = limit_error(decompress(&body).unwrap_err());
        assert_eq!(
            e,
            format!(
                "container ports: the message holds more than {} list and map entries",
                codec::MAX_ITEMS
            )
        );
    }

    #[test]
    fn strings_over_the_bound_are_refused() {
        let mut s = Snapshot::default();
        s.engine.os = "o".repeat(MAX_SNAPSHOT_TEXT);
        let body = compress(&s).unwrap();
        assert_eq!(decompress(&body).unwrap(), s);
        s.engine.os.push('o');
        let e = limit_error(decompress(&compress(&s).unwrap()).unwrap_err());
        assert_eq!(
            e,
            format!(
                "snapshot text: a string of {} bytes, more than the limit of {MAX_SNAPSHOT_TEXT}",
                MAX_SNAPSHOT_TEXT + 1
            )
        );
    }

    /// List and map entries of a snapshot, as the codec counts them.
    fn entries(s: &Snapshot) -> usize {
        s.containers.len()
            + s.containers
                .iter()
                .map(|c| c.names.len() + c.labels.len() + c.ports.len())
                .sum::<usize>()
            + s.images.len()
            + s.images.iter().map(|i| i.tags.len()).sum::<usize>()
            + s.volumes.len()
            + s.networks.len()
            + s.stacks.len()
            + s.stacks.iter().map(|s| s.services.len()).sum::<usize>()
    }

    /// Every list at its bound, strings at theirs.
    fn at_the_bounds() -> Snapshot {
        let long = "x".repeat(MAX_SNAPSHOT_TEXT);
        let mut busy = container("busy", Some("shop"), "web", "running");
        busy.command = long.clone();
        busy.names = (0..MAX_CONTAINER_NAMES).map(|i| format!("n{i}")).collect();
        busy.labels
            .extend((2..MAX_LABELS).map(|i| (format!("l{i}"), long[..8].to_owned())));
        busy.ports = (0..MAX_PORTS).map(|i| format!("{i}/tcp")).collect();
        let mut containers: Vec<Container> = (1..MAX_CONTAINERS)
            .map(|i| Container {
                id: format!("c{i}"),
                ..Container::default()
            })
            .collect();
        containers.push(busy);
        let mut images: Vec<Image> = (1..MAX_IMAGES)
            .map(|i| Image {
                id: format!("i{i}"),
                ..Image::default()
            })
            .collect();
        images.push(Image {
            id: long.clone(),
            tags: (0..MAX_IMAGE_TAGS).map(|i| format!("t:{i}")).collect(),
            ..Image::default()
        });
        let mut s = Snapshot {
            taken_ms: 7,
            containers,
            images,
            volumes: (0..MAX_VOLUMES)
                .map(|i| Volume {
                    name: format!("v{i}"),
                    ..Volume::default()
                })
                .collect(),
            networks: (0..MAX_NETWORKS)
                .map(|i| Network {
                    id: format!("n{i}"),
                    name: format!("n{i}"),
                    ..Network::default()
                })
                .collect(),
            ..Snapshot::default()
        };
        assert!(s.normalise().is_empty(), "nothing at the bounds is clipped");
        s
    }

    #[test]
    fn a_snapshot_at_the_bounds_round_trips_and_one_more_is_refused() {
        let s = at_the_bounds();
        assert!(entries(&s) <= MAX_SNAPSHOT_ITEMS);
        let body = compress(&s).unwrap();
        assert!(body.len() <= MAX_UPLOAD_FRAME, "{} bytes", body.len());
        assert_eq!(decompress(&body).unwrap(), s);

        let refused = |s: &Snapshot| limit_error(decompress(&compress(s).unwrap()).unwrap_err());
        let mut more = s.clone();
        more.containers.push(Container::default());
        assert!(refused(&more).starts_with("containers: 50001 entries"));
        let mut more = s.clone();
        more.images.push(Image::default());
        assert!(refused(&more).starts_with("images: 50001 entries"));
        let mut more = s.clone();
        more.volumes.push(Volume::default());
        assert!(refused(&more).starts_with("volumes: 50001 entries"));
        let mut more = s.clone();
        more.networks.push(Network::default());
        assert!(refused(&more).starts_with("networks: 10001 entries"));
        let busy = s.containers.iter().position(|c| c.id == "busy").unwrap();
        let mut more = s.clone();
        more.containers[busy].names.push("one-more".into());
        assert!(refused(&more).starts_with("container names: 257 entries"));
        let mut more = s.clone();
        more.containers[busy]
            .labels
            .insert("one".into(), "more".into());
        assert!(refused(&more).starts_with("container labels: 1025 entries"));
        let mut more = s.clone();
        more.containers[busy].ports.push("x".into());
        assert!(refused(&more).starts_with("container ports: 65537 entries"));
        let mut more = s.clone();
        more.images.last_mut().unwrap().tags.push("x".into());
        assert!(refused(&more).starts_with("image tags: 4097 entries"));
        let mut more = s;
        more.containers[busy].command.push('x');
        assert!(refused(&more).starts_with("snapshot text: a string of 65537 bytes"));
    }

    #[test]
    fn normalising_clips_an_engine_over_the_bounds_to_what_decodes() {
        let long = "é".repeat(MAX_SNAPSHOT_TEXT); // two bytes each
        let mut big = container("big", Some("shop"), "web", "running");
        big.names = (0..MAX_CONTAINER_NAMES + 5)
            .map(|i| format!("/n{i:03}"))
            .collect();
        big.labels
            .extend((0..MAX_LABELS + 5).map(|i| (format!("a{i:04}"), format!("{i}"))));
        for i in 0..3 {
            big.labels.insert(format!("a{i:04}"), long.clone());
        }
        big.ports = (0..MAX_PORTS + 5).map(|i| format!("{i}/udp")).collect();
        let mut s = Snapshot {
            containers: vec![big],
            images: vec![Image {
                id: long.clone(),
                tags: (0..MAX_IMAGE_TAGS + 5).map(|i| format!("t:{i}")).collect(),
                ..Image::default()
            }],
            volumes: (0..MAX_VOLUMES + 5)
                .map(|i| Volume {
                    name: format!("v{i}"),
                    ..Volume::default()
                })
                .collect(),
            ..Snapshot::default()
        };
        let clipped = s.normalise();
        // Five names, ports, tags and volumes too many; seven labels (two are compose's).
        assert_eq!(clipped.entries, 4 * 5 + 7);
        assert_eq!(clipped.strings, 1 + 3);
        let c = &s.containers[0];
        assert_eq!(c.names.len(), MAX_CONTAINER_NAMES);
        assert_eq!(c.names[0], "n000");
        assert_eq!(c.labels.len(), MAX_LABELS);
        // Compose's labels are kept: the stack is still recognised.
        assert_eq!(c.labels[COMPOSE_PROJECT_LABEL], "shop");
        assert_eq!(s.stacks[0].services, ["web"]);
        assert!(c.labels.values().all(|v| v.len() <= MAX_SNAPSHOT_TEXT));
        assert_eq!(c.labels["a0000"].len(), MAX_SNAPSHOT_TEXT);
        assert_eq!(s.images[0].id.len(), MAX_SNAPSHOT_TEXT);
        assert_eq!(s.volumes.len(), MAX_VOLUMES);
        let again = s.clone();
        assert!(
            s.normalise().is_empty(),
            "normalising again changes nothing"
        );
        assert_eq!(s, again);
        assert_eq!(decompress(&compress(&s).unwrap()).unwrap(), s);
    }

    #[test]
    fn normalising_keeps_all_entries_within_the_message_budget() {
        // 20 containers with 60,000 ports each: 1.2 M entries, each list within its bound.
        let mut s = Snapshot {
            containers: (0..20)
                .map(|i| Container {
                    id: format!("c{i:02}"),
                    ports: (0..60_000).map(|p| format!("{p}")).collect(),
                    ..Container::default()
                })
                .collect(),
            ..Snapshot::default()
        };
        let clipped = s.normalise();
        assert_eq!(entries(&s), MAX_SNAPSHOT_ITEMS);
        assert_eq!(clipped.entries, 20 * 60_001 - MAX_SNAPSHOT_ITEMS);
        // The first containers keep theirs; the last ones lose ports.
        assert_eq!(s.containers[0].ports.len(), 60_000);
        assert!(s.containers[19].ports.is_empty());
        assert_eq!(decompress(&compress(&s).unwrap()).unwrap(), s);
    }

    #[test]
    fn a_delta_at_the_bounds_round_trips() {
        // From a base at every object bound to a snapshot of as many other objects: each
        // list upserts and removes its bound.
        let old = at_the_bounds();
        let mut new = old.clone();
        for c in &mut new.containers {
            c.id.insert(0, 'x');
        }
        for i in &mut new.images {
            i.id.truncate(MAX_SNAPSHOT_TEXT - 1);
            i.id.insert(0, 'x');
        }
        for v in &mut new.volumes {
            v.name.insert(0, 'x');
        }
        for n in &mut new.networks {
            n.id.insert(0, 'x');
        }
        assert!(new.normalise().is_empty());
        let delta = diff(&old, &new).unwrap();
        assert_eq!(delta.containers.upsert.len(), MAX_CONTAINERS);
        assert_eq!(delta.containers.remove.len(), MAX_CONTAINERS);
        assert_eq!(delta.networks.remove.len(), MAX_NETWORKS);
        let wire = compress_delta(&delta).unwrap();
        let back = decompress_delta(&wire).unwrap();
        assert_eq!(back, delta);
        assert_eq!(apply(&old, back).unwrap(), new);

        let mut more = delta.clone();
        more.containers.remove.push("x".into());
        let e = limit_error(decompress_delta(&compress_delta(&more).unwrap()).unwrap_err());
        assert!(e.starts_with("containers: 50001 entries"), "{e}");
        let mut more = delta;
        more.volumes.upsert.push(Volume::default());
        let e = limit_error(decompress_delta(&compress_delta(&more).unwrap()).unwrap_err());
        assert!(e.starts_with("volumes: 50001 entries"), "{e}");
    }

    #[test]
    fn a_delta_of_the_largest_snapshot_against_the_largest_base_fits_the_budget() {
        // The most entries a delta of normalised snapshots holds: every entry of a snapshot
        // at MAX_SNAPSHOT_ITEMS, and every key of a base at every object bound removed.
        let old = at_the_bounds();
        let mut new = Snapshot {
            containers: (0..20)
                .map(|i| Container {
                    id: format!("new{i:02}"),
                    ports: (0..60_000).map(|p| format!("{p}")).collect(),
                    ..Container::default()
                })
                .collect(),
            ..Snapshot::default()
        };
        let _ = new.normalise();
        assert_eq!(entries(&new), MAX_SNAPSHOT_ITEMS);
        let delta = diff(&old, &new).unwrap();
        let removed = delta.containers.remove.len()
            + delta.images.remove.len()
            + delta.volumes.remove.len()
            + delta.networks.remove.len();
        assert_eq!(entries(&new) + removed, codec::MAX_ITEMS);
        let back = decompress_delta(&compress_delta(&delta).unwrap()).unwrap();
        assert_eq!(apply(&old, back).unwrap(), new);
    }

    #[test]
    fn a_delta_bomb_is_refused_unbuilt() {
        let delta = SnapshotDelta {
            base: 1,
            result: 2,
            taken_ms: 3,
            engine: None,
            containers: Changes::default(),
            images: Changes::default(),
            volumes: Changes::default(),
            networks: Changes::default(),
        };
        let head = codec::encode(&delta).unwrap();
        // version, base, result, taken_ms, engine: then the containers' upserts.
        let mut frame = head[..5].to_vec();
        frame.push(252);
        frame.extend_from_slice(&1_800_000u32.to_le_bytes());
        frame.resize(frame.len() + 9 * 1_800_000, 0);
        frame.extend_from_slice(&head[6..]);
        let body = zstd::bulk::compress(&frame, ZSTD_LEVEL).unwrap();
        assert!(body.len() < 4096);
        let e = limit_error(decompress_delta(&body).unwrap_err());
        assert_eq!(
            e,
            format!("containers: 1800000 entries, more than the limit of {MAX_CONTAINERS}")
        );
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

            #[test]
            fn normalising_is_idempotent(s in snapshot()) {
                let mut again = s.clone();
                prop_assert!(again.normalise().is_empty());
                prop_assert_eq!(again, s);
            }
        }
    }
}
