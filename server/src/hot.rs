//! The hot tier: decoded feature state per (view, entity) in the server's own
//! memory, in front of Redis and Postgres, so that the common call touches
//! no network.
//!
//! It is a [`moka`] cache bounded by bytes (`--hot-cache-bytes`; every
//! entry weighs what [`weight`] estimates its heap to be): when full, the
//! least useful entries (TinyLFU) are evicted. 0 turns it off.
//!
//! Coherence with commits. Ingest's commit NOTIFY names the rows it changed
//! (`commits.rs` follows them). For each, the tier bumps a generation and
//! marks the row's entry changed, so reads stop using it; then the rows it
//! holds are read again from Postgres, all of a notification's rows in one
//! query, and put back: a read right after a commit is served from memory,
//! with the new value, as soon as its notification is handled.
//!
//! No race puts old state back. Every fill (a read's, a refresh's) carries
//! the generation its row had *before* the store was read, and is applied,
//! under the cache's per-key lock, only if the generation is still that: a
//! read that began before a commit cannot overwrite what the commit's own
//! refresh (or a later read) put there, whichever finishes last. Marking an
//! entry changed takes the same lock, so it cannot slip between a fill's
//! check and its write. Generations live in a fixed array of counters
//! indexed by the row's hash: two rows sharing one only cost a skipped fill.
//!
//! Lost notifications. If the listener's connection drops, every entry held
//! is treated as changed once it is back (notifications may have been
//! missed meanwhile), and any entry is read again once older than `ttl`
//! (`--cache-ttl-ms`, 5 s): that is the worst-case staleness. An entry filled
//! from Redis counts the age it had there, so the bound holds across tiers.
//!
//! Postgres down. Entries are kept `stale_for` (`--cache-stale-ms`) past
//! their TTL; while Postgres cannot be reached, a call whose rows the tier
//! (or Redis) still holds is answered from them, marked stale (`reader.rs`),
//! and health stays SERVING for that window (`health.rs`).

use std::{
    hash::{BuildHasher, RandomState},
    mem::size_of,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use freshet_store::entities::RowKey;
use moka::{Expiry, ops::compute::Op};

use crate::{
    cache::{Entry, Stale},
    served::Served,
};

/// Generation counters: enough that rows rarely share one.
const STRIPES: usize = 1 << 14;

pub struct HotTier {
    rows: moka::sync::Cache<RowKey, Arc<Held>>,
    generations: Box<[AtomicU64]>,
    hasher: RandomState,
    ttl: Duration,
    /// Entries born before this (nanoseconds after `epoch`) may have missed
    /// a notification: they are read again, and kept only as a fallback.
    trusted_since: AtomicU64,
    epoch: Instant,
}

struct Held {
    entry: Entry,
    /// When the state was read from Postgres (directly, or through Redis).
    born: Instant,
    /// A commit changed the row since.
    changed: AtomicBool,
    weight: u32,
}

/// The generation a row had before its store read: a fill holding it is
/// applied only if no commit changed the row meanwhile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    stripe: usize,
    generation: u64,
}

/// What the tier says about a row.
pub enum Found {
    /// Held, unchanged, younger than the TTL.
    Fresh(Entry),
    /// Read the row from the next tier, and fill it with `ticket`; what was
    /// held (changed, or past its TTL) comes along for a Postgres outage.
    Refresh { ticket: Ticket, stale: Option<Stale> },
}

/// A row looked up by reference: hashes like [`RowKey`], so no key is built
/// to look one up.
#[derive(Hash)]
struct RowRef<'a>(&'a str, &'a str);

impl moka::Equivalent<RowKey> for RowRef<'_> {
    fn equivalent(&self, (view, entity): &RowKey) -> bool {
        self.0 == view && self.1 == entity
    }
}

/// Entries expire `lifetime` after they were read from Postgres.
struct Lifetime(Duration);

impl Lifetime {
    fn left(&self, held: &Held, at: Instant) -> Option<Duration> {
        Some(self.0.saturating_sub(at.saturating_duration_since(held.born)))
    }
}

impl Expiry<RowKey, Arc<Held>> for Lifetime {
    fn expire_after_create(&self, _: &RowKey, held: &Arc<Held>, created_at: Instant) -> Option<Duration> {
        self.left(held, created_at)
    }

    fn expire_after_update(&self, _: &RowKey, held: &Arc<Held>, updated_at: Instant, _: Option<Duration>) -> Option<Duration> {
        self.left(held, updated_at)
    }
}

impl HotTier {
    /// A tier of at most `bytes`, whose entries are fresh for `ttl` and kept
    /// `stale_for` longer for Postgres outages.
    pub fn new(bytes: u64, ttl: Duration, stale_for: Duration) -> HotTier {
        let rows = moka::sync::Cache::builder()
            .max_capacity(bytes)
            .weigher(|_, held: &Arc<Held>| held.weight)
            .expire_after(Lifetime(ttl + stale_for))
            .build();
        HotTier {
            rows,
            generations: (0..STRIPES).map(|_| AtomicU64::new(0)).collect(),
            hasher: RandomState::new(),
            ttl,
            trusted_since: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    fn ticket(&self, view: &str, entity: &str) -> Ticket {
        let stripe = self.hasher.hash_one(RowRef(view, entity)) as usize % STRIPES;
        Ticket { stripe, generation: self.generations[stripe].load(Ordering::Acquire) }
    }

    pub fn get(&self, view: &str, entity: &str) -> Found {
        // The ticket is taken before the entry is looked at, so that a
        // commit noticed in between voids the fill that follows.
        let ticket = self.ticket(view, entity);
        let Some(held) = self.rows.get(&RowRef(view, entity)) else {
            return Found::Refresh { ticket, stale: None };
        };
        let age = held.born.elapsed();
        if age < self.ttl && !held.changed.load(Ordering::Acquire) && self.trusted(&held) {
            return Found::Fresh(held.entry.clone());
        }
        Found::Refresh { ticket, stale: Some(Stale { entry: held.entry.clone(), age }) }
    }

    fn trusted(&self, held: &Held) -> bool {
        let since = self.trusted_since.load(Ordering::Acquire);
        since == 0 || held.born.saturating_duration_since(self.epoch).as_nanos() as u64 >= since
    }

    /// Puts `entry`, read from the store at `born`, unless a commit changed
    /// the row since `ticket` was taken. Returns whether it did.
    pub fn fill(&self, row: RowKey, entry: Entry, born: Instant, ticket: Ticket) -> bool {
        let weight = weight(&row, &entry);
        let generation = &self.generations[ticket.stripe];
        let result = self.rows.entry(row).and_compute_with(|held| {
            // Never replace a younger state (a refresh that already landed).
            let younger = held.is_some_and(|h| h.value().born > born && !h.value().changed.load(Ordering::Acquire));
            match generation.load(Ordering::Acquire) == ticket.generation && !younger {
                true => Op::Put(Arc::new(Held { entry, born, changed: AtomicBool::new(false), weight })),
                false => Op::Nop,
            }
        });
        !matches!(result, moka::ops::compute::CompResult::Unchanged(_) | moka::ops::compute::CompResult::StillNone(_))
    }

    /// A commit changed `rows`: fills that began before are void, entries
    /// held are no longer served. Returns the rows held, each with the
    /// ticket to refresh it with.
    pub fn changed(&self, rows: Vec<RowKey>) -> Vec<(RowKey, Ticket)> {
        // All bumps first: rows of one notification may share a counter.
        let tickets: Vec<Ticket> = rows.iter().map(|(v, e)| self.ticket(v, e)).collect();
        for ticket in &tickets {
            self.generations[ticket.stripe].fetch_add(1, Ordering::AcqRel);
        }
        let mut held_rows = Vec::new();
        for (row, ticket) in rows.into_iter().zip(tickets) {
            if !self.rows.contains_key(&RowRef(&row.0, &row.1)) {
                continue;
            }
            let ticket = Ticket { stripe: ticket.stripe, generation: self.generations[ticket.stripe].load(Ordering::Acquire) };
            // Under the key's lock: never between a fill's check and its write.
            let mut held = false;
            self.rows.entry(row.clone()).and_compute_with(|entry| {
                if let Some(entry) = entry {
                    entry.value().changed.store(true, Ordering::Release);
                    held = true;
                }
                Op::Nop
            });
            if held {
                held_rows.push((row, ticket));
            }
        }
        held_rows
    }

    /// Commit notifications may have been missed (the listener was away):
    /// nothing held now is served again before it is read again.
    pub fn distrust_all(&self) {
        let now = self.epoch.elapsed().as_nanos() as u64;
        self.trusted_since.store(now.max(1), Ordering::Release);
    }

    /// Whether the tier holds anything (to serve while Postgres is down).
    pub fn holds_any(&self) -> bool {
        self.rows.entry_count() > 0
    }

    /// (bytes, entries) held, once pending evictions are done.
    pub fn usage(&self) -> (u64, u64) {
        self.rows.run_pending_tasks();
        (self.rows.weighted_size(), self.rows.entry_count())
    }
}

/// Heap bytes an entry takes, estimated from its parts: the key, the state
/// and the cache's own bookkeeping. It errs high, so that
/// `--hot-cache-bytes` bounds what the process holds.
pub fn weight(row: &RowKey, entry: &Entry) -> u32 {
    /// Per entry: the cache's node, timer and frequency sketch, the `Held`
    /// and its `Arc`s, the allocator's rounding of the state's parts.
    const ENTRY: usize = 256;
    let mut bytes = ENTRY + row.0.len() + row.1.len();
    if let Some(state) = entry {
        bytes += size_of::<Served>() + state.heap_bytes();
    }
    bytes.min(u32::MAX as usize) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(60);

    fn row(entity: &str) -> RowKey {
        ("orders".to_string(), entity.to_string())
    }

    fn state(newest_ms: i64) -> Entry {
        Some(Arc::new(crate::served::bare(newest_ms)))
    }

    fn newest(found: Found) -> Option<i64> {
        match found {
            Found::Fresh(entry) => Some(entry.map_or(-1, |s| s.newest_ms)),
            Found::Refresh { .. } => None,
        }
    }

    fn ticket(found: Found) -> Ticket {
        match found {
            Found::Refresh { ticket, .. } => ticket,
            Found::Fresh(_) => panic!("expected a refresh"),
        }
    }

    #[test]
    fn a_fill_is_served_until_a_commit_changes_the_row() {
        let hot = HotTier::new(1 << 20, TTL, TTL);
        let t = ticket(hot.get("orders", "1"));
        assert!(hot.fill(row("1"), state(1), Instant::now(), t));
        assert_eq!(newest(hot.get("orders", "1")), Some(1));
        assert_eq!(newest(hot.get("orders", "2")), None, "another row is not held");
        // A commit: the entry is no longer served, but kept as a fallback.
        let held = hot.changed(vec![row("1"), row("2")]);
        assert_eq!(held.iter().map(|(r, _)| r.clone()).collect::<Vec<_>>(), [row("1")], "only held rows are refreshed");
        match hot.get("orders", "1") {
            Found::Refresh { stale: Some(stale), .. } => assert_eq!(stale.entry.unwrap().newest_ms, 1),
            _ => panic!("a changed row is read again"),
        }
        // Its refresh lands and is served.
        assert!(hot.fill(row("1"), state(2), Instant::now(), held[0].1));
        assert_eq!(newest(hot.get("orders", "1")), Some(2));
    }

    #[test]
    fn a_read_that_began_before_a_commit_cannot_put_old_state_back() {
        let hot = HotTier::new(1 << 20, TTL, TTL);
        // A read misses and goes to the store...
        let before = ticket(hot.get("orders", "1"));
        let began = Instant::now();
        // ...a commit lands, and its refresh (of a row held by then) too.
        assert!(hot.fill(row("1"), state(1), Instant::now(), ticket(hot.get("orders", "1"))));
        let (_, refresh) = hot.changed(vec![row("1")]).pop().unwrap();
        assert!(hot.fill(row("1"), state(2), Instant::now(), refresh));
        // The first read's answer is older: refused.
        assert!(!hot.fill(row("1"), state(0), began, before));
        assert_eq!(newest(hot.get("orders", "1")), Some(2));
        // A refresh that began before a later commit is refused too.
        let (_, first) = hot.changed(vec![row("1")]).pop().unwrap();
        let (_, second) = hot.changed(vec![row("1")]).pop().unwrap();
        assert!(hot.fill(row("1"), state(4), Instant::now(), second));
        assert!(!hot.fill(row("1"), state(3), Instant::now(), first));
        assert_eq!(newest(hot.get("orders", "1")), Some(4));
    }

    #[test]
    fn a_commit_on_a_row_not_held_voids_fills_in_flight() {
        let hot = HotTier::new(1 << 20, TTL, TTL);
        let before = ticket(hot.get("orders", "7"));
        assert!(hot.changed(vec![row("7")]).is_empty());
        assert!(!hot.fill(row("7"), state(1), Instant::now(), before));
        assert_eq!(newest(hot.get("orders", "7")), None);
        // Unknown entities are held too.
        assert!(hot.fill(row("7"), None, Instant::now(), ticket(hot.get("orders", "7"))));
        assert_eq!(newest(hot.get("orders", "7")), Some(-1));
    }

    #[test]
    fn entries_are_read_again_past_the_ttl_and_after_missed_notifications() {
        let ttl = Duration::from_secs(5);
        let hot = HotTier::new(1 << 20, ttl, TTL);
        // Filled from Redis, where it had been for 6 s: past the TTL already.
        let old = Instant::now() - Duration::from_secs(6);
        assert!(hot.fill(row("1"), state(1), old, ticket(hot.get("orders", "1"))));
        match hot.get("orders", "1") {
            Found::Refresh { stale: Some(stale), .. } => assert!(stale.age >= Duration::from_secs(6)),
            _ => panic!("past its TTL, a row is read again"),
        }
        assert!(hot.fill(row("2"), state(2), Instant::now(), ticket(hot.get("orders", "2"))));
        assert_eq!(newest(hot.get("orders", "2")), Some(2));
        hot.distrust_all();
        assert_eq!(newest(hot.get("orders", "2")), None, "notifications may have been missed");
        assert!(hot.fill(row("2"), state(3), Instant::now(), ticket(hot.get("orders", "2"))));
        assert_eq!(newest(hot.get("orders", "2")), Some(3), "what is read after is trusted");
    }

    #[test]
    fn holds_no_more_than_its_bytes() {
        let one = weight(&row("100000"), &state(1)) as u64;
        let hot = HotTier::new(50 * one, TTL, TTL);
        for i in 0..1000 {
            let entity = (100_000 + i).to_string();
            let t = ticket(hot.get("orders", &entity));
            hot.fill(row(&entity), state(i), Instant::now(), t);
        }
        let (bytes, entries) = hot.usage();
        assert!(bytes <= 50 * one, "{bytes} bytes held, bound {}", 50 * one);
        assert!(entries > 0 && entries <= 50, "{entries} entries");
    }

    #[test]
    fn weight_grows_with_what_an_entry_holds() {
        use freshet_store::state::{Direction, EntityState, Event, Scalar};
        let view = crate::served::reference_catalog().view("orders").unwrap();
        let empty = weight(&row("1"), &None);
        let small = weight(&row("1"), &Some(Arc::new(Served::new(&EntityState::default(), view))));
        let mut state = EntityState::default();
        for i in 0..50 {
            let fields = [("amount".to_string(), Scalar::Double(2.5))].into_iter().collect();
            state.apply(view, &Event { entity: "1".into(), at_ms: 10_000_000 + i * 72_000, fields }, Direction::Add, true);
        }
        let big = weight(&row("1"), &Some(Arc::new(Served::new(&state, view))));
        assert!(empty < small && small < big);
        let tiles: usize = state.series.values().map(Vec::len).sum();
        assert!(tiles >= 100 && big as usize >= tiles * 24, "{big} bytes for {tiles} tiles");
    }
}
