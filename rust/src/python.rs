//! The `finrecipe._core` extension module: argument conversion, GIL release and error mapping only.
//!
//! Every long call goes through [`run_watched`]: the work runs on its own thread with the GIL
//! released while the calling thread wakes every 100 ms to report progress to a Python callable
//! and to check for signals; an exception there (KeyboardInterrupt on Ctrl-C) sets the cancel
//! flag, the workers stop at their next chunk, partial outputs are removed and the exception is
//! re-raised. Panics become `FinrecipeError`.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::Duration;

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use crate::error::Error;
use crate::merge::Control;

pyo3::import_exception!(finrecipe.errors, FinrecipeError);
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
            Error::Internal(_) => FinrecipeError::new_err(msg),
        }
    }
}

fn json_to_py<'py>(py: Python<'py>, v: &serde_json::Value) -> PyResult<Bound<'py, PyAny>> {
    use serde_json::Value;
    Ok(match v {
        Value::Null => py.None().into_bound(py),
        Value::Bool(b) => b.into_pyobject(py)?.to_owned().into_any(),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                i.into_pyobject(py)?.into_any()
            } else if let Some(u) = n.as_u64() {
                u.into_pyobject(py)?.into_any()
            } else {
                n.as_f64().unwrap_or(f64::NAN).into_pyobject(py)?.into_any()
            }
        }
        Value::String(s) => s.into_pyobject(py)?.into_any(),
        Value::Array(a) => {
            let items: Vec<Bound<'py, PyAny>> = a
                .iter()
                .map(|x| json_to_py(py, x))
                .collect::<PyResult<_>>()?;
            PyList::new(py, items)?.into_any()
        }
        Value::Object(o) => {
            let d = PyDict::new(py);
            for (k, x) in o {
                d.set_item(k, json_to_py(py, x)?)?;
            }
            d.into_any()
        }
    })
}

/// The last panic's message with its location, recorded by our panic hook (which replaces the
/// default one so that nothing is printed to the user's terminal; the error carries the text).
static LAST_PANIC: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        if let Ok(mut last) = LAST_PANIC.lock() {
            *last = Some(info.to_string());
        }
    }));
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    if let Some(msg) = LAST_PANIC.lock().ok().and_then(|mut l| l.take()) {
        return msg;
    }
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_string()
    }
}

/// Runs `work` with the GIL released, reporting progress and watching for signals.
fn run_watched<T: Send>(
    py: Python<'_>,
    ctl: &Control,
    progress: Option<&PyObject>,
    work: impl FnOnce() -> crate::Result<T> + Send,
) -> PyResult<T> {
    let mut py_err: Option<PyErr> = None;
    let result = py.allow_threads(|| {
        std::thread::scope(|scope| {
            let (tx, rx) = mpsc::channel::<()>();
            let h = scope.spawn(move || {
                let r = catch_unwind(AssertUnwindSafe(work));
                let _ = tx.send(());
                r
            });
            loop {
                match rx.recv_timeout(Duration::from_millis(100)) {
                    Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                }
                if py_err.is_some() {
                    continue;
                }
                Python::with_gil(|py| {
                    let r = match progress {
                        Some(cb) => cb
                            .call1(
                                py,
                                (
                                    ctl.done.load(Ordering::Relaxed),
                                    ctl.total.load(Ordering::Relaxed),
                                ),
                            )
                            .map(|_| ()),
                        None => Ok(()),
                    };
                    if let Err(e) = r.and_then(|_| py.check_signals()) {
                        py_err = Some(e);
                        ctl.cancel.store(true, Ordering::Relaxed);
                    }
                });
            }
            h.join().unwrap_or_else(Err)
        })
    });
    let result = match result {
        Ok(r) => r,
        Err(p) => {
            return Err(FinrecipeError::new_err(format!(
                "internal error in finrecipe's Rust core (please report): {}",
                panic_message(p)
            )))
        }
    };
    if let Some(e) = py_err {
        return Err(e);
    }
    let v = result?;
    if let Some(cb) = progress {
        let (d, t) = (
            ctl.done.load(Ordering::Relaxed),
            ctl.total.load(Ordering::Relaxed),
        );
        // An exception from the last report (Ctrl-C just as the work finished) still cancels:
        // the caller sees the exception, so the outputs must go too.
        if let Err(e) = cb.call1(py, (d, t)).and_then(|_| py.check_signals()) {
            ctl.cancel.store(true, Ordering::Relaxed);
            return Err(e);
        }
    }
    Ok(v)
}

/// Validates and describes a model directory or a single safetensors file.
#[pyfunction]
fn read_model(py: Python<'_>, path: std::path::PathBuf) -> PyResult<PyObject> {
    let v = py.allow_threads(|| {
        catch_unwind(AssertUnwindSafe(|| {
            crate::safetensors::read::Model::open(&path).map(|m| m.describe())
        }))
    });
    let v = match v {
        Ok(r) => r?,
        Err(p) => {
            return Err(FinrecipeError::new_err(format!(
                "internal error in finrecipe's Rust core (please report): {}",
                panic_message(p)
            )))
        }
    };
    Ok(json_to_py(py, &v)?.unbind())
}

/// Executes a merge plan (docs/merge-plan.md).
#[pyfunction]
#[pyo3(signature = (plan_json, progress=None))]
fn merge(py: Python<'_>, plan_json: &str, progress: Option<PyObject>) -> PyResult<PyObject> {
    let ctl = Control::default();
    let out_dir: Option<String> = serde_json::from_str::<serde_json::Value>(plan_json)
        .ok()
        .and_then(|v| v.get("out_dir").and_then(|x| x.as_str()).map(String::from));
    let r = run_watched(py, &ctl, progress.as_ref(), || {
        crate::merge::run_merge(plan_json, &ctl).map(|s| serde_json::to_value(s).expect("summary"))
    });
    match r {
        Ok(v) => Ok(json_to_py(py, &v)?.unbind()),
        Err(e) => {
            // A cancellation that arrived after the last chunk: remove the finished files too.
            if let (true, Some(dir)) = (ctl.cancel.load(Ordering::Relaxed), out_dir) {
                if let Ok(rd) = std::fs::read_dir(&dir) {
                    for entry in rd.flatten() {
                        let n = entry.file_name().to_string_lossy().into_owned();
                        if n.starts_with("model")
                            && (n.ends_with(".safetensors") || n.ends_with(".index.json"))
                        {
                            let _ = std::fs::remove_file(entry.path());
                        }
                    }
                }
            }
            Err(e)
        }
    }
}

/// Renames `src` to `dst` unless `dst` exists (atomically; see fsutil.rs). Raises
/// FileExistsError when it does, IoError for other failures.
#[pyfunction]
fn rename_noreplace(src: std::path::PathBuf, dst: std::path::PathBuf) -> PyResult<()> {
    match crate::fsutil::rename_noreplace(&src, &dst) {
        Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::AlreadyExists => {
            Err(pyo3::exceptions::PyFileExistsError::new_err(format!(
                "{}: already exists",
                dst.display()
            )))
        }
        other => Ok(other?),
    }
}

/// The kernels this core implements, with their inputs and parameters (see merge/plan.rs).
#[pyfunction]
fn kernels(py: Python<'_>) -> PyResult<PyObject> {
    Ok(json_to_py(py, &crate::merge::plan::kernels_json())?.unbind())
}

/// Task-vector statistics (Gram matrices of δ_i = θ_i − θ_base per tensor); see analyze.rs.
#[pyfunction]
#[pyo3(signature = (plan_json, progress=None))]
fn analyze(py: Python<'_>, plan_json: &str, progress: Option<PyObject>) -> PyResult<PyObject> {
    let ctl = Control::default();
    let v = run_watched(py, &ctl, progress.as_ref(), || {
        crate::analyze::run_analyze(plan_json, &ctl)
    })?;
    Ok(json_to_py(py, &v)?.unbind())
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    install_panic_hook();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(read_model, m)?)?;
    m.add_function(wrap_pyfunction!(merge, m)?)?;
    m.add_function(wrap_pyfunction!(analyze, m)?)?;
    m.add_function(wrap_pyfunction!(kernels, m)?)?;
    m.add_function(wrap_pyfunction!(rename_noreplace, m)?)?;
    crate::inplace_py::register(m)?;
    m.add("PLAN_VERSION", crate::merge::plan::PLAN_VERSION)?;
    Ok(())
}
