"""Training never silently wrong and never a traceback: non-finite loss stops the stage naming the
step, metrics stay JSON, a full disk is a one-line IoError, remote code only when the ModelRef
allows it, progress lines for logs."""

from __future__ import annotations

import errno
import io
import json
import subprocess
import sys
import textwrap
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from finrecipe.errors import StageError

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from conftest import counting_corpus  # noqa: E402
from test_train import BASE_CFG, _run  # noqa: E402


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return counting_corpus(tmp_path_factory.mktemp("corpus") / "corpus.jsonl")


def _strict_json_lines(path: Path) -> list[dict[str, Any]]:
    def bad(c: str) -> Any:
        raise AssertionError(f"{path}: {c} is not JSON")

    return [json.loads(ln, parse_constant=bad) for ln in path.read_text().splitlines()]


def test_non_finite_loss_stops_naming_the_step(tiny_model: Callable[..., Path], corpus: Path,
                                               tmp_path: Path) -> None:
    cfg = {**BASE_CFG, "max_tokens": 32 * 4 * 4, "checkpoint_every_steps": 1,
           "optimizer": {"lr": 1e300}}
    out = tmp_path / "out"
    with pytest.raises(StageError, match=r"step 2 of 4: the training loss is nan \(not finite\); .*"
                                         r"last good checkpoint stays in .*Lower optimizer.lr") as ei:
        _run("continual_pretraining", cfg, tiny_model("llama"), corpus, out, tmp_path / "cache")
    assert "\n" not in str(ei.value)
    assert not (out / "model").exists() and not (out / "work" / "result.json").exists()
    assert [p.name for p in (out / "work" / "ckpt").iterdir()] == ["step-1"]  # the last good one
    assert [r["step"] for r in _strict_json_lines(out / "metrics.jsonl")] == [1]


def test_metrics_log_writes_null_for_non_finite(tmp_path: Path) -> None:
    from finrecipe.train.metrics import MetricsLog, read_metrics

    m = MetricsLog(tmp_path / "metrics.jsonl")
    m.write({"step": 1, "loss": float("nan"), "tokens_per_s": float("inf"), "lr": 0.1})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "lo')  # a line cut short by a kill
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": None, "tokens_per_s": None,
                                                          "lr": 0.1}]
    m.truncate_after(1)
    assert _strict_json_lines(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": None,
                                                                "tokens_per_s": None, "lr": 0.1}]


def test_disk_full_during_training_is_one_line_io_error(tiny_model: Callable[..., Path], corpus: Path,
                                                        tmp_path: Path) -> None:
    """Files are capped below a checkpoint's size (RLIMIT_FSIZE: writes fail like on a full disk)."""
    cfg = {**BASE_CFG, "max_tokens": 32 * 4 * 4, "checkpoint_every_steps": 2}
    script = textwrap.dedent(f"""
        import json, resource, signal, sys
        sys.path.insert(0, {str(REPO / 'tests')!r})
        from pathlib import Path
        from test_train import _run
        from finrecipe.errors import FinrecipeError
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))
        try:
            _run("continual_pretraining", json.loads({json.dumps(cfg)!r}), Path({str(tiny_model('llama'))!r}),
                 Path({str(corpus)!r}), Path({str(tmp_path / 'out')!r}), Path({str(tmp_path / 'cache')!r}))
        except FinrecipeError as e:
            sys.stderr.write(f"{{type(e).__name__}}: {{e}}\\n")
            sys.exit(e.exit_code)
    """)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    errs = [ln for ln in p.stderr.splitlines() if "Error" in ln or "Traceback" in ln]
    assert p.returncode == 1, p.stderr[-3000:]
    assert len(errs) == 1 and errs[0].startswith("IoError: "), p.stderr[-3000:]
    assert "model-rank0.safetensors" in errs[0] and "File too large" in errs[0]
    assert "free disk space" in errs[0]
    assert not (tmp_path / "out" / "work" / "ckpt" / "step-2").exists()


def test_disk_full_while_tokenizing_is_one_line_io_error(tiny_model: Callable[..., Path], corpus: Path,
                                                         tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import json, resource, signal, sys
        sys.path.insert(0, {str(REPO / 'tests')!r})
        from pathlib import Path
        from test_train import _run, BASE_CFG
        from finrecipe.errors import FinrecipeError
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))
        try:
            _run("continual_pretraining", BASE_CFG, Path({str(tiny_model('llama'))!r}), Path({str(corpus)!r}),
                 Path({str(tmp_path / 'out')!r}), Path({str(tmp_path / 'cache')!r}))
        except FinrecipeError as e:
            sys.stderr.write(f"{{type(e).__name__}}: {{e}}\\n")
            sys.exit(e.exit_code)
    """)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    errs = [ln for ln in p.stderr.splitlines() if "Error" in ln or "Traceback" in ln]
    assert p.returncode == 1, p.stderr[-3000:]
    assert len(errs) == 1 and errs[0].startswith("IoError: "), p.stderr[-3000:]
    assert "tokens.bin: File too large; free disk space" in errs[0]
    assert not list((tmp_path / "cache" / "tokens").iterdir())  # the partial shard is gone


def test_os_errors_read_as_one_line() -> None:
    from finrecipe.train.runner import describe_os_error

    e = OSError(errno.EROFS, "Read-only file system", "/data/out/metrics.jsonl")
    assert describe_os_error(e) == ("/data/out/metrics.jsonl: Read-only file system; make it writable or "
                                    "choose a writable workdir")
    e = OSError(errno.ENOSPC, "No space left on device", "/data/ckpt")
    assert describe_os_error(e).endswith("free disk space (or raise the quota) and run again to resume")


def test_remote_code_runs_only_when_the_model_ref_allows_it(tiny_model: Callable[..., Path],
                                                            corpus: Path, tmp_path: Path) -> None:
    """The tokenizer load follows ModelRef.trust_remote_code and nothing else."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model("llama"), model)
    mark = tmp_path / "REMOTE_CODE_RAN"
    (model / "custom_tok.py").write_text(
        f"import pathlib\npathlib.Path({str(mark)!r}).touch()\nraise ValueError('remote code ran')\n")
    tc = json.loads((model / "tokenizer_config.json").read_text())
    tc["auto_map"] = {"AutoTokenizer": [None, "custom_tok.CustomTok"]}
    tc.pop("tokenizer_class", None)
    (model / "tokenizer_config.json").write_text(json.dumps(tc))
    cfg = {**BASE_CFG, "max_tokens": 32 * 4}
    script = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(REPO / 'tests')!r})
        from pathlib import Path
        from finrecipe.errors import FinrecipeError
        from finrecipe.stages.base import get_kind
        from finrecipe.types import DatasetRef, ModelRef, StageContext
        k = get_kind("continual_pretraining")
        trust = sys.argv[1] == "1"
        inputs = {{"base": ModelRef("base", Path({str(model)!r}), trust_remote_code=trust),
                   "corpus": DatasetRef("corpus", (Path({str(corpus)!r}),), "jsonl")}}
        out = Path({str(tmp_path)!r}) / ("out" + sys.argv[1])
        ctx = StageContext(node="n", workdir=out.parent, cache_dir=out.parent / "cache")
        try:
            k.run(k.Config.model_validate(json.loads({json.dumps(cfg)!r})), inputs, out, ctx)
        except FinrecipeError as e:
            print(e)
    """)
    env = {"HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1",
           "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    subprocess.run([sys.executable, "-c", script, "0"], capture_output=True, text=True, timeout=300, env=env)
    assert not mark.exists()
    p = subprocess.run([sys.executable, "-c", script, "1"], capture_output=True, text=True, timeout=300, env=env)
    assert mark.exists(), p.stdout + p.stderr[-2000:]
    assert "cannot load the tokenizer" in p.stdout


def test_run_spec_carries_trust_from_the_model_ref() -> None:
    from finrecipe.train.config import RunSpec

    assert RunSpec(config={}, model_dir="m", out_dir="o", train_shards=[]).trust_remote_code is False


def test_log_progress_prints_timestamped_lines_at_an_interval() -> None:
    from finrecipe.progress_log import LogProgress

    t = [100.0]
    buf = io.StringIO()
    prog = LogProgress(buf, interval=30, clock=lambda: t[0],
                       now=lambda: datetime(2026, 12, 2, 10, 50, int(t[0]) % 60, tzinfo=timezone.utc))
    with prog.task("finance: continual pretraining", total=800, unit="step") as task:
        task.update(completed=100, info="loss 2.5000 lr 1.00e-03 12,000 tok/s")  # resumed at 100
        for step in range(101, 161):
            t[0] += 1.0
            task.update(completed=step, info=f"loss {3 - step / 100:.4f} lr 1.00e-03 12,000 tok/s")
    lines = buf.getvalue().splitlines()
    # the first update, then every 30 s (steps 130 and 160), and the end
    assert len(lines) == 4, lines
    assert lines[0] == ("2026-12-02T10:50:40Z finance: continual pretraining  step 100/800 (12%)  "
                        "loss 2.5000 lr 1.00e-03 12,000 tok/s")
    assert lines[1] == ("2026-12-02T10:50:10Z finance: continual pretraining  step 130/800 (16%)  "
                        "loss 1.7000 lr 1.00e-03 12,000 tok/s  ETA 11m10s")
    assert lines[-1].endswith("step 160/800 (20%)  loss 1.4000 lr 1.00e-03 12,000 tok/s  done in 1m00s")
