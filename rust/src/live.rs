//! A store that learns in place: live outcomes in O(their tags), readers that never block.
//!
//! Counts are the state and scores are derived (`Store::score_at`), so an outcome only has to add
//! to the counts of its tags; what stands in the way is concurrency: deciders read the counts
//! from other threads (batches run with the GIL released) while the learner writes them. Two
//! copies of the store ("left-right"): readers always find one copy that no writer touches, and
//! the writer applies each change to the idle copy, publishes it, waits for the readers still on
//! the other one to leave, and applies the same change there. So
//! - readers take no lock and never wait for a writer (entering is two atomic increments and a
//!   load; a reader that raced a publish retries on the new copy);
//! - readers never see half an outcome: a copy changes only while no reader is on it;
//! - a write costs twice O(its tags) plus the wait for readers of one query (the deciders enter
//!   per query, never per batch, so a writer never waits for a whole batch).
//!
//! The price is twice the memory of the counts; nothing grows with the number of outcomes.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::error::{Result, RouterError};
use crate::table::{Outcome, Store};

/// A store learning live outcomes in place; see the module docs.
pub struct LiveStore {
    copies: [UnsafeCell<Store>; 2],
    /// The copy new readers enter.
    active: AtomicUsize,
    /// Readers inside each copy.
    readers: [AtomicUsize; 2],
    /// Serialises writers; also marks a write that panicked half-way (poisoned): the copies may
    /// then differ, so every later write is refused.
    writer: Mutex<()>,
    /// Changes applied so far (one per `learn`, per batch of `learn_many`).
    version: AtomicU64,
}

// SAFETY: the copies are only read through `read`, which registers the reader in `readers`
// first, and only written by `write`, which holds `writer` and writes a copy only after it is
// unpublished and its reader count has been seen at 0 (see `write` for the ordering argument).
// `Store` itself is Send + Sync.
unsafe impl Sync for LiveStore {}

impl std::fmt::Debug for LiveStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveStore")
            .field("version", &self.version())
            .finish_non_exhaustive()
    }
}

/// Leaves the copy a reader entered, also when the reader panics.
struct ReadGuard<'a>(&'a AtomicUsize);

impl Drop for ReadGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, SeqCst);
    }
}

impl LiveStore {
    /// A live store starting from `store` (its score matrix is not kept up to date: live readers
    /// derive scores per tag, `snapshot` recomputes it).
    pub fn new(store: Store) -> Self {
        let twin = store.clone();
        Self {
            copies: [UnsafeCell::new(store), UnsafeCell::new(twin)],
            active: AtomicUsize::new(0),
            readers: [AtomicUsize::new(0), AtomicUsize::new(0)],
            writer: Mutex::new(()),
            version: AtomicU64::new(0),
        }
    }

    /// Number of changes applied since `new`.
    pub fn version(&self) -> u64 {
        self.version.load(SeqCst)
    }

    /// Runs `f` on a consistent state of the store. Never blocks; keep `f` short (one query):
    /// a writer waits for it.
    #[inline]
    pub fn read<R>(&self, f: impl FnOnce(&Store) -> R) -> R {
        let i = loop {
            let i = self.active.load(SeqCst);
            self.readers[i].fetch_add(1, SeqCst);
            // A publish between the load and the increment: the writer may not have seen this
            // reader, so leave and enter the newly published copy instead.
            if self.active.load(SeqCst) == i {
                break i;
            }
            self.readers[i].fetch_sub(1, SeqCst);
        };
        let _guard = ReadGuard(&self.readers[i]);
        // SAFETY: registered in readers[i] while copy i is published, so no writer touches copy
        // i until the guard drops (see `write`).
        f(unsafe { &*self.copies[i].get() })
    }

    /// A value copy of the current state, scores computed: O(store).
    pub fn snapshot(&self) -> Store {
        let mut s = self.read(Store::clone);
        s.compute_scores();
        s
    }

    /// Adds one outcome (see `Store::learn`).
    pub fn learn<S: AsRef<str>>(&self, tags: &[S], model: &str, outcome: Outcome) -> Result<u64> {
        self.write(|s| s.learn(tags, model, outcome))
    }

    /// Adds many outcomes as one change: readers see all of them or none.
    pub fn learn_many<S: AsRef<str>>(&self, outcomes: &[(&[S], &str, Outcome)]) -> Result<u64> {
        self.write(|s| {
            for (tags, model, outcome) in outcomes {
                s.learn(tags, model, *outcome);
            }
        })
    }

    fn lock(&self) -> Result<MutexGuard<'_, ()>> {
        self.writer.lock().map_err(|_: PoisonError<_>| {
            RouterError::invalid(
                "this live store stopped learning: an earlier update panicked half-way; \
                 rebuild it from a snapshot",
            )
        })
    }

    /// Applies `op` to both copies, one at a time, each while no reader is on it. `op` must be
    /// deterministic (it runs twice and both copies must end equal) and must not fail.
    fn write(&self, op: impl Fn(&mut Store)) -> Result<u64> {
        let _w = self.lock()?;
        let live = self.active.load(SeqCst);
        let idle = 1 - live;
        // Readers still on the idle copy entered it before the previous publish: they are
        // finishing one query.
        self.wait_for_readers(idle);
        // SAFETY: writers are serialised by `writer`; copy `idle` is unpublished and has no
        // reader, and a reader that enters it now sees `active == live` on its re-check and
        // leaves without reading.
        op(unsafe { &mut *self.copies[idle].get() });
        // Publish. Every access is SeqCst: either a reader's increment of readers[live] comes
        // before the writer's load of it below (the writer waits for that reader), or the
        // publish comes before the reader's re-check of `active` (the reader moves on to `idle`).
        self.active.store(idle, SeqCst);
        self.wait_for_readers(live);
        // SAFETY: as above, for the copy just unpublished.
        op(unsafe { &mut *self.copies[live].get() });
        Ok(self.version.fetch_add(1, SeqCst) + 1)
    }

    fn wait_for_readers(&self, i: usize) {
        let mut spins = 0_u32;
        while self.readers[i].load(SeqCst) != 0 {
            // Readers stay for one query (about a microsecond): spin briefly, then yield.
            if spins < 64 {
                std::hint::spin_loop();
                spins += 1;
            } else {
                std::thread::yield_now();
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::float_cmp)]
mod tests {
    use super::*;
    use crate::table::{Params, Record, Weighting};
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    fn base() -> Store {
        let r = |q, tags, m, o| Record {
            query_id: q,
            tags,
            model: m,
            outcome: o,
        };
        Store::from_records(
            Params::default(),
            [
                r("q1", &["a", "b"][..], "big", Outcome::Win),
                r("q1", &["a", "b"][..], "small", Outcome::Loss),
            ],
        )
        .unwrap()
    }

    #[test]
    fn learning_matches_records_with_fresh_ids() {
        for w in [
            Weighting::Paper,
            Weighting::None,
            Weighting::Shrunk,
            Weighting::Difficulty,
        ] {
            let p = Params {
                weighting: w,
                prior_strength: 2.0,
                ..Params::default()
            };
            let start = base().reweighted(p).unwrap();
            let live = LiveStore::new(start.clone());
            let outs: [(&[&str], &str, Outcome); 4] = [
                (&["a"], "small", Outcome::Win),
                (&["b", "c", "b"], "small", Outcome::Tie),
                (&["c"], "new", Outcome::Loss),
                (&[], "big", Outcome::Win),
            ];
            let mut recs = Vec::new();
            let ids: Vec<String> = (0..outs.len()).map(|i| format!("fb:{i}")).collect();
            for (i, (tags, m, o)) in outs.iter().enumerate() {
                live.learn(tags, m, *o).unwrap();
                recs.push(Record {
                    query_id: &ids[i],
                    tags,
                    model: m,
                    outcome: *o,
                });
            }
            let once = start.with_records(recs).unwrap();
            let snap = live.snapshot();
            assert_eq!(snap.models(), once.models(), "{w:?}");
            assert_eq!(
                snap.tag_names().collect::<Vec<_>>(),
                once.tag_names().collect::<Vec<_>>()
            );
            assert_eq!(snap.score_matrix(), once.score_matrix(), "{w:?}");
            assert_eq!(snap.n_queries(), 1, "live outcomes add no query rows");
            assert_eq!(snap.n_learned(), 4);
        }
    }

    #[test]
    fn without_model_drops_its_learned_queries() {
        let live = LiveStore::new(base());
        live.learn(&["a", "z"], "small", Outcome::Win).unwrap();
        live.learn(&["a"], "big", Outcome::Win).unwrap();
        let s = live.snapshot();
        assert_eq!(s.tag_count("a").unwrap(), 3);
        let r = s.without_model("small").unwrap();
        assert_eq!(r.tag_count("a").unwrap(), 2);
        // "z" was carried only by small's outcome.
        assert!(r.tag_count("z").is_err());
        let direct = base()
            .without_model("small")
            .unwrap()
            .with_records([Record {
                query_id: "fb:1",
                tags: &["a"],
                model: "big",
                outcome: Outcome::Win,
            }])
            .unwrap();
        assert_eq!(r.score_matrix(), direct.score_matrix());
    }

    #[test]
    fn merged_adds_learned_counts() {
        let a = LiveStore::new(base());
        a.learn(&["a"], "small", Outcome::Win).unwrap();
        let b = LiveStore::new(Store::new(Params::default()).unwrap());
        b.learn(&["a", "q"], "other", Outcome::Tie).unwrap();
        let m = a.snapshot().merged(&b.snapshot()).unwrap();
        assert_eq!(m.n_learned(), 2);
        assert_eq!(m.tag_count("a").unwrap(), 3);
        assert_eq!(m.learned_counts("other", "q").unwrap(), [0, 1, 0]);
    }

    #[test]
    fn readers_never_see_half_an_outcome() {
        // Each outcome adds one win on "a" and one on "b" for "small": a reader that saw one
        // without the other would catch a half-applied update.
        let live = Arc::new(LiveStore::new(base()));
        let stop = Arc::new(AtomicBool::new(false));
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let (live, stop) = (Arc::clone(&live), Arc::clone(&stop));
                std::thread::spawn(move || {
                    let mut seen = 0_u64;
                    while !stop.load(SeqCst) {
                        let (a, b) = live.read(|s| {
                            (
                                s.counts("small", "a").unwrap()[0],
                                s.counts("small", "b").unwrap()[0],
                            )
                        });
                        assert_eq!(a, b);
                        seen += 1;
                    }
                    seen
                })
            })
            .collect();
        for _ in 0..5_000 {
            live.learn(&["a", "b"], "small", Outcome::Win).unwrap();
        }
        stop.store(true, SeqCst);
        for r in readers {
            assert!(r.join().unwrap() > 0);
        }
        assert_eq!(
            live.read(|s| s.counts("small", "a").unwrap()),
            [5_000, 0, 1]
        );
        assert_eq!(live.version(), 5_000);
    }
}
