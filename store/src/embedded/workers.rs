//! The embedded store's own threads. redb blocks, so its work runs off the async threads: on a
//! fixed set of threads fed through one bounded queue, not on Tokio's blocking pool. That pool
//! starts a thread for each task that finds every thread busy (up to 512 per runtime) and lets
//! one go after 10 s idle; the control plane has one runtime per actix worker, each with its
//! own pool, so its thread count followed the store's load (a soak saw it step 18 → 22 for no
//! reason an operator could read). Here it is [`THREADS`], whatever the load.
//!
//! redb serialises write transactions and lets reads run beside them, so a few threads are all
//! it can use; callers beyond [`QUEUE`] waiting jobs wait for a place (back-pressure, not
//! memory).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::Mutex;
use redb::Database;
use tokio::sync::{mpsc, oneshot};

use crate::StoreError;

/// Threads running the store's transactions.
pub const THREADS: usize = 4;
/// Jobs that may wait for a thread before callers wait to queue one.
pub const QUEUE: usize = 1_024;

type Job = Box<dyn FnOnce(&Database) + Send>;

pub(super) struct Workers {
    queue: Option<mpsc::Sender<Job>>,
    threads: Vec<JoinHandle<()>>,
}

impl Workers {
    /// Starts `threads` threads (named `store-<n>`) sharing `db`.
    pub fn start(db: Arc<Database>, threads: usize) -> Result<Self, StoreError> {
        let (tx, rx) = mpsc::channel::<Job>(QUEUE);
        let rx = Arc::new(Mutex::new(rx));
        let mut workers = Self {
            queue: Some(tx),
            threads: Vec::with_capacity(threads),
        };
        for n in 0..threads {
            let (rx, db) = (Arc::clone(&rx), Arc::clone(&db));
            let thread = std::thread::Builder::new()
                .name(format!("store-{n}"))
                .spawn(move || run(&rx, &db))
                .map_err(|e| StoreError::unavailable_by("cannot start a store thread", e))?;
            workers.threads.push(thread);
        }
        Ok(workers)
    }

    /// Runs `f` on one of the threads and returns what it returns.
    pub async fn run<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
        T: Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |db| {
            // The caller may have given up (its future dropped): nothing to tell it then.
            let _ = tx.send(f(db));
        });
        let queue = self
            .queue
            .as_ref()
            .ok_or_else(|| StoreError::unavailable("embedded store closed"))?;
        queue
            .send(job)
            .await
            .map_err(|_| StoreError::unavailable("embedded store closed"))?;
        // A job that panicked dropped its sender while unwinding.
        rx.await
            .map_err(|_| StoreError::unavailable("embedded store task failed"))?
    }
}

/// One thread: takes the next job until the queue closes. A job that panics is logged and
/// the thread goes on, so the pool never shrinks.
fn run(rx: &Mutex<mpsc::Receiver<Job>>, db: &Database) {
    loop {
        // One thread at a time waits on the queue; the others wait on the lock.
        let job = rx.lock().blocking_recv();
        let Some(job) = job else { return };
        if catch_unwind(AssertUnwindSafe(|| job(db))).is_err() {
            tracing::error!("an embedded store job panicked");
        }
    }
}

impl Drop for Workers {
    /// Closes the queue and waits for the threads to finish what was queued, so that the file
    /// is closed (and its lock released) when the store is gone: a store opened again on the
    /// same dir right after does not find it in use.
    fn drop(&mut self) {
        self.queue = None;
        for thread in self.threads.drain(..) {
            // A thread only ends by returning (panics are caught above).
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> (tempfile::TempDir, Arc<Database>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Database::create(dir.path().join("t.redb")).expect("create");
        (dir, Arc::new(db))
    }

    #[tokio::test]
    async fn a_panicking_job_fails_its_caller_and_the_pool_keeps_its_threads() {
        let (_dir, db) = db();
        let workers = Workers::start(db, 1).expect("start");
        let failed = workers
            .run(|_db| -> Result<(), StoreError> { panic!("boom") })
            .await;
        assert!(failed.is_err());
        // The one thread is still there.
        let ok = workers.run(|_db| Ok(7)).await.expect("run");
        assert_eq!(ok, 7);
    }

    #[tokio::test]
    async fn dropping_the_workers_closes_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t.redb");
        let db = Arc::new(Database::create(&path).expect("create"));
        let workers = Workers::start(Arc::clone(&db), THREADS).expect("start");
        drop(db);
        workers.run(|_db| Ok(())).await.expect("run");
        drop(workers);
        // redb refuses a second open of a file still open in this process.
        Database::create(&path).expect("the file is free again");
    }
}
