//! The stacks each environment should run: a catalog of edge stacks and edge groups held in
//! memory (read again on `Change::Fleet`, `Change::Catalog` and `Change::Resync`), what an
//! environment needs of itself to be judged against it ([`EnvInputs`], kept with its state),
//! and the digest of that desired state ([`Catalog::digest`]): the one number check-in
//! answers carry while the agent has not acknowledged it. The digest is computed from what
//! decides the rendered files (stack, version, the stack's variables, the environment's
//! name, group, tags and variables), not from the files, so no file is rendered until an
//! agent fetches ([`Catalog::render`]).

use std::collections::{BTreeMap, HashMap};

use proto::stacks::{DesiredStack, StackSpec};
use sha2::{Digest, Sha256};
use store::{Collection, EdgeGroup, EdgeStack, EnvId, Environment, SharedStore, StoreError};

use crate::stack_vars::Vars;

/// What of an environment decides its desired state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EnvInputs {
    pub id: EnvId,
    pub group_id: Option<u64>,
    pub tag_ids: Vec<u64>,
    /// A hash of its name and its own variables (what its rendered files depend on).
    own: u64,
}

impl EnvInputs {
    pub fn of(env: &Environment) -> Self {
        let mut h = Sha256::new();
        h.update(env.name.as_bytes());
        for (k, v) in &env.variables {
            h.update([0]);
            h.update(k.as_bytes());
            h.update([1]);
            h.update(v.as_bytes());
        }
        Self {
            id: env.id,
            group_id: env.group_id,
            tag_ids: env.tag_ids.clone(),
            own: first_u64(&h.finalize()),
        }
    }
}

fn first_u64(bytes: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[..8]);
    u64::from_be_bytes(b)
}

/// Edge stacks and what they target, as one replica last read them.
#[derive(Debug, Default)]
pub struct Catalog {
    stacks: Vec<EdgeStack>,
    rollouts: HashMap<u64, store::Rollout>,
    groups: Vec<EdgeGroup>,
    group_tags: BTreeMap<u64, Vec<u64>>,
    tag_names: HashMap<u64, String>,
    group_names: HashMap<u64, String>,
    /// The compose files of the versions environments run now (each stack's rollout target
    /// and the version it started from), so a fetch reads none.
    files: HashMap<(u64, u32), std::sync::Arc<str>>,
}

impl Catalog {
    pub async fn load(store: &SharedStore) -> Result<Self, StoreError> {
        let stacks = store.list_edge_stacks().await?;
        let (groups, rollouts) = if stacks.is_empty() {
            (Vec::new(), HashMap::new())
        } else {
            (
                store.list_edge_groups().await?,
                store.stack_rollouts().await?.into_iter().collect(),
            )
        };
        let named = |list: Vec<store::Named>| list.into_iter().map(|n| (n.id, n.name)).collect();
        let mut files = HashMap::new();
        for s in &stacks {
            let versions = match rollouts.get(&s.id) {
                Some(r) => vec![r.to_version, r.from_version],
                None => vec![s.version],
            };
            for v in versions.into_iter().filter(|v| *v > 0) {
                if let Some(found) = store.stack_version(s.id, v).await? {
                    files.insert((s.id, v), std::sync::Arc::from(found.compose));
                }
            }
        }
        Ok(Self {
            files,
            stacks,
            rollouts,
            groups,
            group_tags: store.group_tags().await?,
            tag_names: named(store.list_named(Collection::Tags).await?),
            group_names: named(store.list_named(Collection::Groups).await?),
        })
    }

    /// Stack `stack`'s rollout.
    pub fn rollout(&self, stack: u64) -> Option<&store::Rollout> {
        self.rollouts.get(&stack)
    }

    /// Version `version` of stack `stack`'s compose file, if it is one environments run now.
    pub fn file(&self, stack: u64, version: u32) -> Option<std::sync::Arc<str>> {
        self.files.get(&(stack, version)).cloned()
    }

    /// The tags an environment counts as its own: its own and its group's.
    fn tags_of(&self, env: &EnvInputs) -> Vec<u64> {
        let mut tags = env.tag_ids.clone();
        if let Some(g) = env.group_id.and_then(|g| self.group_tags.get(&g)) {
            tags.extend(g);
        }
        tags
    }

    /// The stacks `env` should run, by id, with the version it should run: at most what an
    /// agent takes ([`proto::stacks::MAX_STACKS_PER_ENV`], the first by id).
    pub fn stacks_for(&self, env: &EnvInputs) -> Vec<(&EdgeStack, u32)> {
        let mut all = self.targeting(env);
        all.truncate(proto::stacks::MAX_STACKS_PER_ENV);
        all
    }

    /// Every stack that targets `env`, by id, with the version it should run (beyond
    /// [`proto::stacks::MAX_STACKS_PER_ENV`] too: those are not delivered).
    pub fn targeting(&self, env: &EnvInputs) -> Vec<(&EdgeStack, u32)> {
        if self.stacks.is_empty() {
            return Vec::new();
        }
        let tags = self.tags_of(env);
        let member_of: Vec<u64> = self
            .groups
            .iter()
            .filter(|g| crate::targets::is_member(g, env.id, &tags))
            .map(|g| g.id)
            .collect();
        let mut out: Vec<(&EdgeStack, u32)> = self
            .stacks
            .iter()
            .filter(|s| s.edge_group_ids.iter().any(|g| member_of.contains(g)))
            // Every stack gets its rollout when it is created; a read between the two
            // writes skips it rather than sending it out all at once.
            .filter_map(|s| {
                let r = self.rollouts.get(&s.id)?;
                Some((s, crate::rollout::version_for(r, s.id, env.id)))
            })
            // Version 0: not released to this environment, and nothing ran before.
            .filter(|(_, version)| *version > 0)
            .collect();
        out.sort_unstable_by_key(|(s, _)| s.id);
        out
    }

    /// The digest of what `env` should run; 0 when it should run nothing (which an agent
    /// without stacks holds from the start, so it is never told).
    pub fn digest(&self, env: &EnvInputs) -> u64 {
        let stacks = self.stacks_for(env);
        if stacks.is_empty() {
            return 0;
        }
        let mut h = Sha256::new();
        h.update(env.id.to_be_bytes());
        h.update(env.own.to_be_bytes());
        if let Some(g) = env.group_id {
            h.update(g.to_be_bytes());
            h.update(self.group_names.get(&g).map_or(&[][..], |n| n.as_bytes()));
        }
        for t in self.tags_of(env) {
            h.update(t.to_be_bytes());
            h.update(self.tag_names.get(&t).map_or(&[][..], |n| n.as_bytes()));
        }
        for (s, version) in stacks {
            h.update([2]);
            h.update(s.id.to_be_bytes());
            h.update(version.to_be_bytes());
            h.update(s.name.as_bytes());
            for (k, v) in &s.variables {
                h.update([0]);
                h.update(k.as_bytes());
                h.update([1]);
                h.update(v.as_bytes());
            }
        }
        // Never 0: that is "nothing".
        first_u64(&h.finalize()).max(1)
    }

    /// The substitutions of `stack`'s file for `env`.
    pub fn vars(&self, env: &Environment, stack: &EdgeStack) -> Vars {
        let mut tags: Vec<String> = env
            .tag_ids
            .iter()
            .filter_map(|t| self.tag_names.get(t).cloned())
            .collect();
        if let Some(g) = env.group_id.and_then(|g| self.group_tags.get(&g)) {
            tags.extend(g.iter().filter_map(|t| self.tag_names.get(t).cloned()));
        }
        Vars::new(
            env.id,
            &env.name,
            env.group_id
                .and_then(|g| self.group_names.get(&g))
                .map(String::as_str),
            &tags,
            &env.variables,
            &stack.variables,
        )
    }

    /// `compose` (a version of `stack`) rendered for `env`, and checked.
    pub fn render_file(
        &self,
        env: &Environment,
        stack: &EdgeStack,
        compose: &str,
    ) -> Result<String, String> {
        let file = self.vars(env, stack).render(compose)?;
        crate::api::compose::check_stack_file(&file)?;
        Ok(file)
    }

    /// `compose` (a version of `stack`) as `env`'s agent gets it: rendered, checked, and
    /// in the engine API's terms. `Err` says why it cannot run there (a missing variable).
    pub fn render(
        &self,
        env: &Environment,
        stack: &EdgeStack,
        version: u32,
        compose: &str,
    ) -> Result<DesiredStack, String> {
        let spec: StackSpec =
            crate::api::compose::stack_spec(&self.vars(env, stack).render(compose)?)?;
        Ok(DesiredStack {
            id: stack.id,
            name: stack.name.clone(),
            version,
            spec,
        })
    }
}

/// Where an environment's agent stands with its desired state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DesiredSync {
    /// What it should run (0: nothing).
    pub digest: u64,
    /// What its agent last acknowledged (a report carrying it); `None`: not heard since this
    /// state was built (a replica started, or the actor was swept), so the digest is
    /// announced even when it is 0 (on answers that have a body anyway: an agent's first
    /// check-in after a restart or errors), and an agent that missed a removal while it was
    /// away hears of it. Each agent acknowledges with one report.
    pub acked: Option<u64>,
}

impl DesiredSync {
    /// The digest to announce, while the agent has not acknowledged it.
    pub fn announce(&self) -> Option<u64> {
        (self.acked != Some(self.digest)).then_some(self.digest)
    }
}

#[cfg(test)]
mod tests {
    use store::TagMatch;

    use super::*;

    fn stack(id: u64, groups: &[u64], version: u32) -> EdgeStack {
        EdgeStack {
            id,
            name: format!("s{id}"),
            edge_group_ids: groups.to_vec(),
            variables: BTreeMap::new(),
            version,
            created_ms: 0,
        }
    }

    fn env(id: EnvId, tags: &[u64], group: Option<u64>) -> EnvInputs {
        EnvInputs {
            id,
            group_id: group,
            tag_ids: tags.to_vec(),
            own: 9,
        }
    }

    fn catalog() -> Catalog {
        Catalog {
            stacks: vec![stack(1, &[10], 2), stack(2, &[11], 1)],
            groups: vec![
                EdgeGroup {
                    id: 10,
                    name: "kiosks".into(),
                    dynamic: true,
                    tag_ids: vec![5],
                    tag_match: TagMatch::Any,
                    environment_ids: vec![],
                },
                EdgeGroup {
                    id: 11,
                    name: "static".into(),
                    dynamic: false,
                    tag_ids: vec![],
                    tag_match: TagMatch::Any,
                    environment_ids: vec![3],
                },
            ],
            group_tags: BTreeMap::from([(7, vec![5])]),
            rollouts: HashMap::from([(1, done(2)), (2, done(1))]),
            ..Default::default()
        }
    }

    /// A rollout that brought everyone to `version`.
    fn done(version: u32) -> store::Rollout {
        let mut r = crate::rollout::start(store::RolloutConfig::default(), 0, version, 0);
        r.threshold = u64::MAX;
        r.state = store::RolloutState::Done;
        r
    }

    #[test]
    fn an_environment_runs_the_stacks_of_its_groups_and_its_digest_follows_them() {
        let c = catalog();
        assert_eq!(
            c.digest(&env(1, &[], None)),
            0,
            "no stacks: nothing to tell"
        );
        let tagged = env(1, &[5], None);
        let by_group = env(1, &[], Some(7));
        assert_eq!(c.stacks_for(&tagged).len(), 1);
        // Its group's tags count as its own.
        let ids = |e: &EnvInputs| {
            c.stacks_for(e)
                .iter()
                .map(|(s, _)| s.id)
                .collect::<Vec<_>>()
        };
        assert_eq!(ids(&tagged), ids(&by_group));
        let both = env(3, &[5], None);
        assert_eq!(
            c.stacks_for(&both)
                .iter()
                .map(|(s, v)| (s.id, *v))
                .collect::<Vec<_>>(),
            vec![(1, 2), (2, 1)]
        );
        let before = c.digest(&tagged);
        assert_ne!(before, 0);
        let mut newer = catalog();
        newer.stacks[0].version = 3;
        newer.rollouts.insert(1, done(3));
        assert_ne!(
            newer.digest(&tagged),
            before,
            "a new version is a new digest"
        );
        let mut renamed = tagged.clone();
        renamed.own = 10;
        assert_ne!(c.digest(&renamed), before, "its own inputs count");
    }

    #[test]
    fn an_environment_gets_at_most_what_an_agent_takes() {
        let mut c = catalog();
        c.stacks = (1..=70).map(|id| stack(id, &[10], 1)).collect();
        c.rollouts = (1..=70).map(|id| (id, done(1))).collect();
        let e = env(1, &[5], None);
        assert_eq!(c.targeting(&e).len(), 70);
        let delivered = c.stacks_for(&e);
        assert_eq!(delivered.len(), proto::stacks::MAX_STACKS_PER_ENV);
        assert_eq!(
            delivered.last().map(|(s, _)| s.id),
            Some(64),
            "the first by id"
        );
    }

    #[test]
    fn the_digest_is_announced_until_acknowledged() {
        let mut s = DesiredSync::default();
        assert_eq!(s.announce(), Some(0), "not heard yet: even nothing is told");
        s.acked = Some(0);
        assert_eq!(s.announce(), None);
        s.digest = 7;
        assert_eq!(s.announce(), Some(7));
        s.acked = Some(7);
        assert_eq!(s.announce(), None);
        s.digest = 0;
        assert_eq!(s.announce(), Some(0), "a removal is told too");
    }
}
