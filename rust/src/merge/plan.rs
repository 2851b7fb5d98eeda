//! The merge plan (see docs/merge-plan.md): parsed strictly, then checked against the opened
//! models into executable [`Job`]s.
//!
//! [`KERNELS`] is the one table of what the core can execute: each kernel's name, whether it takes
//! a base, how many sources, and the parameters it reads per source and per tensor (kind and
//! accepted range). Plans are validated against it, and `finrecipe._core.kernels()` exports it so
//! that the Python method table (`finrecipe.merge.methods`) can check at import that every merge
//! method it offers is executed by a kernel with exactly the parameters it resolves.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::dtype::is_float;
use crate::error::{Error, Result};
use crate::safetensors::read::Model;
use crate::safetensors::{parse_dtype, Dtype};

/// The plan format version this core executes.
pub const PLAN_VERSION: u32 = 2;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    pub version: u32,
    pub models: Vec<String>,
    pub out_dir: String,
    pub out_shard_size: u64,
    #[serde(default)]
    pub threads: usize,
    #[serde(default)]
    pub seed: u64,
    pub chunk_elems: usize,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    pub tensors: Vec<TensorPlan>,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct Ref {
    pub model: usize,
    pub tensor: String,
    /// For an F8_E4M3 tensor: its block scales (dequantised on load).
    #[serde(default)]
    pub scale: Option<ScalePlan>,
}

/// Block scales of an FP8 tensor: `tensor` (same model) holds one multiplier per block of
/// `block` = [rows, cols] elements: value = fp8 × scale[i / rows][j / cols].
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct ScalePlan {
    pub tensor: String,
    pub block: [usize; 2],
}

/// FP8 output: the tensor is requantised per block (scale = block amax / 448) and the scales
/// are written as tensor `name` of `dtype`.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct OutScalePlan {
    pub name: String,
    pub block: [usize; 2],
    pub dtype: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourcePlan {
    pub model: usize,
    pub tensor: String,
    #[serde(default)]
    pub scale: Option<ScalePlan>,
    #[serde(default)]
    pub params: BTreeMap<String, serde_json::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorPlan {
    pub name: String,
    pub kernel: String,
    pub out_dtype: String,
    #[serde(default)]
    pub base: Option<Ref>,
    #[serde(default)]
    pub sources: Vec<SourcePlan>,
    #[serde(default)]
    pub params: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    pub out_scale: Option<OutScalePlan>,
    /// "BF16": compute as mergekit does with `dtype: bfloat16` (task-arithmetic kernels only, see
    /// merge/bf16.rs); "F32" or absent: exact float32.
    #[serde(default)]
    pub compute_dtype: Option<String>,
}

/// The arithmetic a job runs (one arm of `kernels::compute`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    Linear,
    TaskArithmetic,
    Ties,
    DareLinear,
    DareTies,
    Breadcrumbs,
    BreadcrumbsTies,
    Slerp,
    ModelStock,
    Passthrough,
    // mergekit 0.1.5's newer methods (merge/methods_mk.rs)
    Nearswap,
    Ram,
    RamplusTl,
    Karcher,
    Della,
    DellaLinear,
    Sce,
    // spherical interpolations and arcee_fusion (merge/methods_sph.rs)
    Nuslerp,
    Multislerp,
    ArceeFusion,
}

impl Kernel {
    pub fn spec(self) -> &'static KernelSpec {
        KERNELS
            .iter()
            .find(|k| k.kernel == self)
            .expect("every kernel has a spec")
    }
    pub fn name(self) -> &'static str {
        self.spec().name
    }
    pub fn parse(s: &str) -> Option<Kernel> {
        KERNELS.iter().find(|k| k.name == s).map(|k| k.kernel)
    }
    pub fn is_gta(self) -> bool {
        matches!(
            self,
            Kernel::TaskArithmetic
                | Kernel::Ties
                | Kernel::DareLinear
                | Kernel::DareTies
                | Kernel::Breadcrumbs
                | Kernel::BreadcrumbsTies
                | Kernel::Della
                | Kernel::DellaLinear
        )
    }
    pub fn consensus(self) -> bool {
        matches!(
            self,
            Kernel::Ties | Kernel::DareTies | Kernel::BreadcrumbsTies | Kernel::Della
        )
    }
}

/// What a parameter value must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKind {
    /// A finite JSON number, within [min, max] when given.
    Number,
    /// A JSON boolean.
    Bool,
}

#[derive(Debug, Clone, Copy)]
pub struct ParamSpec {
    pub name: &'static str,
    pub kind: ParamKind,
    /// Inclusive bounds for numbers.
    pub min: Option<f64>,
    pub max: Option<f64>,
}

const fn num(name: &'static str) -> ParamSpec {
    ParamSpec {
        name,
        kind: ParamKind::Number,
        min: None,
        max: None,
    }
}

const fn unit(name: &'static str) -> ParamSpec {
    ParamSpec {
        name,
        kind: ParamKind::Number,
        min: Some(0.0),
        max: Some(1.0),
    }
}

const fn flag(name: &'static str) -> ParamSpec {
    ParamSpec {
        name,
        kind: ParamKind::Bool,
        min: None,
        max: None,
    }
}

/// A kernel's base model: required, optional (used when the plan gives one) or not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BaseUse {
    Required,
    Optional,
    None,
}

/// One kernel: its plan name, inputs and parameters (every listed parameter is required).
#[derive(Debug)]
pub struct KernelSpec {
    pub kernel: Kernel,
    pub name: &'static str,
    /// Whether the plan must, may or must not give a base.
    pub base: BaseUse,
    pub min_sources: usize,
    pub max_sources: Option<usize>,
    pub source_params: &'static [ParamSpec],
    pub tensor_params: &'static [ParamSpec],
}

const WEIGHT: ParamSpec = num("weight");
const DENSITY: ParamSpec = unit("density");
const GAMMA: ParamSpec = unit("gamma");
const LAMBDA: ParamSpec = num("lambda");
const NORMALIZE: ParamSpec = flag("normalize");
const RESCALE: ParamSpec = flag("rescale");

const fn gta(
    kernel: Kernel,
    name: &'static str,
    source_params: &'static [ParamSpec],
    tensor_params: &'static [ParamSpec],
) -> KernelSpec {
    KernelSpec {
        kernel,
        name,
        base: BaseUse::Required,
        min_sources: 1,
        max_sources: None,
        source_params,
        tensor_params,
    }
}

/// Every kernel the core implements.
pub static KERNELS: &[KernelSpec] = &[
    KernelSpec {
        kernel: Kernel::Linear,
        name: "linear",
        base: BaseUse::None,
        min_sources: 1,
        max_sources: None,
        source_params: &[WEIGHT],
        tensor_params: &[NORMALIZE],
    },
    gta(
        Kernel::TaskArithmetic,
        "task_arithmetic",
        &[WEIGHT],
        &[LAMBDA, NORMALIZE],
    ),
    gta(
        Kernel::Ties,
        "ties",
        &[WEIGHT, DENSITY],
        &[LAMBDA, NORMALIZE, RESCALE],
    ),
    gta(
        Kernel::DareLinear,
        "dare_linear",
        &[WEIGHT, DENSITY],
        &[LAMBDA, NORMALIZE, RESCALE],
    ),
    gta(
        Kernel::DareTies,
        "dare_ties",
        &[WEIGHT, DENSITY],
        &[LAMBDA, NORMALIZE, RESCALE],
    ),
    gta(
        Kernel::Breadcrumbs,
        "breadcrumbs",
        &[WEIGHT, DENSITY, GAMMA],
        &[LAMBDA, NORMALIZE, RESCALE],
    ),
    gta(
        Kernel::BreadcrumbsTies,
        "breadcrumbs_ties",
        &[WEIGHT, DENSITY, GAMMA],
        &[LAMBDA, NORMALIZE, RESCALE],
    ),
    KernelSpec {
        kernel: Kernel::Slerp,
        name: "slerp",
        base: BaseUse::Required,
        min_sources: 1,
        max_sources: Some(1),
        source_params: &[],
        tensor_params: &[unit("t")],
    },
    KernelSpec {
        kernel: Kernel::ModelStock,
        name: "model_stock",
        base: BaseUse::Required,
        min_sources: 2,
        max_sources: None,
        source_params: &[],
        tensor_params: &[flag("filter_wise")],
    },
    KernelSpec {
        kernel: Kernel::Passthrough,
        name: "passthrough",
        base: BaseUse::None,
        min_sources: 1,
        max_sources: Some(1),
        source_params: &[num("scale")],
        tensor_params: &[],
    },
    KernelSpec {
        kernel: Kernel::Nearswap,
        name: "nearswap",
        base: BaseUse::Required,
        min_sources: 1,
        max_sources: Some(1),
        source_params: &[],
        tensor_params: &[num("t")],
    },
    KernelSpec {
        kernel: Kernel::Ram,
        name: "ram",
        base: BaseUse::Required,
        min_sources: 1,
        max_sources: None,
        source_params: &[],
        tensor_params: &[num("epsilon")],
    },
    KernelSpec {
        kernel: Kernel::RamplusTl,
        name: "ramplus_tl",
        base: BaseUse::Required,
        min_sources: 1,
        max_sources: None,
        source_params: &[],
        tensor_params: &[num("r"), num("alpha"), num("epsilon")],
    },
    gta(
        Kernel::Della,
        "della",
        &[WEIGHT, DENSITY, unit("epsilon")],
        &[LAMBDA, NORMALIZE, RESCALE],
    ),
    gta(
        Kernel::DellaLinear,
        "della_linear",
        &[WEIGHT, DENSITY, unit("epsilon")],
        &[LAMBDA, NORMALIZE, RESCALE],
    ),
    KernelSpec {
        kernel: Kernel::Sce,
        name: "sce",
        base: BaseUse::Required,
        min_sources: 1,
        max_sources: None,
        source_params: &[],
        tensor_params: &[unit("select_topk")],
    },
    KernelSpec {
        kernel: Kernel::Nuslerp,
        name: "nuslerp",
        base: BaseUse::Optional,
        min_sources: 2,
        max_sources: Some(2),
        source_params: &[WEIGHT],
        tensor_params: &[flag("nuslerp_row_wise"), flag("nuslerp_flatten")],
    },
    KernelSpec {
        kernel: Kernel::Multislerp,
        name: "multislerp",
        base: BaseUse::Optional,
        min_sources: 1,
        max_sources: None,
        source_params: &[WEIGHT],
        tensor_params: &[
            flag("normalize_weights"),
            ParamSpec {
                name: "eps",
                kind: ParamKind::Number,
                min: Some(0.0),
                max: None,
            },
        ],
    },
    KernelSpec {
        kernel: Kernel::ArceeFusion,
        name: "arcee_fusion",
        base: BaseUse::Required,
        min_sources: 1,
        max_sources: Some(1),
        source_params: &[],
        tensor_params: &[],
    },
    KernelSpec {
        kernel: Kernel::Karcher,
        name: "karcher",
        base: BaseUse::None,
        min_sources: 1,
        max_sources: None,
        source_params: &[],
        tensor_params: &[
            ParamSpec {
                name: "max_iter",
                kind: ParamKind::Number,
                min: Some(0.0),
                // bounded: an iteration count from a shared config must not run forever
                max: Some(10_000.0),
            },
            num("tol"),
        ],
    },
];

/// The kernel table as JSON (what `finrecipe._core.kernels()` returns).
pub fn kernels_json() -> serde_json::Value {
    use serde_json::json;
    let params = |ps: &[ParamSpec]| -> Vec<serde_json::Value> {
        ps.iter()
            .map(|p| {
                json!({
                    "name": p.name,
                    "kind": match p.kind { ParamKind::Number => "number", ParamKind::Bool => "bool" },
                    "min": p.min,
                    "max": p.max,
                })
            })
            .collect()
    };
    serde_json::Value::Array(
        KERNELS
            .iter()
            .map(|k| {
                json!({
                    "name": k.name,
                    "base": match k.base {
                        BaseUse::Required => "required",
                        BaseUse::Optional => "optional",
                        BaseUse::None => "none",
                    },
                    "min_sources": k.min_sources,
                    "max_sources": k.max_sources,
                    "source_params": params(k.source_params),
                    "tensor_params": params(k.tensor_params),
                })
            })
            .collect(),
    )
}

fn known_kernels() -> String {
    KERNELS
        .iter()
        .map(|k| k.name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// A tensor reference resolved to (model index, tensor index in that model).
#[derive(Debug, Clone, Copy)]
pub struct SrcRef {
    pub model: usize,
    pub tensor: usize,
    /// Block scales of an FP8 tensor (same model).
    pub scale: Option<BlockScale>,
}

/// Where the block scales of an FP8 input tensor are.
#[derive(Debug, Clone, Copy)]
pub struct BlockScale {
    /// Index of the scale tensor in the model.
    pub tensor: usize,
    pub rows: usize,
    pub cols: usize,
}

/// FP8 output of a job: block size, the weight's column count, and the scales' dtype.
#[derive(Debug, Clone, Copy)]
pub struct OutBlock {
    pub rows: usize,
    pub cols: usize,
    pub ncols: usize,
    pub scale_dtype: Dtype,
}

/// One output tensor, ready to execute.
#[derive(Debug, Clone)]
pub struct Job {
    pub name: String,
    pub kernel: Kernel,
    pub out_dtype: Dtype,
    pub shape: Vec<usize>,
    pub numel: usize,
    pub base: Option<SrcRef>,
    pub sources: Vec<SrcRef>,
    pub weights: Vec<f32>,
    pub densities: Vec<f64>,
    pub gammas: Vec<f64>,
    /// Per source DELLA ε (della, della_linear).
    pub epsilons: Vec<f64>,
    pub lambda: f32,
    pub normalize: bool,
    pub rescale: bool,
    pub t: f64,
    pub filter_wise: bool,
    pub scale: f32,
    /// Round every intermediate to bf16 as mergekit's bf16 torch ops do (task-arithmetic kernels).
    pub bf16_compute: bool,
    /// The tensor parameters as numbers (booleans 0/1), for kernels without fields of their own.
    pub nums: BTreeMap<String, f64>,
    /// Passthrough with identical dtype and scale 1: bytes are copied.
    pub copy: bool,
    /// Bytes of the (first) source tensor: the work units of a copy.
    pub nbytes: usize,
    /// FP8 output: requantised per block, scales written to `scale_slot`.
    pub out_block: Option<OutBlock>,
    /// Index of the output tensor (and of its scales) in the output layout.
    pub out_slot: usize,
    pub scale_slot: usize,
    /// Name of the output scale tensor (FP8 output only).
    pub scale_name: String,
}

impl Job {
    /// What chunks count: bytes for a byte copy (any dtype, sub-byte ones included), else
    /// elements.
    pub fn units(&self) -> usize {
        if self.copy {
            self.nbytes
        } else {
            self.numel
        }
    }
}

/// Checks that `params` holds exactly the parameters of `specs`, each of the right kind and range.
fn check_params(
    params: &BTreeMap<String, serde_json::Value>,
    specs: &[ParamSpec],
    where_: &str,
    kernel: &str,
) -> Result<()> {
    for k in params.keys() {
        if !specs.iter().any(|p| p.name == k) {
            let all: Vec<&str> = specs.iter().map(|p| p.name).collect();
            return Err(Error::Config(format!(
                "{where_}: kernel '{kernel}' takes no parameter '{k}' here (it takes: {})",
                if all.is_empty() {
                    "none".to_string()
                } else {
                    all.join(", ")
                }
            )));
        }
    }
    for p in specs {
        let what = format!("{where_} {}", p.name);
        let v = params.get(p.name).ok_or_else(|| {
            Error::Config(format!(
                "{where_}: parameter '{}' is missing (the plan must give every parameter of '{kernel}')",
                p.name
            ))
        })?;
        match p.kind {
            ParamKind::Bool => {
                if !v.is_boolean() {
                    return Err(Error::Config(format!(
                        "{what}: expected true or false, got {v}"
                    )));
                }
            }
            ParamKind::Number => {
                let x = match v {
                    serde_json::Value::Number(n) => n.as_f64().filter(|x| x.is_finite()),
                    _ => None,
                }
                .ok_or_else(|| {
                    Error::Config(format!("{what}: expected a finite number, got {v}"))
                })?;
                if p.min.is_some_and(|lo| x < lo) || p.max.is_some_and(|hi| x > hi) {
                    return Err(Error::Config(format!(
                        "{what}: {x} is outside [{}, {}]",
                        p.min.map_or("-inf".to_string(), |v| v.to_string()),
                        p.max.map_or("inf".to_string(), |v| v.to_string())
                    )));
                }
            }
        }
    }
    Ok(())
}

/// The output tensors of the jobs, in slot order (an FP8 job's scales follow its weight).
pub fn out_tensors(jobs: &[Job]) -> Vec<crate::safetensors::write::OutTensor> {
    use crate::safetensors::write::OutTensor;
    let mut out = Vec::with_capacity(jobs.len());
    for j in jobs {
        out.push(OutTensor {
            name: j.name.clone(),
            dtype: j.out_dtype,
            shape: j.shape.clone(),
        });
        if let Some(b) = j.out_block {
            out.push(OutTensor {
                name: j.scale_name.clone(),
                dtype: b.scale_dtype,
                shape: vec![j.shape[0].div_ceil(b.rows), j.shape[1].div_ceil(b.cols)],
            });
        }
    }
    out
}

/// A validated number parameter (None when the kernel does not take it).
fn pnum(params: &BTreeMap<String, serde_json::Value>, k: &str) -> Option<f64> {
    params.get(k).and_then(|v| v.as_f64())
}

fn pflag(params: &BTreeMap<String, serde_json::Value>, k: &str) -> Option<bool> {
    params.get(k).and_then(|v| v.as_bool())
}

/// The most worker threads a plan may ask for (Python caps requests at the number of cores
/// unless forced; this bounds what a hand-written plan can make the core create).
pub const MAX_THREADS: usize = 1024;

pub fn check_threads(threads: usize, what: &str) -> Result<()> {
    if threads > MAX_THREADS {
        return Err(Error::Config(format!(
            "{what}: threads {threads} is more than the limit of {MAX_THREADS}"
        )));
    }
    Ok(())
}

/// Parses plan JSON strictly.
pub fn parse_plan(json: &str) -> Result<Plan> {
    let plan: Plan = serde_json::from_str(json).map_err(|e| {
        Error::Config(format!(
            "invalid merge plan (line {}, column {}): {e}",
            e.line(),
            e.column()
        ))
    })?;
    if plan.version != PLAN_VERSION {
        return Err(Error::Config(format!(
            "merge plan version {} is not supported (expected {PLAN_VERSION})",
            plan.version
        )));
    }
    if plan.chunk_elems == 0 {
        return Err(Error::Config(
            "merge plan: chunk_elems must be at least 1".into(),
        ));
    }
    check_threads(plan.threads, "merge plan")?;
    if plan.out_shard_size == 0 {
        return Err(Error::Config(
            "merge plan: out_shard_size must be at least 1 byte".into(),
        ));
    }
    Ok(plan)
}

fn resolve(models: &[Model], r: (usize, &str), where_: &str) -> Result<SrcRef> {
    let (m, t) = r;
    let model = models.get(m).ok_or_else(|| {
        Error::Config(format!(
            "{where_}: model index {m} is out of range (the plan lists {} models)",
            models.len()
        ))
    })?;
    let ti = model.index_of(t).ok_or_else(|| {
        Error::Mismatch(format!(
            "{where_}: model {} has no tensor '{t}'",
            model.path.display()
        ))
    })?;
    Ok(SrcRef {
        model: m,
        tensor: ti,
        scale: None,
    })
}

const MAX_BLOCK: usize = 1 << 16;

fn check_block(block: [usize; 2], what: &str) -> Result<()> {
    if block.iter().any(|&b| b == 0 || b > MAX_BLOCK) {
        return Err(Error::Config(format!(
            "{what}: block {block:?} must be two sizes in 1..={MAX_BLOCK}"
        )));
    }
    Ok(())
}

/// Attaches the block scales of an FP8 input and checks them (dtype, shape, block).
pub(crate) fn attach_scale(
    models: &[Model],
    r: &mut SrcRef,
    sp: &Option<ScalePlan>,
    where_: &str,
) -> Result<()> {
    let Some(sp) = sp else { return Ok(()) };
    let model = &models[r.model];
    let w = &model.tensors[r.tensor];
    check_block(sp.block, &format!("{where_} scale"))?;
    if w.dtype != Dtype::F8_E4M3 || w.shape.len() != 2 {
        return Err(Error::Mismatch(format!(
            "{where_}: block scales are for 2-D F8_E4M3 tensors, but '{}' of {} is {} {:?}",
            w.name,
            model.path.display(),
            w.dtype,
            w.shape
        )));
    }
    let si = model.index_of(&sp.tensor).ok_or_else(|| {
        Error::Mismatch(format!(
            "{where_}: model {} has no scale tensor '{}' for FP8 tensor '{}'",
            model.path.display(),
            sp.tensor,
            w.name
        ))
    })?;
    let st = &model.tensors[si];
    let want = vec![
        w.shape[0].div_ceil(sp.block[0]),
        w.shape[1].div_ceil(sp.block[1]),
    ];
    if !is_float(st.dtype) || st.shape != want {
        return Err(Error::Mismatch(format!(
            "{where_}: scale tensor '{}' of {} is {} {:?}; FP8 tensor '{}' {:?} with blocks {:?} needs \
             BF16, F16 or F32 {:?}",
            st.name,
            model.path.display(),
            st.dtype,
            st.shape,
            w.name,
            w.shape,
            sp.block,
            want
        )));
    }
    r.scale = Some(BlockScale {
        tensor: si,
        rows: sp.block[0],
        cols: sp.block[1],
    });
    Ok(())
}

/// Checks each tensor plan against the kernel table and the models, and builds its job.
pub fn build_jobs(plan: &Plan, models: &[Model]) -> Result<Vec<Job>> {
    let mut seen = std::collections::HashSet::new();
    let mut jobs = Vec::with_capacity(plan.tensors.len());
    let mut slots = 0usize;
    for (ti, tp) in plan.tensors.iter().enumerate() {
        let where_ = format!("plan tensors[{ti}] ('{}')", tp.name);
        if !seen.insert(tp.name.as_str()) {
            return Err(Error::Config(format!(
                "{where_}: output tensor name appears twice in the plan"
            )));
        }
        let kernel = Kernel::parse(&tp.kernel).ok_or_else(|| {
            Error::Config(format!(
                "{where_}: unknown kernel '{}' (known: {})",
                tp.kernel,
                known_kernels()
            ))
        })?;
        let spec = kernel.spec();
        check_params(&tp.params, spec.tensor_params, &where_, spec.name)?;
        let out_dtype = parse_dtype(&tp.out_dtype).ok_or_else(|| {
            Error::Config(format!("{where_}: unknown out_dtype '{}'", tp.out_dtype))
        })?;
        let bf16_compute = match tp.compute_dtype.as_deref() {
            None | Some("F32") => false,
            Some("BF16")
                if kernel.is_gta()
                    || super::methods_mk::bf16_ok(kernel)
                    || kernel == Kernel::ModelStock =>
            {
                true
            }
            Some(other) => {
                return Err(Error::Config(format!(
                    "{where_}: compute_dtype '{other}' is not supported by kernel '{}' (F32, or \
                     BF16 for the kernels that follow mergekit's bf16 arithmetic)",
                    spec.name
                )))
            }
        };
        let nsrc = tp.sources.len();
        if nsrc < spec.min_sources || spec.max_sources.is_some_and(|mx| nsrc > mx) {
            let want = match spec.max_sources {
                Some(mx) if mx == spec.min_sources => format!("exactly {mx}"),
                Some(mx) => format!("{} to {mx}", spec.min_sources),
                None => format!("at least {}", spec.min_sources),
            };
            return Err(Error::Config(format!(
                "{where_}: kernel '{}' needs {want} source(s), got {nsrc}",
                spec.name
            )));
        }
        let base = match (&tp.base, spec.base) {
            (Some(b), BaseUse::Required | BaseUse::Optional) => {
                let bw = format!("{where_} base");
                let mut r = resolve(models, (b.model, &b.tensor), &bw)?;
                attach_scale(models, &mut r, &b.scale, &bw)?;
                Some(r)
            }
            (None, BaseUse::Required) => {
                return Err(Error::Config(format!(
                    "{where_}: kernel '{}' needs a base",
                    spec.name
                )))
            }
            (Some(_), BaseUse::None) => {
                return Err(Error::Config(format!(
                    "{where_}: kernel '{}' takes no base",
                    spec.name
                )))
            }
            (None, BaseUse::None | BaseUse::Optional) => None,
        };
        let mut sources = Vec::with_capacity(nsrc);
        let mut weights = Vec::new();
        let mut densities = Vec::new();
        let mut gammas = Vec::new();
        let mut epsilons = Vec::new();
        let mut scale = 1.0f32;
        for (si, s) in tp.sources.iter().enumerate() {
            let sw = format!("{where_} sources[{si}]");
            check_params(&s.params, spec.source_params, &sw, spec.name)?;
            let mut r = resolve(models, (s.model, &s.tensor), &sw)?;
            attach_scale(models, &mut r, &s.scale, &sw)?;
            sources.push(r);
            if let Some(w) = pnum(&s.params, "weight") {
                weights.push(w as f32);
            }
            if let Some(d) = pnum(&s.params, "density") {
                densities.push(d);
            }
            if let Some(g) = pnum(&s.params, "gamma") {
                gammas.push(g);
            }
            if let Some(e) = pnum(&s.params, "epsilon") {
                epsilons.push(e);
            }
            if let Some(k) = pnum(&s.params, "scale") {
                scale = k as f32;
            }
        }
        // Shapes and dtypes.
        let first = &models[sources[0].model].tensors[sources[0].tensor];
        let all: Vec<(&str, SrcRef)> = base
            .iter()
            .map(|b| ("base", *b))
            .chain(sources.iter().map(|s| ("source", *s)))
            .collect();
        for (role, r) in &all {
            let info = &models[r.model].tensors[r.tensor];
            if info.shape != first.shape {
                return Err(Error::Mismatch(format!(
                    "{where_}: {role} tensor '{}' of {} has shape {:?}, but '{}' of {} has shape {:?}",
                    info.name,
                    models[r.model].path.display(),
                    info.shape,
                    first.name,
                    models[sources[0].model].path.display(),
                    first.shape
                )));
            }
        }
        let copy = kernel == Kernel::Passthrough
            && scale == 1.0
            && first.dtype == out_dtype
            && sources[0].scale.is_none()
            && tp.out_scale.is_none();
        if !copy {
            for (role, r) in &all {
                let info = &models[r.model].tensors[r.tensor];
                if !is_float(info.dtype) && r.scale.is_none() {
                    return Err(Error::Mismatch(format!(
                        "{where_}: {role} tensor '{}' of {} is {}; arithmetic needs BF16, F16 or F32 \
                         (only passthrough with scale 1 to the same dtype copies other dtypes)",
                        info.name,
                        models[r.model].path.display(),
                        info.dtype
                    )));
                }
            }
            let fp8_out = out_dtype == Dtype::F8_E4M3 && tp.out_scale.is_some();
            if !(is_float(out_dtype) || fp8_out) {
                return Err(Error::Config(format!(
                    "{where_}: out_dtype {out_dtype} is not BF16, F16 or F32, nor F8_E4M3 with \
                     out_scale (needed unless passthrough copies bytes)"
                )));
            }
        }
        let out_block = match &tp.out_scale {
            None => None,
            Some(os) => {
                check_block(os.block, &format!("{where_} out_scale"))?;
                let scale_dtype =
                    parse_dtype(&os.dtype)
                        .filter(|d| is_float(*d))
                        .ok_or_else(|| {
                            Error::Config(format!(
                                "{where_}: out_scale dtype '{}' is not BF16, F16 or F32",
                                os.dtype
                            ))
                        })?;
                if out_dtype != Dtype::F8_E4M3 || first.shape.len() != 2 || copy {
                    return Err(Error::Config(format!(
                        "{where_}: out_scale needs out_dtype F8_E4M3 and a 2-D tensor (got {out_dtype} {:?})",
                        first.shape
                    )));
                }
                if os.name.is_empty() || !seen.insert(os.name.as_str()) {
                    return Err(Error::Config(format!(
                        "{where_}: out_scale name '{}' is empty or names another output tensor",
                        os.name
                    )));
                }
                Some(OutBlock {
                    rows: os.block[0],
                    cols: os.block[1],
                    ncols: first.shape[1],
                    scale_dtype,
                })
            }
        };
        let out_slot = slots;
        slots += 1;
        let scale_slot = if out_block.is_some() {
            slots += 1;
            slots - 1
        } else {
            out_slot
        };
        let normalize = pflag(&tp.params, "normalize").unwrap_or(false);
        if kernel == Kernel::Linear && normalize {
            let div: f32 = weights.iter().sum();
            if div.abs() < 1e-8 {
                return Err(Error::Config(format!(
                    "{where_}: the weights of 'linear' sum to {div} and normalize is on, so every \
                     element would be divided by zero; give weights with a non-zero sum or set \
                     normalize: false"
                )));
            }
        }
        jobs.push(Job {
            name: tp.name.clone(),
            kernel,
            out_dtype,
            shape: first.shape.clone(),
            numel: first.numel(),
            base,
            sources,
            weights,
            densities,
            gammas,
            epsilons,
            lambda: pnum(&tp.params, "lambda").unwrap_or(1.0) as f32,
            normalize,
            rescale: pflag(&tp.params, "rescale").unwrap_or(false),
            t: pnum(&tp.params, "t").unwrap_or(0.0),
            filter_wise: pflag(&tp.params, "filter_wise").unwrap_or(false),
            scale,
            bf16_compute,
            nums: tp
                .params
                .iter()
                .filter_map(|(k, v)| {
                    v.as_f64()
                        .or_else(|| v.as_bool().map(|b| f64::from(u8::from(b))))
                        .map(|x| (k.clone(), x))
                })
                .collect(),
            copy,
            nbytes: first.nbytes(),
            out_block,
            out_slot,
            scale_slot,
            scale_name: tp
                .out_scale
                .as_ref()
                .map(|o| o.name.clone())
                .unwrap_or_default(),
        });
    }
    Ok(jobs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_table_is_consistent() {
        let mut names = std::collections::HashSet::new();
        for k in KERNELS {
            assert!(names.insert(k.name), "duplicate kernel {}", k.name);
            assert_eq!(Kernel::parse(k.name), Some(k.kernel));
            assert_eq!(k.kernel.name(), k.name);
            assert!(k.max_sources.is_none_or(|m| m >= k.min_sources));
            for p in k.source_params.iter().chain(k.tensor_params) {
                if p.kind == ParamKind::Bool {
                    assert!(p.min.is_none() && p.max.is_none());
                }
            }
        }
        let j = kernels_json();
        assert_eq!(j.as_array().unwrap().len(), KERNELS.len());
        assert_eq!(j[2]["name"], "ties");
        assert_eq!(j[2]["source_params"][1]["max"], 1.0);
    }
}
