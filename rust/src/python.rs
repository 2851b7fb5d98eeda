//! The `finrecipe._core` extension module: argument conversion, GIL release and error mapping only.

use pyo3::prelude::*;

use crate::error::Error;

pyo3::import_exception!(finrecipe.errors, FormatError);
pyo3::import_exception!(finrecipe.errors, ConfigError);
pyo3::import_exception!(finrecipe.errors, MismatchError);
pyo3::import_exception!(finrecipe.errors, IoError);

impl From<Error> for PyErr {
    fn from(e: Error) -> PyErr {
        let msg = e.to_string();
        match e {
            Error::Format { .. } => FormatError::new_err(msg),
            Error::Config(_) => ConfigError::new_err(msg),
            Error::Mismatch(_) => MismatchError::new_err(msg),
            Error::Io { .. } => IoError::new_err(msg),
            Error::Cancelled => pyo3::exceptions::PyKeyboardInterrupt::new_err(msg),
        }
    }
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
