//! [`CatalogStore`] on redb: groups and tags, settings, admin key hashes.

use std::collections::{BTreeMap, BTreeSet};

use async_trait::async_trait;
use redb::{Durability, ReadableTable, TableDefinition};

use super::records::reserve_ids;
use super::{
    db_err, EmbeddedStore, ADMIN_KEY_HASHES, GROUPS, GROUP_TAGS, META, META_NEXT_GROUP_ID,
    META_NEXT_TAG_ID, META_SETTINGS, TAGS,
};
use crate::{CatalogStore, Collection, Named, Settings, StoreError};

fn named_table(coll: Collection) -> (TableDefinition<'static, u64, &'static str>, &'static str) {
    match coll {
        Collection::Groups => (GROUPS, META_NEXT_GROUP_ID),
        Collection::Tags => (TAGS, META_NEXT_TAG_ID),
    }
}

fn coll_name(coll: Collection) -> &'static str {
    match coll {
        Collection::Groups => "group",
        Collection::Tags => "tag",
    }
}

/// The id holding `name` in a named table, if any. Collections are small (tens to hundreds of
/// entries), so a scan inside the write transaction is cheaper than maintaining an index.
fn find_name(
    table: &impl ReadableTable<u64, &'static str>,
    name: &str,
) -> Result<Option<u64>, StoreError> {
    for entry in table.iter().map_err(db_err)? {
        let (id, n) = entry.map_err(db_err)?;
        if n.value() == name {
            return Ok(Some(id.value()));
        }
    }
    Ok(None)
}

#[async_trait]
impl CatalogStore for EmbeddedStore {
    async fn create_named(&self, coll: Collection, name: &str) -> Result<Named, StoreError> {
        let name = name.to_owned();
        self.write(Durability::Immediate, move |tx| {
            let (def, counter) = named_table(coll);
            let mut table = tx.open_table(def).map_err(db_err)?;
            if find_name(&table, &name)?.is_some() {
                // The error aborts the transaction, so no id is burnt either.
                return Err(StoreError::Conflict(format!(
                    "a {} named {name:?} already exists",
                    coll_name(coll)
                )));
            }
            let id = reserve_ids(tx, counter, 1)?;
            table.insert(id, name.as_str()).map_err(db_err)?;
            Ok((Named { id, name }, true))
        })
        .await
    }

    async fn list_named(&self, coll: Collection) -> Result<Vec<Named>, StoreError> {
        self.blocking(move |db| {
            let tx = db.begin_read().map_err(db_err)?;
            let table = tx.open_table(named_table(coll).0).map_err(db_err)?;
            let mut out = Vec::new();
            for entry in table.iter().map_err(db_err)? {
                let (id, name) = entry.map_err(db_err)?;
                out.push(Named {
                    id: id.value(),
                    name: name.value().to_owned(),
                });
            }
            Ok(out)
        })
        .await
    }

    async fn rename_named(
        &self,
        coll: Collection,
        id: u64,
        name: &str,
    ) -> Result<Option<Named>, StoreError> {
        let name = name.to_owned();
        self.write(Durability::Immediate, move |tx| {
            let mut table = tx.open_table(named_table(coll).0).map_err(db_err)?;
            if table.get(id).map_err(db_err)?.is_none() {
                return Ok((None, false));
            }
            match find_name(&table, &name)? {
                // Renaming to its own name is a no-op, not a conflict.
                Some(holder) if holder == id => return Ok((Some(Named { id, name }), false)),
                Some(_) => {
                    return Err(StoreError::Conflict(format!(
                        "a {} named {name:?} already exists",
                        coll_name(coll)
                    )));
                }
                None => {}
            }
            table.insert(id, name.as_str()).map_err(db_err)?;
            Ok((Some(Named { id, name }), true))
        })
        .await
    }

    async fn delete_named(&self, coll: Collection, id: u64) -> Result<bool, StoreError> {
        self.write(Durability::Immediate, move |tx| {
            let existed = tx
                .open_table(named_table(coll).0)
                .map_err(db_err)?
                .remove(id)
                .map_err(db_err)?
                .is_some();
            if existed && coll == Collection::Groups {
                tx.open_table(GROUP_TAGS)
                    .map_err(db_err)?
                    .remove(id)
                    .map_err(db_err)?;
            }
            Ok((existed, existed))
        })
        .await
    }

    async fn group_tags(&self) -> Result<BTreeMap<u64, Vec<u64>>, StoreError> {
        self.blocking(|db| {
            let tx = db.begin_read().map_err(db_err)?;
            let table = tx.open_table(GROUP_TAGS).map_err(db_err)?;
            let mut out = BTreeMap::new();
            for entry in table.iter().map_err(db_err)? {
                let (id, tags) = entry.map_err(db_err)?;
                let tags: Vec<u64> = serde_json::from_slice(tags.value()).map_err(|e| {
                    StoreError::corrupt_by(format!("tags of group {}", id.value()), e)
                })?;
                out.insert(id.value(), tags);
            }
            Ok(out)
        })
        .await
    }

    async fn set_group_tags(&self, group: u64, tags: &[u64]) -> Result<bool, StoreError> {
        let tags: BTreeSet<u64> = tags.iter().copied().collect();
        let bytes = serde_json::to_vec(&tags).map_err(|e| StoreError::corrupt_by("tags", e))?;
        self.write(Durability::Immediate, move |tx| {
            if tx
                .open_table(GROUPS)
                .map_err(db_err)?
                .get(group)
                .map_err(db_err)?
                .is_none()
            {
                return Ok((false, false));
            }
            let mut table = tx.open_table(GROUP_TAGS).map_err(db_err)?;
            if tags.is_empty() {
                table.remove(group).map_err(db_err)?;
            } else {
                table.insert(group, bytes.as_slice()).map_err(db_err)?;
            }
            Ok((true, true))
        })
        .await
    }

    async fn settings(&self) -> Result<Settings, StoreError> {
        self.blocking(|db| {
            let tx = db.begin_read().map_err(db_err)?;
            let meta = tx.open_table(META).map_err(db_err)?;
            match meta.get(META_SETTINGS).map_err(db_err)? {
                Some(v) => serde_json::from_slice(v.value())
                    .map_err(|e| StoreError::corrupt_by("settings", e)),
                None => Ok(Settings::default()),
            }
        })
        .await
    }

    async fn put_settings(&self, settings: &Settings) -> Result<(), StoreError> {
        let bytes =
            serde_json::to_vec(settings).map_err(|e| StoreError::corrupt_by("settings", e))?;
        self.write(Durability::Immediate, move |tx| {
            tx.open_table(META)
                .map_err(db_err)?
                .insert(META_SETTINGS, bytes.as_slice())
                .map_err(db_err)?;
            Ok(((), true))
        })
        .await
    }

    async fn admin_key_hashes(&self) -> Result<Vec<[u8; 32]>, StoreError> {
        self.blocking(|db| {
            let tx = db.begin_read().map_err(db_err)?;
            let table = tx.open_table(ADMIN_KEY_HASHES).map_err(db_err)?;
            let mut out = Vec::new();
            for entry in table.iter().map_err(db_err)? {
                let (hash, ()) = entry
                    .map(|(k, v)| (*k.value(), v.value()))
                    .map_err(db_err)?;
                out.push(hash);
            }
            Ok(out)
        })
        .await
    }

    async fn replace_admin_key_hashes(&self, hashes: &[[u8; 32]]) -> Result<(), StoreError> {
        let wanted: BTreeSet<[u8; 32]> = hashes.iter().copied().collect();
        self.write(Durability::Immediate, move |tx| {
            let mut table = tx.open_table(ADMIN_KEY_HASHES).map_err(db_err)?;
            // Drop what is not wanted, add what is missing; `changed` stays false when the set
            // is already right (every restart with the same key), which skips the commit.
            let mut changed = false;
            table
                .retain(|hash, ()| {
                    let keep = wanted.contains(hash);
                    changed |= !keep;
                    keep
                })
                .map_err(db_err)?;
            for hash in &wanted {
                if table.insert(hash, ()).map_err(db_err)?.is_none() {
                    changed = true;
                }
            }
            Ok(((), changed))
        })
        .await
    }
}
