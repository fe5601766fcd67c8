//! The TagDecider (paper 3.4): aggregated tag scores, argmax, and the cost-aware threshold.
//!
//! Rule, for a query with at least one known tag, `S(M) = sum_t score(M, t)` over its distinct
//! known tags (the paper), or with `Aggregation::Mean` that sum divided by their number:
//! - `M* = argmax S`, ties going to the cheaper model, then to the smaller name;
//! - `M_SLM` = the same argmax over every candidate except `M_LLM`;
//! - `Delta_q = S(M_SLM) - S(M_LLM)`; the query goes to `M_SLM` when `Delta_q >= theta`, else to
//!   `M_LLM`.
//!
//! With `theta = 0` this is the argmax (up to an exact tie between `M_SLM` and `M_LLM`, which goes
//! to `M_SLM` as the paper's `>=` says); lower `theta` moves queries to the small models, higher
//! `theta` (paper G.1) moves them to `M_LLM`. A query with no known tag goes to the fallback model.
//!
//! The mean leaves `M*` and `M_SLM` as they are (up to ties made by rounding) but rescales
//! `Delta_q`: a query with many tags no longer has a larger margin merely for having more tags,
//! so one theta means the same for short and long tag lists.

mod among;

use std::sync::Arc;

use crate::error::{pyrepr, Result, RouterError};
use crate::live::LiveStore;
use crate::table::{FxMap, FxSet, Globals, Store, Weighting};

pub(crate) use among::Restriction;

/// How a query's per-tag scores combine into `S(M)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Aggregation {
    /// `S(M) = sum_t score(M, t)`, the paper's rule.
    #[default]
    Sum,
    /// `S(M) = mean_t score(M, t)`: the sum divided by the number of distinct known tags.
    Mean,
}

impl Aggregation {
    /// Parses `"sum"` or `"mean"`.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "sum" => Ok(Self::Sum),
            "mean" => Ok(Self::Mean),
            _ => Err(RouterError::invalid(format!(
                "unknown aggregation {}; expected 'sum' or 'mean'",
                pyrepr(name)
            ))),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sum => "sum",
            Self::Mean => "mean",
        }
    }
}

/// Why a decision went the way it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The argmax of the aggregated scores.
    Argmax,
    /// The threshold moved the query away from the argmax (to `M_SLM` or to `M_LLM`).
    CostThreshold,
    /// No known tag: the fallback model.
    Fallback,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Argmax => "argmax",
            Self::CostThreshold => "cost_threshold",
            Self::Fallback => "fallback",
        }
    }
}

/// A routing decision. Model indices are candidate positions in `Decider::models()` order.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Route {
    pub model: usize,
    pub reason: Reason,
    /// `S(M_SLM) - S(M_LLM)`; NaN when there is no known tag or no small model.
    pub delta: f64,
    /// `M*`, the argmax (the fallback model when there is no known tag).
    pub argmax: usize,
    /// `M_SLM`; `None` when there is no known tag or no small model.
    pub slm: Option<usize>,
}

/// A decision with everything needed to explain it.
#[derive(Debug, Clone)]
pub struct Explained {
    pub route: Route,
    /// `S(M)` per candidate, in `models()` order.
    pub sums: Vec<f64>,
    /// Distinct known tags, in the order first seen in the query.
    pub known: Vec<u32>,
    /// Positions in the input of the tags the store does not know.
    pub unknown: Vec<usize>,
}

/// Routes of a batch as columns (see `Decider::route_columns_flat`); indices in `models()`
/// order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RouteColumns {
    /// The routed model.
    pub model: Vec<i64>,
    /// `Delta_q = S(M_SLM) - S(M_LLM)`; NaN when no tag is known or there is no small model.
    pub delta: Vec<f64>,
    /// `M_SLM`; -1 when no tag is known or there is no small model.
    pub slm: Vec<i64>,
    /// `M*`, the argmax (the fallback model when no tag is known).
    pub argmax: Vec<i64>,
    /// Distinct known tags of the query.
    pub n_known: Vec<i64>,
}

impl RouteColumns {
    fn with_capacity(n: usize) -> Self {
        Self {
            model: Vec::with_capacity(n),
            delta: Vec::with_capacity(n),
            slm: Vec::with_capacity(n),
            argmax: Vec::with_capacity(n),
            n_known: Vec::with_capacity(n),
        }
    }

    fn push(&mut self, r: Route, distinct: usize) {
        let i = |v: usize| i64::try_from(v).unwrap_or(i64::MAX);
        self.model.push(i(r.model));
        self.delta.push(r.delta);
        self.slm.push(r.slm.map_or(-1, i));
        self.argmax.push(i(r.argmax));
        self.n_known.push(i(distinct));
    }

    /// Number of queries.
    pub fn len(&self) -> usize {
        self.model.len()
    }

    pub fn is_empty(&self) -> bool {
        self.model.is_empty()
    }
}

/// Above this many candidates the per-query sums go to the heap instead of the stack.
const STACK_MODELS: usize = 32;
/// Queries with more tags than this are deduplicated with a hash set instead of a linear scan.
const LINEAR_DEDUP_MAX: usize = 32;

/// Where a decider's per-tag scores come from.
#[derive(Debug, Clone)]
enum Source {
    /// A snapshot: `rows[tag * n + j]` is the score of preference-order candidate j on the tag.
    Static { store: Arc<Store>, rows: Vec<f64> },
    /// A store learning in place: scores derived from its counts per tag at decision time, so
    /// an outcome costs O(its tags) instead of a new snapshot. `models[j]` is preference-order
    /// candidate j's index in the store.
    Live {
        live: Arc<LiveStore>,
        models: Vec<u32>,
    },
}

/// One consistent state of the scores, for one query (`Decider::with_view`).
enum View<'a> {
    Static {
        store: &'a Store,
        rows: &'a [f64],
        n: usize,
    },
    Live {
        store: &'a Store,
        g: Globals,
        models: &'a [u32],
    },
}

impl View<'_> {
    #[inline]
    fn tag_id(&self, tag: &str) -> Option<u32> {
        match self {
            View::Static { store, .. } | View::Live { store, .. } => store.tag_id(tag),
        }
    }

    /// `sums[j] += score(candidate j, t)`, preference order.
    #[inline]
    fn add_row(&self, sums: &mut [f64], t: u32) {
        match self {
            View::Static { rows, n, .. } => {
                let t = t as usize;
                add_row(sums, &rows[t * n..(t + 1) * n]);
            }
            View::Live { store, g, models } => {
                let t = t as usize;
                let ctx = store.tag_ctx(g, t);
                let p = store.params();
                if matches!(p.weighting, Weighting::Paper | Weighting::None) {
                    // `score_at` for these weightings, with its match hoisted out of the loop
                    // (same operations, same bits): the live hot path.
                    for (s, &m) in sums.iter_mut().zip(models.iter()) {
                        *s += ctx * store.outcome_sums[m as usize][t];
                    }
                } else {
                    for (s, &m) in sums.iter_mut().zip(models.iter()) {
                        let m = m as usize;
                        *s += store.score_at(ctx, store.model_base(g, m), m, t);
                    }
                }
            }
        }
    }

    /// Candidates' scores on tag `t`, preference order.
    fn row_into(&self, t: u32, out: &mut [f64]) {
        out.fill(0.0);
        self.add_row(out, t);
    }
}

/// Lookups and decisions on one state of a decider's scores (`Decider::reader`).
pub struct Reader<'a> {
    d: &'a Decider,
    v: &'a View<'a>,
}

impl Reader<'_> {
    #[inline]
    pub fn tag_id(&self, tag: &str) -> Option<u32> {
        self.v.tag_id(tag)
    }

    /// `Decider::route_pref` on this state.
    #[inline]
    pub fn route_pref(&self, ids: &[u32]) -> usize {
        let d = self.d;
        d.with_sums(self.v, ids, |sums, any| d.decide_sums(sums, any).0)
    }

    /// `route_pref` among a restriction's candidates.
    #[cfg_attr(not(feature = "python"), allow(dead_code))] // the glue's hot path
    #[inline]
    pub(crate) fn route_pref_among(&self, ids: &[u32], r: &Restriction) -> usize {
        self.d
            .with_sums(self.v, ids, |sums, any| r.decide(sums, any).0)
    }
}

/// The cost-aware decider over a snapshot of a store, or over a live store.
#[derive(Debug, Clone)]
pub struct Decider {
    source: Source,
    /// Candidates in preference order: cheaper first, then by name. Scanning in this order and
    /// keeping the first strict maximum is the deterministic tie-break, for free.
    pref_names: Vec<String>,
    pref_costs: Vec<f64>,
    /// Preference position -> position in `models()` (store order).
    pref_to_out: Vec<usize>,
    /// Store-order candidate names (the public order).
    out_names: Vec<String>,
    /// Candidate name -> position in `out_names`, for candidate masks built from names.
    positions: FxMap<Box<str>, usize>,
    n: usize,
    llm: usize,
    fallback: usize,
    theta: f64,
    aggregation: Aggregation,
}

impl Decider {
    /// Builds a decider over `store`.
    ///
    /// `costs` names the candidate models (a subset of the store's) and their per-query cost.
    /// `llm` defaults to the most expensive candidate (ties: the smaller name); `fallback`, used
    /// for queries with no known tag, defaults to `llm`. Scores are summed (the paper); see
    /// `with_aggregation` for the mean.
    pub fn new(
        store: Arc<Store>,
        costs: &[(String, f64)],
        llm: Option<&str>,
        theta: f64,
        fallback: Option<&str>,
    ) -> Result<Self> {
        let (mut d, models) = Self::build(&store, costs, llm, theta, fallback)?;
        let nm = store.n_models();
        let n = d.n;
        let mut rows = vec![0.0; store.n_tags() * n];
        for (t, row) in rows.chunks_exact_mut(n).enumerate() {
            let src = &store.scores[t * nm..(t + 1) * nm];
            for (j, r) in row.iter_mut().enumerate() {
                *r = src[models[j] as usize];
            }
        }
        d.source = Source::Static { store, rows };
        Ok(d)
    }

    /// Whether this decider routes on a live store.
    pub fn is_live(&self) -> bool {
        matches!(self.source, Source::Live { .. })
    }

    /// The live store this decider routes on, if any.
    pub fn live(&self) -> Option<&Arc<LiveStore>> {
        match &self.source {
            Source::Live { live, .. } => Some(live),
            Source::Static { .. } => None,
        }
    }

    /// The same decider over a live store started from this decider's store (or sharing its
    /// live store when it already has one).
    #[must_use]
    pub fn to_live(&self) -> Self {
        match &self.source {
            Source::Live { .. } => self.clone(),
            Source::Static { store, .. } => {
                let models = self
                    .pref_names
                    .iter()
                    .map(|name| store.model_id(name).unwrap_or(0))
                    .collect();
                Self {
                    source: Source::Live {
                        live: Arc::new(LiveStore::new((**store).clone())),
                        models,
                    },
                    ..self.clone()
                }
            }
        }
    }

    /// Everything but the score source (`new` and `to_live` set it); and the candidates' store
    /// indices, preference order.
    fn build(
        store: &Store,
        costs: &[(String, f64)],
        llm: Option<&str>,
        theta: f64,
        fallback: Option<&str>,
    ) -> Result<(Self, Vec<u32>)> {
        if costs.is_empty() {
            return Err(RouterError::invalid(
                "empty model set: costs must name at least one model",
            ));
        }
        if !theta.is_finite() {
            return Err(RouterError::invalid(format!(
                "theta must be finite, got {theta}"
            )));
        }
        let mut cands: Vec<(u32, &str, f64)> = Vec::with_capacity(costs.len());
        for (name, cost) in costs {
            if !(cost.is_finite() && *cost >= 0.0) {
                return Err(RouterError::invalid(format!(
                    "cost of {} must be finite and >= 0, got {cost}",
                    pyrepr(name)
                )));
            }
            let m = store.require_model(name)?;
            if cands.iter().any(|c| c.0 == m) {
                return Err(RouterError::invalid(format!(
                    "model {} appears twice in costs",
                    pyrepr(name)
                )));
            }
            cands.push((m, name, *cost));
        }
        // Public order: the store's model order.
        cands.sort_by_key(|c| c.0);
        let out_names: Vec<String> = cands.iter().map(|c| c.1.to_owned()).collect();
        let mut pref: Vec<usize> = (0..cands.len()).collect();
        pref.sort_by(|&a, &b| {
            cands[a]
                .2
                .total_cmp(&cands[b].2)
                .then_with(|| cands[a].1.cmp(cands[b].1))
        });
        let n = cands.len();
        let find = |name: &str| -> Result<usize> {
            pref.iter()
                .position(|&o| cands[o].1 == name)
                .ok_or_else(|| RouterError::unknown_model(name, &out_names))
        };
        let llm = if let Some(name) = llm {
            find(name)?
        } else {
            // Most expensive; among equal costs the smaller name, i.e. the first in `pref`.
            let top = cands[pref[n - 1]].2;
            pref.iter()
                .position(|&o| cands[o].2.total_cmp(&top).is_eq())
                .unwrap_or(n - 1)
        };
        let fallback = match fallback {
            Some(name) => find(name)?,
            None => llm,
        };
        let models = pref.iter().map(|&o| cands[o].0).collect();
        let d = Self {
            source: Source::Static {
                store: Arc::new(Store::default()),
                rows: Vec::new(),
            },
            pref_names: pref.iter().map(|&o| cands[o].1.to_owned()).collect(),
            pref_costs: pref.iter().map(|&o| cands[o].2).collect(),
            pref_to_out: pref.clone(),
            positions: out_names
                .iter()
                .enumerate()
                .map(|(i, m)| (Box::from(m.as_str()), i))
                .collect(),
            out_names,
            n,
            llm,
            fallback,
            theta,
            aggregation: Aggregation::Sum,
        };
        Ok((d, models))
    }

    /// This decider with another aggregation, e.g.
    /// `Decider::new(store, &costs, None, 0.0, None)?.with_aggregation(Aggregation::Mean)`.
    #[must_use]
    pub fn with_aggregation(self, aggregation: Aggregation) -> Self {
        Self {
            aggregation,
            ..self
        }
    }

    /// The same decider with another threshold (and the same aggregation).
    pub fn with_theta(&self, theta: f64) -> Result<Self> {
        if !theta.is_finite() {
            return Err(RouterError::invalid(format!(
                "theta must be finite, got {theta}"
            )));
        }
        Ok(Self {
            theta,
            ..self.clone()
        })
    }

    /// The store: the snapshot itself, or a value copy of a live store's current state
    /// (O(store)).
    pub fn store(&self) -> Arc<Store> {
        match &self.source {
            Source::Static { store, .. } => Arc::clone(store),
            Source::Live { live, .. } => Arc::new(live.snapshot()),
        }
    }

    /// Runs `f` on one consistent state of the scores: for a live store, readers enter per
    /// query (a writer waits for one query, never a batch).
    #[inline]
    fn with_view<R>(&self, f: impl FnOnce(&View<'_>) -> R) -> R {
        match &self.source {
            Source::Static { store, rows } => f(&View::Static {
                store,
                rows,
                n: self.n,
            }),
            Source::Live { live, models } => live.read(|store| {
                f(&View::Live {
                    store,
                    g: store.globals(),
                    models,
                })
            }),
        }
    }

    /// Candidate names in store order; decisions index into this.
    pub fn models(&self) -> &[String] {
        &self.out_names
    }

    pub fn n_models(&self) -> usize {
        self.n
    }

    pub fn cost(&self, out: usize) -> f64 {
        self.pref_costs[self.out_to_pref(out)]
    }

    pub fn llm(&self) -> usize {
        self.pref_to_out[self.llm]
    }

    pub fn fallback(&self) -> usize {
        self.pref_to_out[self.fallback]
    }

    pub fn theta(&self) -> f64 {
        self.theta
    }

    pub fn aggregation(&self) -> Aggregation {
        self.aggregation
    }

    fn out_to_pref(&self, out: usize) -> usize {
        self.pref_to_out.iter().position(|&o| o == out).unwrap_or(0)
    }

    /// Name of a candidate in preference order (what the hot path hands back).
    pub fn pref_name(&self, j: usize) -> &str {
        &self.pref_names[j]
    }

    /// Maps a preference-order index to `models()` order.
    #[inline]
    pub fn to_out(&self, j: usize) -> usize {
        self.pref_to_out[j]
    }

    /// Runs `f` with a `Reader` on one state of the scores: tag lookups and a decision under
    /// one entry to a live store (instead of one per lookup). Keep `f` short and never learn
    /// from inside it (the writer waits for this reader).
    #[inline]
    pub fn reader<R>(&self, f: impl FnOnce(&Reader<'_>) -> R) -> R {
        self.with_view(|v| f(&Reader { d: self, v }))
    }

    /// Every model of the store (candidates or not), in store order: O(models), no snapshot.
    pub fn store_models(&self) -> Vec<String> {
        self.with_view(|v| match v {
            View::Static { store, .. } | View::Live { store, .. } => store.models().to_vec(),
        })
    }

    /// A tag's id. A live store only ever adds tags, so an id stays valid for its lifetime.
    #[inline]
    pub fn tag_id(&self, tag: &str) -> Option<u32> {
        self.with_view(|v| v.tag_id(tag))
    }

    // ==== Routing ====

    /// Routes a query given its known tag ids (duplicates allowed). Returns the model in
    /// preference order; see `to_out`/`pref_name`.
    #[inline]
    pub fn route_pref(&self, ids: &[u32]) -> usize {
        self.with_view(|v| self.with_sums(v, ids, |sums, any| self.decide_sums(sums, any).0))
    }

    /// Routes a query given its tag ids; the model index is in `models()` order.
    pub fn route_ids(&self, ids: &[u32]) -> Route {
        self.with_view(|v| self.route_ids_in(v, ids))
    }

    fn route_ids_in(&self, v: &View<'_>, ids: &[u32]) -> Route {
        self.with_sums(v, ids, |sums, any| {
            self.to_out_route(self.decide_sums(sums, any))
        })
    }

    /// Routes a query given its tags (unknown tags ignored); `models()` order.
    pub fn route<S: AsRef<str>>(&self, tags: &[S]) -> Route {
        self.with_view(|v| {
            let ids = known_ids(v, tags);
            self.route_ids_in(v, &ids)
        })
    }

    /// Routes many queries, `tags[offsets[i]..offsets[i + 1]]` being query i; preference order.
    pub fn route_flat_pref<S: AsRef<str>>(&self, tags: &[S], offsets: &[usize]) -> Vec<u32> {
        self.route_flat_pref_with(tags, offsets, |_| None)
    }

    /// `route_flat_pref`, query q decided among `among(q)`'s candidates (`None`: all of them).
    pub(crate) fn route_flat_pref_with<'r, S: AsRef<str>>(
        &self,
        tags: &[S],
        offsets: &[usize],
        among: impl Fn(usize) -> Option<&'r Restriction>,
    ) -> Vec<u32> {
        let mut ids: Vec<u32> = Vec::with_capacity(LINEAR_DEDUP_MAX);
        offsets
            .windows(2)
            .enumerate()
            .map(|(q, w)| {
                let r = among(q);
                self.with_view(|v| {
                    ids.clear();
                    ids.extend(tags[w[0]..w[1]].iter().filter_map(|t| v.tag_id(t.as_ref())));
                    let j = self.with_sums(v, &ids, |sums, any| self.decide_in(sums, any, r).0);
                    crate::table::to_u32(j)
                })
            })
            .collect()
    }

    /// `S(M)` for many queries, row-major `(n_queries, n_models)` in `models()` order.
    pub fn scores_flat<S: AsRef<str>>(&self, tags: &[S], offsets: &[usize]) -> Vec<f64> {
        let mut out = vec![0.0; offsets.len().saturating_sub(1) * self.n];
        let mut ids: Vec<u32> = Vec::new();
        for (w, dst) in offsets.windows(2).zip(out.chunks_exact_mut(self.n)) {
            self.with_view(|v| {
                ids.clear();
                ids.extend(tags[w[0]..w[1]].iter().filter_map(|t| v.tag_id(t.as_ref())));
                self.with_sums(v, &ids, |sums, _| {
                    for (j, s) in sums.iter().enumerate() {
                        dst[self.pref_to_out[j]] = *s;
                    }
                });
            });
        }
        out
    }

    /// Full routes (model, reason, delta, M_SLM) for many queries; `models()` order.
    pub fn routes_flat<S: AsRef<str>>(&self, tags: &[S], offsets: &[usize]) -> Vec<Route> {
        let mut ids: Vec<u32> = Vec::new();
        offsets
            .windows(2)
            .map(|w| {
                self.with_view(|v| {
                    ids.clear();
                    ids.extend(tags[w[0]..w[1]].iter().filter_map(|t| v.tag_id(t.as_ref())));
                    self.route_ids_in(v, &ids)
                })
            })
            .collect()
    }

    /// The routes of many queries as columns, in one pass over the batch: what an evaluation
    /// sweep needs (`Delta_q`, `M_SLM`, `M*`, the number of known tags) without a `Decision`
    /// object per query. `tags[offsets[i]..offsets[i + 1]]` is query i; indices are in
    /// `models()` order.
    pub fn route_columns_flat<S: AsRef<str>>(&self, tags: &[S], offsets: &[usize]) -> RouteColumns {
        self.route_columns_flat_with(tags, offsets, |_| None)
    }

    /// `route_columns_flat`, query q decided among `among(q)`'s candidates (`None`: all).
    pub(crate) fn route_columns_flat_with<'r, S: AsRef<str>>(
        &self,
        tags: &[S],
        offsets: &[usize],
        among: impl Fn(usize) -> Option<&'r Restriction>,
    ) -> RouteColumns {
        let n = offsets.len().saturating_sub(1);
        let mut out = RouteColumns::with_capacity(n);
        let mut ids: Vec<u32> = Vec::with_capacity(LINEAR_DEDUP_MAX);
        for (q, w) in offsets.windows(2).enumerate() {
            let r = among(q);
            let (route, distinct) = self.with_view(|v| {
                ids.clear();
                ids.extend(tags[w[0]..w[1]].iter().filter_map(|t| v.tag_id(t.as_ref())));
                self.with_sums_counted(v, &ids, |sums, distinct| {
                    (
                        self.to_out_route(self.decide_in(sums, distinct > 0, r)),
                        distinct,
                    )
                })
            });
            out.push(route, distinct);
        }
        out
    }

    /// A decision with its explanation.
    pub fn explain<S: AsRef<str>>(&self, tags: &[S]) -> Explained {
        self.with_view(|v| {
            let mut known: Vec<u32> = Vec::with_capacity(tags.len());
            let mut unknown = Vec::new();
            for (i, t) in tags.iter().enumerate() {
                match v.tag_id(t.as_ref()) {
                    Some(id) => {
                        if !known.contains(&id) {
                            known.push(id);
                        }
                    }
                    None => unknown.push(i),
                }
            }
            let (route, sums) = self.explain_ids_in(v, &known, None);
            Explained {
                route,
                sums,
                known,
                unknown,
            }
        })
    }

    /// Route and `S(M)` (in `models()` order) for distinct known tag ids.
    pub fn explain_ids(&self, ids: &[u32]) -> (Route, Vec<f64>) {
        self.with_view(|v| self.explain_ids_in(v, ids, None))
    }

    /// `explain_ids` and each tag's contribution (candidates' scores on it, `models()` order)
    /// from one state of a live store, so that the contributions add up to the scores.
    pub fn explain_ids_with_rows(&self, ids: &[u32]) -> (Route, Vec<f64>, Vec<f64>) {
        self.explain_ids_with_rows_in(ids, None)
    }

    /// `explain_ids_with_rows` among a restriction's candidates (`None`: all of them).
    pub(crate) fn explain_ids_with_rows_in(
        &self,
        ids: &[u32],
        among: Option<&Restriction>,
    ) -> (Route, Vec<f64>, Vec<f64>) {
        self.with_view(|v| {
            let (route, sums) = self.explain_ids_in(v, ids, among);
            let n = self.n;
            let mut rows = vec![0.0; ids.len() * n];
            let mut pref = vec![0.0; n];
            for (&t, out) in ids.iter().zip(rows.chunks_exact_mut(n)) {
                v.row_into(t, &mut pref);
                for (j, s) in pref.iter().enumerate() {
                    out[self.pref_to_out[j]] = *s;
                }
            }
            (route, sums, rows)
        })
    }

    fn explain_ids_in(
        &self,
        v: &View<'_>,
        ids: &[u32],
        among: Option<&Restriction>,
    ) -> (Route, Vec<f64>) {
        let mut sums_pref = vec![0.0; self.n];
        for &t in ids {
            v.add_row(&mut sums_pref, t);
        }
        self.aggregate(&mut sums_pref, ids.len());
        let route = self.to_out_route(self.decide_in(&sums_pref, !ids.is_empty(), among));
        let mut sums = vec![0.0; self.n];
        for (j, s) in sums_pref.iter().enumerate() {
            sums[self.pref_to_out[j]] = *s;
        }
        (route, sums)
    }

    /// Aggregates the rows of the distinct ids into a (stack) buffer and hands `S` to `f`, with
    /// whether any tag was known.
    #[inline]
    fn with_sums<R>(&self, v: &View<'_>, ids: &[u32], f: impl FnOnce(&[f64], bool) -> R) -> R {
        self.with_sums_counted(v, ids, |sums, distinct| f(sums, distinct > 0))
    }

    /// `with_sums`, handing `f` the number of distinct known tags instead of whether there was
    /// one.
    #[inline]
    fn with_sums_counted<R>(
        &self,
        v: &View<'_>,
        ids: &[u32],
        f: impl FnOnce(&[f64], usize) -> R,
    ) -> R {
        let mut stack = [0.0_f64; STACK_MODELS];
        let mut heap;
        let sums: &mut [f64] = if self.n <= STACK_MODELS {
            &mut stack[..self.n]
        } else {
            heap = vec![0.0; self.n];
            &mut heap
        };
        let mut distinct = 0_usize;
        if ids.len() <= LINEAR_DEDUP_MAX {
            for (i, &t) in ids.iter().enumerate() {
                // Set semantics: a tag given twice counts once. Quadratic, but over a handful.
                if !ids[..i].contains(&t) {
                    v.add_row(sums, t);
                    distinct += 1;
                }
            }
        } else {
            let mut seen: FxSet<u32> = FxSet::default();
            for &t in ids {
                if seen.insert(t) {
                    v.add_row(sums, t);
                    distinct += 1;
                }
            }
        }
        self.aggregate(sums, distinct);
        f(sums, distinct)
    }

    /// Turns the sums over `distinct` tags into `S`. Every `S(M)` is divided, rather than only
    /// the two that make `Delta_q`, so that the reported scores, the argmax and `Delta_q` all
    /// come from the same numbers (rounding can make two different sums equal means).
    #[inline]
    fn aggregate(&self, sums: &mut [f64], distinct: usize) {
        // Sum: nothing to do. Mean over one tag: dividing by 1 is exact, so skip it too.
        if self.aggregation == Aggregation::Mean && distinct > 1 {
            // Distinct tags of one query: far below 2^53, so the conversion is exact.
            #[allow(clippy::cast_precision_loss)]
            let k = distinct as f64;
            for s in sums {
                *s /= k;
            }
        }
    }

    /// The decision rule over aggregated scores in preference order, among every candidate.
    #[inline]
    fn decide_sums(&self, sums: &[f64], any_known: bool) -> Decided {
        let roles = Roles {
            llm: self.llm,
            fallback: self.fallback,
            single: self.n == 1,
            theta: self.theta,
        };
        // Every candidate eligible: the closure is a constant and the checks compile away.
        decide_rule(sums, any_known, roles, |_| true)
    }

    /// `decide_sums` among a restriction's candidates, or among all of them.
    #[inline]
    fn decide_in(&self, sums: &[f64], any_known: bool, among: Option<&Restriction>) -> Decided {
        match among {
            None => self.decide_sums(sums, any_known),
            Some(r) => r.decide(sums, any_known),
        }
    }

    fn to_out_route(&self, d: Decided) -> Route {
        Route {
            model: self.pref_to_out[d.0],
            reason: d.1,
            delta: d.2,
            argmax: self.pref_to_out[d.3],
            slm: d.4.map(|j| self.pref_to_out[j]),
        }
    }
}

fn known_ids<S: AsRef<str>>(v: &View<'_>, tags: &[S]) -> Vec<u32> {
    tags.iter().filter_map(|t| v.tag_id(t.as_ref())).collect()
}

#[inline]
fn add_row(sums: &mut [f64], row: &[f64]) {
    for (s, r) in sums.iter_mut().zip(row) {
        *s += *r;
    }
}

/// What the rule decided, preference order: (model, reason, Delta_q, M*, M_SLM).
type Decided = (usize, Reason, f64, usize, Option<usize>);

/// The rule's parameters for one decision, preference order: the decider's own, or those of a
/// restriction to a candidate subset.
#[derive(Debug, Clone, Copy)]
struct Roles {
    llm: usize,
    fallback: usize,
    /// One eligible candidate: it takes every query with a known tag.
    single: bool,
    theta: f64,
}

/// The decision rule (module docs) over aggregated scores in preference order, among the
/// candidates `eligible` accepts: one rule for the whole set and for subsets, so that a subset
/// holding every candidate decides exactly as the whole set does.
#[inline]
fn decide_rule(
    sums: &[f64],
    any_known: bool,
    roles: Roles,
    eligible: impl Fn(usize) -> bool + Copy,
) -> Decided {
    if !any_known {
        return (
            roles.fallback,
            Reason::Fallback,
            f64::NAN,
            roles.fallback,
            None,
        );
    }
    let best = argmax(sums, usize::MAX, eligible);
    if roles.single {
        return (best, Reason::Argmax, f64::NAN, best, None);
    }
    let slm = argmax(sums, roles.llm, eligible);
    let delta = sums[slm] - sums[roles.llm];
    let model = if delta >= roles.theta { slm } else { roles.llm };
    let reason = if model == best {
        Reason::Argmax
    } else {
        Reason::CostThreshold
    };
    (model, reason, delta, best, Some(slm))
}

/// First strict maximum among the eligible indices, skipping index `skip`.
#[inline]
fn argmax(v: &[f64], skip: usize, eligible: impl Fn(usize) -> bool) -> usize {
    let mut best = usize::MAX;
    let mut best_v = f64::NEG_INFINITY;
    for (j, &x) in v.iter().enumerate() {
        if j != skip && eligible(j) && (best == usize::MAX || x > best_v) {
            best = j;
            best_v = x;
        }
    }
    best
}

#[cfg(test)]
// Exact float equality is what these tests check: same data, same operations, same bits.
#[allow(clippy::float_cmp)]
mod tests {
    use super::*;
    use crate::table::{Outcome, Params, Record};

    fn store() -> Arc<Store> {
        let r = |q, tags, m, o| Record {
            query_id: q,
            tags,
            model: m,
            outcome: o,
        };
        Arc::new(
            Store::from_records(
                Params::default(),
                [
                    r("q1", &["poem"][..], "big", Outcome::Win),
                    r("q1", &["poem"][..], "small", Outcome::Loss),
                    r("q2", &["math"][..], "big", Outcome::Loss),
                    r("q2", &["math"][..], "small", Outcome::Win),
                ],
            )
            .unwrap(),
        )
    }

    fn costs() -> Vec<(String, f64)> {
        vec![("big".into(), 10.0), ("small".into(), 1.0)]
    }

    #[test]
    fn argmax_threshold_and_fallback() {
        let d = Decider::new(store(), &costs(), None, 0.0, None).unwrap();
        assert_eq!(d.models(), ["big", "small"]);
        assert_eq!(d.llm(), 0);
        let r = d.route(&["poem"]);
        assert_eq!((r.model, r.reason), (0, Reason::Argmax));
        assert!(r.delta < 0.0);
        assert_eq!(d.route(&["math", "nope"]).model, 1);
        let f = d.route(&["nope"]);
        assert_eq!((f.model, f.reason), (0, Reason::Fallback));
        assert!(f.delta.is_nan());
        // A low enough theta sends the poem query to the small model.
        let cheap = d.with_theta(-1.0).unwrap();
        let r = cheap.route(&["poem"]);
        assert_eq!((r.model, r.reason), (1, Reason::CostThreshold));
        // A high theta keeps the math query on the LLM.
        let r = d.with_theta(1.0).unwrap().route(&["math"]);
        assert_eq!((r.model, r.reason), (0, Reason::CostThreshold));
    }

    #[test]
    fn ties_go_to_the_cheaper_model() {
        let d = Decider::new(store(), &costs(), None, 0.0, None).unwrap();
        // poem + math: big and small tie exactly.
        let e = d.explain(&["poem", "math", "poem"]);
        assert_eq!(e.sums[0], e.sums[1]);
        assert_eq!(e.route.model, 1);
        assert_eq!(e.known.len(), 2);
    }

    #[test]
    fn bad_arguments() {
        assert!(Decider::new(store(), &[], None, 0.0, None).is_err());
        assert!(Decider::new(store(), &costs(), None, f64::NAN, None).is_err());
        let nan = vec![("big".into(), f64::NAN)];
        assert!(Decider::new(store(), &nan, None, 0.0, None).is_err());
        let unknown = vec![("huge".into(), 1.0)];
        assert!(matches!(
            Decider::new(store(), &unknown, None, 0.0, None),
            Err(RouterError::UnknownModel { .. })
        ));
    }

    /// Two tags that both favour `small` by 2 and one that favours `big` by 2 (weighting
    /// "none": a score is the outcome sum).
    fn margin_store() -> Arc<Store> {
        let p = Params {
            weighting: crate::table::Weighting::None,
            ..Params::default()
        };
        let mut recs = Vec::new();
        for (q, tag, big, small) in [
            ("q1", "math", Outcome::Loss, Outcome::Win),
            ("q2", "code", Outcome::Loss, Outcome::Win),
            ("q3", "poem", Outcome::Win, Outcome::Loss),
        ] {
            recs.push((q, [tag], "big", big));
            recs.push((q, [tag], "small", small));
        }
        Arc::new(
            Store::from_records(
                p,
                recs.iter().map(|(q, t, m, o)| Record {
                    query_id: q,
                    tags: &t[..],
                    model: m,
                    outcome: *o,
                }),
            )
            .unwrap(),
        )
    }

    #[test]
    fn aggregation_names() {
        for a in [Aggregation::Sum, Aggregation::Mean] {
            assert_eq!(Aggregation::parse(a.as_str()).unwrap(), a);
        }
        assert_eq!(Aggregation::default(), Aggregation::Sum);
        let e = Aggregation::parse("Mean").unwrap_err();
        assert!(matches!(e, RouterError::InvalidArgument(_)));
        assert_eq!(
            e.to_string(),
            "unknown aggregation 'Mean'; expected 'sum' or 'mean'"
        );
    }

    #[test]
    fn mean_divides_every_score_by_the_distinct_known_tags() {
        let sum = Decider::new(margin_store(), &costs(), None, 0.0, None).unwrap();
        let mean = sum.clone().with_aggregation(Aggregation::Mean);
        assert_eq!(sum.aggregation(), Aggregation::Sum);
        assert_eq!(mean.aggregation(), Aggregation::Mean);
        // Duplicates and unknown tags do not count towards the divisor.
        let q = ["math", "code", "math", "nope", "poem"];
        let (es, em) = (sum.explain(&q), mean.explain(&q));
        assert_eq!(em.known.len(), 3);
        for (s, m) in es.sums.iter().zip(&em.sums) {
            assert_eq!(*m, *s / 3.0);
        }
        assert_eq!(em.route.delta, em.sums[1] - em.sums[0]);
        assert_eq!((es.route.delta, em.route.delta), (2.0, 2.0 / 3.0));
        // The hot path, the batch paths and the explanation agree.
        let offsets = [0, q.len()];
        assert_eq!(mean.scores_flat(&q, &offsets), em.sums);
        assert_eq!(mean.routes_flat(&q, &offsets), [em.route]);
        assert_eq!(mean.route(&q), em.route);
        assert_eq!(mean.to_out(mean.route_pref(&[2, 0, 1, 0])), em.route.model);
        // One known tag: mean == sum.
        assert_eq!(mean.explain(&["math"]).sums, sum.explain(&["math"]).sums);
        // No known tag: still the fallback, no division by zero.
        let f = mean.route(&["nope"]);
        assert_eq!(f.reason, Reason::Fallback);
        assert!(f.delta.is_nan());
    }

    #[test]
    fn route_columns_agree_with_routes() {
        for agg in [Aggregation::Sum, Aggregation::Mean] {
            let d = Decider::new(margin_store(), &costs(), None, 0.5, None)
                .unwrap()
                .with_aggregation(agg);
            let tags = [
                "math", "code", "math", "nope", "poem", "nope", "code", "poem",
            ];
            let offsets = [0, 3, 4, 5, 5, 8];
            let cols = d.route_columns_flat(&tags, &offsets);
            let routes = d.routes_flat(&tags, &offsets);
            assert_eq!(cols.len(), routes.len());
            assert_eq!(cols.n_known, [2, 0, 1, 0, 2]);
            for (q, r) in routes.iter().enumerate() {
                assert_eq!(cols.model[q], i64::try_from(r.model).unwrap());
                assert_eq!(cols.argmax[q], i64::try_from(r.argmax).unwrap());
                assert_eq!(cols.slm[q], r.slm.map_or(-1, |s| i64::try_from(s).unwrap()));
                assert!(cols.delta[q] == r.delta || (cols.delta[q].is_nan() && r.delta.is_nan()));
            }
        }
        let d = Decider::new(margin_store(), &costs(), None, 0.0, None).unwrap();
        assert!(d.route_columns_flat::<&str>(&[], &[0]).is_empty());
    }

    #[test]
    fn mean_changes_what_theta_means() {
        // math + code: Delta is 4 summed, 2 averaged; theta = 3 lies between.
        let sum = Decider::new(margin_store(), &costs(), None, 3.0, None).unwrap();
        let mean = sum.clone().with_aggregation(Aggregation::Mean);
        let q = ["math", "code"];
        assert_eq!(sum.route(&q).model, 1);
        let r = mean.route(&q);
        assert_eq!((r.model, r.reason), (0, Reason::CostThreshold));
        // with_theta keeps the aggregation.
        let lower = mean.with_theta(2.0).unwrap();
        assert_eq!(lower.aggregation(), Aggregation::Mean);
        assert_eq!(lower.route(&q).model, 1);
    }

    #[test]
    fn mean_counts_distinct_tags_on_the_hashed_path_too() {
        // More ids than LINEAR_DEDUP_MAX: deduplicated with a set, which must count the same.
        let names: Vec<String> = (0..40).map(|i| format!("t{i}")).collect();
        let tag_sets: Vec<[&str; 1]> = names.iter().map(|t| [t.as_str()]).collect();
        let recs: Vec<Record<'_>> = tag_sets
            .iter()
            .enumerate()
            .flat_map(|(i, t)| {
                let o = if i % 3 == 0 {
                    Outcome::Win
                } else {
                    Outcome::Loss
                };
                [("big", o), ("small", Outcome::Tie)].map(|(m, o)| Record {
                    query_id: t[0],
                    tags: &t[..],
                    model: m,
                    outcome: o,
                })
            })
            .collect();
        let store = Arc::new(Store::from_records(Params::default(), recs).unwrap());
        let d = Decider::new(store, &costs(), None, 0.0, None)
            .unwrap()
            .with_aggregation(Aggregation::Mean);
        let q: Vec<&str> = names.iter().chain(&names).map(String::as_str).collect();
        assert!(q.len() > LINEAR_DEDUP_MAX);
        let e = d.explain(&q);
        assert_eq!(e.known.len(), 40);
        assert_eq!(d.scores_flat(&q, &[0, q.len()]), e.sums);
        assert_eq!(d.route(&q), e.route);
    }
}
