//! PyO3 glue only: the `_core` extension module. Core logic lives in the parent modules.

// PyO3 extracts arguments by value (PathBuf, readonly arrays); taking them by reference is not an
// option for #[pymethods].
#![allow(clippy::needless_pass_by_value)]

mod among;
mod decider;
mod errors;
mod input;
mod scorer;

use pyo3::prelude::*;

#[pymodule(gil_used = false)]
#[pyo3(name = "_core")]
mod py_module {
    use pyo3::prelude::*;

    #[pymodule_export]
    use super::decider::{
        py_split_tags, sweep_curve, sweep_routes, theta_for_share_routes, weighted_areas,
        PyDecider, PyDecision,
    };
    #[pymodule_export]
    use super::scorer::PyStore;

    #[pymodule_init]
    fn init(m: &Bound<'_, PyModule>) -> PyResult<()> {
        m.add("__version__", env!("CARGO_PKG_VERSION"))?;
        m.add("build_profile", env!("PROFILE"))?;
        m.add("STORE_FORMAT_VERSION", crate::store_io::FORMAT_VERSION)?;
        super::errors::register(m)?;
        Ok(())
    }
}
