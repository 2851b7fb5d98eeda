//! bf16 compute (`compute_dtype: "BF16"` in the plan): the task-arithmetic family computed the way
//! mergekit computes it when a config says `dtype: bfloat16`. mergekit casts the inputs to bf16 and
//! runs its torch operations on bf16 tensors, so every elementwise operation rounds its result to
//! bf16 (torch computes each in f32 and rounds), while reductions over the models (`sum(dim=0)`)
//! accumulate in f32 and round once. The kernels below apply the same roundings in the same order:
//!
//! - δ_i = r(θ_i − θ_b) (rounded when the chunk is loaded, so selection and L1 sums see it too)
//! - sparsified δ_i (mask), with rescale: r(δ_i · f_i), f_i = r(r(Σ|δ_i|) / r(Σ|kept δ_i|))
//! - w_i = r(weight_i); Δ_i = r(δ_i · w_i)
//! - sign election (TIES): elected = r(Σ Δ_i) ≥ 0; mixed = r(Σ agreeing Δ_i); divisor = r(Σ agreeing w_i)
//!   (0 becomes 1); without election mixed = r(Σ Δ_i), divisor = r(Σ w_i) (|·| < 1e-8 becomes 1)
//! - normalize: r(mixed / divisor); λ ≠ 1: r(mixed · λ); out = r(θ_b + mixed)
//!
//! Exact f32 compute stays available (`compute_dtype: float32` in the config), see docs/merge-plan.md.

use super::kernels::Stats;
use super::plan::{Job, Kernel};
use super::rng::KeepStream;

/// f32 → nearest bf16 (ties to even), returned as f32. Branch-free so loops vectorise; inputs are
/// finite (NaN payloads whose upper half is zero would round to infinity).
#[inline(always)]
pub fn rb(x: f32) -> f32 {
    let b = x.to_bits();
    f32::from_bits(b.wrapping_add(0x7FFF + ((b >> 16) & 1)) & 0xFFFF_0000)
}

/// Rounds every element to bf16 in place.
#[inline(always)]
pub fn round_all(x: &mut [f32]) {
    for v in x.iter_mut() {
        *v = rb(*v);
    }
}

/// The DARE / L1 rescale factor in bf16: r(r(before) / r(after)), 1 when either is below 1e-7.
pub fn rescale_factor(before: f64, after: f64) -> f32 {
    let (b, a) = (rb(before as f32), rb(after as f32));
    if b < 1e-7 || a < 1e-7 {
        1.0
    } else {
        rb(b / a)
    }
}

fn weights(job: &Job) -> Vec<f32> {
    job.weights.iter().map(|&w| rb(w)).collect()
}

/// task_arithmetic in bf16; sources hold raw θ_i (bf16-exact), `base` θ_b.
#[inline(always)]
pub fn task_arithmetic(job: &Job, m: usize, base: &[f32], srcs: &[Vec<f32>], out: &mut [f32]) {
    let nsrc = job.sources.len();
    let w = weights(job);
    out.fill(0.0);
    for (src, &wi) in srcs.iter().zip(&w).take(nsrc) {
        for ((o, &x), &b0) in out.iter_mut().zip(&src[..m]).zip(base) {
            *o += rb(rb(x - b0) * wi);
        }
    }
    finish_linear(job, &w, base, out);
}

/// The rest of the generalised task arithmetic in bf16: sources hold δ_i = r(θ_i − θ_b).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub fn gta(
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
    let w = weights(job);
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
                        *x = rb(*x * fi);
                    }
                }
            }
            (Kernel::DareLinear | Kernel::DareTies, _) if job.densities[i] < 1.0 => {
                let k = KeepStream::new(seed, &job.name, i, job.densities[i]);
                let f = match stats {
                    Stats::Dare(f) => f[i],
                    _ => 1.0,
                };
                for (j, x) in d.iter_mut().enumerate() {
                    *x = if k.keep((a + j) as u64) {
                        rb(*x * f)
                    } else {
                        0.0
                    };
                }
            }
            _ => {}
        }
        let wi = w[i];
        for x in d.iter_mut() {
            *x = rb(*x * wi);
        }
    }
    out.fill(0.0);
    for src in srcs.iter().take(nsrc) {
        for (o, &x) in out.iter_mut().zip(&src[..m]) {
            *o += x;
        }
    }
    if !job.kernel.consensus() {
        round_all(out);
        finish_linear(job, &w, base, out);
        return;
    }
    // Sign election on r(Σ Δ_i); zeros never agree.
    let mut mixed = vec![0f32; m];
    let mut div = vec![0f32; m];
    for (i, src) in srcs.iter().enumerate().take(nsrc) {
        let wi = w[i];
        for (((mx, dv), &x), &e) in mixed
            .iter_mut()
            .zip(div.iter_mut())
            .zip(&src[..m])
            .zip(out.iter())
        {
            let pos = rb(e) >= 0.0;
            let agree = ((x > 0.0) & pos) | ((x < 0.0) & !pos);
            *mx += if agree { x } else { 0.0 };
            *dv += if agree { wi } else { 0.0 };
        }
    }
    let lambda = job.lambda;
    for (((o, &b0), &mx), &dv) in out.iter_mut().zip(base).zip(&mixed).zip(&div) {
        let mut v = rb(mx);
        if job.normalize {
            let dv = rb(dv);
            v = rb(v / if dv == 0.0 { 1.0 } else { dv });
        }
        if lambda != 1.0 {
            v = rb(v * lambda);
        }
        *o = rb(b0 + v);
    }
}

/// mixed (already r(Σ Δ_i)) → normalise by r(Σ w_i), scale by λ, add the base, each rounded.
#[inline(always)]
fn finish_linear(job: &Job, w: &[f32], base: &[f32], out: &mut [f32]) {
    let mut div = rb(w.iter().sum::<f32>());
    if div.abs() < 1e-8 {
        div = 1.0;
    }
    let lambda = job.lambda;
    for (o, &b0) in out.iter_mut().zip(base) {
        let mut v = rb(*o);
        if job.normalize {
            v = rb(v / div);
        }
        if lambda != 1.0 {
            v = rb(v * lambda);
        }
        *o = rb(b0 + v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rb_matches_the_bf16_conversion() {
        for &x in &[
            0.0f32,
            -0.0,
            1.0,
            1.003_906_3,
            1.011_718_8,
            2.718_281_7,
            -2.5e-3,
            1e30,
            7.1e-39,
        ] {
            let want = crate::dtype::bf16_to_f32(crate::dtype::f32_to_bf16(x));
            assert_eq!(rb(x).to_bits(), want.to_bits(), "{x}");
        }
        // ties to even: 1 + 2^-8 lies halfway between 1 and 1 + 2^-7
        assert_eq!(rb(1.0 + 2f32.powi(-8)), 1.0);
        assert_eq!(rb(1.0 + 3.0 * 2f32.powi(-8)), 1.0 + 2.0 * 2f32.powi(-7));
    }

    #[test]
    fn rescale_factor_rounds_each_step() {
        assert_eq!(rescale_factor(0.0, 1.0), 1.0);
        let f = rescale_factor(3.0, 1.3);
        assert_eq!(f, rb(rb(3.0) / rb(1.3)));
    }
}
