//! The pub/sub pump: one dedicated connection subscribed to the change channel, forwarding
//! every message to the local broadcast, pinged so a half-open connection is noticed, and
//! re-subscribed with jittered backoff when lost (then `Change::Resync` tells local
//! subscribers that they may have missed changes).

use std::time::Duration;

use deadpool_redis::redis::{self, aio::PubSubSink, aio::PubSubStream, Value};
use futures_util::StreamExt;
use rand::Rng;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

use super::{
    CONNECT_TIMEOUT, PUBSUB_KEEPALIVE, PUBSUB_PING_TIMEOUT, RECONNECT_MAX_BACKOFF,
    RECONNECT_MIN_BACKOFF, RESPONSE_TIMEOUT,
};
use crate::{Change, StoreError};

/// Aborts the pub/sub task when the store goes away, so a dropped store stops reconnecting.
pub(super) struct AbortOnDrop(pub(super) JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Opens a dedicated pub/sub connection and waits for the SUBSCRIBE confirmation.
pub(super) async fn subscribe_changes(
    client: &redis::Client,
    channel: &str,
) -> Result<(PubSubSink, PubSubStream), StoreError> {
    let attempt = async {
        let mut pubsub = client.get_async_pubsub().await?;
        // `subscribe` resolves on the server's confirmation, not merely on sending.
        pubsub.subscribe(channel).await?;
        Ok::<_, redis::RedisError>(pubsub.split())
    };
    match tokio::time::timeout(CONNECT_TIMEOUT + RESPONSE_TIMEOUT, attempt).await {
        Ok(result) => result.map_err(|e| StoreError::unavailable_by("redis subscribe", e)),
        Err(_) => Err(StoreError::unavailable("redis subscribe: timed out")),
    }
}

/// Forwards changes from Redis to the local broadcast for as long as the store lives,
/// re-subscribing with backoff whenever the connection is lost.
pub(super) async fn forward_changes(
    client: redis::Client,
    channel: String,
    changes: broadcast::Sender<Change>,
    mut sink: PubSubSink,
    mut stream: PubSubStream,
) {
    loop {
        let reason = pump(&mut sink, &mut stream, &changes).await;
        // Changes published while we are away are lost for this replica; the `Resync` sent
        // once we are back tells its consumers to catch up.
        tracing::warn!(%channel, %reason, "change subscription lost, reconnecting");
        let mut delay = RECONNECT_MIN_BACKOFF;
        let mut attempts: u32 = 0;
        (sink, stream) = loop {
            attempts += 1;
            match subscribe_changes(&client, &channel).await {
                Ok(subscribed) => {
                    tracing::info!(%channel, attempts, "change subscription restored");
                    // Only now, with the subscription confirmed: every change published from
                    // here on is delivered after the `Resync`, so a consumer that reloads on
                    // it leaves no gap. No local subscriber is fine: nobody needed to hear it.
                    let _ = changes.send(Change::Resync);
                    break subscribed;
                }
                Err(e) => {
                    // Jitter so that replicas do not all hammer a restarting Redis in step.
                    let jitter = rand::thread_rng().gen_range(0..=delay.as_millis() as u64 / 2);
                    let wait = delay + Duration::from_millis(jitter);
                    tracing::warn!(
                        %channel,
                        error = %e,
                        attempts,
                        retry_in_ms = wait.as_millis() as u64,
                        "change subscription reconnect failed"
                    );
                    tokio::time::sleep(wait).await;
                    delay = (delay * 2).min(RECONNECT_MAX_BACKOFF);
                }
            }
        };
    }
}

/// Delivers messages until the connection is lost; returns why.
async fn pump(
    sink: &mut PubSubSink,
    stream: &mut PubSubStream,
    changes: &broadcast::Sender<Change>,
) -> String {
    let mut keepalive = tokio::time::interval(PUBSUB_KEEPALIVE);
    keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick completes at once; the connection was just proven alive.
    keepalive.tick().await;
    loop {
        tokio::select! {
            msg = stream.next() => {
                let Some(msg) = msg else {
                    return "connection closed".to_owned();
                };
                match serde_json::from_slice::<Change>(msg.get_payload_bytes()) {
                    // No local subscriber is fine: nobody needed to hear it.
                    Ok(change) => {
                        let _ = changes.send(change);
                    }
                    Err(e) => tracing::warn!(error = %e, "ignoring undecodable change message"),
                }
            }
            _ = keepalive.tick() => {
                match tokio::time::timeout(PUBSUB_PING_TIMEOUT, sink.ping::<Value>()).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return format!("keepalive ping failed: {e}"),
                    Err(_) => return "keepalive ping timed out".to_owned(),
                }
            }
        }
    }
}
