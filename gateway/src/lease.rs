//! The lease loop: every `lease / 3` the gateway renews its tunnels' locations (closing those
//! the store says it lost, and those it could not renew for a whole lease) and its own
//! registration.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use store::{EnvId, GatewayInfo};

use crate::server::{EndReason, Gateway};

impl Gateway {
    pub(crate) async fn lease_loop(self: Arc<Self>) {
        let every = self.config.lease / 3;
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = self.stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            self.renew().await;
        }
    }

    /// One round of renewals: tunnel locations, then the registration (and the connection
    /// gauges, sampled).
    async fn renew(&self) {
        let counts = self.admission().counts();
        let gauge = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        self.metrics.connections_open.set(gauge(counts.connections));
        self.metrics.connections_pending.set(gauge(counts.pending));
        let lease = self.config.lease;
        // Each call is bounded so that the expiry check below runs on time.
        let budget = lease / 4;
        let started = Instant::now();
        let held: Vec<(EnvId, u64)> = self.tunnels().iter().map(|(e, t)| (*e, t.epoch)).collect();
        if !held.is_empty() {
            let renewal = self.store.renew_tunnels(&self.config.id, &held, lease);
            match tokio::time::timeout(budget, renewal).await {
                Ok(Ok(lost)) => {
                    let lost: HashSet<EnvId> = lost.into_iter().collect();
                    let mut map = self.tunnels();
                    for (env, epoch) in &held {
                        let Some(t) = map.get_mut(env).filter(|t| t.epoch == *epoch) else {
                            continue;
                        };
                        if lost.contains(env) {
                            tracing::info!(env, epoch, "tunnel lease lost to another holder");
                            t.close(EndReason::LeaseLost);
                        } else {
                            t.renewed = started;
                        }
                    }
                }
                Ok(Err(e)) => {
                    self.metrics.renew_failures.inc();
                    tracing::warn!(error = %e, tunnels = held.len(), "cannot renew tunnel leases; tunnels stay up until their lease runs out");
                }
                Err(_) => {
                    self.metrics.renew_failures.inc();
                    tracing::warn!(tunnels = held.len(), "renewing tunnel leases timed out; tunnels stay up until their lease runs out");
                }
            }
        }
        // A location not renewed for a whole lease has expired in the store: nobody can find
        // the tunnel, so it must not look open here either.
        for t in self.tunnels().values() {
            if t.renewed.elapsed() >= lease {
                t.close(EndReason::LeaseUnrenewed);
            }
        }
        let info = GatewayInfo {
            id: self.config.id.clone(),
            public_addr: self.config.public_addr.clone(),
            dial_addr: self.config.dial_addr.clone(),
            tunnels: self.open_tunnels() as u64,
        };
        match tokio::time::timeout(budget, self.store.register_gateway(&info, lease)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                self.metrics.renew_failures.inc();
                tracing::warn!(error = %e, "cannot renew the gateway registration");
            }
            Err(_) => {
                self.metrics.renew_failures.inc();
                tracing::warn!("renewing the gateway registration timed out");
            }
        }
    }
}
