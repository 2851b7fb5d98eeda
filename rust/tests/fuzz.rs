//! Property test ("fuzz target") of everything in the core that parses untrusted input: the
//! safetensors header reader, the shard-index reader and the merge-plan parser and checker.
//! Stable toolchain, no fuzzing engine: a small self-written generator (xorshift64*) produces
//! structured inputs near the valid ones (the interesting boundary) plus random byte mutations,
//! and each one must give `Ok` or an `Err`, never a panic. A small fraction of the plans that
//! pass the checks is executed end to end on tiny models (so the kernels see odd shapes, dtypes
//! and parameter values too).
//!
//! `cargo test` runs 50 000 cases; `make fuzz` runs 1 000 000 (FINRECIPE_FUZZ_CASES=N sets the
//! count, FINRECIPE_FUZZ_SEED the seed). The summary line reports cases per target and panics.

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use finrecipe_core::merge::plan::{build_jobs, parse_plan, KERNELS};
use finrecipe_core::merge::{run_merge, Control};
use finrecipe_core::safetensors::read::{file_from_bytes, parse_header, Model};
use serde_json::{json, Value};

static HEADERS_OK: AtomicU64 = AtomicU64::new(0);
static INDEXES_OK: AtomicU64 = AtomicU64::new(0);

/// xorshift64* (Vigna 2016): small, fast, good enough to explore inputs.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
    fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }
    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len() as u64) as usize]
    }
}

/// Every dtype of the format with its bits per element (sub-byte ones included).
const DTYPES: &[(&str, usize)] = &[
    ("BOOL", 8),
    ("F4", 4),
    ("F6_E2M3", 6),
    ("F6_E3M2", 6),
    ("U8", 8),
    ("I8", 8),
    ("F8_E5M2", 8),
    ("F8_E4M3", 8),
    ("F8_E8M0", 8),
    ("I16", 16),
    ("U16", 16),
    ("F16", 16),
    ("BF16", 16),
    ("I32", 32),
    ("U32", 32),
    ("F32", 32),
    ("F64", 64),
    ("I64", 64),
    ("U64", 64),
];
const BAD_DTYPES: &[&str] = &[
    "F99",
    "",
    "bf16",
    "Q4_0",
    "F8_E4M3FN",
    "\u{0}",
    "E8M0",
    "F4",
];

/// A number that is often at a boundary.
fn edgy_u64(r: &mut Rng) -> u64 {
    match r.below(8) {
        0 => 0,
        1 => 1,
        2 => u64::MAX,
        3 => u64::MAX / 2 + r.below(3),
        4 => 1 << r.below(64),
        5 => (1u64 << 32) + r.below(3),
        _ => r.below(40),
    }
}

fn random_value(r: &mut Rng, depth: u32) -> Value {
    match r.below(if depth > 2 { 6 } else { 8 }) {
        0 => Value::Null,
        1 => Value::Bool(r.chance(1, 2)),
        2 => json!(edgy_u64(r)),
        3 => json!(-(r.below(1000) as i64) - 1),
        4 => json!((r.next() as f64 / u64::MAX as f64 - 0.5) * 10f64.powi(r.below(40) as i32 - 20)),
        5 => Value::String(random_name(r)),
        6 => Value::Array(
            (0..r.below(4))
                .map(|_| random_value(r, depth + 1))
                .collect(),
        ),
        _ => {
            let mut m = serde_json::Map::new();
            for _ in 0..r.below(4) {
                m.insert(random_name(r), random_value(r, depth + 1));
            }
            Value::Object(m)
        }
    }
}

fn random_name(r: &mut Rng) -> String {
    match r.below(10) {
        0 => String::new(),
        1 => "__metadata__".into(),
        2 => "../../other/model.safetensors".into(),
        3 => "a\u{0}b".into(),
        4 => "é\u{1F600}".repeat(1 + r.below(3) as usize),
        5 => "x".repeat(r.below(300) as usize),
        _ => format!("t{}", r.below(6)),
    }
}

/// A safetensors file: mostly valid, with one or more of many possible defects.
fn gen_safetensors(r: &mut Rng) -> Vec<u8> {
    if r.chance(1, 20) {
        return (0..r.below(64)).map(|_| r.next() as u8).collect();
    }
    let mut header = serde_json::Map::new();
    let mut off: u64 = 0;
    let n = r.below(5);
    for i in 0..n {
        let (dt, bits) = *r.pick(DTYPES);
        let mut shape: Vec<Value> = (0..r.below(4)).map(|_| json!(r.below(5))).collect();
        let mut numel: u64 = shape.iter().map(|v| v.as_u64().unwrap()).product();
        let mut dtype = Value::String(dt.to_string());
        let defect = r.below(30);
        match defect {
            0 => dtype = Value::String(r.pick(BAD_DTYPES).to_string()),
            1 => dtype = random_value(r, 0),
            2 => {
                shape = vec![json!(edgy_u64(r)), json!(edgy_u64(r)), json!(edgy_u64(r))];
                numel = 1;
            }
            3 => shape = vec![random_value(r, 0)],
            _ => {}
        }
        let nbytes = numel.saturating_mul(bits as u64) / 8;
        let mut offs = json!([off, off.saturating_add(nbytes)]);
        match r.below(25) {
            0 => offs = json!([edgy_u64(r), edgy_u64(r)]),
            1 => offs = json!([off + 1, off + 1 + nbytes]),
            2 => offs = json!([off.saturating_add(nbytes), off]),
            3 => offs = json!([off]),
            4 => offs = random_value(r, 0),
            5 if off > 0 => offs = json!([off - 1, off - 1 + nbytes]),
            _ => {}
        }
        off = off.saturating_add(nbytes);
        let mut entry = serde_json::Map::new();
        if !r.chance(1, 40) {
            entry.insert("dtype".into(), dtype);
        }
        if !r.chance(1, 40) {
            entry.insert("shape".into(), Value::Array(shape));
        }
        if !r.chance(1, 40) {
            entry.insert("data_offsets".into(), offs);
        }
        if r.chance(1, 40) {
            entry.insert(random_name(r), random_value(r, 0));
        }
        let name = if r.chance(1, 10) {
            random_name(r)
        } else {
            format!("t{i}")
        };
        header.insert(
            name,
            if r.chance(1, 50) {
                random_value(r, 0)
            } else {
                Value::Object(entry)
            },
        );
    }
    if r.chance(1, 3) {
        let meta = if r.chance(1, 4) {
            random_value(r, 0)
        } else {
            json!({"format": "pt"})
        };
        header.insert("__metadata__".into(), meta);
    }
    let text = Value::Object(header).to_string();
    let mut hb = text.into_bytes();
    while r.chance(1, 2) && !hb.len().is_multiple_of(8) {
        hb.push(b' ');
    }
    let data_len = match r.below(12) {
        0 => off.saturating_add(1 + r.below(3)),
        1 => off.saturating_sub(1 + r.below(3)),
        _ => off,
    }
    .min(1 << 16);
    let declared = match r.below(16) {
        0 => edgy_u64(r),
        1 => hb.len() as u64 + 1,
        2 => (hb.len() as u64).saturating_sub(1),
        _ => hb.len() as u64,
    };
    let mut out = declared.to_le_bytes().to_vec();
    out.extend_from_slice(&hb);
    out.extend((0..data_len).map(|_| r.next() as u8));
    mutate(r, &mut out);
    out
}

/// Random byte-level damage, sometimes.
fn mutate(r: &mut Rng, b: &mut Vec<u8>) {
    match r.below(10) {
        0 if !b.is_empty() => {
            for _ in 0..1 + r.below(4) {
                let i = r.below(b.len() as u64) as usize;
                b[i] = r.next() as u8;
            }
        }
        1 => b.truncate(r.below(b.len() as u64 + 1) as usize),
        2 if !b.is_empty() => {
            let i = r.below(b.len() as u64) as usize;
            let c = *r.pick(b"{}[]\",:0\\ \x00\xff");
            b.insert(i, c);
        }
        _ => {}
    }
}

fn check_header(r: &mut Rng) {
    let bytes = gen_safetensors(r);
    if let Ok((tensors, _)) = parse_header(Path::new("fuzz.safetensors"), &bytes) {
        HEADERS_OK.fetch_add(1, Ordering::Relaxed);
        // What the reader accepts is self-consistent: every tensor lies inside the buffer.
        for t in &tensors {
            assert!(t.start + t.nbytes() <= bytes.len(), "tensor past the end");
            assert_eq!(
                t.numel() as u128 * (t.dtype.bitsize() as u128) / 8,
                t.nbytes() as u128
            );
        }
    }
}

/// A valid safetensors file holding `names` (small tensors of random float dtypes).
fn valid_file(r: &mut Rng, names: &[String]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut off = 0u64;
    for n in names {
        let (dt, bits) = *r.pick(&[("F16", 16usize), ("BF16", 16), ("F32", 32), ("I32", 32)]);
        let shape: Vec<u64> = (0..r.below(3)).map(|_| r.below(4)).collect();
        let nb = shape.iter().product::<u64>() * bits as u64 / 8;
        header.insert(
            n.clone(),
            json!({"dtype": dt, "shape": shape, "data_offsets": [off, off + nb]}),
        );
        off += nb;
    }
    let h = Value::Object(header).to_string();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(h.as_bytes());
    out.extend((0..off).map(|_| r.next() as u8));
    out
}

fn check_index(r: &mut Rng) {
    let shard_names = [
        "s1.safetensors",
        "s2.safetensors",
        "../s1.safetensors",
        "../../other/model.safetensors",
        "/etc/passwd",
        "",
        ".",
        "..",
        "a\\b",
        "missing.safetensors",
    ];
    // Tensors t0..tn split over two shards; the weight map says where each is, with defects.
    let n = r.below(6) as usize;
    let home: Vec<usize> = (0..n).map(|_| r.below(2) as usize).collect();
    let names = |k: usize| -> Vec<String> {
        (0..n)
            .filter(|&i| home[i] == k)
            .map(|i| format!("t{i}"))
            .collect()
    };
    let mut shards: BTreeMap<&str, Vec<u8>> = BTreeMap::new();
    for (k, f) in ["s1.safetensors", "s2.safetensors"].into_iter().enumerate() {
        let mut ns = names(k);
        if r.chance(1, 20) {
            ns.push(random_name(r));
        }
        let b = if r.chance(1, 10) {
            gen_safetensors(r)
        } else {
            valid_file(r, &ns)
        };
        shards.insert(f, b);
    }
    let text = if r.chance(1, 20) {
        let mut b = random_value(r, 0).to_string().into_bytes();
        mutate(r, &mut b);
        String::from_utf8_lossy(&b).into_owned()
    } else {
        let mut wm = serde_json::Map::new();
        for (i, &k) in home.iter().enumerate() {
            if r.chance(1, 30) {
                continue;
            }
            let v = match r.below(30) {
                0 => random_value(r, 0),
                1..=3 => Value::String(r.pick(&shard_names).to_string()),
                _ => Value::String(shard_names[k].to_string()),
            };
            wm.insert(format!("t{i}"), v);
        }
        if r.chance(1, 20) {
            wm.insert(
                random_name(r),
                Value::String(r.pick(&shard_names).to_string()),
            );
        }
        let mut idx = json!({"metadata": {"total_size": edgy_u64(r)}, "weight_map": wm});
        if r.chance(1, 30) {
            idx = json!({"weight_map": random_value(r, 0)});
        }
        let mut b = idx.to_string().into_bytes();
        if r.chance(1, 5) {
            mutate(r, &mut b);
        }
        String::from_utf8_lossy(&b).into_owned()
    };
    let dir = Path::new("/fuzz/model");
    let res = Model::sharded_from(dir, &dir.join("index.json"), &text, |name| {
        assert!(
            !name.contains('/') && name != ".." && name != ".",
            "a shard name that leaves the directory reached the opener: {name:?}"
        );
        match shards.get(name) {
            Some(b) => file_from_bytes(&dir.join(name), b),
            None => Err(finrecipe_core::Error::format(
                dir.join(name),
                "no such shard",
            )),
        }
    });
    if let Ok(m) = res {
        INDEXES_OK.fetch_add(1, Ordering::Relaxed);
        for t in &m.tensors {
            assert_eq!(
                m.get(&t.name).map(|x| x.name.as_str()),
                Some(t.name.as_str())
            );
            let _ = m.bytes(t);
        }
    }
}

/// Tiny models on disk (opened once) for the plan checks.
struct Models {
    _root: tempfile::TempDir,
    paths: Vec<PathBuf>,
    models: Vec<Model>,
    out: PathBuf,
    runs: AtomicU64,
    accepted: AtomicU64,
    executed: AtomicU64,
}

const TENSORS: &[(&str, &str, &[usize])] = &[
    ("a", "F32", &[3, 5]),
    ("b", "BF16", &[7]),
    ("c", "F16", &[2, 2]),
    ("e", "F32", &[0, 4]),
    ("s", "BF16", &[]),
    ("i", "I64", &[4]),
    ("q", "F8_E4M3", &[4]),
    ("u", "U8", &[3]),
    ("f4", "F4", &[6]),
    ("q8", "F8_E4M3", &[3, 5]),
    ("q8_s", "F32", &[2, 3]),
];

fn write_model(dir: &Path, seed: u64) {
    std::fs::create_dir_all(dir).unwrap();
    let mut r = Rng(seed | 1);
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, dt, shape) in TENSORS {
        let numel: usize = shape.iter().product();
        let bits = DTYPES.iter().find(|d| d.0 == *dt).unwrap().1;
        let start = data.len();
        match *dt {
            "F32" => (0..numel)
                .for_each(|_| data.extend(((r.below(2000) as f32 - 1000.0) / 300.0).to_le_bytes())),
            "BF16" | "F16" => (0..numel).for_each(|_| data.extend([r.next() as u8, 0x3c])),
            _ => data.extend((0..numel * bits / 8).map(|_| r.next() as u8)),
        }
        header.insert(
            name.to_string(),
            json!({"dtype": dt, "shape": shape, "data_offsets": [start, data.len()]}),
        );
    }
    let h = Value::Object(header).to_string();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(&data);
    std::fs::write(dir.join("model.safetensors"), out).unwrap();
}

impl Models {
    fn new() -> Models {
        let root = tempfile::tempdir().unwrap();
        let paths: Vec<PathBuf> = (0..3).map(|i| root.path().join(format!("m{i}"))).collect();
        for (i, p) in paths.iter().enumerate() {
            write_model(p, 7 + i as u64);
        }
        let models = paths.iter().map(|p| Model::open(p).unwrap()).collect();
        let out = root.path().join("out");
        Models {
            _root: root,
            paths,
            models,
            out,
            runs: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            executed: AtomicU64::new(0),
        }
    }
}

fn param_value(r: &mut Rng, p: &finrecipe_core::merge::plan::ParamSpec) -> Value {
    if r.chance(1, 60) {
        return random_value(r, 1);
    }
    if p.kind == finrecipe_core::merge::plan::ParamKind::Bool {
        return Value::Bool(r.chance(1, 2));
    }
    let x = match r.below(12) {
        0 => 0.0,
        1 => 1.0,
        2 => -1.0,
        3 if r.chance(1, 4) => 1e308,
        _ => r.below(1001) as f64 / 1000.0,
    };
    json!(x)
}

fn scale_ref(r: &mut Rng) -> Value {
    match r.below(10) {
        0 => random_value(r, 1),
        1 => json!({"tensor": "a", "block": [2, 2]}),
        2 => json!({"tensor": "q8_s", "block": [edgy_u64(r), edgy_u64(r)]}),
        3 => json!({"tensor": "q8_s", "block": [3, 1]}),
        _ => json!({"tensor": "q8_s", "block": [2, 2]}),
    }
}

fn gen_plan(r: &mut Rng, ms: &Models, out_dir: &Path) -> String {
    let mut tensors = Vec::new();
    for _ in 0..1 + r.below(3) {
        let spec = r.pick(KERNELS);
        let kernel = if r.chance(1, 30) {
            random_name(r)
        } else {
            spec.name.to_string()
        };
        let tname = |r: &mut Rng| -> String {
            match r.below(60) {
                0 => random_name(r),
                1..=6 => r.pick(TENSORS).0.to_string(),
                _ => r.pick(&["a", "b", "c", "e", "s", "q8", "q8"]).to_string(),
            }
        };
        let t0 = tname(r);
        let same = r.chance(19, 20);
        let model_ref = |r: &mut Rng| -> Value {
            if r.chance(1, 100) {
                json!(edgy_u64(r))
            } else {
                json!(r.below(3))
            }
        };
        let params = |r: &mut Rng, specs: &[finrecipe_core::merge::plan::ParamSpec]| {
            let mut m = serde_json::Map::new();
            for p in specs {
                if !r.chance(1, 100) {
                    m.insert(p.name.to_string(), param_value(r, p));
                }
            }
            if r.chance(1, 100) {
                m.insert(random_name(r), random_value(r, 1));
            }
            Value::Object(m)
        };
        let nsrc = match r.below(40) {
            0 => 0,
            1 => 4,
            _ => spec.min_sources + r.below(2) as usize,
        };
        let sources: Vec<Value> = (0..nsrc)
            .map(|_| {
                let t = if same { t0.clone() } else { tname(r) };
                let mut v = json!({"model": model_ref(r), "tensor": t, "params": params(r, spec.source_params)});
                if t == "q8" || r.chance(1, 50) {
                    v["scale"] = scale_ref(r);
                }
                v
            })
            .collect();
        let fp8_out = r.chance(1, 8);
        let mut t = json!({
            "name": if r.chance(1, 50) { "dup".to_string() } else { format!("o{}", r.next()) },
            "kernel": kernel,
            "out_dtype": if fp8_out { "F8_E4M3".to_string() } else if r.chance(1, 30) { r.pick(DTYPES).0.to_string() }
                         else { r.pick(&["F32", "BF16", "F16"]).to_string() },
            "sources": sources,
            "params": params(r, spec.tensor_params),
        });
        let want_base = match spec.base {
            finrecipe_core::merge::plan::BaseUse::Required => true,
            finrecipe_core::merge::plan::BaseUse::None => false,
            finrecipe_core::merge::plan::BaseUse::Optional => r.chance(1, 2),
        };
        if want_base != r.chance(1, 50) {
            t["base"] =
                json!({"model": model_ref(r), "tensor": if same { t0.clone() } else { tname(r) }});
        }
        tensors.push(t);
    }
    let mut plan = json!({
        "version": if r.chance(1, 60) { random_value(r, 1) } else { json!(2) },
        "models": ms.paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
        "out_dir": out_dir.display().to_string(),
        "out_shard_size": if r.chance(1, 30) { json!(edgy_u64(r)) } else { json!(1 + r.below(200)) },
        "threads": if r.chance(1, 60) { json!(edgy_u64(r)) } else { json!(r.below(3)) },
        "seed": edgy_u64(r),
        "chunk_elems": if r.chance(1, 30) { json!(edgy_u64(r)) } else { json!(1 + r.below(8)) },
        "metadata": if r.chance(1, 40) { random_value(r, 1) } else { json!({"format": "pt"}) },
        "tensors": tensors,
    });
    if r.chance(1, 30) {
        plan[random_name(r)] = random_value(r, 1);
    }
    let mut b = plan.to_string().into_bytes();
    if r.chance(1, 10) {
        mutate(r, &mut b);
    }
    String::from_utf8_lossy(&b).into_owned()
}

fn check_plan(r: &mut Rng, ms: &Models) {
    let n = ms.runs.fetch_add(1, Ordering::Relaxed);
    let out = ms.out.join(format!("{n}"));
    let text = gen_plan(r, ms, &out);
    let Ok(plan) = parse_plan(&text) else { return };
    let Ok(jobs) = build_jobs(&plan, &ms.models) else {
        return;
    };
    ms.accepted.fetch_add(1, Ordering::Relaxed);
    for j in &jobs {
        assert!(!j.sources.is_empty());
        assert_eq!(j.numel, j.shape.iter().product::<usize>());
    }
    // Execute a few of the accepted plans end to end: small thread counts only (the plan's own
    // thread count is bounded by the parser, but thousands of pools would only be slow).
    if plan.threads <= 2 && r.chance(1, 10) {
        std::fs::create_dir_all(&out).unwrap();
        let res = run_merge(&text, &Control::default());
        ms.executed.fetch_add(1, Ordering::Relaxed);
        if res.is_ok() {
            let m = Model::open(&out).expect("the core reads back what it wrote");
            assert_eq!(m.tensors.len(), jobs.len());
        }
        let _ = std::fs::remove_dir_all(&out);
    }
}

fn cases() -> u64 {
    std::env::var("FINRECIPE_FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(50_000)
}

#[test]
fn fuzz_readers_and_plan_parser() {
    let total = cases();
    let seed: u64 = std::env::var("FINRECIPE_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5EED_F1AC);
    let ms = Models::new();
    // Silence the default hook's output for caught panics; they are counted and reported below.
    let panics = AtomicU64::new(0);
    let first: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);
    let prev = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut counts = [0u64; 3];
    let t0 = std::time::Instant::now();
    for i in 0..total {
        let case_seed = seed ^ (i.wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1;
        let target = (i % 3) as usize;
        counts[target] += 1;
        let r = catch_unwind(AssertUnwindSafe(|| {
            let mut r = Rng(case_seed);
            match target {
                0 => check_header(&mut r),
                1 => check_index(&mut r),
                _ => check_plan(&mut r, &ms),
            }
        }));
        if let Err(p) = r {
            panics.fetch_add(1, Ordering::Relaxed);
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            first
                .lock()
                .unwrap()
                .get_or_insert(format!("case {i} (seed {case_seed}): {msg}"));
        }
    }
    std::panic::set_hook(prev);
    let n = panics.load(Ordering::Relaxed);
    println!(
        "fuzz: {total} inputs (headers {} ({} valid), indexes {} ({} valid), plans {} ({} valid, {} executed)) in {:.1}s, {n} panics",
        counts[0],
        HEADERS_OK.load(Ordering::Relaxed),
        counts[1],
        INDEXES_OK.load(Ordering::Relaxed),
        counts[2],
        ms.accepted.load(Ordering::Relaxed),
        ms.executed.load(Ordering::Relaxed),
        t0.elapsed().as_secs_f64()
    );
    assert_eq!(n, 0, "first panic: {:?}", first.lock().unwrap());
}
