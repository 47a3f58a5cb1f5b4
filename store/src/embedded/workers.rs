//! The embedded store's own threads. redb blocks, so its work runs off the async threads: on a
//! fixed set of threads fed through bounded queues, not on Tokio's blocking pool. That pool
//! starts a thread for each task that finds every thread busy (up to 512 per runtime) and lets
//! one go after 10 s idle; the control plane has one runtime per actix worker, each with its
//! own pool, so its thread count followed the store's load (a soak saw it step 18 → 22 for no
//! reason an operator could read). Here it is [`READERS`] + 1, whatever the load.
//!
//! redb runs one write transaction at a time and lets reads run beside it, so writes have a
//! thread of their own ([`Workers::write`]) and reads [`READERS`] more ([`Workers::read`]):
//! a burst of writes (each waiting for the one before, and for its fsync) never stands
//! between a read and a free thread. Each side has a bounded queue; callers beyond
//! [`QUEUE`] waiting jobs wait for a place (back-pressure, not memory).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::Mutex;
use redb::Database;
use tokio::sync::{mpsc, oneshot};

use crate::StoreError;

/// Threads running read transactions (one more runs the writes).
pub const READERS: usize = 3;
/// Jobs that may wait for a thread, on each side, before callers wait to queue one.
pub const QUEUE: usize = 1_024;
/// The writer thread's name; readers are `store-read-<n>`.
const WRITER: &str = "store-write";

type Job = Box<dyn FnOnce(&Database) + Send>;

pub(super) struct Workers {
    writes: Option<mpsc::Sender<Job>>,
    reads: Option<mpsc::Sender<Job>>,
    threads: Vec<JoinHandle<()>>,
}

impl Workers {
    /// Starts the writer and `readers` reader threads, sharing `db`.
    pub fn start(db: Arc<Database>, readers: usize) -> Result<Self, StoreError> {
        let (writes, write_rx) = mpsc::channel::<Job>(QUEUE);
        let (reads, read_rx) = mpsc::channel::<Job>(QUEUE);
        let mut workers = Self {
            writes: Some(writes),
            reads: Some(reads),
            threads: Vec::with_capacity(readers + 1),
        };
        // On an error below, dropping `workers` closes both queues and joins what started.
        workers.spawn(WRITER.to_owned(), Arc::new(Mutex::new(write_rx)), &db)?;
        let read_rx = Arc::new(Mutex::new(read_rx));
        for n in 0..readers {
            workers.spawn(format!("store-read-{n}"), Arc::clone(&read_rx), &db)?;
        }
        Ok(workers)
    }

    fn spawn(
        &mut self,
        name: String,
        rx: Arc<Mutex<mpsc::Receiver<Job>>>,
        db: &Arc<Database>,
    ) -> Result<(), StoreError> {
        let db = Arc::clone(db);
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || run(&rx, &db))
            .map_err(|e| StoreError::unavailable_by("cannot start a store thread", e))?;
        self.threads.push(thread);
        Ok(())
    }

    /// Runs `f`, which only reads, on a reader thread and returns what it returns.
    pub async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
        T: Send + 'static,
    {
        Self::run(self.reads.as_ref(), f).await
    }

    /// Runs `f`, which may write, on the writer thread and returns what it returns.
    pub async fn write<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
        T: Send + 'static,
    {
        Self::run(self.writes.as_ref(), f).await
    }

    async fn run<T, F>(queue: Option<&mpsc::Sender<Job>>, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
        T: Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |db| {
            // The caller may have given up (its future dropped): nothing to tell it then.
            let _ = tx.send(f(db));
        });
        let queue = queue.ok_or_else(|| StoreError::unavailable("embedded store closed"))?;
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
        // A job holds no store, so no store thread can be the one dropping it (joining itself
        // would fail); this keeps it so.
        debug_assert!(
            !std::thread::current()
                .name()
                .is_some_and(|n| n.starts_with("store-")),
            "the embedded store dropped on one of its own threads"
        );
        self.writes = None;
        self.reads = None;
        for thread in self.threads.drain(..) {
            // A thread only ends by returning (panics are caught above).
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

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
        for _ in 0..2 {
            let failed = workers
                .write(|_db| -> Result<(), StoreError> { panic!("boom") })
                .await;
            assert!(failed.is_err());
            let failed = workers
                .read(|_db| -> Result<(), StoreError> { panic!("boom") })
                .await;
            assert!(failed.is_err());
        }
        // The one thread on each side is still there.
        assert_eq!(workers.write(|_db| Ok(7)).await.expect("write"), 7);
        assert_eq!(workers.read(|_db| Ok(8)).await.expect("read"), 8);
    }

    #[tokio::test]
    async fn a_read_does_not_wait_behind_writes() {
        let (_dir, db) = db();
        let workers = Workers::start(db, 1).expect("start");
        // The writer is busy until told to go on.
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let write = workers.write(move |_db| {
            wait.recv().ok();
            Ok(())
        });
        tokio::pin!(write);
        // Polled once, so that the job is queued.
        assert!(futures_poll_once(write.as_mut()).await.is_none());
        let read = tokio::time::timeout(Duration::from_secs(10), workers.read(|_db| Ok(1)));
        assert_eq!(
            read.await
                .expect("a read beside a busy writer")
                .expect("read"),
            1
        );
        go.send(()).expect("the writer waits");
        write.await.expect("write");
    }

    /// Polls `f` once: its output if it was ready.
    async fn futures_poll_once<F: std::future::Future + Unpin>(f: F) -> Option<F::Output> {
        let mut f = f;
        std::future::poll_fn(|cx| {
            std::task::Poll::Ready(match std::pin::Pin::new(&mut f).poll(cx) {
                std::task::Poll::Ready(v) => Some(v),
                std::task::Poll::Pending => None,
            })
        })
        .await
    }

    #[tokio::test]
    async fn dropping_the_workers_closes_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t.redb");
        let db = Arc::new(Database::create(&path).expect("create"));
        let workers = Workers::start(Arc::clone(&db), READERS).expect("start");
        drop(db);
        workers.write(|_db| Ok(())).await.expect("write");
        workers.read(|_db| Ok(())).await.expect("read");
        drop(workers);
        // redb refuses a second open of a file still open in this process.
        Database::create(&path).expect("the file is free again");
    }
}
