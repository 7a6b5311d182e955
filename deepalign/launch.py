"""Multi-process runs from the one entrypoint: the parent resolves the config once, then torchrun,
accelerate or deepspeed starts `python -m deepalign.worker RUN_DIR` on every rank.

The resolved config travels to the workers in the environment (`DEEPALIGN_LAUNCH`, JSON), never in a
file: it may hold secrets typed on the command line, and the run dir keeps only redacted copies.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from deepalign.config import LauncherConfig
from deepalign.storage.atomic import write_json_atomic
from deepalign.storage.redaction import redact

log = logging.getLogger(__name__)

LAUNCH_ENV = "DEEPALIGN_LAUNCH"  # the workers' payload: resolved config, run name, the parent's argv
WORKER_MODULE = "deepalign.worker"
MAX_PAYLOAD = 120_000  # Linux caps one environment string at 128 KiB
DEFAULT_PORT = 29500  # node 0's rendezvous port of a multi-node run when launcher.master_port is unset


def process_rank() -> int:
    """This process's global rank (the RANK variable the launchers set; 0 when there is none)."""
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _master(cfg: LauncherConfig) -> tuple[str, int | None]:
    addr = cfg.master_addr or "127.0.0.1"
    port = cfg.master_port if cfg.master_port is not None or cfg.nnodes == 1 else DEFAULT_PORT
    return addr, port


def launch_command(cfg: LauncherConfig, run_dir: Path, python: str = sys.executable) -> list[str]:
    """The argv that starts this node's workers of `python -m deepalign.worker RUN_DIR`.

    One node without a port picks a free one (torchrun --standalone, accelerate port 0); several nodes
    meet at `master_addr:master_port` (static rendezvous, every node runs the same command with its
    `node_rank`).
    """
    addr, port = _master(cfg)
    worker = [WORKER_MODULE, str(run_dir)]
    if cfg.name == "torchrun":
        cmd = [python, "-m", "torch.distributed.run", f"--nproc-per-node={cfg.nproc_per_node}"]
        if cfg.nnodes == 1 and port is None:
            cmd.append("--standalone")
        else:
            cmd += [f"--nnodes={cfg.nnodes}", f"--node-rank={cfg.node_rank}"]
            cmd += [f"--master-addr={addr}", f"--master-port={port}"]
        return [*cmd, *cfg.extra_args, "-m", *worker]
    if cfg.name == "accelerate":
        total = cfg.nproc_per_node * cfg.nnodes
        cmd = [python, "-m", "accelerate.commands.launch", f"--num_processes={total}"]
        cmd += [f"--num_machines={cfg.nnodes}", f"--machine_rank={cfg.node_rank}"]
        cmd += [f"--main_process_ip={addr}", f"--main_process_port={port if port is not None else 0}"]
        if total > 1:
            cmd.append("--multi_gpu")  # torchrun under the hood; DeepSpeed comes from train.deepspeed
        return [*cmd, *cfg.extra_args, "-m", *worker]
    if cfg.name == "deepspeed":  # one node (validated): the deepspeed runner's multi-node path is ssh/pdsh
        cmd = [python, "-m", "deepspeed.launcher.runner", f"--num_gpus={cfg.nproc_per_node}"]
        cmd += [f"--master_addr={addr}", f"--master_port={port if port is not None else DEFAULT_PORT}"]
        return [*cmd, *cfg.extra_args, "--module", *worker]  # it appends --local_rank=N (the worker takes it)
    raise ValueError(f"launcher.name: {cfg.name!r} starts no workers")


def payload(cfg: DictConfig, run_name: str | None) -> str:
    """What every worker needs, as JSON: the resolved config (interpolations such as ${now:} and ${hydra:}
    fixed once here), the W&B run name, and the command line typed (for env.json)."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    return json.dumps({"config": resolved, "run_name": run_name, "argv": list(sys.argv)})


def read_payload() -> dict[str, Any]:
    """The payload the parent put in the environment (in a worker)."""
    text = os.environ.get(LAUNCH_ENV)
    if not text:
        raise SystemExit(f"deepalign.worker: no {LAUNCH_ENV} in the environment; start runs with `deepalign`")
    return json.loads(text)


def launch(cfg: DictConfig, launcher: LauncherConfig, run_dir: Path, run_name: str | None) -> int:
    """Start this node's workers on the validated `cfg` in `run_dir`; return their launcher's exit code."""
    cmd, sent = launch_command(launcher, run_dir), payload(cfg, run_name)
    size = len(sent.encode())
    if size > MAX_PAYLOAD:  # only a huge inline value (a chat template of 100 kB) gets here
        raise ValueError(f"the resolved config has {size} bytes; workers can get {MAX_PAYLOAD} at most")
    run_dir.mkdir(parents=True, exist_ok=True)
    if launcher.node_rank == 0:
        record = {
            "launcher": launcher.name,
            "nnodes": launcher.nnodes,
            "nproc_per_node": launcher.nproc_per_node,
            "world_size": launcher.nnodes * launcher.nproc_per_node,
            "command": cmd,
        }
        write_json_atomic(run_dir / "launch.json", redact(record))
    env = {**os.environ, LAUNCH_ENV: sent}
    log.info("starting %s workers: %s", launcher.name, " ".join(redact(cmd)))
    return subprocess.run(cmd, env=env).returncode


def end_process_group() -> None:
    """Wait for every rank (all saved), then leave the process group: training is over."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
