"""One rank of a launched run: `python -m deepalign.worker RUN_DIR`, started by torchrun, accelerate or
deepspeed from `deepalign launcher=...` (deepalign/launch.py), never by hand.

It reads the config the parent resolved (no Hydra composition here, so no second run dir and no
`.hydra/` race) and runs the same stage pipeline in the same run dir: every rank trains, rank 0 alone
records the run and runs the evaluation stages.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from omegaconf import OmegaConf

from deepalign.config import ConfigError, schema
from deepalign.data import DataError
from deepalign.launch import process_rank, read_payload
from deepalign.rundir import RunDirError
from deepalign.storage.redaction import redact, redact_logs

FORMAT = "[%(asctime)s][rank {rank}][%(name)s][%(levelname)s] - %(message)s"


def setup_logging(run_dir: Path, rank: int) -> None:
    """Rank 0 logs at INFO to stderr and appends to the run's deepalign.log; other ranks warn on stderr."""
    formatter = logging.Formatter(FORMAT.format(rank=rank))
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if rank == 0:
        handlers.append(logging.FileHandler(run_dir / "deepalign.log", mode="a"))
    for handler in handlers:
        handler.setFormatter(formatter)
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, handlers=handlers, force=True)
    redact_logs()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="deepalign.worker", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    # the deepspeed launcher (and torch.distributed.launch) append it; the rank comes from LOCAL_RANK
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rank = process_rank()
    setup_logging(args.run_dir, rank)
    launched = read_payload()
    # after logging is set up: the built-ins import the heavy libraries
    from deepalign.plugins import load_plugins
    from deepalign.runner import run

    load_plugins(launched["config"].get("plugins") or [])  # their stages' sections join the schema
    cfg = OmegaConf.merge(OmegaConf.structured(schema()), launched["config"])

    try:
        run(cfg, args.run_dir, run_name=launched["run_name"], argv=launched["argv"], checked=True)
    except (ConfigError, DataError, RunDirError) as err:
        print(redact(f"deepalign (rank {rank}): {type(err).__name__}: {err}"), file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:  # the parent, interrupted too, says how to resume
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
