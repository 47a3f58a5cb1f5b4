//! The admin API's view of every environment: what `GET /api/endpoints` filters, pages and
//! counts, and `GET /api/endpoints/summary` sums, without reading every record and heartbeat
//! of the store per request (at 100,000 environments on Redis that read took most of a
//! second).
//!
//! An in-memory index of the fields lists filter on (name, Edge ID, mode, group, tags, own
//! intervals) and of each environment's last check-in, built on first use from the store,
//! kept current by the store's change notifications (applied before the next query, so an
//! admin reads their own writes), and dropped after [`IDLE_DROP`] without queries: a replica
//! nobody asks holds nothing.
//!
//! Last check-ins are refreshed in the background once per [`REFRESH`] while the index is in
//! use (a query never waits for it, and the index is never locked across a store read), and
//! only where the answer could change: an environment known to be `up` until some time stays
//! `up` until then (its heartbeats only move forward), so only those that look `down` or
//! `never`, or will in a few seconds, are asked again, by id or, when they are the larger part of the fleet, by
//! asking the store what checked in recently
//! ([`EnvironmentStore::heartbeats_since`](store::EnvironmentStore)), whichever reads less.
//! This replica's own agents' check-ins come from the fleet's memory, fresher than the
//! store's write-behind.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use store::{Change, EdgeMode, EnvId, Environment, Settings, SharedStore, StoreError, TagMatch};
use tokio::sync::broadcast;
use tokio::time::Instant;
use uuid::Uuid;

use crate::fleet::{grace_ms, Fleet, Intervals, Liveness};

/// Last check-ins are read from the store at most this often.
pub const REFRESH: Duration = Duration::from_secs(1);
/// An index without queries for this long is dropped.
pub const IDLE_DROP: Duration = Duration::from_secs(600);
/// An entry is read again this long before its known check-in's grace ends: a live agent's
/// newer check-in is found before its environment would look `down` for a moment (the refresh
/// runs once per [`REFRESH`]).
const EXPIRY_MARGIN_MS: u64 = 3 * REFRESH.as_millis() as u64;
/// Changed environments remembered between queries; past it the next query rebuilds.
const MAX_PENDING: usize = 4096;
/// Heartbeats are written behind, in batches: one may land in the store this long after
/// its time.
const WRITE_BEHIND_SLACK_MS: u64 = 5_000;

/// What a list asks for (already validated).
#[derive(Clone, Debug, Default)]
pub struct Query {
    pub start: usize,
    pub limit: usize,
    /// Lowercase; matches the name, the Edge ID or the id.
    pub search: Option<String>,
    pub status: Option<Vec<Liveness>>,
    pub mode: Option<EdgeMode>,
    pub group_id: Option<u64>,
    /// Every one of them.
    pub tag_ids: Vec<u64>,
}

/// A page: the ids on it with their last check-in, and how many matched in all.
#[derive(Debug, PartialEq, Eq)]
pub struct Page {
    pub total: usize,
    pub items: Vec<(EnvId, Option<u64>)>,
}

/// Counts over the whole fleet.
#[derive(Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    pub total: usize,
    pub status: StatusCounts,
    pub mode: ModeCounts,
    /// By group id (`0`: in no group).
    pub groups: BTreeMap<u64, StatusCounts>,
    /// The environments that went down most recently: id and last check-in, newest first, at
    /// most [`RECENTLY_DOWN`].
    #[serde(skip)]
    pub recently_down: Vec<(EnvId, u64)>,
}

/// How many environments [`Summary::recently_down`] names.
pub const RECENTLY_DOWN: usize = 10;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct StatusCounts {
    pub up: usize,
    pub down: usize,
    pub never: usize,
}

impl StatusCounts {
    fn add(&mut self, s: Liveness) {
        match s {
            Liveness::Up => self.up += 1,
            Liveness::Down => self.down += 1,
            Liveness::Never => self.never += 1,
        }
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ModeCounts {
    pub standard: usize,
    #[serde(rename = "async")]
    pub async_: usize,
}

/// One environment as lists see it.
#[derive(Debug)]
struct Entry {
    /// Lowercase, for search.
    name: Box<str>,
    edge_id: Option<Uuid>,
    mode: EdgeMode,
    group_id: Option<u64>,
    tag_ids: Box<[u64]>,
    own: [Option<u32>; 4],
    /// Its last check-in as the store last told us.
    seen: Option<u64>,
}

impl Entry {
    fn of(env: &Environment, seen: Option<u64>) -> Self {
        Self {
            name: env.name.to_lowercase().into_boxed_str(),
            edge_id: env.edge_id,
            mode: env.mode,
            group_id: env.group_id,
            tag_ids: env.tag_ids.clone().into_boxed_slice(),
            own: Intervals::own(env),
            seen,
        }
    }

    fn grace(&self, settings: &Settings) -> u64 {
        grace_ms(Intervals::of_own(self.own, settings).liveness(self.mode))
    }

    fn matches(&self, id: EnvId, q: &Query, search: Option<&Search<'_>>) -> bool {
        q.mode.is_none_or(|m| m == self.mode)
            && q.group_id.is_none_or(|g| self.group_id == Some(g))
            && q.tag_ids.iter().all(|t| self.tag_ids.contains(t))
            && search.is_none_or(|s| s.matches(id, self))
    }
}

struct Index {
    entries: BTreeMap<EnvId, Entry>,
    /// Tag id -> the environments with it as their own: with `by_group` and `group_tags`,
    /// dynamic edge groups' members without a scan.
    by_tag: HashMap<u64, BTreeSet<EnvId>>,
    /// Group id -> its environments.
    by_group: HashMap<u64, BTreeSet<EnvId>>,
    /// Group id -> its tags (which count as its environments' own).
    group_tags: HashMap<u64, Box<[u64]>>,
    used: Instant,
}

/// Adds `id` to the set of `key`.
fn index_add(map: &mut HashMap<u64, BTreeSet<EnvId>>, key: u64, id: EnvId) {
    map.entry(key).or_default().insert(id);
}

/// Takes `id` from the set of `key`, and the set when it is empty.
fn index_take(map: &mut HashMap<u64, BTreeSet<EnvId>>, key: u64, id: EnvId) {
    if let Some(ids) = map.get_mut(&key) {
        ids.remove(&id);
        if ids.is_empty() {
            map.remove(&key);
        }
    }
}

impl Index {
    fn new(entries: BTreeMap<EnvId, Entry>, group_tags: BTreeMap<u64, Vec<u64>>) -> Self {
        let mut index = Self {
            entries: BTreeMap::new(),
            by_tag: HashMap::new(),
            by_group: HashMap::new(),
            group_tags: HashMap::new(),
            used: Instant::now(),
        };
        index.set_group_tags(group_tags);
        for (id, e) in entries {
            index.insert(id, e);
        }
        index
    }

    fn set_group_tags(&mut self, group_tags: BTreeMap<u64, Vec<u64>>) {
        self.group_tags = group_tags
            .into_iter()
            .map(|(g, tags)| (g, tags.into_boxed_slice()))
            .collect();
    }

    fn insert(&mut self, id: EnvId, e: Entry) {
        self.remove(id);
        for &t in e.tag_ids.iter() {
            index_add(&mut self.by_tag, t, id);
        }
        if let Some(g) = e.group_id {
            index_add(&mut self.by_group, g, id);
        }
        self.entries.insert(id, e);
    }

    fn remove(&mut self, id: EnvId) {
        let Some(old) = self.entries.remove(&id) else {
            return;
        };
        for &t in old.tag_ids.iter() {
            index_take(&mut self.by_tag, t, id);
        }
        if let Some(g) = old.group_id {
            index_take(&mut self.by_group, g, id);
        }
    }

    /// Whether environment `e` has tag `t`, as its own or its group's.
    fn has_tag(&self, e: &Entry, t: u64) -> bool {
        e.tag_ids.contains(&t)
            || e.group_id
                .and_then(|g| self.group_tags.get(&g))
                .is_some_and(|tags| tags.contains(&t))
    }

    /// The sorted sets whose union is the environments with tag `t`: those with it as their
    /// own, and those of each group with it.
    fn with_tag(&self, t: u64) -> Vec<&BTreeSet<EnvId>> {
        let groups = self
            .group_tags
            .iter()
            .filter(|(_, tags)| tags.contains(&t))
            .filter_map(|(g, _)| self.by_group.get(g));
        self.by_tag.get(&t).into_iter().chain(groups).collect()
    }

    /// The environments with any (or all) of `tags`, their own or their group's, ascending,
    /// and how many in all; a page of them from `start`.
    fn tagged(
        &self,
        tags: &[u64],
        how: TagMatch,
        start: usize,
        limit: usize,
    ) -> (usize, Vec<EnvId>) {
        let mut total = 0;
        let mut page = Vec::new();
        let mut take = |id: EnvId| {
            if total >= start && page.len() < limit {
                page.push(id);
            }
            total += 1;
        };
        // For `all`, the candidates are those with the rarest tag, each checked for the rest.
        let sets: Vec<&BTreeSet<EnvId>> = match how {
            TagMatch::Any => tags.iter().flat_map(|&t| self.with_tag(t)).collect(),
            TagMatch::All => tags
                .iter()
                .map(|&t| self.with_tag(t))
                .min_by_key(|sets| sets.iter().map(|s| s.len()).sum::<usize>())
                .unwrap_or_default(),
        };
        // Many sets (a tag carried by many groups): one union first, so that the merge below
        // does not look at every set for every id.
        let union: BTreeSet<EnvId>;
        let sets = if sets.len() > 8 {
            union = sets.iter().flat_map(|s| s.iter().copied()).collect();
            vec![&union]
        } else {
            sets
        };
        // A merge of the sorted sets, each id once.
        let mut heads: Vec<_> = sets.iter().map(|s| s.iter().peekable()).collect();
        while let Some(&next) = heads.iter_mut().filter_map(|h| h.peek().copied()).min() {
            for h in &mut heads {
                if h.peek() == Some(&&next) {
                    h.next();
                }
            }
            let wanted = match how {
                TagMatch::Any => true,
                TagMatch::All => self
                    .entries
                    .get(&next)
                    .is_some_and(|e| tags.iter().all(|&t| self.has_tag(e, t))),
            };
            if wanted {
                take(next);
            }
        }
        (total, page)
    }
}

/// Changes noted since the last query.
#[derive(Default)]
struct Pending {
    changed: HashSet<EnvId>,
    deleted: HashSet<EnvId>,
    /// Groups' tags are read again.
    catalog: bool,
    rebuild: bool,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.changed.is_empty() && self.deleted.is_empty() && !self.catalog && !self.rebuild
    }

    /// Puts back what a failed update took (what was noted since wins).
    fn merge_back(&mut self, old: Pending) {
        for id in old.changed {
            if !self.deleted.contains(&id) {
                self.changed.insert(id);
            }
        }
        for id in old.deleted {
            if !self.changed.contains(&id) {
                self.deleted.insert(id);
            }
        }
        self.catalog |= old.catalog;
        self.rebuild |= old.rebuild;
    }
}

pub struct Directory {
    store: SharedStore,
    fleet: Arc<Fleet>,
    /// `None` until first use, and once dropped idle. Locked for in-memory work only, never
    /// across a store read.
    index: Mutex<Option<Index>>,
    /// Turns at bringing the index up to date (building it, applying noted changes), so that
    /// two queries never apply reads of one environment out of order.
    updating: tokio::sync::Mutex<()>,
    pending: Mutex<Pending>,
}

impl Directory {
    pub fn new(store: SharedStore, fleet: Arc<Fleet>) -> Arc<Self> {
        Arc::new(Self {
            store,
            fleet,
            index: Mutex::new(None),
            updating: tokio::sync::Mutex::new(()),
            pending: Mutex::new(Pending::default()),
        })
    }

    /// Notes change notifications for the next query, refreshes last check-ins while the
    /// index is in use, and drops it once idle, until `shutdown`.
    pub async fn run(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let mut changes = self.store.subscribe();
        let mut tick = tokio::time::interval(REFRESH);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tick.tick() => {
                    let idle = self.index.lock().as_ref().map(|i| i.used.elapsed());
                    match idle {
                        Some(idle) if idle >= IDLE_DROP => {
                            *self.index.lock() = None;
                            tracing::debug!("environment index dropped after its idle time");
                        }
                        Some(_) => {
                            if let Err(e) = self.refresh().await {
                                tracing::debug!(error = %e, "environment index not refreshed");
                            }
                        }
                        None => {}
                    }
                }
                change = changes.recv() => match change {
                    Ok(change) => self.note(&change),
                    Err(broadcast::error::RecvError::Lagged(_)) => self.note(&Change::Resync),
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            }
        }
    }

    /// Notes a change (also called by the replica that made it, so its admin reads their own
    /// write at once).
    pub fn note(&self, change: &Change) {
        let mut p = self.pending.lock();
        match change {
            Change::Environment(id) => {
                p.deleted.remove(id);
                p.changed.insert(*id);
            }
            Change::EnvironmentDeleted(id) => {
                p.changed.remove(id);
                p.deleted.insert(*id);
            }
            Change::Catalog => p.catalog = true,
            Change::Resync => p.rebuild = true,
            _ => return,
        }
        if p.changed.len() + p.deleted.len() > MAX_PENDING {
            *p = Pending {
                rebuild: true,
                ..Pending::default()
            };
        }
    }

    /// A page of the environments `q` asks for, in id order, and how many matched.
    pub async fn list(&self, q: &Query, settings: &Settings) -> Result<Page, StoreError> {
        self.update().await?;
        let mut guard = self.index.lock();
        let index = guard.as_mut().ok_or_else(unbuilt)?;
        index.used = Instant::now();
        let now = proto::clock::now_ms();
        let search = q.search.as_deref().map(Search::new);
        let mut page = Page {
            total: 0,
            items: Vec::new(),
        };
        for (&id, e) in &index.entries {
            if !e.matches(id, q, search.as_ref()) {
                continue;
            }
            let last = self.last(id, e);
            if let Some(want) = &q.status {
                if !want.contains(&status(last, e.grace(settings), now)) {
                    continue;
                }
            }
            if page.total >= q.start && page.items.len() < q.limit {
                page.items.push((id, last));
            }
            page.total += 1;
        }
        Ok(page)
    }

    /// A page of the environments a dynamic edge group selects (with any or all of `tags`),
    /// in id order, and how many it selects: from the index by tag, not a scan.
    pub async fn tagged(
        &self,
        tags: &[u64],
        how: TagMatch,
        start: usize,
        limit: usize,
    ) -> Result<Page, StoreError> {
        self.update().await?;
        let mut guard = self.index.lock();
        let index = guard.as_mut().ok_or_else(unbuilt)?;
        index.used = Instant::now();
        let (total, ids) = index.tagged(tags, how, start, limit);
        let items = ids
            .into_iter()
            .map(|id| {
                let last = index.entries.get(&id).and_then(|e| self.last(id, e));
                (id, last)
            })
            .collect();
        Ok(Page { total, items })
    }

    /// Counts by status, mode and group over every environment.
    pub async fn summary(&self, settings: &Settings) -> Result<Summary, StoreError> {
        self.update().await?;
        let mut guard = self.index.lock();
        let index = guard.as_mut().ok_or_else(unbuilt)?;
        index.used = Instant::now();
        let now = proto::clock::now_ms();
        let mut s = Summary::default();
        // The newest down ones: a min-heap of RECENTLY_DOWN, so the scan stays one pass.
        let mut recent = std::collections::BinaryHeap::with_capacity(RECENTLY_DOWN + 1);
        for (&id, e) in &index.entries {
            let st = status(self.last(id, e), e.grace(settings), now);
            s.total += 1;
            s.status.add(st);
            match e.mode {
                EdgeMode::Standard => s.mode.standard += 1,
                EdgeMode::Async => s.mode.async_ += 1,
            }
            s.groups.entry(e.group_id.unwrap_or(0)).or_default().add(st);
            if let (Liveness::Down, Some(last)) = (st, self.last(id, e)) {
                recent.push(std::cmp::Reverse((last, id)));
                if recent.len() > RECENTLY_DOWN {
                    recent.pop();
                }
            }
        }
        s.recently_down = recent
            .into_sorted_vec()
            .into_iter()
            .map(|std::cmp::Reverse((last, id))| (id, last))
            .collect();
        Ok(s)
    }

    /// The environment's last check-in: the store's, or this replica's own if later.
    fn last(&self, id: EnvId, e: &Entry) -> Option<u64> {
        match (e.seen, self.fleet.stats.last_checkin_ms(id)) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }

    /// Builds the index, or applies the changes noted since the last query.
    async fn update(&self) -> Result<(), StoreError> {
        let _turn = self.updating.lock().await;
        let pending = std::mem::take(&mut *self.pending.lock());
        let built = self.index.lock().is_some();
        if built && pending.is_empty() {
            return Ok(());
        }
        let result = if !built || pending.rebuild {
            self.build().await.map(|index| {
                *self.index.lock() = Some(index);
            })
        } else {
            self.apply(&pending).await
        };
        if result.is_err() {
            // Not lost: taken again by the next query.
            self.pending.lock().merge_back(pending);
        }
        result
    }

    async fn build(&self) -> Result<Index, StoreError> {
        let started = Instant::now();
        let envs = self.store.list_environments().await?;
        let mut entries: BTreeMap<EnvId, Entry> =
            envs.iter().map(|e| (e.id, Entry::of(e, None))).collect();
        for (id, at) in self.store.heartbeats_since(0).await? {
            if let Some(e) = entries.get_mut(&id) {
                e.seen = Some(at);
            }
        }
        tracing::debug!(
            environments = entries.len(),
            took_ms = started.elapsed().as_millis() as u64,
            "environment index built"
        );
        let group_tags = self.store.group_tags().await?;
        Ok(Index::new(entries, group_tags))
    }

    /// Applies noted changes: deleted ones go, changed ones are read again (with their last
    /// check-in).
    async fn apply(&self, pending: &Pending) -> Result<(), StoreError> {
        let ids: Vec<EnvId> = pending.changed.iter().copied().collect();
        let envs = self.store.get_environments(&ids).await?;
        let seen = self.store.heartbeats(&ids).await?;
        let group_tags = match pending.catalog {
            true => Some(self.store.group_tags().await?),
            false => None,
        };
        let mut guard = self.index.lock();
        let index = guard.as_mut().ok_or_else(unbuilt)?;
        if let Some(group_tags) = group_tags {
            index.set_group_tags(group_tags);
        }
        for id in &pending.deleted {
            index.remove(*id);
        }
        for ((id, env), seen) in ids.iter().zip(envs).zip(seen) {
            match env {
                Some(env) => index.insert(*id, Entry::of(&env, seen)),
                None => index.remove(*id),
            }
        }
        Ok(())
    }

    /// Reads last check-ins where they could have changed what a list shows soon: the
    /// environments that will not look `up` in [`EXPIRY_MARGIN_MS`] (one that will stays
    /// `up` until then at least: heartbeats only move forward).
    async fn refresh(&self) -> Result<(), StoreError> {
        let settings = self.store.settings().await?;
        let now = proto::clock::now_ms();
        let (stale, widest) = {
            let guard = self.index.lock();
            let Some(index) = guard.as_ref() else {
                return Ok(());
            };
            let mut stale = Vec::new();
            let mut widest = 0u64;
            for (&id, e) in &index.entries {
                let grace = e.grace(&settings);
                if status(self.last(id, e), grace, now + EXPIRY_MARGIN_MS) != Liveness::Up {
                    stale.push(id);
                    widest = widest.max(grace);
                }
            }
            (stale, widest)
        };
        if stale.is_empty() {
            return Ok(());
        }
        // A check-in that would make one of them `up` now is at `now - widest` or later.
        let since = now.saturating_sub(widest + WRITE_BEHIND_SLACK_MS);
        let recent = self.store.count_heartbeats_since(since).await?;
        let seen: Vec<(EnvId, Option<u64>)> = if recent < stale.len() as u64 {
            self.store
                .heartbeats_since(since)
                .await?
                .into_iter()
                .map(|(id, at)| (id, Some(at)))
                .collect()
        } else {
            let mut seen = Vec::with_capacity(stale.len());
            for chunk in stale.chunks(10_000) {
                let at = self.store.heartbeats(chunk).await?;
                seen.extend(chunk.iter().copied().zip(at));
            }
            seen
        };
        let mut guard = self.index.lock();
        if let Some(index) = guard.as_mut() {
            for (id, at) in seen {
                if let Some(e) = index.entries.get_mut(&id) {
                    e.seen = e.seen.max(at);
                }
            }
        }
        Ok(())
    }
}

/// A search text, prepared once per list: an id when it is a number, and whether it could
/// be part of an Edge ID at all (hex digits and dashes).
struct Search<'a> {
    text: &'a str,
    id: Option<u64>,
    edge_id: bool,
}

impl<'a> Search<'a> {
    fn new(text: &'a str) -> Self {
        Self {
            text,
            id: text.parse().ok(),
            edge_id: text.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-'),
        }
    }

    fn matches(&self, id: EnvId, e: &Entry) -> bool {
        if self.id == Some(id) || e.name.contains(self.text) {
            return true;
        }
        let Some(edge) = e.edge_id.filter(|_| self.edge_id) else {
            return false;
        };
        let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
        edge.hyphenated().encode_lower(&mut buf).contains(self.text)
    }
}

fn status(last: Option<u64>, grace: u64, now: u64) -> Liveness {
    match last {
        None => Liveness::Never,
        Some(t) if now.saturating_sub(t) <= grace => Liveness::Up,
        Some(_) => Liveness::Down,
    }
}

fn unbuilt() -> StoreError {
    StoreError::corrupt("environment index missing after it was built")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::liveness;

    fn entry(name: &str, edge_id: Option<Uuid>) -> Entry {
        Entry {
            name: name.to_lowercase().into_boxed_str(),
            edge_id,
            mode: EdgeMode::Standard,
            group_id: None,
            tag_ids: Box::new([]),
            own: [None; 4],
            seen: None,
        }
    }

    #[test]
    fn search_matches_the_name_the_edge_id_or_the_id() {
        let edge = Uuid::parse_str("a1b2c3d4-0000-4000-8000-00000000beef").expect("uuid");
        let e = entry("Shop-0420", Some(edge));
        let hit = |text: &str, id: EnvId| Search::new(text).matches(id, &e);
        // (Search text is lowercase by the time it gets here.)
        assert!(hit("shop-04", 1));
        assert!(hit("420", 1), "digits of the name");
        assert!(
            hit("beef", 1) && hit("c3d4-0000", 1),
            "a piece of the Edge ID"
        );
        assert!(hit("77", 77), "the id");
        assert!(!hit("77", 78));
        assert!(!hit("kiosk", 1));
        assert!(
            !hit("c3d4 0000", 1),
            "not hex: the Edge ID is not looked at"
        );
        assert!(!Search::new("beef").matches(1, &entry("shop", None)));
    }

    #[test]
    fn tags_select_members_through_the_index_and_follow_changes() {
        let tagged = |tags: &[u64]| {
            let mut e = entry("e", None);
            e.tag_ids = tags.to_vec().into_boxed_slice();
            e
        };
        let mut index = Index::new(
            BTreeMap::from([
                (1, tagged(&[10])),
                (2, tagged(&[10, 20])),
                (3, tagged(&[20])),
                (4, tagged(&[])),
                (5, tagged(&[10, 20, 30])),
            ]),
            BTreeMap::new(),
        );
        let all = |ix: &Index, tags: &[u64], how| ix.tagged(tags, how, 0, 100);
        assert_eq!(all(&index, &[10], TagMatch::Any), (3, vec![1, 2, 5]));
        assert_eq!(all(&index, &[10, 20], TagMatch::Any), (4, vec![1, 2, 3, 5]));
        assert_eq!(all(&index, &[20, 10], TagMatch::All), (2, vec![2, 5]));
        assert_eq!(all(&index, &[10, 99], TagMatch::All), (0, vec![]));
        assert_eq!(all(&index, &[99], TagMatch::Any), (0, vec![]));
        assert_eq!(all(&index, &[], TagMatch::Any), (0, vec![]));
        // Pages of the whole, in id order.
        assert_eq!(
            index.tagged(&[10, 20], TagMatch::Any, 1, 2),
            (4, vec![2, 3])
        );
        assert_eq!(index.tagged(&[10, 20], TagMatch::Any, 4, 2), (4, vec![]));
        // A tag taken off, one put on, an environment deleted: members follow.
        index.insert(2, tagged(&[20]));
        index.insert(4, tagged(&[10]));
        index.remove(5);
        assert_eq!(all(&index, &[10], TagMatch::Any), (2, vec![1, 4]));
        assert_eq!(all(&index, &[10, 20], TagMatch::All), (0, vec![]));
        assert!(!index.by_tag.contains_key(&30), "no empty sets left behind");

        // A group's tags count as its environments' own.
        let in_group = |tags: &[u64], group| {
            let mut e = tagged(tags);
            e.group_id = Some(group);
            e
        };
        index.insert(6, in_group(&[], 7));
        index.insert(7, in_group(&[20], 7));
        index.insert(8, in_group(&[10], 8));
        index.set_group_tags(BTreeMap::from([(7, vec![10]), (9, vec![20])]));
        assert_eq!(all(&index, &[10], TagMatch::Any), (5, vec![1, 4, 6, 7, 8]));
        assert_eq!(all(&index, &[10, 20], TagMatch::All), (1, vec![7]));
        // The group's tags change: so do its environments'.
        index.set_group_tags(BTreeMap::from([(8, vec![20])]));
        assert_eq!(all(&index, &[10], TagMatch::Any), (3, vec![1, 4, 8]));
        assert_eq!(all(&index, &[10, 20], TagMatch::All), (1, vec![8]));
        index.remove(8);
        assert!(!index.by_group.contains_key(&8));
        assert_eq!(all(&index, &[20], TagMatch::Any), (3, vec![2, 3, 7]));
    }

    #[test]
    fn what_a_failed_update_took_goes_back_without_undoing_later_notes() {
        let mut now = Pending::default();
        now.deleted.insert(1);
        now.changed.insert(3);
        let mut old = Pending::default();
        old.changed.extend([1, 2]);
        old.deleted.insert(3);
        now.merge_back(old);
        assert_eq!(now.changed, HashSet::from([2, 3]));
        assert_eq!(now.deleted, HashSet::from([1]));
        assert!(!now.rebuild);
    }

    #[test]
    fn status_follows_the_liveness_rule() {
        for (last, interval, now) in [
            (None, 5, 1_000_000),
            (Some(1_000_000), 5, 1_000_000),
            (Some(1_000_000), 5, 1_030_000),
            (Some(1_000_000), 5, 1_030_001),
            (Some(1_000_000), 60, 1_140_000),
            (Some(1_000_000), 60, 1_140_001),
        ] {
            assert_eq!(
                status(last, grace_ms(interval), now),
                liveness(last, interval, now),
                "{last:?} {interval} {now}"
            );
        }
    }
}
