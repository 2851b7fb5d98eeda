"""Profile the Rust merge core alone on a model trio (no YAML, no mergekit).

usage: python bench/core_profile.py TRIO_DIR [--method ties] [--threads 0] [--chunk 1048576] [--repeat 3]

TRIO_DIR holds base/, instruct/, cpt/ as written by ../shared/tools/make_models.py. Every tensor
is merged with the chosen method (weights 1, density 0.5 where used) to BF16. Prints wall time,
process CPU time and the peak anonymous memory (RssAnon, sampled every 20 ms: mmapped file pages
are not anonymous, so this is the memory the merge itself allocates).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import tempfile
import threading
import time

from finrecipe import _core

SOURCE_PARAMS: dict[str, dict[str, object]] = {
    "linear": {"weight": 0.5},
    "task_arithmetic": {"weight": 1.0},
    "ties": {"weight": 1.0, "density": 0.5},
    "dare_linear": {"weight": 1.0, "density": 0.5},
    "dare_ties": {"weight": 1.0, "density": 0.5},
    "breadcrumbs": {"weight": 1.0, "density": 0.5, "gamma": 0.01},
    "breadcrumbs_ties": {"weight": 1.0, "density": 0.5, "gamma": 0.01},
    "model_stock": {},
}
TENSOR_PARAMS: dict[str, dict[str, object]] = {
    "linear": {"normalize": True},
    "task_arithmetic": {"lambda": 1.0, "normalize": False},
    "ties": {"lambda": 1.0, "normalize": True},
    "dare_linear": {"lambda": 1.0, "normalize": False, "rescale": True},
    "dare_ties": {"lambda": 1.0, "normalize": True, "rescale": True},
    "breadcrumbs": {"lambda": 1.0, "normalize": False},
    "breadcrumbs_ties": {"lambda": 1.0, "normalize": True},
    "model_stock": {"filter_wise": False},
}


def rss_anon_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon"):
                return int(line.split()[1])
    return 0


def run_once(trio: str, method: str, threads: int, chunk: int) -> tuple[float, float, int]:
    models = [os.path.join(trio, n) for n in ("base", "instruct", "cpt")]
    names = list(_core.read_model(models[0])["tensors"])
    sp, tp = SOURCE_PARAMS[method], TENSOR_PARAMS[method]
    out = tempfile.mkdtemp(prefix="core-profile-", dir=os.path.dirname(os.path.abspath(trio)))
    tensors = []
    for n in names:
        t: dict[str, object] = {"name": n, "method": method, "out_dtype": "BF16",
                                "sources": [{"model": i, "tensor": n, "params": sp} for i in (1, 2)],
                                "params": tp}
        if method != "linear":
            t["base"] = {"model": 0, "tensor": n}
        tensors.append(t)
    plan = json.dumps({"version": 1, "models": models, "out_dir": out, "out_shard_size": 5_000_000_000,
                       "threads": threads, "seed": 0, "chunk_elems": chunk,
                       "metadata": {"format": "pt"}, "tensors": tensors})
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss_anon_kb())
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    try:
        _core.merge(plan, None)
    finally:
        wall = time.perf_counter() - t0
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        stop.set()
        sampler.join()
        shutil.rmtree(out, ignore_errors=True)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    return wall, cpu, peak[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("trio")
    ap.add_argument("--method", default="ties", choices=sorted(SOURCE_PARAMS))
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--chunk", type=int, default=1 << 20)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    base_anon = rss_anon_kb()
    runs = [run_once(a.trio, a.method, a.threads, a.chunk) for _ in range(a.repeat)]
    walls = [r[0] for r in runs]
    print(json.dumps({
        "method": a.method,
        "wall_s": [round(w, 2) for w in walls],
        "median_wall_s": round(statistics.median(walls), 2),
        "median_cpu_s": round(statistics.median(r[1] for r in runs), 2),
        "peak_anon_mb": round(max(r[2] for r in runs) / 1024, 1),
        "anon_before_mb": round(base_anon / 1024, 1),
        "loadavg": os.getloadavg(),
    }))


if __name__ == "__main__":
    main()
