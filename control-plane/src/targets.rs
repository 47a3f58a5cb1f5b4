//! Which environments an edge stack targets, and which stacks an environment should run:
//! the union of the members of the stack's edge groups (static: listed; dynamic: the
//! environments with any or all of the group's tags, their own or their group's). Pure rules
//! here ([`stacks_for`]), the fleet-wide side from the directory's index ([`targeted_by`]).

use std::collections::BTreeMap;

use store::{EdgeGroup, EdgeStack, EnvId, StoreError, TagMatch};

use crate::api::AppState;

/// Whether environment `env` (with `tags`, its own and its group's) is in `group`.
pub fn is_member(group: &EdgeGroup, env: EnvId, tags: &[u64]) -> bool {
    if group.dynamic {
        match group.tag_match {
            TagMatch::Any => group.tag_ids.iter().any(|t| tags.contains(t)),
            TagMatch::All => {
                !group.tag_ids.is_empty() && group.tag_ids.iter().all(|t| tags.contains(t))
            }
        }
    } else {
        group.environment_ids.binary_search(&env).is_ok()
    }
}

/// The stacks environment `env` should run, with their newest versions, by stack id.
pub fn stacks_for(
    env: EnvId,
    tags: &[u64],
    groups: &[EdgeGroup],
    stacks: &[EdgeStack],
) -> Vec<(u64, u32)> {
    let member_of: Vec<u64> = groups
        .iter()
        .filter(|g| is_member(g, env, tags))
        .map(|g| g.id)
        .collect();
    let mut out: Vec<(u64, u32)> = stacks
        .iter()
        .filter(|s| s.edge_group_ids.iter().any(|g| member_of.contains(g)))
        .map(|s| (s.id, s.version))
        .collect();
    out.sort_unstable();
    out
}

/// Every environment `stack` targets, ascending.
pub async fn targeted_by(state: &AppState, stack: &EdgeStack) -> Result<Vec<EnvId>, StoreError> {
    let mut all: Vec<EnvId> = Vec::new();
    for &g in &stack.edge_group_ids {
        // (A group deleted meanwhile targets nothing: deleting a targeted group is refused.)
        let Some(group) = state.store.edge_group(g).await? else {
            continue;
        };
        if group.dynamic {
            let page = state
                .directory
                .tagged(&group.tag_ids, group.tag_match, 0, usize::MAX)
                .await?;
            all.extend(page.items.into_iter().map(|(id, _)| id));
        } else {
            all.extend(group.environment_ids);
        }
    }
    all.sort_unstable();
    all.dedup();
    Ok(all)
}

/// A stack's counts for one version, by status name: what its environments reported for it,
/// and `pending` for the targeted ones that reported nothing for it yet.
pub fn counts_for_version(
    targeted: usize,
    reported: &[store::StatusCount],
    version: u32,
) -> BTreeMap<&'static str, u64> {
    let mut out = BTreeMap::new();
    let mut reported_total = 0u64;
    for c in reported.iter().filter(|c| c.version == version) {
        *out.entry(status_name(c.status)).or_insert(0) += c.count;
        reported_total += c.count;
    }
    let pending = (targeted as u64).saturating_sub(reported_total);
    if pending > 0 {
        *out.entry("pending").or_insert(0) += pending;
    }
    out
}

/// A status as the API spells it.
pub fn status_name(s: store::DeployStatus) -> &'static str {
    use store::DeployStatus as S;
    match s {
        S::Pending => "pending",
        S::Acknowledged => "acknowledged",
        S::ImagesPulled => "imagesPulled",
        S::Deploying => "deploying",
        S::Running => "running",
        S::Error => "error",
        S::Removing => "removing",
        S::Removed => "removed",
    }
}

#[cfg(test)]
mod tests {
    use store::{DeployStatus, StatusCount};

    use super::*;

    fn group(id: u64, dynamic: bool, tags: &[u64], how: TagMatch, envs: &[u64]) -> EdgeGroup {
        EdgeGroup {
            id,
            name: format!("g{id}"),
            dynamic,
            tag_ids: tags.to_vec(),
            tag_match: how,
            environment_ids: envs.to_vec(),
        }
    }

    fn stack(id: u64, version: u32, groups: &[u64]) -> EdgeStack {
        EdgeStack {
            id,
            name: format!("s{id}"),
            edge_group_ids: groups.to_vec(),
            variables: BTreeMap::new(),
            version,
            created_ms: 0,
        }
    }

    #[test]
    fn an_environment_runs_the_stacks_of_every_group_it_is_in() {
        let groups = [
            group(1, false, &[], TagMatch::Any, &[3, 5, 8]),
            group(2, true, &[10, 20], TagMatch::Any, &[]),
            group(3, true, &[10, 20], TagMatch::All, &[]),
        ];
        let stacks = [
            stack(7, 2, &[1]),
            stack(4, 1, &[2]),
            stack(9, 5, &[3]),
            stack(6, 1, &[1, 3]),
            stack(8, 1, &[]),
        ];
        // Static member, no tags: the static group's stacks.
        assert_eq!(stacks_for(5, &[], &groups, &stacks), vec![(6, 1), (7, 2)]);
        // One of the tags: `any`, not `all`.
        assert_eq!(stacks_for(2, &[20], &groups, &stacks), vec![(4, 1)]);
        // Both tags and a static member: every stack of every group, each once.
        assert_eq!(
            stacks_for(8, &[10, 20, 30], &groups, &stacks),
            vec![(4, 1), (6, 1), (7, 2), (9, 5)]
        );
        assert!(stacks_for(99, &[30], &groups, &stacks).is_empty());
        // A dynamic group without tags (refused by the API) selects nothing.
        let empty = [group(1, true, &[], TagMatch::All, &[])];
        assert!(stacks_for(1, &[10], &empty, &[stack(1, 1, &[1])]).is_empty());
    }

    #[test]
    fn counts_of_a_version_add_the_silent_targets_as_pending() {
        let c = |status, version, count| StatusCount {
            status,
            version,
            count,
        };
        let reported = [
            c(DeployStatus::Running, 1, 4),
            c(DeployStatus::Running, 2, 3),
            c(DeployStatus::Error, 2, 1),
            c(DeployStatus::Pending, 2, 1),
        ];
        let v2 = counts_for_version(10, &reported, 2);
        assert_eq!(
            v2,
            BTreeMap::from([("error", 1), ("pending", 6), ("running", 3)])
        );
        // Nothing reported for a version: all pending; none targeted: nothing.
        assert_eq!(
            counts_for_version(3, &reported, 3),
            BTreeMap::from([("pending", 3)])
        );
        assert!(counts_for_version(0, &[], 1).is_empty());
    }
}
