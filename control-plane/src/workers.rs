//! The API server's worker threads as places to run the embedded gateway's tunnels
//! ([`gateway::Spawn`]): each worker registers itself when it starts its services, and each
//! accepted tunnel connection goes to the next one in turn. A Docker call served on the thread
//! that drives its tunnel's session wakes no other thread on its way (the embedded gateway
//! used to run every tunnel on the thread that accepts them: two cross-thread wake-ups each
//! way per call, and all tunnels' TLS on one core).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::ThreadId;

use actix_rt::ArbiterHandle;
use gateway::{ConnectionTask, Spawn};
use parking_lot::Mutex;

/// The API workers that started, in the order they did.
#[derive(Default)]
pub struct Workers {
    arbiters: Mutex<Vec<(ThreadId, ArbiterHandle)>>,
    next: AtomicUsize,
}

impl Workers {
    /// Registers the current thread's arbiter (an API worker starting its services; again
    /// after a restart of them, which changes nothing).
    pub fn register_current(&self) {
        let id = std::thread::current().id();
        let mut arbiters = self.arbiters.lock();
        if arbiters.iter().all(|(t, _)| *t != id) {
            arbiters.push((id, actix_rt::Arbiter::current()));
        }
    }

    pub fn len(&self) -> usize {
        self.arbiters.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Spawn for Workers {
    /// The next worker in turn; a stopped one (the server is stopping) is skipped, and with
    /// none left the task comes back.
    fn spawn(&self, task: ConnectionTask) -> Result<(), ConnectionTask> {
        let arbiters: Vec<ArbiterHandle> = {
            let a = self.arbiters.lock();
            a.iter().map(|(_, h)| h.clone()).collect()
        };
        let first = self.next.fetch_add(1, Ordering::Relaxed);
        // The task travels in a slot: a stopped arbiter drops what it was sent, and the
        // slot keeps it for the next one.
        let slot = Arc::new(Mutex::new(Some(task)));
        for i in 0..arbiters.len() {
            let arbiter = &arbiters[(first + i) % arbiters.len()];
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
        }
        let task = slot.lock().take();
        task.map_or(Ok(()), Err)
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
}
