//! `_core.Decider` and `_core.Decision`: the cost-aware decider behind `tagrouter_fast.TagDecider`.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;

use numpy::ndarray::Array2;
use numpy::{
    IntoPyArray, PyArray1, PyArray2, PyReadonlyArray1, PyReadonlyArray2, PyReadonlyArrayDyn,
};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString};

use super::among::{allowed_from_names, Among, BatchAmong};
use super::errors::run;
use super::input::{for_each_tag, live_outcomes, tag_str, with_tag_items, Flat, Ids};
use super::scorer::{wrap, PyStore};
use crate::candidates::CandidateMask;
use crate::curve;
use crate::decide::{Aggregation, Decider, Route};
use crate::error::pyrepr;
use crate::table::Outcome;
use crate::tags::split_tags;
use crate::theta;

/// Cost-aware decider over a snapshot of a store (paper 3.4).
#[pyclass(frozen, name = "Decider", module = "tagrouter_fast._core")]
pub struct PyDecider {
    core: Decider,
    store: Py<PyStore>,
    /// Model names in the decider's preference order, created once so that routing hands back
    /// a new reference to an existing str instead of building one per call.
    pref_names: Vec<Py<PyString>>,
    /// Model names in `models` order, shared with every Decision.
    out_names: Arc<[Py<PyString>]>,
}

impl PyDecider {
    fn from_core(py: Python<'_>, core: Decider, store: Py<PyStore>) -> Self {
        let pref_names = (0..core.n_models())
            .map(|j| PyString::intern(py, core.pref_name(j)).unbind())
            .collect();
        let out_names = core
            .models()
            .iter()
            .map(|m| PyString::intern(py, m).unbind())
            .collect();
        Self {
            core,
            store,
            pref_names,
            out_names,
        }
    }

    #[inline]
    fn name(&self, py: Python<'_>, out: usize) -> Py<PyString> {
        self.out_names[out].clone_ref(py)
    }

    fn decision(
        &self,
        py: Python<'_>,
        ids: &[u32],
        known: Vec<Py<PyAny>>,
        unknown: Vec<Py<PyAny>>,
        allowed: Option<&Among>,
    ) -> PyDecision {
        // One state of a live store for the scores and the contributions, so they add up.
        let (route, sums, contributions) = self
            .core
            .explain_ids_with_rows_in(ids, allowed.map(|a| &a.restriction));
        let d = PyDecision {
            route,
            theta: self.core.theta(),
            aggregation: self.core.aggregation(),
            llm: allowed.map_or(self.core.llm(), |a| self.core.to_out(a.restriction.llm())),
            names: Arc::clone(&self.out_names),
            model: self.name(py, route.model),
            sums,
            known,
            contributions,
            unknown,
            n_candidates: self.core.n_models(),
        };
        match allowed {
            Some(a) if !a.mask.is_all() => d.only(py, &a.mask),
            _ => d,
        }
    }

    /// The restrictions of a batch call's `among`/`among_each`.
    fn batch_among(
        &self,
        among_all: Option<&Bound<'_, PyAny>>,
        among_each: Option<&Bound<'_, PyAny>>,
        n_queries: usize,
    ) -> PyResult<BatchAmong> {
        BatchAmong::from_args(&self.core, among_all, among_each, n_queries)
    }

    fn flat_routes(&self, py: Python<'_>, list_of_tags: &Bound<'_, PyAny>) -> PyResult<Vec<Route>> {
        let flat = Flat::from_tag_lists(list_of_tags)?;
        let (core, strs, offs) = (&self.core, &flat.strs, &flat.offsets);
        Ok(py.detach(|| core.routes_flat(strs, offs)))
    }
}

#[pymethods]
impl PyDecider {
    #[new]
    #[pyo3(signature = (store, costs, llm=None, theta=0.0, fallback=None, aggregation="sum"))]
    fn new(
        py: Python<'_>,
        store: Bound<'_, PyStore>,
        costs: HashMap<String, f64>,
        llm: Option<&str>,
        theta: f64,
        fallback: Option<&str>,
        aggregation: &str,
    ) -> PyResult<Self> {
        let aggregation = Aggregation::parse(aggregation)?;
        let costs: Vec<(String, f64)> = costs.into_iter().collect();
        let inner = Arc::clone(&store.get().inner);
        let core = Decider::new(inner, &costs, llm, theta, fallback)?.with_aggregation(aggregation);
        Ok(Self::from_core(py, core, store.unbind()))
    }

    /// The same decider with another theta (and the same aggregation).
    fn with_theta(&self, py: Python<'_>, theta: f64) -> PyResult<Self> {
        Ok(Self {
            core: self.core.with_theta(theta)?,
            store: self.store.clone_ref(py),
            pref_names: self.pref_names.iter().map(|n| n.clone_ref(py)).collect(),
            out_names: Arc::clone(&self.out_names),
        })
    }

    /// The store: the one the decider was built over or, for a live decider, a value copy of
    /// its current state (O(store), computed per call).
    #[getter]
    fn store(&self, py: Python<'_>) -> PyResult<Py<PyStore>> {
        match self.core.live() {
            None => Ok(self.store.clone_ref(py)),
            Some(live) => {
                let live = Arc::clone(live);
                let snap = py.detach(move || live.snapshot());
                Py::new(py, wrap(snap))
            }
        }
    }

    /// The same decider over a live store started from its store (or sharing its live store):
    /// `learn` then adds outcomes in place, seen by the next decision of every decider that
    /// shares it (`with_theta` copies share it).
    fn to_live(&self, py: Python<'_>) -> Self {
        Self {
            core: self.core.to_live(),
            store: self.store.clone_ref(py),
            pref_names: self.pref_names.iter().map(|n| n.clone_ref(py)).collect(),
            out_names: Arc::clone(&self.out_names),
        }
    }

    /// Every model of the store (candidates or not): cheap, unlike `store.models` on a live
    /// decider (a snapshot).
    #[getter]
    fn store_models(&self) -> Vec<String> {
        self.core.store_models()
    }

    /// Whether the decider routes on a live store.
    #[getter]
    fn is_live(&self) -> bool {
        self.core.is_live()
    }

    /// Changes the live store has applied (None for a snapshot decider).
    #[getter]
    fn live_version(&self) -> Option<u64> {
        self.core.live().map(|l| l.version())
    }

    /// Adds `(tags, model, outcome)` outcomes to the live store, in place and all at once
    /// (readers see all of them or none): each is an anonymous query judged once for `model`.
    /// O(their tags); returns the live store's version after the change.
    fn learn(&self, py: Python<'_>, outcomes: &Bound<'_, PyAny>) -> PyResult<u64> {
        let Some(live) = self.core.live() else {
            return Err(PyValueError::new_err(
                "learn() needs a live decider: call to_live() first",
            ));
        };
        let owned = live_outcomes(outcomes)?;
        let live = Arc::clone(live);
        // Detached: the writer may wait for a detached batch reader to finish its query.
        Ok(py.detach(move || {
            let view: Vec<(&[String], &str, Outcome)> = owned
                .iter()
                .map(|(t, m, o)| (t.as_slice(), m.as_str(), *o))
                .collect();
            live.learn_many(&view)
        })?)
    }

    #[getter]
    fn models(&self, py: Python<'_>) -> Vec<Py<PyString>> {
        self.out_names.iter().map(|n| n.clone_ref(py)).collect()
    }

    #[getter]
    fn costs(&self) -> HashMap<String, f64> {
        self.core
            .models()
            .iter()
            .enumerate()
            .map(|(i, m)| (m.clone(), self.core.cost(i)))
            .collect()
    }

    #[getter]
    fn llm(&self, py: Python<'_>) -> Py<PyString> {
        self.name(py, self.core.llm())
    }

    #[getter]
    fn fallback(&self, py: Python<'_>) -> Py<PyString> {
        self.name(py, self.core.fallback())
    }

    #[getter]
    fn theta(&self) -> f64 {
        self.core.theta()
    }

    /// How per-tag scores combine into S(M): "sum" (the paper) or "mean".
    #[getter]
    fn aggregation(&self) -> &'static str {
        self.core.aggregation().as_str()
    }

    // ==== Routing ====

    /// The model for one query's tags; with `among`, among those candidates only.
    #[pyo3(signature = (tags, *, among=None))]
    fn route_tags(
        &self,
        py: Python<'_>,
        tags: &Bound<'_, PyAny>,
        among: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Py<PyString>> {
        let allowed = match among {
            None => None,
            Some(names) => Some(allowed_from_names(&self.core, names)?.restriction),
        };
        // Too little work to be worth detaching: the whole call is a few hundred nanoseconds.
        // Lookups and the decision under one reader (one entry to a live store); the items are
        // iterated inside it only when that runs no Python code (list, tuple).
        let j = with_tag_items(tags, |items| {
            self.core.reader(|r| {
                let mut ids = Ids::new();
                for item in items {
                    if let Some(id) = r.tag_id(tag_str(&item)?) {
                        ids.push(id);
                    }
                }
                Ok(match &allowed {
                    None => r.route_pref(ids.as_slice()),
                    Some(a) => r.route_pref_among(ids.as_slice(), a),
                })
            })
        })?;
        Ok(self.pref_names[j].clone_ref(py))
    }

    /// The model for a tag generator's raw output, `"a, b, c"`, split here.
    fn route_tag_string(&self, py: Python<'_>, raw: &str) -> Py<PyString> {
        let j = self.core.reader(|r| {
            let mut ids = Ids::new();
            for t in split_tags(raw) {
                if let Some(id) = r.tag_id(t) {
                    ids.push(id);
                }
            }
            r.route_pref(ids.as_slice())
        });
        self.pref_names[j].clone_ref(py)
    }

    /// The model for each query of a batch of tag lists; with `among` (one set for the batch)
    /// or `among_each` (one per query, None for all), among those candidates only.
    #[pyo3(signature = (list_of_tags, *, among=None, among_each=None))]
    fn route_tags_batch<'py>(
        &self,
        py: Python<'py>,
        list_of_tags: &Bound<'py, PyAny>,
        among: Option<&Bound<'py, PyAny>>,
        among_each: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyList>> {
        let flat = Flat::from_tag_lists(list_of_tags)?;
        let allowed = self.batch_among(among, among_each, flat.n_queries())?;
        let (core, strs, offs) = (&self.core, &flat.strs, &flat.offsets);
        let idx = py.detach(|| core.route_flat_pref_with(strs, offs, |q| allowed.get(q)));
        PyList::new(
            py,
            idx.iter().map(|&j| self.pref_names[j as usize].bind(py)),
        )
    }

    /// The model for each of a batch of raw generator outputs.
    fn route_tag_strings_batch<'py>(
        &self,
        py: Python<'py>,
        raws: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyList>> {
        let flat = Flat::from_tag_strings(raws)?;
        let (core, strs, offs) = (&self.core, &flat.strs, &flat.offsets);
        let idx = py.detach(|| core.route_flat_pref(strs, offs));
        PyList::new(
            py,
            idx.iter().map(|&j| self.pref_names[j as usize].bind(py)),
        )
    }

    /// Index into `models` of the routed model, per query.
    fn route_indices_batch<'py>(
        &self,
        py: Python<'py>,
        list_of_tags: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyArray1<i64>>> {
        let flat = Flat::from_tag_lists(list_of_tags)?;
        let (core, strs, offs) = (&self.core, &flat.strs, &flat.offsets);
        let idx: Vec<i64> = py.detach(|| {
            core.route_flat_pref(strs, offs)
                .iter()
                .map(|&j| to_i64(core.to_out(j as usize)))
                .collect()
        });
        Ok(idx.into_pyarray(py))
    }

    /// `S(M)` per query and model, `(n_queries, n_models)` in `models` order.
    fn scores_batch<'py>(
        &self,
        py: Python<'py>,
        list_of_tags: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyArray2<f64>>> {
        let flat = Flat::from_tag_lists(list_of_tags)?;
        let (core, strs, offs) = (&self.core, &flat.strs, &flat.offsets);
        let v = py.detach(|| core.scores_flat(strs, offs));
        let a = Array2::from_shape_vec((flat.n_queries(), core.n_models()), v)
            .map_err(|e| PyValueError::new_err(e.to_string()))?;
        Ok(a.into_pyarray(py))
    }

    /// `Delta_q = S(M_SLM) - S(M_LLM)` per query; NaN without a known tag or a small model.
    fn deltas_batch<'py>(
        &self,
        py: Python<'py>,
        list_of_tags: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyArray1<f64>>> {
        let routes = self.flat_routes(py, list_of_tags)?;
        Ok(routes
            .iter()
            .map(|r| r.delta)
            .collect::<Vec<_>>()
            .into_pyarray(py))
    }

    /// The routes of a batch as columns, computed in one pass without the GIL: the routed
    /// model, `Delta_q`, `M_SLM` (-1 if none) and `M*` (indices into `models`), and the number
    /// of distinct known tags; see `TagDecider.decide_batch`. `among`/`among_each` as in
    /// `route_tags_batch`.
    #[allow(clippy::type_complexity)]
    #[pyo3(signature = (list_of_tags, *, among=None, among_each=None))]
    fn decide_batch<'py>(
        &self,
        py: Python<'py>,
        list_of_tags: &Bound<'py, PyAny>,
        among: Option<&Bound<'py, PyAny>>,
        among_each: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<(
        Bound<'py, PyArray1<i64>>,
        Bound<'py, PyArray1<f64>>,
        Bound<'py, PyArray1<i64>>,
        Bound<'py, PyArray1<i64>>,
        Bound<'py, PyArray1<i64>>,
    )> {
        let flat = Flat::from_tag_lists(list_of_tags)?;
        let allowed = self.batch_among(among, among_each, flat.n_queries())?;
        let (core, strs, offs) = (&self.core, &flat.strs, &flat.offsets);
        let c = py.detach(|| core.route_columns_flat_with(strs, offs, |q| allowed.get(q)));
        Ok((
            c.model.into_pyarray(py),
            c.delta.into_pyarray(py),
            c.slm.into_pyarray(py),
            c.argmax.into_pyarray(py),
            c.n_known.into_pyarray(py),
        ))
    }

    /// The decision for one query, with its explanation; with `among`, among those candidates
    /// only (the explanation then covers them only).
    #[pyo3(signature = (tags, *, among=None))]
    fn decide(
        &self,
        py: Python<'_>,
        tags: &Bound<'_, PyAny>,
        among: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<PyDecision> {
        let allowed = among
            .map(|names| allowed_from_names(&self.core, names))
            .transpose()?;
        let mut ids: Vec<u32> = Vec::new();
        let mut known: Vec<Py<PyAny>> = Vec::new();
        let mut unknown: Vec<Py<PyAny>> = Vec::new();
        let mut unknown_strs: Vec<String> = Vec::new();
        for_each_tag(tags, |item| {
            let s = tag_str(&item)?;
            match self.core.tag_id(s) {
                Some(id) if !ids.contains(&id) => {
                    ids.push(id);
                    known.push(item.unbind());
                }
                Some(_) => {}
                None if unknown_strs.iter().any(|u| u == s) => {}
                None => {
                    unknown_strs.push(s.to_owned());
                    unknown.push(item.unbind());
                }
            }
            Ok(())
        })?;
        Ok(self.decision(py, &ids, known, unknown, allowed.as_ref()))
    }

    /// `decide` for a tag generator's raw output, `"a, b, c"`.
    fn decide_tag_string(&self, py: Python<'_>, raw: &str) -> PyDecision {
        let mut ids: Vec<u32> = Vec::new();
        let mut known = Vec::new();
        let mut unknown: Vec<&str> = Vec::new();
        for t in split_tags(raw) {
            match self.core.tag_id(t) {
                Some(id) if !ids.contains(&id) => {
                    ids.push(id);
                    known.push(PyString::new(py, t).into_any().unbind());
                }
                Some(_) => {}
                None if unknown.contains(&t) => {}
                None => unknown.push(t),
            }
        }
        let unknown = unknown
            .iter()
            .map(|t| PyString::new(py, t).into_any().unbind())
            .collect();
        self.decision(py, &ids, known, unknown, None)
    }

    fn __repr__(&self) -> String {
        format!(
            "<Decider: {} models, llm={}, theta={}, aggregation={}>",
            self.core.n_models(),
            pyrepr(&self.core.models()[self.core.llm()]),
            self.core.theta(),
            pyrepr(self.core.aggregation().as_str())
        )
    }
}

// ==== Theta (paper G.2) over decision columns ====

/// `(index of the best point, thetas, accept rates, mean costs, LLM shares)`.
type Sweep<'py> = (
    usize,
    Bound<'py, PyArray1<f64>>,
    Bound<'py, PyArray1<f64>>,
    Bound<'py, PyArray1<f64>>,
    Bound<'py, PyArray1<f64>>,
);

/// Evaluates theta values on labelled decision columns (`Decider.decide_batch`'s model, delta
/// and slm, possibly from several deciders); see `tagrouter_fast.core.sweep_theta`.
///
/// `accept` is `(n, m)`; `cost` is `(n, m)` per query or `(m,)` per model; `llm` is a column.
#[pyfunction]
#[pyo3(signature = (model, delta, slm, accept, cost, llm, grid=None))]
#[allow(clippy::too_many_arguments)]
pub fn sweep_routes<'py>(
    py: Python<'py>,
    model: PyReadonlyArray1<'py, i64>,
    delta: PyReadonlyArray1<'py, f64>,
    slm: PyReadonlyArray1<'py, i64>,
    accept: PyReadonlyArray2<'py, bool>,
    cost: PyReadonlyArrayDyn<'py, f64>,
    llm: i64,
    grid: Option<PyReadonlyArray1<'py, f64>>,
) -> PyResult<Sweep<'py>> {
    let (model, delta, slm) = (model.as_array(), delta.as_array(), slm.as_array());
    let n = model.len();
    let acc = accept.as_array();
    let nm = acc.shape()[1];
    if acc.shape()[0] != n {
        return Err(mismatch("accept", acc.shape(), n, nm));
    }
    let cost = cost.as_array();
    let per_query = match cost.shape() {
        [m] if *m == nm => false,
        [q, m] if *q == n && *m == nm => true,
        s => {
            return Err(PyValueError::new_err(format!(
                "mismatched lengths: cost has shape {s:?}, expected ({n}, {nm}) = (queries, \
                 models) or ({nm},) = (models,)"
            )))
        }
    };
    let grid = grid.as_ref().map(numpy::PyReadonlyArray::as_array);
    let pts = run(py, || {
        let routes = theta::routes_from_columns(
            &model.to_vec(),
            &delta.to_vec(),
            &slm.to_vec(),
            llm,
            Some(nm),
        )?;
        let accept: Vec<bool> = acc.iter().copied().collect();
        let cost: Vec<f64> = if per_query {
            cost.iter().copied().collect()
        } else {
            (0..n).flat_map(|_| cost.iter().copied()).collect()
        };
        let grid = grid.map_or_else(|| theta::default_grid(&routes), |g| g.to_vec());
        let set = theta::Labelled {
            routes: &routes,
            accept: &accept,
            cost: &cost,
            n_models: nm,
            llm: routes_llm(llm),
        };
        theta::sweep(&set, &grid)
    })?;
    let col =
        |f: fn(&theta::ThetaPoint) -> f64| pts.iter().map(f).collect::<Vec<_>>().into_pyarray(py);
    // Index of the best point (accept rate, then cost, then |theta|): `theta::best` on the grid.
    let best = theta::best(&pts)
        .and_then(|b| pts.iter().position(|p| *p == b))
        .unwrap_or(0);
    Ok((
        best,
        col(|p| p.theta),
        col(|p| p.accept_rate),
        col(|p| p.mean_cost),
        col(|p| p.llm_share),
    ))
}

/// A theta routing the largest share of these decision columns' queries to column `llm` that
/// does not exceed `share`; see `tagrouter_fast.core.theta_for_llm_share`.
#[pyfunction]
pub fn theta_for_share_routes(
    py: Python<'_>,
    model: PyReadonlyArray1<'_, i64>,
    delta: PyReadonlyArray1<'_, f64>,
    slm: PyReadonlyArray1<'_, i64>,
    llm: i64,
    share: f64,
) -> PyResult<f64> {
    let (model, delta, slm) = (model.as_array(), delta.as_array(), slm.as_array());
    run(py, || {
        let routes =
            theta::routes_from_columns(&model.to_vec(), &delta.to_vec(), &slm.to_vec(), llm, None)?;
        theta::theta_for_llm_share(&routes, routes_llm(llm), share)
    })
}

// ==== Curves ====

/// `(ratio, ar, cost, thresholds)` of a threshold sweep.
type CurveOut<'py> = (
    Bound<'py, PyArray1<f64>>,
    Bound<'py, PyArray1<f64>>,
    Bound<'py, PyArray1<f64>>,
    Bound<'py, PyArray1<f64>>,
);

/// The AR / cost curve of a router's threshold sweep (`curve::sweep`); see
/// `tagrouter_fast.eval.metrics.sweep`. Omitted costs are zeros.
#[pyfunction]
#[pyo3(signature = (pref, acc_llm, acc_slm, cost_llm=None, cost_slm=None))]
#[allow(clippy::similar_names)] // the Python API's names: llm vs slm is the point
pub fn sweep_curve<'py>(
    py: Python<'py>,
    pref: PyReadonlyArray1<'py, f64>,
    acc_llm: PyReadonlyArray1<'py, f64>,
    acc_slm: PyReadonlyArray1<'py, f64>,
    cost_llm: Option<PyReadonlyArray1<'py, f64>>,
    cost_slm: Option<PyReadonlyArray1<'py, f64>>,
) -> PyResult<CurveOut<'py>> {
    let views = [
        Some(pref.as_array()),
        Some(acc_llm.as_array()),
        Some(acc_slm.as_array()),
        cost_llm.as_ref().map(numpy::PyReadonlyArray::as_array),
        cost_slm.as_ref().map(numpy::PyReadonlyArray::as_array),
    ];
    let zeros = vec![0.0; pref.as_array().len()];
    let c = run(py, || {
        // Borrowed when contiguous (what the facade passes), copied once otherwise.
        let cols: Vec<Cow<'_, [f64]>> = views
            .iter()
            .map(|v| match v {
                Some(v) => v
                    .as_slice()
                    .map_or_else(|| Cow::Owned(v.to_vec()), Cow::Borrowed),
                None => Cow::Borrowed(zeros.as_slice()),
            })
            .collect();
        curve::sweep(&cols[0], &cols[1], &cols[2], &cols[3], &cols[4])
    })?;
    Ok((
        c.ratio.into_pyarray(py),
        c.ar.into_pyarray(py),
        c.cost.into_pyarray(py),
        c.thresholds.into_pyarray(py),
    ))
}

type AreasOut<'py> = (Bound<'py, PyArray1<f64>>, Bound<'py, PyArray1<f64>>);

/// AUC and PAUC of one router's curve under each row of `weights` (`curve::weighted_areas`);
/// see `tagrouter_fast.eval.metrics.batch_auc_pauc`.
#[pyfunction]
#[allow(clippy::similar_names)]
pub fn weighted_areas<'py>(
    py: Python<'py>,
    pref: PyReadonlyArray1<'py, f64>,
    acc_llm: PyReadonlyArray1<'py, f64>,
    acc_slm: PyReadonlyArray1<'py, f64>,
    weights: PyReadonlyArray2<'py, f64>,
    ar_llm: PyReadonlyArray1<'py, f64>,
) -> PyResult<AreasOut<'py>> {
    let cols: Vec<Vec<f64>> = [&pref, &acc_llm, &acc_slm, &ar_llm]
        .iter()
        .map(|a| a.as_array().iter().copied().collect())
        .collect();
    let w = weights.as_array();
    if w.ncols() != cols[0].len() || w.nrows() != cols[3].len() {
        return Err(PyValueError::new_err(format!(
            "mismatched lengths: weights has shape {:?}, expected ({}, {}) = (ar_llm, pref)",
            w.shape(),
            cols[3].len(),
            cols[0].len()
        )));
    }
    let w: Vec<f64> = w.iter().copied().collect();
    let (a, p) = run(py, || {
        curve::weighted_areas(&cols[0], &cols[1], &cols[2], &w, &cols[3])
    })?;
    Ok((a.into_pyarray(py), p.into_pyarray(py)))
}

/// `llm` once `routes_from_columns` has accepted it (so it is a non-negative column).
fn routes_llm(llm: i64) -> usize {
    usize::try_from(llm).unwrap_or(usize::MAX)
}

/// A tag generator's raw `"a, b, c"` output as a list of trimmed, non-empty tags: Python's
/// `[t.strip() for t in raw.split(",") if t.strip()]`, with `str.isspace()` whitespace.
///
/// >>> split_tags(" Poem, , Text Rewriting ")
/// ['Poem', 'Text Rewriting']
#[allow(clippy::doc_link_with_quotes)] // a Python doctest, not a Rust intra-doc link
#[pyfunction]
#[pyo3(name = "split_tags")]
pub fn py_split_tags(raw: &str) -> Vec<&str> {
    split_tags(raw).collect()
}

fn to_i64(i: usize) -> i64 {
    i64::try_from(i).unwrap_or(i64::MAX)
}

#[cold]
#[inline(never)]
fn mismatch(what: &str, shape: &[usize], n: usize, m: usize) -> PyErr {
    PyValueError::new_err(format!(
        "mismatched lengths: {what} has shape {shape:?}, expected ({n}, {m}) = (queries, models)"
    ))
}

/// One routing decision and its explanation.
///
/// Attributes:
///     model: the model the query goes to.
///     reason: "argmax", "cost_threshold" (theta moved it off the argmax) or "fallback"
///         (no known tag).
///     scores: S(M) per candidate model: the known tags' scores summed, or averaged when the
///         decider's aggregation is "mean".
///     delta: S(M_SLM) - S(M_LLM); NaN without a known tag or a small model.
///     theta, llm, slm, argmax: the threshold, M_LLM, M_SLM (None if none) and M*.
///     contributions: per known tag, its score for each model.
///     known_tags, unknown_tags: the query's tags the store knows, and those it ignored.
#[pyclass(frozen, name = "Decision", module = "tagrouter_fast._core")]
pub struct PyDecision {
    route: Route,
    theta: f64,
    aggregation: Aggregation,
    llm: usize,
    names: Arc<[Py<PyString>]>,
    model: Py<PyString>,
    sums: Vec<f64>,
    known: Vec<Py<PyAny>>,
    /// `contributions[k * n_models + m]`: score of model m on known tag k.
    contributions: Vec<f64>,
    unknown: Vec<Py<PyAny>>,
    /// The decider's candidates; more than `names` when the decision was restricted.
    n_candidates: usize,
}

impl PyDecision {
    /// This decision shown over the candidates of `mask` only (indices into `names` remapped),
    /// as a decider over just those candidates would show it.
    fn only(self, py: Python<'_>, mask: &CandidateMask) -> Self {
        let kept: Vec<usize> = mask.positions().collect();
        // Every index here is a kept candidate: the restricted rule never picks another.
        let at = |out: usize| kept.iter().position(|&p| p == out).unwrap_or(0);
        let n = self.names.len();
        Self {
            route: Route {
                model: at(self.route.model),
                argmax: at(self.route.argmax),
                slm: self.route.slm.map(at),
                ..self.route
            },
            llm: at(self.llm),
            names: kept.iter().map(|&p| self.names[p].clone_ref(py)).collect(),
            sums: kept.iter().map(|&p| self.sums[p]).collect(),
            contributions: self
                .contributions
                .chunks_exact(n)
                .flat_map(|row| kept.iter().map(move |&p| row[p]))
                .collect(),
            ..self
        }
    }

    fn name(&self, py: Python<'_>, i: usize) -> Py<PyString> {
        self.names[i].clone_ref(py)
    }

    fn model_dict<'py>(&self, py: Python<'py>, values: &[f64]) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (n, v) in self.names.iter().zip(values) {
            d.set_item(n.bind(py), *v)?;
        }
        Ok(d)
    }
}

#[pymethods]
impl PyDecision {
    #[getter]
    fn model(&self, py: Python<'_>) -> Py<PyString> {
        self.model.clone_ref(py)
    }

    #[getter]
    fn reason(&self) -> &'static str {
        self.route.reason.as_str()
    }

    #[getter]
    fn delta(&self) -> f64 {
        self.route.delta
    }

    #[getter]
    fn theta(&self) -> f64 {
        self.theta
    }

    #[getter]
    fn llm(&self, py: Python<'_>) -> Py<PyString> {
        self.name(py, self.llm)
    }

    #[getter]
    fn slm(&self, py: Python<'_>) -> Option<Py<PyString>> {
        self.route.slm.map(|i| self.name(py, i))
    }

    #[getter]
    fn argmax(&self, py: Python<'_>) -> Py<PyString> {
        self.name(py, self.route.argmax)
    }

    #[getter]
    fn scores<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        self.model_dict(py, &self.sums)
    }

    #[getter]
    fn contributions<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        let n = self.names.len();
        for (tag, row) in self.known.iter().zip(self.contributions.chunks_exact(n)) {
            d.set_item(tag.bind(py), self.model_dict(py, row)?)?;
        }
        Ok(d)
    }

    #[getter]
    fn known_tags(&self, py: Python<'_>) -> Vec<Py<PyAny>> {
        self.known.iter().map(|t| t.clone_ref(py)).collect()
    }

    #[getter]
    fn unknown_tags(&self, py: Python<'_>) -> Vec<Py<PyAny>> {
        self.unknown.iter().map(|t| t.clone_ref(py)).collect()
    }

    /// All fields as a plain dict (JSON-serialisable apart from NaN deltas).
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("model", self.model(py))?;
        d.set_item("reason", self.reason())?;
        d.set_item("scores", self.scores(py)?)?;
        d.set_item("delta", self.route.delta)?;
        d.set_item("theta", self.theta)?;
        d.set_item("llm", self.llm(py))?;
        d.set_item("slm", self.slm(py))?;
        d.set_item("argmax", self.argmax(py))?;
        d.set_item("contributions", self.contributions(py)?)?;
        d.set_item("known_tags", self.known_tags(py))?;
        d.set_item("unknown_tags", self.unknown_tags(py))?;
        Ok(d)
    }

    /// A human-readable, multi-line account of the decision.
    fn explain(&self, py: Python<'_>) -> PyResult<String> {
        let name = |i: usize| self.names[i].bind(py).to_string();
        let mut s = String::new();
        let _ = writeln!(s, "-> {} ({})", self.model.bind(py), self.reason());
        if self.route.reason == crate::decide::Reason::Fallback {
            let _ = writeln!(s, "   no known tag: fallback model");
        } else {
            let _ = writeln!(
                s,
                "   M* (argmax) = {}, M_LLM = {}",
                name(self.route.argmax),
                name(self.llm)
            );
            if let Some(slm) = self.route.slm {
                let _ = writeln!(
                    s,
                    "   Delta = S({}) - S({}) = {:.6e}, theta = {}",
                    name(slm),
                    name(self.llm),
                    self.route.delta,
                    self.theta
                );
            }
        }
        if self.aggregation == Aggregation::Mean && !self.known.is_empty() {
            // Without this line the scores below would not add up to the tags' contributions.
            let _ = writeln!(
                s,
                "   S(M) = mean score over the {} known tags",
                self.known.len()
            );
        }
        if self.names.len() < self.n_candidates {
            let _ = writeln!(
                s,
                "   restricted to {} of {} candidates",
                self.names.len(),
                self.n_candidates
            );
        }
        let mut order: Vec<usize> = (0..self.names.len()).collect();
        order.sort_by(|&a, &b| self.sums[b].total_cmp(&self.sums[a]));
        for i in order {
            let _ = writeln!(s, "   S({}) = {:.6e}", name(i), self.sums[i]);
        }
        let n = self.names.len();
        for (tag, row) in self.known.iter().zip(self.contributions.chunks_exact(n)) {
            let parts: Vec<String> = row
                .iter()
                .enumerate()
                .map(|(i, v)| format!("{}={v:.3e}", name(i)))
                .collect();
            let _ = writeln!(
                s,
                "   tag {}: {}",
                pyrepr(&tag.bind(py).str()?.to_string()),
                parts.join(", ")
            );
        }
        if !self.unknown.is_empty() {
            let parts: Vec<String> = self
                .unknown
                .iter()
                .map(|t| t.bind(py).str().map(|x| pyrepr(&x.to_string())))
                .collect::<PyResult<_>>()?;
            let _ = writeln!(s, "   ignored (unknown) tags: {}", parts.join(", "));
        }
        Ok(s.trim_end().to_owned())
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        format!(
            "Decision(model={}, reason={}, delta={}, known_tags={}, unknown_tags={})",
            pyrepr(&self.model.bind(py).to_string()),
            pyrepr(self.reason()),
            self.route.delta,
            self.known.len(),
            self.unknown.len()
        )
    }
}
