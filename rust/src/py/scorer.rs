//! `_core.Store`: the tag-score store behind `tagrouter_fast.TagScorer`.

use std::borrow::Cow;
use std::path::PathBuf;
use std::sync::Arc;

use numpy::ndarray::Array2;
use numpy::{IntoPyArray, PyArray2};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyString, PyTuple};

use super::errors::run;
use super::input::live_outcomes;
use super::input::{for_each_tag, tag_str};
use crate::error::{pyrepr, RouterError};
use crate::store_io;
use crate::table::{Ingest, Outcome, Params, Store, Weighting};

/// Immutable tag-score store (counts, tag frequencies, scores). Updates return a new store.
#[pyclass(frozen, name = "Store", module = "tagrouter_fast._core")]
pub struct PyStore {
    pub(crate) inner: Arc<Store>,
}

pub(crate) fn wrap(store: Store) -> PyStore {
    PyStore {
        inner: Arc::new(store),
    }
}

fn parse_weighting(name: &str) -> PyResult<Weighting> {
    Weighting::parse(name).ok_or_else(|| {
        PyValueError::new_err(format!(
            "unknown weighting {}; expected 'paper', 'none', 'shrunk' or 'difficulty'",
            pyrepr(name)
        ))
    })
}

/// Reads `(query_id, tags, model, outcome)` records straight from Python objects into `store`.
/// `check(model, i)` vets each record's model. Returns the number of records read.
fn ingest<'py>(
    py: Python<'py>,
    store: &mut Store,
    records: &Bound<'py, PyAny>,
    mut check: impl FnMut(&str, usize) -> PyResult<()>,
) -> PyResult<usize> {
    if records.cast::<PyString>().is_ok() {
        return Err(PyTypeError::new_err(
            "records must be an iterable of tuples, not a str",
        ));
    }
    let mut ing = Ingest::new(store);
    let mut n = 0;
    for rec in records.try_iter()? {
        let rec = rec?;
        let i = n;
        n += 1;
        let fields: [Bound<'py, PyAny>; 4] = record_fields(&rec, i)?;
        let model = fields[2]
            .cast::<PyString>()
            .map_err(|_| field_err(i, "model", &fields[2]))?
            .to_str()?;
        check(model, i)?;
        let label = fields[3]
            .cast::<PyString>()
            .map_err(|_| field_err(i, "outcome", &fields[3]))?
            .to_str()?;
        let outcome = Outcome::parse(label).ok_or_else(|| {
            PyValueError::new_err(format!(
                "record {i}: unknown outcome {}; expected 'win', 'tie' or 'loss'",
                pyrepr(label)
            ))
        })?;
        let qid: Cow<'_, str> = match fields[0].cast::<PyString>() {
            Ok(s) => Cow::Borrowed(s.to_str()?),
            // Integer ids are common in datasets; they name the same query as their str().
            Err(_) => Cow::Owned(fields[0].str()?.to_str()?.to_owned()),
        };
        let tagged = for_each_tag(&fields[1], |t| {
            ing.tag(tag_str(&t)?);
            Ok(())
        });
        if let Err(e) = tagged {
            ing.abandon_record();
            return Err(prefix(py, i, e));
        }
        ing.finish_record(&qid, model, outcome)
            .map_err(PyErr::from)?;
    }
    py.detach(|| ing.finish());
    Ok(n)
}

fn record_fields<'py>(rec: &Bound<'py, PyAny>, i: usize) -> PyResult<[Bound<'py, PyAny>; 4]> {
    let get =
        |f: &dyn Fn(usize) -> PyResult<Bound<'py, PyAny>>| -> PyResult<[Bound<'py, PyAny>; 4]> {
            Ok([f(0)?, f(1)?, f(2)?, f(3)?])
        };
    if let Ok(t) = rec.cast::<PyTuple>() {
        if t.len() == 4 {
            return get(&|k| t.get_item(k));
        }
    } else if let Ok(l) = rec.cast::<PyList>() {
        if l.len() == 4 {
            return get(&|k| l.get_item(k));
        }
    }
    Err(PyValueError::new_err(format!(
        "record {i}: expected a (query_id, tags, model, outcome) tuple, got {}",
        rec.repr().map_or_else(|_| "?".into(), |r| r.to_string())
    )))
}

#[cold]
#[inline(never)]
fn field_err(i: usize, what: &str, v: &Bound<'_, PyAny>) -> PyErr {
    let ty = v
        .get_type()
        .name()
        .map_or_else(|_| "?".to_string(), |n| n.to_string());
    PyTypeError::new_err(format!("record {i}: {what} must be str, got {ty}"))
}

#[cold]
#[inline(never)]
fn prefix(py: Python<'_>, i: usize, e: PyErr) -> PyErr {
    let msg = format!("record {i}: {}", e.value(py));
    if e.is_instance_of::<PyTypeError>(py) {
        PyTypeError::new_err(msg)
    } else {
        e
    }
}

#[pymethods]
impl PyStore {
    /// Builds a store from `(query_id, tags, model, outcome)` records.
    #[staticmethod]
    #[pyo3(
        signature = (records, s_win=1.0, s_tie=0.15, s_loss=-1.0, weighting="paper", prior_strength=0.0),
        text_signature = "(records, s_win=1.0, s_tie=0.15, s_loss=-1.0, weighting='paper', prior_strength=0.0)"
    )]
    fn from_records(
        py: Python<'_>,
        records: &Bound<'_, PyAny>,
        s_win: f64,
        s_tie: f64,
        s_loss: f64,
        weighting: &str,
        prior_strength: f64,
    ) -> PyResult<Self> {
        let params = Params {
            s_win,
            s_tie,
            s_loss,
            weighting: parse_weighting(weighting)?,
            prior_strength,
        };
        let mut store = Store::new(params)?;
        ingest(py, &mut store, records, |_, _| Ok(()))?;
        Ok(wrap(store))
    }

    /// This store plus more records (for existing or new models).
    fn with_records(&self, py: Python<'_>, records: &Bound<'_, PyAny>) -> PyResult<Self> {
        let mut store = (*self.inner).clone();
        ingest(py, &mut store, records, |_, _| Ok(()))?;
        Ok(wrap(store))
    }

    /// This store plus `(tags, model, outcome)` live outcomes, each a query of its own kept as
    /// counts (as `Decider.learn` adds them), not as a query row.
    fn with_learned(&self, py: Python<'_>, outcomes: &Bound<'_, PyAny>) -> PyResult<Self> {
        let owned = live_outcomes(outcomes)?;
        let inner = Arc::clone(&self.inner);
        Ok(wrap(py.detach(move || {
            let mut store = (*inner).clone();
            for (tags, model, outcome) in &owned {
                store.learn(tags, model, *outcome);
            }
            store.compute_scores();
            store
        })))
    }

    /// This store plus a new model, from records that are all about that model.
    fn with_model(&self, py: Python<'_>, records: &Bound<'_, PyAny>) -> PyResult<Self> {
        let mut store = (*self.inner).clone();
        let mut first: Option<String> = None;
        let n = ingest(py, &mut store, records, |model, i| match &first {
            None => {
                if self.inner.model_id(model).is_some() {
                    return Err(RouterError::inconsistent(format!(
                        "model {} is already in the store; with_records adds judgments to it",
                        pyrepr(model)
                    ))
                    .into());
                }
                first = Some(model.to_owned());
                Ok(())
            }
            Some(m) if m == model => Ok(()),
            Some(m) => Err(RouterError::inconsistent(format!(
                "with_model takes the records of one model; record {i} is for {}, not {}",
                pyrepr(model),
                pyrepr(m)
            ))
            .into()),
        })?;
        if n == 0 {
            return Err(PyValueError::new_err(
                "with_model needs at least one record",
            ));
        }
        Ok(wrap(store))
    }

    /// This store without `model` (and without queries and tags only it covered).
    fn without_model(&self, py: Python<'_>, model: &str) -> PyResult<Self> {
        let inner = &self.inner;
        run(py, || inner.without_model(model)).map(wrap)
    }

    /// Counts of both stores added up; parameters are this store's.
    fn merged(&self, py: Python<'_>, other: &Bound<'_, PyStore>) -> PyResult<Self> {
        let (a, b) = (&self.inner, &other.get().inner);
        run(py, || a.merged(b)).map(wrap)
    }

    /// The same counts under other scoring parameters (unset ones are kept).
    #[pyo3(signature = (*, s_win=None, s_tie=None, s_loss=None, weighting=None, prior_strength=None))]
    fn reweighted(
        &self,
        py: Python<'_>,
        s_win: Option<f64>,
        s_tie: Option<f64>,
        s_loss: Option<f64>,
        weighting: Option<&str>,
        prior_strength: Option<f64>,
    ) -> PyResult<Self> {
        let p = self.inner.params();
        let params = Params {
            s_win: s_win.unwrap_or(p.s_win),
            s_tie: s_tie.unwrap_or(p.s_tie),
            s_loss: s_loss.unwrap_or(p.s_loss),
            weighting: weighting
                .map(parse_weighting)
                .transpose()?
                .unwrap_or(p.weighting),
            prior_strength: prior_strength.unwrap_or(p.prior_strength),
        };
        let inner = &self.inner;
        run(py, || inner.reweighted(params)).map(wrap)
    }

    /// `score(model, tag)`.
    fn score(&self, model: &str, tag: &str) -> PyResult<f64> {
        Ok(self.inner.score(model, tag)?)
    }

    /// `(win, tie, loss)` counts of `model` on training queries carrying `tag`.
    fn counts(&self, model: &str, tag: &str) -> PyResult<(u32, u32, u32)> {
        let [w, t, l] = self.inner.counts(model, tag)?;
        Ok((w, t, l))
    }

    /// `count_t`: distinct training queries carrying `tag`.
    fn tag_count(&self, tag: &str) -> PyResult<u32> {
        Ok(self.inner.tag_count(tag)?)
    }

    /// `(win, tie, loss)` counts of `model` over all its records.
    fn model_totals(&self, model: &str) -> PyResult<(u32, u32, u32)> {
        let [w, t, l] = self.inner.model_totals(model)?;
        Ok((w, t, l))
    }

    /// Every stored query as `(query_id, tags, [(model, (win, tie, loss)), ...])`, in store
    /// order: what `add_model` needs to copy a model's outcomes or reuse a query's tag set.
    #[allow(clippy::type_complexity)]
    fn queries(&self) -> Vec<(&str, Vec<&str>, Vec<(&str, (u32, u32, u32))>)> {
        let s = &*self.inner;
        s.queries()
            .iter()
            .map(|q| {
                let tags = q.tags.iter().map(|&t| s.tag_name(t)).collect();
                let judged = q
                    .judged
                    .iter()
                    .map(|&(m, [w, t, l])| (s.models()[m as usize].as_str(), (w, t, l)))
                    .collect();
                (&*q.id, tags, judged)
            })
            .collect()
    }

    #[getter]
    fn models(&self) -> Vec<String> {
        self.inner.models().to_vec()
    }

    #[getter]
    fn tags(&self) -> Vec<&str> {
        self.inner.tag_names().collect()
    }

    #[getter]
    fn n_queries(&self) -> usize {
        self.inner.n_queries()
    }

    /// Live outcomes learned (`Decider.learn`): kept as counts, not as queries.
    #[getter]
    fn n_learned(&self) -> u64 {
        self.inner.n_learned()
    }

    /// `(win, tie, loss)` live outcomes of `model` on `tag` (a part of `counts`).
    fn learned_counts(&self, model: &str, tag: &str) -> PyResult<(u32, u32, u32)> {
        let [w, t, l] = self.inner.learned_counts(model, tag)?;
        Ok((w, t, l))
    }

    #[getter]
    fn n_records(&self) -> u64 {
        self.inner.n_records()
    }

    #[getter]
    fn s_win(&self) -> f64 {
        self.inner.params().s_win
    }

    #[getter]
    fn s_tie(&self) -> f64 {
        self.inner.params().s_tie
    }

    #[getter]
    fn s_loss(&self) -> f64 {
        self.inner.params().s_loss
    }

    #[getter]
    fn weighting(&self) -> &'static str {
        self.inner.params().weighting.as_str()
    }

    #[getter]
    fn prior_strength(&self) -> f64 {
        self.inner.params().prior_strength
    }

    /// Scores as a `(n_tags, n_models)` array in `tags` x `models` order.
    fn score_matrix<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray2<f64>>> {
        let (nt, nm) = (self.inner.n_tags(), self.inner.n_models());
        let a = Array2::from_shape_vec((nt, nm), self.inner.score_matrix().to_vec())
            .map_err(|e| PyValueError::new_err(e.to_string()))?;
        Ok(a.into_pyarray(py))
    }

    /// Writes the store file atomically.
    fn save(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        let inner = &self.inner;
        run(py, || store_io::save(inner, &path))
    }

    /// Reads a store file written by `save`.
    #[staticmethod]
    fn load(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        run(py, || store_io::load(&path)).map(wrap)
    }

    /// The store file's bytes.
    fn to_bytes<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        let inner = &self.inner;
        let bytes = py.detach(|| store_io::to_bytes(inner));
        PyBytes::new(py, &bytes)
    }

    /// Parses a store file's bytes.
    #[staticmethod]
    fn from_bytes(data: &[u8]) -> PyResult<Self> {
        store_io::from_bytes(data).map(wrap).map_err(|reason| {
            RouterError::StoreFormat {
                path: "<bytes>".into(),
                reason,
            }
            .into()
        })
    }

    fn __contains__(&self, tag: &str) -> bool {
        self.inner.tag_id(tag).is_some()
    }

    fn __len__(&self) -> usize {
        self.inner.n_tags()
    }

    fn __repr__(&self) -> String {
        let s = &self.inner;
        format!(
            "<Store: {} models, {} tags, {} queries, weighting={}>",
            s.n_models(),
            s.n_tags(),
            s.n_queries(),
            pyrepr(s.params().weighting.as_str())
        )
    }
}
