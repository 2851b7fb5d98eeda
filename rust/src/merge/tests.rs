//! Each method on small hand-computed cases, plus DARE's independence from threads and chunking.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{json, Value};

use super::*;
use crate::safetensors::write::{plan_layout, OutTensor, Writer};
use crate::safetensors::Dtype;

fn save(dir: &Path, tensors: &[(&str, Vec<usize>, Vec<f32>)]) {
    std::fs::create_dir_all(dir).unwrap();
    let outs: Vec<OutTensor> = tensors
        .iter()
        .map(|(n, s, _)| OutTensor {
            name: n.to_string(),
            dtype: Dtype::F32,
            shape: s.clone(),
        })
        .collect();
    let w = Writer::create(dir, plan_layout(&outs, &BTreeMap::new(), 1 << 30)).unwrap();
    for (i, (_, _, v)) in tensors.iter().enumerate() {
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        w.write(i, 0, &bytes).unwrap();
    }
    w.finish().unwrap();
}

fn read(dir: &Path, name: &str) -> Vec<f32> {
    let m = Model::open(dir).unwrap();
    let t = m.get(name).unwrap();
    let mut out = vec![0f32; t.numel()];
    load_f32(t.dtype, m.bytes(t), &mut out);
    out
}

/// Models m0..mk each with one tensor "x" of the given values; runs one tensor plan.
struct Case {
    root: tempfile::TempDir,
    n: usize,
}

impl Case {
    fn new(values: &[Vec<f32>]) -> Case {
        let root = tempfile::tempdir().unwrap();
        for (i, v) in values.iter().enumerate() {
            save(
                &root.path().join(format!("m{i}")),
                &[("x", vec![v.len()], v.clone())],
            );
        }
        Case {
            root,
            n: values.len(),
        }
    }

    fn plan(&self, out: &str, tensor: Value, threads: usize, chunk: usize) -> String {
        let o = self.root.path().join(out);
        std::fs::create_dir_all(&o).unwrap();
        let models: Vec<String> = (0..self.n)
            .map(|i| self.root.path().join(format!("m{i}")).display().to_string())
            .collect();
        json!({"version": 2, "models": models, "out_dir": o, "out_shard_size": 1u64 << 30,
               "threads": threads, "seed": 7, "chunk_elems": chunk, "metadata": {}, "tensors": [tensor]})
        .to_string()
    }

    fn run_with(&self, out: &str, tensor: Value, threads: usize, chunk: usize) -> Vec<f32> {
        run_merge(&self.plan(out, tensor, threads, chunk), &Control::default()).unwrap();
        read(&self.root.path().join(out), "x")
    }

    fn run(&self, tensor: Value) -> Vec<f32> {
        self.run_with("out", tensor, 2, 1 << 20)
    }
}

fn src(model: usize, params: Value) -> Value {
    json!({"model": model, "tensor": "x", "params": params})
}

fn base() -> Value {
    json!({"model": 0, "tensor": "x"})
}

fn close(a: &[f32], b: &[f32]) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() < 1e-6, "{a:?} != {b:?}");
    }
}

#[test]
fn linear_normalized() {
    let c = Case::new(&[vec![1.0, 2.0, 3.0], vec![3.0, 2.0, 1.0]]);
    let out = c.run(json!({"name": "x", "kernel": "linear", "out_dtype": "F32",
        "sources": [src(0, json!({"weight": 1.0})), src(1, json!({"weight": 3.0}))],
        "params": {"normalize": true}}));
    assert_eq!(out, vec![2.5, 2.0, 1.5]);
}

#[test]
fn task_arithmetic_weights_and_lambda() {
    let c = Case::new(&[
        vec![1.0; 4],
        vec![2.0, 1.0, 0.0, 1.0],
        vec![1.0, 3.0, 1.0, -1.0],
    ]);
    let out = c.run(
        json!({"name": "x", "kernel": "task_arithmetic", "out_dtype": "F32", "base": base(),
        "sources": [src(1, json!({"weight": 1.0})), src(2, json!({"weight": 0.5}))],
        "params": {"lambda": 2.0, "normalize": false}}),
    );
    assert_eq!(out, vec![3.0, 3.0, -1.0, -1.0]);
}

#[test]
fn ties_trims_elects_and_normalizes() {
    let c = Case::new(&[
        vec![0.0; 4],
        vec![3.0, -1.0, 2.0, 0.5],
        vec![-1.0, -2.0, 1.5, 4.0],
    ]);
    let p = json!({"weight": 1.0, "density": 0.75});
    let out = c.run(
        json!({"name": "x", "kernel": "ties", "out_dtype": "F32", "base": base(),
        "sources": [src(1, p.clone()), src(2, p)], "params": {"lambda": 1.0, "normalize": true, "rescale": false}}),
    );
    // a keeps 3, 2, -1; b keeps 4, -2, 1.5; elem 1: (-1 - 2) / 2; elem 2: (2 + 1.5) / 2.
    assert_eq!(out, vec![3.0, -1.5, 1.75, 4.0]);
    // Sign election drops the minority: +3 (w 1) vs -1 (w 1) → keep +3 only.
    let c = Case::new(&[vec![0.0], vec![3.0], vec![-1.0]]);
    let p = json!({"weight": 1.0, "density": 1.0});
    let out = c.run(
        json!({"name": "x", "kernel": "ties", "out_dtype": "F32", "base": base(),
        "sources": [src(1, p.clone()), src(2, p)], "params": {"lambda": 1.0, "normalize": false, "rescale": false}}),
    );
    assert_eq!(out, vec![3.0]);
}

#[test]
fn ties_breaks_ties_by_index() {
    // All |δ| equal: density 0.5 keeps exactly the first half, whatever the chunking.
    let n = 10_000;
    let c = Case::new(&[
        vec![0.0; n],
        (0..n)
            .map(|i| if i % 3 == 0 { -1.0 } else { 1.0 })
            .collect(),
    ]);
    for (k, (threads, chunk)) in [(1, 1 << 20), (2, 7), (2, 1000)].iter().enumerate() {
        let p = json!({"weight": 1.0, "density": 0.5});
        let out = c.run_with(
            &format!("o{k}"),
            json!({"name": "x", "kernel": "ties", "out_dtype": "F32",
            "base": base(), "sources": [src(1, p)], "params": {"lambda": 1.0, "normalize": true, "rescale": false}}),
            *threads,
            *chunk,
        );
        for (i, v) in out.iter().enumerate() {
            let want = if i < n / 2 {
                if i % 3 == 0 {
                    -1.0
                } else {
                    1.0
                }
            } else {
                0.0
            };
            assert_eq!(*v, want, "i={i}");
        }
    }
}

#[test]
fn breadcrumbs_drops_outliers_and_small() {
    let c = Case::new(&[vec![0.0; 10], (1..=10).map(|x| x as f32).collect()]);
    let out = c.run(
        json!({"name": "x", "kernel": "breadcrumbs", "out_dtype": "F32", "base": base(),
        "sources": [src(1, json!({"weight": 1.0, "density": 0.5, "gamma": 0.1}))],
        "params": {"lambda": 1.0, "normalize": true, "rescale": false}}),
    );
    assert_eq!(out, vec![0.0, 0.0, 0.0, 0.0, 5.0, 6.0, 7.0, 8.0, 9.0, 0.0]);
}

#[test]
fn dare_independent_of_threads_and_chunks() {
    let n = 20_000;
    let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
    let a: Vec<f32> = b
        .iter()
        .enumerate()
        .map(|(i, x)| x + 0.1 * (i as f32 * 1.3).cos())
        .collect();
    let c = Case::new(&[b.clone(), a.clone()]);
    let t = |rescale: bool| {
        json!({"name": "x", "kernel": "dare_ties", "out_dtype": "F32", "base": base(),
        "sources": [src(1, json!({"weight": 1.0, "density": 0.3}))],
        "params": {"lambda": 1.0, "normalize": true, "rescale": rescale}})
    };
    let r1 = c.run_with("a", t(true), 1, 1 << 20);
    let r2 = c.run_with("b", t(true), 2, 7);
    let r3 = c.run_with("c", t(true), 2, 999);
    assert_eq!(r1, r2);
    assert_eq!(r1, r3);
    // About 30% kept; kept deltas rescaled so the L1 norm is preserved.
    let kept = r1.iter().zip(&b).filter(|(x, y)| x != y).count() as f64 / n as f64;
    assert!((kept - 0.3).abs() < 0.02, "{kept}");
    let l1_before: f64 = a.iter().zip(&b).map(|(x, y)| (x - y).abs() as f64).sum();
    let l1_after: f64 = r1.iter().zip(&b).map(|(x, y)| (x - y).abs() as f64).sum();
    assert!((l1_before - l1_after).abs() / l1_before < 1e-3);
    // Without rescale the kept deltas are unchanged.
    let r4 = c.run_with("d", t(false), 2, 100);
    for i in 0..n {
        assert!(r4[i] == b[i] || r4[i] == a[i]);
        assert_eq!(r4[i] == b[i], r1[i] == b[i]);
    }
}

#[test]
fn slerp_model_stock_passthrough() {
    let c = Case::new(&[vec![1.0, 0.0], vec![0.0, 1.0]]);
    let out = c.run(
        json!({"name": "x", "kernel": "slerp", "out_dtype": "F32", "base": base(),
        "sources": [src(1, json!({}))], "params": {"t": 0.5}}),
    );
    let h = std::f32::consts::FRAC_1_SQRT_2;
    close(&out, &[h, h]);
    // Nearly colinear: linear interpolation.
    let c = Case::new(&[vec![1.0, 0.0], vec![2.0, 0.0]]);
    let out = c.run(
        json!({"name": "x", "kernel": "slerp", "out_dtype": "F32", "base": base(),
        "sources": [src(1, json!({}))], "params": {"t": 0.25}}),
    );
    close(&out, &[1.25, 0.0]);

    // Orthogonal task vectors: cos 0 → t 0 → base. Identical: cos 1 → t 1 → the average.
    let c = Case::new(&[vec![0.0, 0.0], vec![1.0, 0.0], vec![0.0, 1.0]]);
    let p = json!({"name": "x", "kernel": "model_stock", "out_dtype": "F32", "base": base(),
        "sources": [src(1, json!({})), src(2, json!({}))], "params": {"filter_wise": false}});
    close(&c.run(p), &[0.0, 0.0]);
    let c = Case::new(&[vec![1.0, 1.0], vec![3.0, 1.0], vec![3.0, 1.0]]);
    let p = json!({"name": "x", "kernel": "model_stock", "out_dtype": "F32", "base": base(),
        "sources": [src(1, json!({})), src(2, json!({}))], "params": {"filter_wise": false}});
    close(&c.run(p), &[3.0, 1.0]);

    let c = Case::new(&[vec![1.5, -2.0]]);
    let out = c.run(
        json!({"name": "x", "kernel": "passthrough", "out_dtype": "BF16",
        "sources": [src(0, json!({"scale": 2.0}))], "params": {}}),
    );
    assert_eq!(out, vec![3.0, -4.0]);
}

#[test]
fn bad_plans_are_config_or_mismatch_errors() {
    let c = Case::new(&[vec![1.0, 2.0], vec![1.0, 2.0, 3.0]]);
    let plan = c.plan("o", json!({"name": "x", "kernel": "task_arithmetic", "out_dtype": "F32", "base": base(),
        "sources": [src(1, json!({"weight": 1.0}))], "params": {"lambda": 1.0, "normalize": false}}), 1, 10);
    match run_merge(&plan, &Control::default()) {
        Err(Error::Mismatch(m)) => assert!(m.contains("shape"), "{m}"),
        other => panic!("{other:?}"),
    }
    let plan = c.plan("o", json!({"name": "x", "kernel": "ties", "out_dtype": "F32", "base": base(),
        "sources": [src(0, json!({"weight": 1.0, "densty": 0.5}))], "params": {"lambda": 1.0, "normalize": false, "rescale": false}}), 1, 10);
    match run_merge(&plan, &Control::default()) {
        Err(Error::Config(m)) => assert!(m.contains("densty"), "{m}"),
        other => panic!("{other:?}"),
    }
    // linear with normalize and weights summing to zero: refused before anything is written.
    let plan = c.plan(
        "o",
        json!({"name": "x", "kernel": "linear", "out_dtype": "F32",
        "sources": [src(0, json!({"weight": 1.0})), src(0, json!({"weight": -1.0}))],
        "params": {"normalize": true}}),
        1,
        10,
    );
    match run_merge(&plan, &Control::default()) {
        Err(Error::Config(m)) => assert!(m.contains("sum to 0") && m.contains("'x'"), "{m}"),
        other => panic!("{other:?}"),
    }
    // Out-of-range and non-numeric parameters, a base where the kernel takes none.
    for (t, words) in [
        (
            json!({"name": "x", "kernel": "ties", "out_dtype": "F32", "base": base(),
            "sources": [src(0, json!({"weight": 1.0, "density": 1.5}))],
            "params": {"lambda": 1.0, "normalize": false, "rescale": false}}),
            "outside [0, 1]",
        ),
        (
            json!({"name": "x", "kernel": "ties", "out_dtype": "F32", "base": base(),
            "sources": [src(0, json!({"weight": "1", "density": 0.5}))],
            "params": {"lambda": 1.0, "normalize": false, "rescale": false}}),
            "finite number",
        ),
        (
            json!({"name": "x", "kernel": "linear", "out_dtype": "F32", "base": base(),
            "sources": [src(0, json!({"weight": 1.0}))], "params": {"normalize": false}}),
            "takes no base",
        ),
        (
            json!({"name": "x", "kernel": "tiez", "out_dtype": "F32",
            "sources": [src(0, json!({}))], "params": {}}),
            "unknown kernel 'tiez'",
        ),
    ] {
        match run_merge(&c.plan("o", t, 1, 10), &Control::default()) {
            Err(Error::Config(m)) => assert!(m.contains(words), "{m}"),
            other => panic!("{other:?}"),
        }
    }
    match run_merge("{\"version\": 1}", &Control::default()) {
        Err(Error::Config(m)) => assert!(m.contains("missing field"), "{m}"),
        other => panic!("{other:?}"),
    }
    // Nothing written.
    assert_eq!(
        std::fs::read_dir(c.root.path().join("o")).unwrap().count(),
        0
    );
    // Cancellation leaves no files either.
    let plan = c.plan(
        "o",
        json!({"name": "x", "kernel": "linear", "out_dtype": "F32",
        "sources": [src(0, json!({"weight": 1.0}))], "params": {"normalize": false}}),
        1,
        10,
    );
    let ctl = Control::default();
    ctl.cancel.store(true, Ordering::Relaxed);
    assert!(matches!(run_merge(&plan, &ctl), Err(Error::Cancelled)));
    assert_eq!(
        std::fs::read_dir(c.root.path().join("o")).unwrap().count(),
        0
    );
}

#[test]
fn ties_split_with_many_values_per_bucket() {
    // Eight distinct magnitudes in one radix bucket, 1000 copies each, interleaved: per-chunk
    // value maps overflow and the threshold value's ties are split (k = 3600 = 3000 + 600).
    let n = 8000;
    let vals: Vec<f32> = (0..n)
        .map(|i| {
            let v = 1.0 + ((i * 3) % 8) as f32 * f32::EPSILON;
            if i % 5 == 0 {
                -v
            } else {
                v
            }
        })
        .collect();
    let c = Case::new(&[vec![0.0; n], vals.clone()]);
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| {
        vals[b]
            .abs()
            .partial_cmp(&vals[a].abs())
            .unwrap()
            .then(a.cmp(&b))
    });
    let mut want = vec![0f32; n];
    for &i in &order[..3600] {
        want[i] = vals[i];
    }
    for (k, chunk) in [7usize, 64, 1 << 20].iter().enumerate() {
        let p = json!({"weight": 1.0, "density": 0.45});
        let out = c.run_with(
            &format!("o{k}"),
            json!({"name": "x", "kernel": "ties", "out_dtype": "F32", "base": base(),
                "sources": [src(1, p)], "params": {"lambda": 1.0, "normalize": true, "rescale": false}}),
            2,
            *chunk,
        );
        assert_eq!(out, want, "chunk {chunk}");
    }
}

/// A model file written byte by byte: (name, dtype, shape, raw little-endian bytes).
fn save_raw(dir: &Path, tensors: &[(&str, &str, Vec<usize>, Vec<u8>)]) {
    std::fs::create_dir_all(dir).unwrap();
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (n, dt, shape, raw) in tensors {
        header.insert(
            n.to_string(),
            json!({"dtype": dt, "shape": shape, "data_offsets": [data.len(), data.len() + raw.len()]}),
        );
        data.extend_from_slice(raw);
    }
    let h = Value::Object(header).to_string();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(&data);
    std::fs::write(dir.join("model.safetensors"), out).unwrap();
}

#[test]
fn fp8_block_scaled_in_and_out() {
    use crate::dtype::{f32_to_f8e4m3, f8e4m3_to_f32};
    // A 3×5 FP8 weight with 2×2 blocks: scales are 2×3.
    let q: Vec<u8> = (0..15u8)
        .map(|i| f32_to_f8e4m3(i as f32 * 0.5 - 3.0))
        .collect();
    let sc: [f32; 6] = [1.0, 2.0, 4.0, 0.5, 0.25, 8.0];
    let sbytes: Vec<u8> = sc.iter().flat_map(|x| x.to_le_bytes()).collect();
    let deq: Vec<f32> = (0..15)
        .map(|e| f8e4m3_to_f32(q[e]) * sc[(e / 5 / 2) * 3 + (e % 5) / 2])
        .collect();
    let root = tempfile::tempdir().unwrap();
    let m = root.path().join("m");
    save_raw(
        &m,
        &[
            ("w", "F8_E4M3", vec![3, 5], q.clone()),
            ("w_scale_inv", "F32", vec![2, 3], sbytes),
        ],
    );
    let f32s: Vec<u8> = deq
        .iter()
        .map(|x| x * 0.5)
        .flat_map(|x| x.to_le_bytes())
        .collect();
    save_raw(&root.path().join("b"), &[("w", "F32", vec![3, 5], f32s)]);
    let models = vec![
        root.path().join("b").display().to_string(),
        m.display().to_string(),
    ];
    let run = |out: &str, t: Value| {
        let o = root.path().join(out);
        std::fs::create_dir_all(&o).unwrap();
        let plan = json!({"version": 2, "models": models, "out_dir": o, "out_shard_size": 1u64 << 30,
            "threads": 2, "seed": 0, "chunk_elems": 4, "metadata": {}, "tensors": [t]});
        run_merge(&plan.to_string(), &Control::default()).map(|_| o)
    };
    let scale = json!({"tensor": "w_scale_inv", "block": [2, 2]});
    // Dequantised copy: exactly q × its block's scale.
    let o = run("deq", json!({"name": "w", "kernel": "passthrough", "out_dtype": "F32",
        "sources": [{"model": 1, "tensor": "w", "scale": scale, "params": {"scale": 1.0}}], "params": {}}))
    .unwrap();
    assert_eq!(read(&o, "w"), deq);
    // Mixed inputs (FP8 donor, F32 base), FP8 output: requantised per block with amax / 448.
    let o = run(
        "ta8",
        json!({"name": "w", "kernel": "task_arithmetic", "out_dtype": "F8_E4M3",
        "base": {"model": 0, "tensor": "w"},
        "sources": [{"model": 1, "tensor": "w", "scale": scale, "params": {"weight": 1.0}}],
        "params": {"lambda": 1.0, "normalize": false},
        "out_scale": {"name": "w_scale_inv", "block": [2, 2], "dtype": "F32"}}),
    )
    .unwrap();
    let out = Model::open(&o).unwrap();
    let (wq, ws) = (out.get("w").unwrap(), out.get("w_scale_inv").unwrap());
    assert_eq!((wq.dtype, ws.shape.clone()), (Dtype::F8_E4M3, vec![2, 3]));
    let s_out = read(&o, "w_scale_inv");
    let qb = out.bytes(wq);
    for e in 0..15 {
        let s = s_out[(e / 5 / 2) * 3 + (e % 5) / 2];
        let got = f8e4m3_to_f32(qb[e]) * s;
        // Exact merge is deq (base + (deq − base)); the FP8 rounding error is at most half a
        // code step: 2^-4 relative (3 mantissa bits) or 2^-10 absolute in units of the scale.
        let want = deq[e];
        assert!(
            (got - want).abs() <= want.abs() / 16.0 + s / 1024.0 + 1e-6,
            "{e}: {got} vs {want}"
        );
    }
    // Block amax maps to ±448 exactly.
    for (k, &s) in s_out.iter().enumerate() {
        let (bi, bj) = (k / 3, k % 3);
        let amax = (0..15)
            .filter(|e| e / 5 / 2 == bi && (e % 5) / 2 == bj)
            .map(|e| deq[e].abs())
            .fold(0f32, f32::max);
        assert_eq!(s, if amax > 0.0 { amax / 448.0 } else { 1.0 });
    }
    // Bad scales are refused before anything is written.
    for (t, words) in [
        (
            json!({"name": "w", "kernel": "passthrough", "out_dtype": "F32",
            "sources": [{"model": 1, "tensor": "w", "scale": {"tensor": "w_scale_inv", "block": [4, 4]},
            "params": {"scale": 1.0}}], "params": {}}),
            "needs",
        ),
        (
            json!({"name": "w", "kernel": "passthrough", "out_dtype": "F32",
            "sources": [{"model": 0, "tensor": "w", "scale": scale, "params": {"scale": 1.0}}], "params": {}}),
            "2-D F8_E4M3",
        ),
        (
            json!({"name": "w", "kernel": "passthrough", "out_dtype": "F32",
            "sources": [{"model": 1, "tensor": "w", "params": {"scale": 1.0}}], "params": {}}),
            "F8_E4M3",
        ),
        (
            json!({"name": "w", "kernel": "passthrough", "out_dtype": "F8_E4M3",
            "sources": [{"model": 0, "tensor": "w", "params": {"scale": 1.0}}], "params": {}}),
            "out_scale",
        ),
    ] {
        match run("bad", t) {
            Err(Error::Mismatch(m)) | Err(Error::Config(m)) => assert!(m.contains(words), "{m}"),
            other => panic!("{other:?}"),
        }
    }
}

// ---- nuslerp, multislerp, arcee_fusion, sce's variance top-k (methods_sph.rs) ------------------------

static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl Case {
    /// `run` into a fresh output directory each time.
    fn run1(&self, tensor: Value) -> Vec<f32> {
        let k = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.run_with(&format!("r{k}"), tensor, 2, 1 << 20)
    }

    /// Models m0..mk each with one tensor "x" of `shape`.
    fn shaped(shape: &[usize], values: &[Vec<f32>]) -> Case {
        let root = tempfile::tempdir().unwrap();
        for (i, v) in values.iter().enumerate() {
            save(
                &root.path().join(format!("m{i}")),
                &[("x", shape.to_vec(), v.clone())],
            );
        }
        Case {
            root,
            n: values.len(),
        }
    }
}

const H: f32 = std::f32::consts::FRAC_1_SQRT_2;

fn nuslerp(flatten: bool, row_wise: bool, with_base: bool) -> Value {
    let (a, b) = if with_base { (1, 2) } else { (0, 1) };
    let mut t = json!({"name": "x", "kernel": "nuslerp", "out_dtype": "F32",
        "sources": [src(a, json!({"weight": 1.0})), src(b, json!({"weight": 1.0}))],
        "params": {"nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise}});
    if with_base {
        t["base"] = base();
    }
    t
}

#[test]
fn nuslerp_whole_rows_and_columns() {
    // flattened: e1 and e2 at t = 0.5 → (e1 + e2)/√2
    let c = Case::new(&[vec![1.0, 0.0, 0.0, 0.0], vec![0.0, 1.0, 0.0, 0.0]]);
    close(&c.run1(nuslerp(true, false, false)), &[H, H, 0.0, 0.0]);
    // with a base: the task vectors are interpolated and the base added back
    let c = Case::new(&[
        vec![1.0, 1.0, 1.0, 1.0],
        vec![2.0, 1.0, 1.0, 1.0],
        vec![1.0, 2.0, 1.0, 1.0],
    ]);
    close(
        &c.run1(nuslerp(true, false, true)),
        &[1.0 + H, 1.0 + H, 1.0, 1.0],
    );
    // 2×2: rows [1,0]/[0,1] (orthogonal) and [1,0]/[1,0] (colinear: lerp)
    let m0 = vec![1.0, 0.0, 1.0, 0.0];
    let m1 = vec![0.0, 1.0, 1.0, 0.0];
    let c = Case::shaped(&[2, 2], &[m0, m1]);
    close(&c.run1(nuslerp(false, false, false)), &[H, H, 1.0, 0.0]);
    // row-wise: vectors along dimension 0 (columns): (1,1)/(0,1) at 45°, (0,0)/(1,0) at 90°
    let k = ((std::f64::consts::PI / 8.0).sin() / (std::f64::consts::PI / 4.0).sin()) as f32;
    close(&c.run1(nuslerp(false, true, false)), &[k, H, 2.0 * k, 0.0]);
    // flatten wins over row_wise
    let flat = c.run1(nuslerp(true, true, false));
    assert_eq!(flat, c.run1(nuslerp(true, false, false)));
}

#[test]
fn multislerp_with_and_without_base() {
    let c = Case::new(&[
        vec![1.0, 1.0, 1.0],
        vec![2.0, 1.0, 1.0],
        vec![1.0, 2.0, 1.0],
    ]);
    let t = |srcs: Value, with_base: bool, normalize: bool| {
        let mut t = json!({"name": "x", "kernel": "multislerp", "out_dtype": "F32", "sources": srcs,
            "params": {"normalize_weights": normalize, "eps": 1e-8}});
        if with_base {
            t["base"] = base();
        }
        t
    };
    let two = json!([
        src(1, json!({"weight": 1.0})),
        src(2, json!({"weight": 1.0}))
    ]);
    close(
        &c.run1(t(two.clone(), true, true)),
        &[1.0 + H, 1.0 + H, 1.0],
    );
    // unnormalised weights 0.5 + 0.5 are the same
    let half = json!([
        src(1, json!({"weight": 0.5})),
        src(2, json!({"weight": 0.5}))
    ]);
    close(&c.run1(t(half, true, false)), &[1.0 + H, 1.0 + H, 1.0]);
    // one model: its tensor as it is (mergekit does not add the base back)
    let one = json!([src(2, json!({"weight": 0.3}))]);
    close(&c.run1(t(one, true, true)), &[1.0, 2.0, 1.0]);
    // without a base the raw tensors are interpolated: same norm, direction between them
    let out = c.run1(t(two, false, true));
    let n: f32 = out.iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((n - 6f32.sqrt()).abs() < 1e-5, "{out:?}");
    assert!((out[0] - out[1]).abs() < 1e-6 && out[2] < out[0], "{out:?}");
}

#[test]
fn multislerp_refuses_a_zero_mean_direction() {
    let c = Case::new(&[
        vec![0.0, 0.0],
        vec![1.0, 0.0],
        vec![-1.0, 0.0],
        vec![0.0, 0.0],
    ]);
    let t = json!({"name": "x", "kernel": "multislerp", "out_dtype": "F32", "base": base(),
        "sources": [src(1, json!({"weight": 1.0})), src(2, json!({"weight": 1.0})),
                    src(3, json!({"weight": 1.0}))],
        "params": {"normalize_weights": true, "eps": 1e-8}});
    let err = run_merge(&c.plan("o", t, 1, 1 << 20), &Control::default()).unwrap_err();
    assert!(err.to_string().contains("weighted mean"), "{err}");
}

/// A smooth base and a source that differs from it in a few strong places.
fn fusion_case(n: usize) -> (Vec<f32>, Vec<f32>) {
    let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
    let p: Vec<f32> = b
        .iter()
        .enumerate()
        .map(|(i, x)| x + 0.01 * (i as f32 * 1.3).cos() + if i % 97 == 0 { 1.0 } else { 0.0 })
        .collect();
    (b, p)
}

#[test]
fn arcee_fusion_takes_the_important_entries() {
    let (b, p) = fusion_case(4096);
    let c = Case::shaped(&[32, 128], &[b.clone(), p.clone()]);
    let t = json!({"name": "x", "kernel": "arcee_fusion", "out_dtype": "F32", "base": base(),
        "sources": [src(1, json!({}))], "params": {}});
    let out = c.run_with("a", t.clone(), 1, 1 << 20);
    let mut taken = 0;
    for i in 0..b.len() {
        // every element is the base's or b + (p − b)
        let took = out[i] == b[i] + (p[i] - b[i]);
        assert!(took || out[i] == b[i], "{i}");
        taken += usize::from(took && p[i] != b[i]);
        // the strong differences are above median + 1.5 IQR of the importance
        if i % 97 == 0 {
            assert!(took, "{i}");
        }
    }
    assert!((4096 / 97..4096 / 4).contains(&taken), "{taken}");
    for (k, (th, ch)) in [(2, 7), (2, 1000), (1, 33)].into_iter().enumerate() {
        assert_eq!(out, c.run_with(&format!("o{k}"), t.clone(), th, ch));
    }
}

#[test]
fn sce_variance_topk_keeps_the_most_varied_elements() {
    // element variances across the 2 task vectors: 0, 1, 4, 9, 16 (2 of 4 nonzero kept at 0.5)
    let b = vec![0.0f32; 5];
    let s1 = vec![0.0, 1.0, 2.0, 3.0, 4.0];
    let s2 = vec![0.0, -1.0, -2.0, -3.0, -4.0];
    let s3 = vec![0.0, 1.0, 2.0, 3.0, 4.0];
    let c = Case::new(&[b, s1, s2, s3]);
    let t = |k: f64| {
        json!({"name": "x", "kernel": "sce", "out_dtype": "F32", "base": base(),
            "sources": [src(1, json!({})), src(2, json!({})), src(3, json!({}))],
            "params": {"select_topk": k}})
    };
    // all kept: sign election (positive) keeps sources 1 and 3 → their weighted mean
    let all = c.run1(t(1.0));
    close(&all, &[0.0, 1.0, 2.0, 3.0, 4.0]);
    // 0.5 of the 4 nonzero variances: the elements 3 and 4; the others are the base
    close(&c.run1(t(0.5)), &[0.0, 0.0, 0.0, 3.0, 4.0]);
    close(&c.run1(t(0.0)), &[0.0; 5]);
}

#[test]
fn sce_topk_ties_are_split_by_index_whatever_the_chunking() {
    // every element has the same variance: the first k elements are kept
    let n = 10_000;
    let b: Vec<f32> = (0..n).map(|i| (i % 7) as f32 * 0.25).collect();
    let s1: Vec<f32> = b.iter().map(|x| x + 0.5).collect();
    let s2: Vec<f32> = b.iter().map(|x| x - 0.25).collect();
    let c = Case::new(&[b.clone(), s1, s2]);
    let t = json!({"name": "x", "kernel": "sce", "out_dtype": "F32", "base": base(),
        "sources": [src(1, json!({})), src(2, json!({}))], "params": {"select_topk": 0.3}});
    let r1 = c.run_with("a", t.clone(), 1, 1 << 20);
    let kept = (0..n).filter(|&i| r1[i] != b[i]).collect::<Vec<_>>();
    assert_eq!(kept, (0..3000).collect::<Vec<_>>());
    for (k, (th, ch)) in [(2, 7), (2, 999), (3, 4096)].into_iter().enumerate() {
        assert_eq!(r1, c.run_with(&format!("o{k}"), t.clone(), th, ch));
    }
}

#[test]
fn spherical_methods_independent_of_threads_and_chunks() {
    let n = 7 * 30_011;
    let v = |f: f32, g: f32| -> Vec<f32> {
        (0..n)
            .map(|i| (i as f32 * f).sin() + g * (i as f32 * 0.013).cos())
            .collect()
    };
    let c = Case::shaped(
        &[n / 7, 7],
        &[v(0.37, 0.0), v(0.37, 0.3), v(0.41, -0.2), v(0.53, 0.1)],
    );
    let c1 = Case::new(&[v(0.37, 0.0), v(0.37, 0.3), v(0.41, -0.2), v(0.53, 0.1)]);
    let ms = json!({"name": "x", "kernel": "multislerp", "out_dtype": "F32", "base": base(),
        "sources": [src(1, json!({"weight": 0.2})), src(2, json!({"weight": 0.5})),
                    src(3, json!({"weight": 0.3}))],
        "params": {"normalize_weights": true, "eps": 1e-8}});
    let bf = |mut t: Value| {
        t["compute_dtype"] = json!("BF16");
        t
    };
    let arcee = json!({"name": "x", "kernel": "arcee_fusion", "out_dtype": "F32", "base": base(),
        "sources": [src(1, json!({}))], "params": {}});
    for (case, t) in [
        (&c1, nuslerp(true, false, true)),
        (&c1, ms.clone()),
        (&c, nuslerp(false, false, true)),
        (&c, nuslerp(false, true, false)),
        // bf16 compute: every step rounded, sums in fixed order
        (&c1, bf(nuslerp(true, false, true))),
        (&c, bf(nuslerp(false, true, true))),
        (&c1, bf(ms)),
        (&c, bf(arcee)),
    ] {
        let k = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let r1 = case.run_with(&format!("a{k}"), t.clone(), 1, 1 << 20);
        assert_eq!(r1, case.run_with(&format!("b{k}"), t.clone(), 2, 1000));
        assert_eq!(r1, case.run_with(&format!("c{k}"), t.clone(), 3, 65536));
    }
}

/// torch's float32 norm of a contiguous tensor (8 f32 lanes, then the tail), whole-vector form.
fn torch_norm_f32(v: &[f32]) -> f32 {
    let main = v.len() - v.len() % 8;
    let mut lanes = [0f32; 8];
    for (j, &x) in v[..main].iter().enumerate() {
        lanes[j % 8] += x * x;
    }
    let mut s = lanes[0];
    for &l in &lanes[1..] {
        s += l;
    }
    for &x in &v[main..] {
        s += x * x;
    }
    s.sqrt()
}

/// torch.dot of two bf16 vectors (float accumulation), whole-vector form: 64 accumulators over
/// blocks of 64, registers then lanes reduced as a tree, an 8-lane tail over blocks of 16, the
/// last n % 16 products one by one.
#[allow(clippy::needless_range_loop)]
fn torch_dot_f32(x: &[f32], y: &[f32]) -> f32 {
    let n = x.len();
    let (la, lv) = (n / 64 * 64, n / 16 * 16);
    let mut regs = [[0f32; 8]; 8];
    for b in (0..la).step_by(64) {
        for r in 0..8 {
            for l in 0..8 {
                regs[r][l] += x[b + 8 * r + l] * y[b + 8 * r + l];
            }
        }
    }
    let red = |v: [f32; 8]| ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7]));
    for half in [4, 2, 1] {
        for r in 0..half {
            for l in 0..8 {
                regs[r][l] += regs[r + half][l];
            }
        }
    }
    let mut tail = [0f32; 8];
    for j in la..lv {
        tail[(j - la) % 8] += x[j] * y[j];
    }
    let mut s = red(regs[0]) + red(tail);
    for j in lv..n {
        s += x[j] * y[j];
    }
    s
}

/// mergekit's karcher_merge_tensors under bf16, statement by statement on whole vectors (every
/// bf16 tensor op rounded, 0-dim f32 factors on the left of a product rounded to bf16 first).
fn karcher_bf16_reference(xs: &[Vec<f32>], max_iter: usize, tol: f64) -> Vec<f32> {
    use super::bf16::rb;
    let r = |v: Vec<f32>| v.into_iter().map(rb).collect::<Vec<f32>>();
    let xs: Vec<Vec<f32>> = xs.iter().map(|x| r(x.clone())).collect();
    let n = xs[0].len();
    let norms: Vec<f32> = xs.iter().map(|x| torch_norm_f32(x)).collect();
    let valid: Vec<usize> = (0..xs.len()).filter(|&i| norms[i] as f64 > tol).collect();
    if valid.is_empty() {
        return vec![0.0; n];
    }
    let units: Vec<Vec<f32>> = valid
        .iter()
        .map(|&i| xs[i].iter().map(|&x| rb(x / norms[i])).collect())
        .collect();
    let al = 1.0 / xs.len() as f64;
    let asum = valid.iter().fold(0.0, |s, _| s + al);
    let a = (al / asum) as f32;
    let mut mean = vec![0f32; n];
    for u in &units {
        for (m, &x) in mean.iter_mut().zip(u) {
            *m = rb(*m + rb(x * a));
        }
    }
    let mn = torch_norm_f32(&mean);
    mean = if (mn as f64) < tol {
        units[0].clone()
    } else {
        mean.iter().map(|&m| rb(m / mn)).collect()
    };
    for _ in 0..max_iter {
        let mut t = vec![0f32; n];
        for u in &units {
            let dot = rb(torch_dot_f32(&mean, u)).clamp(-1.0, 1.0);
            let th = rb(dot.acos());
            if (th as f64) < tol {
                continue;
            }
            let c = rb(rb(th / rb(th.sin())) * a);
            for j in 0..n {
                t[j] = rb(t[j] + rb(c * rb(u[j] - rb(dot * mean[j]))));
            }
        }
        let tn = torch_norm_f32(&t);
        if (tn as f64) < tol {
            break;
        }
        let (cb, sb) = (rb(tn.cos()), rb(tn.sin()));
        for j in 0..n {
            mean[j] = rb(rb(cb * mean[j]) + rb(sb * rb(t[j] / tn)));
        }
        let un = torch_norm_f32(&mean);
        if un as f64 > tol {
            mean = mean.iter().map(|&m| rb(m / un)).collect();
        }
    }
    let scale = norms.iter().fold(0f32, |s, &x| s + (al as f32) * x);
    mean.iter().map(|&m| rb(rb(scale) * m)).collect()
}

#[test]
fn karcher_bf16_follows_mergekits_bf16_iteration_whatever_threads_and_chunks() {
    // more than one 64 Ki span, and a tail of numel % 8 = 5 elements outside torch's norm lanes
    let n = 2 * 65_536 + 3_077;
    let v = |f: f32, g: f32| -> Vec<f32> {
        (0..n)
            .map(|i| 0.02 * ((i as f32 * f).sin() + g * (i as f32 * 0.013).cos()))
            .collect()
    };
    let xs = vec![v(0.37, 0.0), v(0.37, 0.3), v(0.41, -0.2)];
    let c = Case::new(&xs);
    let t = |max_iter: f64, bf: bool| {
        let mut t = json!({"name": "x", "kernel": "karcher", "out_dtype": "F32",
            "sources": [src(0, json!({})), src(1, json!({})), src(2, json!({}))],
            "params": {"max_iter": max_iter, "tol": 1e-5}});
        if bf {
            t["compute_dtype"] = json!("BF16");
        }
        t
    };
    for it in [0usize, 1, 10] {
        let out = c.run1(t(it as f64, true));
        let want = karcher_bf16_reference(&xs, it, 1e-5);
        let bad = out.iter().zip(&want).filter(|(a, b)| a != b).count();
        assert_eq!(bad, 0, "max_iter {it}: {bad} elements differ");
    }
    let r1 = c.run_with("t1", t(10.0, true), 1, 1 << 20);
    assert_eq!(r1, c.run_with("t2", t(10.0, true), 2, 1000));
    assert_eq!(r1, c.run_with("t3", t(10.0, true), 3, 65_536));
    // float32 compute keeps the exact iteration: not the bf16 one
    let f = c.run1(t(10.0, false));
    assert!(f.iter().zip(&r1).any(|(a, b)| a != b));
    assert!(f.iter().zip(&r1).all(|(a, b)| (a - b).abs() < 1e-3));
}

#[test]
fn karcher_bf16_edge_cases_follow_mergekit() {
    let t = |k: usize| {
        let sources: Vec<Value> = (0..k).map(|i| src(i, json!({}))).collect();
        json!({"name": "x", "kernel": "karcher", "out_dtype": "F32", "compute_dtype": "BF16",
            "sources": sources, "params": {"max_iter": 10.0, "tol": 1e-5}})
    };
    let a: Vec<f32> = (0..37).map(|i| (i as f32 * 0.7).sin()).collect();
    let neg: Vec<f32> = a.iter().map(|x| -x).collect();
    // opposite directions: the weighted mean vanishes, the first unit vector is the start
    let xs = vec![a.clone(), neg];
    assert_eq!(
        Case::new(&xs).run1(t(2)),
        karcher_bf16_reference(&xs, 10, 1e-5)
    );
    // a zero source is excluded from the mean (its norm still counts in the scale)
    let xs = vec![
        a.clone(),
        vec![0.0; 37],
        a.iter().map(|x| x * 0.5 + 0.1).collect(),
    ];
    let out = Case::new(&xs).run1(t(3));
    assert_eq!(out, karcher_bf16_reference(&xs, 10, 1e-5));
    assert!(out.iter().any(|&x| x != 0.0));
    // every source zero: zeros; one source: its bf16 values
    let z = vec![vec![0.0f32; 37]; 2];
    assert_eq!(Case::new(&z).run1(t(2)), vec![0.0; 37]);
    // more steps than the replay allows: refused by name (float32 compute is not limited)
    let mut many = t(2);
    many["params"]["max_iter"] = json!(65.0);
    let c = Case::new(&[a.clone(), a.iter().map(|x| x + 0.5).collect()]);
    let err = run_merge(&c.plan("m", many.clone(), 1, 1 << 20), &Control::default()).unwrap_err();
    assert!(err.to_string().contains("max_iter 65"), "{err}");
    many["compute_dtype"] = json!("F32");
    assert_eq!(c.run1(many).len(), 37);
    let one = Case::new(std::slice::from_ref(&a)).run1(t(1));
    let ab: Vec<f32> = a.iter().map(|&x| super::bf16::rb(x)).collect();
    assert_eq!(one, ab);
}

// ---- della / della_linear masks (methods_mk.rs) ----------------------------------------------

/// DELLA's keep decisions as first written: per row a stable comparison sort of |δ| (total_cmp,
/// equal magnitudes by index), p from the rank, the stream's draw below p·2^32.
fn della_reference_keep(d: &[f32], row: usize, i: usize, dens: f64, eps: f64) -> Vec<bool> {
    let stream = super::rng::KeepStream::new(7, "x", i, dens);
    let mut keep = vec![false; d.len()];
    for (r, rowd) in d.chunks(row).enumerate() {
        let n = rowd.len();
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&p, &q| rowd[p].abs().total_cmp(&rowd[q].abs()));
        let denom = if n > 1 { (n - 1) as f64 } else { 1.0 };
        for (rk, &c) in order.iter().enumerate() {
            let p = (dens - eps) + 2.0 * eps * rk as f64 / denom;
            let thr = (p.clamp(0.0, 1.0) * 4_294_967_296.0).min(u32::MAX as f64) as u32;
            let e = r * row + c;
            keep[e] = stream.draw(e as u64) < thr || p >= 1.0;
        }
    }
    keep
}

/// Values on a coarse grid (many equal magnitudes, zeros of both signs, exact L1 sums).
fn della_values(n: usize, salt: u64) -> Vec<f32> {
    (0..n as u64)
        .map(|k| {
            let r = super::rng::mix64(k ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let v = ((r % 41) as f32 - 20.0) / 64.0;
            if r.is_multiple_of(97) {
                -0.0
            } else {
                v
            }
        })
        .collect()
}

#[test]
fn della_masks_follow_the_row_ranks_whatever_threads_chunks_and_cache() {
    let (rows, cols) = (24, 300);
    let n = rows * cols;
    let b: Vec<f32> = della_values(n, 1).iter().map(|x| x.abs() + 1.0).collect();
    let a1: Vec<f32> = b
        .iter()
        .zip(della_values(n, 2))
        .map(|(x, d)| x + d)
        .collect();
    let a2: Vec<f32> = b
        .iter()
        .zip(della_values(n, 3))
        .map(|(x, d)| x + d)
        .collect();
    let c = Case::shaped(
        &[rows, cols],
        &[b.clone(), a1.clone(), a2.clone(), b.clone()],
    );
    let t = |kernel: &str, srcs: Vec<Value>, rescale: bool| {
        json!({"name": "x", "kernel": kernel, "out_dtype": "F32", "base": base(), "sources": srcs,
               "params": {"lambda": 1.0, "normalize": false, "rescale": rescale}})
    };
    let s = |m: usize, dens: f64, eps: f64| {
        src(m, json!({"weight": 1.0, "density": dens, "epsilon": eps}))
    };
    // one source, no rescale: kept δ as they are, dropped ones zero, keeps as the reference's
    let d1: Vec<f32> = a1.iter().zip(&b).map(|(x, y)| x - y).collect();
    let keep = della_reference_keep(&d1, cols, 0, 0.5, 0.2);
    for (chunk, threads) in [(1 << 20, 1), (7, 2), (1000, 2)] {
        let out = c.run_with(
            &format!("one{chunk}"),
            t("della_linear", vec![s(1, 0.5, 0.2)], false),
            threads,
            chunk,
        );
        for e in 0..n {
            let want = if keep[e] { b[e] + d1[e] } else { b[e] };
            assert_eq!(
                out[e].to_bits(),
                want.to_bits(),
                "element {e}, chunk {chunk}"
            );
        }
    }
    let kept = keep.iter().filter(|&&k| k).count() as f64 / n as f64;
    assert!((kept - 0.5).abs() < 0.03, "{kept}");
    // the second source's stream (index 1), behind a source whose δ is zero
    let d2: Vec<f32> = a2.iter().zip(&b).map(|(x, y)| x - y).collect();
    let keep2 = della_reference_keep(&d2, cols, 1, 0.3, 0.1);
    let out = c.run_with(
        "two",
        t("della_linear", vec![s(3, 0.5, 0.1), s(2, 0.3, 0.1)], false),
        2,
        999,
    );
    for e in 0..n {
        let want = if keep2[e] { b[e] + d2[e] } else { b[e] };
        assert_eq!(out[e].to_bits(), want.to_bits(), "element {e}");
    }
    // with rescale (masks kept from the statistics pass, or drawn again when the cache is off):
    // the same output for every thread count and chunking, both kernels
    for kernel in ["della", "della_linear"] {
        let srcs = || vec![s(1, 0.5, 0.2), s(2, 0.4, 0.1)];
        let r1 = c.run_with(&format!("{kernel}-a"), t(kernel, srcs(), true), 1, 1 << 20);
        let r2 = c.run_with(&format!("{kernel}-b"), t(kernel, srcs(), true), 2, 7);
        let r3 = c.run_with(&format!("{kernel}-c"), t(kernel, srcs(), true), 2, 999);
        super::methods_mk::set_della_cache_limit(0);
        let r4 = c.run_with(&format!("{kernel}-d"), t(kernel, srcs(), true), 2, 999);
        super::methods_mk::set_della_cache_limit(64 << 20);
        assert_eq!(r1, r2, "{kernel}");
        assert_eq!(r1, r3, "{kernel}");
        assert_eq!(r1, r4, "{kernel}");
        assert!(r1.iter().zip(&b).any(|(x, y)| x != y));
    }
}

#[test]
fn ordered_float_sums_do_not_depend_on_threads() {
    // values whose f64 sum depends on the order of the additions (a few large, many small)
    let n = 1_000_003;
    let v: Vec<f32> = (0..n)
        .map(|i| {
            let x = (i as f32 * 0.618).sin();
            if i % 97 == 0 {
                x * 1e7
            } else {
                x * 1e-3
            }
        })
        .collect();
    let c = Case::new(&[v.iter().map(|x| -0.5 * x).collect(), v]);
    let t = json!({"name": "x", "kernel": "slerp", "out_dtype": "F32", "base": base(),
        "sources": [src(1, json!({}))], "params": {"t": 0.5}});
    let plan = plan::parse_plan(&c.plan("p", t, 1, 1 << 20)).unwrap();
    let models = open_models(&plan.models).unwrap();
    let jobs = plan::build_jobs(&plan, &models).unwrap();
    let ctx = Ctx::new(&models, &jobs[0], plan.chunk_elems);
    assert!(ctx.nchunks > 8, "{}", ctx.nchunks);
    let sum = |threads: usize| -> f64 {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            ctx.fold_ordered(
                &Control::default(),
                false,
                || 0f64,
                |acc, _c, _a, s, m| {
                    for &x in &s.srcs[0][..m] {
                        *acc += x as f64;
                    }
                },
                |a, b| a + b,
            )
            .unwrap()
        })
    };
    let s1 = sum(1);
    for threads in [2, 3, 4] {
        assert_eq!(s1.to_bits(), sum(threads).to_bits(), "threads={threads}");
    }
}
