"""From a validated `MergeConfig` and the input models' headers to the plan of docs/merge-plan.md.

Everything is resolved here, per output tensor, with mergekit's semantics: parameter precedence
(model > slice > global), gradients over layer index (t = idx/(L-1) within a slice; embeddings,
final norm and lm_head take t = 0), `filter` rules (first substring match), slices with
`layer_range` renumbering output layers, per-method defaults and the output dtype. All checks
against the headers (missing tensors, shapes, vocabulary sizes, dtypes) happen here, before any
tensor data is read. The order of output tensors is the reference model's (shard, then offset).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finrecipe.errors import ConfigError, MismatchError
from finrecipe.merge.config import DTYPES, FP8_DTYPES, FilterRule, MergeConfig, Params, ParamSetting
from finrecipe.merge.headers import ModelInfo, TensorInfo, read_model
from finrecipe.merge.methods import ParamDef
from finrecipe.merge.quant import (
    FP8,
    Fp8Layout,
    check_not_quantized,
    fp8_layout,
    is_scale_tensor,
    nbytes,
    scale_of,
    why_not_combinable,
)
from finrecipe.merge.tokenizer import VocabPlan, plan_vocabulary, vocab_entry

log = logging.getLogger("finrecipe.merge")

PLAN_VERSION = 2  # the plan format (docs/merge-plan.md); the core checks it
DEFAULT_CHUNK_ELEMS = 1 << 20
LAYER_RE = re.compile(r"^(?P<pre>(?:.*\.)?(?:layers|h|blocks|layer))\.(?P<idx>\d+)\.(?P<rest>.+)$")
_VOCAB_HINTS = ("embed_tokens", "lm_head", "embed_in", "embed_out", "wte", "word_embeddings")
_PRE_HINTS = ("embed", "wte", "wpe")
_MISSING = object()


@dataclass
class MergePlanInfo:
    """The resolved plan plus what `run_merge` needs around it."""

    plan: dict[str, Any]  # docs/merge-plan.md, without out_dir (set at run time)
    model_paths: dict[str, Path]  # config name -> directory
    config_donor: str  # model name whose config.json / generation_config.json are copied
    tokenizer_donor: str  # model name whose tokenizer files are copied
    num_layers: int | None  # output layer count (slices may change it)
    out_bytes: int  # total bytes of output tensors
    in_bytes: int  # bytes of input tensor data the merge reads
    shapes: list[tuple[int, ...]] = field(default_factory=list)  # per plan tensor
    warnings: list[str] = field(default_factory=list)
    # FP8: whether an input is block-scaled FP8, and the quantization_config of an FP8 output.
    fp8_inputs: bool = False
    fp8_config: dict[str, Any] | None = None
    vocab: VocabPlan | None = None  # tokenizer_source / tokenizer: the output vocabulary (merge/tokenizer.py)

    @property
    def num_tensors(self) -> int:
        return len(self.plan["tensors"])

    @property
    def num_params(self) -> int:
        return sum(math.prod(s) for s in self.shapes)



def _compute_dtype(cfg: MergeConfig) -> str:
    """The dtype the arithmetic runs in: `compute_dtype` when given, else `dtype` (mergekit's rule:
    its torch operations run in `dtype`), float32 when neither is given."""
    name = cfg.compute_dtype or cfg.dtype
    return "BF16" if name is not None and DTYPES.get(name) == "BF16" else "F32"

def resolve_model_paths(cfg: MergeConfig, model_paths: Mapping[str, Path | str] | None) -> dict[str, Path]:
    """Name -> absolute directory for every model the config mentions."""
    out: dict[str, Path] = {}
    for name in cfg.model_names():
        if model_paths is not None:
            if name not in model_paths:
                raise cfg.error(f"unknown model {name!r}" + _suggest(name, model_paths)
                                + "; known: " + ", ".join(model_paths), _where(cfg, name))
            p = Path(model_paths[name])
        else:
            p = Path(name).expanduser()
            if not p.is_absolute() and not p.exists() and cfg.file:
                alt = Path(cfg.file).parent / p
                if alt.exists():
                    p = alt
        if not p.exists():
            raise cfg.error(f"model {name!r}: {p} does not exist (models are local directories here; "
                            "hub ids are resolved by the recipe engine)", _where(cfg, name))
        out[name] = p.absolute()
    return out


def _suggest(name: str, cands: Mapping[str, Any]) -> str:
    from finrecipe.yamlio import suggest

    return suggest(name, list(cands))


def _where(cfg: MergeConfig, name: str) -> tuple[str | int, ...]:
    if cfg.base_model == name:
        return ("base_model",)
    for i, m in enumerate(cfg.models or []):
        if m.model == name:
            return ("models", i, "model")
    for i, sl in enumerate(cfg.slices or []):
        if sl.base_model == name:
            return ("slices", i, "base_model")
        for j, s in enumerate(sl.sources):
            if s.model == name:
                return ("slices", i, "sources", j, "model")
    return ()


# -- parameter evaluation ----------------------------------------------------------------------------

def evaluate_setting(setting: ParamSetting, tensor: str, t: float) -> Any:
    """The value of one setting for a tensor at gradient position t (`_MISSING` if no filter matches)."""
    if isinstance(setting, list) and setting and isinstance(setting[0], FilterRule):
        for rule in setting:
            assert isinstance(rule, FilterRule)
            if rule.filter is None or rule.filter in tensor:
                return evaluate_setting(rule.value, tensor, t)
        return _MISSING
    if isinstance(setting, list):
        return gradient(setting, t)  # type: ignore[arg-type]
    return setting


def gradient(values: list[float], t: float) -> float:
    """mergekit's piecewise-linear interpolation of `values` at t in [0, 1]."""
    n = len(values)
    if n == 1:
        return float(values[0])
    s = t * (n - 1)
    i = min(int(math.floor(s)), n - 1)
    if i >= n - 1:
        return float(values[-1])
    frac = s - i
    return (1.0 - frac) * float(values[i]) + frac * float(values[i + 1])


def _resolve(pd: ParamDef, levels: list[Params | None], tensor: str, t: float,
             cfg: MergeConfig, what: str) -> Any:
    for params in levels:
        if params and pd.name in params:
            v = evaluate_setting(params[pd.name], tensor, t)
            if v is not _MISSING:
                return bool(v) if pd.kind is bool else float(v)
    if pd.default is None:
        raise cfg.error(f"parameter {pd.name!r} is required by merge method {cfg.merge_method!r} "
                        f"but not set for {what} (tensor {tensor!r}); set it in 'parameters'", ("parameters",))
    return pd.default


# -- plan building -----------------------------------------------------------------------------------

@dataclass
class _Src:
    model: str  # config name
    params: Params | None  # the model's own parameters
    layer_offset: int  # source layer index = output layer index within slice + layer_offset


@dataclass
class _Part:
    """One slice (or the whole model list): output layers [out_start, out_start + length)."""

    sources: list[_Src]
    base: _Src | None
    params: Params | None  # slice-level parameters
    out_start: int
    length: int | None  # None: all layers (models: form)


def _num_layers(info: ModelInfo) -> int | None:
    idx = [int(m.group("idx")) for n in info.tensors if (m := LAYER_RE.match(n))]
    return max(idx) + 1 if idx else None


def _with_layer(name: str, idx: int) -> str:
    m = LAYER_RE.match(name)
    assert m is not None
    return f"{m.group('pre')}.{idx}.{m.group('rest')}"


def _expected_reads(cfg: MergeConfig, parts: list[_Part], infos: Mapping[str, ModelInfo]
                    ) -> dict[str, list[str]]:
    """Per model, the tensors a merge must read (in file order): all of them with `models:`;
    with `slices:` those of the layers in each source's range, the embeddings of the first
    slice's models and the final tensors of the last slice's."""
    out: dict[str, list[str]] = {}
    if cfg.models is not None:
        for s in ([parts[0].base] if parts[0].base else []) + parts[0].sources:
            out[s.model] = list(infos[s.model].tensors)
        return out
    want: dict[str, set[str]] = {}
    for i, pt in enumerate(parts):
        for s in ([pt.base] if pt.base else []) + pt.sources:
            lo, hi = s.layer_offset, s.layer_offset + (pt.length or 0)
            names = want.setdefault(s.model, set())
            for name in infos[s.model].tensors:
                mm = LAYER_RE.match(name)
                if mm:
                    if lo <= int(mm.group("idx")) < hi:
                        names.add(name)
                elif any(h in name for h in _PRE_HINTS):
                    if i == 0:
                        names.add(name)
                elif i == len(parts) - 1:
                    names.add(name)
    for model, names in want.items():
        out[model] = [n for n in infos[model].tensors if n in names]
    return out


def _check_nothing_dropped(cfg: MergeConfig, parts: list[_Part], infos: Mapping[str, ModelInfo],
                           paths: Mapping[str, Path], consumed: set[tuple[str, str]], ref_name: str) -> None:
    """An input tensor the output would silently lack (a donor's extra layer, an extra bias) is an
    error naming the tensors, raised while planning (before any data is read or written)."""
    for model, names in _expected_reads(cfg, parts, infos).items():
        unread = [n for n in names if (model, n) not in consumed]
        if not unread:
            continue
        shown = ", ".join(repr(n) for n in unread[:4]) + (f" and {len(unread) - 4} more" if len(unread) > 4
                                                          else "")
        role = "base model" if ref_name == cfg.base_model else "first model"
        nl, nref = _num_layers(infos[model]), _num_layers(infos[ref_name])
        if cfg.models is not None and nl is not None and nref is not None and nl != nref:
            raise MismatchError(
                f"model {model!r} ({paths[model]}) has {nl} layers but the {role} {ref_name!r} has {nref}; "
                f"the output follows {ref_name!r}, so {len(unread)} tensors of {model!r} would be dropped "
                f"({shown}); merge models with the same layer count, or pick layers with 'slices' and "
                "'layer_range'")
        raise MismatchError(
            f"model {model!r} ({paths[model]}) has {len(unread)} tensors that the {role} {ref_name!r} "
            f"lacks ({shown}); the merge would drop them silently; merge models of the same architecture")


def build_plan(cfg: MergeConfig, model_paths: Mapping[str, Path | str] | None = None, *,
               infos: Mapping[str, ModelInfo] | None = None, threads: int = 0,
               out_shard_size: int = 5_000_000_000, seed: int = 0,
               chunk_elems: int = DEFAULT_CHUNK_ELEMS) -> MergePlanInfo:
    """Validate `cfg` against the models' headers and resolve the plan (no tensor data is read)."""
    paths = resolve_model_paths(cfg, model_paths)
    names = list(paths)
    if infos is None:
        infos = {}
    infos = dict(infos)
    for n in names:
        check_not_quantized(n, paths[n])
        if n not in infos:
            infos[n] = read_model(paths[n])
    index = {n: i for i, n in enumerate(names)}
    fp8: dict[str, Fp8Layout | None] = {n: fp8_layout(paths[n]) for n in names}
    vplan = plan_vocabulary(cfg, paths)

    def outputs_of(model: str) -> list[str]:
        """A model's tensors that are outputs (an FP8 weight's scales travel with it)."""
        tl = infos[model].tensors
        return [n for n in tl if not (fp8[model] and is_scale_tensor(tl, n))]

    m = cfg.method
    warnings: list[str] = []

    parts: list[_Part] = []
    if cfg.models is not None:
        srcs = [_Src(x.model, x.parameters, 0) for x in cfg.models]
        base = _Src(cfg.base_model, None, 0) if cfg.base_model else None
        if base is not None:
            for s in srcs:
                if s.model == base.model:
                    base.params = s.params
        if not (m.needs_base or m.base_optional):
            base = None  # e.g. linear ignores base_model: it merges exactly the models listed
        elif base is not None:
            srcs = [s for s in srcs if s.model != base.model]
        parts.append(_Part(srcs, base, None, 0, None))
    else:
        out_start = 0
        for i, sl in enumerate(cfg.slices or []):
            bname = sl.base_model or cfg.base_model
            ss = []
            length = None
            for sd in sl.sources:
                lo = sd.layer_range[0] if sd.layer_range else 0
                if sd.layer_range:
                    length = sd.layer_range[1] - sd.layer_range[0]
                ss.append(_Src(sd.model, sd.parameters, lo))
            if length is None:
                length = _num_layers(infos[sl.sources[0].model]) or 0
            base = None
            if bname and (m.needs_base or m.base_optional):
                found = [s for s in ss if s.model == bname]
                base = found[0] if found else _Src(bname, None, ss[0].layer_offset)
                ss = [s for s in ss if s.model != bname]
            parts.append(_Part(ss, base, sl.parameters, out_start, length))
            for j, ssrc in enumerate(sl.sources):
                if ssrc.layer_range:
                    nl = _num_layers(infos[ssrc.model]) or 0
                    if ssrc.layer_range[1] > nl:
                        raise cfg.error(f"layer_range {list(ssrc.layer_range)} is beyond model {ssrc.model!r}, "
                                        f"which has {nl} layers", ("slices", i, "sources", j, "layer_range"))
            out_start += length

    for pi, part in enumerate(parts):
        nsrc = len(part.sources)
        loc: tuple[str | int, ...] = ("models",) if cfg.models is not None else ("slices", pi, "sources")
        if nsrc < m.min_sources or (m.max_sources is not None and nsrc > m.max_sources):
            want = (f"exactly {m.min_sources}" if m.max_sources == m.min_sources
                    else f"at least {m.min_sources}")
            extra = " besides the base model" if part.base is not None else ""
            raise cfg.error(f"merge method {m.name!r} needs {want} model(s){extra}, got {nsrc}", loc)
        if m.needs_base and part.base is None:
            raise cfg.error(f"merge method {m.name!r} needs a 'base_model'", ())

    ref_name = (parts[0].base or parts[0].sources[0]).model
    ref = infos[ref_name]
    out_dtype_cfg = cfg.out_dtype or cfg.dtype
    out_dt = (FP8_DTYPES.get(out_dtype_cfg) or DTYPES[out_dtype_cfg]) if out_dtype_cfg else None
    fp8_out_layout = next((lay for lay in fp8.values() if lay is not None), None)
    if out_dt == FP8 and fp8_out_layout is None:
        raise cfg.error(f"out_dtype {out_dtype_cfg!r} requantises to the block layout of an FP8 input (which "
                        "tensors, block size), but no input model is an FP8 block-scaled checkpoint; use "
                        "bfloat16", ("out_dtype",))

    # Output tensor list: (out_name, part, layer index within part or None)
    jobs: list[tuple[str, _Part, int | None, str]] = []  # out_name, part, local idx, ref tensor
    if cfg.models is not None:
        L = _num_layers(ref)
        for name in outputs_of(ref_name):
            mm = LAYER_RE.match(name)
            jobs.append((name, parts[0], int(mm.group("idx")) if mm else None, name))
        num_layers: int | None = L
        for pt in parts:
            pt.length = L
    else:
        pre: list[str] = []
        post: list[str] = []
        for name in outputs_of(ref_name):
            if not LAYER_RE.match(name):
                (pre if any(h in name for h in _PRE_HINTS) else post).append(name)
        for name in pre:
            jobs.append((name, parts[0], None, name))
        for pt in parts:
            ref_src = pt.base or pt.sources[0]
            rnames = outputs_of(ref_src.model)
            assert pt.length is not None
            for kk in range(pt.length):
                src_idx = kk + ref_src.layer_offset
                for name in rnames:
                    mm = LAYER_RE.match(name)
                    if mm and int(mm.group("idx")) == src_idx:
                        jobs.append((_with_layer(name, pt.out_start + kk), pt, kk, name))
        for name in post:
            jobs.append((name, parts[-1], None, name))
        num_layers = sum(p.length or 0 for p in parts)

    tensors: list[dict[str, Any]] = []
    shapes: list[tuple[int, ...]] = []
    in_bytes = 0
    out_bytes = 0
    seen: set[str] = set()
    consumed: set[tuple[str, str]] = set()  # (model, tensor) the plan reads
    for out_name, part, k, _ in jobs:
        if out_name in seen:
            raise ConfigError(f"output tensor {out_name!r} would be written twice; check the slices")
        seen.add(out_name)
        L = part.length or 1
        t = 0.0 if k is None else (1.0 if L <= 1 else k / (L - 1))

        def src_tensor(s: _Src, k: int | None = k, out_name: str = out_name) -> tuple[str, TensorInfo]:
            tname = out_name if k is None else _with_layer(out_name, k + s.layer_offset)
            info = infos[s.model].tensors.get(tname)
            if info is None:
                raise MismatchError(f"model {s.model!r} ({paths[s.model]}) has no tensor {tname!r}, needed "
                                    f"for output tensor {out_name!r}; the models must share an architecture")
            return tname, info

        all_srcs = ([part.base] if part.base else []) + part.sources
        refs = [src_tensor(s) for s in all_srcs]
        consumed.update((s.model, tname) for s, (tname, _) in zip(all_srcs, refs, strict=True))
        # FP8 block-scaled inputs: each F8_E4M3 weight reads its scales too.
        scaled: dict[tuple[str, str], dict[str, Any]] = {}
        for s, (tname, info) in zip(all_srcs, refs, strict=True):
            lay = fp8[s.model]
            if lay is not None and info.dtype == FP8:
                sname = scale_of(tname)
                if sname not in infos[s.model].tensors:
                    raise MismatchError(f"model {s.model!r} ({paths[s.model]}) is an FP8 block-scaled "
                                        f"checkpoint but its F8_E4M3 tensor {tname!r} has no {sname!r}; the "
                                        "checkpoint is incomplete: re-download it")
                scaled[(s.model, tname)] = {"tensor": sname, "block": list(lay.block)}
                consumed.add((s.model, sname))
        first = refs[0][1]
        vshape = None if vplan is None else vocab_entry(
            vplan, cfg, parts.index(part), len(tensors), out_name,
            [(s.model, tn, inf) for s, (tn, inf) in zip(all_srcs, refs, strict=True)],
            part.base.model if part.base else None, infos)
        for s, (tname, info) in zip(all_srcs, refs, strict=True):
            if vshape is None and info.shape != first.shape:
                vocab = (any(h in tname for h in _VOCAB_HINTS) and len(info.shape) == len(first.shape)
                         and info.shape[1:] == first.shape[1:])
                if vocab:
                    raise MismatchError(
                        f"vocabulary sizes differ: {tname!r} has {info.shape[0]} rows in model {s.model!r} "
                        f"but {first.shape[0]} in {all_srcs[0].model!r}; models with different "
                        "tokenizers need an output vocabulary: set tokenizer_source (union, base or a model "
                        "name) or use models that share the base's tokenizer")
                raise MismatchError(f"tensor {tname!r}: shape {list(info.shape)} in model {s.model!r} differs "
                                    f"from {list(first.shape)} in {all_srcs[0].model!r}")
        what_part = ", ".join(s.model for s in part.sources)

        def ref_of(s: _Src, tname: str, scaled: dict[tuple[str, str], dict[str, Any]] = scaled
                   ) -> dict[str, Any]:
            d: dict[str, Any] = {"model": index[s.model], "tensor": tname}
            if (s.model, tname) in scaled:
                d["scale"] = scaled[(s.model, tname)]
            return d

        if not m.explicit_copy:
            for s, (tname, info) in zip(all_srcs, refs, strict=True):
                if (s.model, tname) in scaled:
                    continue
                why = why_not_combinable(info.dtype)
                if why is not None:
                    raise MismatchError(
                        f"tensor {tname!r} of model {s.model!r} ({paths[s.model]}) is {info.dtype}: merge "
                        f"method {m.name!r} computes in float32 from BF16, F16 or F32 tensors, and {why}")
        copy_as_is = (m.explicit_copy and why_not_combinable(refs[0][1].dtype) is not None
                      and not scaled)
        if copy_as_is:
            # An explicit copy of a tensor no arithmetic applies to: its bytes, unchanged.
            s0 = part.sources[0]
            tname, info = refs[0]
            sp0 = {pd.name: _resolve(pd, [s0.params, part.params, cfg.parameters], out_name, t, cfg,
                                     f"model {s0.model!r}") for pd in m.kernel_params("model")}
            if sp0.get("scale", 1.0) != 1.0:
                raise MismatchError(f"tensor {tname!r} of model {s0.model!r} is {info.dtype}: {m.name!r} can "
                                    f"copy it only as it is, not scaled by {sp0['scale']:g}; use a 'filter' rule "
                                    "to give it scale 1")
            entry: dict[str, Any] = {"name": out_name, "kernel": m.kernel, "out_dtype": info.dtype,
                                     "base": None, "sources": [{**ref_of(s0, tname), "params": sp0}],
                                     "params": {pd.name: _resolve(pd, [part.params, cfg.parameters], out_name,
                                                                  t, cfg, what_part)
                                                for pd in m.kernel_params("global")}}
        else:
            gl = [part.params, cfg.parameters]
            tparams: dict[str, Any] = {}
            for pd in m.kernel_params("global"):
                tparams[pd.name] = _resolve(pd, gl, out_name, t, cfg, what_part)
            sources = []
            for s, (tname, _info) in zip(part.sources, refs[len(refs) - len(part.sources):], strict=True):
                sp: dict[str, Any] = {}
                for pd in m.kernel_params("model"):
                    sp[pd.name] = _resolve(pd, [s.params] + gl, out_name, t, cfg, f"model {s.model!r}")
                sources.append({**ref_of(s, tname), "params": sp})
            if m.kernel in ("della", "della_linear"):
                for s, src in zip(part.sources, sources, strict=True):
                    dd, ee = float(src["params"]["density"]), float(src["params"]["epsilon"])
                    if 0 < dd < 1 and not (0 < dd - ee and dd + ee < 1):
                        raise cfg.error(f"model {s.model!r}, tensor {out_name!r}: {m.name} keeps entries with "
                                        f"probabilities density ± epsilon = {dd:g} ± {ee:g}, which must lie "
                                        "inside (0, 1); lower epsilon", ("models",) if cfg.models is not None else ("slices",))
            if (m.refuse_zero_weight_sum and tparams.get("normalize")) or (
                    m.zero_sum_flag is not None and tparams.get(m.zero_sum_flag) and len(sources) > 1):
                flag = m.zero_sum_flag or "normalize"
                wsum = sum(float(src["params"]["weight"]) for src in sources)
                if abs(wsum) < 1e-8:
                    raise cfg.error(
                        f"the weights of the models sum to {wsum:g} for tensor {out_name!r} and "
                        f"{m.name!r} divides by that sum ({flag} is on); give weights with a "
                        f"non-zero sum or set {flag}: false",
                        ("models",) if cfg.models is not None else ("slices",))
            ref_dt = refs[0][1].dtype
            odt = out_dt or (ref_dt if ref_dt != FP8 else "BF16")  # FP8 in: bf16 out by default
            out_scale = None
            if out_dt == FP8:
                if scaled:  # requantised in the block layout of (the first of) its FP8 inputs
                    (smodel, stname), sp8 = next(iter(scaled.items()))
                    out_scale = {"name": scale_of(out_name), "block": sp8["block"],
                                 "dtype": infos[smodel].tensors[sp8["tensor"]].dtype}
                else:  # a tensor the FP8 inputs keep unquantized (norms, embeddings)
                    odt = ref_dt if ref_dt in ("BF16", "F16", "F32") else "BF16"
            entry = {"name": out_name, "kernel": m.kernel, "out_dtype": odt,
                     "base": ref_of(part.base, refs[0][0]) if part.base else None,
                     "sources": sources, "params": tparams}
            if m.bf16_compute and _compute_dtype(cfg) == "BF16":
                entry["compute_dtype"] = "BF16"
            if out_scale is not None:
                entry["out_scale"] = out_scale
                bl = out_scale["block"]
                nsc = -(-first.shape[0] // bl[0]) * -(-first.shape[1] // bl[1])
                out_bytes += nbytes(out_scale["dtype"], nsc)
        tensors.append(entry)
        shapes.append(vshape or first.shape)
        in_bytes += sum(info.nbytes for _, info in refs)
        in_bytes += sum(infos[mo].tensors[sc["tensor"]].nbytes for (mo, _), sc in scaled.items())
        out_bytes += nbytes(entry["out_dtype"], math.prod(vshape or first.shape))

    _check_nothing_dropped(cfg, parts, infos, paths, consumed, ref_name)
    plan = {
        "version": PLAN_VERSION,
        "models": [str(paths[n]) for n in names],
        "out_dir": None,
        "out_shard_size": int(out_shard_size),
        "threads": int(threads),
        "seed": int(seed),
        "chunk_elems": int(chunk_elems),
        "metadata": {"format": "pt"},
        "tensors": tensors,
    }
    config_donor = cfg.base_model or ref_name
    tok = cfg.tokenizer_source_name
    if tok is None or tok in ("base", "union"):
        tok_donor = config_donor
    else:
        if tok not in paths:
            raise cfg.error(f"tokenizer source {tok!r} is not one of the models"
                            + _suggest(tok, paths) + "; use 'base' or a model name",
                            ("tokenizer_source",) if cfg.tokenizer_source else ("tokenizer", "source"))
        tok_donor = tok
    for w in warnings[:20]:
        log.info("%s", w)
    fp8_config = None
    if out_dt == FP8 and fp8_out_layout is not None:
        fp8_config = dict(fp8_out_layout.config)
    return MergePlanInfo(plan=plan, model_paths=paths, config_donor=config_donor,
                         tokenizer_donor=tok_donor, num_layers=num_layers, out_bytes=out_bytes,
                         in_bytes=in_bytes, shapes=shapes, warnings=warnings,
                         fp8_inputs=any(v is not None for v in fp8.values()), fp8_config=fp8_config,
                         vocab=vplan)
