//! The kernels of `plan::KERNELS`: whole-tensor statistics (extra streaming passes) and the
//! per-chunk arithmetic. Semantics follow mergekit's merge methods (docs/merge-plan.md lists what
//! each kernel computes); operation order mirrors it so that float32 results round the same way.

use std::sync::atomic::Ordering;

use super::plan::{Job, Kernel};
use super::rng::KeepStream;
use super::select::{self, Bound, KeepRule, HI_BINS, LO_BINS};
use super::{store_chunk, with_scratch, Control, Ctx, Scratch};
use crate::error::Result;
use crate::safetensors::write::Writer;

/// Whole-tensor quantities a job needs before its chunks can be computed.
#[derive(Debug, Clone)]
pub enum Stats {
    None,
    /// Per source: which ranks of |δ| survive (ties, breadcrumbs).
    Keep(Vec<KeepRule>),
    /// As `Keep`, with `rescale`: per source the factor L1(δ) / L1(kept δ) applied to kept entries.
    KeepScaled(Vec<KeepRule>, Vec<f32>),
    /// Per source DARE rescale factor.
    Dare(Vec<f32>),
    /// out = c0·v0 + c1·v1.
    Slerp {
        c0: f32,
        c1: f32,
    },
    /// Per row (row_len elements) interpolation factor t.
    Stock {
        row_len: usize,
        t: Vec<f32>,
    },
    /// out = Σ_i c[g·k + i]·v_i for element e of vector g = groups.of(e); with `deltas`,
    /// v_i = θ_i − θ_b and θ_b is added back (nuslerp, multislerp).
    Lin {
        groups: super::methods_sph::Groups,
        deltas: bool,
        k: usize,
        c: Vec<f32>,
    },
    /// nuslerp under float32 compute over the whole flattened tensor: mergekit's float32 scalars
    /// [sin((1 − t)θ), sin(tθ), sin θ] (colinear: [1 − t, t, 1]); out = (s₀·v₀ + s₁·v₁) / s₂ in
    /// mergekit's order (+ θ_b with `deltas`).
    NuslerpF32 {
        deltas: bool,
        s: [f32; 3],
    },
    /// nuslerp under bf16 compute: per vector [n₀, n₁, s₀, s₁, sin θ, colinear] (methods_sph.rs).
    NuslerpBf16 {
        groups: super::methods_sph::Groups,
        deltas: bool,
        t: f32,
        c: Vec<f32>,
    },
    /// multislerp replayed op by op under bf16 or float32 compute (methods_sph.rs).
    MultislerpBf16 {
        deltas: bool,
        st: super::methods_sph::MsBf16,
    },
    /// arcee_fusion: per-row KL factor of the importance, and its threshold.
    Fusion {
        row_len: usize,
        kl: Vec<f32>,
        thr: f32,
    },
    /// sce with select_topk < 1: the variance top-k (a rule on the per-element variances) and the
    /// per-source weights.
    SceTopk {
        rule: KeepRule,
        w: Vec<f32>,
    },
    /// karcher under bf16 compute: the scalars of mergekit's bf16 iteration (methods_mk.rs).
    KarcherBf16(Box<super::methods_mk::KarcherBf16>),
    /// della / della_linear: rescale factors and the statistics pass's masks (methods_mk.rs).
    Della(Box<super::methods_mk::DellaStats>),
}

fn sparse(job: &Job) -> bool {
    job.densities.iter().any(|&d| d < 1.0)
}

pub fn needs_stats(job: &Job) -> bool {
    match job.kernel {
        Kernel::Ties | Kernel::Breadcrumbs | Kernel::BreadcrumbsTies => sparse(job),
        Kernel::DareLinear | Kernel::DareTies => job.rescale && sparse(job),
        Kernel::Slerp | Kernel::ModelStock => true,
        k if super::methods_sph::handles(k) => true,
        k if super::methods_mk::handles(k) => super::methods_mk::needs_stats(job),
        _ => false,
    }
}

/// The rank range [lo, hi) of |δ| kept for source i.
fn keep_ranks(job: &Job, i: usize) -> Option<(u64, u64)> {
    let n = job.numel as u64;
    let d = job.densities[i];
    if d >= 1.0 {
        return None;
    }
    let target = (d * n as f64).floor() as u64;
    match job.kernel {
        // mergekit's magnitude pruning keeps at least one element when density > 0.
        Kernel::Ties if d > 0.0 => Some((0, target.max(1).min(n))),
        Kernel::Ties => Some((0, 0)),
        _ => {
            let mut top = (job.gammas[i] * n as f64).floor() as u64;
            let bot = n as i64 - target as i64 - top as i64;
            if bot < 0 {
                top = (top as i64 + bot).max(0) as u64;
            }
            Some((top, (top + target).min(n)))
        }
    }
}

/// Exact keep rules for every source via radix selection (2 passes, +1 when ties must be split).
fn keep_rules(ctx: &Ctx, ctl: &Control) -> Result<Vec<KeepRule>> {
    let job = ctx.job;
    let n = job.numel as u64;
    let nsrc = job.sources.len();
    let ranks: Vec<Option<(u64, u64)>> = (0..nsrc).map(|i| keep_ranks(job, i)).collect();
    // Boundaries needing selection: (source, R).
    let mut wanted: Vec<(usize, u64)> = Vec::new();
    for (i, r) in ranks.iter().enumerate() {
        if let Some((lo, hi)) = r {
            for &b in &[*lo, *hi] {
                if b > 0 && b < n && !wanted.contains(&(i, b)) {
                    wanted.push((i, b));
                }
            }
        }
    }
    let mut bounds: Vec<((usize, u64), Bound)> = Vec::new();
    if !wanted.is_empty() {
        // Pass 1: top-15-bit histograms of |δ| per source.
        let hist = ctx.fold(
            ctl,
            true,
            || vec![0u64; nsrc * HI_BINS],
            |h, _c, _a, s, m| {
                for i in 0..nsrc {
                    let hh = &mut h[i * HI_BINS..(i + 1) * HI_BINS];
                    for &x in &s.srcs[i][..m] {
                        hh[(select::key(x) >> 16) as usize] += 1;
                    }
                }
            },
            add_vecs,
        )?;
        let pend: Vec<select::Pending> = wanted
            .iter()
            .map(|&(i, r)| select::locate_bucket(&hist[i * HI_BINS..(i + 1) * HI_BINS], r))
            .collect();
        drop(hist);
        // Pass 2: low-16-bit histograms inside each needed (source, bucket).
        let mut pairs: Vec<(usize, u32)> = Vec::new();
        for (k, p) in pend.iter().enumerate() {
            let key = (wanted[k].0, p.bucket);
            if !pairs.contains(&key) {
                pairs.push(key);
            }
        }
        let np = pairs.len();
        let nc = ctx.nchunks;
        // Besides the histograms, remember per chunk the few distinct low values seen in the
        // bucket with their counts: with bf16-derived deltas a bucket holds one or two values,
        // so the per-chunk tie counts of pass 3 are usually known without another pass.
        let (lo, maps) = ctx.fold(
            ctl,
            true,
            || (vec![0u64; np * LO_BINS], vec![TieMap::default(); nc * np]),
            |(h, maps), c, _a, s, m| {
                for (pi, &(i, b)) in pairs.iter().enumerate() {
                    let hh = &mut h[pi * LO_BINS..(pi + 1) * LO_BINS];
                    let map = &mut maps[c * np + pi];
                    map.seen = true;
                    for &x in &s.srcs[i][..m] {
                        let k = select::key(x);
                        if k >> 16 == b {
                            hh[(k & 0xFFFF) as usize] += 1;
                            map.add((k & 0xFFFF) as u16);
                        }
                    }
                }
            },
            |(mut h1, mut m1), (h2, m2)| {
                for (x, y) in h1.iter_mut().zip(h2) {
                    *x += y;
                }
                for (x, y) in m1.iter_mut().zip(m2) {
                    if y.seen {
                        *x = y;
                    }
                }
                (h1, m1)
            },
        )?;
        let ths: Vec<select::Threshold> = pend
            .iter()
            .enumerate()
            .map(|(k, p)| {
                let pi = pairs
                    .iter()
                    .position(|&x| x == (wanted[k].0, p.bucket))
                    .unwrap();
                select::locate_value(p, &lo[pi * LO_BINS..(pi + 1) * LO_BINS])
            })
            .collect();
        drop(lo);
        // Split ties need per-chunk counts of elements equal to the threshold: from the maps,
        // and by a pass over just the chunks whose map overflowed.
        let split: Vec<usize> = (0..wanted.len())
            .filter(|&k| ths[k].keep < ths[k].count_eq)
            .collect();
        let mut prefixes: Vec<Vec<u64>> = vec![Vec::new(); wanted.len()];
        if !split.is_empty() {
            let ns = split.len();
            let pair_of = |k: usize| {
                pairs
                    .iter()
                    .position(|&x| x == (wanted[k].0, ths[k].t >> 16))
                    .unwrap()
            };
            let mut counts = vec![0u64; nc * ns];
            let mut redo: Vec<usize> = Vec::new();
            for c in 0..nc {
                let mut need = false;
                for (q, &k) in split.iter().enumerate() {
                    match maps[c * np + pair_of(k)].count((ths[k].t & 0xFFFF) as u16) {
                        Some(n) => counts[c * ns + q] = n,
                        None => need = true,
                    }
                }
                if need {
                    redo.push(c);
                }
            }
            drop(maps);
            if !redo.is_empty() {
                let extra = ctx.fold_over(
                    &redo,
                    ctl,
                    true,
                    || vec![0u64; nc * ns],
                    |h, c, _a, s, m| {
                        for (q, &k) in split.iter().enumerate() {
                            let (i, t) = (wanted[k].0, ths[k].t);
                            h[c * ns + q] = s.srcs[i][..m]
                                .iter()
                                .filter(|&&x| select::key(x) == t)
                                .count() as u64;
                        }
                    },
                    add_vecs,
                )?;
                for &c in &redo {
                    counts[c * ns..(c + 1) * ns].copy_from_slice(&extra[c * ns..(c + 1) * ns]);
                }
            }
            for (q, &k) in split.iter().enumerate() {
                let mut acc = 0u64;
                let mut p = Vec::with_capacity(nc + 1);
                for c in 0..nc {
                    p.push(acc);
                    acc += counts[c * ns + q];
                }
                p.push(acc);
                prefixes[k] = p;
            }
        }
        for (k, &w) in wanted.iter().enumerate() {
            let th = ths[k];
            let b = if th.keep == th.count_eq {
                Bound::Ge(th.t)
            } else {
                Bound::Tie {
                    t: th.t,
                    keep: th.keep,
                    prefix: std::mem::take(&mut prefixes[k]),
                }
            };
            bounds.push((w, b));
        }
    }
    let bound = |i: usize, r: u64| -> Bound {
        if r == 0 {
            Bound::Never
        } else if r >= n {
            Bound::Always
        } else {
            bounds
                .iter()
                .find(|(w, _)| *w == (i, r))
                .map(|(_, b)| b.clone())
                .expect("selected")
        }
    };
    Ok(ranks
        .iter()
        .enumerate()
        .map(|(i, r)| match r {
            None => KeepRule::all(),
            Some((lo, hi)) => KeepRule {
                lo: bound(i, *lo),
                hi: bound(i, *hi),
            },
        })
        .collect())
}

/// The distinct low-16-bit values (up to 4) met in one chunk's bucket, with their counts.
#[derive(Debug, Clone, Copy, Default)]
struct TieMap {
    lows: [u16; 4],
    counts: [u32; 4],
    n: u8,
    overflow: bool,
    seen: bool,
}

impl TieMap {
    #[inline]
    fn add(&mut self, low: u16) {
        for j in 0..self.n as usize {
            if self.lows[j] == low {
                self.counts[j] += 1;
                return;
            }
        }
        if (self.n as usize) < self.lows.len() {
            self.lows[self.n as usize] = low;
            self.counts[self.n as usize] = 1;
            self.n += 1;
        } else {
            self.overflow = true;
        }
    }

    /// Elements equal to `low` in the bucket, or None when the map overflowed.
    fn count(&self, low: u16) -> Option<u64> {
        for j in 0..self.n as usize {
            if self.lows[j] == low {
                return Some(self.counts[j] as u64);
            }
        }
        if self.overflow {
            None
        } else {
            Some(0)
        }
    }
}

fn add_vecs<T: std::ops::AddAssign + Copy>(mut a: Vec<T>, b: Vec<T>) -> Vec<T> {
    for (x, y) in a.iter_mut().zip(b) {
        *x += y;
    }
    a
}

fn dare_streams(job: &Job, seed: u64) -> Vec<KeepStream> {
    (0..job.sources.len())
        .map(|i| KeepStream::new(seed, &job.name, i, job.densities[i]))
        .collect()
}

/// Runs the statistics passes a job needs.
pub(crate) fn compute_stats(ctx: &Ctx, seed: u64, ctl: &Control) -> Result<Stats> {
    let job = ctx.job;
    let nsrc = job.sources.len();
    match job.kernel {
        Kernel::Ties | Kernel::Breadcrumbs | Kernel::BreadcrumbsTies => {
            let rules = keep_rules(ctx, ctl)?;
            if !job.rescale {
                return Ok(Stats::Keep(rules));
            }
            // rescale: L1 of each δ and of its kept part (one more pass), as for DARE.
            let sums = ctx.fold_ordered(
                ctl,
                true,
                || vec![0f64; 2 * nsrc],
                |acc, c, _a, s, m| {
                    let mut kept = Vec::with_capacity(m);
                    for (i, rule) in rules.iter().enumerate() {
                        let d = &s.srcs[i][..m];
                        kept.clear();
                        kept.extend_from_slice(d);
                        rule.apply(c, &mut kept);
                        acc[2 * i] += d.iter().map(|&x| x.abs() as f64).sum::<f64>();
                        acc[2 * i + 1] += kept.iter().map(|&x| x.abs() as f64).sum::<f64>();
                    }
                },
                add_vecs,
            )?;
            let f = (0..nsrc)
                .map(|i| {
                    let (b, a) = (sums[2 * i], sums[2 * i + 1]);
                    if job.densities[i] >= 1.0 {
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
            Ok(Stats::KeepScaled(rules, f))
        }
        Kernel::DareLinear | Kernel::DareTies => {
            let streams = dare_streams(job, seed);
            let sums = ctx.fold_ordered(
                ctl,
                true,
                || vec![0f64; 2 * nsrc],
                |acc, _c, a, s, m| {
                    for i in 0..nsrc {
                        let (before, after) = l1_kept(&s.srcs[i][..m], &streams[i], a as u64);
                        acc[2 * i] += before;
                        acc[2 * i + 1] += after;
                    }
                },
                add_vecs,
            )?;
            Ok(Stats::Dare(
                (0..nsrc)
                    .map(|i| {
                        let (b, a) = (sums[2 * i], sums[2 * i + 1]);
                        if job.bf16_compute && job.densities[i] < 1.0 {
                            super::bf16::rescale_factor(b, a)
                        } else if job.densities[i] >= 1.0 || b < 1e-7 || a < 1e-7 {
                            1.0
                        } else {
                            (b / a) as f32
                        }
                    })
                    .collect(),
            ))
        }
        Kernel::Slerp => {
            // ⟨v0, v1⟩, ‖v0‖², ‖v1‖² in f64 (eight lanes per chunk), summed in chunk order
            let v = ctx.fold_ordered(
                ctl,
                false,
                || [0f64; 3],
                |acc, _c, _a, s, m| *acc = dot3(&s.base[..m], &s.srcs[0][..m]),
                |a, b| [a[0] + b[0], a[1] + b[1], a[2] + b[2]],
            )?;
            Ok(slerp_coeffs(job.t, v[0], v[1].sqrt(), v[2].sqrt()))
        }
        Kernel::ModelStock => {
            let row_len = if job.filter_wise && job.shape.len() >= 2 {
                *job.shape.last().unwrap()
            } else {
                job.numel.max(1)
            };
            let nrows = job.numel / row_len.max(1);
            let npairs = nsrc * (nsrc - 1) / 2;
            let k = npairs + nsrc;
            // bf16 compute (deltas already rounded): the dot products sum the rounded products
            // r(δ_x·δ_y), the norms sum the squares unrounded (torch's norm accumulates in f32)
            let bf = job.bf16_compute;
            if !bf && nrows <= 1 {
                // float32 compute over the whole tensor: the norms are torch's float32 ones (8
                // sequential lanes; on the 0.84B bench trio 2.6e-4 low on 4M-element task vectors,
                // 0.23% on 65M), not exact ones: t ≈ 2·cos moves with them (59008 f32 ulps on the
                // embedding), and with it the elements where t·mean and (1 − t)·base cancel. The
                // dot stays exact (torch's pairwise float32 sum is within 1e-6 of it).
                let (tn, dots) = super::methods_sph::torch_norms_and_dots(ctx, ctl, true)?;
                let nf = nsrc as f32;
                let mut sum = 0f32;
                let mut p = 0;
                for x in 0..nsrc {
                    for y in x + 1..nsrc {
                        let np = tn[x] * tn[y];
                        sum += ((dots[p] as f32) / np.max(1e-6)).clamp(-1.0, 1.0);
                        p += 1;
                    }
                }
                let cos = sum / npairs as f32;
                // mergekit keeps the base where 1 + (n − 1)·cos vanishes
                let den = 1.0 + (nf - 1.0) * cos;
                let t = if den.abs() < 1e-6 {
                    0.0
                } else {
                    (nf * cos) / den
                };
                return Ok(Stats::Stock {
                    row_len,
                    t: vec![t],
                });
            }
            // per chunk, the partial sums of each row it touches (row, then its k sums), added
            // into the rows in chunk order: the same sums whatever the thread count
            let parts = ctx.fold_ordered(
                ctl,
                true,
                || (Vec::new(), Vec::new()),
                |(rows, sums): &mut (Vec<usize>, Vec<f64>), _c, a, s, m| {
                    let mut j = 0;
                    while j < m {
                        let row = (a + j) / row_len;
                        let end = ((row + 1) * row_len - a).min(m);
                        rows.push(row);
                        let at = sums.len();
                        sums.resize(at + k, 0.0);
                        let slot = &mut sums[at..];
                        if nsrc == 2 && !bf {
                            // the pair's dot and both norms in one pass
                            let [ab, aa, bb] = dot3(&s.srcs[0][j..end], &s.srcs[1][j..end]);
                            slot[0] = ab;
                            slot[1] = aa;
                            slot[2] = bb;
                            j = end;
                            continue;
                        }
                        let mut p = 0;
                        for x in 0..nsrc {
                            for y in x + 1..nsrc {
                                slot[p] = if bf {
                                    s.srcs[x][j..end]
                                        .iter()
                                        .zip(&s.srcs[y][j..end])
                                        .map(|(&u, &v)| super::bf16::rb(u * v) as f64)
                                        .sum::<f64>()
                                } else {
                                    dot(&s.srcs[x][j..end], &s.srcs[y][j..end])
                                };
                                p += 1;
                            }
                            slot[npairs + x] = dot(&s.srcs[x][j..end], &s.srcs[x][j..end]);
                        }
                        j = end;
                    }
                },
                |(mut r0, mut s0), (r1, s1)| {
                    r0.extend(r1);
                    s0.extend(s1);
                    (r0, s0)
                },
            )?;
            let mut acc = vec![0f64; nrows.max(1) * k];
            for (i, &row) in parts.0.iter().enumerate() {
                for (x, y) in acc[row * k..(row + 1) * k]
                    .iter_mut()
                    .zip(&parts.1[i * k..(i + 1) * k])
                {
                    *x += y;
                }
            }
            let nf = nsrc as f32;
            let r = |x: f32| if bf { super::bf16::rb(x) } else { x };
            let t = (0..nrows.max(1))
                .map(|row| {
                    let slot = &acc[row * k..(row + 1) * k];
                    let mut p = 0;
                    let mut sum = 0f32;
                    for x in 0..nsrc {
                        for y in x + 1..nsrc {
                            let (na, nb) = if bf {
                                (
                                    r((slot[npairs + x] as f32).sqrt()),
                                    r((slot[npairs + y] as f32).sqrt()),
                                )
                            } else {
                                (
                                    slot[npairs + x].sqrt() as f32,
                                    slot[npairs + y].sqrt() as f32,
                                )
                            };
                            let np = r(na * nb);
                            sum += r(r(slot[p] as f32) / np.max(r(1e-6))).clamp(-1.0, 1.0);
                            p += 1;
                        }
                    }
                    let cos = r(sum / npairs as f32);
                    if bf {
                        // mergekit keeps the base where 1 + (n − 1)·cos vanishes
                        let den = r(1.0 + r((nf - 1.0) * cos));
                        if den.abs() < 1e-6 {
                            0.0
                        } else {
                            r(r(nf * cos) / den)
                        }
                    } else {
                        (nf * cos) / (1.0 + (nf - 1.0) * cos)
                    }
                })
                .collect();
            Ok(Stats::Stock { row_len, t })
        }
        k if super::methods_mk::handles(k) => super::methods_mk::compute_stats(ctx, seed, ctl),
        k if super::methods_sph::handles(k) => super::methods_sph::compute_stats(ctx, seed, ctl),
        _ => Ok(Stats::None),
    }
}

/// DARE: keep each element with the stream's probability, scaling kept ones by `f`.
/// Split where the index's high 32 bits change, so each part hashes a 32-bit counter against a
/// fixed high word (`KeepStream::draw_lo`) and the loop vectorises.
#[inline(always)]
fn dare_mask(d: &mut [f32], k: &KeepStream, a: u64, f: f32) {
    let mut rest = d;
    let mut idx = a;
    while !rest.is_empty() {
        // elements left before the high word of the index changes
        let span = ((1u64 << 32) - (idx & 0xFFFF_FFFF)).min(rest.len() as u64) as usize;
        let (part, tail) = rest.split_at_mut(span);
        let hi = k.hi_word((idx >> 32) as u32);
        let lo0 = idx as u32;
        for (j, x) in part.iter_mut().enumerate() {
            let keep = k.keep_lo(lo0.wrapping_add(j as u32), hi);
            *x = if keep { *x * f } else { 0.0 };
        }
        idx += span as u64;
        rest = tail;
    }
}

/// (Σ|d|, Σ|d| over kept elements) for a chunk starting at element `a`.
fn l1_kept(d: &[f32], k: &KeepStream, a: u64) -> (f64, f64) {
    crate::dtype::avx2_dispatch!(l1_kept_generic, l1_kept_avx2, (d: &[f32], k: &KeepStream, a: u64) -> (f64, f64))
}

/// Eight f32 lanes over blocks of 512 elements (vectorisable), blocks summed in f64.
#[inline(always)]
fn l1_kept_generic(d: &[f32], k: &KeepStream, a: u64) -> (f64, f64) {
    let (mut before, mut after) = (0f64, 0f64);
    for (b, block) in d.chunks(512).enumerate() {
        let start = a + (b * 512) as u64;
        let mut lb = [0f32; 8];
        let mut la = [0f32; 8];
        let mut groups = block.chunks_exact(8);
        for (g, xs) in groups.by_ref().enumerate() {
            let base = start + (g * 8) as u64;
            for l in 0..8 {
                let ax = xs[l].abs();
                let keep = k.keep(base + l as u64);
                lb[l] += ax;
                la[l] += if keep { ax } else { 0.0 };
            }
        }
        let rest = groups.remainder();
        let base = start + (block.len() - rest.len()) as u64;
        for (l, &x) in rest.iter().enumerate() {
            let ax = x.abs();
            lb[l] += ax;
            la[l] += if k.keep(base + l as u64) { ax } else { 0.0 };
        }
        before += lb.iter().map(|&v| v as f64).sum::<f64>();
        after += la.iter().map(|&v| v as f64).sum::<f64>();
    }
    (before, after)
}

/// ⟨a, b⟩ accumulated in f64 (used by slerp, model_stock and the task-vector analysis).
/// Compiled for AVX2 too (dispatched at run time; the same operations in the same order).
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f64 {
    crate::dtype::avx2_dispatch!(dot_generic, dot_avx2, (a: &[f32], b: &[f32]) -> f64)
}

#[inline(always)]
fn dot_generic(a: &[f32], b: &[f32]) -> f64 {
    // Eight f64 lanes so the compiler can vectorise and rounding error stays small.
    let mut acc = [0f64; 8];
    let n8 = a.len() / 8 * 8;
    for (x, y) in a[..n8].chunks_exact(8).zip(b[..n8].chunks_exact(8)) {
        for l in 0..8 {
            acc[l] += x[l] as f64 * y[l] as f64;
        }
    }
    let mut s: f64 = acc.iter().sum();
    for (x, y) in a[n8..].iter().zip(&b[n8..]) {
        s += *x as f64 * *y as f64;
    }
    s
}

/// [⟨a, b⟩, ⟨a, a⟩, ⟨b, b⟩] in one pass over a and b, each exactly as `dot` computes it (its eight
/// f64 lanes, their sum, then the tail in order).
pub(crate) fn dot3(a: &[f32], b: &[f32]) -> [f64; 3] {
    let n8 = a.len().min(b.len()) / 8 * 8;
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx") {
        // SAFETY: the CPU supports AVX (checked just above).
        let lanes = unsafe { dot3_lanes_avx(&a[..n8], &b[..n8]) };
        return dot3_finish(lanes, &a[n8..], &b[n8..]);
    }
    dot3_finish(dot3_lanes(&a[..n8], &b[..n8]), &a[n8..], &b[n8..])
}

/// The three sums' eight f64 lanes over a multiple of 8 elements: lane l sums element l, l + 8,
/// ... in order.
fn dot3_lanes(a: &[f32], b: &[f32]) -> [[f64; 8]; 3] {
    let (mut ab, mut aa, mut bb) = ([0f64; 8], [0f64; 8], [0f64; 8]);
    for (x, y) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
        for l in 0..8 {
            let (u, v) = (x[l] as f64, y[l] as f64);
            ab[l] += u * v;
            aa[l] += u * u;
            bb[l] += v * v;
        }
    }
    [ab, aa, bb]
}

/// `dot3_lanes` with AVX intrinsics: the same operations per lane in the same order (multiply,
/// then add; no FMA). The compiler vectorised the portable loop as scalar pairs with spills.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn dot3_lanes_avx(a: &[f32], b: &[f32]) -> [[f64; 8]; 3] {
    use std::arch::x86_64::*;
    debug_assert!(a.len() == b.len() && a.len().is_multiple_of(8));
    let z = _mm256_setzero_pd();
    let (mut ab0, mut ab1, mut aa0, mut aa1, mut bb0, mut bb1) = (z, z, z, z, z, z);
    let mut i = 0;
    while i < a.len() {
        // SAFETY: i + 8 <= len for both slices (multiples of 8 of equal length).
        let (x, y) = (
            _mm256_loadu_ps(a.as_ptr().add(i)),
            _mm256_loadu_ps(b.as_ptr().add(i)),
        );
        let (xl, xh) = (
            _mm256_cvtps_pd(_mm256_castps256_ps128(x)),
            _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(x)),
        );
        let (yl, yh) = (
            _mm256_cvtps_pd(_mm256_castps256_ps128(y)),
            _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(y)),
        );
        ab0 = _mm256_add_pd(ab0, _mm256_mul_pd(xl, yl));
        ab1 = _mm256_add_pd(ab1, _mm256_mul_pd(xh, yh));
        aa0 = _mm256_add_pd(aa0, _mm256_mul_pd(xl, xl));
        aa1 = _mm256_add_pd(aa1, _mm256_mul_pd(xh, xh));
        bb0 = _mm256_add_pd(bb0, _mm256_mul_pd(yl, yl));
        bb1 = _mm256_add_pd(bb1, _mm256_mul_pd(yh, yh));
        i += 8;
    }
    let lanes = |lo: __m256d, hi: __m256d| {
        let mut o = [0f64; 8];
        _mm256_storeu_pd(o.as_mut_ptr(), lo);
        _mm256_storeu_pd(o.as_mut_ptr().add(4), hi);
        o
    };
    [lanes(ab0, ab1), lanes(aa0, aa1), lanes(bb0, bb1)]
}

/// The lanes' sums, then the tail in order.
fn dot3_finish(lanes: [[f64; 8]; 3], a: &[f32], b: &[f32]) -> [f64; 3] {
    let [ab, aa, bb] = lanes;
    let mut s: [f64; 3] = [ab.iter().sum(), aa.iter().sum(), bb.iter().sum()];
    for (x, y) in a.iter().zip(b) {
        let (u, v) = (*x as f64, *y as f64);
        s[0] += u * v;
        s[1] += u * u;
        s[2] += v * v;
    }
    s
}

/// mergekit's slerp factors: lerp when the normalised vectors are nearly colinear.
pub fn slerp_coeffs(t: f64, dot: f64, n0: f64, n1: f64) -> Stats {
    let eps = 1e-8;
    let d0 = if n0 > eps { n0 } else { 1.0 };
    let d1 = if n1 > eps { n1 } else { 1.0 };
    let cos = dot / (d0 * d1);
    if cos.abs() > 0.9995 {
        return Stats::Slerp {
            c0: (1.0 - t) as f32,
            c1: t as f32,
        };
    }
    let theta0 = cos.acos();
    let sin0 = theta0.sin();
    let theta_t = theta0 * t;
    let s0 = (theta0 - theta_t).sin() / sin0;
    let s1 = theta_t.sin() / sin0;
    Stats::Slerp {
        c0: s0 as f32,
        c1: s1 as f32,
    }
}

/// Computes chunk c of job `t` and writes it.
pub(crate) fn run_chunk(
    ctx: &Ctx,
    stats: &Stats,
    seed: u64,
    c: usize,
    w: &Writer,
    ctl: &Control,
) -> Result<()> {
    let job = ctx.job;
    let (a, b) = ctx.range(c);
    if job.copy {
        // Chunks of a copy are byte ranges.
        let r = job.sources[0];
        let m = &ctx.models[r.model];
        let info = &m.tensors[r.tensor];
        let bytes = &m.bytes(info)[a..b];
        w.write(job.out_slot, a as u64, bytes)?;
        ctl.done.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        return Ok(());
    }
    let nsrc = job.sources.len();
    with_scratch(nsrc, ctx.chunk, |s| {
        // task_arithmetic subtracts the base inside its fused loop.
        let deltas = job.kernel.is_gta() && job.kernel != Kernel::TaskArithmetic;
        let (_, m) = ctx.load_chunk(c, s, deltas);
        if super::methods_mk::is_della(job.kernel) {
            super::methods_mk::della_mask(ctx, stats, seed, c, a, m, s);
        }
        compute(job, stats, seed, c, a, m, s);
        let Scratch { out, bytes, .. } = s;
        if let Some(ob) = job.out_block {
            let n = store_fp8_block_row(w, job, ob, c, a, &mut out[..m], bytes)?;
            ctl.done.fetch_add(n as u64, Ordering::Relaxed);
            return Ok(());
        }
        store_chunk(w, job.out_slot, job.out_dtype, a, &out[..m], bytes)?;
        ctl.done
            .fetch_add((m * job.out_dtype.bitsize() / 8) as u64, Ordering::Relaxed);
        Ok(())
    })
}

/// FP8 output of one row of blocks (chunk c = block row c, elements a.. of `x`): per block,
/// scale = amax / 448 (1 for an all-zero block), q = e4m3(x / scale); writes the FP8 bytes and
/// the row's scales. Returns the bytes written.
fn store_fp8_block_row(
    w: &Writer,
    job: &Job,
    ob: super::plan::OutBlock,
    c: usize,
    a: usize,
    x: &mut [f32],
    bytes: &mut Vec<u8>,
) -> Result<usize> {
    use crate::dtype::{f32_to_f8e4m3, store_f32, F8E4M3_MAX};
    let ncols = ob.ncols;
    let nbc = ncols.div_ceil(ob.cols);
    let nrows = x.len() / ncols.max(1);
    let mut amax = vec![0f32; nbc];
    for r in 0..nrows {
        for (bj, am) in amax.iter_mut().enumerate() {
            let lo = r * ncols + bj * ob.cols;
            let hi = (lo + ob.cols).min((r + 1) * ncols);
            for &v in &x[lo..hi] {
                *am = am.max(v.abs());
            }
        }
    }
    let scales: Vec<f32> = amax
        .iter()
        .map(|&m| if m > 0.0 { m / F8E4M3_MAX } else { 1.0 })
        .collect();
    if bytes.len() < x.len() {
        bytes.resize(x.len(), 0);
    }
    for r in 0..nrows {
        for (bj, &s) in scales.iter().enumerate() {
            let lo = r * ncols + bj * ob.cols;
            let hi = (lo + ob.cols).min((r + 1) * ncols);
            for (q, &v) in bytes[lo..hi].iter_mut().zip(&x[lo..hi]) {
                *q = f32_to_f8e4m3(v / s);
            }
        }
    }
    w.write(job.out_slot, a as u64, &bytes[..x.len()])?;
    let es = ob.scale_dtype.bitsize() / 8;
    let mut sb = vec![0u8; nbc * es];
    store_f32(ob.scale_dtype, &scales, &mut sb);
    w.write(job.scale_slot, (c * nbc * es) as u64, &sb)?;
    Ok(x.len() + sb.len())
}

/// The arithmetic of one chunk: inputs in `s.base` / `s.srcs` (deltas for task-arithmetic
/// methods), result in `s.out[..m]`.
pub(crate) fn compute(
    job: &Job,
    stats: &Stats,
    seed: u64,
    c: usize,
    a: usize,
    m: usize,
    s: &mut Scratch,
) {
    crate::dtype::avx2_dispatch!(
        compute_generic,
        compute_avx2,
        (job: &Job, stats: &Stats, seed: u64, c: usize, a: usize, m: usize, s: &mut Scratch)
    );
}

#[inline(always)]
fn compute_generic(
    job: &Job,
    stats: &Stats,
    seed: u64,
    c: usize,
    a: usize,
    m: usize,
    s: &mut Scratch,
) {
    let Scratch {
        base, srcs, out, ..
    } = s;
    let base = &base[..m];
    let out = &mut out[..m];
    let nsrc = job.sources.len();
    match job.kernel {
        Kernel::Linear => {
            // mergekit accumulates with torch's addcmul_, a fused multiply-add per model.
            out.fill(0.0);
            for (src, &wi) in srcs.iter().zip(&job.weights).take(nsrc) {
                for (o, &x) in out.iter_mut().zip(&src[..m]) {
                    *o = x.mul_add(wi, *o);
                }
            }
            if job.normalize {
                let div: f32 = job.weights.iter().sum();
                for o in out.iter_mut() {
                    *o /= div;
                }
            }
        }
        Kernel::Passthrough => {
            let x = &srcs[0][..m];
            let k = job.scale;
            if k == 1.0 {
                out.copy_from_slice(x);
            } else {
                out.iter_mut().zip(x).for_each(|(o, &x)| *o = x * k);
            }
        }
        Kernel::Slerp => {
            let (c0, c1) = match stats {
                Stats::Slerp { c0, c1 } => (*c0, *c1),
                _ => unreachable!("slerp without stats"),
            };
            for ((o, &x), &y) in out.iter_mut().zip(base).zip(&srcs[0][..m]) {
                *o = c0 * x + c1 * y;
            }
        }
        Kernel::ModelStock => {
            let (row_len, t) = match stats {
                Stats::Stock { row_len, t } => (*row_len, t),
                _ => unreachable!("model_stock without stats"),
            };
            out.fill(0.0);
            for src in srcs.iter().take(nsrc) {
                for (o, &x) in out.iter_mut().zip(&src[..m]) {
                    *o += x;
                }
            }
            let nf = nsrc as f32;
            let bf = job.bf16_compute;
            if bf {
                // mergekit: sum(ws) adds the models one by one, each sum rounded
                let rb = super::bf16::rb;
                out.copy_from_slice(&srcs[0][..m]);
                for src in srcs.iter().take(nsrc).skip(1) {
                    for (o, &x) in out.iter_mut().zip(&src[..m]) {
                        *o = rb(*o + x);
                    }
                }
            }
            let mut j = 0;
            while j < m {
                let row = (a + j) / row_len;
                let end = ((row + 1) * row_len - a).min(m);
                let tr = t[row];
                if bf {
                    let rb = super::bf16::rb;
                    let u = rb(1.0 - tr);
                    for (o, &b0) in out[j..end].iter_mut().zip(&base[j..end]) {
                        *o = rb(rb(tr * rb(*o / nf)) + rb(u * b0));
                    }
                } else {
                    let u = 1.0 - tr;
                    for (o, &b0) in out[j..end].iter_mut().zip(&base[j..end]) {
                        *o = tr * (*o / nf) + u * b0;
                    }
                }
                j = end;
            }
        }
        k if super::methods_mk::handles(k) && !super::methods_mk::is_della(k) => {
            super::methods_mk::compute(job, stats, c, m, base, srcs, out)
        }
        k if super::methods_sph::handles(k) => {
            super::methods_sph::compute(job, stats, a, m, base, srcs, out)
        }
        Kernel::TaskArithmetic if job.bf16_compute => {
            super::bf16::task_arithmetic(job, m, base, srcs, out)
        }
        Kernel::TaskArithmetic => task_arithmetic(job, m, base, srcs, out),
        _ if job.bf16_compute => super::bf16::gta(job, stats, seed, c, a, m, base, srcs, out),
        _ => gta(job, stats, seed, c, a, m, base, srcs, out),
    }
}

/// task_arithmetic fused: sources hold raw θ_i (not deltas). Same operations in the same order as
/// the general path (and mergekit): Σ (θ_i − θ_b)·w_i, then / Σw, then ·λ, then θ_b +.
#[inline(always)]
fn task_arithmetic(job: &Job, m: usize, base: &[f32], srcs: &[Vec<f32>], out: &mut [f32]) {
    let nsrc = job.sources.len();
    out.fill(0.0);
    for (src, &wi) in srcs.iter().zip(&job.weights).take(nsrc) {
        for ((o, &x), &b0) in out.iter_mut().zip(&src[..m]).zip(base) {
            *o += (x - b0) * wi;
        }
    }
    let mut div: f32 = job.weights.iter().sum();
    if div.abs() < 1e-8 {
        div = 1.0;
    }
    let lambda = job.lambda;
    match (job.normalize, lambda != 1.0) {
        (false, false) => out.iter_mut().zip(base).for_each(|(o, &b0)| *o += b0),
        (true, false) => out
            .iter_mut()
            .zip(base)
            .for_each(|(o, &b0)| *o = b0 + *o / div),
        (false, true) => out
            .iter_mut()
            .zip(base)
            .for_each(|(o, &b0)| *o = b0 + *o * lambda),
        (true, true) => out
            .iter_mut()
            .zip(base)
            .for_each(|(o, &b0)| *o = b0 + (*o / div) * lambda),
    }
}

/// Generalised task arithmetic: sparsify each δ, weight, optionally elect signs, mix, normalise,
/// scale by λ, add to the base.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) fn gta(
    job: &Job,
    stats: &Stats,
    seed: u64,
    c: usize,
    a: usize,
    m: usize,
    base: &[f32],
    srcs: &mut [Vec<f32>],
    out: &mut [f32],
) {
    let nsrc = job.sources.len();
    // Sparsify, then weight.
    for i in 0..nsrc {
        let d = &mut srcs[i][..m];
        match (job.kernel, stats) {
            (Kernel::Ties | Kernel::Breadcrumbs | Kernel::BreadcrumbsTies, Stats::Keep(rules)) => {
                rules[i].apply(c, d);
            }
            (
                Kernel::Ties | Kernel::Breadcrumbs | Kernel::BreadcrumbsTies,
                Stats::KeepScaled(rules, f),
            ) => {
                rules[i].apply(c, d);
                let fi = f[i];
                if fi != 1.0 {
                    for x in d.iter_mut() {
                        *x *= fi;
                    }
                }
            }
            (Kernel::DareLinear | Kernel::DareTies, _) if job.densities[i] < 1.0 => {
                let k = KeepStream::new(seed, &job.name, i, job.densities[i]);
                let f = match stats {
                    Stats::Dare(f) => f[i],
                    _ => 1.0,
                };
                dare_mask(d, &k, a as u64, f);
            }
            _ => {}
        }
        let wi = job.weights[i];
        for x in d.iter_mut() {
            *x *= wi;
        }
    }
    if job.kernel.consensus() {
        // out = Σ Δ_i (the sign election), then mixed and divisor over agreeing entries.
        out.fill(0.0);
        for src in srcs.iter().take(nsrc) {
            for (o, &x) in out.iter_mut().zip(&src[..m]) {
                *o += x;
            }
        }
        // Mixed delta and divisor over the entries whose sign agrees with the elected one
        // (zeros never agree). Branch-free so the loops vectorise.
        let mut mixed = vec_take(m);
        let mut div = vec_take(m);
        for (i, src) in srcs.iter().enumerate().take(nsrc) {
            let wi = job.weights[i];
            for (((mx, dv), &x), &e) in mixed
                .iter_mut()
                .zip(div.iter_mut())
                .zip(&src[..m])
                .zip(out.iter())
            {
                let pos = e >= 0.0;
                let agree = ((x > 0.0) & pos) | ((x < 0.0) & !pos);
                *mx += if agree { x } else { 0.0 };
                *dv += if agree { wi } else { 0.0 };
            }
        }
        let lambda = job.lambda;
        if job.normalize {
            for (mx, &dv) in mixed.iter_mut().zip(div.iter()) {
                *mx /= if dv == 0.0 { 1.0 } else { dv };
            }
        }
        if lambda != 1.0 {
            for mx in mixed.iter_mut() {
                *mx *= lambda;
            }
        }
        for ((o, &b0), &mx) in out.iter_mut().zip(base).zip(mixed.iter()) {
            *o = b0 + mx;
        }
        vec_give(mixed);
        vec_give(div);
    } else {
        out.fill(0.0);
        for src in srcs.iter().take(nsrc) {
            for (o, &x) in out.iter_mut().zip(&src[..m]) {
                *o += x;
            }
        }
        let mut div: f32 = job.weights.iter().sum();
        if div.abs() < 1e-8 {
            div = 1.0;
        }
        let lambda = job.lambda;
        if job.normalize {
            for o in out.iter_mut() {
                *o /= div;
            }
        }
        if lambda != 1.0 {
            for o in out.iter_mut() {
                *o *= lambda;
            }
        }
        for (o, &b0) in out.iter_mut().zip(base) {
            *o += b0;
        }
    }
}

thread_local! {
    static AUX: std::cell::RefCell<Vec<Vec<f32>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A zeroed per-thread buffer of m floats (returned with `vec_give` for reuse).
fn vec_take(m: usize) -> Vec<f32> {
    let mut v = AUX.with(|a| a.borrow_mut().pop()).unwrap_or_default();
    v.clear();
    v.resize(m, 0.0);
    v
}

fn vec_give(v: Vec<f32>) {
    AUX.with(|a| a.borrow_mut().push(v));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot3_equals_three_dots_bit_for_bit() {
        let mut st = 5u64;
        let mut next = move || {
            st = super::super::rng::mix64(st);
            // mixed magnitudes, so the order of the additions matters
            let r = st;
            ((r % 2001) as f32 - 1000.0) * 10f32.powi((r >> 20) as i32 % 7 - 3)
        };
        for n in [0usize, 1, 7, 8, 9, 63, 1000, 4099] {
            let a: Vec<f32> = (0..n).map(|_| next()).collect();
            let b: Vec<f32> = (0..n).map(|_| next()).collect();
            let got = dot3(&a, &b);
            let want = [dot(&a, &b), dot(&a, &a), dot(&b, &b)];
            // and the portable lanes, whatever path `dot3` took on this CPU
            let n8 = n / 8 * 8;
            let portable = dot3_finish(dot3_lanes(&a[..n8], &b[..n8]), &a[n8..], &b[n8..]);
            for ((g, w), p) in got.iter().zip(&want).zip(&portable) {
                assert_eq!(g.to_bits(), w.to_bits(), "n={n}");
                assert_eq!(p.to_bits(), w.to_bits(), "n={n}");
            }
        }
    }
}
