"""FLOP, MFU and metric logging, written down once.

Training FLOPs per token (PaLM appendix B convention, as torchtitan and llm-foundry use):

    flops/token = 6·N + 12·L·H·T

- N: parameters taking part in matmuls: all parameters minus the input embedding table (a lookup,
  no FLOPs); an untied lm_head counts (it is a matmul), a tied one too (its matmul still happens).
- 6 = 2 (multiply-add) × 3 (forward + backward, the backward costing twice the forward).
- 12·L·H·T: attention scores QKᵀ and the weighted sum AV, 2·2·H·T FLOPs per token and layer
  forward (H = hidden size = heads × head_dim, T = sequence length), × 3 for the backward; the
  causal mask is not halved, as in PaLM, so figures compare with published MFU.

MFU = flops/token × tokens/s ÷ (devices × peak bf16 dense FLOP/s of one device).
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

from finrecipe.util.fs import write_bytes_atomic, write_text_atomic

# Dense bf16 peak FLOP/s (no sparsity) per device, matched on the CUDA device name.
PEAK_BF16 = (
    ("H200", 989e12),
    ("H100", 989e12),  # SXM; the PCIe card is 756e12
    ("A100", 312e12),
)


def peak_flops(device_name: str | None) -> float | None:
    if not device_name:
        return None
    if "H100" in device_name and "PCIe" in device_name:
        return 756e12
    for key, val in PEAK_BF16:
        if key in device_name:
            return val
    return None


def model_flops_per_token(model: Any, seq_len: int) -> float:
    cfg = model.config
    n = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings()
    if emb is not None:
        n -= emb.weight.numel()
        if getattr(cfg, "tie_word_embeddings", False):
            n += emb.weight.numel()  # the tied lm_head matmul
    layers = getattr(cfg, "num_hidden_layers", 0)
    hidden = getattr(cfg, "hidden_size", 0)
    head_dim = getattr(cfg, "head_dim", None) or (hidden // max(getattr(cfg, "num_attention_heads", 1), 1))
    attn_width = head_dim * getattr(cfg, "num_attention_heads", 0) or hidden
    return 6.0 * n + 12.0 * layers * attn_width * seq_len


def mfu(flops_per_token: float, tokens_per_s: float, n_devices: int, peak: float | None) -> float | None:
    if peak is None or n_devices <= 0:
        return None
    return flops_per_token * tokens_per_s / (n_devices * peak)


class MetricsLog:
    """metrics.jsonl (one JSON object per line) plus TensorBoard when it is installed."""

    def __init__(self, path: Path, tb_dir: Path | None = None) -> None:
        self.path = path
        self._tb: Any = None
        if tb_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(tb_dir))
            except Exception:  # tensorboard not installed
                self._tb = None

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after ``step`` (they were computed after the last checkpoint)."""
        if not self.path.exists():
            return
        keep = [json.dumps(finite_or_null(r), allow_nan=False) for r in read_metrics(self.path)
                if r.get("step", 0) <= step]
        write_text_atomic(self.path, "".join(ln + "\n" for ln in keep))

    def write(self, rec: dict[str, Any]) -> None:
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(finite_or_null(rec), allow_nan=False) + "\n")
        except OSError as e:  # a failed write does not name its file
            raise OSError(e.errno, e.strerror, str(self.path)) from None
        if self._tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, rec["step"])

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def finite_or_null(rec: dict[str, Any]) -> dict[str, Any]:
    """The record with NaN and infinities replaced by null (they are not JSON)."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in rec.items()}


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl; a line cut short by a kill (the last one) is skipped."""
    if not path.exists():
        return []
    out = []
    for ln in path.read_text().splitlines():
        try:
            rec = json.loads(ln)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def plot_loss_curve(records: list[dict[str, Any]], dest: Path, title: str = "loss") -> None:
    """The loss curve; with merge-probe records (``probe_*`` keys), the probe curves beside it on
    the same step axis: the probed merge's domain bits per byte and its instruction agreement,
    the best probe marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tr = [(r["step"], r["loss"]) for r in records if "loss" in r]
    va = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    pr = [r for r in records if isinstance(r.get("probe_bits_per_byte"), (int, float))]
    if pr:
        fig, (ax, pax) = plt.subplots(1, 2, figsize=(11, 3.5), dpi=100)
    else:
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if tr:
        ax.plot(*zip(*tr, strict=True), label="train", lw=1)
    if va:
        ax.plot(*zip(*va, strict=True), "o-", label="validation", lw=1, ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    if pr:
        steps = [r["step"] for r in pr]
        pax.plot(steps, [r["probe_bits_per_byte"] for r in pr], "o-", color="C2", lw=1, ms=3,
                 label="probe: domain bits/byte")
        pax.set_xlabel("step")
        pax.set_ylabel("bits/byte (lower is better)")
        pax.set_xlim(ax.get_xlim())
        pax.grid(alpha=0.3)
        handles, labels = pax.get_legend_handles_labels()
        ag = [(r["step"], r["probe_agreement"]) for r in pr if isinstance(r.get("probe_agreement"), (int, float))]
        if ag:
            aax = pax.twinx()
            aax.plot(*zip(*ag, strict=True), "s--", color="C3", lw=1, ms=3, label="probe: instruction agreement")
            aax.set_ylabel("agreement (higher is better)")
            h2, l2 = aax.get_legend_handles_labels()
            handles, labels = handles + h2, labels + l2
        best = pr[-1].get("probe_best_step")
        if isinstance(best, int):
            pax.axvline(best, color="k", ls=":", lw=1)
            handles.append(pax.lines[-1])
            labels.append(f"best probe (step {best})")
        pax.set_title("merge probe: base + W·(instruct − base) + (θ_t − base)")
        pax.legend(handles, labels, fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    write_bytes_atomic(dest, buf.getvalue())
