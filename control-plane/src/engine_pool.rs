//! Idle HTTP/1.1 connections to environments' engines, each over its own tunnel stream, kept
//! for the next Docker call to the same environment: a call through an open tunnel then costs
//! no stream opening, no engine connection on the agent's side (and no socket left in
//! `TIME_WAIT` there), no HTTP handshake.
//!
//! One pool per API worker thread (a connection's request bodies may be actix's, which are not
//! `Send`, so a connection stays on the thread that opened it). A connection comes back only
//! once its answer was read to the end (hyper's readiness); one that upgraded (attach, exec) or
//! still streams (logs, events) is never shared. An idle connection holds a stream open, which
//! keeps its tunnel from counting as inactive on the agent, so it is let go after
//! `--engine-idle-timeout` without a call, by a sweep that runs while the pool holds any.

use std::cell::RefCell;
use std::collections::HashMap;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use hyper::client::conn::http1::SendRequest;
use prometheus::IntGauge;
use store::EnvId;
use tokio::time::Instant;

/// The body of a request to an engine: boxed, and not `Send` (actix's payload streams).
pub type EngineBody =
    Pin<Box<dyn hyper::body::Body<Data = Bytes, Error = Box<dyn std::error::Error + Send + Sync>>>>;

/// Idle connections kept per environment on one thread; more are closed when they come back.
pub const MAX_IDLE_PER_ENV: usize = 4;
/// Idle connections kept on one thread in all.
pub const MAX_IDLE: usize = 1024;

/// One idle connection: for the tunnel epoch it was opened through.
struct Idle {
    sender: SendRequest<EngineBody>,
    epoch: u64,
    since: Instant,
}

/// The pool of one thread. Pure bookkeeping; time is passed in.
#[derive(Default)]
pub struct Pool {
    idle: HashMap<EnvId, Vec<Idle>>,
    count: usize,
}

impl Pool {
    /// A ready connection to `env`'s engine through the tunnel with `epoch`, the most recently
    /// used first; closed, expired and other epochs' connections found on the way are dropped.
    pub fn take(
        &mut self,
        env: EnvId,
        epoch: u64,
        now: Instant,
        timeout: Duration,
    ) -> Option<SendRequest<EngineBody>> {
        let list = self.idle.get_mut(&env)?;
        let mut found = None;
        while let Some(c) = list.pop() {
            self.count -= 1;
            if c.epoch == epoch && now < c.since + timeout && c.sender.is_ready() {
                found = Some(c.sender);
                break;
            }
        }
        if list.is_empty() {
            self.idle.remove(&env);
        }
        found
    }

    /// Keeps `sender` (ready) for the next call to `env`, unless the pool is full.
    pub fn put(&mut self, env: EnvId, epoch: u64, sender: SendRequest<EngineBody>, now: Instant) {
        if self.count >= MAX_IDLE || sender.is_closed() {
            return;
        }
        let list = self.idle.entry(env).or_default();
        // Only connections through the newest tunnel are worth keeping.
        let before = list.len();
        list.retain(|c| c.epoch >= epoch);
        self.count -= before - list.len();
        if list.len() >= MAX_IDLE_PER_ENV || list.iter().any(|c| c.epoch > epoch) {
            return;
        }
        list.push(Idle {
            sender,
            epoch,
            since: now,
        });
        self.count += 1;
    }

    /// Drops connections idle for `timeout` or closed; their streams close with them.
    pub fn sweep(&mut self, now: Instant, timeout: Duration) {
        let mut count = 0;
        self.idle.retain(|_, list| {
            list.retain(|c| now < c.since + timeout && !c.sender.is_closed());
            count += list.len();
            !list.is_empty()
        });
        self.count = count;
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

thread_local! {
    static POOL: RefCell<Pool> = RefCell::new(Pool::default());
    static SWEEPING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Gives `sender` back to this thread's pool once its exchange is over (its answer read to
/// the end), unless the connection closes first. Runs on the current thread's local set.
/// `idle` counts the connections kept, over all threads.
pub fn give_back(
    env: EnvId,
    epoch: u64,
    mut sender: SendRequest<EngineBody>,
    timeout: Duration,
    idle: IntGauge,
) {
    actix_rt::spawn(async move {
        if sender.ready().await.is_err() {
            return;
        }
        with_pool(&idle, |p| p.put(env, epoch, sender, Instant::now()));
        start_sweeping(timeout, idle);
    });
}

/// [`Pool::take`] on this thread's pool.
pub fn take(
    env: EnvId,
    epoch: u64,
    timeout: Duration,
    idle: &IntGauge,
) -> Option<SendRequest<EngineBody>> {
    with_pool(idle, |p| p.take(env, epoch, Instant::now(), timeout))
}

/// Runs `f` on this thread's pool and moves `idle` by the change of its size.
fn with_pool<T>(idle: &IntGauge, f: impl FnOnce(&mut Pool) -> T) -> T {
    POOL.with_borrow_mut(|p| {
        let before = p.len();
        let out = f(p);
        idle.add(p.len() as i64 - before as i64);
        out
    })
}

/// Starts this thread's sweep unless it runs; it stops once the pool is empty.
fn start_sweeping(timeout: Duration, idle: IntGauge) {
    if SWEEPING.replace(true) {
        return;
    }
    let period = (timeout / 2).max(Duration::from_millis(100));
    actix_rt::spawn(async move {
        loop {
            tokio::time::sleep(period).await;
            let empty = with_pool(&idle, |p| {
                p.sweep(Instant::now(), timeout);
                p.is_empty()
            });
            if empty {
                SWEEPING.set(false);
                return;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use hyper_util::rt::TokioIo;

    /// A client connection over an in-memory pipe, its task running, ready for a request;
    /// dropping the returned far end closes it.
    async fn connection() -> (SendRequest<EngineBody>, tokio::io::DuplexStream) {
        let (near, far) = tokio::io::duplex(1024);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(near))
            .await
            .unwrap();
        actix_rt::spawn(async move {
            let _ = conn.await;
        });
        sender.ready().await.unwrap();
        (sender, far)
    }

    const IDLE: Duration = Duration::from_secs(5);

    #[actix_rt::test]
    async fn the_newest_connection_of_the_epoch_comes_first() {
        let t0 = Instant::now();
        let mut pool = Pool::default();
        let (a, _fa) = connection().await;
        let (b, _fb) = connection().await;
        let (c, _fc) = connection().await;
        pool.put(1, 7, a, t0);
        pool.put(1, 7, b, t0 + Duration::from_secs(1));
        pool.put(2, 3, c, t0);
        assert_eq!(pool.len(), 3);
        assert!(pool.take(3, 7, t0, IDLE).is_none(), "another environment");
        // The newer one first, then the older; then none is left.
        assert!(pool.take(1, 7, t0 + Duration::from_secs(2), IDLE).is_some());
        assert!(pool.take(1, 7, t0 + Duration::from_secs(2), IDLE).is_some());
        assert!(pool.take(1, 7, t0 + Duration::from_secs(2), IDLE).is_none());
        assert_eq!(pool.len(), 1);
        // Through a newer tunnel (epoch 4): the old one is dropped on the way.
        assert!(pool.take(2, 4, t0, IDLE).is_none());
        assert!(pool.is_empty());
    }

    #[actix_rt::test]
    async fn expired_and_closed_connections_are_not_handed_out() {
        let t0 = Instant::now();
        let mut pool = Pool::default();
        let (a, _fa) = connection().await;
        pool.put(1, 1, a, t0);
        assert!(pool.take(1, 1, t0 + IDLE, IDLE).is_none(), "idle too long");
        assert!(pool.is_empty());

        let (b, fb) = connection().await;
        pool.put(1, 1, b, t0);
        drop(fb);
        // The connection's task sees the end and closes it; the sweep drops it.
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        pool.sweep(t0, IDLE);
        assert!(pool.is_empty(), "a closed connection is swept");
    }

    #[actix_rt::test]
    async fn the_sweep_lets_idle_connections_go() {
        let t0 = Instant::now();
        let mut pool = Pool::default();
        let (a, _fa) = connection().await;
        let (b, _fb) = connection().await;
        pool.put(1, 1, a, t0);
        pool.put(2, 1, b, t0 + Duration::from_secs(3));
        pool.sweep(t0 + IDLE, IDLE);
        assert_eq!(pool.len(), 1, "only the one idle for the timeout goes");
        pool.sweep(t0 + Duration::from_secs(8), IDLE);
        assert!(pool.is_empty());
    }

    #[actix_rt::test]
    async fn bounds_per_environment_and_older_tunnels() {
        let t0 = Instant::now();
        let mut pool = Pool::default();
        let mut far = Vec::new();
        for _ in 0..MAX_IDLE_PER_ENV + 2 {
            let (s, f) = connection().await;
            far.push(f);
            pool.put(1, 5, s, t0);
        }
        assert_eq!(pool.len(), MAX_IDLE_PER_ENV);
        // A connection through an older tunnel is not kept next to newer ones ...
        let (old, _fo) = connection().await;
        pool.put(1, 4, old, t0);
        assert_eq!(pool.len(), MAX_IDLE_PER_ENV);
        // ... and one through a newer tunnel replaces the older ones.
        let (new, _fn) = connection().await;
        pool.put(1, 6, new, t0);
        assert_eq!(pool.len(), 1);
        assert!(pool.take(1, 6, t0, IDLE).is_some());
    }
}
