//! The merge executor: runs a plan (docs/merge-plan.md) over memory-mapped inputs, computing every
//! output tensor in chunks in parallel and writing each chunk into its final place in the output.
//!
//! Anonymous memory is per worker thread: (sources + 2) f32 buffers of one chunk plus one output
//! byte buffer, plus small per-tensor statistics (histograms, per-chunk tie counts, per-row
//! model_stock factors). Inputs and outputs are file-backed.

pub mod bf16;
pub mod kernels;
pub mod methods_mk;
pub mod methods_sph;
pub mod plan;
pub mod rng;
pub mod select;
pub mod vmath;

use std::cell::RefCell;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use rayon::prelude::*;

use crate::dtype::{load_f32, store_f32};
use crate::error::{Error, Result};
use crate::safetensors::read::Model;
use crate::safetensors::write::{plan_layout, OutTensor, Writer};
use plan::{Job, SrcRef};

/// Shared between the worker threads and whoever watches them (the Python binding).
#[derive(Debug, Default)]
pub struct Control {
    pub cancel: AtomicBool,
    pub done: AtomicU64,
    pub total: AtomicU64,
}

impl Control {
    pub fn check(&self) -> Result<()> {
        if self.cancel.load(Ordering::Relaxed) {
            Err(Error::Cancelled)
        } else {
            Ok(())
        }
    }
}

/// Per-thread scratch buffers, reused across chunks (so memory is threads × chunk).
#[derive(Default)]
pub(crate) struct Scratch {
    pub base: Vec<f32>,
    pub srcs: Vec<Vec<f32>>,
    pub out: Vec<f32>,
    pub bytes: Vec<u8>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

pub(crate) fn with_scratch<R>(nsrc: usize, m: usize, f: impl FnOnce(&mut Scratch) -> R) -> R {
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        if s.base.len() < m {
            s.base.resize(m, 0.0);
        }
        if s.out.len() < m {
            s.out.resize(m, 0.0);
        }
        if s.srcs.len() < nsrc {
            s.srcs.resize_with(nsrc, Vec::new);
        }
        for v in s.srcs.iter_mut().take(nsrc) {
            if v.len() < m {
                v.resize(m, 0.0);
            }
        }
        f(&mut s)
    })
}

/// Chunking of one tensor: at most `chunk_elems` per chunk, and at least 8 chunks per tensor
/// above 32 Ki elements so that threads share mid-sized tensors (more, smaller chunks cost TIES
/// 15% more CPU: its selection keeps per-chunk state).
/// Chunks are also capped at 64 Ki elements so that a chunk's buffers stay in L2 cache across
/// the several passes a method makes over them. The chunking does not depend on the thread
/// count: floating-point sums over a tensor are summed per chunk, then over chunks in order
/// (`Ctx::fold_ordered`), so their value depends on the chunking.
pub fn chunk_len(numel: usize, chunk_elems: usize) -> usize {
    numel
        .div_ceil(8)
        .clamp(1 << 12, 1 << 16)
        .min(chunk_elems)
        .max(1)
}

/// How many accumulators `Ctx::fold_groups` folds `n` work items into: two per thread.
pub(crate) fn fold_group_count(n: usize) -> usize {
    (2 * rayon::current_num_threads().max(1)).clamp(1, n.max(1))
}

/// One tensor being processed: where to read, how it is chunked.
pub(crate) struct Ctx<'a> {
    pub models: &'a [Model],
    pub job: &'a Job,
    pub chunk: usize,
    pub nchunks: usize,
}

impl<'a> Ctx<'a> {
    pub fn new(models: &'a [Model], job: &'a Job, chunk_elems: usize) -> Self {
        let chunk = match job.out_block {
            // FP8 output is requantised per block: a chunk is one row of blocks.
            Some(b) => (b.rows * b.ncols).max(1),
            None => chunk_len(job.units(), chunk_elems),
        };
        Ctx {
            models,
            job,
            chunk,
            nchunks: job.units().div_ceil(chunk),
        }
    }

    /// Chunk c's range of work units (elements; bytes for a byte copy).
    pub fn range(&self, c: usize) -> (usize, usize) {
        let a = c * self.chunk;
        (a, (a + self.chunk).min(self.job.units()))
    }

    pub fn load(&self, r: SrcRef, a: usize, b: usize, out: &mut [f32]) {
        let m = &self.models[r.model];
        let info = &m.tensors[r.tensor];
        let es = info.dtype.bitsize() / 8;
        load_f32(
            info.dtype,
            &m.bytes(info)[a * es..b * es],
            &mut out[..b - a],
        );
        if let Some(sc) = r.scale {
            apply_block_scale(m, sc, info.shape[1], a, b, &mut out[..b - a]);
        }
    }

    /// Loads chunk c: base into `s.base`, sources into `s.srcs`; with `deltas`, sources become
    /// θ_i − θ_base. Returns (start element, length).
    pub fn load_chunk(&self, c: usize, s: &mut Scratch, deltas: bool) -> (usize, usize) {
        let (a, b) = self.range(c);
        let m = b - a;
        if let Some(base) = self.job.base {
            self.load(base, a, b, &mut s.base);
        }
        // bf16 compute: inputs are cast to bf16 and deltas rounded, as mergekit's torch ops do.
        let bf = self.job.bf16_compute;
        if bf && self.job.base.is_some() {
            bf16::round_all(&mut s.base[..m]);
        }
        for (i, &src) in self.job.sources.iter().enumerate() {
            self.load(src, a, b, &mut s.srcs[i]);
            if bf {
                bf16::round_all(&mut s.srcs[i][..m]);
            }
            if deltas {
                let (bb, d) = (&s.base[..m], &mut s.srcs[i][..m]);
                for (x, y) in d.iter_mut().zip(bb) {
                    *x -= *y;
                }
                if bf {
                    bf16::round_all(d);
                }
            }
        }
        (a, m)
    }

    /// Runs `f` on every chunk in parallel (loaded as by `load_chunk`), folding into `T`.
    pub fn fold<T, I, F, R>(
        &self,
        ctl: &Control,
        deltas: bool,
        init: I,
        f: F,
        reduce: R,
    ) -> Result<T>
    where
        T: Send,
        I: Fn() -> T + Sync + Send,
        F: Fn(&mut T, usize, usize, &Scratch, usize) + Sync + Send,
        R: Fn(T, T) -> T + Sync + Send,
    {
        let all: Vec<usize> = (0..self.nchunks).collect();
        self.fold_over(&all, ctl, deltas, init, f, reduce)
    }

    /// Like `fold`, but deterministic whatever the thread count and scheduling: each chunk is
    /// folded into its own `init()`, and the per-chunk results are reduced in chunk order. For
    /// small accumulators (floating-point sums, whose value depends on the order of the
    /// additions); memory is one `T` per chunk.
    pub fn fold_ordered<T, I, F, R>(
        &self,
        ctl: &Control,
        deltas: bool,
        init: I,
        f: F,
        reduce: R,
    ) -> Result<T>
    where
        T: Send,
        I: Fn() -> T + Sync + Send,
        F: Fn(&mut T, usize, usize, &Scratch, usize) + Sync + Send,
        R: Fn(T, T) -> T,
    {
        self.fold_runs(self.nchunks, ctl, deltas, init, f, reduce)
    }

    /// Like `fold`, with a fixed number of accumulators (`fold_group_count`: two per thread,
    /// each over a run of consecutive chunks) instead of one per rayon split, for large
    /// accumulators whose reduction does not depend on the grouping (integer counts, minima):
    /// zeroing a fresh histogram of up to 1.5 MB for every split cost about 6% of
    /// arcee_fusion's CPU time (page faults and memset).
    pub fn fold_groups<T, I, F, R>(
        &self,
        ctl: &Control,
        deltas: bool,
        init: I,
        f: F,
        reduce: R,
    ) -> Result<T>
    where
        T: Send,
        I: Fn() -> T + Sync + Send,
        F: Fn(&mut T, usize, usize, &Scratch, usize) + Sync + Send,
        R: Fn(T, T) -> T,
    {
        self.fold_runs(fold_group_count(self.nchunks), ctl, deltas, init, f, reduce)
    }

    /// Folds `runs` runs of consecutive chunks in parallel, each into its own `init()`, and
    /// reduces the runs' results in run order.
    fn fold_runs<T, I, F, R>(
        &self,
        runs: usize,
        ctl: &Control,
        deltas: bool,
        init: I,
        f: F,
        reduce: R,
    ) -> Result<T>
    where
        T: Send,
        I: Fn() -> T + Sync + Send,
        F: Fn(&mut T, usize, usize, &Scratch, usize) + Sync + Send,
        R: Fn(T, T) -> T,
    {
        let nc = self.nchunks;
        let g = runs.clamp(1, nc.max(1));
        let nsrc = self.job.sources.len();
        let parts: Vec<T> = (0..g)
            .into_par_iter()
            .map(|k| {
                let mut acc = init();
                for c in k * nc / g..(k + 1) * nc / g {
                    if ctl.check().is_err() {
                        break;
                    }
                    with_scratch(nsrc, self.chunk, |s| {
                        let (a, m) = self.load_chunk(c, s, deltas);
                        f(&mut acc, c, a, s, m);
                    });
                }
                acc
            })
            .collect();
        ctl.check()?;
        Ok(parts.into_iter().reduce(reduce).unwrap_or_else(init))
    }

    /// Like `fold`, over the listed chunks only.
    pub fn fold_over<T, I, F, R>(
        &self,
        chunks: &[usize],
        ctl: &Control,
        deltas: bool,
        init: I,
        f: F,
        reduce: R,
    ) -> Result<T>
    where
        T: Send,
        I: Fn() -> T + Sync + Send,
        F: Fn(&mut T, usize, usize, &Scratch, usize) + Sync + Send,
        R: Fn(T, T) -> T + Sync + Send,
    {
        let nsrc = self.job.sources.len();
        let out = chunks
            .par_iter()
            .fold(&init, |mut acc, &c| {
                if !ctl.cancel.load(Ordering::Relaxed) {
                    with_scratch(nsrc, self.chunk, |s| {
                        let (a, m) = self.load_chunk(c, s, deltas);
                        f(&mut acc, c, a, s, m);
                    });
                }
                acc
            })
            .reduce(&init, &reduce);
        ctl.check()?;
        Ok(out)
    }
}

/// Dequantises FP8 values in place: element e of a [rows, ncols] tensor (elements a..b are in
/// `out`) is multiplied by the scale of its block, scale[(e / ncols) / sc.rows][(e % ncols) / sc.cols].
pub(crate) fn apply_block_scale(
    m: &Model,
    sc: plan::BlockScale,
    ncols: usize,
    a: usize,
    b: usize,
    out: &mut [f32],
) {
    let st = &m.tensors[sc.tensor];
    let sbytes = m.bytes(st);
    let nbc = ncols.div_ceil(sc.cols);
    let es = st.dtype.bitsize() / 8;
    let scale_at = |k: usize| -> f32 {
        let mut v = [0f32; 1];
        load_f32(st.dtype, &sbytes[k * es..(k + 1) * es], &mut v);
        v[0]
    };
    let mut e = a;
    while e < b {
        let (i, j) = (e / ncols, e % ncols);
        let row_end = b.min((i + 1) * ncols);
        let srow = (i / sc.rows) * nbc;
        let (mut j, mut e2) = (j, e);
        while e2 < row_end {
            let bj = j / sc.cols;
            let seg_end = row_end.min(e2 + ((bj + 1) * sc.cols - j));
            let s = scale_at(srow + bj);
            for x in &mut out[e2 - a..seg_end - a] {
                *x *= s;
            }
            j += seg_end - e2;
            e2 = seg_end;
        }
        e = row_end;
    }
}

/// What `merge` returns.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Summary {
    pub files: Vec<String>,
    pub total_bytes: u64,
    pub tensors: usize,
    pub seconds: f64,
}

/// Opens every model of a plan.
pub fn open_models(paths: &[String]) -> Result<Vec<Model>> {
    paths.iter().map(Model::open).collect()
}

/// Parses, validates and executes a plan.
pub fn run_merge(plan_json: &str, ctl: &Control) -> Result<Summary> {
    let t0 = Instant::now();
    let plan = plan::parse_plan(plan_json)?;
    let models = open_models(&plan.models)?;
    let jobs = plan::build_jobs(&plan, &models)?;
    let out_dir = PathBuf::from(&plan.out_dir);
    if !out_dir.is_dir() {
        return Err(Error::Config(format!(
            "out_dir {} does not exist or is not a directory (the caller creates it)",
            out_dir.display()
        )));
    }
    let threads = if plan.threads == 0 {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    } else {
        plan.threads
    };
    let outs: Vec<OutTensor> = plan::out_tensors(&jobs);
    let layout = plan_layout(&outs, &plan.metadata, plan.out_shard_size);
    let total = layout.total_size;
    ctl.total.store(total, Ordering::Relaxed);
    let writer = Writer::create(&out_dir, layout)?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("finrecipe-merge-{i}"))
        .build()
        .map_err(|e| Error::Internal(format!("cannot start {threads} threads: {e}")))?;
    let result =
        pool.install(|| execute(&models, &jobs, &writer, plan.chunk_elems, plan.seed, ctl));
    match result {
        Ok(()) => {
            let files = writer.finish()?;
            Ok(Summary {
                files,
                total_bytes: total,
                tensors: jobs.len(),
                seconds: t0.elapsed().as_secs_f64(),
            })
        }
        Err(e) => {
            writer.abort();
            Err(e)
        }
    }
}

/// Runs all jobs: consecutive jobs without whole-tensor statistics are processed as one flat
/// parallel loop over their chunks; a job with statistics runs its passes, then its chunks.
fn execute(
    models: &[Model],
    jobs: &[Job],
    w: &Writer,
    chunk_elems: usize,
    seed: u64,
    ctl: &Control,
) -> Result<()> {
    let ctxs: Vec<Ctx> = jobs
        .iter()
        .map(|j| Ctx::new(models, j, chunk_elems))
        .collect();
    let mut i = 0;
    while i < jobs.len() {
        let mut j = i;
        while j < jobs.len() && !kernels::needs_stats(&jobs[j]) {
            j += 1;
        }
        if j > i {
            let units: Vec<(usize, usize)> = (i..j)
                .flat_map(|t| (0..ctxs[t].nchunks).map(move |c| (t, c)))
                .collect();
            let stats: Vec<kernels::Stats> = (i..j).map(|_| kernels::Stats::None).collect();
            units.par_iter().try_for_each(|&(t, c)| {
                ctl.check()?;
                kernels::run_chunk(&ctxs[t], &stats[t - i], seed, c, w, ctl)
            })?;
            i = j;
            continue;
        }
        let ctx = &ctxs[i];
        let stats = kernels::compute_stats(ctx, seed, ctl)?;
        (0..ctx.nchunks).into_par_iter().try_for_each(|c| {
            ctl.check()?;
            kernels::run_chunk(ctx, &stats, seed, c, w, ctl)
        })?;
        i += 1;
    }
    Ok(())
}

/// Converts `out[..m]` to the output dtype and writes it at element `a` of tensor `t`.
pub(crate) fn store_chunk(
    w: &Writer,
    t: usize,
    dtype: crate::safetensors::Dtype,
    a: usize,
    out: &[f32],
    bytes: &mut Vec<u8>,
) -> Result<()> {
    let es = dtype.bitsize() / 8;
    let nb = out.len() * es;
    if bytes.len() < nb {
        bytes.resize(nb, 0);
    }
    store_f32(dtype, out, &mut bytes[..nb]);
    w.write(t, (a * es) as u64, &bytes[..nb])
}

#[cfg(test)]
mod tests;
