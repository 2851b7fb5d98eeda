"""Run a training spec: in this process, or under torchrun when the spec's config has `launch:`.

Importing this module is light; torch is imported when a run starts.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from finrecipe.errors import IoError, StageError
from finrecipe.progress import NullProgress, Progress
from finrecipe.train.config import LaunchConfig, RunSpec, TrainConfig
from finrecipe.util.fs import write_text_atomic

log = logging.getLogger("finrecipe.train")


_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_NOT_WRITABLE = {errno.EROFS, errno.EACCES, errno.EPERM}


def describe_os_error(e: OSError) -> str:
    """One line: the path, what went wrong, what to do."""
    where = e.filename or "training output"
    reason = e.strerror or str(e)
    if e.errno in _FULL:
        hint = "free disk space (or raise the quota) and run again to resume"
    elif e.errno in _NOT_WRITABLE:
        hint = "make it writable or choose a writable workdir"
    else:
        hint = "check the path and run again"
    return f"{where}: {reason}; {hint}"


@contextlib.contextmanager
def io_errors() -> Iterator[None]:
    """Turn an OSError from file I/O (disk full, read-only destination...) into a one-line IoError."""
    try:
        yield
    except OSError as e:
        raise IoError(describe_os_error(e)) from None


def execute(spec: RunSpec, progress: Progress | None = None,
            logger: logging.Logger | None = None) -> dict[str, Any]:
    """Train (or resume) what `spec` describes; returns the run's final metrics."""
    progress = progress or NullProgress()
    cfg = TrainConfig.model_validate(spec.config)
    with io_errors():
        (Path(spec.out_dir) / "work").mkdir(parents=True, exist_ok=True)
        if cfg.launch is None:
            from finrecipe.train.trainer import train

            return train(spec, progress)
        return _torchrun(cfg.launch, spec, progress, logger or log)


def torchrun_command(la: LaunchConfig, spec_path: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run",
            f"--nproc_per_node={la.nproc_per_node}", f"--nnodes={la.nnodes}", f"--node_rank={la.node_rank}",
            f"--master_addr={la.master_addr}", f"--master_port={la.master_port}",
            "-m", "finrecipe.train.launch", str(spec_path)]


# How long a new launch waits for the workers of an earlier one (killed with their launcher) to go.
ORPHAN_WAIT_S = 60.0
PR_SET_PDEATHSIG = 1


def die_with_parent(expected_parent: int | None = None) -> None:
    """Linux: this process gets SIGKILL when its parent exits (prctl PR_SET_PDEATHSIG). If the
    parent is already gone (or is not `expected_parent`), exit at once."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent or parent == 1 or (expected_parent is not None and parent != expected_parent):
        os._exit(1)


def worker_lock_path(work: Path, node_rank: int) -> Path:
    """One lock per node: on shared storage, the workers of the other nodes of the same run are
    not survivors of an earlier launch."""
    return work / f"workers-node{node_rank}.lock"


def hold_worker_lock(work: Path, node_rank: int) -> int:
    """Called by every worker: a shared lock on its node's worker lock, held until it exits."""
    import fcntl

    fd = os.open(worker_lock_path(work, node_rank), os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_SH)
    return fd


def _wait_for_orphans(work: Path, node_rank: int, logger: logging.Logger) -> None:
    """Wait until no worker of an earlier launch on this node holds the node's worker lock."""
    import fcntl

    lock = worker_lock_path(work, node_rank)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + ORPHAN_WAIT_S
        warned = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(fd, fcntl.LOCK_UN)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise StageError(
                        f"{work}: training workers of an earlier launch are still running (they hold "
                        f"{lock}); stop them (e.g. `fuser -k {lock}`) and run again") from None
                if not warned:
                    logger.warning("%s: waiting for the workers of an earlier launch to exit", work)
                    warned = True
                time.sleep(0.2)
    finally:
        os.close(fd)


def _torchrun(la: LaunchConfig, spec: RunSpec, progress: Progress, logger: logging.Logger) -> dict[str, Any]:
    """torchrun as a child that dies with this process (and whose workers die with it): a SIGKILL
    of `finrecipe apply` leaves nothing training. SIGTERM and Ctrl-C are forwarded as SIGTERM
    (the workers checkpoint and stop)."""
    out_dir = Path(spec.out_dir)
    work = out_dir / "work"
    _wait_for_orphans(work, la.node_rank, logger)
    spec_path = work / "launch.json"
    write_text_atomic(spec_path, spec.model_dump_json(indent=1))
    log_path = work / "torchrun.log"
    metrics_path = out_dir / "metrics.jsonl"
    plan_path = work / "plan.json"
    plan_path.unlink(missing_ok=True)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["FINRECIPE_LAUNCHER_PID"] = str(os.getpid())
    cmd = torchrun_command(la, spec_path)
    logger.info("launching: %s", " ".join(cmd))
    me = os.getpid()
    with open(log_path, "ab") as logf:
        # torchrun gets its own session (Ctrl-C in a terminal reaches this process, which forwards
        # it) but dies with this process; each worker dies with torchrun (finrecipe.train.launch).
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                preexec_fn=lambda: die_with_parent(me))
        old = None

        def forward(signum: int, frame: Any) -> None:  # torchrun passes SIGTERM on to the workers
            proc.send_signal(signal.SIGTERM)

        try:
            old = signal.signal(signal.SIGTERM, forward)
        except ValueError:  # not the main thread
            old = None
        try:
            with progress.task(spec.title, total=None, unit="step") as task:
                follow = _Follow(metrics_path)
                total = None
                while True:
                    rc = proc.poll()
                    if total is None and plan_path.is_file():
                        with contextlib.suppress(OSError, ValueError):
                            total = int(json.loads(plan_path.read_text())["total_steps"])
                            task.update(total=total)
                    for rec in follow.new_records():
                        task.update(completed=rec.get("step", 0), info=_info(rec))
                    if rc is not None:
                        break
                    time.sleep(0.5)
        except BaseException:
            proc.send_signal(signal.SIGTERM)
            proc.wait()
            raise
        finally:
            if old is not None:
                signal.signal(signal.SIGTERM, old)
    if rc != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-25:]
        errs = [ln for ln in tail if ln.startswith("error: ")]
        msg = errs[-1][len("error: "):] if errs else "\n".join(tail)
        raise StageError(f"torchrun exited with code {rc} (log: {log_path}): {msg}")
    res = work / "result.json"
    if not res.is_file():
        raise StageError(f"torchrun finished but wrote no {res}; see {log_path}")
    return dict(json.loads(res.read_text()))


class _Follow:
    """The records appended to a metrics.jsonl since the last call (reads only what is new; starts
    over when the file was rewritten shorter, as a resume does)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.pos = 0

    def new_records(self) -> list[dict[str, Any]]:
        try:
            size = self.path.stat().st_size
            if size < self.pos:
                self.pos = 0
            with open(self.path, "rb") as f:
                f.seek(self.pos)
                data = f.read()
        except OSError:
            return []
        out = []
        end = data.rfind(b"\n") + 1  # a line still being written waits for the next call
        for ln in data[:end].splitlines():
            try:
                rec = json.loads(ln)
            except ValueError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
        self.pos += end
        return out


def _info(rec: dict[str, Any]) -> str | None:
    if not isinstance(rec.get("loss"), (int, float)):
        return None
    info = f"loss {rec['loss']:.4f}"
    if isinstance(rec.get("lr"), (int, float)):
        info += f" lr {rec['lr']:.2e}"
    if isinstance(rec.get("tokens_per_s"), (int, float)):
        info += f" {rec['tokens_per_s']:,.0f} tok/s"
    if isinstance(rec.get("probe_bits_per_byte"), (int, float)):
        info += f" · probe {rec['probe_bits_per_byte']:.4f} bpb"
        if isinstance(rec.get("probe_agreement"), (int, float)):
            info += f" agr {rec['probe_agreement']:.3f}"
        info += f" (best @{rec.get('probe_best_step')})"
    return info
