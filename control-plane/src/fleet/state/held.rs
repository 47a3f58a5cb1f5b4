//! Held check-ins: the agents of an environment waiting (in `/edge/h`) for either the end of
//! their interval or tunnel credentials, and who among them gets credentials when. A swarm
//! shares one environment, so several may wait at once; exactly one gets a grant, and if it
//! never opens the tunnel another gets a turn when the grant window ends.
//!
//! Plain data, generic over the waiter (the actor's is a oneshot sender), so the rules are
//! tested without actix and without a clock of their own.

use std::collections::VecDeque;

use super::EnvState;

/// A held check-in's way back to its agent.
pub trait Waiter {
    /// The agent is no longer waiting (it got its answer elsewhere, timed out, or left).
    fn is_gone(&self) -> bool;
}

impl<T> Waiter for tokio::sync::oneshot::Sender<T> {
    fn is_gone(&self) -> bool {
        self.is_closed()
    }
}

/// One held check-in.
#[derive(Debug)]
pub struct Held<W> {
    pub waiter: W,
    /// The interval to answer with.
    pub interval_secs: u32,
}

/// The held check-ins of one environment, oldest first, at most `cap` of them.
#[derive(Debug)]
pub struct HeldQueue<W> {
    waiting: VecDeque<Held<W>>,
    cap: usize,
}

impl<W: Waiter> HeldQueue<W> {
    pub fn new(cap: usize) -> Self {
        Self {
            waiting: VecDeque::new(),
            cap,
        }
    }

    /// Holds a check-in until credentials come or its agent stops waiting. Agents that left
    /// are dropped first, so only live ones count against the bound; when it is full anyway,
    /// the waiter comes back (`Err`) and the check-in is answered at once.
    pub fn hold(&mut self, waiter: W, interval_secs: u32) -> Result<(), W> {
        self.prune();
        if self.waiting.len() >= self.cap {
            return Err(waiter);
        }
        self.waiting.push_back(Held {
            waiter,
            interval_secs,
        });
        Ok(())
    }

    /// The held check-in that should get credentials now: the oldest live one, if the tunnel
    /// is wanted, not open and no grant is pending ([`EnvState::take_grant`], which then starts
    /// the grant window). Give it credentials; if they cannot be delivered, call
    /// [`EnvState::release_grant`] and offer again. If they are, offer again at
    /// [`HeldQueue::reoffer_at`] in case that agent never connects.
    pub fn offer(&mut self, state: &mut EnvState, now_ms: u64) -> Option<Held<W>> {
        self.prune();
        if self.waiting.is_empty() || !state.take_grant(now_ms) {
            return None;
        }
        self.waiting.pop_front()
    }

    /// When to offer again after credentials went out: the end of the grant window, unless
    /// the tunnel opened or closed meanwhile (which settles the grant).
    pub fn reoffer_at(state: &EnvState) -> Option<u64> {
        state.grant_pending_until()
    }

    /// Takes out the live held check-ins `pick` chooses (to answer them otherwise).
    pub fn take_if(&mut self, mut pick: impl FnMut(&W) -> bool) -> Vec<Held<W>> {
        self.prune();
        let (taken, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.waiting)
            .into_iter()
            .partition(|h| pick(&h.waiter));
        self.waiting = kept.into();
        taken
    }

    /// Check-ins still held.
    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    fn prune(&mut self) {
        self.waiting.retain(|h| !h.waiter.is_gone());
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::rc::Rc;

    use super::*;
    use crate::fleet::state::GRANT_WINDOW_MS;

    const NOW: u64 = 1_800_000_000_000;

    /// A waiter the test can make leave.
    #[derive(Clone, Debug, Default)]
    struct Agent {
        gone: Rc<Cell<bool>>,
        name: &'static str,
    }

    impl Agent {
        fn named(name: &'static str) -> Self {
            Self {
                name,
                ..Self::default()
            }
        }

        fn leave(&self) {
            self.gone.set(true);
        }
    }

    impl Waiter for Agent {
        fn is_gone(&self) -> bool {
            self.gone.get()
        }
    }

    fn state() -> EnvState {
        let (env, _) = crate::fleet::state::tests::env(Some(uuid::Uuid::new_v4()));
        EnvState::new(&env, None).unwrap()
    }

    #[test]
    fn agents_that_left_never_fill_the_queue() {
        // One agent, checking in once per interval for hours: each held check-in ends when
        // its interval does. The queue must not fill with those that ended.
        let mut q = HeldQueue::new(4);
        for _ in 0..10_000 {
            let a = Agent::named("one");
            assert!(q.hold(a.clone(), 5).is_ok(), "a live check-in is held");
            a.leave();
        }
        assert!(q.len() <= 1, "{} ended holds kept", q.len());
        // A tunnel wanted now reaches the live agent at once.
        let live = Agent::named("live");
        q.hold(live, 5).unwrap();
        let mut s = state();
        s.want_tunnel(NOW + 15_000);
        assert_eq!(q.offer(&mut s, NOW).map(|h| h.waiter.name), Some("live"));
    }

    #[test]
    fn the_bound_counts_only_live_check_ins() {
        let mut q = HeldQueue::new(2);
        let (a, b, c) = (Agent::named("a"), Agent::named("b"), Agent::named("c"));
        q.hold(a.clone(), 5).unwrap();
        q.hold(b, 5).unwrap();
        assert_eq!(q.hold(c.clone(), 5).map_err(|w| w.name), Err("c"), "full");
        a.leave();
        assert!(q.hold(c, 5).is_ok(), "room again once one left");
        assert_eq!(q.len(), 2);
    }

    #[test]
    fn one_grant_at_a_time_then_the_next_agent_after_the_window() {
        let mut s = state();
        let mut q = HeldQueue::new(8);
        for name in ["a", "b", "c"] {
            q.hold(Agent::named(name), 5).unwrap();
        }
        assert!(q.offer(&mut s, NOW).is_none(), "not wanted: nobody");
        s.want_tunnel(NOW + 60_000);
        let first = q.offer(&mut s, NOW).unwrap();
        assert_eq!((first.waiter.name, first.interval_secs), ("a", 5));
        assert!(q.offer(&mut s, NOW + 1).is_none(), "a grant is pending");
        let at = HeldQueue::<Agent>::reoffer_at(&s).unwrap();
        assert_eq!(at, NOW + GRANT_WINDOW_MS);
        assert!(q.offer(&mut s, at - 1).is_none());
        // `a` never connected: at the end of the window `b` gets fresh credentials.
        assert_eq!(q.offer(&mut s, at).map(|h| h.waiter.name), Some("b"));
        // It connected: the tunnel is open, the wish served, nobody else gets any.
        s.set_open(Some(1));
        assert!(HeldQueue::<Agent>::reoffer_at(&s).is_none());
        assert!(q.offer(&mut s, at + GRANT_WINDOW_MS).is_none());
        assert_eq!(q.len(), 1);
    }

    #[test]
    fn an_undelivered_grant_goes_to_the_next_live_agent_at_once() {
        let mut s = state();
        let mut q = HeldQueue::new(8);
        let (a, b) = (Agent::named("a"), Agent::named("b"));
        q.hold(a.clone(), 5).unwrap();
        q.hold(b, 5).unwrap();
        s.want_tunnel(NOW + 60_000);
        let first = q.offer(&mut s, NOW).unwrap();
        // The answer could not be sent (the agent had just gone): release and offer again.
        first.waiter.leave();
        s.release_grant();
        assert_eq!(q.offer(&mut s, NOW).map(|h| h.waiter.name), Some("b"));
    }

    #[test]
    fn agents_that_left_are_skipped_when_credentials_go_out() {
        let mut s = state();
        let mut q = HeldQueue::new(8);
        let (a, b) = (Agent::named("a"), Agent::named("b"));
        q.hold(a.clone(), 5).unwrap();
        q.hold(b, 5).unwrap();
        a.leave();
        s.want_tunnel(NOW + 60_000);
        assert_eq!(q.offer(&mut s, NOW).map(|h| h.waiter.name), Some("b"));
        assert!(q.is_empty());
        // Nobody waiting: no grant is taken, so the next check-in gets it at once.
        s.release_grant();
        assert!(q.offer(&mut s, NOW).is_none());
        assert!(
            s.take_grant(NOW),
            "the grant was not used up by an empty queue"
        );
    }
}
