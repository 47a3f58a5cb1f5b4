//! Admission of connections to a public port, before they have proved anything.
//!
//! Every accepted connection takes a [`Ticket`]. While it is *pending* (nothing proved: on
//! the API port no authenticated request, however complete its head; on a gateway no
//! accepted hello) it counts against small bounds, process-wide
//! and per source; once it proves itself ([`Ticket::proved`]) it counts only against the
//! larger bounds of all connections. So a client that opens connections and sends nothing,
//! or never finishes its handshake, cannot fill the slots others need: its own source runs
//! out first, and what it holds is dropped after the pending deadline anyway, while proved
//! agents and admins keep the room that the total bound leaves above the pending one.
//!
//! Sources are IPv4 addresses, or IPv6 `/64` prefixes (one host usually has a whole `/64`).
//! The per-source maps hold only sources with a connection now: a ticket dropped to zero
//! removes its entry, so they never grow beyond the connections themselves.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

/// How long a pending connection has to prove itself before, with every pending place taken,
/// it may be let go for a newer one (a TLS handshake and a first request take far less, even
/// over a satellite link).
pub const EVICT_AFTER: Duration = Duration::from_secs(3);

/// Bounds of one port's connections; see the module docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AdmissionLimits {
    /// All connections at once (keep it below the process's open-file limit).
    pub max_connections: usize,
    /// Connections from one source at once.
    pub max_per_source: usize,
    /// Connections that have proved nothing yet, at once.
    pub max_pending: usize,
    /// Connections from one source that have proved nothing yet, at once.
    pub max_pending_per_source: usize,
}

impl AdmissionLimits {
    /// [`AdmissionLimits::for_open_files`] of this process's own limit (`/proc/self/limits`;
    /// 1,024 where it cannot be read).
    pub fn from_process() -> Self {
        Self::for_open_files(open_files_limit().unwrap_or(1024))
    }

    /// Defaults for a process allowed `open_files` descriptors: the total stays 512 below it
    /// (listeners, the store, the engine, logs), the rest as [`AdmissionLimits::with_totals`].
    pub fn for_open_files(open_files: usize) -> Self {
        const RESERVE: usize = 512;
        Self::with_totals(open_files.saturating_sub(RESERVE).max(64), None)
    }

    /// The bounds an operator sets (`--max-connections`, `--max-connections-per-source`),
    /// the others derived: one source gets at most 8,192 unless told otherwise (a site behind
    /// one NAT address may hold thousands of agents); pending connections get an eighth of the
    /// total (between 16 and 4,096), 256 of them per source (at most the source's total: a
    /// site behind one NAT address reconnecting at once gets through 256 handshakes at a
    /// time, and a single attacker holds at most that many of the pending places).
    pub fn with_totals(max_connections: usize, max_per_source: Option<usize>) -> Self {
        let max_connections = max_connections.max(1);
        let max_per_source = max_per_source.unwrap_or(8192).clamp(1, max_connections);
        Self {
            max_connections,
            max_per_source,
            max_pending: (max_connections / 8).clamp(16, 4096).min(max_connections),
            max_pending_per_source: 256.min(max_per_source),
        }
    }

    /// [`AdmissionLimits::from_process`] with what the operator set instead of the defaults.
    pub fn configured(max_connections: Option<usize>, max_per_source: Option<usize>) -> Self {
        let total = max_connections.unwrap_or_else(|| Self::from_process().max_connections);
        Self::with_totals(total, max_per_source)
    }
}

/// The soft limit of open files of this process (`Max open files` in `/proc/self/limits`).
pub fn open_files_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Why a connection was not admitted (the label of the refusal metric).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// All connections of the port are taken.
    Full,
    /// All connections one source may have are taken.
    SourceFull,
    /// The connections that have proved nothing yet are at their bound.
    Pending,
    /// This source's connections that have proved nothing yet are at their bound.
    SourcePending,
}

impl Refused {
    /// Every reason, so each series exists (at 0) from the start.
    pub const ALL: [Self; 4] = [
        Self::Full,
        Self::SourceFull,
        Self::Pending,
        Self::SourcePending,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Self::Full => "full",
            Self::SourceFull => "source_full",
            Self::Pending => "pending",
            Self::SourcePending => "source_pending",
        }
    }
}

#[derive(Default)]
struct Counts {
    all: usize,
    pending: usize,
    per_source: HashMap<Source, PerSource>,
    /// The sources with pending connections, by how many (so the one holding the most is
    /// found in O(log n) however many sources hold only proved connections).
    by_pending: BTreeSet<(usize, Source)>,
    /// Tickets handed out so far: each one's sequence number.
    issued: u64,
    /// Pending connections let go to make room, ever.
    evicted: u64,
}

#[derive(Default)]
struct PerSource {
    all: usize,
    /// This source's pending connections, oldest first (their count is its pending count).
    pending: VecDeque<Waiting>,
}

/// A pending connection, as its source's queue knows it.
struct Waiting {
    seq: u64,
    since: Instant,
    state: Arc<TicketState>,
}

/// What a ticket shares with the queue of its source.
struct TicketState {
    /// Changed only under the counts' lock, so the counts always agree with it.
    pending: AtomicBool,
    /// Cancelled when the connection is let go to make room for a newer one.
    evict: CancellationToken,
}

/// The key connections are counted under.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Source {
    V4([u8; 4]),
    V6Prefix([u8; 8]),
}

impl From<IpAddr> for Source {
    fn from(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => Self::V4(v4.octets()),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Self::V4(v4.octets()),
                None => {
                    let o = v6.octets();
                    Self::V6Prefix([o[0], o[1], o[2], o[3], o[4], o[5], o[6], o[7]])
                }
            },
        }
    }
}

/// The admission of one port; see the module docs.
pub struct Admission {
    limits: AdmissionLimits,
    counts: Mutex<Counts>,
}

/// One admitted connection's place; gives it back when dropped. Shared (`&self`) so that
/// whatever authenticates the connection's first request can mark it proved.
pub struct Ticket {
    admission: Arc<Admission>,
    source: Source,
    seq: u64,
    state: Arc<TicketState>,
}

/// A snapshot of the counts, for metrics and tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AdmissionCounts {
    pub connections: usize,
    pub pending: usize,
    pub sources: usize,
    /// Pending connections let go to make room for newer ones, since the start.
    pub evicted: u64,
}

impl Admission {
    pub fn new(limits: AdmissionLimits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            counts: Mutex::new(Counts::default()),
        })
    }

    pub fn limits(&self) -> AdmissionLimits {
        self.limits
    }

    /// Admits a new connection from `peer` as pending, or says why not (drop it at once).
    pub fn admit(self: &Arc<Self>, peer: IpAddr) -> Result<Ticket, Refused> {
        self.admit_at(peer, Instant::now())
    }

    /// [`Admission::admit`] at `now`. When every pending place is taken, the oldest pending
    /// connection of the source that holds the most of them is let go to make room (its
    /// [`Ticket::evicted`] completes), provided it has had [`EVICT_AFTER`] to prove itself;
    /// otherwise the newcomer is refused. So a crowd of sources holding connections open
    /// without proving anything cannot keep the pool full: the newest connection, whose
    /// handshake is about to be done, gets in, and the attacker with the most places loses
    /// one.
    pub fn admit_at(self: &Arc<Self>, peer: IpAddr, now: Instant) -> Result<Ticket, Refused> {
        let source = Source::from(peer);
        let l = self.limits;
        let mut guard = self.counts.lock();
        let c = &mut *guard;
        let (mine_all, mine_pending) = c
            .per_source
            .get(&source)
            .map_or((0, 0), |p| (p.all, p.pending.len()));
        if c.all >= l.max_connections {
            return Err(Refused::Full);
        }
        if mine_all >= l.max_per_source {
            return Err(Refused::SourceFull);
        }
        if mine_pending >= l.max_pending_per_source {
            return Err(Refused::SourcePending);
        }
        if c.pending >= l.max_pending {
            // The source holding the most pending places gives up its oldest: at once if the
            // newcomer's source holds fewer (by two or more, so equals do not trade places
            // for ever), else once that one had its time to prove itself.
            let Some(&(most, victim)) = c.by_pending.last() else {
                return Err(Refused::Pending);
            };
            let oldest_since = c
                .per_source
                .get(&victim)
                .and_then(|p| p.pending.front())
                .map(|w| w.since);
            let poorer = mine_pending + 1 < most;
            let had_its_time = oldest_since
                .is_some_and(|since| now.saturating_duration_since(since) >= EVICT_AFTER);
            if !(poorer || had_its_time) {
                return Err(Refused::Pending);
            }
            let popped = c
                .per_source
                .get_mut(&victim)
                .and_then(|p| p.pending.pop_front());
            if let Some(w) = popped {
                w.state.pending.store(false, Ordering::Relaxed);
                w.state.evict.cancel();
                c.pending -= 1;
                c.evicted += 1;
                c.rank(victim, most, most - 1);
            }
        }
        c.all += 1;
        c.pending += 1;
        c.issued += 1;
        let seq = c.issued;
        let state = Arc::new(TicketState {
            pending: AtomicBool::new(true),
            evict: CancellationToken::new(),
        });
        let entry = c.per_source.entry(source).or_default();
        entry.all += 1;
        entry.pending.push_back(Waiting {
            seq,
            since: now,
            state: Arc::clone(&state),
        });
        let now_pending = entry.pending.len();
        c.rank(source, now_pending - 1, now_pending);
        Ok(Ticket {
            admission: Arc::clone(self),
            source,
            seq,
            state,
        })
    }

    pub fn counts(&self) -> AdmissionCounts {
        let c = self.counts.lock();
        AdmissionCounts {
            connections: c.all,
            pending: c.pending,
            sources: c.per_source.len(),
            evicted: c.evicted,
        }
    }
}

impl Counts {
    /// Takes the pending ticket `seq` of `source` out of the counts (proved, or gone).
    fn unpend(&mut self, source: &Source, seq: u64, state: &TicketState) {
        if !state.pending.swap(false, Ordering::Relaxed) {
            return;
        }
        self.pending -= 1;
        if let Some(s) = self.per_source.get_mut(source) {
            if let Some(i) = s.pending.iter().position(|w| w.seq == seq) {
                s.pending.remove(i);
                let left = s.pending.len();
                self.rank(*source, left + 1, left);
            }
        }
    }

    /// `source`'s pending count went from `before` to `after`: its place in `by_pending`.
    fn rank(&mut self, source: Source, before: usize, after: usize) {
        if before > 0 {
            self.by_pending.remove(&(before, source));
        }
        if after > 0 {
            self.by_pending.insert((after, source));
        }
    }
}

impl Ticket {
    /// The connection proved itself (a request, an accepted hello): it no longer counts as
    /// pending.
    pub fn proved(&self) {
        let mut c = self.admission.counts.lock();
        c.unpend(&self.source, self.seq, &self.state);
    }

    pub fn is_pending(&self) -> bool {
        self.state.pending.load(Ordering::Relaxed)
    }

    /// Completes when the connection is let go to make room for a newer one (only ever while
    /// it is pending): drop it then.
    pub fn evicted(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.state.evict.cancelled()
    }

    /// [`Ticket::evicted`], owning what it waits on (for a future stored beside the ticket).
    pub fn evicted_owned(&self) -> tokio_util::sync::WaitForCancellationFutureOwned {
        self.state.evict.clone().cancelled_owned()
    }

    pub fn is_evicted(&self) -> bool {
        self.state.evict.is_cancelled()
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut c = self.admission.counts.lock();
        c.unpend(&self.source, self.seq, &self.state);
        c.all -= 1;
        let gone = match c.per_source.get_mut(&self.source) {
            Some(s) => {
                s.all -= 1;
                s.all == 0
            }
            None => false,
        };
        if gone {
            c.per_source.remove(&self.source);
        }
    }
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ticket")
            .field("source", &self.source)
            .field("pending", &self.is_pending())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn limits() -> AdmissionLimits {
        AdmissionLimits {
            max_connections: 10,
            max_per_source: 6,
            max_pending: 4,
            max_pending_per_source: 2,
        }
    }

    #[test]
    fn a_full_pending_pool_lets_the_biggest_hoarders_oldest_go() {
        let a = Admission::new(AdmissionLimits {
            max_connections: 100,
            max_per_source: 50,
            max_pending: 4,
            max_pending_per_source: 3,
        });
        let t0 = Instant::now();
        let hoarded: Vec<_> = (0..3)
            .map(|i| {
                a.admit_at(ip("10.0.0.1"), t0 + Duration::from_millis(i))
                    .unwrap()
            })
            .collect();
        let other = a.admit_at(ip("10.0.0.2"), t0).unwrap();
        // Full. A newcomer from a source holding fewer than the biggest hoarder gets in at
        // once: the hoarder loses its oldest, however young.
        let soon = t0 + Duration::from_secs(1);
        let newcomer = a.admit_at(ip("10.0.0.3"), soon).unwrap();
        assert!(hoarded[0].is_evicted() && !hoarded[0].is_pending());
        assert!(!hoarded[1].is_evicted() && !other.is_evicted());
        assert_eq!(
            a.counts(),
            AdmissionCounts {
                connections: 5,
                pending: 4,
                sources: 3,
                evicted: 1
            }
        );
        let fourth = a.admit_at(ip("10.0.0.4"), soon).unwrap();
        assert!(hoarded[1].is_evicted() && !hoarded[2].is_evicted());
        // Now everyone holds one: no source is poorer than another, so a newcomer waits
        // until some pending connection had its time to prove itself.
        assert_eq!(
            a.admit_at(ip("10.0.0.5"), soon).map(|_| ()),
            Err(Refused::Pending)
        );
        let late = soon + EVICT_AFTER;
        let fifth = a.admit_at(ip("10.0.0.5"), late).unwrap();
        assert_eq!(a.counts().evicted, 3);
        assert_eq!(
            [&hoarded[2], &other, &newcomer, &fourth]
                .iter()
                .filter(|t| t.is_evicted())
                .count(),
            1
        );
        assert!(!fifth.is_evicted());
        // Proved connections are out of every queue: never let go.
        for t in [&hoarded[2], &other, &newcomer, &fourth, &fifth] {
            if t.is_pending() {
                t.proved();
            }
        }
        assert_eq!(a.counts().pending, 0);
        let later = late + EVICT_AFTER;
        let extra: Vec<_> = (0..4)
            .map(|i| a.admit_at(ip(&format!("10.0.1.{i}")), later).unwrap())
            .collect();
        let _again = a.admit_at(ip("10.0.2.1"), later + EVICT_AFTER).unwrap();
        assert!(!hoarded[2].is_evicted() && !fifth.is_evicted());
        assert_eq!(extra.iter().filter(|t| t.is_evicted()).count(), 1);
        // Evicted tickets, dropped, give back their connection places only.
        drop((hoarded, other, newcomer, fourth, fifth, extra, _again));
        assert_eq!(
            a.counts(),
            AdmissionCounts {
                connections: 0,
                pending: 0,
                sources: 0,
                evicted: 4
            }
        );
    }

    #[test]
    fn the_biggest_hoarder_is_found_however_many_sources_hold_proved_connections() {
        let a = Admission::new(AdmissionLimits {
            max_connections: 100_000,
            max_per_source: 50,
            max_pending: 10,
            max_pending_per_source: 10,
        });
        let t0 = Instant::now();
        // 20,000 agents, each proved, from sources of their own.
        let agents: Vec<_> = (0..20_000u32)
            .map(|i| {
                let [_, b, c, d] = i.to_be_bytes();
                let t = a.admit_at(IpAddr::from([10, b, c, d]), t0).unwrap();
                t.proved();
                t
            })
            .collect();
        let hoard: Vec<_> = (0..9)
            .map(|_| a.admit_at(ip("192.0.2.1"), t0).unwrap())
            .collect();
        let small = a.admit_at(ip("192.0.2.2"), t0).unwrap();
        let admin = a.admit_at(ip("192.0.2.3"), t0).unwrap();
        assert!(hoard[0].is_evicted() && !small.is_evicted() && !admin.is_evicted());
        assert!(agents.iter().all(|t| !t.is_evicted()));
        assert_eq!(a.counts().pending, 10);
    }

    #[tokio::test]
    async fn an_evicted_ticket_says_so_to_its_connection() {
        let a = Admission::new(AdmissionLimits {
            max_connections: 10,
            max_per_source: 10,
            max_pending: 1,
            max_pending_per_source: 1,
        });
        let t0 = Instant::now();
        let old = a.admit_at(ip("10.0.0.1"), t0).unwrap();
        let _new = a.admit_at(ip("10.0.0.2"), t0 + EVICT_AFTER).unwrap();
        tokio::time::timeout(Duration::from_secs(1), old.evicted())
            .await
            .expect("evicted");
    }

    #[test]
    fn one_source_cannot_take_the_pending_slots_of_others() {
        let a = Admission::new(limits());
        let t1 = a.admit(ip("10.0.0.1")).unwrap();
        let t2 = a.admit(ip("10.0.0.1")).unwrap();
        assert_eq!(
            a.admit(ip("10.0.0.1")).map(|_| ()),
            Err(Refused::SourcePending)
        );
        // Others still get in, even with every pending place taken: the source holding
        // the most lets its oldest go.
        let t3 = a.admit(ip("10.0.0.2")).unwrap();
        let t4 = a.admit(ip("10.0.0.3")).unwrap();
        let t5 = a.admit(ip("10.0.0.4")).unwrap();
        assert!(t1.is_evicted() && !t2.is_evicted());
        // Now each holds one: a fifth source waits for someone's time to run out.
        assert_eq!(a.admit(ip("10.0.0.5")).map(|_| ()), Err(Refused::Pending));
        drop((t1, t2, t3, t4, t5));
        assert_eq!(
            a.counts(),
            AdmissionCounts {
                connections: 0,
                pending: 0,
                sources: 0,
                evicted: 1
            }
        );
    }

    #[test]
    fn proved_connections_leave_the_pending_bound_but_not_the_total() {
        let a = Admission::new(limits());
        let mut held = Vec::new();
        for _ in 0..6 {
            let t = a.admit(ip("10.0.0.1")).unwrap();
            t.proved();
            held.push(t);
        }
        assert_eq!(
            a.admit(ip("10.0.0.1")).map(|_| ()),
            Err(Refused::SourceFull)
        );
        for i in 2..6 {
            let t = a.admit(ip(&format!("10.0.0.{i}"))).unwrap();
            t.proved();
            held.push(t);
        }
        assert_eq!(a.admit(ip("10.0.0.9")).map(|_| ()), Err(Refused::Full));
        assert_eq!(a.counts().pending, 0);
        held.pop();
        assert!(a.admit(ip("10.0.0.9")).is_ok());
    }

    #[test]
    fn an_ipv6_host_counts_as_its_prefix() {
        let a = Admission::new(limits());
        let _t1 = a.admit(ip("2001:db8:1:2::1")).unwrap();
        let _t2 = a.admit(ip("2001:db8:1:2::ffff")).unwrap();
        assert_eq!(
            a.admit(ip("2001:db8:1:2:abcd::1")).map(|_| ()),
            Err(Refused::SourcePending)
        );
        assert!(a.admit(ip("2001:db8:1:3::1")).is_ok());
        // An IPv4-mapped address is its IPv4 source.
        let _t3 = a.admit(ip("10.0.0.1")).unwrap();
        let _t4 = a.admit(ip("::ffff:10.0.0.1")).unwrap();
        assert_eq!(
            a.admit(ip("10.0.0.1")).map(|_| ()),
            Err(Refused::SourcePending)
        );
    }

    #[test]
    fn the_process_limit_is_read() {
        let n = open_files_limit().expect("/proc/self/limits");
        assert!(n >= 64, "{n}");
        assert!(AdmissionLimits::from_process().max_connections < n);
    }

    #[test]
    fn defaults_stay_below_the_open_file_limit() {
        let l = AdmissionLimits::for_open_files(20_000);
        assert_eq!(l.max_connections, 19_488);
        assert_eq!(l.max_per_source, 8_192);
        assert!(l.max_pending < l.max_connections);
        assert_eq!(l.max_pending, 2_436);
        let tiny = AdmissionLimits::for_open_files(100);
        assert!(tiny.max_connections >= 64 && tiny.max_pending >= 16);
    }

    #[test]
    fn what_the_operator_sets_bounds_the_derived_limits() {
        let l = AdmissionLimits::with_totals(1_000, Some(10));
        assert_eq!(
            l,
            AdmissionLimits {
                max_connections: 1_000,
                max_per_source: 10,
                max_pending: 125,
                max_pending_per_source: 10,
            }
        );
        // No bound exceeds the one above it, however small the total.
        let l = AdmissionLimits::with_totals(5, None);
        assert_eq!(
            (l.max_per_source, l.max_pending, l.max_pending_per_source),
            (5, 5, 5)
        );
        assert_eq!(AdmissionLimits::with_totals(0, Some(0)).max_connections, 1);
        // Only the per-source bound set: the total stays the process's.
        let l = AdmissionLimits::configured(None, Some(100));
        assert_eq!(
            l.max_connections,
            AdmissionLimits::from_process().max_connections
        );
        assert_eq!(l.max_per_source, 100);
    }
}
