//! [`TunnelStore`] of the embedded backend: what lives only as long as a lease (grants, tunnel
//! locations, gateway registrations) stays in memory with an [`Instant`] deadline; only the
//! cluster secret is written to the file.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rand::RngCore;
use redb::{Durability, ReadableTable};

use super::{db_err, EmbeddedStore, LONGEST_LEASE, META, META_CLUSTER_SECRET, PURGE_INTERVAL};
use crate::{EnvId, GatewayInfo, StoreError, TunnelGrant, TunnelLocation, TunnelStore};

/// Everything that lives only as long as a lease; see the module doc.
pub(super) struct Leases {
    grants: HashMap<[u8; 32], (TunnelGrant, Instant)>,
    tunnels: HashMap<EnvId, (TunnelLocation, Instant)>,
    gateways: HashMap<String, (GatewayInfo, Instant)>,
    /// The last tunnel epoch handed out (for any environment).
    last_epoch: u64,
    next_purge: Instant,
}

impl Leases {
    pub(super) fn new() -> Self {
        Self {
            grants: HashMap::new(),
            tunnels: HashMap::new(),
            gateways: HashMap::new(),
            last_epoch: clock_epoch(),
            next_purge: Instant::now() + PURGE_INTERVAL,
        }
    }

    /// Drops every expired entry, at most once per [`PURGE_INTERVAL`]: reads check deadlines
    /// themselves, this only keeps abandoned entries from piling up.
    fn purge(&mut self, now: Instant) {
        if now < self.next_purge {
            return;
        }
        self.grants.retain(|_, (_, deadline)| *deadline > now);
        self.tunnels.retain(|_, (_, deadline)| *deadline > now);
        self.gateways.retain(|_, (_, deadline)| *deadline > now);
        self.next_purge = now + PURGE_INTERVAL;
    }

    /// The live location of `env`, if any.
    fn live_tunnel(&self, env: EnvId, now: Instant) -> Option<&TunnelLocation> {
        self.tunnels
            .get(&env)
            .filter(|(_, deadline)| *deadline > now)
            .map(|(loc, _)| loc)
    }
}

/// The clock in microseconds since the Unix epoch (0 if it is set before 1970): the floor of
/// every tunnel epoch, so epochs keep growing across restarts. Microseconds leave room for a
/// million claims a second before the counter runs ahead of the clock, and stay below 2^53
/// (exact in a double, e.g. in JavaScript) until the 23rd century.
fn clock_epoch() -> u64 {
    proto::clock::now_us()
}

/// When a lease of `ttl` taken at `now` ends.
fn deadline(now: Instant, ttl: Duration) -> Instant {
    now.checked_add(ttl.min(LONGEST_LEASE)).unwrap_or(now)
}

#[async_trait]
impl TunnelStore for EmbeddedStore {
    async fn put_tunnel_grant(
        &self,
        token_hash: &[u8; 32],
        grant: &TunnelGrant,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let now = Instant::now();
        let mut leases = self.leases();
        leases.purge(now);
        leases
            .grants
            .insert(*token_hash, (grant.clone(), deadline(now, ttl)));
        Ok(())
    }

    async fn take_tunnel_grant(
        &self,
        token_hash: &[u8; 32],
    ) -> Result<Option<TunnelGrant>, StoreError> {
        let now = Instant::now();
        let mut leases = self.leases();
        leases.purge(now);
        // Removed either way: an expired grant is of no use to anyone.
        Ok(leases
            .grants
            .remove(token_hash)
            .filter(|(_, deadline)| *deadline > now)
            .map(|(grant, _)| grant))
    }

    async fn claim_tunnel(
        &self,
        env: EnvId,
        gateway_id: &str,
        dial_addr: &str,
        since_ms: u64,
        lease: Duration,
    ) -> Result<TunnelLocation, StoreError> {
        let now = Instant::now();
        let mut leases = self.leases();
        leases.purge(now);
        let epoch = leases
            .last_epoch
            .checked_add(1)
            .ok_or_else(|| StoreError::corrupt("tunnel epochs exhausted"))?
            .max(clock_epoch());
        leases.last_epoch = epoch;
        let location = TunnelLocation {
            env,
            gateway_id: gateway_id.to_owned(),
            dial_addr: dial_addr.to_owned(),
            epoch,
            since_ms,
        };
        leases
            .tunnels
            .insert(env, (location.clone(), deadline(now, lease)));
        Ok(location)
    }

    async fn renew_tunnels(
        &self,
        gateway_id: &str,
        held: &[(EnvId, u64)],
        lease: Duration,
    ) -> Result<Vec<EnvId>, StoreError> {
        let now = Instant::now();
        let mut leases = self.leases();
        leases.purge(now);
        let until = deadline(now, lease);
        let mut lost = Vec::new();
        for &(env, epoch) in held {
            match leases.tunnels.get_mut(&env) {
                Some((loc, deadline))
                    if *deadline > now && loc.epoch == epoch && loc.gateway_id == gateway_id =>
                {
                    *deadline = until;
                }
                _ => lost.push(env),
            }
        }
        Ok(lost)
    }

    async fn release_tunnel(&self, env: EnvId, epoch: u64) -> Result<bool, StoreError> {
        let now = Instant::now();
        let mut leases = self.leases();
        leases.purge(now);
        if leases
            .live_tunnel(env, now)
            .is_some_and(|loc| loc.epoch == epoch)
        {
            leases.tunnels.remove(&env);
            return Ok(true);
        }
        Ok(false)
    }

    async fn tunnel_locations(
        &self,
        ids: &[EnvId],
    ) -> Result<Vec<Option<TunnelLocation>>, StoreError> {
        let now = Instant::now();
        let leases = self.leases();
        Ok(ids
            .iter()
            .map(|&env| leases.live_tunnel(env, now).cloned())
            .collect())
    }

    async fn register_gateway(
        &self,
        info: &GatewayInfo,
        lease: Duration,
    ) -> Result<(), StoreError> {
        let now = Instant::now();
        let mut leases = self.leases();
        leases.purge(now);
        leases
            .gateways
            .insert(info.id.clone(), (info.clone(), deadline(now, lease)));
        Ok(())
    }

    async fn unregister_gateway(&self, id: &str) -> Result<(), StoreError> {
        self.leases().gateways.remove(id);
        Ok(())
    }

    async fn live_gateways(&self) -> Result<Vec<GatewayInfo>, StoreError> {
        let now = Instant::now();
        let mut leases = self.leases();
        leases.purge(now);
        let mut live: Vec<GatewayInfo> = leases
            .gateways
            .values()
            .filter(|(_, deadline)| *deadline > now)
            .map(|(info, _)| info.clone())
            .collect();
        drop(leases);
        live.sort_unstable_by(|a, b| a.id.cmp(&b.id));
        Ok(live)
    }

    async fn cluster_secret(&self) -> Result<[u8; 32], StoreError> {
        fn decode(bytes: &[u8]) -> Result<[u8; 32], StoreError> {
            <[u8; 32]>::try_from(bytes).map_err(|_| {
                StoreError::corrupt(format!(
                    "meta {META_CLUSTER_SECRET}: expected 32 bytes, found {}",
                    bytes.len()
                ))
            })
        }

        let stored = self
            .blocking(|db| {
                let tx = db.begin_read().map_err(db_err)?;
                let meta = tx.open_table(META).map_err(db_err)?;
                let value = meta.get(META_CLUSTER_SECRET).map_err(db_err)?;
                value.map(|v| decode(v.value())).transpose()
            })
            .await?;
        if let Some(secret) = stored {
            return Ok(secret);
        }
        let mut fresh = [0u8; 32];
        rand::rngs::OsRng
            .try_fill_bytes(&mut fresh)
            .map_err(|e| StoreError::unavailable_by("no randomness for the secret", e))?;
        // Checked again inside the write transaction: of two first callers, the second one
        // gets the secret the first one stored.
        self.write(Durability::Immediate, move |tx| {
            let mut meta = tx.open_table(META).map_err(db_err)?;
            let existing = meta
                .get(META_CLUSTER_SECRET)
                .map_err(db_err)?
                .map(|v| decode(v.value()))
                .transpose()?;
            if let Some(secret) = existing {
                return Ok((secret, false));
            }
            meta.insert(META_CLUSTER_SECRET, fresh.as_slice())
                .map_err(db_err)?;
            Ok((fresh, true))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn location(env: EnvId) -> TunnelLocation {
        TunnelLocation {
            env,
            gateway_id: "gw".to_owned(),
            dial_addr: "gw:1".to_owned(),
            epoch: 1,
            since_ms: 0,
        }
    }

    #[test]
    fn purge_drops_expired_leases_but_not_too_often() {
        let mut leases = Leases::new();
        let now = Instant::now();
        let (past, future) = (now, now + Duration::from_secs(60));
        let grant = TunnelGrant {
            env: 1,
            edge_id: Uuid::nil(),
            expires_ms: 0,
        };
        leases.grants.insert([1; 32], (grant.clone(), past));
        leases.grants.insert([2; 32], (grant, future));
        leases.tunnels.insert(1, (location(1), past));
        leases.tunnels.insert(2, (location(2), future));
        let gw = GatewayInfo {
            id: "gw".to_owned(),
            public_addr: "gw:443".to_owned(),
            dial_addr: "gw:1".to_owned(),
            tunnels: 0,
        };
        leases.gateways.insert("old".to_owned(), (gw.clone(), past));
        leases.gateways.insert("new".to_owned(), (gw, future));

        // Not yet time for a sweep: nothing is touched.
        leases.purge(now);
        assert_eq!(
            (
                leases.grants.len(),
                leases.tunnels.len(),
                leases.gateways.len()
            ),
            (2, 2, 2)
        );

        let later = now + PURGE_INTERVAL;
        leases.purge(later);
        assert!(leases.grants.contains_key(&[2; 32]) && leases.grants.len() == 1);
        assert!(leases.tunnels.contains_key(&2) && leases.tunnels.len() == 1);
        assert!(leases.gateways.contains_key("new") && leases.gateways.len() == 1);
        assert_eq!(leases.next_purge, later + PURGE_INTERVAL);
        assert!(leases.live_tunnel(2, later).is_some());
        assert!(
            leases.live_tunnel(2, future).is_none(),
            "a deadline is exclusive"
        );
    }

    #[test]
    fn epochs_start_from_the_clock() {
        let before = clock_epoch();
        let leases = Leases::new();
        assert!(leases.last_epoch >= before);
        assert!(before > 1_600_000_000_000_000, "microseconds: {before}");
    }

    #[test]
    fn huge_leases_do_not_overflow() {
        let now = Instant::now();
        assert!(deadline(now, Duration::MAX) > now + Duration::from_secs(365 * 24 * 3600));
        assert_eq!(deadline(now, Duration::ZERO), now);
    }
}
