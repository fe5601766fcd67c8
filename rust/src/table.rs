//! The TagScorer store: raw win/tie/loss counts per (tag, model), tag frequencies `count_t`, and
//! the dense score matrix derived from them (paper 3.3).
//!
//! A store is a value: every update (`with_records`, `with_model`, `without_model`, `merged`)
//! returns a new store, so readers (deciders, other threads) never see a half-applied update and
//! need no lock. The raw data kept per training query (its tag set and per-model outcome counts)
//! is what makes updates exact: `count_t` counts distinct queries, so adding or removing a model
//! must know which queries remain judged by anyone.
//!
//! Live outcomes (`learn`) are the exception to "a row per query": each is a query of its own,
//! judged by one model, so it is kept only as counts, attributed to its model (`anon`): enough
//! for `count_t`, for `without_model` (its queries go with it) and for `merged`, in
//! O(its tags) per outcome and memory that does not grow with history. Counts are the state;
//! scores are derived (`score_at`), either all at once (`compute_scores`, the value path) or per
//! tag at decision time (`live::LiveStore`), by the same code, so both agree to the last bit.

use std::collections::{HashMap, HashSet};
use std::hash::BuildHasherDefault;

use rustc_hash::FxHasher;

use crate::error::{pyrepr, Result, RouterError};

/// Hash map with the Fx hasher: tag lookups on the routing hot path hash short strings, where
/// SipHash (std's default) costs several times more and DoS resistance buys nothing.
pub type FxMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;
/// Hash set with the Fx hasher.
pub type FxSet<K> = HashSet<K, BuildHasherDefault<FxHasher>>;

// ==== Parameters ====

/// Outcome of a model's answer against the reference (`M_LLM` in the paper).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Win = 0,
    Tie = 1,
    Loss = 2,
}

impl Outcome {
    /// Parses the exact lower-case labels `win`, `tie`, `loss`.
    pub fn parse(label: &str) -> Option<Self> {
        match label {
            "win" => Some(Self::Win),
            "tie" => Some(Self::Tie),
            "loss" => Some(Self::Loss),
            _ => None,
        }
    }
}

/// How per-tag outcome counts become a score.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Weighting {
    /// The paper's `w_t = (1 - exp(-count_t)) / sum_t' count_t'` times the summed outcome scores.
    Paper,
    /// `w_t = 1`: the summed outcome scores alone (the w_t ablation).
    None,
    /// Mean outcome score per (tag, model) shrunk towards the model's global mean with
    /// pseudo-count `prior_strength`.
    Shrunk,
    /// Like `Shrunk`, but towards a per-(tag, model) prior from a one-step Rasch approximation:
    /// the model's ability plus the tag's difficulty, both estimated on every model of the store.
    Difficulty,
}

impl Weighting {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "paper" => Some(Self::Paper),
            "none" => Some(Self::None),
            "shrunk" => Some(Self::Shrunk),
            "difficulty" => Some(Self::Difficulty),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Paper => "paper",
            Self::None => "none",
            Self::Shrunk => "shrunk",
            Self::Difficulty => "difficulty",
        }
    }

    pub(crate) fn code(self) -> u8 {
        match self {
            Self::Paper => 0,
            Self::None => 1,
            Self::Shrunk => 2,
            Self::Difficulty => 3,
        }
    }

    pub(crate) fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(Self::Paper),
            1 => Some(Self::None),
            2 => Some(Self::Shrunk),
            3 => Some(Self::Difficulty),
            _ => None,
        }
    }
}

/// Scoring parameters: outcome scores `s_r` and the weighting mode.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Params {
    pub s_win: f64,
    pub s_tie: f64,
    pub s_loss: f64,
    pub weighting: Weighting,
    pub prior_strength: f64,
}

impl Default for Params {
    /// The paper's defaults (3.3, F.2): `s_win = 1`, `s_tie = 0.15`, `s_loss = -1`.
    fn default() -> Self {
        Self {
            s_win: 1.0,
            s_tie: 0.15,
            s_loss: -1.0,
            weighting: Weighting::Paper,
            prior_strength: 0.0,
        }
    }
}

impl Params {
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("s_win", self.s_win),
            ("s_tie", self.s_tie),
            ("s_loss", self.s_loss),
        ] {
            if !v.is_finite() {
                return Err(RouterError::invalid(format!(
                    "{name} must be finite, got {v}"
                )));
            }
        }
        if !(self.prior_strength.is_finite() && self.prior_strength >= 0.0) {
            return Err(RouterError::invalid(format!(
                "prior_strength must be finite and >= 0, got {}",
                self.prior_strength
            )));
        }
        // The prior lives on the logit of (s - s_loss) / (s_win - s_loss), which needs a
        // positive range: with s_win <= s_loss "better" has no direction to map.
        if self.weighting == Weighting::Difficulty && self.s_win <= self.s_loss {
            return Err(RouterError::invalid(format!(
                "weighting 'difficulty' needs s_win > s_loss, got s_win={} and s_loss={}",
                self.s_win, self.s_loss
            )));
        }
        Ok(())
    }

    /// `sum_r counts[r] * s_r`, always in the order win, tie, loss (the reference sums the same
    /// way, so both agree to the last bit).
    #[inline]
    pub fn outcome_sum(&self, c: [u32; 3]) -> f64 {
        f64::from(c[0]) * self.s_win + f64::from(c[1]) * self.s_tie + f64::from(c[2]) * self.s_loss
    }
}

/// `1 - exp(-count_t)`: the numerator of the paper's `w_t`.
#[inline]
fn weight_num(count: u32) -> f64 {
    1.0 - (-f64::from(count)).exp()
}

/// Number of outcomes in a `[win, tie, loss]` triple.
#[inline]
fn n3(c: [u32; 3]) -> f64 {
    f64::from(c[0]) + f64::from(c[1]) + f64::from(c[2])
}

/// Bounds a rate away from 0 and 1 so its logit stays finite: a tag every model always wins
/// (or loses) would otherwise push every prior to the end of the scale.
#[inline]
fn clip_rate(p: f64) -> f64 {
    p.clamp(1e-3, 1.0 - 1e-3)
}

#[inline]
fn logit(p: f64) -> f64 {
    (p / (1.0 - p)).ln()
}

#[inline]
fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

// ==== The store ====

/// One training query: its tag set and how often each model got each outcome on it.
#[derive(Debug, Clone)]
pub struct Query {
    pub id: Box<str>,
    /// Sorted, distinct tag indices.
    pub tags: Box<[u32]>,
    /// `(model index, [win, tie, loss])`, at most one entry per model.
    pub judged: Vec<(u32, [u32; 3])>,
}

/// The tag-score store.
#[derive(Debug, Clone, Default)]
pub struct Store {
    pub(crate) params: Params,
    pub(crate) models: Vec<String>,
    pub(crate) model_index: FxMap<Box<str>, u32>,
    pub(crate) tags: Vec<Box<str>>,
    pub(crate) tag_index: FxMap<Box<str>, u32>,
    pub(crate) queries: Vec<Query>,
    pub(crate) query_index: FxMap<Box<str>, u32>,
    /// `counts[model][tag] = [win, tie, loss]` over the queries carrying the tag. Model-major so
    /// adding or removing a model touches one vector.
    pub(crate) counts: Vec<Vec<[u32; 3]>>,
    /// Per model, outcome counts over records (each record once, whatever its number of tags):
    /// the model's global mean for the "shrunk" weighting, its ability for "difficulty".
    pub(crate) model_totals: Vec<[u32; 3]>,
    /// Live outcomes (`learn`), each an anonymous query judged by one model:
    /// `anon[model][tag] = [win, tie, loss]` (already included in `counts`). Their number per
    /// (model, tag) is their share of `count_t`, which goes with the model in `without_model`.
    pub(crate) anon: Vec<Vec<[u32; 3]>>,
    /// Per model, live outcomes by kind (already included in `model_totals`).
    pub(crate) anon_totals: Vec<[u32; 3]>,
    /// `count_t`: distinct queries carrying tag t (named ones and live outcomes).
    pub(crate) tag_queries: Vec<u32>,
    /// `sum_t count_t`, the paper's shared denominator of `w_t`.
    pub(crate) total_tag_queries: u64,
    /// `1 - exp(-count_t)`, the numerator of the paper's `w_t`, kept with `count_t` so that a
    /// live decision does not pay an `exp` per tag.
    pub(crate) tag_weight_num: Vec<f64>,
    /// `outcome_sums[model][tag] = sum_r count(t, M, r) * s_r`, kept with `counts` (the same
    /// function of the same counts, so the same bits) so that a live decision reads one number
    /// per (tag, model), as a snapshot decider does.
    pub(crate) outcome_sums: Vec<Vec<f64>>,
    /// `scores[tag * n_models + model]`. Derived.
    pub(crate) scores: Vec<f64>,
}

impl Store {
    /// An empty store with the given parameters.
    pub fn new(params: Params) -> Result<Self> {
        params.validate()?;
        Ok(Self {
            params,
            ..Self::default()
        })
    }

    pub fn params(&self) -> Params {
        self.params
    }

    pub fn models(&self) -> &[String] {
        &self.models
    }

    pub fn n_models(&self) -> usize {
        self.models.len()
    }

    pub fn n_tags(&self) -> usize {
        self.tags.len()
    }

    pub fn n_queries(&self) -> usize {
        self.queries.len()
    }

    pub fn tag_names(&self) -> impl ExactSizeIterator<Item = &str> {
        self.tags.iter().map(AsRef::as_ref)
    }

    pub fn tag_name(&self, t: u32) -> &str {
        &self.tags[t as usize]
    }

    /// Index of a tag by name; the routing hot path.
    #[inline]
    pub fn tag_id(&self, tag: &str) -> Option<u32> {
        self.tag_index.get(tag).copied()
    }

    pub fn model_id(&self, model: &str) -> Option<u32> {
        self.model_index.get(model).copied()
    }

    pub(crate) fn require_model(&self, model: &str) -> Result<u32> {
        self.model_id(model)
            .ok_or_else(|| RouterError::unknown_model(model, &self.models))
    }

    fn require_tag(&self, tag: &str) -> Result<u32> {
        self.tag_id(tag)
            .ok_or_else(|| RouterError::UnknownTag(tag.to_owned()))
    }

    /// The paper's `score(M, t)` (or the chosen weighting's).
    pub fn score(&self, model: &str, tag: &str) -> Result<f64> {
        let m = self.require_model(model)?;
        let t = self.require_tag(tag)?;
        Ok(self.scores[t as usize * self.models.len() + m as usize])
    }

    /// `[win, tie, loss]` counts of `model` on queries carrying `tag`.
    pub fn counts(&self, model: &str, tag: &str) -> Result<[u32; 3]> {
        let m = self.require_model(model)?;
        let t = self.require_tag(tag)?;
        Ok(self.counts[m as usize][t as usize])
    }

    /// `count_t`: how many distinct training queries carry `tag`.
    pub fn tag_count(&self, tag: &str) -> Result<u32> {
        Ok(self.tag_queries[self.require_tag(tag)? as usize])
    }

    /// Per-model outcome counts over records.
    pub fn model_totals(&self, model: &str) -> Result<[u32; 3]> {
        Ok(self.model_totals[self.require_model(model)? as usize])
    }

    /// The dense score matrix, `[tag * n_models + model]`.
    pub fn score_matrix(&self) -> &[f64] {
        &self.scores
    }

    pub fn queries(&self) -> &[Query] {
        &self.queries
    }

    /// Number of outcome records the store was built from.
    pub fn n_records(&self) -> u64 {
        self.model_totals
            .iter()
            .flatten()
            .map(|&c| u64::from(c))
            .sum()
    }

    /// Number of live outcomes learned (`learn`), all models.
    pub fn n_learned(&self) -> u64 {
        self.anon_totals
            .iter()
            .flatten()
            .map(|&c| u64::from(c))
            .sum()
    }

    /// `[win, tie, loss]` live outcomes of `model` on `tag` (a part of `counts`).
    pub fn learned_counts(&self, model: &str, tag: &str) -> Result<[u32; 3]> {
        let m = self.require_model(model)?;
        let t = self.require_tag(tag)?;
        Ok(self.anon[m as usize][t as usize])
    }

    // ---- live learning (in place, O(tags x models)) ----

    /// Adds one live outcome in place: an anonymous query carrying `tags` (duplicates count
    /// once; tags and the model are added when new), judged once for `model`. Costs O(its tags),
    /// plus O(models) for a new tag and O(tags) for a new model; never O(queries) or O(history).
    /// Leaves the score matrix stale: live readers derive scores per tag (`score_at`), and
    /// `LiveStore::snapshot` recomputes it for a value copy.
    pub fn learn<S: AsRef<str>>(&mut self, tags: &[S], model: &str, outcome: Outcome) {
        let m = self.intern_model(model) as usize;
        let mut ids: Vec<u32> = tags.iter().map(|t| self.intern_tag(t.as_ref())).collect();
        ids.sort_unstable();
        ids.dedup();
        let o = outcome as usize;
        let p = self.params;
        for &t in &ids {
            let t = t as usize;
            self.counts[m][t][o] += 1;
            self.outcome_sums[m][t] = p.outcome_sum(self.counts[m][t]);
            self.anon[m][t][o] += 1;
            self.tag_queries[t] += 1;
            self.tag_weight_num[t] = weight_num(self.tag_queries[t]);
        }
        self.total_tag_queries += ids.len() as u64;
        self.model_totals[m][o] += 1;
        self.anon_totals[m][o] += 1;
    }

    // ---- updates (each returns a new store) ----

    /// Builds a store from outcome records.
    pub fn from_records<'a, I>(params: Params, records: I) -> Result<Self>
    where
        I: IntoIterator<Item = Record<'a>>,
    {
        let mut store = Self::new(params)?;
        let mut ingest = Ingest::new(&mut store);
        for r in records {
            for t in r.tags {
                ingest.tag(t);
            }
            ingest.finish_record(r.query_id, r.model, r.outcome)?;
        }
        ingest.finish();
        Ok(store)
    }

    /// This store plus more records (for existing or new models).
    pub fn with_records<'a, I>(&self, records: I) -> Result<Self>
    where
        I: IntoIterator<Item = Record<'a>>,
    {
        let mut store = self.clone();
        let mut ingest = Ingest::new(&mut store);
        for r in records {
            for t in r.tags {
                ingest.tag(t);
            }
            ingest.finish_record(r.query_id, r.model, r.outcome)?;
        }
        ingest.finish();
        Ok(store)
    }

    /// The same counts scored with other parameters.
    pub fn reweighted(&self, params: Params) -> Result<Self> {
        params.validate()?;
        let mut store = self.clone();
        store.params = params;
        store.recompute();
        Ok(store)
    }

    /// This store without `model`: its counts go, and so do the queries only it was judged on
    /// (they no longer count towards `count_t`), and tags left on no query.
    pub fn without_model(&self, model: &str) -> Result<Self> {
        let m = self.require_model(model)?;
        if self.models.len() == 1 {
            return Err(RouterError::invalid(format!(
                "cannot remove {}: it is the only model (a store needs at least one)",
                pyrepr(model)
            )));
        }
        let mut store = self.clone();
        store.models.remove(m as usize);
        store.counts.remove(m as usize);
        store.model_totals.remove(m as usize);
        // The model's live outcomes were queries judged by it alone: they leave `count_t` too.
        store.anon.remove(m as usize);
        store.anon_totals.remove(m as usize);
        store.model_index = index_of(&store.models);
        for q in &mut store.queries {
            q.judged.retain(|&(j, _)| j != m);
            for (j, _) in &mut q.judged {
                if *j > m {
                    *j -= 1;
                }
            }
        }
        if store.queries.iter().any(|q| q.judged.is_empty()) {
            store.queries.retain(|q| !q.judged.is_empty());
            store.query_index = store
                .queries
                .iter()
                .enumerate()
                .map(|(i, q)| (q.id.clone(), to_u32(i)))
                .collect();
        }
        store.recompute();
        Ok(store)
    }

    /// Counts of both stores added up (as if built from both record sets, `self`'s first);
    /// parameters are `self`'s.
    pub fn merged(&self, other: &Store) -> Result<Self> {
        let mut store = self.clone();
        let model_map: Vec<u32> = other.models.iter().map(|m| store.intern_model(m)).collect();
        let tag_map: Vec<u32> = other.tags.iter().map(|t| store.intern_tag(t)).collect();
        let mut scratch: Vec<u32> = Vec::new();
        for q in &other.queries {
            scratch.clear();
            scratch.extend(q.tags.iter().map(|&t| tag_map[t as usize]));
            scratch.sort_unstable();
            let qi = store.find_or_add_query(&q.id, &scratch)?;
            let entry = &mut store.queries[qi as usize];
            for &(m, c) in &q.judged {
                add_judged(&mut entry.judged, model_map[m as usize], c);
            }
        }
        add_columns(
            (&mut store.counts, &mut store.model_totals),
            (&other.counts, &other.model_totals),
            &model_map,
            &tag_map,
        );
        // Live outcomes are anonymous queries, so they never collide: counts add.
        add_columns(
            (&mut store.anon, &mut store.anon_totals),
            (&other.anon, &other.anon_totals),
            &model_map,
            &tag_map,
        );
        store.recompute();
        Ok(store)
    }

    // ---- internals ----

    fn intern_model(&mut self, model: &str) -> u32 {
        if let Some(&m) = self.model_index.get(model) {
            return m;
        }
        let m = to_u32(self.models.len());
        self.models.push(model.to_owned());
        self.model_index.insert(model.into(), m);
        self.counts.push(vec![[0; 3]; self.tags.len()]);
        self.model_totals.push([0; 3]);
        self.anon.push(vec![[0; 3]; self.tags.len()]);
        self.anon_totals.push([0; 3]);
        self.outcome_sums.push(vec![0.0; self.tags.len()]);
        m
    }

    fn intern_tag(&mut self, tag: &str) -> u32 {
        if let Some(&t) = self.tag_index.get(tag) {
            return t;
        }
        let t = to_u32(self.tags.len());
        self.tags.push(tag.into());
        self.tag_index.insert(tag.into(), t);
        for col in self.counts.iter_mut().chain(self.anon.iter_mut()) {
            col.push([0; 3]);
        }
        for col in &mut self.outcome_sums {
            col.push(0.0);
        }
        // Kept in step with `tags` so that `learn` can count the new tag at once.
        self.tag_queries.push(0);
        self.tag_weight_num.push(weight_num(0));
        t
    }

    /// Index of query `id`, adding it with `tags` (sorted, distinct) when new; an existing query
    /// must carry the same tag set.
    fn find_or_add_query(&mut self, id: &str, tags: &[u32]) -> Result<u32> {
        if let Some(&q) = self.query_index.get(id) {
            let known = &self.queries[q as usize].tags;
            if **known != *tags {
                return Err(self.conflicting_tags(id, known, tags));
            }
            return Ok(q);
        }
        let q = to_u32(self.queries.len());
        self.queries.push(Query {
            id: id.into(),
            tags: tags.into(),
            judged: Vec::new(),
        });
        self.query_index.insert(id.into(), q);
        Ok(q)
    }

    #[cold]
    #[inline(never)]
    fn conflicting_tags(&self, id: &str, known: &[u32], new: &[u32]) -> RouterError {
        let names = |ids: &[u32]| -> Vec<&str> { ids.iter().map(|&t| self.tag_name(t)).collect() };
        RouterError::inconsistent(format!(
            "query {} appears with two different tag sets: {:?} and {:?}",
            pyrepr(id),
            names(known),
            names(new)
        ))
    }

    /// Recomputes everything derived from the raw data: `count_t`, drops tags on no query, and
    /// the score matrix. Called after every update.
    pub(crate) fn recompute(&mut self) {
        let mut tq = vec![0_u32; self.tags.len()];
        for q in &self.queries {
            for &t in &q.tags {
                tq[t as usize] += 1;
            }
        }
        for col in &self.anon {
            for (n, c) in tq.iter_mut().zip(col) {
                *n += c[0] + c[1] + c[2];
            }
        }
        if tq.contains(&0) {
            self.drop_unused_tags(&tq);
            tq.retain(|&c| c > 0);
        }
        self.total_tag_queries = tq.iter().map(|&c| u64::from(c)).sum();
        self.tag_weight_num = tq.iter().map(|&c| weight_num(c)).collect();
        self.tag_queries = tq;
        let p = self.params;
        self.outcome_sums = self
            .counts
            .iter()
            .map(|col| col.iter().map(|&c| p.outcome_sum(c)).collect())
            .collect();
        self.compute_scores();
    }

    fn drop_unused_tags(&mut self, tq: &[u32]) {
        let mut remap = vec![u32::MAX; tq.len()];
        let mut next = 0_u32;
        for (t, &c) in tq.iter().enumerate() {
            if c > 0 {
                remap[t] = next;
                next += 1;
            }
        }
        let keep = |t: usize| tq[t] > 0;
        let mut i = 0;
        self.tags.retain(|_| {
            i += 1;
            keep(i - 1)
        });
        self.tag_index = index_of(&self.tags);
        for col in self.counts.iter_mut().chain(self.anon.iter_mut()) {
            let mut i = 0;
            col.retain(|_| {
                i += 1;
                keep(i - 1)
            });
        }
        for q in &mut self.queries {
            // Remapping is monotone, so the tag list stays sorted.
            q.tags = q.tags.iter().map(|&t| remap[t as usize]).collect();
        }
    }

    pub(crate) fn compute_scores(&mut self) {
        let nm = self.models.len();
        let nt = self.tags.len();
        let g = self.globals();
        let base: Vec<f64> = (0..nm).map(|m| self.model_base(&g, m)).collect();
        let mut scores = vec![0.0_f64; nt * nm];
        for (t, row) in scores.chunks_exact_mut(nm.max(1)).enumerate().take(nt) {
            let ctx = self.tag_ctx(&g, t);
            for (m, s) in row.iter_mut().enumerate() {
                *s = self.score_at(ctx, base[m], m, t);
            }
        }
        self.scores = scores;
    }

    // ---- scores derived from counts ----
    // One definition, used by `compute_scores` (the whole matrix, the value path) and by live
    // deciders (the tags of one query, at decision time): the same operations on the same counts
    // in the same order, so a store that learned outcomes one at a time and one built from them
    // at once give bit-identical scores.

    /// What every score shares: O(models) from the per-model totals.
    pub(crate) fn globals(&self) -> Globals {
        let p = self.params;
        let mut g = Globals {
            // The paper's denominator runs over all tags of the store. Integers below 2^53 are
            // exact in f64, so this equals the float sum of the `count_t`s.
            total: self.total_tag_queries as f64,
            grand: 0.0,
            logit_grand: 0.0,
        };
        if p.weighting == Weighting::Difficulty {
            let (mut sum, mut n_all) = (0.0_f64, 0.0_f64);
            for &c in &self.model_totals {
                sum += p.outcome_sum(c);
                n_all += n3(c);
            }
            g.grand = if n_all > 0.0 { sum / n_all } else { 0.0 };
            g.logit_grand = self.logit_rate(g.grand);
        }
        g
    }

    /// Mean outcome scores on a [0, 1] rate scale, where ability and difficulty add on the logit
    /// (the Rasch model).
    #[inline]
    fn logit_rate(&self, x: f64) -> f64 {
        let p = self.params;
        logit(clip_rate((x - p.s_loss) / (p.s_win - p.s_loss)))
    }

    /// The per-model part of a score: the global mean ("shrunk"), the ability ("difficulty").
    #[inline]
    #[allow(clippy::many_single_char_names)] // the paper's symbols
    pub(crate) fn model_base(&self, g: &Globals, m: usize) -> f64 {
        let p = self.params;
        let c = self.model_totals[m];
        let n = n3(c);
        match p.weighting {
            Weighting::Paper | Weighting::None => 0.0,
            Weighting::Shrunk => {
                if n > 0.0 {
                    p.outcome_sum(c) / n
                } else {
                    0.0
                }
            }
            // A model with no records has no ability of its own: it is taken as average.
            Weighting::Difficulty => self.logit_rate(if n > 0.0 {
                p.outcome_sum(c) / n
            } else {
                g.grand
            }),
        }
    }

    /// The per-tag part of a score: `w_t` ("paper", "none"), the difficulty ("difficulty").
    #[inline]
    #[allow(clippy::many_single_char_names)] // the paper's symbols
    pub(crate) fn tag_ctx(&self, g: &Globals, t: usize) -> f64 {
        let p = self.params;
        match p.weighting {
            Weighting::Paper => self.tag_weight_num[t] / g.total,
            Weighting::None => 1.0,
            Weighting::Shrunk => 0.0,
            Weighting::Difficulty => {
                // Difficulty comes from every model of the store, reference models included, so
                // a candidate with no evidence on a tag still inherits how hard it is. The tag's
                // mean is itself shrunk towards the grand mean so that a rare tag is not called
                // hard on one loss.
                let k = p.prior_strength;
                let (mut a, mut n_t) = (0.0_f64, 0.0_f64);
                for col in &self.counts {
                    a += p.outcome_sum(col[t]);
                    n_t += n3(col[t]);
                }
                let g_t = if n_t + k > 0.0 {
                    (a + k * g.grand) / (n_t + k)
                } else {
                    g.grand
                };
                self.logit_rate(g_t) - g.logit_grand
            }
        }
    }

    /// `score(M, t)` from the counts, given `tag_ctx(t)` and `model_base(m)`.
    #[inline]
    #[allow(clippy::many_single_char_names)] // the paper's symbols
    pub(crate) fn score_at(&self, ctx: f64, base: f64, m: usize, t: usize) -> f64 {
        let p = self.params;
        let c = self.counts[m][t];
        match p.weighting {
            Weighting::Paper | Weighting::None => ctx * self.outcome_sums[m][t],
            Weighting::Shrunk => {
                let k = p.prior_strength;
                let denom = n3(c) + k;
                // With no evidence and no prior the mean is undefined; its limit as the prior
                // vanishes is the model's global mean.
                if denom > 0.0 {
                    (p.outcome_sum(c) + k * base) / denom
                } else {
                    base
                }
            }
            Weighting::Difficulty => {
                let k = p.prior_strength;
                let prior = p.s_loss + (p.s_win - p.s_loss) * sigmoid(base + ctx);
                let denom = n3(c) + k;
                if denom > 0.0 {
                    (p.outcome_sum(c) + k * prior) / denom
                } else {
                    prior
                }
            }
        }
    }
}

/// The store-wide quantities every score of one store state shares (see `Store::globals`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Globals {
    total: f64,
    grand: f64,
    logit_grand: f64,
}

// ==== Ingesting records ====

/// One outcome record: `(query_id, tags, model, outcome)`.
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    pub query_id: &'a str,
    pub tags: &'a [&'a str],
    pub model: &'a str,
    pub outcome: Outcome,
}

/// Streams records into a store without materialising them: `tag()` for each tag of a record,
/// then `finish_record()`. Used by the Python glue to read records straight from Python objects.
/// On error the store is left half-updated; callers ingest into a clone and drop it on error.
pub struct Ingest<'s> {
    store: &'s mut Store,
    buf: Vec<u32>,
}

impl<'s> Ingest<'s> {
    pub fn new(store: &'s mut Store) -> Self {
        Self {
            store,
            buf: Vec::with_capacity(16),
        }
    }

    /// Adds one tag to the record being read.
    #[inline]
    pub fn tag(&mut self, tag: &str) {
        let t = self.store.intern_tag(tag);
        self.buf.push(t);
    }

    /// Completes the record: the tags pushed since the last record, `query_id`, `model`, `outcome`.
    pub fn finish_record(&mut self, query_id: &str, model: &str, outcome: Outcome) -> Result<()> {
        self.buf.sort_unstable();
        self.buf.dedup();
        let m = self.store.intern_model(model);
        let q = self.store.find_or_add_query(query_id, &self.buf)?;
        let mut one = [0_u32; 3];
        one[outcome as usize] = 1;
        add_judged(&mut self.store.queries[q as usize].judged, m, one);
        let col = &mut self.store.counts[m as usize];
        for &t in &self.buf {
            col[t as usize][outcome as usize] += 1;
        }
        self.store.model_totals[m as usize][outcome as usize] += 1;
        self.buf.clear();
        Ok(())
    }

    /// Discards the tags pushed for a record that will not be finished.
    pub fn abandon_record(&mut self) {
        self.buf.clear();
    }

    /// Recomputes the derived tables; the store is ready to use.
    pub fn finish(self) {
        self.store.recompute();
    }
}

fn add_judged(judged: &mut Vec<(u32, [u32; 3])>, m: u32, c: [u32; 3]) {
    if let Some((_, have)) = judged.iter_mut().find(|(j, _)| *j == m) {
        add3(have, c);
    } else {
        judged.push((m, c));
    }
}

/// Per-(model, tag) count columns and per-model totals (the counts, or the live outcomes).
type Columns<'a> = (&'a [Vec<[u32; 3]>], &'a [[u32; 3]]);

/// Adds another store's columns and totals into this one's, through its model and tag index
/// maps (`merged`).
fn add_columns(
    dst: (&mut [Vec<[u32; 3]>], &mut [[u32; 3]]),
    src: Columns<'_>,
    model_map: &[u32],
    tag_map: &[u32],
) {
    let (cols, totals) = dst;
    for (om, col) in src.0.iter().enumerate() {
        let target = &mut cols[model_map[om] as usize];
        for (ot, c) in col.iter().enumerate() {
            add3(&mut target[tag_map[ot] as usize], *c);
        }
        add3(&mut totals[model_map[om] as usize], src.1[om]);
    }
}

#[inline]
fn add3(a: &mut [u32; 3], b: [u32; 3]) {
    for (x, y) in a.iter_mut().zip(b) {
        *x += y;
    }
}

pub(crate) fn index_of<S: AsRef<str>>(names: &[S]) -> FxMap<Box<str>, u32> {
    names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.as_ref().into(), to_u32(i)))
        .collect()
}

/// Tables index with u32 to halve their memory; more than 4 billion tags or queries is out of
/// scope, so overflowing is a bug, not an input error.
#[inline]
pub(crate) fn to_u32(i: usize) -> u32 {
    u32::try_from(i).expect("table larger than u32::MAX entries")
}

#[cfg(test)]
// Exact float equality is what these tests check: same data, same operations, same bits.
#[allow(clippy::float_cmp)]
mod tests {
    use super::*;

    fn rec<'a>(q: &'a str, tags: &'a [&'a str], m: &'a str, o: Outcome) -> Record<'a> {
        Record {
            query_id: q,
            tags,
            model: m,
            outcome: o,
        }
    }

    #[test]
    fn paper_formula_by_hand() {
        let recs = [
            rec("q1", &["a", "b"], "big", Outcome::Tie),
            rec("q1", &["a", "b"], "small", Outcome::Win),
            rec("q2", &["a"], "small", Outcome::Loss),
        ];
        let s = Store::from_records(Params::default(), recs).unwrap();
        // count_a = 2 queries, count_b = 1; denominator = 3.
        assert_eq!(s.tag_count("a").unwrap(), 2);
        assert_eq!(s.tag_count("b").unwrap(), 1);
        let w_a = (1.0 - (-2.0_f64).exp()) / 3.0;
        let w_b = (1.0 - (-1.0_f64).exp()) / 3.0;
        assert!((s.score("small", "a").unwrap() - w_a * (1.0 - 1.0)).abs() < 1e-15);
        assert!((s.score("big", "a").unwrap() - w_a * 0.15).abs() < 1e-15);
        assert!((s.score("small", "b").unwrap() - w_b).abs() < 1e-15);
        assert_eq!(s.counts("small", "a").unwrap(), [1, 0, 1]);
    }

    #[test]
    fn duplicate_tags_in_a_record_count_once() {
        let s = Store::from_records(
            Params::default(),
            [rec("q", &["a", "a"], "m", Outcome::Win)],
        )
        .unwrap();
        assert_eq!(s.counts("m", "a").unwrap(), [1, 0, 0]);
        assert_eq!(s.tag_count("a").unwrap(), 1);
    }

    #[test]
    fn conflicting_tag_sets_are_an_error() {
        let err = Store::from_records(
            Params::default(),
            [
                rec("q", &["a"], "m", Outcome::Win),
                rec("q", &["b"], "n", Outcome::Win),
            ],
        )
        .unwrap_err();
        assert!(matches!(err, RouterError::Inconsistent(_)), "{err}");
    }

    #[test]
    fn remove_model_drops_orphan_queries_and_tags() {
        let recs = [
            rec("q1", &["a"], "x", Outcome::Win),
            rec("q1", &["a"], "y", Outcome::Loss),
            rec("q2", &["b"], "y", Outcome::Win),
        ];
        let s = Store::from_records(Params::default(), recs).unwrap();
        let r = s.without_model("y").unwrap();
        let direct = Store::from_records(Params::default(), [recs[0]]).unwrap();
        assert_eq!(r.models(), direct.models());
        assert_eq!(r.n_tags(), 1);
        assert_eq!(r.score("x", "a").unwrap(), direct.score("x", "a").unwrap());
        assert!(matches!(r.score("x", "b"), Err(RouterError::UnknownTag(_))));
    }

    #[test]
    fn shrunk_weighting() {
        let p = Params {
            weighting: Weighting::Shrunk,
            prior_strength: 2.0,
            ..Params::default()
        };
        let recs = [
            rec("q1", &["a"], "m", Outcome::Win),
            rec("q2", &["b"], "m", Outcome::Loss),
            rec("q3", &["b"], "m", Outcome::Loss),
            rec("q3", &["b"], "n", Outcome::Tie),
        ];
        let s = Store::from_records(p, recs).unwrap();
        let mu_m = (1.0 - 2.0) / 3.0;
        assert!((s.score("m", "a").unwrap() - (1.0 + 2.0 * mu_m) / 3.0).abs() < 1e-15);
        // n has no evidence on "a": the prior alone, i.e. its global mean.
        assert!((s.score("n", "a").unwrap() - 0.15).abs() < 1e-15);
    }

    #[test]
    fn difficulty_weighting_by_hand() {
        let p = Params {
            s_tie: 0.0,
            weighting: Weighting::Difficulty,
            prior_strength: 1.0,
            ..Params::default()
        };
        // "hard" is lost by both models judged on it, "easy" mostly won; every model's own
        // mean is 0, so the grand mean is 0 (rate 1/2, logit 0) and abilities are 0.
        let recs = [
            rec("q1", &["hard"], "r", Outcome::Loss),
            rec("q1", &["hard"], "m", Outcome::Loss),
            rec("q2", &["easy"], "r", Outcome::Win),
            rec("q2", &["easy"], "m", Outcome::Win),
            rec("q3", &["easy"], "n", Outcome::Win),
            rec("q4", &["easy"], "n", Outcome::Loss),
        ];
        let s = Store::from_records(p, recs).unwrap();
        // hard: g = (-2 + 1*0) / (2 + 1) = -2/3, rate 1/6, delta = logit(1/6) = ln(1/5), so the
        // prior is -1 + 2 * sigmoid(ln(1/5)) = -1 + 2/6 = -2/3.
        // easy: g = (2 + 0) / (4 + 1) = 2/5, rate 7/10, prior = -1 + 2 * 7/10 = 2/5.
        let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
        // n has no evidence on "hard": the prior alone.
        assert!(close(s.score("n", "hard").unwrap(), -2.0 / 3.0));
        assert!(close(s.score("n", "easy").unwrap(), (0.0 + 0.4) / 3.0));
        assert!(close(
            s.score("m", "hard").unwrap(),
            (-1.0 - 2.0 / 3.0) / 2.0
        ));
        assert!(close(s.score("m", "easy").unwrap(), (1.0 + 0.4) / 2.0));
        // Shrunk cannot tell the two tags apart for n: both are its global mean, 0.
        let shrunk = s
            .reweighted(Params {
                weighting: Weighting::Shrunk,
                ..p
            })
            .unwrap();
        assert_eq!(shrunk.score("n", "hard").unwrap(), 0.0);
        assert_eq!(shrunk.score("n", "easy").unwrap(), 0.0);
    }

    #[test]
    fn difficulty_needs_s_win_above_s_loss() {
        for (s_win, s_loss) in [(1.0, 1.0), (-1.0, 1.0)] {
            let p = Params {
                s_win,
                s_loss,
                weighting: Weighting::Difficulty,
                ..Params::default()
            };
            let err = Store::new(p).unwrap_err();
            assert!(matches!(err, RouterError::InvalidArgument(_)), "{err}");
            assert!(Store::new(Params {
                weighting: Weighting::Shrunk,
                ..p
            })
            .is_ok());
        }
    }

    #[test]
    fn weighting_codes_and_names_round_trip() {
        for w in [
            Weighting::Paper,
            Weighting::None,
            Weighting::Shrunk,
            Weighting::Difficulty,
        ] {
            assert_eq!(Weighting::from_code(w.code()), Some(w));
            assert_eq!(Weighting::parse(w.as_str()), Some(w));
        }
        // Codes of files written before "difficulty" keep their meaning.
        assert_eq!(Weighting::from_code(2), Some(Weighting::Shrunk));
        assert_eq!(Weighting::from_code(4), None);
    }
}
