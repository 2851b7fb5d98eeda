//! Python bindings of `inplace` (the merge search's in-memory merges): buffer checks, GIL release
//! and error mapping only. Buffers are anything with the buffer protocol (numpy arrays, e.g.
//! `tensor.numpy()` of a CPU tensor): C-contiguous, float32 (keys: uint32), the output writable
//! and not overlapping an input.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};

use pyo3::buffer::{Element, PyBuffer};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::inplace::{self, Method, Source, Spec};
use crate::safetensors::Dtype;

pyo3::import_exception!(finrecipe.errors, FinrecipeError);

/// (address, element count) of a checked buffer.
struct Raw {
    addr: usize,
    len: usize,
}

fn raw<T: Element>(
    obj: &Bound<'_, PyAny>,
    what: &str,
    writable: bool,
) -> PyResult<(PyBuffer<T>, Raw)> {
    let b = PyBuffer::<T>::get(obj).map_err(|e| {
        PyValueError::new_err(format!(
            "{what}: not a buffer of the expected element type ({e})"
        ))
    })?;
    if !b.is_c_contiguous() {
        return Err(PyValueError::new_err(format!(
            "{what}: buffer is not C-contiguous"
        )));
    }
    if writable && b.readonly() {
        return Err(PyValueError::new_err(format!(
            "{what}: buffer is read-only"
        )));
    }
    let r = Raw {
        addr: b.buf_ptr() as usize,
        len: b.item_count(),
    };
    Ok((b, r))
}

/// One tensor of `load_task_vectors`: the base's output, then (delta, keys) outputs per model.
type VectorJob = (Raw, Vec<(Raw, Option<Raw>)>);

fn overlaps(a: &Raw, b: &Raw, size: usize) -> bool {
    a.len > 0 && b.len > 0 && a.addr < b.addr + b.len * size && b.addr < a.addr + a.len * 4
}

fn guarded<T>(py: Python<'_>, work: impl FnOnce() -> T + Send) -> PyResult<T>
where
    T: Send,
{
    py.allow_threads(|| catch_unwind(AssertUnwindSafe(work)))
        .map_err(|p| {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            FinrecipeError::new_err(format!(
                "internal error in finrecipe's Rust core (please report): {msg}"
            ))
        })
}

/// Sorts the magnitude keys of each `deltas[i]` (float32) ascending into `outs[i]` (uint32).
#[pyfunction]
#[pyo3(signature = (deltas, outs, threads=0))]
fn sort_magnitudes(
    py: Python<'_>,
    deltas: Vec<Bound<'_, PyAny>>,
    outs: Vec<Bound<'_, PyAny>>,
    threads: usize,
) -> PyResult<()> {
    if deltas.len() != outs.len() {
        return Err(PyValueError::new_err(
            "sort_magnitudes: as many outputs as task vectors",
        ));
    }
    let mut keep = Vec::new();
    let mut jobs: Vec<(Raw, Raw)> = Vec::new();
    for (i, (d, o)) in deltas.iter().zip(&outs).enumerate() {
        let (bd, rd) = raw::<f32>(d, &format!("deltas[{i}]"), false)?;
        let (bo, ro) = raw::<u32>(o, &format!("outs[{i}]"), true)?;
        if rd.len != ro.len {
            return Err(PyValueError::new_err(format!(
                "sort_magnitudes: outs[{i}] has {} elements, deltas[{i}] {}",
                ro.len, rd.len
            )));
        }
        if overlaps(&ro, &rd, 4) {
            return Err(PyValueError::new_err(format!(
                "sort_magnitudes: outs[{i}] overlaps deltas[{i}]"
            )));
        }
        keep.push((bd, bo));
        jobs.push((rd, ro));
    }
    let n = match threads {
        0 => std::thread::available_parallelism().map_or(1, |x| x.get()),
        t => t,
    }
    .clamp(1, jobs.len().max(1));
    let next = AtomicUsize::new(0);
    guarded(py, || {
        std::thread::scope(|s| {
            for _ in 0..n {
                s.spawn(|| loop {
                    let j = next.fetch_add(1, Ordering::Relaxed);
                    let Some((d, o)) = jobs.get(j) else { break };
                    // SAFETY: both buffers are held (exported) by `keep` for the whole call,
                    // C-contiguous with these lengths; `o` is writable and overlaps no input.
                    let d = unsafe { std::slice::from_raw_parts(d.addr as *const f32, d.len) };
                    let o = unsafe { std::slice::from_raw_parts_mut(o.addr as *mut u32, o.len) };
                    inplace::sort_keys(d, o);
                });
            }
        })
    })?;
    drop(keep);
    Ok(())
}

/// Merges base + task vectors into `out` (see `inplace::merge_into`). `densities` and
/// `sorted_keys` (from `sort_magnitudes`; None where the density is ≥ 1) are TIES's.
#[pyfunction]
#[pyo3(signature = (method, out, base, deltas, weights, normalize, lambda_, out_dtype, densities=None, sorted_keys=None, threads=0))]
#[allow(clippy::too_many_arguments)]
fn merge_into(
    py: Python<'_>,
    method: &str,
    out: Bound<'_, PyAny>,
    base: Bound<'_, PyAny>,
    deltas: Vec<Bound<'_, PyAny>>,
    weights: Vec<f32>,
    normalize: bool,
    lambda_: f32,
    out_dtype: &str,
    densities: Option<Vec<f64>>,
    sorted_keys: Option<Vec<Option<Bound<'_, PyAny>>>>,
    threads: usize,
) -> PyResult<()> {
    let method = match method {
        "task_arithmetic" => Method::TaskArithmetic,
        "ties" => Method::Ties,
        m => {
            return Err(PyValueError::new_err(format!(
                "merge_into: method {m:?} is not task_arithmetic or ties"
            )))
        }
    };
    let out_dtype = match out_dtype {
        "F32" => Dtype::F32,
        "BF16" => Dtype::BF16,
        "F16" => Dtype::F16,
        d => {
            return Err(PyValueError::new_err(format!(
                "merge_into: output dtype {d:?} is not F32, BF16 or F16"
            )))
        }
    };
    let k = deltas.len();
    if k == 0 || weights.len() != k {
        return Err(PyValueError::new_err(
            "merge_into: one weight per task vector, at least one",
        ));
    }
    let (bo, ro) = raw::<f32>(&out, "out", true)?;
    let (bb, rb) = raw::<f32>(&base, "base", false)?;
    let n = rb.len;
    let mut held = Vec::new();
    let mut rd = Vec::new();
    for (i, d) in deltas.iter().enumerate() {
        let (b, r) = raw::<f32>(d, &format!("deltas[{i}]"), false)?;
        held.push(b);
        rd.push(r);
    }
    let mut keys_held = Vec::new();
    let mut rk: Vec<Option<Raw>> = Vec::new();
    let dens: Vec<f64> = match (method, densities) {
        (Method::TaskArithmetic, None) => vec![1.0; k],
        (Method::TaskArithmetic, Some(_)) => {
            return Err(PyValueError::new_err(
                "merge_into: task_arithmetic has no densities",
            ))
        }
        (Method::Ties, Some(d)) if d.len() == k => d,
        (Method::Ties, _) => {
            return Err(PyValueError::new_err(
                "merge_into: ties needs one density per task vector",
            ))
        }
    };
    let sk = sorted_keys.unwrap_or_default();
    for (i, &d) in dens.iter().enumerate() {
        if d.is_nan() {
            return Err(PyValueError::new_err(format!(
                "merge_into: densities[{i}] is NaN"
            )));
        }
        match sk.get(i).and_then(|x| x.as_ref()) {
            Some(obj) => {
                let (b, r) = raw::<u32>(obj, &format!("sorted_keys[{i}]"), false)?;
                if r.len != n {
                    return Err(PyValueError::new_err(format!(
                        "merge_into: sorted_keys[{i}] has {} elements, base {n}",
                        r.len
                    )));
                }
                keys_held.push(b);
                rk.push(Some(r));
            }
            None if d < 1.0 => {
                return Err(PyValueError::new_err(format!(
                    "merge_into: density {d} < 1 needs sorted_keys[{i}]"
                )))
            }
            None => rk.push(None),
        }
    }
    if ro.len != n {
        return Err(PyValueError::new_err(format!(
            "merge_into: out has {} elements, base {n}",
            ro.len
        )));
    }
    for (i, r) in rd.iter().enumerate() {
        if r.len != n {
            return Err(PyValueError::new_err(format!(
                "merge_into: deltas[{i}] has {} elements, base {n}",
                r.len
            )));
        }
        if overlaps(&ro, r, 4) {
            return Err(PyValueError::new_err(format!(
                "merge_into: out overlaps deltas[{i}]"
            )));
        }
    }
    if overlaps(&ro, &rb, 4) {
        return Err(PyValueError::new_err("merge_into: out overlaps base"));
    }
    for (i, r) in rk.iter().enumerate() {
        if let Some(r) = r {
            if overlaps(&ro, r, 4) {
                return Err(PyValueError::new_err(format!(
                    "merge_into: out overlaps sorted_keys[{i}]"
                )));
            }
        }
    }
    let spec = Spec {
        method,
        normalize,
        lambda: lambda_,
        out_dtype,
    };
    guarded(py, || {
        // SAFETY: every buffer is held (exported) by bo/bb/held/keys_held for the whole call,
        // C-contiguous with the checked lengths; `out` is writable and overlaps no input.
        let base = unsafe { std::slice::from_raw_parts(rb.addr as *const f32, n) };
        let out = unsafe { std::slice::from_raw_parts_mut(ro.addr as *mut f32, n) };
        let srcs: Vec<Source> = rd
            .iter()
            .zip(&weights)
            .zip(&rk)
            .zip(&dens)
            .map(|(((r, &w), keys), &d)| {
                let delta = unsafe { std::slice::from_raw_parts(r.addr as *const f32, n) };
                let keep = match (method, keys, inplace::ties_keep(d, n)) {
                    (Method::Ties, Some(kr), Some(count)) => {
                        let asc = unsafe { std::slice::from_raw_parts(kr.addr as *const u32, n) };
                        Some(inplace::bound_sorted(asc, delta, count))
                    }
                    _ => None,
                };
                Source {
                    delta,
                    weight: w,
                    keep,
                }
            })
            .collect();
        inplace::merge_into(&spec, base, &srcs, out, threads);
    })?;
    drop((bo, bb, held, keys_held));
    Ok(())
}

/// Reads θ_b into `base_out[i]` and δ_m = θ_m − θ_b into `delta_out[m][i]` (float32) for each
/// tensor `names[i]` and model directory `model_dirs[m]`, sorting δ's magnitude keys into
/// `keys_out[m][i]` where one is given; tensors in parallel on `threads` threads, GIL released.
#[pyfunction]
#[pyo3(signature = (base_dir, model_dirs, names, base_out, delta_out, keys_out=None, threads=0))]
#[allow(clippy::too_many_arguments)]
fn load_task_vectors(
    py: Python<'_>,
    base_dir: std::path::PathBuf,
    model_dirs: Vec<std::path::PathBuf>,
    names: Vec<String>,
    base_out: Vec<Bound<'_, PyAny>>,
    delta_out: Vec<Vec<Bound<'_, PyAny>>>,
    keys_out: Option<Vec<Vec<Option<Bound<'_, PyAny>>>>>,
    threads: usize,
) -> PyResult<()> {
    let nm = model_dirs.len();
    let nt = names.len();
    let keys_out =
        keys_out.unwrap_or_else(|| (0..nm).map(|_| (0..nt).map(|_| None).collect()).collect());
    if base_out.len() != nt
        || delta_out.len() != nm
        || keys_out.len() != nm
        || delta_out.iter().any(|v| v.len() != nt)
        || keys_out.iter().any(|v| v.len() != nt)
    {
        return Err(PyValueError::new_err(
            "load_task_vectors: base_out per name, delta_out and keys_out per model and name",
        ));
    }
    let mut held_f = Vec::new();
    let mut held_k = Vec::new();
    let mut jobs: Vec<VectorJob> = Vec::with_capacity(nt);
    let mut outs: Vec<(usize, usize)> = Vec::new(); // every written range, for the overlap check
    for i in 0..nt {
        let (b, rb) = raw::<f32>(&base_out[i], &format!("base_out[{i}]"), true)?;
        held_f.push(b);
        outs.push((rb.addr, rb.len * 4));
        let mut per = Vec::with_capacity(nm);
        for m in 0..nm {
            let (b, rd) = raw::<f32>(&delta_out[m][i], &format!("delta_out[{m}][{i}]"), true)?;
            held_f.push(b);
            if rd.len != rb.len {
                return Err(PyValueError::new_err(format!(
                    "load_task_vectors: delta_out[{m}][{i}] has {} elements, base_out[{i}] {}",
                    rd.len, rb.len
                )));
            }
            outs.push((rd.addr, rd.len * 4));
            let rk = match &keys_out[m][i] {
                Some(o) => {
                    let (b, rk) = raw::<u32>(o, &format!("keys_out[{m}][{i}]"), true)?;
                    held_k.push(b);
                    if rk.len != rb.len {
                        return Err(PyValueError::new_err(format!("load_task_vectors: keys_out[{m}][{i}] has {} elements, base_out[{i}] {}", rk.len, rb.len)));
                    }
                    outs.push((rk.addr, rk.len * 4));
                    Some(rk)
                }
                None => None,
            };
            per.push((rd, rk));
        }
        jobs.push((rb, per));
    }
    outs.retain(|&(_, n)| n > 0);
    outs.sort_unstable();
    if outs.windows(2).any(|w| w[0].0 + w[0].1 > w[1].0) {
        return Err(PyValueError::new_err(
            "load_task_vectors: output buffers overlap",
        ));
    }
    let base = crate::safetensors::read::Model::open(&base_dir)?;
    let models: Vec<_> = model_dirs
        .iter()
        .map(crate::safetensors::read::Model::open)
        .collect::<crate::Result<_>>()?;
    let n = match threads {
        0 => std::thread::available_parallelism().map_or(1, |x| x.get()),
        t => t,
    }
    .clamp(1, nt.max(1));
    let next = AtomicUsize::new(0);
    let first_err: std::sync::Mutex<Option<crate::Error>> = std::sync::Mutex::new(None);
    guarded(py, || {
        std::thread::scope(|s| {
            for _ in 0..n {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((rb, per)) = jobs.get(i) else { break };
                    // SAFETY: every buffer is held (exported) by held_f/held_k for the whole call,
                    // C-contiguous with the checked lengths, writable, and no two overlap.
                    let b = unsafe { std::slice::from_raw_parts_mut(rb.addr as *mut f32, rb.len) };
                    for ((rd, rk), model) in per.iter().zip(&models) {
                        let d =
                            unsafe { std::slice::from_raw_parts_mut(rd.addr as *mut f32, rd.len) };
                        if let Err(e) = inplace::task_vector(&base, model, &names[i], b, d) {
                            if let Ok(mut g) = first_err.lock() {
                                g.get_or_insert(e);
                            }
                            return;
                        }
                        if let Some(rk) = rk {
                            let k = unsafe {
                                std::slice::from_raw_parts_mut(rk.addr as *mut u32, rk.len)
                            };
                            inplace::sort_keys(d, k);
                        }
                    }
                });
            }
        })
    })?;
    drop((held_f, held_k));
    match first_err.into_inner().ok().flatten() {
        Some(e) => Err(e.into()),
        None => Ok(()),
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(sort_magnitudes, m)?)?;
    m.add_function(wrap_pyfunction!(merge_into, m)?)?;
    m.add_function(wrap_pyfunction!(load_task_vectors, m)?)?;
    Ok(())
}
