//! The API server's worker threads as places to run the embedded gateway's tunnels
//! ([`gateway::Spawn`]): each worker registers itself when it starts its services. An accepted
//! tunnel connection goes to the next one in turn for its handshake; once its hello names the
//! environment, the tunnel moves to the worker whose Docker call asked for it
//! ([`Workers::want_tunnel_here`]), so that call, and the others its kept-alive connection
//! makes, wake no other thread on their way through the tunnel. (The embedded gateway used to
//! run every tunnel on the thread that accepts them: two cross-thread wake-ups each way per
//! call, and all tunnels' TLS on one core.)

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use actix_rt::ArbiterHandle;
use gateway::{ConnectionTask, Spawn};
use parking_lot::Mutex;
use store::EnvId;

/// A wish for a tunnel's thread is forgotten after this (its agent never came, or came to
/// another replica's gateway).
const WISH_TTL: Duration = Duration::from_secs(120);
/// Past this many wishes, the old ones are swept out at the next.
const WISHES_SWEPT_OVER: usize = 1024;

/// Turns the calling thread's allocator cache on (`true`) or off (`false`: what it holds goes
/// back to the allocator); `false` when the allocator has no such cache. The binary that
/// chose the allocator provides it ([`crate::config::Config::thread_cache`]).
pub type ThreadCacheFn = fn(bool) -> bool;

/// How often a worker empties its allocator cache. The process runs without thread caches
/// (what an idle thread caches stays with it: memory an attack leaves behind,
/// `docs/benchmarks.md`), except on the API workers, where every request allocates and frees
/// and the cache spares each of those the allocator's lock and its cold bookkeeping. Emptied
/// this often, what a burst leaves in them is back within seconds, busy or idle.
pub const THREAD_CACHE_FLUSH: Duration = Duration::from_secs(2);

/// The API workers that started, in the order they did, and where wanted tunnels should go.
#[derive(Default)]
pub struct Workers {
    arbiters: Mutex<Vec<(ThreadId, ArbiterHandle)>>,
    next: AtomicUsize,
    wishes: Mutex<HashMap<EnvId, (ThreadId, Instant)>>,
    thread_cache: Option<ThreadCacheFn>,
}

impl Workers {
    /// Workers whose threads keep an allocator cache, emptied every [`THREAD_CACHE_FLUSH`].
    pub fn with_thread_cache(thread_cache: Option<ThreadCacheFn>) -> Self {
        Self {
            thread_cache,
            ..Self::default()
        }
    }

    /// Registers the current thread's arbiter (an API worker starting its services; again
    /// after a restart of them, which changes nothing), and turns its allocator cache on.
    pub fn register_current(&self) {
        let id = std::thread::current().id();
        let mut arbiters = self.arbiters.lock();
        if arbiters.iter().all(|(t, _)| *t != id) {
            arbiters.push((id, actix_rt::Arbiter::current()));
            if let Some(cache) = self.thread_cache {
                if cache(true) {
                    actix_rt::spawn(empty_thread_cache(cache));
                }
            }
        }
    }

    pub fn len(&self) -> usize {
        self.arbiters.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A Docker call on this thread waits for `env`'s tunnel: it should run here.
    pub fn want_tunnel_here(&self, env: EnvId) {
        let now = Instant::now();
        let mut wishes = self.wishes.lock();
        if wishes.len() >= WISHES_SWEPT_OVER {
            wishes.retain(|_, (_, at)| now.duration_since(*at) < WISH_TTL);
            // Only hints: a flood of fresh ones (calls to many environments whose tunnels
            // are elsewhere) is dropped whole rather than swept at every call.
            if wishes.len() >= WISHES_SWEPT_OVER {
                wishes.clear();
            }
        }
        wishes.insert(env, (std::thread::current().id(), now));
    }

    /// The worker wished for `env`'s tunnel, taking the wish.
    fn wished(&self, env: EnvId) -> Option<ArbiterHandle> {
        let (thread, at) = self.wishes.lock().remove(&env)?;
        if at.elapsed() >= WISH_TTL || thread == std::thread::current().id() {
            return None;
        }
        let arbiters = self.arbiters.lock();
        arbiters
            .iter()
            .find(|(t, _)| *t == thread)
            .map(|(_, h)| h.clone())
    }
}

/// Empties this thread's allocator cache every [`THREAD_CACHE_FLUSH`], for the thread's life.
async fn empty_thread_cache(cache: ThreadCacheFn) {
    let mut every = tokio::time::interval(THREAD_CACHE_FLUSH);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    every.tick().await;
    loop {
        every.tick().await;
        cache(false);
        cache(true);
    }
}

/// Sends `task` to `arbiter`; hands it back if that arbiter stopped (it drops what it is sent,
/// so the task travels in a slot it is taken from on arrival).
fn send(arbiter: &ArbiterHandle, task: ConnectionTask) -> Result<(), ConnectionTask> {
    let slot = Arc::new(Mutex::new(Some(task)));
    let mine = Arc::clone(&slot);
    let sent = arbiter.spawn(async move {
        let task = mine.lock().take();
        if let Some(task) = task {
            task.await;
        }
    });
    if sent {
        return Ok(());
    }
    let task = slot.lock().take();
    task.map_or(Ok(()), Err)
}

impl Spawn for Workers {
    /// The next worker in turn; a stopped one (the server is stopping) is skipped, and with
    /// none left the task comes back.
    fn spawn(&self, mut task: ConnectionTask) -> Result<(), ConnectionTask> {
        let arbiters: Vec<ArbiterHandle> = {
            let a = self.arbiters.lock();
            a.iter().map(|(_, h)| h.clone()).collect()
        };
        let first = self.next.fetch_add(1, Ordering::Relaxed);
        for i in 0..arbiters.len() {
            match send(&arbiters[(first + i) % arbiters.len()], task) {
                Ok(()) => return Ok(()),
                Err(back) => task = back,
            }
        }
        Err(task)
    }

    /// To the worker wished for, if another one; otherwise it stays.
    fn spawn_tunnel(&self, env: EnvId, task: ConnectionTask) -> Result<(), ConnectionTask> {
        match self.wished(env) {
            Some(arbiter) => send(&arbiter, task),
            None => Err(task),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tasks go to the registered workers in turn, run on their threads, and come back once
    /// every worker stopped.
    #[test]
    fn tasks_go_round_the_workers_and_come_back_when_none_runs() {
        let _system = actix_rt::System::new();
        let workers = Arc::new(Workers::default());
        let arbiters: Vec<actix_rt::Arbiter> = (0..2).map(|_| actix_rt::Arbiter::new()).collect();
        let (tx, rx) = std::sync::mpsc::channel();
        for a in &arbiters {
            let w = Arc::clone(&workers);
            let tx = tx.clone();
            assert!(a.spawn(async move {
                w.register_current();
                w.register_current();
                let _ = tx.send(std::thread::current().id());
            }));
        }
        let registered: Vec<ThreadId> = (0..2).map(|_| rx.recv().unwrap()).collect();
        assert_eq!(workers.len(), 2);

        let mut ran_on = Vec::new();
        for _ in 0..4 {
            let tx = tx.clone();
            let task: ConnectionTask = Box::pin(async move {
                let _ = tx.send(std::thread::current().id());
            });
            assert!(workers.spawn(task).is_ok());
            ran_on.push(rx.recv().unwrap());
        }
        assert_ne!(ran_on[0], ran_on[1]);
        assert_eq!(ran_on[0], ran_on[2]);
        assert_eq!(ran_on[1], ran_on[3]);
        assert!(ran_on.iter().all(|t| registered.contains(t)));

        // A tunnel goes to the worker whose call wished for it, once; without a wish, or
        // wished for from where it is, it stays.
        let here: ConnectionTask = Box::pin(async {});
        assert!(workers.spawn_tunnel(7, here).is_err());
        let w = Arc::clone(&workers);
        assert!(arbiters[1].spawn(async move { w.want_tunnel_here(7) }));
        let tx2 = tx.clone();
        assert!(arbiters[1].spawn(async move {
            let _ = tx2.send(std::thread::current().id());
        }));
        let wisher = rx.recv().unwrap();
        let sent = tx.clone();
        let task: ConnectionTask = Box::pin(async move {
            let _ = sent.send(std::thread::current().id());
        });
        assert!(workers.spawn_tunnel(7, task).is_ok());
        assert_eq!(rx.recv().unwrap(), wisher);
        let again: ConnectionTask = Box::pin(async {});
        assert!(
            workers.spawn_tunnel(7, again).is_err(),
            "a wish is taken once"
        );

        for a in arbiters {
            a.stop();
            a.join().unwrap();
        }
        let task: ConnectionTask = Box::pin(async {});
        assert!(
            workers.spawn(task).is_err(),
            "no worker runs: the task comes back"
        );
    }

    /// Wishes for tunnels that never come here do not pile up.
    #[test]
    fn wishes_stay_bounded() {
        let workers = Workers::default();
        for env in 0..(WISHES_SWEPT_OVER as u64 * 5) {
            workers.want_tunnel_here(env);
            assert!(workers.wishes.lock().len() <= WISHES_SWEPT_OVER);
        }
    }
}
