//! Reading tags and records out of Python objects without building intermediate ones.

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyList, PyString, PyTuple};

use crate::error::pyrepr;
use crate::table::Outcome;
use crate::tags::split_tags;

/// Reads `(tags, model, outcome)` live outcomes into owned values (the learner then works
/// detached).
pub(crate) fn live_outcomes(
    outcomes: &Bound<'_, PyAny>,
) -> PyResult<Vec<(Vec<String>, String, Outcome)>> {
    let mut owned = Vec::new();
    for (i, item) in outcomes.try_iter()?.enumerate() {
        let item = item?;
        let bad = || {
            PyValueError::new_err(format!(
                "outcome {i}: expected a (tags, model, outcome) tuple"
            ))
        };
        if item.len().map_err(|_| bad())? != 3 {
            return Err(bad());
        }
        let mut tags = Vec::new();
        for_each_tag(&item.get_item(0)?, |t| {
            tags.push(tag_str(&t)?.to_owned());
            Ok(())
        })?;
        let model: String = item
            .get_item(1)?
            .extract()
            .map_err(|_| PyValueError::new_err(format!("outcome {i}: model must be a str")))?;
        let label: String = item
            .get_item(2)?
            .extract()
            .map_err(|_| PyValueError::new_err(format!("outcome {i}: outcome must be a str")))?;
        let outcome = Outcome::parse(&label).ok_or_else(|| {
            PyValueError::new_err(format!(
                "outcome {i}: unknown outcome {}; expected 'win', 'tie' or 'loss'",
                pyrepr(&label)
            ))
        })?;
        owned.push((tags, model, outcome));
    }
    Ok(owned)
}

/// Calls `f` with each item of a tags argument: a list or tuple of str (fast paths) or any
/// iterable of str. A bare str is refused: iterating it would route on its characters.
#[inline]
pub(crate) fn for_each_tag<'py>(
    tags: &Bound<'py, PyAny>,
    mut f: impl FnMut(Bound<'py, PyAny>) -> PyResult<()>,
) -> PyResult<()> {
    if let Ok(list) = tags.cast::<PyList>() {
        for item in list.iter() {
            f(item)?;
        }
    } else if let Ok(tuple) = tags.cast::<PyTuple>() {
        for item in tuple.iter() {
            f(item)?;
        }
    } else if tags.cast::<PyString>().is_ok() {
        return Err(bare_str());
    } else {
        for item in tags.try_iter()? {
            f(item?)?;
        }
    }
    Ok(())
}

/// Calls `f` with an iterator over the items of a tags argument. A list or tuple is iterated in
/// place (which runs no Python code, so `f` may hold a live store's reader meanwhile); any other
/// iterable is collected first. A bare str is refused, as in `for_each_tag`.
#[inline]
pub(crate) fn with_tag_items<'py, R>(
    tags: &Bound<'py, PyAny>,
    f: impl FnOnce(&mut dyn Iterator<Item = Bound<'py, PyAny>>) -> PyResult<R>,
) -> PyResult<R> {
    if let Ok(list) = tags.cast::<PyList>() {
        f(&mut list.iter())
    } else if let Ok(tuple) = tags.cast::<PyTuple>() {
        f(&mut tuple.iter())
    } else if tags.cast::<PyString>().is_ok() {
        Err(bare_str())
    } else {
        let items = tags.try_iter()?.collect::<PyResult<Vec<_>>>()?;
        f(&mut items.into_iter())
    }
}

/// The text of one tag.
#[inline]
pub(crate) fn tag_str<'a>(item: &'a Bound<'_, PyAny>) -> PyResult<&'a str> {
    match item.cast::<PyString>() {
        Ok(s) => s.to_str(),
        Err(_) => Err(not_str(item)),
    }
}

#[cold]
#[inline(never)]
fn bare_str() -> PyErr {
    PyTypeError::new_err(
        "tags must be a list of str, not a str; for a tag generator's raw \"a, b, c\" output \
         use route_tag_string()",
    )
}

#[cold]
#[inline(never)]
fn not_str(item: &Bound<'_, PyAny>) -> PyErr {
    let ty = item
        .get_type()
        .name()
        .map_or_else(|_| "?".to_string(), |n| n.to_string());
    PyTypeError::new_err(format!("tags must be str, got {ty}"))
}

/// Tag ids of one query, on the stack for the usual handful.
pub(crate) struct Ids {
    stack: [u32; 32],
    len: usize,
    heap: Vec<u32>,
}

impl Ids {
    #[inline]
    pub(crate) fn new() -> Self {
        Self {
            stack: [0; 32],
            len: 0,
            heap: Vec::new(),
        }
    }

    #[inline]
    pub(crate) fn push(&mut self, id: u32) {
        if self.len < self.stack.len() {
            self.stack[self.len] = id;
            self.len += 1;
        } else {
            if self.heap.is_empty() {
                self.heap.extend_from_slice(&self.stack);
            }
            self.heap.push(id);
        }
    }

    #[inline]
    pub(crate) fn as_slice(&self) -> &[u32] {
        if self.heap.is_empty() {
            &self.stack[..self.len]
        } else {
            &self.heap
        }
    }
}

// ==== Batches ====

/// A borrowed UTF-8 slice of a Python str, usable while detached.
pub(crate) struct RawStr {
    ptr: *const u8,
    len: usize,
}

// SAFETY: a RawStr is only built by `Flat`, which holds a strong reference to the str object
// that owns the bytes for as long as the RawStr exists. CPython never moves or mutates a str's
// cached UTF-8 buffer while the object lives, so reading it from another thread is sound.
unsafe impl Send for RawStr {}
unsafe impl Sync for RawStr {}

impl AsRef<str> for RawStr {
    #[inline]
    fn as_ref(&self) -> &str {
        // SAFETY: see the Send impl; the bytes came from a valid &str.
        unsafe { std::str::from_utf8_unchecked(std::slice::from_raw_parts(self.ptr, self.len)) }
    }
}

/// Many queries' tags, flattened: query i is `strs[offsets[i]..offsets[i + 1]]`.
pub(crate) struct Flat<'py> {
    /// Keeps every str the slices point into alive (see `RawStr`).
    keep: Vec<Bound<'py, PyAny>>,
    pub(crate) strs: Vec<RawStr>,
    pub(crate) offsets: Vec<usize>,
}

impl<'py> Flat<'py> {
    pub(crate) fn n_queries(&self) -> usize {
        self.offsets.len() - 1
    }

    fn with_capacity(n: usize) -> Self {
        let mut offsets = Vec::with_capacity(n + 1);
        offsets.push(0);
        Self {
            keep: Vec::with_capacity(n * 5),
            strs: Vec::with_capacity(n * 5),
            offsets,
        }
    }

    fn push_str(&mut self, s: &str) {
        self.strs.push(RawStr {
            ptr: s.as_ptr(),
            len: s.len(),
        });
    }

    fn end_query(&mut self) {
        self.offsets.push(self.strs.len());
    }

    /// Flattens a list of tag lists.
    pub(crate) fn from_tag_lists(batch: &Bound<'py, PyAny>) -> PyResult<Self> {
        let mut flat = Self::with_capacity(batch.len().unwrap_or(0));
        for_each_query(batch, |tags| {
            for_each_tag(&tags, |item| {
                flat.push_str(tag_str(&item)?);
                flat.keep.push(item);
                Ok(())
            })?;
            flat.end_query();
            Ok(())
        })?;
        Ok(flat)
    }

    /// Flattens a list of raw generator outputs ("a, b, c"), splitting each in place.
    pub(crate) fn from_tag_strings(batch: &Bound<'py, PyAny>) -> PyResult<Self> {
        let mut flat = Self::with_capacity(batch.len().unwrap_or(0));
        for_each_query(batch, |raw| {
            for t in split_tags(tag_str(&raw)?) {
                flat.push_str(t);
            }
            flat.keep.push(raw);
            flat.end_query();
            Ok(())
        })?;
        Ok(flat)
    }
}

fn for_each_query<'py>(
    batch: &Bound<'py, PyAny>,
    mut f: impl FnMut(Bound<'py, PyAny>) -> PyResult<()>,
) -> PyResult<()> {
    if let Ok(list) = batch.cast::<PyList>() {
        for q in list.iter() {
            f(q)?;
        }
    } else if let Ok(tuple) = batch.cast::<PyTuple>() {
        for q in tuple.iter() {
            f(q)?;
        }
    } else if batch.cast::<PyString>().is_ok() {
        return Err(PyTypeError::new_err(
            "expected a list of queries, got a single str",
        ));
    } else {
        for q in batch.try_iter()? {
            f(q?)?;
        }
    }
    Ok(())
}
