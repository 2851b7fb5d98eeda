"""Runs mergekit's own `mergekit-yaml` command for a list of jobs, in one process (mergekit's venv).

    .venv-mergekit/bin/python bench/parity/mk_driver.py JOBS.json RESULTS.json

JOBS.json: [{"config": PATH, "out": DIR, "seed": INT}, ...]. Each job calls the click command that the
`mergekit-yaml` console script calls, with the same arguments a user would pass; one process saves
importing torch and transformers once per job. RESULTS.json: [{"ok": bool, "error": str, "seconds": float}].
"""

from __future__ import annotations

import json
import sys
import time
import traceback

from mergekit.scripts.run_yaml import main as mergekit_yaml


def run(job: dict) -> dict:
    args = [job["config"], job["out"], "--quiet", "--no-write-model-card", "--random-seed", str(job.get("seed", 0))]
    if not job.get("copy_tokenizer"):  # tokenizer_cases.py: configs with a chat_template need the tokenizer
        args.insert(2, "--no-copy-tokenizer")
    t0 = time.perf_counter()
    try:
        mergekit_yaml.main(args, standalone_mode=False)
    except SystemExit as e:  # click exits on usage errors
        if e.code not in (0, None):
            return {"ok": False, "error": f"exit {e.code}", "seconds": time.perf_counter() - t0}
    except Exception as e:  # report mergekit's refusal, continue with the next job
        last = traceback.format_exception_only(type(e), e)[-1].strip()
        return {"ok": False, "error": last[:500], "seconds": time.perf_counter() - t0}
    return {"ok": True, "error": "", "seconds": time.perf_counter() - t0}


def main() -> None:
    jobs = json.load(open(sys.argv[1]))
    results = [run(j) for j in jobs]
    json.dump(results, open(sys.argv[2], "w"), indent=1)


if __name__ == "__main__":
    main()
