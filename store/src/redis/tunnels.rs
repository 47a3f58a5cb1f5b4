//! [`TunnelStore`] on Redis: grants (GETDEL), tunnel locations with their epochs (claim,
//! renew and release scripts), gateway registrations, the cluster secret.

use std::time::Duration;

use async_trait::async_trait;
use deadpool_redis::redis;
use rand::RngCore;

use super::record::{decode_location, encode_location_without_epoch};
use super::{redis_err, ttl_ms, RedisStore, RENEW_CHUNK};
use crate::{EnvId, GatewayInfo, StoreError, TunnelGrant, TunnelLocation, TunnelStore};

#[async_trait]
impl TunnelStore for RedisStore {
    async fn put_tunnel_grant(
        &self,
        token_hash: &[u8; 32],
        grant: &TunnelGrant,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let json = serde_json::to_string(grant)
            .map_err(|e| StoreError::corrupt_by("encoding tunnel grant", e))?;
        let mut conn = self.conn().await?;
        redis::cmd("SET")
            .arg(self.keys.grant(token_hash))
            .arg(json)
            .arg("PX")
            .arg(ttl_ms(ttl))
            .query_async::<()>(&mut conn)
            .await
            .map_err(redis_err)
    }

    async fn take_tunnel_grant(
        &self,
        token_hash: &[u8; 32],
    ) -> Result<Option<TunnelGrant>, StoreError> {
        let mut conn = self.conn().await?;
        // GETDEL is atomic: of two concurrent takes, one gets the value and the other nil.
        let json: Option<String> = redis::cmd("GETDEL")
            .arg(self.keys.grant(token_hash))
            .query_async(&mut conn)
            .await
            .map_err(redis_err)?;
        json.map(|json| {
            serde_json::from_str(&json).map_err(|e| StoreError::corrupt_by("tunnel grant", e))
        })
        .transpose()
    }

    async fn claim_tunnel(
        &self,
        env: EnvId,
        gateway_id: &str,
        dial_addr: &str,
        since_ms: u64,
        lease: Duration,
    ) -> Result<TunnelLocation, StoreError> {
        let mut location = TunnelLocation {
            env,
            gateway_id: gateway_id.to_owned(),
            dial_addr: dial_addr.to_owned(),
            epoch: 0,
            since_ms,
        };
        let json = encode_location_without_epoch(&location)?;
        let mut conn = self.conn().await?;
        location.epoch = self
            .scripts
            .claim
            .key(self.keys.tunnel(env))
            .key(&self.keys.tunnel_seq)
            .arg(json)
            .arg(ttl_ms(lease))
            .invoke_async(&mut conn)
            .await
            .map_err(redis_err)?;
        Ok(location)
    }

    async fn renew_tunnels(
        &self,
        gateway_id: &str,
        held: &[(EnvId, u64)],
        lease: Duration,
    ) -> Result<Vec<EnvId>, StoreError> {
        if held.is_empty() {
            return Ok(Vec::new());
        }
        let lease = ttl_ms(lease);
        let mut conn = self.conn().await?;
        let mut lost = Vec::new();
        for chunk in held.chunks(RENEW_CHUNK) {
            let mut call = self.scripts.renew.prepare_invoke();
            call.arg(gateway_id).arg(lease);
            for (env, epoch) in chunk {
                call.key(self.keys.tunnel(*env)).arg(epoch);
            }
            let positions: Vec<usize> = call.invoke_async(&mut conn).await.map_err(redis_err)?;
            for pos in positions {
                let (env, _) = pos
                    .checked_sub(1)
                    .and_then(|i| chunk.get(i))
                    .ok_or_else(|| {
                        StoreError::corrupt(format!("renew: script returned position {pos}"))
                    })?;
                lost.push(*env);
            }
        }
        Ok(lost)
    }

    async fn release_tunnel(&self, env: EnvId, epoch: u64) -> Result<bool, StoreError> {
        let mut conn = self.conn().await?;
        let outcome: i64 = self
            .scripts
            .release
            .key(self.keys.tunnel(env))
            .arg(epoch)
            .invoke_async(&mut conn)
            .await
            .map_err(redis_err)?;
        match outcome {
            1 => Ok(true),
            0 => Ok(false),
            _ => Err(StoreError::corrupt(format!(
                "tunnel location of environment {env} is unreadable"
            ))),
        }
    }

    async fn tunnel_locations(
        &self,
        ids: &[EnvId],
    ) -> Result<Vec<Option<TunnelLocation>>, StoreError> {
        if ids.is_empty() {
            // MGET needs at least one key.
            return Ok(Vec::new());
        }
        let keys: Vec<String> = ids.iter().map(|id| self.keys.tunnel(*id)).collect();
        let mut conn = self.conn().await?;
        let values: Vec<Option<String>> = redis::cmd("MGET")
            .arg(&keys)
            .query_async(&mut conn)
            .await
            .map_err(redis_err)?;
        if values.len() != ids.len() {
            return Err(StoreError::corrupt(format!(
                "MGET returned {} values for {} keys",
                values.len(),
                ids.len()
            )));
        }
        ids.iter()
            .zip(values)
            .map(|(id, v)| v.map(|json| decode_location(*id, &json)).transpose())
            .collect()
    }

    async fn register_gateway(
        &self,
        info: &GatewayInfo,
        lease: Duration,
    ) -> Result<(), StoreError> {
        let json = serde_json::to_string(info)
            .map_err(|e| StoreError::corrupt_by("encoding gateway", e))?;
        let mut conn = self.conn().await?;
        // MULTI/EXEC: listed in the set whenever its key exists.
        redis::pipe()
            .atomic()
            .cmd("SET")
            .arg(self.keys.gateway(&info.id))
            .arg(json)
            .arg("PX")
            .arg(ttl_ms(lease))
            .ignore()
            .cmd("SADD")
            .arg(&self.keys.gateways)
            .arg(&info.id)
            .ignore()
            .query_async::<()>(&mut conn)
            .await
            .map_err(redis_err)
    }

    async fn unregister_gateway(&self, id: &str) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        redis::pipe()
            .atomic()
            .cmd("DEL")
            .arg(self.keys.gateway(id))
            .ignore()
            .cmd("SREM")
            .arg(&self.keys.gateways)
            .arg(id)
            .ignore()
            .query_async::<()>(&mut conn)
            .await
            .map_err(redis_err)
    }

    async fn live_gateways(&self) -> Result<Vec<GatewayInfo>, StoreError> {
        let mut conn = self.conn().await?;
        let ids: Vec<String> = redis::cmd("SMEMBERS")
            .arg(&self.keys.gateways)
            .query_async(&mut conn)
            .await
            .map_err(redis_err)?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = ids.iter().map(|id| self.keys.gateway(id)).collect();
        let values: Vec<Option<String>> = redis::cmd("MGET")
            .arg(&keys)
            .query_async(&mut conn)
            .await
            .map_err(redis_err)?;
        if values.len() != ids.len() {
            return Err(StoreError::corrupt(format!(
                "MGET returned {} values for {} keys",
                values.len(),
                ids.len()
            )));
        }
        let mut live = Vec::with_capacity(ids.len());
        let mut expired = Vec::new();
        for ((id, key), value) in ids.iter().zip(&keys).zip(values) {
            match value {
                Some(json) => {
                    let info: GatewayInfo = serde_json::from_str(&json)
                        .map_err(|e| StoreError::corrupt_by(format!("gateway {id:?}"), e))?;
                    live.push(info);
                }
                None => expired.push((id, key)),
            }
        }
        if !expired.is_empty() {
            // The script re-checks each key, so a gateway registering again right now stays.
            let mut call = self.scripts.prune_gateways.prepare_invoke();
            call.key(&self.keys.gateways);
            for (id, key) in expired {
                call.key(key).arg(id);
            }
            call.invoke_async::<i64>(&mut conn)
                .await
                .map_err(redis_err)?;
        }
        live.sort_unstable_by(|a, b| a.id.cmp(&b.id));
        Ok(live)
    }

    async fn cluster_secret(&self) -> Result<[u8; 32], StoreError> {
        let mut fresh = [0u8; 32];
        rand::rngs::OsRng
            .try_fill_bytes(&mut fresh)
            .map_err(|e| StoreError::unavailable_by("no randomness for the secret", e))?;
        let mut conn = self.conn().await?;
        // SET NX: the first caller's secret stays, and everybody reads that one back.
        let (stored,): (Option<Vec<u8>>,) = redis::pipe()
            .atomic()
            .cmd("SET")
            .arg(&self.keys.cluster_secret)
            .arg(fresh.as_slice())
            .arg("NX")
            .ignore()
            .cmd("GET")
            .arg(&self.keys.cluster_secret)
            .query_async(&mut conn)
            .await
            .map_err(redis_err)?;
        let stored = stored.ok_or_else(|| {
            StoreError::unavailable(format!(
                "{} vanished right after SET",
                self.keys.cluster_secret
            ))
        })?;
        <[u8; 32]>::try_from(stored.as_slice()).map_err(|_| {
            StoreError::corrupt(format!(
                "{}: expected 32 bytes, found {}",
                self.keys.cluster_secret,
                stored.len()
            ))
        })
    }
}
