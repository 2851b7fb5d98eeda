"""torchrun entry point: ``python -m torch.distributed.run ... -m finrecipe.train.launch SPEC.json``.

Every worker reads the same run spec (finrecipe.train.config.RunSpec) and runs the trainer; rank 0
writes metrics, checkpoints' metadata and the model. Exit codes: 0 done, 1 failed, 2 bad input.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from finrecipe.errors import FinrecipeError
    from finrecipe.train.config import RunSpec
    from finrecipe.train.runner import die_with_parent, hold_worker_lock, io_errors
    from finrecipe.train.trainer import train

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.stderr.write("usage: python -m finrecipe.train.launch RUN_SPEC.json\n")
        return 2
    # torchrun starts workers in sessions of their own: tie each to torchrun's life, and hold the
    # run's worker lock until exit so that a new launch waits for any survivor.
    die_with_parent()
    hold_worker_lock(Path(args[0]).parent, int(os.environ.get("GROUP_RANK", "0")))  # torchrun: node rank
    rank = int(os.environ.get("RANK", "0"))
    # Only rank 0 logs progress; the others report warnings and errors.
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s %(name)s rank{rank}: %(message)s")
    try:
        with io_errors():
            spec = RunSpec.model_validate_json(Path(args[0]).read_text())
            train(spec)
    except FinrecipeError as e:
        sys.stderr.write(f"error: {e}\n")
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
