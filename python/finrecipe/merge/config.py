"""mergekit-compatible merge configuration (YAML), validated strictly.

Existing mergekit configs run unchanged, but unlike mergekit nothing is silently ignored: unknown
keys, misspelled parameters, unknown methods and wrong types are `RecipeError`s (a `ConfigError`)
naming the file, line, column and key path, with a "did you mean ...?" suggestion.

A parameter setting is a scalar, a gradient (a list of numbers interpolated over layer index), or
a list of `{filter: SUBSTRING, value: scalar|gradient}` rules (first match wins).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    StrictBool,
    ValidationError,
    field_validator,
    model_validator,
)

from finrecipe.errors import RecipeError
from finrecipe.merge.methods import METHODS, MethodDef, ParamDef
from finrecipe.yamlio import KeyPath, Positions, format_path, load_yaml, locate, suggest, validation_error


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Scalar = StrictBool | float
Gradient = list[float]


class FilterRule(_Strict):
    filter: str | None = None
    value: Scalar | Gradient

    @field_validator("value")
    @classmethod
    def _nonempty(cls, v: Any) -> Any:
        if isinstance(v, list) and not v:
            raise ValueError("a gradient needs at least one value")
        return v


ParamSetting = Scalar | Gradient | list[FilterRule]
Params = dict[str, ParamSetting]


class InputModel(_Strict):
    model: str
    parameters: Params | None = None


class SliceSource(_Strict):
    model: str
    layer_range: tuple[int, int] | None = None
    parameters: Params | None = None

    @field_validator("layer_range")
    @classmethod
    def _range(cls, v: tuple[int, int] | None) -> tuple[int, int] | None:
        if v is not None and not (0 <= v[0] < v[1]):
            raise ValueError(f"layer_range must be [start, end) with 0 <= start < end, got {list(v)}")
        return v


class OutputSlice(_Strict):
    sources: list[SliceSource] = Field(min_length=1)
    base_model: str | None = None
    parameters: Params | None = None


class ModelTokenSource(_Strict):
    """`{kind: model_token, model: NAME, token: TOKEN}` (or `token_id: ID`): the row of one token of
    one input model, by its id in that model's own vocabulary."""

    kind: Literal["model_token"]
    model: str
    token_id: int | None = None
    token: str | None = None

    @model_validator(mode="after")
    def _one(self) -> ModelTokenSource:
        if (self.token_id is None) == (self.token is None):
            raise ValueError("give exactly one of 'token' or 'token_id'")
        if self.token_id is not None and self.token_id < 0:
            raise ValueError(f"token_id must be >= 0, got {self.token_id}")
        return self


class ZeroSource(_Strict):
    """`{kind: zero}`: an all-zero row."""

    kind: Literal["zero"]


class TokenEmbedding(_Strict):
    """How the rows of one output token are filled (mergekit's `tokenizer.tokens.<TOKEN>`)."""

    source: ModelTokenSource | ZeroSource | str | None = None
    force: StrictBool = False


class TokenizerConfig(_Strict):
    """mergekit's `tokenizer:` section: the output vocabulary (`source`: union, base or a model
    name; union by default, as in mergekit), per-token row sources and padding of the row count."""

    source: str = "union"
    tokens: dict[str, TokenEmbedding] | None = None
    pad_to_multiple_of: int | None = Field(default=None, gt=0)


# out_dtype only: requantise to FP8 E4M3 in the block layout of the FP8 input(s).
FP8_DTYPES = {"float8_e4m3fn": "F8_E4M3", "fp8": "F8_E4M3", "f8_e4m3": "F8_E4M3", "float8": "F8_E4M3"}
DTYPES = {"float32": "F32", "fp32": "F32", "f32": "F32", "float": "F32",
          "bfloat16": "BF16", "bf16": "BF16",
          "float16": "F16", "fp16": "F16", "f16": "F16", "half": "F16"}


class MergeConfig(_Strict):
    """A mergekit YAML config. Build with `load_merge_config(path)` or `MergeConfig.from_dict(...)`."""

    merge_method: str
    base_model: str | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    # finrecipe only: "float32" computes exactly in float32 even when `dtype` is bfloat16 (by
    # default `dtype: bfloat16` computes in bf16 as mergekit does; docs/merge-plan.md).
    compute_dtype: str | None = None
    parameters: Params | None = None
    tokenizer_source: str | None = None
    tokenizer: TokenizerConfig | None = None
    chat_template: str | None = None
    models: list[InputModel] | None = None
    slices: list[OutputSlice] | None = None
    name: str | None = None

    _file: str | None = PrivateAttr(default=None)
    _positions: Positions | None = PrivateAttr(default=None)
    _prefix: KeyPath = PrivateAttr(default=())
    _raw: dict[str, Any] | None = PrivateAttr(default=None)

    # -- construction -------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Mapping[str, Any], file: str | None = None,
                  positions: Positions | None = None, prefix: KeyPath = ()) -> MergeConfig:
        """Validate a config mapping. `file`/`positions`/`prefix` locate errors in the source file
        (`prefix` is where the mapping sits inside it, e.g. ("stages", "merged"))."""
        if not isinstance(d, Mapping):
            raise RecipeError(f"a merge config must be a mapping, got {type(d).__name__}", file=file,
                              path=format_path(prefix) or None)
        _precheck_settings(d, file, positions, tuple(prefix))
        try:
            cfg = cls.model_validate(dict(d))
        except ValidationError as e:
            raise validation_error(e, file=file, positions=positions, prefix=prefix, model=cls) from None
        cfg._file, cfg._positions, cfg._prefix = file, positions, tuple(prefix)
        cfg._raw = dict(d)
        cfg._check()
        return cfg

    # -- located errors -----------------------------------------------------------------------------
    def error(self, message: str, path: Sequence[str | int] = ()) -> RecipeError:
        """A `RecipeError` located at `path` (relative to this config) in the source file."""
        full = tuple(self._prefix) + tuple(path)
        line, col = locate(self._positions, full)
        return RecipeError(message, file=self._file, line=line, column=col,
                           path=format_path(full) or None)

    @property
    def file(self) -> str | None:
        return self._file

    @property
    def method(self) -> MethodDef:
        return METHODS[self.merge_method]

    # -- semantic checks (structure is pydantic's job) ----------------------------------------------
    def _check(self) -> None:
        if self.merge_method not in METHODS:
            raise self.error(f"unknown merge method {self.merge_method!r}"
                             + suggest(self.merge_method, METHODS)
                             + "; known: " + ", ".join(METHODS), ("merge_method",))
        m = self.method
        if (self.models is None) == (self.slices is None):
            raise self.error("exactly one of 'models' or 'slices' is required", ())
        for key in ("dtype", "out_dtype"):
            v = getattr(self, key)
            if v is not None and v in FP8_DTYPES and key == "out_dtype":
                continue
            if v is not None and v not in DTYPES:
                more = " (or float8_e4m3fn for out_dtype: FP8 block-scaled output)" if key == "out_dtype" else ""
                raise self.error(f"unsupported {key} {v!r}" + suggest(v, [*DTYPES, *FP8_DTYPES])
                                 + f"; use float32, bfloat16 or float16{more}", (key,))
        if self.compute_dtype is not None and DTYPES.get(self.compute_dtype) not in ("F32", "BF16"):
            raise self.error(f"unsupported compute_dtype {self.compute_dtype!r}; use float32 (exact) or "
                             "bfloat16 (as mergekit computes with dtype: bfloat16)", ("compute_dtype",))
        if self.tokenizer_source is not None and self.tokenizer is not None:
            raise self.error("give either 'tokenizer_source' or 'tokenizer', not both", ("tokenizer",))
        if self.chat_template is not None:
            from finrecipe.merge.chat_templates import template_problem

            problem = template_problem(self.chat_template)
            if problem is not None:
                raise self.error(problem, ("chat_template",))
        if m.needs_base and self.base_model is None and not self._slice_bases():
            raise self.error(f"merge method {m.name!r} needs a 'base_model'", ())
        self._check_params(self.parameters, ("parameters",))
        if self.models is not None:
            if not self.models:
                raise self.error("'models' is empty", ("models",))
            for i, im in enumerate(self.models):
                self._check_params(im.parameters, ("models", i, "parameters"), per_model=True)
        else:
            assert self.slices is not None
            if not self.slices:
                raise self.error("'slices' is empty", ("slices",))
            for i, sl in enumerate(self.slices):
                self._check_params(sl.parameters, ("slices", i, "parameters"))
                lens = set()
                for j, s in enumerate(sl.sources):
                    self._check_params(s.parameters, ("slices", i, "sources", j, "parameters"),
                                       per_model=True)
                    if s.layer_range is not None:
                        lens.add(s.layer_range[1] - s.layer_range[0])
                    elif len(sl.sources) > 1 or len(self.slices) > 1:
                        raise self.error("'layer_range' is required when a config has several slices or "
                                         "sources", ("slices", i, "sources", j))
                if len(lens) > 1:
                    raise self.error(f"all sources of a slice must cover the same number of layers, got "
                                     f"{sorted(lens)}", ("slices", i, "sources"))

    def _slice_bases(self) -> bool:
        return bool(self.slices) and all(s.base_model for s in self.slices or [])

    def _check_params(self, params: Params | None, path: KeyPath, per_model: bool = False) -> None:
        if not params:
            return
        m = self.method
        names = [p.name for p in m.params]
        for k, v in params.items():
            pd = m.param(k)
            if pd is None:
                hint = suggest(k, names)
                if not hint:
                    other = sorted(md.name for md in METHODS.values()
                                   if md.param(k) or suggest(k, [p.name for p in md.params]))
                    if other:
                        hint = f" (methods {', '.join(other)} take a parameter like it)"
                known = ", ".join(names) if names else "none"
                raise self.error(f"unknown parameter {k!r} for merge method {m.name!r}{hint}; "
                                 f"it takes: {known}", path + (k,))
            if per_model and not pd.per_model:
                raise self.error(f"{k!r} applies to the whole merge, not to one model; move it to the "
                                 "top-level (or slice) 'parameters'", path + (k,))
            self._check_value(pd, v, path + (k,))

    def _check_value(self, pd: ParamDef, v: ParamSetting, path: KeyPath) -> None:
        if isinstance(v, list) and v and isinstance(v[0], FilterRule):
            for i, rule in enumerate(v):
                assert isinstance(rule, FilterRule)
                self._check_value(pd, rule.value, path + (i, "value"))
            return
        vals = v if isinstance(v, list) else [v]
        if isinstance(v, list) and not v:
            raise self.error("a gradient needs at least one value", path)
        for x in vals:
            assert not isinstance(x, FilterRule)
            problem = pd.problem(x)
            if problem is not None:
                raise self.error(problem, path)

    @property
    def tokenizer_source_name(self) -> str | None:
        if self.tokenizer_source is not None:
            return self.tokenizer_source
        return self.tokenizer.source if self.tokenizer is not None else None

    def model_names(self) -> list[str]:
        """Every model the config refers to, in first-mention order (base first when given)."""
        out: list[str] = []
        if self.base_model:
            out.append(self.base_model)
        if self.models is not None:
            out += [m.model for m in self.models]
        for sl in self.slices or []:
            if sl.base_model:
                out.append(sl.base_model)
            out += [s.model for s in sl.sources]
        return list(dict.fromkeys(out))

    def raw(self) -> dict[str, Any]:
        """The mapping this config was built from (for writing `mergekit_config.yml`)."""
        return dict(self._raw) if self._raw is not None else self.model_dump(exclude_none=True)


_SETTING_HELP = ("a number, true/false, a list of numbers (a gradient over layers) or a list of "
                 "{filter: SUBSTRING, value: ...} rules")


def _precheck_settings(d: Mapping[str, Any], file: str | None, positions: Positions | None,
                       prefix: KeyPath) -> None:
    """Clear, located messages for malformed parameter settings (pydantic's union errors are not)."""

    def fail(msg: str, path: KeyPath) -> RecipeError:
        line, col = locate(positions, prefix + path)
        return RecipeError(msg, file=file, line=line, column=col, path=format_path(prefix + path))

    def number(x: Any) -> bool:
        return isinstance(x, (int, float))

    def check_value(v: Any, path: KeyPath, rules_ok: bool) -> None:
        if number(v):
            return
        if isinstance(v, list):
            if not v:
                raise fail("an empty list is not a setting; use " + _SETTING_HELP, path)
            if all(number(x) and not isinstance(x, bool) for x in v):
                return
            if rules_ok and all(isinstance(x, Mapping) for x in v):
                for i, rule in enumerate(v):
                    for k in rule:
                        if k not in ("filter", "value"):
                            raise fail(f"unknown key {k!r} in a filter rule" + suggest(str(k), ["filter", "value"])
                                       + "; a rule is {filter: SUBSTRING, value: ...}", path + (i, k))
                    if "value" not in rule:
                        raise fail("a filter rule needs a 'value'", path + (i,))
                    if rule.get("filter") is not None and not isinstance(rule["filter"], str):
                        raise fail(f"'filter' is a substring of tensor names, got {rule['filter']!r}",
                                   path + (i, "filter"))
                    check_value(rule["value"], path + (i, "value"), rules_ok=False)
                return
        what = _SETTING_HELP if rules_ok else "a number, true/false or a list of numbers"
        raise fail(f"a setting is {what}; got {v!r}", path)

    def check_params(p: Any, path: KeyPath) -> None:
        if isinstance(p, Mapping):
            for k, v in p.items():
                check_value(v, path + (k,), rules_ok=True)

    if not isinstance(d, Mapping):
        return
    check_params(d.get("parameters"), ("parameters",))
    models = d.get("models")
    if isinstance(models, list):
        for i, m in enumerate(models):
            if isinstance(m, Mapping):
                check_params(m.get("parameters"), ("models", i, "parameters"))
    slices = d.get("slices")
    if isinstance(slices, list):
        for i, sl in enumerate(slices):
            if isinstance(sl, Mapping):
                check_params(sl.get("parameters"), ("slices", i, "parameters"))
                srcs = sl.get("sources")
                if isinstance(srcs, list):
                    for j, src in enumerate(srcs):
                        if isinstance(src, Mapping):
                            check_params(src.get("parameters"), ("slices", i, "sources", j, "parameters"))


def load_merge_config(path: str | Path) -> MergeConfig:
    """Read and validate a mergekit YAML file."""
    data, pos = load_yaml(path)
    return MergeConfig.from_dict(data, file=str(path), positions=pos)
