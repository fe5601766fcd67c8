//! `among=` and `among_each=`: the candidate subsets a decision may choose from, given as model
//! names, turned into the core's restrictions (`decide::among`).

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyList, PyString, PyTuple};

use crate::candidates::CandidateMask;
use crate::decide::{Decider, Restriction};
use crate::error::RouterError;

/// One query's allowed candidates: the mask (`models` order) and the rule's roles among them.
pub(crate) struct Among {
    pub(crate) mask: CandidateMask,
    pub(crate) restriction: Restriction,
}

/// Reads a collection of candidate names (any iterable of str but a bare str).
///
/// Errors: `TypeError` for a str or a non-str name, `UnknownModelError` for a name that is not
/// a candidate of the decider, `NoCandidateError` when no name is given.
pub(crate) fn allowed_from_names(core: &Decider, names: &Bound<'_, PyAny>) -> PyResult<Among> {
    if names.cast::<PyString>().is_ok() {
        return Err(PyTypeError::new_err(
            "among must be a collection of model names, not a str",
        ));
    }
    let mut mask = CandidateMask::none(core.n_models());
    let mut add = |item: Bound<'_, PyAny>| -> PyResult<()> {
        let Ok(name) = item.cast::<PyString>() else {
            return Err(not_a_name(&item));
        };
        let name = name.to_str()?;
        let pos = core
            .position(name)
            .ok_or_else(|| RouterError::unknown_model(name, core.models()))?;
        mask.set(pos);
        Ok(())
    };
    // Lists and tuples (what callers pass) are read in place, without an iterator object.
    if let Ok(list) = names.cast::<PyList>() {
        list.iter().try_for_each(&mut add)?;
    } else if let Ok(tuple) = names.cast::<PyTuple>() {
        tuple.iter().try_for_each(&mut add)?;
    } else {
        for item in names.try_iter()? {
            add(item?)?;
        }
    }
    let restriction = core.restriction(&mask)?;
    Ok(Among { mask, restriction })
}

/// The allowed candidates of each query of a batch.
pub(crate) enum BatchAmong {
    /// Every candidate, every query.
    All,
    /// One subset for the whole batch.
    One(Restriction),
    /// Per query: a subset, or every candidate (`None`).
    Each(Vec<Option<Restriction>>),
}

impl BatchAmong {
    /// From a batch method's `among` (one subset for all) and `among_each` (one per query, or
    /// None for every candidate) arguments; at most one of them.
    pub(crate) fn from_args(
        core: &Decider,
        among_all: Option<&Bound<'_, PyAny>>,
        among_each: Option<&Bound<'_, PyAny>>,
        n_queries: usize,
    ) -> PyResult<Self> {
        match (among_all, among_each) {
            (None, None) => Ok(Self::All),
            (Some(_), Some(_)) => Err(PyValueError::new_err(
                "pass at most one of among= (one set for the batch) and among_each= (one per \
                 query)",
            )),
            (Some(names), None) => Ok(Self::One(allowed_from_names(core, names)?.restriction)),
            (None, Some(each)) => {
                if each.cast::<PyString>().is_ok() {
                    return Err(PyTypeError::new_err(
                        "among_each must hold one collection of model names (or None) per query, \
                         not a str",
                    ));
                }
                let mut out: Vec<Option<Restriction>> = Vec::with_capacity(n_queries);
                // Callers often pass the same set object for many queries: read it once. The
                // previous item is held, so its identity cannot be taken by a new object.
                let mut prev: Option<Bound<'_, PyAny>> = None;
                for item in each.try_iter()? {
                    let item = item?;
                    let r = match &prev {
                        Some(p) if p.is(&item) => out.last().cloned().flatten(),
                        _ if item.is_none() => None,
                        _ => Some(allowed_from_names(core, &item)?.restriction),
                    };
                    out.push(r);
                    prev = Some(item);
                }
                if out.len() != n_queries {
                    return Err(PyValueError::new_err(format!(
                        "mismatched lengths: among_each has {} entries for {n_queries} queries",
                        out.len()
                    )));
                }
                Ok(Self::Each(out))
            }
        }
    }

    /// Query `q`'s restriction; `None` for every candidate.
    #[inline]
    pub(crate) fn get(&self, q: usize) -> Option<&Restriction> {
        match self {
            Self::All => None,
            Self::One(r) => Some(r),
            Self::Each(rs) => rs[q].as_ref(),
        }
    }
}

#[cold]
#[inline(never)]
fn not_a_name(item: &Bound<'_, PyAny>) -> PyErr {
    let ty = item
        .get_type()
        .name()
        .map_or_else(|_| "?".to_string(), |n| n.to_string());
    PyTypeError::new_err(format!("among: model names must be str, got {ty}"))
}
