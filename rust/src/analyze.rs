//! Task-vector statistics, streamed over memory-mapped checkpoints.
//!
//! Plan (JSON): `{"models": [dir, ...], "threads": n, "chunk_elems": n, "tensors": [{"name": s,
//! "base": {"model": i, "tensor": s}, "vectors": [{"model": i, "tensor": s}, ...]}]}`.
//! For every tensor, δ_i = θ_i − θ_base (f32, accumulated in f64) and the Gram matrix
//! G[i][j] = ⟨δ_i, δ_j⟩ (diagonal: squared norms). Result:
//! `{"tensors": {name: {"gram": [[f64]], "numel": int}}, "total": {"gram": [[f64]], "numel": int},
//!   "seconds": f64}` where `total` sums every tensor's Gram matrix (the whole-model task vectors).
//! Cosines are G[i][j] / sqrt(G[i][i]·G[j][j]); Python computes them.

use std::time::Instant;

use serde::Deserialize;

use crate::dtype::is_float;
use crate::error::{Error, Result};
use crate::merge::kernels::dot;
use crate::merge::plan::{Job, Kernel, Ref, SrcRef};
use crate::merge::{open_models, Control, Ctx};
use crate::safetensors::read::Model;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AnalyzePlan {
    models: Vec<String>,
    #[serde(default)]
    threads: usize,
    chunk_elems: usize,
    tensors: Vec<AnalyzeTensor>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AnalyzeTensor {
    name: String,
    base: Ref,
    vectors: Vec<Ref>,
}

fn resolve(models: &[Model], r: &Ref, where_: &str) -> Result<SrcRef> {
    let model = models.get(r.model).ok_or_else(|| {
        Error::Config(format!(
            "{where_}: model index {} is out of range ({} models)",
            r.model,
            models.len()
        ))
    })?;
    let ti = model.index_of(&r.tensor).ok_or_else(|| {
        Error::Mismatch(format!(
            "{where_}: model {} has no tensor '{}'",
            model.path.display(),
            r.tensor
        ))
    })?;
    let mut sr = SrcRef {
        model: r.model,
        tensor: ti,
        scale: None,
    };
    crate::merge::plan::attach_scale(models, &mut sr, &r.scale, where_)?;
    let info = &model.tensors[ti];
    if !is_float(info.dtype) && sr.scale.is_none() {
        return Err(Error::Mismatch(format!(
            "{where_}: tensor '{}' of {} is {}, not BF16/F16/F32 (or F8_E4M3 with block scales)",
            r.tensor,
            model.path.display(),
            info.dtype
        )));
    }
    Ok(sr)
}

/// Runs an analysis plan; returns the JSON result described in the module docs.
pub fn run_analyze(plan_json: &str, ctl: &Control) -> Result<serde_json::Value> {
    let t0 = Instant::now();
    let plan: AnalyzePlan = serde_json::from_str(plan_json).map_err(|e| {
        Error::Config(format!(
            "invalid analysis plan (line {}, column {}): {e}",
            e.line(),
            e.column()
        ))
    })?;
    if plan.chunk_elems == 0 {
        return Err(Error::Config(
            "analysis plan: chunk_elems must be at least 1".into(),
        ));
    }
    crate::merge::plan::check_threads(plan.threads, "analysis plan")?;
    let models = open_models(&plan.models)?;
    let threads = if plan.threads == 0 {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    } else {
        plan.threads
    };
    let mut jobs = Vec::new();
    let mut nvec = None;
    for (k, t) in plan.tensors.iter().enumerate() {
        let where_ = format!("analysis tensors[{k}] ('{}')", t.name);
        if t.vectors.is_empty() {
            return Err(Error::Config(format!("{where_}: no vectors")));
        }
        if *nvec.get_or_insert(t.vectors.len()) != t.vectors.len() {
            return Err(Error::Config(format!(
                "{where_}: every tensor must list the same number of vectors"
            )));
        }
        let base = resolve(&models, &t.base, &format!("{where_} base"))?;
        let bshape = models[base.model].tensors[base.tensor].shape.clone();
        let mut sources = Vec::new();
        for (i, v) in t.vectors.iter().enumerate() {
            let s = resolve(&models, v, &format!("{where_} vectors[{i}]"))?;
            let shape = &models[s.model].tensors[s.tensor].shape;
            if *shape != bshape {
                return Err(Error::Mismatch(format!(
                    "{where_} vectors[{i}]: shape {shape:?} differs from the base's {bshape:?}"
                )));
            }
            sources.push(s);
        }
        let numel = bshape.iter().product();
        let n = sources.len();
        jobs.push(Job {
            name: t.name.clone(),
            kernel: Kernel::TaskArithmetic,
            out_dtype: crate::safetensors::Dtype::F32,
            shape: bshape,
            numel,
            base: Some(base),
            sources,
            weights: vec![1.0; n],
            densities: vec![],
            gammas: vec![],
            epsilons: vec![],
            lambda: 1.0,
            normalize: false,
            rescale: false,
            t: 0.0,
            filter_wise: false,
            scale: 1.0,
            bf16_compute: false,
            nums: Default::default(),
            copy: false,
            nbytes: 0,
            out_block: None,
            out_slot: 0,
            scale_slot: 0,
            scale_name: String::new(),
        });
    }
    let total_bytes: u64 = jobs
        .iter()
        .map(|j| (j.numel * (1 + j.sources.len()) * 4) as u64)
        .sum();
    ctl.total
        .store(total_bytes, std::sync::atomic::Ordering::Relaxed);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| Error::Internal(format!("cannot start {threads} threads: {e}")))?;
    let n = nvec.unwrap_or(0);
    let mut tensors = serde_json::Map::new();
    let mut total = vec![0f64; n * n];
    let mut total_numel = 0usize;
    pool.install(|| -> Result<()> {
        for job in &jobs {
            let ctx = Ctx::new(&models, job, plan.chunk_elems);
            let g = ctx.fold_ordered(
                ctl,
                true,
                || vec![0f64; n * n],
                |acc, _c, _a, s, m| {
                    for i in 0..n {
                        for j in i..n {
                            acc[i * n + j] += dot(&s.srcs[i][..m], &s.srcs[j][..m]);
                        }
                    }
                },
                |mut a, b| {
                    for (x, y) in a.iter_mut().zip(b) {
                        *x += y;
                    }
                    a
                },
            )?;
            ctl.done.fetch_add(
                (job.numel * (1 + n) * 4) as u64,
                std::sync::atomic::Ordering::Relaxed,
            );
            let mut rows = Vec::with_capacity(n);
            for i in 0..n {
                let mut row = Vec::with_capacity(n);
                for j in 0..n {
                    let v = if i <= j { g[i * n + j] } else { g[j * n + i] };
                    total[i * n + j] += v;
                    row.push(v);
                }
                rows.push(row);
            }
            total_numel += job.numel;
            tensors.insert(
                job.name.clone(),
                serde_json::json!({"gram": rows, "numel": job.numel}),
            );
        }
        Ok(())
    })?;
    let total_rows: Vec<Vec<f64>> = (0..n).map(|i| total[i * n..(i + 1) * n].to_vec()).collect();
    Ok(serde_json::json!({
        "tensors": tensors,
        "total": {"gram": total_rows, "numel": total_numel},
        "seconds": t0.elapsed().as_secs_f64(),
    }))
}
