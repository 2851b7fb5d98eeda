//! The merge plan (see docs/merge-plan.md): parsed strictly, then checked against the opened
//! models into executable [`Job`]s.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::dtype::is_float;
use crate::error::{Error, Result};
use crate::safetensors::read::Model;
use crate::safetensors::{parse_dtype, Dtype};

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
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourcePlan {
    pub model: usize,
    pub tensor: String,
    #[serde(default)]
    pub params: BTreeMap<String, serde_json::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorPlan {
    pub name: String,
    pub method: String,
    pub out_dtype: String,
    #[serde(default)]
    pub base: Option<Ref>,
    #[serde(default)]
    pub sources: Vec<SourcePlan>,
    #[serde(default)]
    pub params: BTreeMap<String, serde_json::Value>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
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
}

impl Method {
    fn parse(s: &str) -> Option<Method> {
        Some(match s {
            "linear" => Method::Linear,
            "task_arithmetic" => Method::TaskArithmetic,
            "ties" => Method::Ties,
            "dare_linear" => Method::DareLinear,
            "dare_ties" => Method::DareTies,
            "breadcrumbs" => Method::Breadcrumbs,
            "breadcrumbs_ties" => Method::BreadcrumbsTies,
            "slerp" => Method::Slerp,
            "model_stock" => Method::ModelStock,
            "passthrough" => Method::Passthrough,
            _ => return None,
        })
    }
    /// (source params, tensor params) the method reads; every one is required.
    fn params(self) -> (&'static [&'static str], &'static [&'static str]) {
        match self {
            Method::Linear => (&["weight"], &["normalize"]),
            Method::TaskArithmetic => (&["weight"], &["lambda", "normalize"]),
            Method::Ties => (&["weight", "density"], &["lambda", "normalize"]),
            Method::DareLinear | Method::DareTies => {
                (&["weight", "density"], &["lambda", "normalize", "rescale"])
            }
            Method::Breadcrumbs | Method::BreadcrumbsTies => {
                (&["weight", "density", "gamma"], &["lambda", "normalize"])
            }
            Method::Slerp => (&[], &["t"]),
            Method::ModelStock => (&[], &["filter_wise"]),
            Method::Passthrough => (&[], &[]),
        }
    }
    pub fn is_gta(self) -> bool {
        matches!(
            self,
            Method::TaskArithmetic
                | Method::Ties
                | Method::DareLinear
                | Method::DareTies
                | Method::Breadcrumbs
                | Method::BreadcrumbsTies
        )
    }
    pub fn consensus(self) -> bool {
        matches!(
            self,
            Method::Ties | Method::DareTies | Method::BreadcrumbsTies
        )
    }
}

pub const METHODS: &str = "linear, task_arithmetic, ties, dare_linear, dare_ties, breadcrumbs, \
     breadcrumbs_ties, slerp, model_stock, passthrough";

/// A tensor reference resolved to (model index, tensor index in that model).
#[derive(Debug, Clone, Copy)]
pub struct SrcRef {
    pub model: usize,
    pub tensor: usize,
}

/// One output tensor, ready to execute.
#[derive(Debug, Clone)]
pub struct Job {
    pub name: String,
    pub method: Method,
    pub out_dtype: Dtype,
    pub shape: Vec<usize>,
    pub numel: usize,
    pub base: Option<SrcRef>,
    pub sources: Vec<SrcRef>,
    pub weights: Vec<f32>,
    pub densities: Vec<f64>,
    pub gammas: Vec<f64>,
    pub lambda: f32,
    pub normalize: bool,
    pub rescale: bool,
    pub t: f64,
    pub filter_wise: bool,
    pub scale: Option<f32>,
    /// Passthrough with identical dtype and no scale: bytes are copied.
    pub copy: bool,
}

fn num(v: &serde_json::Value, what: &str) -> Result<f64> {
    match v {
        serde_json::Value::Number(n) => n
            .as_f64()
            .ok_or_else(|| Error::Config(format!("{what}: not a finite number"))),
        serde_json::Value::Bool(_) => Err(Error::Config(format!(
            "{what}: expected a number, got a boolean"
        ))),
        other => Err(Error::Config(format!(
            "{what}: expected a number, got {other}"
        ))),
    }
}

fn flag(v: &serde_json::Value, what: &str) -> Result<bool> {
    v.as_bool()
        .ok_or_else(|| Error::Config(format!("{what}: expected true or false, got {v}")))
}

fn check_keys(
    params: &BTreeMap<String, serde_json::Value>,
    allowed: &[&str],
    optional: &[&str],
    where_: &str,
    method: &str,
) -> Result<()> {
    for k in params.keys() {
        if !allowed.contains(&k.as_str()) && !optional.contains(&k.as_str()) {
            let mut all: Vec<&str> = allowed.to_vec();
            all.extend_from_slice(optional);
            return Err(Error::Config(format!(
                "{where_}: method '{method}' takes no parameter '{k}' (it takes: {})",
                if all.is_empty() {
                    "none".to_string()
                } else {
                    all.join(", ")
                }
            )));
        }
    }
    for k in allowed {
        if !params.contains_key(*k) {
            return Err(Error::Config(format!(
                "{where_}: parameter '{k}' is missing (the plan must give every parameter of '{method}')"
            )));
        }
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
    if plan.version != 1 {
        return Err(Error::Config(format!(
            "merge plan version {} is not supported (expected 1)",
            plan.version
        )));
    }
    if plan.chunk_elems == 0 {
        return Err(Error::Config(
            "merge plan: chunk_elems must be at least 1".into(),
        ));
    }
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
    })
}

/// Checks each tensor plan against the models and builds its job.
pub fn build_jobs(plan: &Plan, models: &[Model]) -> Result<Vec<Job>> {
    let mut seen = std::collections::HashSet::new();
    let mut jobs = Vec::with_capacity(plan.tensors.len());
    for (ti, tp) in plan.tensors.iter().enumerate() {
        let where_ = format!("plan tensors[{ti}] ('{}')", tp.name);
        if !seen.insert(tp.name.as_str()) {
            return Err(Error::Config(format!(
                "{where_}: output tensor name appears twice in the plan"
            )));
        }
        let method = Method::parse(&tp.method).ok_or_else(|| {
            Error::Config(format!(
                "{where_}: unknown method '{}' (known: {METHODS})",
                tp.method
            ))
        })?;
        let (sp, tpk) = method.params();
        let optional: &[&str] = if method == Method::Passthrough {
            &["scale"]
        } else {
            &[]
        };
        check_keys(&tp.params, tpk, optional, &where_, &tp.method)?;
        let out_dtype = parse_dtype(&tp.out_dtype).ok_or_else(|| {
            Error::Config(format!("{where_}: unknown out_dtype '{}'", tp.out_dtype))
        })?;
        let nsrc = tp.sources.len();
        let need = match method {
            Method::Slerp | Method::Passthrough => (1, 1),
            Method::ModelStock => (2, usize::MAX),
            _ => (1, usize::MAX),
        };
        if nsrc < need.0 || nsrc > need.1 {
            let want = if need.0 == need.1 {
                format!("exactly {}", need.0)
            } else {
                format!("at least {}", need.0)
            };
            return Err(Error::Config(format!(
                "{where_}: method '{}' needs {want} source(s), got {nsrc}",
                tp.method
            )));
        }
        let base_needed = !matches!(method, Method::Linear | Method::Passthrough);
        if base_needed && tp.base.is_none() {
            return Err(Error::Config(format!(
                "{where_}: method '{}' needs a base",
                tp.method
            )));
        }
        if method == Method::Passthrough && tp.base.is_some() {
            return Err(Error::Config(format!(
                "{where_}: passthrough takes no base"
            )));
        }
        let base = match (&tp.base, method) {
            (Some(b), m) if m != Method::Linear => Some(resolve(
                models,
                (b.model, &b.tensor),
                &format!("{where_} base"),
            )?),
            _ => None,
        };
        let mut sources = Vec::with_capacity(nsrc);
        let mut weights = Vec::new();
        let mut densities = Vec::new();
        let mut gammas = Vec::new();
        for (si, s) in tp.sources.iter().enumerate() {
            let sw = format!("{where_} sources[{si}]");
            check_keys(&s.params, sp, &[], &sw, &tp.method)?;
            sources.push(resolve(models, (s.model, &s.tensor), &sw)?);
            if let Some(v) = s.params.get("weight") {
                weights.push(num(v, &format!("{sw} weight"))? as f32);
            }
            if let Some(v) = s.params.get("density") {
                let d = num(v, &format!("{sw} density"))?;
                if !(0.0..=1.0).contains(&d) {
                    return Err(Error::Config(format!(
                        "{sw} density: {d} is outside [0, 1]"
                    )));
                }
                densities.push(d);
            }
            if let Some(v) = s.params.get("gamma") {
                let g = num(v, &format!("{sw} gamma"))?;
                if !(0.0..=1.0).contains(&g) {
                    return Err(Error::Config(format!("{sw} gamma: {g} is outside [0, 1]")));
                }
                gammas.push(g);
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
        let p = |k: &str| tp.params.get(k);
        let scale = match p("scale") {
            Some(v) => Some(num(v, &format!("{where_} scale"))? as f32),
            None => None,
        };
        let copy = method == Method::Passthrough && scale.is_none() && first.dtype == out_dtype;
        if !copy {
            for (role, r) in &all {
                let info = &models[r.model].tensors[r.tensor];
                if !is_float(info.dtype) {
                    return Err(Error::Mismatch(format!(
                        "{where_}: {role} tensor '{}' of {} is {}; arithmetic needs BF16, F16 or F32 \
                         (only passthrough without scale copies other dtypes)",
                        info.name,
                        models[r.model].path.display(),
                        info.dtype
                    )));
                }
            }
            if !is_float(out_dtype) {
                return Err(Error::Config(format!(
                    "{where_}: out_dtype {out_dtype} is not BF16, F16 or F32 (needed unless passthrough copies bytes)"
                )));
            }
        }
        let lambda = match p("lambda") {
            Some(v) => num(v, &format!("{where_} lambda"))? as f32,
            None => 1.0,
        };
        let normalize = match p("normalize") {
            Some(v) => flag(v, &format!("{where_} normalize"))?,
            None => false,
        };
        let rescale = match p("rescale") {
            Some(v) => flag(v, &format!("{where_} rescale"))?,
            None => false,
        };
        let filter_wise = match p("filter_wise") {
            Some(v) => flag(v, &format!("{where_} filter_wise"))?,
            None => false,
        };
        let t = match p("t") {
            Some(v) => num(v, &format!("{where_} t"))?,
            None => 0.0,
        };
        jobs.push(Job {
            name: tp.name.clone(),
            method,
            out_dtype,
            shape: first.shape.clone(),
            numel: first.numel(),
            base,
            sources,
            weights,
            densities,
            gammas,
            lambda,
            normalize,
            rescale,
            t,
            filter_wise,
            scale,
            copy,
        });
    }
    Ok(jobs)
}
