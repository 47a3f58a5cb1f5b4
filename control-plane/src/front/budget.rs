//! The bytes the front buffers for first-request bodies of connections that proved nothing yet,
//! bounded process-wide.
//!
//! An agent's body carries its proof (a signed frame), so an upload (`/edge/s`, `/edge/a`: up
//! to 1 MiB) is anonymous until its last byte is in. Pending places bound how many such
//! uploads are read at once (2,436 by default), the per-read deadline how slowly each may
//! trickle; neither bounds the product: 2,436 uploads each a byte short of 1 MiB would hold
//! 2.4 GB for the five minutes a body may take. So every connection reading its first body
//! holds a [`Share`] of one [`BodyBudget`], charged before its buffer grows. When a share
//! cannot grow, the slowest share that had [`EVICT_AFTER`] to arrive, if it is slower than the
//! one asking, is let go (its bytes return at once, its connection is dropped); otherwise the
//! one asking is refused (503 `busy`, the agent sends its upload again later). A trickling
//! attacker is the slowest and goes first; an agent on a fast link is done before it matters.
//!
//! Pure bookkeeping under one short lock: callers pass the time, tests drive it.

use std::collections::HashMap;
use std::sync::Arc;

use gateway::admission::EVICT_AFTER;
use parking_lot::Mutex;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// Default bound of the bytes buffered at once for bodies that proved nothing yet.
pub const DEFAULT_PENDING_BODY_BYTES: usize = 64 * 1024 * 1024;

/// See the module docs.
pub struct BodyBudget {
    limit: usize,
    state: Mutex<State>,
    /// Bytes held now (`edgeplane_api_pending_body_bytes`).
    held: prometheus::IntGauge,
    /// Shares refused or let go (`edgeplane_api_pending_bodies_dropped_total{why}`).
    dropped: prometheus::IntCounterVec,
}

#[derive(Default)]
struct State {
    used: usize,
    next: u64,
    shares: HashMap<u64, Holder>,
}

struct Holder {
    bytes: usize,
    since: Instant,
    evict: CancellationToken,
}

impl Holder {
    /// Whether this holder arrived more slowly than `other` (bytes per elapsed time; times
    /// below a millisecond count as one).
    fn slower_than(&self, other: &Holder, now: Instant) -> bool {
        let elapsed = |h: &Holder| now.saturating_duration_since(h.since).as_millis().max(1);
        (self.bytes as u128) * elapsed(other) < (other.bytes as u128) * elapsed(self)
    }
}

/// The budget had no room for a share to grow, and no slower share to let go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the server holds as many pending request bodies as it may; send it again later")]
pub struct Exhausted;

impl BodyBudget {
    pub fn new(
        limit: usize,
        held: prometheus::IntGauge,
        dropped: prometheus::IntCounterVec,
    ) -> Arc<Self> {
        Arc::new(Self {
            limit,
            state: Mutex::new(State::default()),
            held,
            dropped,
        })
    }

    /// A new, empty share for a connection about to read its first body.
    pub fn share(self: &Arc<Self>, now: Instant) -> Share {
        let evict = CancellationToken::new();
        let mut s = self.state.lock();
        s.next += 1;
        let id = s.next;
        s.shares.insert(
            id,
            Holder {
                bytes: 0,
                since: now,
                evict: evict.clone(),
            },
        );
        Share {
            budget: Arc::clone(self),
            id,
            evict,
        }
    }

    /// Bytes held now.
    #[cfg(test)]
    pub fn used(&self) -> usize {
        self.state.lock().used
    }
}

/// One connection's part of a [`BodyBudget`]; its bytes return when it is dropped.
pub struct Share {
    budget: Arc<BodyBudget>,
    id: u64,
    evict: CancellationToken,
}

impl Share {
    /// Takes `n` more bytes at `now`, letting slower shares go to make room (see the module
    /// docs); [`Exhausted`] when there is none to let go. A share let go may still ask: it is
    /// refused.
    pub fn grow(&self, n: usize, now: Instant) -> Result<(), Exhausted> {
        let b = &*self.budget;
        let mut guard = b.state.lock();
        let s = &mut *guard;
        if !s.shares.contains_key(&self.id) {
            return Err(Exhausted);
        }
        while s.used + n > b.limit {
            let me = &s.shares[&self.id];
            let asking = Holder {
                bytes: me.bytes + n,
                since: me.since,
                evict: CancellationToken::new(),
            };
            let victim = s
                .shares
                .iter()
                .filter(|(&id, h)| {
                    id != self.id
                        && now.saturating_duration_since(h.since) >= EVICT_AFTER
                        && h.slower_than(&asking, now)
                })
                .min_by(|(_, a), (_, c)| {
                    if a.slower_than(c, now) {
                        std::cmp::Ordering::Less
                    } else {
                        std::cmp::Ordering::Greater
                    }
                })
                .map(|(&id, _)| id);
            let Some(victim) = victim.and_then(|id| s.shares.remove(&id)) else {
                b.dropped.with_label_values(&["full"]).inc();
                return Err(Exhausted);
            };
            s.used -= victim.bytes;
            victim.evict.cancel();
            b.dropped.with_label_values(&["slowest"]).inc();
        }
        s.used += n;
        if let Some(me) = s.shares.get_mut(&self.id) {
            me.bytes += n;
        }
        b.held.set(s.used as i64);
        Ok(())
    }

    /// Completes when this share is let go for a faster one.
    pub fn evicted(&self) -> WaitForCancellationFutureOwned {
        self.evict.clone().cancelled_owned()
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        let b = &*self.budget;
        let mut s = b.state.lock();
        if let Some(h) = s.shares.remove(&self.id) {
            s.used -= h.bytes;
        }
        // The map grows to the pending bound under attack (~200 KiB); give that back after.
        if s.shares.capacity() > 64 && s.shares.len() * 4 < s.shares.capacity() {
            let keep = s.shares.len() * 2;
            s.shares.shrink_to(keep);
        }
        b.held.set(s.used as i64);
    }
}

/// A budget of `limit` bytes with metrics of its own, for tests.
#[cfg(test)]
pub(super) fn budget(limit: usize) -> Arc<BodyBudget> {
    BodyBudget::new(
        limit,
        prometheus::IntGauge::new("held", "h").unwrap(),
        prometheus::IntCounterVec::new(prometheus::Opts::new("dropped", "d"), &["why"]).unwrap(),
    )
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn dropped(b: &BodyBudget, why: &str) -> u64 {
        b.dropped.with_label_values(&[why]).get()
    }

    #[tokio::test(start_paused = true)]
    async fn shares_are_charged_and_give_their_bytes_back() {
        let b = budget(1000);
        let t0 = Instant::now();
        let one = b.share(t0);
        let two = b.share(t0);
        one.grow(600, t0).unwrap();
        two.grow(400, t0).unwrap();
        assert_eq!((b.used(), b.held.get()), (1000, 1000));
        // Full, and nobody had their time yet: refused.
        let three = b.share(t0);
        assert_eq!(three.grow(1, t0), Err(Exhausted));
        assert_eq!(dropped(&b, "full"), 1);
        drop(one);
        assert_eq!((b.used(), b.held.get()), (400, 400));
        three.grow(600, t0).unwrap();
        drop((two, three));
        assert_eq!((b.used(), b.held.get()), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn the_slowest_share_that_had_its_time_goes_for_a_faster_one() {
        let b = budget(1000);
        let t0 = Instant::now();
        // Two tricklers: 100 bytes and 300 bytes over 10 s.
        let slow = b.share(t0);
        let slower = b.share(t0);
        slow.grow(300, t0).unwrap();
        slower.grow(100, t0).unwrap();
        let t = t0 + Duration::from_secs(10);
        // A fresh upload that sends 500 bytes at once fits; 700 more do not: the slowest of
        // the two goes (its bytes back at once), then the next.
        let fast = b.share(t);
        fast.grow(500, t).unwrap();
        let gone = slower.evicted();
        fast.grow(200, t).unwrap();
        tokio::time::timeout(Duration::from_millis(1), gone)
            .await
            .expect("the slowest share is let go");
        assert_eq!(b.used(), 1000);
        assert_eq!(dropped(&b, "slowest"), 1);
        assert_eq!(
            slower.grow(1, t),
            Err(Exhausted),
            "a share let go stays gone"
        );
        fast.grow(300, t).unwrap();
        assert_eq!(b.used(), 1000, "300 from the other trickler");
        assert_eq!(dropped(&b, "slowest"), 2);
        drop((slow, slower));
        assert_eq!(b.used(), 1000);
        drop(fast);
        assert_eq!(b.used(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_share_is_not_let_go_before_its_time_nor_for_a_slower_one() {
        let b = budget(100);
        let t0 = Instant::now();
        let old = b.share(t0);
        old.grow(100, t0).unwrap();
        // Too young to be let go.
        let young = b.share(t0 + Duration::from_secs(1));
        assert_eq!(young.grow(10, t0 + Duration::from_secs(1)), Err(Exhausted));
        // Old enough, but it arrived faster (100 bytes in 4 s) than the one asking (10 in 3).
        let t = t0 + EVICT_AFTER + Duration::from_secs(1);
        assert_eq!(young.grow(10, t), Err(Exhausted));
        assert_eq!(b.used(), 100);
        assert_eq!(dropped(&b, "slowest"), 0);
    }
}
