"""Negative controls for the parity oracle's checker (bench/parity/check.py): it must be able to FAIL.

tests/test_parity_oracle.py only asserts that rows pass, which a checker accepting anything would
satisfy. Here finrecipe's own output stands in for mergekit's reference (no mergekit venv, no
network), and "ours" is either the same output (must pass), finrecipe's output under another seed
(random rule: other masks, must pass), or a copy with a deliberate defect (must FAIL):

  exact   linear / task_arithmetic (f32 and bf16 compute): one element moved 2 bf16 ulps -> FAIL,
          moved 1 ulp -> pass (the rule's tolerance)
  topk    ties (f32 and bf16): an element far from any selection tie reset to the base value, or
          moved 4 ulps -> FAIL
  random  dare_linear-1 (f32, bf16), dare_ties-2 (f32): one tensor's output deltas scaled by 1.05,
          or an extra 20% of its kept deltas dropped (with and without the survivors rescaled to
          the new mask's exact L1 factor) -> FAIL

The checker runs in one subprocess under run.py's CHECKER_ENV (one torch thread, ATen's scalar
kernels), read from run.py's source so that the two cannot drift; this process's torch settings are
left alone. Models: the llama trio of bench/parity/models.py, built once per module (~7 s).
"""

from __future__ import annotations

import ast
import functools
import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
PARITY = ROOT / "bench" / "parity"
FAMILY = "llama"
TENSOR = "model.layers.1.mlp.down_proj.weight"  # the tensor the defects are written into (128 x 256)
FINRECIPE = [sys.executable, "-c", "from finrecipe.cli import main; main()"]


def oracle_env() -> dict[str, str]:
    """run.py's CHECKER_ENV, read from its source (importing run.py would set it in this process)."""
    tree = ast.parse((PARITY / "run.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "CHECKER_ENV" for t in node.targets):
            env = ast.literal_eval(node.value)
            assert isinstance(env, dict) and env, env
            return {str(k): str(v) for k, v in env.items()}
    raise AssertionError("CHECKER_ENV not found in bench/parity/run.py")


# The checker process: compare() for every job, each Result as a dict, plus the torch settings it ran under.
CHECKER = r"""
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import torch
from check import compare
jobs = json.loads(Path(sys.argv[2]).read_text())
out = {"threads": torch.get_num_threads(), "capability": torch.backends.cpu.get_cpu_capability(), "results": {}}
for key, job in jobs.items():
    r = compare(job["cfg"], job["rule"], Path(job["ours"]), Path(job["ref"]))
    out["results"][key] = r.__dict__
Path(sys.argv[3]).write_text(json.dumps(out))
"""

# Build the models in a child process: transformers' random initialisation reseeds torch's global RNG.
BUILD = r"""
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import models
models.build(Path(sys.argv[2]), sys.argv[3])
"""


# -- tensors ------------------------------------------------------------------------------------------------

def read(d: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    (f,) = sorted(d.glob("*.safetensors"))
    with safe_open(str(f), framework="pt") as h:
        return {k: h.get_tensor(k) for k in h.keys()}, dict(h.metadata() or {})


def edited_copy(src: Path, dst: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    """A copy of the output directory `src` whose tensors went through edit(tensors) (in place)."""
    shutil.copytree(src, dst)
    (f,) = sorted(dst.glob("*.safetensors"))
    tensors, meta = read(dst)
    edit(tensors)
    save_file(tensors, str(f), metadata=meta)
    return dst


def bf16_ulp(x: float) -> float:
    """check.ulps' unit: the bf16 ulp at |x|."""
    return 2.0 ** (math.floor(math.log2(abs(x))) - 7)


def toward_zero(x: torch.Tensor, k: int) -> torch.Tensor:
    """x (one element) moved k bf16 ulps of its own binade toward zero: exactly k ulps by check.ulps
    (the larger magnitude is x's), and representable in bf16 (the lower binade is finer)."""
    v = float(x)
    y = torch.tensor(v - math.copysign(k * bf16_ulp(v), v), dtype=torch.float64).to(x.dtype)
    assert float(y) == v - math.copysign(k * bf16_ulp(v), v), (v, float(y))
    return y


def parity_modules() -> tuple[Any, Any]:
    """bench/parity's check and matrix modules, imported without leaving their generic names (check,
    matrix, tokenizer_cases) in sys.modules or bench/parity on sys.path for other tests."""
    import importlib

    before = set(sys.modules)
    sys.path.insert(0, str(PARITY))
    try:
        return importlib.import_module("check"), importlib.import_module("matrix")
    finally:
        sys.path.remove(str(PARITY))
        for name in ("check", "matrix", "tokenizer_cases"):
            if name not in before:
                sys.modules.pop(name, None)


def tie_flip(check: Any, cfg: dict[str, Any], x: torch.Tensor) -> int:
    """A genuine selection tie, flipped (the positive control of the topk rule): an element where the
    first donor's |delta| sits in the equal-valued run that straddles its top-k cut (the checker's
    tie_states) and the second donor's state is forced, set to the value the other choice for the
    first donor gives (check.gta_combine, the checker's own model). Returns the flat index."""
    s = check.Inputs(cfg).setup(TENSOR)
    base, deltas = s["base"].reshape(-1), [d.reshape(-1) for d in s["deltas"]]
    states = [check.tie_states(d, *check.kept_range(d.numel(), float(p["density"]), float(p["gamma"]), s["sparsify"]))
              for d, p in zip(deltas, s["per"], strict=True)]
    (_, amb0), (keep1, amb1) = states
    out = x.reshape(-1)
    cands = [check.gta_combine(base, deltas, [torch.full_like(base, float(c)), keep1.to(base.dtype)], [None, None],
                               [float(p["weight"]) for p in s["per"]], consensus=s["consensus"],
                               normalize=s["normalize"], lam=s["lam"], int8_mask=s["int8"]).to(out.dtype)
             for c in (0, 1)]
    u0, u1 = check.ulps(out, cands[0]), check.ulps(out, cands[1])
    flippable = amb0 & ~amb1 & (((u0 <= 1) & (u1 > 2)) | ((u1 <= 1) & (u0 > 2)))
    assert int(flippable.sum()) > 0, "no tied element to flip"
    i = int(torch.nonzero(flippable)[0])
    out[i] = cands[1][i] if float(u0[i]) <= 1 else cands[0][i]
    return i


# -- fixture: models, finrecipe outputs, defective copies, one checker run -------------------------------------

# (key, case, dtype, rule, ours) where ours is "same" (the reference itself), "seed1", or a defect applied
# to the reference (exact, topk) or to the seed-1 output (random).
JOBS: list[tuple[str, str, str, str, str]] = [
    ("linear-f32-same", "linear", "f32", "exact", "same"),
    ("linear-f32-2ulp", "linear", "f32", "exact", "nudge2"),
    ("linear-f32-1ulp", "linear", "f32", "exact", "nudge1"),
    ("linear-bf16-same", "linear", "bf16", "exact", "same"),
    ("linear-bf16-2ulp", "linear", "bf16", "exact", "nudge2"),
    ("task_arithmetic-f32-2ulp", "task_arithmetic", "f32", "exact", "nudge2"),
    ("task_arithmetic-bf16-same", "task_arithmetic", "bf16", "exact", "same"),
    ("task_arithmetic-bf16-2ulp", "task_arithmetic", "bf16", "exact", "nudge2"),
    ("task_arithmetic-bf16-1ulp", "task_arithmetic", "bf16", "exact", "nudge1"),
    ("ties-f32-same", "ties", "f32", "topk", "same"),
    ("ties-f32-tie-flip", "ties", "f32", "topk", "tie-flip"),
    ("ties-f32-reset", "ties", "f32", "topk", "reset"),
    ("ties-f32-4ulp", "ties", "f32", "topk", "nudge4-kept"),
    ("ties-bf16-same", "ties", "bf16", "topk", "same"),
    ("ties-bf16-tie-flip", "ties", "bf16", "topk", "tie-flip"),
    ("ties-bf16-reset", "ties", "bf16", "topk", "reset"),
    ("ties-bf16-4ulp", "ties", "bf16", "topk", "nudge4-kept"),
    ("dare_linear-1-f32-seed1", "dare_linear-1", "f32", "random", "seed1"),
    ("dare_linear-1-f32-scaled", "dare_linear-1", "f32", "random", "scaled"),
    ("dare_linear-1-f32-dropped", "dare_linear-1", "f32", "random", "dropped"),
    ("dare_linear-1-f32-dropped-rescaled", "dare_linear-1", "f32", "random", "dropped-rescaled"),
    ("dare_linear-1-bf16-seed1", "dare_linear-1", "bf16", "random", "seed1"),
    ("dare_linear-1-bf16-scaled", "dare_linear-1", "bf16", "random", "scaled"),
    ("dare_linear-1-bf16-dropped", "dare_linear-1", "bf16", "random", "dropped"),
    ("dare_ties-2-f32-seed1", "dare_ties-2", "f32", "random", "seed1"),
    ("dare_ties-2-f32-scaled", "dare_ties-2", "f32", "random", "scaled"),
    ("dare_ties-2-f32-dropped", "dare_ties-2", "f32", "random", "dropped"),
]


def merge(cfg_path: Path, out: Path, seed: int) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    r = subprocess.run([*FINRECIPE, "merge", str(cfg_path), str(out), "--overwrite", "-q", "--seed", str(seed)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]


class Defects:
    """The edits, each on TENSOR only; `base` is the base model's TENSOR, `donor` the (first) donor's."""

    def __init__(self, base: torch.Tensor, donor: torch.Tensor, flip: Callable[[torch.Tensor], int]):
        self.base, self.donor, self.flip = base, donor, flip
        self.where: dict[str, int] = {}  # flat index of the edited element, per defect

    def apply(self, defect: str, t: dict[str, torch.Tensor]) -> None:
        if defect.startswith("nudge"):
            k = int(defect[5])
            (self.nudge_kept if defect.endswith("-kept") else self.nudge)(t, k)
        elif defect == "tie-flip":
            self.where[defect] = self.flip(t[TENSOR])
        elif defect == "reset":
            self.reset(t)
        elif defect == "scaled":
            self.scaled(t)
        elif defect in ("dropped", "dropped-rescaled"):
            self.dropped(t, rescale=defect == "dropped-rescaled")
        else:
            raise ValueError(defect)

    def nudge(self, t: dict[str, torch.Tensor], k: int) -> None:
        """The element of median magnitude (an ordinary one, far above the exact rule's 2^-20 floor)."""
        x = t[TENSOR].reshape(-1)
        i = int(torch.argsort(x.double().abs())[x.numel() // 2])
        x[i] = toward_zero(x[i], k)
        self.where[f"nudge{k}"] = i

    def _most_moved(self, x: torch.Tensor) -> int:
        """The element ties moved furthest from the base: both donors' |delta| are among the largest,
        far from the kept/dropped boundary of the top-k sort, so no tie can explain a change there."""
        return int(torch.argmax((x.double() - self.base.reshape(-1).double()).abs()))

    def reset(self, t: dict[str, torch.Tensor]) -> None:
        x = t[TENSOR].reshape(-1)
        i = self._most_moved(x)
        b = self.base.reshape(-1)[i].to(x.dtype)
        assert abs(float(x[i]) - float(b)) > 4 * bf16_ulp(float(x[i])), (float(x[i]), float(b))
        x[i] = b
        self.where["reset"] = i

    def nudge_kept(self, t: dict[str, torch.Tensor], k: int) -> None:
        x = t[TENSOR].reshape(-1)
        i = self._most_moved(x)
        x[i] = toward_zero(x[i], k)
        self.where[f"nudge{k}-kept"] = i

    def scaled(self, t: dict[str, torch.Tensor], factor: float = 1.05) -> None:
        x, b = t[TENSOR], self.base.to(torch.float64)
        t[TENSOR] = (b + factor * (x.double() - b)).to(x.dtype)

    def dropped(self, t: dict[str, torch.Tensor], frac: float = 0.2, rescale: bool = False) -> None:
        """Another `frac` of the kept deltas set to the base value; with `rescale`, the survivors
        rescaled to the exact L1 factor of the new mask (so only the kept fraction is wrong)."""
        x = t[TENSOR]
        b = self.base.to(x.dtype)
        d = (self.donor.double() - self.base.double())
        kept = (x != b) & (d != 0)
        g = torch.Generator().manual_seed(20251203)
        drop = kept & (torch.rand(x.shape, generator=g) < frac)
        assert int(drop.sum()) > 0.15 * int(kept.sum()), (int(drop.sum()), int(kept.sum()))
        out = torch.where(drop, b, x)
        if rescale:
            survive = kept & ~drop
            ratio = float((d * kept).abs().sum() / (d * survive).abs().sum())  # new factor / old factor
            moved = (b.double() + (x.double() - b.double()) * ratio).to(x.dtype)
            out = torch.where(survive, moved, out)
        t[TENSOR] = out


@pytest.fixture(scope="module")
def verdicts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    check, matrix = parity_modules()
    CASES, instantiate = matrix.CASES, matrix.instantiate
    by_name = {c.name: c for c in CASES}
    work = tmp_path_factory.mktemp("parity-checker")
    models = work / "models"
    r = subprocess.run([sys.executable, "-c", BUILD, str(PARITY), str(models), FAMILY],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    variants = {v: str(models / FAMILY / v) for v in ("base", "instruct", "cpt", "far")}
    base = read(models / FAMILY / "base")[0][TENSOR]
    donor = read(models / FAMILY / "instruct")[0][TENSOR]

    jobs: dict[str, dict[str, Any]] = {}
    where: dict[str, dict[str, int]] = {}
    made: dict[tuple[str, str], Path] = {}
    for key, case_name, dtype, rule, ours in JOBS:
        case = by_name[case_name]
        assert case.rule == rule, (case_name, case.rule)
        d = work / "cases" / f"{case_name}-{dtype}"
        if (case_name, dtype) not in made:
            cfg = instantiate(case, dtype, variants)
            d.mkdir(parents=True)
            (d / "config.yml").write_text(json.dumps(cfg, indent=2))  # JSON is YAML
            merge(d / "config.yml", d / "seed0", 0)
            if rule == "random":
                merge(d / "config.yml", d / "seed1", 1)
            made[(case_name, dtype)] = d
        cfg = json.loads((d / "config.yml").read_text())
        fx = Defects(base, donor, functools.partial(tie_flip, check, cfg))
        src = d / ("seed1" if rule == "random" else "seed0")
        if ours == "same":
            target = d / "seed0"
        elif ours == "seed1":
            target = d / "seed1"
        else:
            target = edited_copy(src, work / "ours" / key, functools.partial(fx.apply, ours))
        jobs[key] = {"cfg": cfg, "rule": rule, "ours": str(target), "ref": str(d / "seed0")}
        where[key] = fx.where

    jobs_file, out_file = work / "jobs.json", work / "verdicts.json"
    jobs_file.write_text(json.dumps(jobs))
    env = dict(os.environ, **oracle_env())
    r = subprocess.run([sys.executable, "-c", CHECKER, str(PARITY), str(jobs_file), str(out_file)],
                       capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    got: dict[str, Any] = json.loads(out_file.read_text())
    got["where"] = where
    return got


def result(verdicts: dict[str, Any], key: str) -> tuple[dict[str, Any], str]:
    r = verdicts["results"][key]
    return r, f"{key}: {json.dumps(r)} (edited element {verdicts['where'][key]})"


def assert_pass(verdicts: dict[str, Any], key: str) -> dict[str, Any]:
    r, msg = result(verdicts, key)
    assert r["verdict"] == "pass", msg
    assert r["unexplained"] == 0 and r["detail"] == "", msg
    assert r["total"] > 500_000, msg
    return r


def assert_fail(verdicts: dict[str, Any], key: str, *, unexplained: bool = True) -> dict[str, Any]:
    r, msg = result(verdicts, key)
    assert r["verdict"] == "FAIL", msg
    if unexplained:
        assert r["unexplained"] >= 1, msg
    return r


def test_checker_ran_under_oracle_env(verdicts: dict[str, Any]) -> None:
    env = oracle_env()
    assert env.get("OMP_NUM_THREADS") == "1" and env.get("ATEN_CPU_CAPABILITY") == "default", env
    assert verdicts["threads"] == 1
    assert verdicts["capability"] == "DEFAULT"
    assert set(verdicts["results"]) == {j[0] for j in JOBS}


# -- exact ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["linear-f32-same", "linear-bf16-same", "task_arithmetic-bf16-same"])
def test_exact_identical_passes(verdicts: dict[str, Any], key: str) -> None:
    r = assert_pass(verdicts, key)
    assert r["differing"] == 0 and r["beyond"] == 0 and r["max_ulps"] == 0, r


@pytest.mark.parametrize("key", ["linear-f32-2ulp", "linear-bf16-2ulp", "task_arithmetic-f32-2ulp",
                                 "task_arithmetic-bf16-2ulp"])
def test_exact_two_ulps_fails(verdicts: dict[str, Any], key: str) -> None:
    r = assert_fail(verdicts, key)
    _, msg = result(verdicts, key)
    assert (r["differing"], r["beyond"], r["explained"], r["unexplained"]) == (1, 1, 0, 1), msg
    assert r["max_ulps"] == 2.0, msg


@pytest.mark.parametrize("key", ["linear-f32-1ulp", "task_arithmetic-bf16-1ulp"])
def test_exact_one_ulp_is_the_tolerance(verdicts: dict[str, Any], key: str) -> None:
    r = assert_pass(verdicts, key)
    _, msg = result(verdicts, key)
    assert (r["differing"], r["beyond"], r["max_ulps"]) == (1, 0, 1.0), msg


# -- topk -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["ties-f32-same", "ties-bf16-same"])
def test_topk_identical_passes(verdicts: dict[str, Any], key: str) -> None:
    r = assert_pass(verdicts, key)
    assert r["differing"] == 0 and r["beyond"] == 0, r


@pytest.mark.parametrize("key", ["ties-f32-tie-flip", "ties-bf16-tie-flip"])
def test_topk_flipped_tie_is_explained(verdicts: dict[str, Any], key: str) -> None:
    """The positive control: the same kind of one-element change as below, but at a proven tie."""
    r = assert_pass(verdicts, key)
    _, msg = result(verdicts, key)
    assert (r["differing"], r["beyond"], r["explained"], r["unexplained"]) == (1, 1, 1, 0), msg
    assert r["max_ulps"] > 2, msg


@pytest.mark.parametrize("key", ["ties-f32-reset", "ties-f32-4ulp", "ties-bf16-reset", "ties-bf16-4ulp"])
def test_topk_change_away_from_a_tie_fails(verdicts: dict[str, Any], key: str) -> None:
    r = assert_fail(verdicts, key)
    _, msg = result(verdicts, key)
    assert (r["differing"], r["beyond"], r["explained"], r["unexplained"]) == (1, 1, 0, 1), msg
    assert r["max_ulps"] >= 4, msg


# -- random -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["dare_linear-1-f32-seed1", "dare_linear-1-bf16-seed1", "dare_ties-2-f32-seed1"])
def test_random_other_seed_passes(verdicts: dict[str, Any], key: str) -> None:
    r = assert_pass(verdicts, key)
    _, msg = result(verdicts, key)
    assert r["differing"] > r["total"] // 4, msg  # the masks really differ
    assert r["explained"] == r["total"], msg
    assert all(abs(z) <= 5 for z in r["extra"]["z_model"]), msg


@pytest.mark.parametrize("key", ["dare_linear-1-f32-scaled", "dare_linear-1-bf16-scaled"])
def test_random_scaled_deltas_fail(verdicts: dict[str, Any], key: str) -> None:
    assert_fail(verdicts, key)


def test_random_scaled_deltas_fail_with_sign_election(verdicts: dict[str, Any]) -> None:
    # sign election hides some of a donor's masks; the factor is still bounded statistically (the hidden
    # entries' kept L1 within 5σ of Σ p·|d|), so 5% too large fails
    assert_fail(verdicts, "dare_ties-2-f32-scaled", unexplained=False)


@pytest.mark.parametrize("key", ["dare_linear-1-f32-dropped", "dare_linear-1-bf16-dropped", "dare_ties-2-f32-dropped"])
def test_random_extra_drops_fail(verdicts: dict[str, Any], key: str) -> None:
    r = assert_fail(verdicts, key, unexplained=False)
    _, msg = result(verdicts, key)
    assert "kept fraction outside binomial bounds" in r["detail"], msg
    assert r["extra"]["z_tensor_max"] > 10, msg


def test_random_extra_drops_with_consistent_rescale_fail(verdicts: dict[str, Any]) -> None:
    """Survivors rescaled to the new mask's exact L1 factor: every element is a valid keep-mask
    value, so only the binomial bound on the kept fraction can catch it."""
    r = assert_fail(verdicts, "dare_linear-1-f32-dropped-rescaled", unexplained=False)
    _, msg = result(verdicts, "dare_linear-1-f32-dropped-rescaled")
    assert r["unexplained"] == 0, msg
    assert "kept fraction outside binomial bounds" in r["detail"], msg
    assert r["extra"]["z_tensor_max"] > 10, msg


# -- topk on Mixtral's fused expert tensors ---------------------------------------------------------------------

MOE_CASE = "ties-nonorm-lambda-moe"
MOE_TENSOR = "model.layers.1.block_sparse_moe.experts.2.w3.weight"  # lands inside layers.1 mlp.experts.gate_up_proj

# ref: finrecipe's own output fused into mergekit's layout (check.to_fused_experts), so the checker takes the
# MoE path: finrecipe's values (per expert tensor) against per-expert selections, mergekit's (here the same
# values) against the fused selection. Identical outputs pass; an expert element moved 4 ulps fails.
MOE_CHECKER = r"""
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from safetensors.torch import save_file
from check import compare, load_dir, to_fused_experts
job = json.loads(Path(sys.argv[2]).read_text())
ref = Path(job["ref"])
ref.mkdir()
save_file({k: v.contiguous() for k, v in to_fused_experts(load_dir(Path(job["ours_same"]))).items()},
          str(ref / "model.safetensors"))
out = {k: compare(job["cfg"], "topk", Path(job[k]), ref).__dict__ for k in ("ours_same", "ours_nudged")}
out["fused"] = sorted(n for n in load_dir(ref) if "experts" in n)
Path(sys.argv[3]).write_text(json.dumps(out))
"""


@pytest.mark.parametrize("dtype", ["bf16"])
def test_topk_moe_layout_rule_fails_a_wrong_expert_value(tmp_path: Path, dtype: str) -> None:
    _, matrix = parity_modules()
    case = {c.name: c for c in matrix.CASES}[MOE_CASE]
    models = tmp_path / "models"
    r = subprocess.run([sys.executable, "-c", BUILD, str(PARITY), str(models), "mixtral"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = matrix.instantiate(case, dtype, {v: str(models / "mixtral" / v) for v in ("base", "instruct", "cpt", "far")})
    (tmp_path / "config.yml").write_text(json.dumps(cfg, indent=2))
    merge(tmp_path / "config.yml", tmp_path / "same", 0)

    def nudge(t: dict[str, torch.Tensor]) -> None:
        base = read(models / "mixtral" / "base")[0][MOE_TENSOR].reshape(-1)
        x = t[MOE_TENSOR].reshape(-1)
        i = int(torch.argmax((x.double() - base.double()).abs()))  # moved furthest: far from any tie
        x[i] = toward_zero(x[i], 4)

    edited_copy(tmp_path / "same", tmp_path / "nudged", nudge)
    job = {"cfg": cfg, "ours_same": str(tmp_path / "same"), "ours_nudged": str(tmp_path / "nudged"),
           "ref": str(tmp_path / "ref")}
    (tmp_path / "job.json").write_text(json.dumps(job))
    r = subprocess.run([sys.executable, "-c", MOE_CHECKER, str(PARITY), str(tmp_path / "job.json"),
                        str(tmp_path / "out.json")], capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, **oracle_env()))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    got = json.loads((tmp_path / "out.json").read_text())
    assert any(n.endswith("mlp.experts.gate_up_proj") for n in got["fused"]), got["fused"]
    same, nudged = got["ours_same"], got["ours_nudged"]
    assert same["verdict"] == "pass" and same["differing"] == 0, same
    assert nudged["verdict"] == "FAIL", nudged
    assert (nudged["differing"], nudged["beyond"], nudged["unexplained"]) == (1, 1, 1), nudged


def test_importing_run_leaves_the_environment_alone() -> None:
    """run.py sets CHECKER_ENV only as the program: a process that imports it (test_merge_tokenizer,
    bench_merge.py) must keep its environment, which its child processes inherit (a leaked
    ATEN_CPU_CAPABILITY=default once changed the losses of test_train's subprocess)."""
    probe = ("import json, os, sys; sys.path.insert(0, sys.argv[1]); before = dict(os.environ); import run; "
             "print(json.dumps({k: (before.get(k), os.environ.get(k)) for k in set(before) | set(os.environ) "
             "if before.get(k) != os.environ.get(k)}))")
    env = {k: v for k, v in os.environ.items() if k not in oracle_env()}
    r = subprocess.run([sys.executable, "-c", probe, str(PARITY)], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == {}
