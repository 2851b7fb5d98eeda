"""`models: {NAME: {init: {config: {...}, seed, dtype, tokenizer}}}`: a fresh random model built from
a transformers config (tests, demos, toy runs); the tokenizer is a directory or another model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from finrecipe.node import CheckContext, NodeKind, Resolution, ResolveContext, register
from finrecipe.sources.model_path import remote_code_request
from finrecipe.sources.specs import ModelSource
from finrecipe.types import InputKind, InputRef, ModelRef, Request, StageContext, StageResult
from finrecipe.util.content import digest, tree_digest

_TOK: tuple[str, ...] = ("init", "tokenizer")


@register
class InitModel(NodeKind[ModelSource]):
    type = "init"
    section = "models"
    Config = ModelSource

    def optional_inputs(self, config: ModelSource) -> Sequence[tuple[str, InputKind]]:
        assert config.init is not None
        return [(config.init.tokenizer, "model")] if config.init.tokenizer else []

    def resolve(self, config: ModelSource, rc: ResolveContext) -> Resolution:
        from finrecipe import sources

        init = config.init
        assert init is not None
        tok: Any = None
        facts: dict[str, Any] = {}
        if init.tokenizer is not None:
            if init.tokenizer in rc.inputs:
                tok = {"model": rc.inputs[init.tokenizer].key}
            else:
                tp = (rc.base_dir(_TOK) / init.tokenizer).absolute()
                if not tp.is_dir():
                    raise rc.error(f"tokenizer: neither a model of this recipe nor a directory: {tp}", _TOK)
                tok = {"content": tree_digest(tp, rc.shas, sources.TOKENIZER_PATTERNS)[0]}
                facts["tokenizer_dir"] = str(tp)
        material = {"source": "init", "config": init.config, "seed": init.seed, "dtype": init.dtype,
                    "tokenizer": tok, "version": sources.INIT_VERSION}
        return Resolution(digest(material), material, facts=facts)

    def _tokenizer_request(self, config: ModelSource, cc: CheckContext) -> list[Request]:
        tok = config.init.tokenizer if config.init else None
        if tok is None or cc.is_node(tok):
            return []
        return cc.path_request((cc.base_dir(_TOK) / tok).absolute(), _TOK)

    def check(self, config: ModelSource, inputs: Mapping[str, InputRef], cc: CheckContext | None = None
              ) -> str | None:
        assert cc is not None and config.init is not None
        tok = config.init.tokenizer
        if tok is not None and tok not in inputs and not cc.is_node(tok):
            tp = (cc.base_dir(_TOK) / tok).absolute()
            if not tp.is_dir():
                raise cc.error(f"tokenizer: neither a model of this recipe nor a directory: {tp}", _TOK)
        return None

    def run(self, config: ModelSource, inputs: Mapping[str, InputRef], out_dir: Path,
            ctx: StageContext) -> StageResult:
        from finrecipe import sources

        init = config.init
        assert init is not None
        tok_dir: Path | None = None
        if init.tokenizer is not None:
            ref = inputs.get(init.tokenizer)
            tok_dir = ref.path if isinstance(ref, ModelRef) else Path(ctx.facts["tokenizer_dir"])
        dest = out_dir / "model"
        sources.build_init_model(init.config, seed=init.seed, dtype=init.dtype, dest=dest,
                                 tokenizer_dir=tok_dir, progress=ctx.progress)
        return StageResult(model_dir=dest)

    def requests(self, config: ModelSource, cc: CheckContext) -> list[Request]:
        return [*remote_code_request(cc.node, config), *self._tokenizer_request(config, cc)]

    def trusts_remote_code(self, config: ModelSource) -> bool:
        return config.trust_remote_code
