use pyo3::prelude::*;

#[pymodule(gil_used = false)]
#[pyo3(name = "_core")]
mod py_module {
    use pyo3::prelude::*;

    #[pymodule_init]
    fn init(m: &Bound<'_, PyModule>) -> PyResult<()> {
        m.add("__version__", env!("CARGO_PKG_VERSION"))?;
        m.add("build_profile", env!("PROFILE"))?;
        Ok(())
    }
}
