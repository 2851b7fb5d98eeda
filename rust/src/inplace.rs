//! In-place task-vector merges for a merge search: the same arithmetic as the streaming merge
//! (`merge::kernels`: `task_arithmetic` and the TIES branch of `gta`, float32 compute), but the
//! inputs are float32 tensors the caller keeps in memory (the base θ_b and the task vectors
//! δ_i = θ_i − θ_b) and the result is written into a caller-provided buffer (the parameters of
//! a loaded model). A search tries many merges of the same models; nothing is read from disk or
//! allocated per trial.
//!
//! TIES's top-k (rank by |δ| descending, lower index first among equals, as `merge::select`) uses
//! the magnitude keys of δ sorted once per tensor ([`sort_keys`]): the boundary of any rank is
//! then a lookup ([`bound_sorted`]) instead of the two radix passes a streaming merge makes.
//!
//! Every operation is elementwise and done in the order of the streaming kernels, so the result
//! is bit-identical to `finrecipe merge` with the same plan, for any thread count.

use crate::dtype::{bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16};
use crate::error::{Error, Result};
use crate::merge::select::{key, Bound, KeepRule};
use crate::safetensors::read::Model;
use crate::safetensors::Dtype;

/// Elements per chunk (a tie split at a top-k boundary is counted per chunk).
pub const CHUNK: usize = 1 << 14;

/// The magnitude keys (`select::key`) of `delta`, sorted ascending, into `out` (LSD radix sort,
/// three passes over the 31 key bits).
pub fn sort_keys(delta: &[f32], out: &mut [u32]) {
    assert_eq!(delta.len(), out.len(), "sort_keys: lengths differ");
    let n = delta.len();
    let mut tmp: Vec<u32> = delta.iter().map(|&x| key(x)).collect();
    // (shift, bits): 11 + 11 + 9 = 31 key bits; the last pass lands in `out`.
    let passes = [(0u32, 11u32), (11, 11), (22, 9)];
    let mut src = std::mem::take(&mut tmp);
    let mut dst = vec![0u32; n];
    for (p, &(shift, bits)) in passes.iter().enumerate() {
        let mask = (1u32 << bits) - 1;
        let mut count = vec![0usize; (1usize << bits) + 1];
        for &k in &src {
            count[((k >> shift) & mask) as usize + 1] += 1;
        }
        for b in 1..count.len() {
            count[b] += count[b - 1];
        }
        let last = p + 1 == passes.len();
        let target: &mut [u32] = if last { out } else { &mut dst };
        for &k in &src {
            let b = ((k >> shift) & mask) as usize;
            target[count[b]] = k;
            count[b] += 1;
        }
        if !last {
            std::mem::swap(&mut src, &mut dst);
        }
    }
}

/// "rank < r" (ranks by |δ| descending, index ascending) from the sorted keys of `delta`; a tie
/// split at the boundary is resolved by element index with per-[`CHUNK`] counts.
pub fn bound_sorted(asc: &[u32], delta: &[f32], r: u64) -> Bound {
    let n = asc.len() as u64;
    if r == 0 {
        return Bound::Never;
    }
    if r >= n {
        return Bound::Always;
    }
    let t = asc[(n - r) as usize];
    let lt = asc.partition_point(|&x| x < t) as u64;
    let le = asc.partition_point(|&x| x <= t) as u64;
    let keep = r - (n - le);
    if keep == le - lt {
        return Bound::Ge(t);
    }
    let mut prefix = Vec::with_capacity(delta.len().div_ceil(CHUNK) + 1);
    let mut acc = 0u64;
    for c in delta.chunks(CHUNK) {
        prefix.push(acc);
        acc += c.iter().filter(|&&x| key(x) == t).count() as u64;
    }
    prefix.push(acc);
    Bound::Tie { t, keep, prefix }
}

/// The number of elements TIES keeps for a density (as the streaming merge: ⌊density·n⌋, at
/// least one when density > 0; `None`: all of them).
pub fn ties_keep(density: f64, n: usize) -> Option<u64> {
    if density >= 1.0 {
        return None;
    }
    let target = (density * n as f64).floor() as u64;
    Some(if density > 0.0 {
        target.max(1).min(n as u64)
    } else {
        0
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    TaskArithmetic,
    Ties,
}

/// One task vector of a merge.
pub struct Source<'a> {
    pub delta: &'a [f32],
    pub weight: f32,
    /// TIES: the kept ranks (`None`: every element).
    pub keep: Option<Bound>,
}

pub struct Spec {
    pub method: Method,
    pub normalize: bool,
    pub lambda: f32,
    /// The merge's output dtype: values are rounded to it (F32, BF16 or F16), stored as f32.
    pub out_dtype: Dtype,
}

/// Merges into `out` (len = base len). `threads` 0: one per available core.
pub fn merge_into(spec: &Spec, base: &[f32], srcs: &[Source], out: &mut [f32], threads: usize) {
    let n = base.len();
    assert_eq!(out.len(), n, "merge_into: output length");
    for s in srcs {
        assert_eq!(s.delta.len(), n, "merge_into: task vector length");
    }
    assert!(
        matches!(spec.out_dtype, Dtype::F32 | Dtype::BF16 | Dtype::F16),
        "merge_into: output dtype"
    );
    let nchunks = n.div_ceil(CHUNK);
    let threads = match threads {
        0 => std::thread::available_parallelism().map_or(1, |x| x.get()),
        t => t,
    }
    .clamp(1, nchunks.max(1));
    if threads == 1 {
        run_chunks(spec, base, srcs, out, 0, nchunks);
        return;
    }
    std::thread::scope(|scope| {
        let mut rest = &mut out[..];
        let mut c0 = 0;
        for t in 0..threads {
            let c1 = nchunks * (t + 1) / threads;
            let len = (c1 * CHUNK).min(n) - c0 * CHUNK;
            let (mine, tail) = rest.split_at_mut(len);
            rest = tail;
            let start = c0;
            scope.spawn(move || run_chunks(spec, base, srcs, mine, start, c1));
            c0 = c1;
        }
    });
}

/// Chunks [c0, c1) of the merge; `out` holds exactly those elements.
fn run_chunks(spec: &Spec, base: &[f32], srcs: &[Source], out: &mut [f32], c0: usize, c1: usize) {
    crate::dtype::avx2_dispatch!(
        run_chunks_generic,
        run_chunks_avx2,
        (spec: &Spec, base: &[f32], srcs: &[Source], out: &mut [f32], c0: usize, c1: usize)
    );
}

#[inline(always)]
fn run_chunks_generic(
    spec: &Spec,
    base: &[f32],
    srcs: &[Source],
    out: &mut [f32],
    c0: usize,
    c1: usize,
) {
    let n = base.len();
    let mut scratch: Vec<Vec<f32>> = match spec.method {
        Method::Ties => srcs.iter().map(|_| vec![0f32; CHUNK]).collect(),
        Method::TaskArithmetic => Vec::new(),
    };
    let mut mixed = vec![
        0f32;
        if spec.method == Method::Ties {
            CHUNK
        } else {
            0
        }
    ];
    let mut divs = mixed.clone();
    let rules: Vec<KeepRule> = srcs
        .iter()
        .map(|s| match &s.keep {
            None => KeepRule::all(),
            Some(b) => KeepRule {
                lo: Bound::Never,
                hi: b.clone(),
            },
        })
        .collect();
    for c in c0..c1 {
        let a = c * CHUNK;
        let b = ((c + 1) * CHUNK).min(n);
        let m = b - a;
        let o = &mut out[(a - c0 * CHUNK)..(b - c0 * CHUNK)];
        let b0 = &base[a..b];
        match spec.method {
            Method::TaskArithmetic => task_arithmetic(spec, b0, srcs, a, o),
            Method::Ties => {
                for ((s, sc), rule) in srcs.iter().zip(scratch.iter_mut()).zip(&rules) {
                    let d = &mut sc[..m];
                    d.copy_from_slice(&s.delta[a..b]);
                    rule.apply(c, d);
                    let wi = s.weight;
                    for x in d.iter_mut() {
                        *x *= wi;
                    }
                }
                ties(spec, b0, srcs, &scratch, &mut mixed[..m], &mut divs[..m], o);
            }
        }
        round_to(spec.out_dtype, o);
    }
}

/// `merge::kernels::task_arithmetic` with δ_i given: Σ δ_i·w_i, / Σw, ·λ, θ_b +.
#[inline(always)]
fn task_arithmetic(spec: &Spec, base: &[f32], srcs: &[Source], a: usize, out: &mut [f32]) {
    let m = out.len();
    out.fill(0.0);
    for s in srcs {
        let wi = s.weight;
        for (o, &d) in out.iter_mut().zip(&s.delta[a..a + m]) {
            *o += d * wi;
        }
    }
    let mut div: f32 = srcs.iter().map(|s| s.weight).sum();
    if div.abs() < 1e-8 {
        div = 1.0;
    }
    let lambda = spec.lambda;
    match (spec.normalize, lambda != 1.0) {
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

/// The consensus branch of `merge::kernels::gta` on trimmed, weighted task vectors `w`.
#[inline(always)]
fn ties(
    spec: &Spec,
    base: &[f32],
    srcs: &[Source],
    w: &[Vec<f32>],
    mixed: &mut [f32],
    div: &mut [f32],
    out: &mut [f32],
) {
    let m = out.len();
    out.fill(0.0);
    for x in w {
        for (o, &v) in out.iter_mut().zip(&x[..m]) {
            *o += v;
        }
    }
    mixed.fill(0.0);
    div.fill(0.0);
    for (s, x) in srcs.iter().zip(w) {
        let wi = s.weight;
        for (((mx, dv), &v), &e) in mixed
            .iter_mut()
            .zip(div.iter_mut())
            .zip(&x[..m])
            .zip(out.iter())
        {
            let pos = e >= 0.0;
            let agree = ((v > 0.0) & pos) | ((v < 0.0) & !pos);
            *mx += if agree { v } else { 0.0 };
            *dv += if agree { wi } else { 0.0 };
        }
    }
    if spec.normalize {
        for (mx, &dv) in mixed.iter_mut().zip(div.iter()) {
            *mx /= if dv == 0.0 { 1.0 } else { dv };
        }
    }
    if spec.lambda != 1.0 {
        for mx in mixed.iter_mut() {
            *mx *= spec.lambda;
        }
    }
    for ((o, &b0), &mx) in out.iter_mut().zip(base).zip(mixed.iter()) {
        *o = b0 + mx;
    }
}

/// Rounds to the output dtype as storing and reloading it would (f32: unchanged).
#[inline(always)]
fn round_to(dtype: Dtype, x: &mut [f32]) {
    match dtype {
        Dtype::BF16 => x.iter_mut().for_each(|v| *v = bf16_to_f32(f32_to_bf16(*v))),
        Dtype::F16 => x.iter_mut().for_each(|v| *v = f16_to_f32(f32_to_f16(*v))),
        _ => {}
    }
}

/// θ_b and δ = θ − θ_b of one tensor in float32, as the streaming merge loads them (exact
/// widening, one f32 subtraction): `base_out` gets θ_b, `delta_out` gets δ.
pub fn task_vector(
    base: &Model,
    model: &Model,
    name: &str,
    base_out: &mut [f32],
    delta_out: &mut [f32],
) -> Result<()> {
    let load = |m: &Model, out: &mut [f32]| -> Result<()> {
        let t = m
            .get(name)
            .ok_or_else(|| Error::Mismatch(format!("{}: no tensor {name:?}", m.path.display())))?;
        if !crate::dtype::is_float(t.dtype) || t.numel() != out.len() {
            return Err(Error::Mismatch(format!(
                "{}: tensor {name:?} is {:?} {:?}, expected {} float elements",
                m.path.display(),
                t.dtype,
                t.shape,
                out.len()
            )));
        }
        crate::dtype::load_f32(t.dtype, m.bytes(t), out);
        Ok(())
    };
    load(base, base_out)?;
    load(model, delta_out)?;
    for (d, &b) in delta_out.iter_mut().zip(base_out.iter()) {
        *d -= b;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::select::tests::reference_keep;

    fn data(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = crate::merge::rng::mix64(s.wrapping_add(1));
                match s % 7 {
                    0 => 0.0,
                    1 => ((s >> 8) % 5) as f32 * if s & 64 == 0 { 0.5 } else { -0.5 },
                    _ => ((s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32,
                }
            })
            .collect()
    }

    #[test]
    fn sort_keys_sorts() {
        for n in [0usize, 1, 5, 3000, 70_001] {
            let x = data(n, n as u64);
            let mut got = vec![0u32; n];
            sort_keys(&x, &mut got);
            let mut want: Vec<u32> = x.iter().map(|&v| key(v)).collect();
            want.sort_unstable();
            assert_eq!(got, want);
        }
    }

    #[test]
    fn bound_keeps_the_reference_ranks() {
        // many duplicates: ties split across chunk boundaries
        let n = 3 * CHUNK + 77;
        let x = data(n, 9);
        let mut asc = vec![0u32; n];
        sort_keys(&x, &mut asc);
        for r in [
            0u64,
            1,
            17,
            (n / 3) as u64,
            (n / 2) as u64,
            n as u64 - 1,
            n as u64,
        ] {
            let rule = KeepRule {
                lo: Bound::Never,
                hi: bound_sorted(&asc, &x, r),
            };
            let mut y = x.clone();
            for (c, d) in y.chunks_mut(CHUNK).enumerate() {
                rule.apply(c, d);
            }
            let want = reference_keep(&x, 0, r as usize);
            for i in 0..n {
                let e = if want[i] { x[i] } else { 0.0 };
                assert_eq!(
                    y[i].to_bits() & 0x7FFF_FFFF,
                    e.to_bits() & 0x7FFF_FFFF,
                    "r {r} i {i}"
                );
            }
        }
    }

    #[test]
    fn threads_do_not_change_bits() {
        let n = 5 * CHUNK + 3;
        let base = data(n, 1);
        let d0 = data(n, 2);
        let d1 = data(n, 3);
        let (mut a0, mut a1) = (vec![0u32; n], vec![0u32; n]);
        sort_keys(&d0, &mut a0);
        sort_keys(&d1, &mut a1);
        for method in [Method::Ties, Method::TaskArithmetic] {
            let srcs = [
                Source {
                    delta: &d0,
                    weight: 0.7,
                    keep: Some(bound_sorted(&a0, &d0, ties_keep(0.4, n).unwrap())),
                },
                Source {
                    delta: &d1,
                    weight: 1.3,
                    keep: Some(bound_sorted(&a1, &d1, ties_keep(0.65, n).unwrap())),
                },
            ];
            let spec = Spec {
                method,
                normalize: true,
                lambda: 0.9,
                out_dtype: Dtype::BF16,
            };
            let mut one = vec![0f32; n];
            merge_into(&spec, &base, &srcs, &mut one, 1);
            for t in [2, 3, 7] {
                let mut many = vec![1f32; n];
                merge_into(&spec, &base, &srcs, &mut many, t);
                assert!(one
                    .iter()
                    .zip(&many)
                    .all(|(a, b)| a.to_bits() == b.to_bits()));
            }
        }
    }
}
