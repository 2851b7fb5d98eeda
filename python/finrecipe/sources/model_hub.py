"""`models: {NAME: {hub: ORG/NAME, revision: REV}}`: a model repository on the Hugging Face hub,
keyed by the commit the revision resolves to (pinned by the lockfile).

The files live in the standard Hugging Face cache (HF_HOME / HF_HUB_CACHE): a model already
downloaded is not downloaded again, recipes share one copy, and the node's output is the cache's
snapshot directory itself. With `allow_pickle: true`, a repository that ships only pickle weights
is converted once to safetensors into the node's directory (torch.load(weights_only=True))."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from finrecipe.node import CheckContext, NodeKind, Resolution, ResolveContext, register
from finrecipe.sources.model_path import remote_code_request
from finrecipe.sources.specs import ModelSource
from finrecipe.types import InputRef, Request, StageContext, StageResult
from finrecipe.util.content import digest


def locked_commit(rc: ResolveContext, repo: str, revision: str | None) -> str:
    """The commit of `repo@revision`: from the lockfile when it pins the same repo and revision
    (no network) unless refreshing, else from the hub."""
    from finrecipe import sources

    e = None if rc.refresh else rc.locked(hub=repo, revision=revision)
    commit = e.get("commit") if e else None
    if not isinstance(commit, str) or sources.is_commit(revision):
        commit = sources.hub_resolve_commit(repo, revision, "model" if rc.section == "models" else "dataset")
    return commit


@register
class HubModel(NodeKind[ModelSource]):
    type = "hub"
    section = "models"
    Config = ModelSource
    network = True

    def resolve(self, config: ModelSource, rc: ResolveContext) -> Resolution:
        assert config.hub is not None
        commit = locked_commit(rc, config.hub, config.revision)
        material = {"source": "hub", "repo": config.hub, "commit": commit, "allow_pickle": config.allow_pickle}
        return Resolution(digest(material), material,
                          lock_entry={"hub": config.hub, "revision": config.revision, "commit": commit})

    def run(self, config: ModelSource, inputs: Mapping[str, InputRef], out_dir: Path,
            ctx: StageContext) -> StageResult:
        from finrecipe import sources
        from finrecipe.sources.convert import convert_pickle_model, has_safetensors

        assert config.hub is not None
        commit = str(ctx.material["commit"])
        snap = sources.fetch_hub_model(ctx.node, config.hub, commit, allow_pickle=config.allow_pickle)
        if has_safetensors(snap):
            # the model stays in the Hugging Face cache (shared, not copied); the marker points at it
            return StageResult(model_dir=snap, extra={"snapshot": str(snap)})
        with ctx.progress.task(f"{ctx.node}: pickle → safetensors", total=None):
            convert_pickle_model(snap, out_dir / "model", overwrite=True)
        return StageResult(model_dir=out_dir / "model", extra={"snapshot": str(snap), "converted": True})

    def requests(self, config: ModelSource, cc: CheckContext) -> list[Request]:
        return [*remote_code_request(cc.node, config)]

    def trusts_remote_code(self, config: ModelSource) -> bool:
        return config.trust_remote_code

