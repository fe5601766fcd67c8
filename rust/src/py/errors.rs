//! Exceptions, the `RouterError -> PyErr` mapping, and the one helper every heavy method goes
//! through (`run`).

use pyo3::create_exception;
use pyo3::exceptions::{
    PyException, PyFileExistsError, PyFileNotFoundError, PyIsADirectoryError, PyOSError,
    PyPermissionError, PyValueError,
};
use pyo3::prelude::*;

use crate::error::RouterError;

create_exception!(
    tagrouter_fast,
    TagRouterError,
    PyException,
    "Base class of the errors tagrouter_fast raises about stores, models and tags."
);
create_exception!(
    tagrouter_fast,
    UnknownModelError,
    TagRouterError,
    "A model name that the store (or the decider's candidate set) does not know."
);
create_exception!(
    tagrouter_fast,
    NoCandidateError,
    TagRouterError,
    "A decision restricted to a set of candidates (`among=`) that holds none."
);
create_exception!(
    tagrouter_fast,
    UnknownTagError,
    TagRouterError,
    "A tag the store does not know."
);
create_exception!(
    tagrouter_fast,
    InconsistentRecordsError,
    TagRouterError,
    "Records or stores that contradict each other (e.g. one query with two tag sets)."
);
create_exception!(
    tagrouter_fast,
    StoreFormatError,
    TagRouterError,
    "A store file that is not a store, of another format version, truncated or corrupt."
);

impl From<RouterError> for PyErr {
    fn from(e: RouterError) -> Self {
        let msg = e.to_string();
        match e {
            RouterError::InvalidArgument(_) => PyValueError::new_err(msg),
            RouterError::UnknownModel { .. } => UnknownModelError::new_err(msg),
            RouterError::NoCandidate(_) => NoCandidateError::new_err(msg),
            RouterError::UnknownTag(_) => UnknownTagError::new_err(msg),
            RouterError::Inconsistent(_) => InconsistentRecordsError::new_err(msg),
            RouterError::StoreFormat { .. } => StoreFormatError::new_err(msg),
            RouterError::Io { path, source } => {
                // OSError(errno, strerror, filename), like open() raises.
                let args = (
                    source.raw_os_error().unwrap_or(0),
                    source.to_string(),
                    path.to_string_lossy().into_owned(),
                );
                match source.kind() {
                    std::io::ErrorKind::NotFound => PyFileNotFoundError::new_err(args),
                    std::io::ErrorKind::PermissionDenied => PyPermissionError::new_err(args),
                    std::io::ErrorKind::AlreadyExists => PyFileExistsError::new_err(args),
                    _ if source.raw_os_error() == Some(21) => PyIsADirectoryError::new_err(args),
                    _ => PyOSError::new_err(args),
                }
            }
        }
    }
}

/// Runs core work detached from the interpreter (other Python threads run meanwhile) and maps
/// its error. Only for work well above the ~100 ns that detaching and re-attaching cost.
pub(crate) fn run<T, F>(py: Python<'_>, f: F) -> PyResult<T>
where
    F: FnOnce() -> Result<T, RouterError> + Send,
    T: Send,
{
    py.detach(f).map_err(PyErr::from)
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("TagRouterError", py.get_type::<TagRouterError>())?;
    m.add("UnknownModelError", py.get_type::<UnknownModelError>())?;
    m.add("NoCandidateError", py.get_type::<NoCandidateError>())?;
    m.add("UnknownTagError", py.get_type::<UnknownTagError>())?;
    m.add(
        "InconsistentRecordsError",
        py.get_type::<InconsistentRecordsError>(),
    )?;
    m.add("StoreFormatError", py.get_type::<StoreFormatError>())?;
    Ok(())
}
