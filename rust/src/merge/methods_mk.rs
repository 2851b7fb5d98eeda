//! Kernels of mergekit 0.1.5's newer methods: nearswap, ram, ramplus_tl and karcher.
//!
//! Semantics follow mergekit's merge methods (docs/merge-plan.md); like the other kernels they are
//! planned before any data is read, stream chunk by chunk, and need at most small per-tensor
//! statistics (ramplus_tl: two counts per source; karcher: the sources' Gram matrix):
//!
//! - nearswap (base a, one source b, `t`): w = clamp(t / max(|a − b|, 1e-6), 0, 1); w·b + (1 − w)·a
//!   (t / x evaluated as torch does it, (1/x)·t).
//! - ram (base, sources, `epsilon`): δ_i = θ_i − θ_b, zeroed where |δ_i| ≤ ε; per element the count
//!   c of nonzero δ_i; a δ_i that is alone (c = 1) is added as it is, overlapping ones (c > 1) are
//!   averaged (δ_i / c); θ_b + Σ.
//! - ramplus_tl (`r`, `alpha`, `epsilon`): as ram, but a source's unique entries are scaled by
//!   λ_i = 1 + r·clamp(ρ_i, 0, α), ρ_i = (its nonzero entries that overlap) / max(its unique ones, ε),
//!   counted over the whole tensor (one statistics pass).
//! - sce: per source the weight mean(δ_i²) / Σ_j mean(δ_j²) (one pass; 1/N
//!   when that sum is below 1e-6); sign election on Σ δ_i; θ_b + Σ agreeing w_i·δ_i / max(Σ agreeing
//!   w_i, 1e-6). With `select_topk` < 1 the task vectors are first zeroed outside the top-k of the
//!   variance across them (the selection is in methods_sph.rs), the weights taken after.
//! - karcher (`max_iter`, `tol`, no base): the weighted Karcher mean (equal weights) of the sources'
//!   directions on the unit sphere, scaled by the mean of their norms. Every iterate is a linear
//!   combination of the sources, so the iteration runs on the coefficient vector with the Gram
//!   matrix ⟨θ_i, θ_j⟩ (f64) and mergekit's float32 norms of the sources and of the initial mean
//!   (two ordered passes, `karcher_f32_scalars`); the output is Σ c_i·θ_i. Under bf16 compute the iteration
//!   is mergekit's bf16 one, op by op (`karcher_bf16`): its iterate is rounded every step, so each
//!   pass replays every element's trajectory from the sources and the per-step scalars.

use super::bf16::rb;
use super::kernels::Stats;
use super::methods_sph::TorchNorm;
use super::plan::{Job, Kernel};
use super::rng::KeepStream;
use super::select::{key, radix_sort_keyed};
use super::{Control, Ctx};
use crate::error::Result;

/// Whether this module computes `k` (della's masks; its combination is the task-arithmetic one).
pub fn handles(k: Kernel) -> bool {
    matches!(
        k,
        Kernel::Nearswap
            | Kernel::Ram
            | Kernel::RamplusTl
            | Kernel::Karcher
            | Kernel::Della
            | Kernel::DellaLinear
            | Kernel::Sce
    )
}

pub fn is_della(k: Kernel) -> bool {
    matches!(k, Kernel::Della | Kernel::DellaLinear)
}

/// Rows of DELLA's ranking: mergekit ranks |δ| along dim 1 of a 2-D tensor (within each row);
/// a 1-D tensor is one row. (Tensors of more dimensions are ranked within their last dimension.)
fn della_row_len(job: &Job) -> usize {
    if job.shape.len() >= 2 {
        *job.shape.last().unwrap()
    } else {
        job.numel.max(1)
    }
}

/// DELLA's magnitude-dependent drop for source i on chunk c (elements a.., deltas in `d`): each
/// element is kept with probability p = (density − ε) + 2ε·(rank − 1)/(n − 1), rank 1..n of its |δ|
/// within its row (equal magnitudes ranked by index); `kb[j]` is set to 1 where element a + j is
/// kept, 0 where it is dropped. The ranks are those of the whole row (a row that reaches beyond the
/// chunk is loaded whole, into a bounded per-thread buffer), so they do not depend on the chunking.
///
/// A row is ranked by a stable radix sort of its magnitude keys (`select::radix_sort_keyed`:
/// the order of a stable sort on |δ| by `total_cmp`); p·2^32, the draw's threshold, is a function
/// of the rank alone (a table per row length), scattered to the row's columns; the keep loop then
/// compares each element's draw with its column's threshold.
fn della_keep(ctx: &Ctx, seed: u64, i: usize, a: usize, d: &[f32], kb: &mut Vec<u8>) {
    let job = ctx.job;
    let dens = job.densities[i];
    let m = d.len();
    kb.clear();
    if dens >= 1.0 {
        kb.resize(m, 1);
        return;
    }
    kb.resize(m, 0);
    if dens <= 0.0 {
        return;
    }
    let eps = job.epsilons.get(i).copied().unwrap_or(0.15);
    let bf = job.bf16_compute;
    let stream = KeepStream::new(seed, &job.name, i, dens);
    let n = della_row_len(job);
    // indices are packed into 32 bits beside the key
    assert!(
        n <= 1 << 32,
        "della: a row of {n} elements is longer than 2^32 (tensor {})",
        job.name
    );
    DELLA_BUF.with(|buf| {
        let mut buf = buf.borrow_mut();
        let DellaBuf {
            rb_,
            rs,
            pairs,
            tmp,
            table,
            thr,
            table_for,
        } = &mut *buf;
        // p·2^32 (2^32: kept whatever the draw) for each rank 0..n−1
        let tag = (n, dens.to_bits(), eps.to_bits());
        if *table_for != Some(tag) {
            let denom = if n > 1 { (n - 1) as f64 } else { 1.0 };
            table.clear();
            table.extend((0..n).map(|rk| {
                let p = (dens - eps) + 2.0 * eps * rk as f64 / denom;
                let t = (p.clamp(0.0, 1.0) * 4_294_967_296.0).min(u32::MAX as f64) as u32;
                if p >= 1.0 {
                    1u64 << 32
                } else {
                    u64::from(t)
                }
            }));
            *table_for = Some(tag);
        }
        thr.resize(n, 0);
        let mut j = 0;
        while j < m {
            let e = a + j;
            let row = e / n;
            let (r0, r1) = (row * n, (row + 1) * n);
            let end = (r1 - a).min(m);
            // the whole row's deltas, as the chunk loader computes them: from the chunk when the
            // row lies inside it, else loaded
            let row_d: &[f32] = if r0 >= a && end == r1 - a {
                &d[r0 - a..end]
            } else {
                rb_.resize(n, 0.0);
                rs.resize(n, 0.0);
                if let Some(b) = job.base {
                    ctx.load(b, r0, r1, rb_);
                } else {
                    rb_.fill(0.0);
                }
                ctx.load(job.sources[i], r0, r1, rs);
                for (x, &y) in rs.iter_mut().zip(rb_.iter()) {
                    let (x0, y0) = if bf { (rb(*x), rb(y)) } else { (*x, y) };
                    *x = if bf { rb(x0 - y0) } else { x0 - y0 };
                }
                rs
            };
            pairs.clear();
            pairs.extend(
                row_d
                    .iter()
                    .enumerate()
                    .map(|(c, &x)| (u64::from(key(x)) << 32) | c as u64),
            );
            radix_sort_keyed(pairs, tmp);
            for (&p, &t) in pairs.iter().zip(table.iter()) {
                thr[p as u32 as usize] = t;
            }
            let c0 = e - r0;
            keep_draws(&mut kb[j..end], &thr[c0..c0 + (end - j)], &stream, e as u64);
            j = end;
        }
    });
}

#[derive(Default)]
struct DellaBuf {
    rb_: Vec<f32>,
    rs: Vec<f32>,
    pairs: Vec<u64>,
    tmp: Vec<u64>,
    /// threshold by rank, for (row length, density bits, ε bits) `table_for`
    table: Vec<u64>,
    /// threshold by column of the current row
    thr: Vec<u64>,
    table_for: Option<(usize, u64, u64)>,
}

thread_local! {
    /// DELLA's per-row buffers, reused by each worker thread.
    static DELLA_BUF: std::cell::RefCell<DellaBuf> = std::cell::RefCell::new(DellaBuf::default());
    /// A chunk's keep flags (one byte per element), per worker thread.
    static DELLA_KB: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// kb[j] = 1 iff the draw of element e0 + j is below its threshold thr[j].
fn keep_draws(kb: &mut [u8], thr: &[u64], k: &KeepStream, e0: u64) {
    crate::dtype::avx2_dispatch!(keep_draws_generic, keep_draws_avx2, (kb: &mut [u8], thr: &[u64], k: &KeepStream, e0: u64))
}

#[inline(always)]
fn keep_draws_generic(kb: &mut [u8], thr: &[u64], k: &KeepStream, e0: u64) {
    let (mut rest, mut rt, mut idx) = (kb, thr, e0);
    while !rest.is_empty() {
        // elements left before the high word of the index changes
        let span = ((1u64 << 32) - (idx & 0xFFFF_FFFF)).min(rest.len() as u64) as usize;
        let (part, tail) = rest.split_at_mut(span);
        let (pt, ttail) = rt.split_at(span);
        let hw = k.hi_word((idx >> 32) as u32);
        let lo0 = idx as u32;
        for (jj, (x, &t)) in part.iter_mut().zip(pt).enumerate() {
            *x = u8::from(u64::from(k.draw_lo(lo0.wrapping_add(jj as u32), hw)) < t);
        }
        idx += span as u64;
        rest = tail;
        rt = ttail;
    }
}

/// kb's flags as bits (bit j % 64 of word j / 64).
fn pack_bits(kb: &[u8], out: &mut Vec<u64>) {
    out.extend(kb.chunks(64).map(|c| {
        c.iter()
            .enumerate()
            .fold(0u64, |w, (t, &b)| w | (u64::from(b) << t))
    }));
}

/// A dropped δ becomes +0.0; a kept one is multiplied by the rescale factor `f` (the product
/// rounded to bf16 under bf16 compute; left as it is when f = 1). `kept(j)`: element j's flag
/// (0 or 1), applied as a bit mask (branch-free: the flags are random).
#[inline(always)]
fn apply_keep(d: &mut [f32], f: f32, bf: bool, kept: impl Fn(usize) -> u32) {
    #[inline(always)]
    fn pass(d: &mut [f32], kept: impl Fn(usize) -> u32, g: impl Fn(f32) -> f32) {
        for (j, x) in d.iter_mut().enumerate() {
            *x = f32::from_bits(g(*x).to_bits() & 0u32.wrapping_sub(kept(j)));
        }
    }
    if f == 1.0 {
        pass(d, kept, |x| x)
    } else if bf {
        pass(d, kept, |x| rb(x * f))
    } else {
        pass(d, kept, |x| x * f)
    }
}

fn apply_bytes(d: &mut [f32], kb: &[u8], f: f32, bf: bool) {
    crate::dtype::avx2_dispatch!(apply_bytes_generic, apply_bytes_avx2, (d: &mut [f32], kb: &[u8], f: f32, bf: bool))
}

#[inline(always)]
fn apply_bytes_generic(d: &mut [f32], kb: &[u8], f: f32, bf: bool) {
    let kb = &kb[..d.len()];
    apply_keep(d, f, bf, |j| u32::from(kb[j]))
}

fn apply_bits(d: &mut [f32], bits: &[u64], f: f32, bf: bool) {
    crate::dtype::avx2_dispatch!(apply_bits_generic, apply_bits_avx2, (d: &mut [f32], bits: &[u64], f: f32, bf: bool))
}

#[inline(always)]
fn apply_bits_generic(d: &mut [f32], bits: &[u64], f: f32, bf: bool) {
    for (dw, &w) in d.chunks_mut(64).zip(bits) {
        apply_keep(dw, f, bf, |t| ((w >> t) & 1) as u32)
    }
}

/// DELLA's whole-tensor statistics: the rescale factors and, when small enough, the keep masks the
/// statistics pass drew (per chunk, all sources' bits), so the apply pass need not rank again.
pub struct DellaStats {
    pub f: Vec<f32>,
    /// per chunk; empty when not kept (the apply pass draws the masks again)
    masks: Vec<std::sync::Mutex<Vec<u64>>>,
}

impl Clone for DellaStats {
    fn clone(&self) -> Self {
        DellaStats {
            f: self.f.clone(),
            masks: self
                .masks
                .iter()
                .map(|x| std::sync::Mutex::new(x.lock().unwrap_or_else(|e| e.into_inner()).clone()))
                .collect(),
        }
    }
}

impl std::fmt::Debug for DellaStats {
    fn fmt(&self, fm: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        fm.debug_struct("DellaStats")
            .field("f", &self.f)
            .field("cached_chunks", &self.masks.len())
            .finish()
    }
}

/// Largest mask cache (bytes) DELLA's statistics pass keeps for one tensor.
static DELLA_CACHE_LIMIT: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(64 << 20);

#[cfg(test)]
pub(crate) fn set_della_cache_limit(bytes: usize) {
    DELLA_CACHE_LIMIT.store(bytes, std::sync::atomic::Ordering::Relaxed);
}

/// Applies DELLA's masks (and rescale factors) to the chunk's deltas before the task-arithmetic
/// combination runs on them.
pub(crate) fn della_mask(
    ctx: &Ctx,
    stats: &Stats,
    seed: u64,
    c: usize,
    a: usize,
    m: usize,
    s: &mut super::Scratch,
) {
    let nsrc = ctx.job.sources.len();
    let bf = ctx.job.bf16_compute;
    let (f, cached) = match stats {
        Stats::Della(st) => (
            &st.f[..],
            st.masks
                .get(c)
                .map(|x| std::mem::take(&mut *x.lock().unwrap_or_else(|e| e.into_inner()))),
        ),
        _ => (&[][..], None),
    };
    let words = m.div_ceil(64);
    match cached {
        Some(bits) if bits.len() == nsrc * words => {
            for i in 0..nsrc {
                let fi = f.get(i).copied().unwrap_or(1.0);
                apply_bits(&mut s.srcs[i][..m], &bits[i * words..], fi, bf);
            }
        }
        _ => DELLA_KB.with(|kb| {
            let mut kb = kb.borrow_mut();
            for i in 0..nsrc {
                let fi = f.get(i).copied().unwrap_or(1.0);
                della_keep(ctx, seed, i, a, &s.srcs[i][..m], &mut kb);
                apply_bytes(&mut s.srcs[i][..m], &kb, fi, bf);
            }
        }),
    }
}

/// Kernels of this module that also compute in bf16 when the plan asks (elementwise ones).
pub fn bf16_ok(k: Kernel) -> bool {
    matches!(
        k,
        Kernel::Nearswap
            | Kernel::Ram
            | Kernel::RamplusTl
            | Kernel::Sce
            | Kernel::Nuslerp
            | Kernel::Multislerp
            | Kernel::ArceeFusion
            | Kernel::Karcher
    )
}

pub fn needs_stats(job: &Job) -> bool {
    match job.kernel {
        Kernel::RamplusTl | Kernel::Karcher | Kernel::Sce => true,
        Kernel::Della | Kernel::DellaLinear => {
            job.rescale && job.densities.iter().any(|&d| d > 0.0 && d < 1.0)
        }
        _ => false,
    }
}

fn num(job: &Job, k: &str, default: f64) -> f64 {
    job.nums.get(k).copied().unwrap_or(default)
}

/// Whole-tensor statistics: per-source λ (ramplus_tl) or coefficients (karcher).
pub(crate) fn compute_stats(ctx: &Ctx, seed: u64, ctl: &Control) -> Result<Stats> {
    let job = ctx.job;
    let nsrc = job.sources.len();
    match job.kernel {
        Kernel::Della | Kernel::DellaLinear => {
            // L1 of each δ and of its kept part, with the masks della_mask applies (kept for it
            // when the tensor's masks fit the cache)
            let words = ctx.chunk.div_ceil(64);
            let cache = ctx.nchunks * nsrc * words * 8
                <= DELLA_CACHE_LIMIT.load(std::sync::atomic::Ordering::Relaxed);
            let masks: Vec<std::sync::Mutex<Vec<u64>>> = if cache {
                (0..ctx.nchunks).map(|_| Default::default()).collect()
            } else {
                Vec::new()
            };
            let sums = ctx.fold_ordered(
                ctl,
                true,
                || vec![0f64; 2 * nsrc],
                |acc, c, a, s, m| {
                    DELLA_KB.with(|kb| {
                        let mut kb = kb.borrow_mut();
                        let mut bits = Vec::new();
                        for i in 0..nsrc {
                            let src = &s.srcs[i][..m];
                            della_keep(ctx, seed, i, a, src, &mut kb);
                            // the chunk's two sums in element order (a dropped δ adds +0.0),
                            // side by side in one loop
                            let (mut before, mut after) = (0f64, 0f64);
                            for (&x, &k) in src.iter().zip(kb.iter()) {
                                let ax = x.abs() as f64;
                                before += ax;
                                // branch-free: the flags are random
                                after += f64::from_bits(ax.to_bits() & 0u64.wrapping_sub(k.into()));
                            }
                            acc[2 * i] += before;
                            acc[2 * i + 1] += after;
                            if cache {
                                pack_bits(&kb[..m], &mut bits);
                            }
                        }
                        if cache {
                            *masks[c].lock().unwrap_or_else(|e| e.into_inner()) = bits;
                        }
                    })
                },
                |mut x, y| {
                    for (p, q) in x.iter_mut().zip(y) {
                        *p += q;
                    }
                    x
                },
            )?;
            let f = (0..nsrc)
                .map(|i| {
                    let (b, a) = (sums[2 * i], sums[2 * i + 1]);
                    let d = job.densities[i];
                    if !job.rescale || d >= 1.0 || d <= 0.0 {
                        1.0
                    } else if job.bf16_compute {
                        super::bf16::rescale_factor(b, a)
                    } else if b < 1e-7 || a < 1e-7 {
                        1.0
                    } else {
                        (b / a) as f32
                    }
                })
                .collect();
            Ok(Stats::Della(Box::new(DellaStats { f, masks })))
        }
        Kernel::RamplusTl => {
            let eps = num(job, "epsilon", 1e-5) as f32;
            // per source: (nonzero and overlapping, nonzero and unique)
            let counts = ctx.fold(
                ctl,
                true,
                || vec![0u64; 2 * nsrc],
                |acc, _c, _a, s, m| {
                    // blocked: per element the count c of sources above eps, then per source
                    // its elements above eps with c > 1 (shared) and with c = 1 (unique)
                    let mut j0 = 0;
                    while j0 < m {
                        let n = RAM_BLOCK.min(m - j0);
                        let mut cnt = [0u32; RAM_BLOCK];
                        for src in s.srcs.iter().take(nsrc) {
                            for (c, &x) in cnt[..n].iter_mut().zip(&src[j0..j0 + n]) {
                                *c += u32::from(x.abs() > eps);
                            }
                        }
                        for i in 0..nsrc {
                            let (mut shared, mut unique) = (0u32, 0u32);
                            for (&c, &x) in cnt[..n].iter().zip(&s.srcs[i][j0..j0 + n]) {
                                let nz = x.abs() > eps;
                                shared += u32::from(nz & (c > 1));
                                unique += u32::from(nz & (c == 1));
                            }
                            acc[2 * i] += shared as u64;
                            acc[2 * i + 1] += unique as u64;
                        }
                        j0 += n;
                    }
                },
                |mut a, b| {
                    for (x, y) in a.iter_mut().zip(b) {
                        *x += y;
                    }
                    a
                },
            )?;
            let (r, alpha) = (num(job, "r", 0.1) as f32, num(job, "alpha", 0.2) as f32);
            let lam = (0..nsrc)
                .map(|i| {
                    let shared = counts[2 * i] as f32;
                    let unique = (counts[2 * i + 1] as f32).max(eps);
                    // torch's clamp(min=0, max=alpha): min first, then max (no panic for alpha < 0)
                    1.0 + r * (shared / unique).max(0.0).min(alpha)
                })
                .collect();
            Ok(Stats::Dare(lam))
        }
        Kernel::Sce => {
            // select_topk < 1: the variance top-k first (methods_sph), the weights from the
            // masked task vectors
            let topk = num(job, "select_topk", 1.0);
            let rule = if topk < 1.0 {
                Some(super::methods_sph::sce_rule(ctx, ctl, topk)?)
            } else {
                None
            };
            // per source: Σ δ² → the source's weight mean(δ_i²) / Σ_j mean(δ_j²); bf16 compute:
            // δ² rounded, the mean summed in f32 and rounded, the weights r(mean_i / r(Σ_j mean_j))
            let bf = job.bf16_compute;
            let sq = ctx
                .fold(
                    ctl,
                    true,
                    || (vec![0f64; nsrc], Vec::new()),
                    |(acc, var), c, _a, s, m| {
                        if let Some(rule) = &rule {
                            super::methods_sph::variances(&s.srcs, nsrc, m, var);
                            if bf {
                                super::bf16::round_all(var);
                            }
                            rule.apply(c, &mut var[..m]);
                        }
                        let kept = if rule.is_some() {
                            Some(&var[..m])
                        } else {
                            None
                        };
                        let mut i = 0;
                        while i < nsrc {
                            let pair = (i + 1 < nsrc).then(|| &s.srcs[i + 1][..m]);
                            let (a0, a1) = if bf {
                                sce_sq_sums::<true>(&s.srcs[i][..m], pair, kept)
                            } else {
                                sce_sq_sums::<false>(&s.srcs[i][..m], pair, kept)
                            };
                            acc[i] += a0;
                            if pair.is_some() {
                                acc[i + 1] += a1;
                            }
                            i += 2;
                        }
                    },
                    |(mut a, v), (b, _)| {
                        for (x, y) in a.iter_mut().zip(b) {
                            *x += y;
                        }
                        (a, v)
                    },
                )?
                .0;
            let rr = |x: f32| if bf { rb(x) } else { x };
            let means: Vec<f32> = sq
                .iter()
                .map(|&v| rr((v as f32) / (job.numel.max(1) as f32)))
                .collect();
            let total: f32 = rr(means.iter().sum());
            let w = if total.abs() < 1e-6 {
                vec![rr(1.0 / nsrc as f32); nsrc]
            } else {
                means.iter().map(|&v| rr(v / total)).collect()
            };
            Ok(match rule {
                None => Stats::Dare(w),
                Some(rule) => Stats::SceTopk { rule, w },
            })
        }
        Kernel::Karcher if job.bf16_compute && nsrc > 1 => {
            Ok(Stats::KarcherBf16(Box::new(karcher_bf16(ctx, ctl)?)))
        }
        Kernel::Karcher if nsrc == 1 => Ok(Stats::Dare(vec![1.0])),
        Kernel::Karcher => {
            // capped so that a hostile plan cannot keep a worker busy for ever
            let max_iter = num(job, "max_iter", 10.0).clamp(0.0, 10_000.0) as usize;
            let tol = num(job, "tol", 1e-5);
            let (gram, norms, mean_norm) = karcher_f32_scalars(ctx, ctl, tol)?;
            Ok(Stats::Dare(
                karcher_coefficients_with(&gram, nsrc, &norms, Some(mean_norm), max_iter, tol)
                    .into_iter()
                    .map(|c| c as f32)
                    .collect(),
            ))
        }
        _ => Ok(Stats::None),
    }
}

/// Coefficients c with Karcher mean · scale = Σ c_i θ_i, from the Gram matrix of the θ_i, in
/// exact arithmetic (exact norms).
pub fn karcher_coefficients(gram: &[f64], n: usize, max_iter: usize, tol: f64) -> Vec<f64> {
    let norms: Vec<f64> = (0..n).map(|i| gram[i * n + i].max(0.0).sqrt()).collect();
    karcher_coefficients_with(gram, n, &norms, None, max_iter, tol)
}

/// The Gram matrix (f64, symmetric n × n), the sources' norms as torch's float32 `vector_norm`
/// gives them (`TorchNorm`) and torch's float32 norm of mergekit's float32 initial mean
/// Σ f32(α_i)·(θ_i / norm_i) (α_i = 1/N over the sources whose norm exceeds tol): two ordered
/// passes over the float32 (unrounded) sources. mergekit 0.1.5 iterates on whole float32 tensors;
/// these norms are not the exact ones (on the 0.84B bench trio 3e-5 high on 4M-element tensors,
/// 1.7e-4 low on 11M, 0.58% low on 65M), so its units and its mean are not of length 1, which decides
/// how its iteration runs: each dot ⟨mean, u_i⟩ carries the length error, the tangent gets a radial
/// part (its norm 1.6e-4–6e-4 where the exact tangent norm is 8.6e-6 < tol, so mergekit keeps
/// stepping towards the Karcher mean where the exact iteration stops at once), and where the norms
/// are low enough every dot exceeds 1, is clamped, θ = 0, no step is taken.
#[allow(clippy::type_complexity)]
fn karcher_f32_scalars(ctx: &Ctx, ctl: &Control, tol: f64) -> Result<(Vec<f64>, Vec<f64>, f64)> {
    let job = ctx.job;
    let nsrc = job.sources.len();
    let k = nsrc * (nsrc + 1) / 2;
    let mut g = vec![0f64; k];
    let mut lanes: Vec<TorchNorm> = (0..nsrc).map(|_| TorchNorm::new(job.numel)).collect();
    karcher_pass_with(
        ctx,
        ctl,
        false,
        |_a, m, srcs| {
            let mut part = vec![0f64; k];
            let mut p = 0;
            for x in 0..nsrc {
                for y in x..nsrc {
                    part[p] = super::kernels::dot(&srcs[x][..m], &srcs[y][..m]);
                    p += 1;
                }
            }
            let vals: Vec<Vec<f32>> = (0..nsrc).map(|i| srcs[i][..m].to_vec()).collect();
            (part, vals)
        },
        |a, (part, vals)| {
            for (x, y) in g.iter_mut().zip(&part) {
                *x += y;
            }
            for (l, v) in lanes.iter_mut().zip(&vals) {
                l.add(a, v);
            }
        },
    )?;
    let mut gram = vec![0f64; nsrc * nsrc];
    let mut p = 0;
    for x in 0..nsrc {
        for y in x..nsrc {
            gram[x * nsrc + y] = g[p];
            gram[y * nsrc + x] = g[p];
            p += 1;
        }
    }
    let norms: Vec<f32> = lanes.iter().map(|l| l.norm()).collect();
    let valid: Vec<usize> = (0..nsrc).filter(|&i| norms[i] as f64 > tol).collect();
    let asum = valid.iter().fold(0f64, |s, _| s + 1.0 / nsrc as f64);
    let a32 = ((1.0 / nsrc as f64) / asum) as f32;
    let mut ml = TorchNorm::new(job.numel);
    if !valid.is_empty() {
        karcher_pass_with(
            ctx,
            ctl,
            false,
            |_a, m, srcs| {
                let mut mean = vec![0f32; m];
                for &i in &valid {
                    let q = norms[i];
                    for (o, &x) in mean.iter_mut().zip(&srcs[i][..m]) {
                        *o += a32 * (x / q);
                    }
                }
                mean
            },
            |a, v| ml.add(a, &v),
        )?;
    }
    Ok((
        gram,
        norms.iter().map(|&x| x as f64).collect(),
        ml.norm() as f64,
    ))
}

/// karcher's coefficients (see `karcher_coefficients`) with given source norms (units u_i =
/// θ_i / norms_i, so ⟨u_i, u_j⟩ = G_ij / (norms_i·norms_j), and scale Σ α_i·norms_i) and, with
/// `mean_norm`, the given norm of the initial mean Σ α_i·u_i (mergekit's float32 ones: see
/// `karcher_f32_scalars`; the weights are then the float32 α_i). Everything else is exact: with
/// torch's norms the iteration takes mergekit's steps (it converges within two), and on the 0.84B
/// bench trio no element is then more than 1 bf16 ulp from mergekit's beyond float32 noise.
pub fn karcher_coefficients_with(
    gram: &[f64],
    n: usize,
    norms: &[f64],
    mean_norm: Option<f64>,
    max_iter: usize,
    tol: f64,
) -> Vec<f64> {
    if n == 1 {
        return vec![1.0];
    }
    let alphas = vec![1.0 / n as f64; n];
    let valid: Vec<usize> = (0..n).filter(|&i| norms[i] > tol).collect();
    if valid.is_empty() {
        return vec![0.0; n];
    }
    let asum: f64 = valid.iter().map(|&i| alphas[i]).sum();
    // ⟨u_i, u_j⟩ of the unit directions
    let u = |i: usize, j: usize| gram[i * n + j] / (norms[i] * norms[j]);
    // a vector in the span of the unit directions: coefficients over u_i
    let dot_vv = |a: &[f64], b: &[f64]| -> f64 {
        let mut s = 0.0;
        for (i, &ai) in a.iter().enumerate().take(n) {
            if ai == 0.0 {
                continue;
            }
            for (j, &bj) in b.iter().enumerate().take(n) {
                if bj != 0.0 {
                    s += ai * bj * u(i, j);
                }
            }
        }
        s
    };
    let mut mean = vec![0f64; n];
    for &i in &valid {
        mean[i] = if mean_norm.is_some() {
            (alphas[i] / asum) as f32 as f64
        } else {
            alphas[i] / asum
        };
    }
    let mn = mean_norm.unwrap_or_else(|| dot_vv(&mean, &mean).max(0.0).sqrt());
    if mn < tol {
        mean = vec![0.0; n];
        mean[valid[0]] = 1.0;
    } else {
        mean.iter_mut().for_each(|x| *x /= mn);
    }
    for _ in 0..max_iter {
        let mut tangent = vec![0f64; n];
        for &i in &valid {
            let mut e = vec![0f64; n];
            e[i] = 1.0;
            let d = dot_vv(&mean, &e).clamp(-1.0, 1.0);
            let theta = d.acos();
            if theta < tol {
                continue;
            }
            let k = alphas[i] / asum * theta / theta.sin();
            tangent[i] += k;
            for j in 0..n {
                tangent[j] -= k * d * mean[j];
            }
        }
        let tn = dot_vv(&tangent, &tangent).max(0.0).sqrt();
        if tn < tol {
            break;
        }
        for j in 0..n {
            mean[j] = tn.cos() * mean[j] + tn.sin() * tangent[j] / tn;
        }
        let un = dot_vv(&mean, &mean).max(0.0).sqrt();
        if un > tol {
            mean.iter_mut().for_each(|x| *x /= un);
        }
    }
    let scale: f64 = if mean_norm.is_some() {
        // Σ f32(α_i)·norm_i in float32 (mergekit's 0-dim tensors)
        (0..n).fold(0f32, |s, i| s + (alphas[i] as f32) * (norms[i] as f32)) as f64
    } else {
        (0..n).map(|i| alphas[i] * norms[i]).sum()
    };
    (0..n)
        .map(|i| {
            if norms[i] > 0.0 {
                scale * mean[i] / norms[i]
            } else {
                0.0
            }
        })
        .collect()
}

/// The most steps karcher's bf16 iteration replays (about 1.5·max_iter² element steps).
pub const KARCHER_BF16_MAX_ITER: usize = 64;

/// Elements per pass unit of karcher's bf16 iteration (a multiple of torch's 8 norm lanes).
const KSPAN: usize = 1 << 16;

/// karcher under bf16 compute: the scalars of mergekit's bf16 iteration. Every step rounds the
/// iterate to bf16, so the mean is no linear combination of the sources; each element's trajectory
/// is replayed from its sources and these scalars (see `karcher_span`).
#[derive(Debug, Clone, Default)]
pub struct KarcherBf16 {
    /// per source torch's float32 norm (`vector_norm`, see `TorchNorm`)
    pub norms: Vec<f32>,
    /// the sources whose norm exceeds tol, and their f32 weights α_i / Σα (Python doubles)
    pub valid: Vec<usize>,
    pub alphas: Vec<f32>,
    /// Some(i): the weighted mean's norm was below tol, the start is valid source i's unit vector
    pub start: Option<usize>,
    /// f32 norm of the initial weighted mean
    pub mean_norm: f32,
    pub steps: Vec<KStep>,
    /// r(Σ f32(1/N)·norm_i) (the f32 scalar is rounded to bf16 as the left operand of a bf16 product)
    pub scale: f32,
    /// no source is valid: zeros
    pub zero: bool,
}

/// One completed step of the iteration.
#[derive(Debug, Clone, Default)]
pub struct KStep {
    /// per valid source: r(⟨mean, u_i⟩) clamped, and r(f32(α_i)·r(θ / r(sin θ))) (None: θ < tol)
    pub dots: Vec<f32>,
    pub ks: Vec<Option<f32>>,
    /// f32 tangent norm, r(cos tn) and r(sin tn)
    pub tn: f32,
    pub cos: f32,
    pub sin: f32,
    /// f32 norm of the updated mean (None: ≤ tol, not renormalised)
    pub unorm: Option<f32>,
}

/// torch.dot of two contiguous bf16 vectors on the CPU (BlasKernel's float-accumulating dot, the
/// same with ATen CPU capability default, AVX2 and AVX512): the f32 products of element e <
/// n & !63 go to accumulator e % 64 (8 registers of 8 lanes, summed in order); the registers are
/// reduced as r[i] += r[i + 4], r[i] += r[i + 2], r[0] += r[1], and its lanes as ((l0 + l4) +
/// (l2 + l6)) + ((l1 + l5) + (l3 + l7)); elements up to n & !15 go to an 8-lane tail vector
/// (lane (e − n & !63) % 8) reduced the same way and added; the last n % 16 products are added one
/// by one. The sum is rounded to bf16 by the caller. Measured against torch 2.15 (bf16 products
/// are exact in f32, so only this order matters).
struct DotAcc {
    regs: [f32; 64],
    tail: [f32; 8],
    rest: Vec<f32>,
    la: usize,
    lv: usize,
}

impl DotAcc {
    fn new(numel: usize) -> Self {
        DotAcc {
            regs: [0.0; 64],
            tail: [0.0; 8],
            rest: Vec::new(),
            la: numel & !63,
            lv: numel & !15,
        }
    }

    /// `p` holds the products of elements a.. in order (called in element order).
    fn add(&mut self, a: usize, p: &[f32]) {
        // whole blocks of 64 below n & !63 (spans start at multiples of 64): vectorised
        let mut p = p;
        let mut a = a;
        if a.is_multiple_of(64) {
            let blocks = (self.la.saturating_sub(a) / 64).min(p.len() / 64);
            let (head, rest) = p.split_at(blocks * 64);
            for blk in head.chunks_exact(64) {
                for (r, &x) in self.regs.iter_mut().zip(blk) {
                    *r += x;
                }
            }
            p = rest;
            a += blocks * 64;
        }
        for (j, &x) in p.iter().enumerate() {
            let e = a + j;
            if e < self.la {
                self.regs[e % 64] += x;
            } else if e < self.lv {
                self.tail[(e - self.la) % 8] += x;
            } else {
                self.rest.push(x);
            }
        }
    }

    fn lanes(v: &[f32]) -> f32 {
        ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7]))
    }

    fn sum(&self) -> f32 {
        let mut r = self.regs;
        for (step, k) in [(4usize, 4usize), (2, 2), (1, 1)] {
            for i in 0..k {
                for l in 0..8 {
                    r[i * 8 + l] += r[(i + step) * 8 + l];
                }
            }
        }
        let mut s = Self::lanes(&r[..8]);
        s += Self::lanes(&self.tail);
        for &x in &self.rest {
            s += x;
        }
        s
    }
}

/// What one element's replay yields.
#[derive(Clone, Copy)]
enum Want {
    /// the initial weighted mean before normalisation
    Raw,
    /// the mean after `k` steps
    Mean(usize),
    /// the tangent of step k (its dots and coefficients known)
    Tangent(usize),
    /// the updated mean of step k before renormalisation (its tangent norm known)
    Pre(usize),
}

/// Scratch of a span's replay: the valid sources' unit vectors, the mean, the tangent.
#[derive(Default)]
struct KBuf {
    u: Vec<Vec<f32>>,
    mean: Vec<f32>,
    t: Vec<f32>,
}

/// Replays elements 0..m of a span (`x`: the sources' bf16 values) and writes the wanted quantity
/// into `res`; each step is a loop over the span's elements (vectorised), in mergekit's order of
/// bf16 operations.
fn karcher_span(
    x: &[Vec<f32>],
    m: usize,
    st: &KarcherBf16,
    want: Want,
    b: &mut KBuf,
    res: &mut [f32],
) {
    let nv = st.valid.len();
    b.u.resize_with(nv, Vec::new);
    b.mean.resize(m, 0.0);
    b.t.resize(m, 0.0);
    let KBuf { u, mean, t } = b;
    let (mean, t, res) = (&mut mean[..m], &mut t[..m], &mut res[..m]);
    // (tensor / norm).to(bf16): the f32 norm is the divisor (torch's scalar fast path)
    for (up, &i) in u.iter_mut().zip(&st.valid) {
        up.resize(m, 0.0);
        let nm = st.norms[i];
        for (o, &v) in up[..m].iter_mut().zip(&x[i][..m]) {
            *o = rb(rb(v) / nm);
        }
    }
    match (st.start, want) {
        (_, Want::Raw) | (None, _) => {
            mean.fill(0.0);
            for (up, &al) in u.iter().zip(&st.alphas) {
                for (o, &v) in mean.iter_mut().zip(&up[..m]) {
                    *o = rb(*o + rb(v * al));
                }
            }
            if let Want::Raw = want {
                res.copy_from_slice(mean);
                return;
            }
            let mn = st.mean_norm;
            mean.iter_mut().for_each(|o| *o = rb(*o / mn));
        }
        (Some(s), _) => mean.copy_from_slice(&u[s][..m]),
    }
    let upto = match want {
        Want::Raw => 0,
        Want::Mean(k) | Want::Tangent(k) | Want::Pre(k) => k,
    };
    for (k, step) in st.steps.iter().enumerate().take(upto + 1) {
        if k == upto && matches!(want, Want::Mean(_)) {
            break;
        }
        t.fill(0.0);
        for (p, up) in u.iter().enumerate() {
            if let Some(c) = step.ks[p] {
                let d = step.dots[p];
                for ((o, &v), &mv) in t.iter_mut().zip(&up[..m]).zip(mean.iter()) {
                    *o = rb(*o + rb(c * rb(v - rb(d * mv))));
                }
            }
        }
        if k == upto && matches!(want, Want::Tangent(_)) {
            res.copy_from_slice(t);
            return;
        }
        // cos(tn)·mean + sin(tn)·(tangent / tn): the 0-dim f32 factors on the left are rounded
        // to bf16 first, the divisor on the right is not
        let (cs, sn, tn) = (step.cos, step.sin, step.tn);
        if k == upto {
            for ((o, &mv), &tv) in res.iter_mut().zip(mean.iter()).zip(t.iter()) {
                *o = rb(rb(cs * mv) + rb(sn * rb(tv / tn)));
            }
            return;
        }
        let un = step.unorm;
        for (o, &tv) in mean.iter_mut().zip(t.iter()) {
            let pre = rb(rb(cs * *o) + rb(sn * rb(tv / tn)));
            *o = match un {
                Some(un) => rb(pre / un),
                None => pre,
            };
        }
    }
    res.copy_from_slice(mean);
}

/// One pass over the tensor in fixed spans: `per_span` runs in parallel on batches of spans
/// (sources loaded and rounded to bf16), `fold` receives the results in element order, so the
/// outcome does not depend on the thread count; memory: a batch of spans.
fn karcher_pass<T, F, G>(ctx: &Ctx, ctl: &Control, per_span: F, fold: G) -> Result<()>
where
    T: Send,
    F: Fn(usize, usize, &[Vec<f32>]) -> T + Sync + Send,
    G: FnMut(usize, T),
{
    karcher_pass_with(ctx, ctl, true, per_span, fold)
}

/// `karcher_pass`, the sources rounded to bf16 only with `round` (bf16 compute).
fn karcher_pass_with<T, F, G>(
    ctx: &Ctx,
    ctl: &Control,
    round: bool,
    per_span: F,
    mut fold: G,
) -> Result<()>
where
    T: Send,
    F: Fn(usize, usize, &[Vec<f32>]) -> T + Sync + Send,
    G: FnMut(usize, T),
{
    use rayon::prelude::*;
    let job = ctx.job;
    let (n, nsrc) = (job.numel, job.sources.len());
    let nspans = n.div_ceil(KSPAN);
    let batch = rayon::current_num_threads().max(1);
    let mut s0 = 0;
    while s0 < nspans {
        let s1 = (s0 + batch).min(nspans);
        let parts: Vec<T> = (s0..s1)
            .into_par_iter()
            .map(|sp| {
                let (a, b) = (sp * KSPAN, ((sp + 1) * KSPAN).min(n));
                super::with_scratch(nsrc, KSPAN, |s| {
                    for (i, &r) in job.sources.iter().enumerate() {
                        ctx.load(r, a, b, &mut s.srcs[i]);
                        if round {
                            super::bf16::round_all(&mut s.srcs[i][..b - a]);
                        }
                    }
                    per_span(a, b - a, &s.srcs)
                })
            })
            .collect();
        ctl.check()?;
        for (k, p) in parts.into_iter().enumerate() {
            fold((s0 + k) * KSPAN, p);
        }
        s0 = s1;
    }
    Ok(())
}

/// torch's f32 norm of a per-element quantity of the replay.
#[allow(clippy::needless_range_loop)]
fn karcher_norm(ctx: &Ctx, ctl: &Control, st: &KarcherBf16, want: Want) -> Result<f32> {
    let mut lanes = TorchNorm::new(ctx.job.numel);
    karcher_pass(
        ctx,
        ctl,
        |_a, m, srcs| {
            let mut res = vec![0f32; m];
            karcher_span(srcs, m, st, want, &mut KBuf::default(), &mut res);
            res
        },
        |a, v| lanes.add(a, &v),
    )?;
    Ok(lanes.norm())
}

/// mergekit's karcher iteration in bf16 (merge_methods/karcher.py under `dtype: bfloat16`).
#[allow(clippy::needless_range_loop)]
pub(crate) fn karcher_bf16(ctx: &Ctx, ctl: &Control) -> Result<KarcherBf16> {
    let job = ctx.job;
    let nsrc = job.sources.len();
    let max_iter = num(job, "max_iter", 10.0).clamp(0.0, 10_000.0) as usize;
    if max_iter > KARCHER_BF16_MAX_ITER {
        return Err(crate::error::Error::Config(format!(
            "{}: karcher under bf16 compute refuses max_iter {max_iter} (at most \
             {KARCHER_BF16_MAX_ITER}: each step replays every element's bf16 trajectory, the cost \
             grows with max_iter²); set compute_dtype: float32 for the exact float32 iteration",
            job.name
        )));
    }
    let tol = num(job, "tol", 1e-5);
    // the sources' norms, torch's f32 summation
    let mut lanes: Vec<TorchNorm> = (0..nsrc).map(|_| TorchNorm::new(job.numel)).collect();
    karcher_pass(
        ctx,
        ctl,
        |_a, m, srcs| (0..nsrc).map(|i| srcs[i][..m].to_vec()).collect::<Vec<_>>(),
        |a, v| {
            for (l, x) in lanes.iter_mut().zip(&v) {
                l.add(a, x);
            }
        },
    )?;
    let norms: Vec<f32> = lanes.iter().map(|l| l.norm()).collect();
    // Python floats: α = 1/N, Σ over the valid sources in order, α / Σ
    let alpha = 1.0 / nsrc as f64;
    let mut st = KarcherBf16 {
        // Σ α·norm_i over all sources: f32 products (the Python float cast to f32), f32 sum
        scale: rb(norms.iter().fold(0f32, |s, &x| s + (alpha as f32) * x)),
        norms,
        ..Default::default()
    };
    st.valid = (0..nsrc).filter(|&i| st.norms[i] as f64 > tol).collect();
    if st.valid.is_empty() {
        st.zero = true;
        return Ok(st);
    }
    let asum = st.valid.iter().fold(0f64, |s, _| s + alpha);
    st.alphas = st.valid.iter().map(|_| (alpha / asum) as f32).collect();
    let mn = karcher_norm(ctx, ctl, &st, Want::Raw)?;
    if (mn as f64) < tol {
        st.start = Some(0);
    } else {
        st.mean_norm = mn;
    }
    let nv = st.valid.len();
    for k in 0..max_iter {
        // torch.dot of the bf16 mean with each unit vector: f32 products summed in torch's order
        // (`DotAcc`), rounded to bf16
        let mut d: Vec<DotAcc> = (0..nv).map(|_| DotAcc::new(job.numel)).collect();
        {
            let stc = &st;
            karcher_pass(
                ctx,
                ctl,
                |_a, m, srcs| {
                    let (mut b, mut mean) = (KBuf::default(), vec![0f32; m]);
                    karcher_span(srcs, m, stc, Want::Mean(k), &mut b, &mut mean);
                    b.u.iter()
                        .map(|up| {
                            mean.iter()
                                .zip(&up[..m])
                                .map(|(&p, &q)| p * q)
                                .collect::<Vec<f32>>()
                        })
                        .collect::<Vec<Vec<f32>>>()
                },
                |a, prods| {
                    for (acc, p) in d.iter_mut().zip(&prods) {
                        acc.add(a, p);
                    }
                },
            )?;
        }
        let mut step = KStep {
            dots: vec![0.0; nv],
            ks: vec![None; nv],
            ..Default::default()
        };
        for i in 0..nv {
            let dot = rb(d[i].sum()).clamp(-1.0, 1.0);
            let th = rb(dot.acos());
            step.dots[i] = dot;
            if (th as f64) < tol {
                continue;
            }
            step.ks[i] = Some(rb(rb(th / rb(th.sin())) * st.alphas[i]));
        }
        st.steps.push(step);
        let tn = karcher_norm(ctx, ctl, &st, Want::Tangent(k))?;
        if (tn as f64) < tol {
            st.steps.pop();
            break;
        }
        {
            let s = st.steps.last_mut().unwrap();
            s.tn = tn;
            s.cos = rb(tn.cos());
            s.sin = rb(tn.sin());
        }
        let un = karcher_norm(ctx, ctl, &st, Want::Pre(k))?;
        if un as f64 > tol {
            st.steps.last_mut().unwrap().unorm = Some(un);
        }
    }
    Ok(st)
}

/// One chunk: raw θ in `srcs` (and `base`), result in `out`. Compiled for AVX2 too (dispatched at
/// run time; the same IEEE operations, no FMA contraction).
pub fn compute(
    job: &Job,
    stats: &Stats,
    chunk: usize,
    m: usize,
    base: &[f32],
    srcs: &[Vec<f32>],
    out: &mut [f32],
) {
    crate::dtype::avx2_dispatch!(compute_generic, compute_avx2, (job: &Job, stats: &Stats, chunk: usize, m: usize, base: &[f32], srcs: &[Vec<f32>], out: &mut [f32]))
}

#[inline(always)]
fn compute_generic(
    job: &Job,
    stats: &Stats,
    chunk: usize,
    m: usize,
    base: &[f32],
    srcs: &[Vec<f32>],
    out: &mut [f32],
) {
    let nsrc = job.sources.len();
    let bf = job.bf16_compute;
    let r = |x: f32| if bf { rb(x) } else { x };
    match job.kernel {
        Kernel::Nearswap => {
            let t = num(job, "t", 0.0) as f32;
            for ((o, &a), &b) in out[..m].iter_mut().zip(base).zip(&srcs[0][..m]) {
                let d = r((a - b).abs());
                // torch evaluates `t / tensor` as reciprocal(tensor) · t
                let w = r(r(1.0 / d.max(r(1e-6))) * t).clamp(0.0, 1.0);
                *o = r(r(w * b) + r(r(1.0 - w) * a));
            }
        }
        Kernel::Ram | Kernel::RamplusTl => {
            let eps = num(job, "epsilon", 1e-5) as f32;
            let lam: &[f32] = match stats {
                Stats::Dare(l) => l,
                _ => &[],
            };
            if bf {
                ram::<true>(eps, lam, &base[..m], &srcs[..nsrc], &mut out[..m]);
            } else {
                ram::<false>(eps, lam, &base[..m], &srcs[..nsrc], &mut out[..m]);
            }
        }
        Kernel::Sce => {
            // sign election on Σ δ_i (unweighted), agreeing δ_i weighted by their source's
            // weight, divided by the agreeing weights; with select_topk < 1 every δ_i is first
            // zeroed outside the variance top-k. bf16 compute rounds as mergekit's bf16 ops do:
            // δ_i = r(θ_i − θ_b); elected = r(Σ δ_i) ≥ 0; num = r(Σ r(δ_i·w_i)), den = r(Σ w_i)
            // over the agreeing ones; out = r(θ_b + r(num / max(den, r(1e-6)))).
            let (w, rule) = match stats {
                Stats::Dare(w) => (w, None),
                Stats::SceTopk { rule, w } => (w, Some(rule)),
                _ => unreachable!("sce without stats"),
            };
            // per-thread buffers reused across chunks (taken once per chunk)
            let (mut dl, mut keep) = SCE_BUF.with(|b| std::mem::take(&mut *b.borrow_mut()));
            dl.resize_with(nsrc, Vec::new);
            for (d, src) in dl.iter_mut().zip(srcs) {
                d.clear();
                d.resize(m, 0.0);
                for ((o, &x), &b0) in d.iter_mut().zip(&src[..m]).zip(&base[..m]) {
                    *o = r(x - b0);
                }
            }
            if let Some(rule) = rule {
                super::methods_sph::variances(&dl, nsrc, m, &mut keep);
                if bf {
                    super::bf16::round_all(&mut keep);
                }
                rule.apply(chunk, &mut keep[..m]);
            }
            if rule.is_some() {
                // outside the top-k: δ·0 (mergekit multiplies by the mask)
                for d in dl.iter_mut() {
                    for (x, &k) in d.iter_mut().zip(&keep[..m]) {
                        *x = if k != 0.0 { *x } else { *x * 0.0 };
                    }
                }
            }
            if bf {
                sce_mix::<true>(w, &dl, &base[..m], &mut out[..m]);
            } else {
                sce_mix::<false>(w, &dl, &base[..m], &mut out[..m]);
            }
            SCE_BUF.with(|b| *b.borrow_mut() = (dl, keep));
        }
        Kernel::Karcher if matches!(stats, Stats::KarcherBf16(_)) => {
            let Stats::KarcherBf16(st) = stats else {
                unreachable!()
            };
            if st.zero {
                out[..m].fill(0.0);
            } else {
                let last = st.steps.len();
                karcher_span(srcs, m, st, Want::Mean(last), &mut KBuf::default(), out);
                let sc = st.scale;
                out[..m].iter_mut().for_each(|o| *o = rb(sc * *o));
            }
        }
        Kernel::Karcher => {
            let c = match stats {
                Stats::Dare(c) => c,
                _ => unreachable!("karcher without stats"),
            };
            out[..m].fill(0.0);
            for (src, &ci) in srcs.iter().zip(c).take(nsrc) {
                for (o, &x) in out[..m].iter_mut().zip(&src[..m]) {
                    *o += ci * x;
                }
            }
        }
        _ => unreachable!("not a kernel of methods_mk"),
    }
}

thread_local! {
    /// sce's per-chunk δ buffers and variance mask, reused by each worker thread.
    static SCE_BUF: std::cell::RefCell<(Vec<Vec<f32>>, Vec<f32>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// sce's mix of a chunk's (masked) δ_i, per element in mergekit's order: sum = Σ_i δ_i, elected
/// sign r(sum) ≥ 0, num = Σ r(δ_i·w_i) and den = Σ w_i over the δ_i of that sign (in source
/// order), out = r(θ_b + r(r(num) / max(r(den), r(1e-6)))). Blocked, sources outer, so the loops
/// vectorise: a left-out term adds +0.0, which leaves num and den (never −0.0) as they are.
#[inline(always)]
fn sce_mix<const BF: bool>(w: &[f32], dl: &[Vec<f32>], base: &[f32], out: &mut [f32]) {
    let r = |x: f32| if BF { rb(x) } else { x };
    let floor = r(1e-6);
    let m = out.len();
    let mut j0 = 0;
    while j0 < m {
        let n = RAM_BLOCK.min(m - j0);
        let mut sum = [0f32; RAM_BLOCK];
        for d in dl {
            for (s, &x) in sum[..n].iter_mut().zip(&d[j0..j0 + n]) {
                *s += x;
            }
        }
        for s in sum[..n].iter_mut() {
            *s = r(*s);
        }
        let (mut num, mut den) = ([0f32; RAM_BLOCK], [0f32; RAM_BLOCK]);
        for (d, &wi) in dl.iter().zip(w) {
            for (((nu, de), &s), &di) in num[..n]
                .iter_mut()
                .zip(&mut den[..n])
                .zip(&sum[..n])
                .zip(&d[j0..j0 + n])
            {
                let pos = s >= 0.0;
                let agree = (di > 0.0 && pos) || (di < 0.0 && !pos);
                *nu += if agree { r(di * wi) } else { 0.0 };
                *de += if agree { wi } else { 0.0 };
            }
        }
        for (((o, &b0), &nu), &de) in out[j0..j0 + n]
            .iter_mut()
            .zip(&base[j0..j0 + n])
            .zip(&num[..n])
            .zip(&den[..n])
        {
            *o = r(b0 + r(r(nu) / r(de).max(floor)));
        }
        j0 += n;
    }
}

/// sce's per-chunk Σ δ² of one source `x` (and of a second one `y`, summed side by side in the
/// same loop): f64, in element order; δ² is r(δ·δ) as f64 under bf16 compute, else the f64 square.
/// With `kept` (the variances after the top-k rule), only elements whose entry is nonzero count:
/// the others add +0.0, branch-free (the selection is irregular), which leaves the sums as they are
/// (every term is ≥ +0.0).
#[inline(always)]
fn sce_sq_sums<const BF: bool>(x: &[f32], y: Option<&[f32]>, kept: Option<&[f32]>) -> (f64, f64) {
    #[inline(always)]
    fn sq<const BF: bool>(v: f32) -> f64 {
        if BF {
            rb(v * v) as f64
        } else {
            v as f64 * v as f64
        }
    }
    let mask = |k: f32| 0u64.wrapping_sub(u64::from(k != 0.0));
    let on = |t: f64, mk: u64| f64::from_bits(t.to_bits() & mk);
    let (mut a0, mut a1) = (0f64, 0f64);
    match (y, kept) {
        (Some(y), Some(k)) => {
            for ((&u, &v), &kk) in x.iter().zip(y).zip(k) {
                let mk = mask(kk);
                a0 += on(sq::<BF>(u), mk);
                a1 += on(sq::<BF>(v), mk);
            }
        }
        (Some(y), None) => {
            for (&u, &v) in x.iter().zip(y) {
                a0 += sq::<BF>(u);
                a1 += sq::<BF>(v);
            }
        }
        (None, Some(k)) => {
            for (&u, &kk) in x.iter().zip(k) {
                a0 += on(sq::<BF>(u), mask(kk));
            }
        }
        (None, None) => {
            for &u in x {
                a0 += sq::<BF>(u);
            }
        }
    }
    (a0, a1)
}

/// Elements per block of `ram` (stack arrays of counts and sums).
const RAM_BLOCK: usize = 256;

/// ram / ramplus_tl over a chunk, per element exactly as mergekit orders it: c = the number of δ_i
/// with |δ_i| > eps; acc = Σ_i (in source order, skipping |δ_i| ≤ eps) of δ_i (·λ_i for
/// ramplus_tl) when c = 1, else δ_i / c. Blocked, sources outer and elements inner, so the loops
/// vectorise: a skipped term adds +0.0, which leaves acc (never −0.0, it starts at +0.0) as it is.
#[inline(always)]
fn ram<const BF: bool>(eps: f32, lam: &[f32], base: &[f32], srcs: &[Vec<f32>], out: &mut [f32]) {
    let r = |x: f32| if BF { rb(x) } else { x };
    let m = out.len();
    let mut j0 = 0;
    while j0 < m {
        let n = RAM_BLOCK.min(m - j0);
        let bb = &base[j0..j0 + n];
        let mut cnt = [0f32; RAM_BLOCK];
        for src in srcs {
            for ((c, &x), &b0) in cnt[..n].iter_mut().zip(&src[j0..j0 + n]).zip(bb) {
                *c += if r(x - b0).abs() > eps { 1.0 } else { 0.0 };
            }
        }
        let mut acc = [0f32; RAM_BLOCK];
        for (i, src) in srcs.iter().enumerate() {
            let li = lam.get(i).copied();
            for (((s, &c), &x), &b0) in acc[..n]
                .iter_mut()
                .zip(&cnt[..n])
                .zip(&src[j0..j0 + n])
                .zip(bb)
            {
                let d = r(x - b0);
                let t = if c == 1.0 {
                    match li {
                        Some(l) => d * l,
                        None => d,
                    }
                } else {
                    r(d / c)
                };
                *s += if d.abs() <= eps { 0.0 } else { t };
            }
        }
        // ramplus_tl: λ is a float32 tensor, so under bf16 compute mergekit's sum and the final
        // add are float32 (promoted); ram stays in bf16
        let o = &mut out[j0..j0 + n];
        if lam.is_empty() {
            for ((o, &b0), &s) in o.iter_mut().zip(bb).zip(&acc[..n]) {
                *o = r(b0 + r(s));
            }
        } else {
            for ((o, &b0), &s) in o.iter_mut().zip(bb).zip(&acc[..n]) {
                *o = b0 + s;
            }
        }
        j0 += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn karcher_of_orthogonal_equal_vectors_is_their_normalised_mean() {
        // θ_1 = e1, θ_2 = e2: the mean direction is (e1 + e2)/√2, scale 1 → c = (1/√2, 1/√2)
        let gram = [1.0, 0.0, 0.0, 1.0];
        let c = karcher_coefficients(&gram, 2, 10, 1e-5);
        let h = std::f64::consts::FRAC_1_SQRT_2;
        assert!((c[0] - h).abs() < 1e-9 && (c[1] - h).abs() < 1e-9, "{c:?}");
    }

    /// Three unit directions about 0.1 rad apart, not symmetric: the normalised mean is not quite
    /// their Karcher mean (the exact tangent norm at the start is below tol = 1e-5).
    const G3: [f64; 9] = [1.0, 0.995, 0.9952, 0.995, 1.0, 0.9949, 0.9952, 0.9949, 1.0];

    fn direction(c: &[f64]) -> Vec<f64> {
        let n = 3;
        let q: f64 = (0..n)
            .flat_map(|i| (0..n).map(move |j| (i, j)))
            .map(|(i, j)| c[i] * c[j] * G3[i * n + j])
            .sum();
        c.iter().map(|x| x / q.sqrt()).collect()
    }

    #[test]
    fn karcher_with_exact_norms_is_the_exact_iteration() {
        let norms = [1.0; 3];
        assert_eq!(
            karcher_coefficients_with(&G3, 3, &norms, None, 10, 1e-5),
            karcher_coefficients(&G3, 3, 10, 1e-5)
        );
    }

    #[test]
    fn karcher_with_float32_norms_steps_on_to_the_karcher_mean() {
        // exact arithmetic stops at the normalised mean; iterated on (tol 1e-14) it moves
        let stop = direction(&karcher_coefficients(&G3, 3, 10, 1e-5));
        let conv = direction(&karcher_coefficients(&G3, 3, 50, 1e-14));
        let moved = stop
            .iter()
            .zip(&conv)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(moved > 1e-7, "{stop:?} {conv:?}");
        // torch's float32 norms 3e-5 high (as on the bench trio's 4M-element tensors): the units and
        // the mean are 3e-5 short of length 1, the tangent's radial part keeps mergekit stepping
        let b = 1.0 + 3e-5;
        let norms = [b; 3];
        let a = (1.0f64 / 3.0) as f32 as f64;
        let raw: f64 = (0..9).map(|k| a * a * G3[k]).sum::<f64>().sqrt() / b;
        let c = karcher_coefficients_with(&G3, 3, &norms, Some(raw * b), 10, 1e-5);
        let d = direction(&c);
        let off = d
            .iter()
            .zip(&conv)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max);
        assert!(off < moved / 20.0, "{off} vs {moved}: {d:?} {conv:?}");
    }

    #[test]
    fn karcher_with_low_float32_norms_clamps_every_dot_and_takes_no_step() {
        // norms 0.58% low (torch's on a 65M-element embedding): every ⟨mean, u_i⟩ exceeds 1, is
        // clamped, θ = 0 for all; the result is the normalised mean scaled by the norms' mean
        let b = 1.0 - 5.8e-3;
        let norms = [b; 3];
        let a = (1.0f64 / 3.0) as f32 as f64;
        let mn = (0..9).map(|k| a * a * G3[k]).sum::<f64>().sqrt() / b * (1.0 - 5.8e-3);
        let c = karcher_coefficients_with(&G3, 3, &norms, Some(mn), 10, 1e-5);
        let scale = (0..3).fold(0f32, |s, _| s + (1.0f64 / 3.0) as f32 * b as f32) as f64;
        for x in &c {
            assert!((x - scale * a / mn / b).abs() < 1e-12, "{c:?}");
        }
    }

    #[test]
    fn karcher_of_parallel_vectors_averages_norms() {
        // θ_2 = 3·θ_1: one direction; scale = (1 + 3)/2 = 2 → 2·θ_1 = c1·θ_1 + c2·θ_2
        let gram = [1.0, 3.0, 3.0, 9.0];
        let c = karcher_coefficients(&gram, 2, 10, 1e-5);
        assert!((c[0] + 3.0 * c[1] - 2.0).abs() < 1e-9, "{c:?}");
    }
}
