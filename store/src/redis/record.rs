//! Stored forms that need more than serde: an environment without its id and binding, and a
//! tunnel location without the epoch its claim script adds.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{EPOCH_FIELD, JOIN_SECRET_FIELD};
use crate::{EdgeMode, EnvId, Environment, StoreError, TunnelLocation};

/// The stored form of an environment: everything but the id (the hash field) and the binding
/// (its own hash). Spelled out rather than derived from [`Environment`] so that adding a field
/// there fails to compile here until the layout is decided.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct EnvRecord {
    pub(super) name: String,
    pub(super) mode: EdgeMode,
    pub(super) checkin_interval: Option<u32>,
    pub(super) ping_interval: Option<u32>,
    pub(super) snapshot_interval: Option<u32>,
    pub(super) command_interval: Option<u32>,
    pub(super) group_id: Option<u64>,
    pub(super) tag_ids: Vec<u64>,
    pub(super) env_vars: Vec<String>,
    #[serde(default)]
    pub(super) variables: std::collections::BTreeMap<String, String>,
    pub(super) allow_self_signed: bool,
    pub(super) join_secret: String,
    pub(super) created_at_ms: u64,
}

impl EnvRecord {
    pub(super) fn from_env(env: &Environment) -> Self {
        let Environment {
            id: _,
            name,
            mode,
            checkin_interval,
            ping_interval,
            snapshot_interval,
            command_interval,
            group_id,
            tag_ids,
            env_vars,
            variables,
            allow_self_signed,
            join_secret,
            edge_id: _,
            created_at_ms,
        } = env.clone();
        Self {
            name,
            mode,
            checkin_interval,
            ping_interval,
            snapshot_interval,
            command_interval,
            group_id,
            tag_ids,
            env_vars,
            variables,
            allow_self_signed,
            join_secret,
            created_at_ms,
        }
    }

    pub(super) fn into_env(self, id: EnvId, edge_id: Option<Uuid>) -> Environment {
        Environment {
            id,
            name: self.name,
            mode: self.mode,
            checkin_interval: self.checkin_interval,
            ping_interval: self.ping_interval,
            snapshot_interval: self.snapshot_interval,
            command_interval: self.command_interval,
            group_id: self.group_id,
            tag_ids: self.tag_ids,
            env_vars: self.env_vars,
            variables: self.variables,
            allow_self_signed: self.allow_self_signed,
            join_secret: self.join_secret,
            edge_id,
            created_at_ms: self.created_at_ms,
        }
    }

    pub(super) fn encode(&self) -> Result<String, StoreError> {
        serde_json::to_string(self).map_err(|e| StoreError::corrupt_by("encoding environment", e))
    }

    /// The JSON of the record minus `joinSecret`, for `lua/update.lua` to add the stored one.
    /// Goes through a `serde_json::Value`, which keeps u64s exact.
    pub(super) fn encode_without_secret(&self) -> Result<String, StoreError> {
        let mut value = serde_json::to_value(self)
            .map_err(|e| StoreError::corrupt_by("encoding environment", e))?;
        // Fails loudly if the field is ever renamed: the script would otherwise write the
        // key twice, and the record would no longer decode.
        value
            .as_object_mut()
            .and_then(|fields| fields.remove(JOIN_SECRET_FIELD))
            .ok_or_else(|| {
                StoreError::corrupt(format!(
                    "encoding environment: no {JOIN_SECRET_FIELD:?} field to leave out"
                ))
            })?;
        serde_json::to_string(&value).map_err(|e| StoreError::corrupt_by("encoding environment", e))
    }

    pub(super) fn decode(id: EnvId, json: &str) -> Result<Self, StoreError> {
        serde_json::from_str(json)
            .map_err(|e| StoreError::corrupt_by(format!("environment {id}"), e))
    }
}

pub(super) fn decode_edge_id(id: EnvId, text: &str) -> Result<Uuid, StoreError> {
    Uuid::parse_str(text)
        .map_err(|e| StoreError::corrupt_by(format!("binding of environment {id}"), e))
}

/// The JSON of a location without its epoch, for `lua/claim.lua` to add it.
pub(super) fn encode_location_without_epoch(loc: &TunnelLocation) -> Result<String, StoreError> {
    let mut value = serde_json::to_value(loc)
        .map_err(|e| StoreError::corrupt_by("encoding tunnel location", e))?;
    // Fails loudly if the field is ever renamed: the script would otherwise write it twice.
    value
        .as_object_mut()
        .and_then(|fields| fields.remove(EPOCH_FIELD))
        .ok_or_else(|| {
            StoreError::corrupt(format!(
                "encoding tunnel location: no {EPOCH_FIELD:?} field to leave out"
            ))
        })?;
    serde_json::to_string(&value).map_err(|e| StoreError::corrupt_by("encoding tunnel location", e))
}

pub(super) fn decode_location(env: EnvId, json: &str) -> Result<TunnelLocation, StoreError> {
    let loc: TunnelLocation = serde_json::from_str(json)
        .map_err(|e| StoreError::corrupt_by(format!("tunnel location of environment {env}"), e))?;
    if loc.env != env {
        return Err(StoreError::corrupt(format!(
            "tunnel location of environment {env} is stored for environment {}",
            loc.env
        )));
    }
    Ok(loc)
}
