"""Launching from the entrypoint: torchrun / accelerate / deepspeed workers on one resolved config and one
run dir, and data parallelism that trains exactly like gradient accumulation in one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import compose_config
from omegaconf import OmegaConf
from test_training import _free_port, write_chats

from deepalign.config import ConfigError, LauncherConfig, schema, validate
from deepalign.launch import launch_command, payload
from deepalign.worker import parse_args

FAKE_TOKEN = "hf_fakeLaunchToken0123456789"


# --- fast: validation, the launchers' command lines, the workers' config -----------------------------------


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["launcher.name=bogus"], "launcher.name"),
        (["launcher=torchrun", "launcher.nproc_per_node=0"], "launcher.nproc_per_node"),
        (["launcher=torchrun", "launcher.nnodes=2"], "launcher.master_addr"),
        (["launcher=torchrun", "launcher.nnodes=2", "launcher.node_rank=2"], "launcher.node_rank"),
        (["launcher=deepspeed", "launcher.nnodes=2", "launcher.master_addr=n0"], "launcher.name"),
        (["launcher.nproc_per_node=2"], "launcher.name"),  # local is one process
        (["launcher=torchrun", "stages=[quickstart]"], "launcher.name"),
        (["launcher=torchrun", "stages=[probe,train]"], "stages"),
    ],
)
def test_bad_launcher_settings_fail_at_validation_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=rf"^{key}"):
        validate(compose_config(["model=tiny", "logger=none", *overrides]))


def test_launcher_name_bogus_fails_from_the_command_line_before_any_worker_starts(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "deepalign", "model=tiny", "logger=none", "launcher.name=bogus"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert "launcher.name: 'bogus' is not one of local, torchrun, accelerate, deepspeed" in out.stderr


def _flags(cmd: list[str]) -> dict[str, str]:
    return dict(a.split("=", 1) for a in cmd if a.startswith("--") and "=" in a)


def test_torchrun_command_one_node_and_several():
    one = launch_command(LauncherConfig(name="torchrun", nproc_per_node=8), Path("runs/x"), python="py")
    assert one[:3] == ["py", "-m", "torch.distributed.run"]
    assert one[-3:] == ["-m", "deepalign.worker", "runs/x"]
    assert _flags(one) == {"--nproc-per-node": "8"} and "--standalone" in one  # torchrun finds a free port

    cfg = LauncherConfig(name="torchrun", nproc_per_node=4, nnodes=3, node_rank=2, master_addr="node0")
    many = launch_command(cfg, Path("runs/x"), python="py")
    assert "--standalone" not in many
    assert _flags(many) == {
        "--nproc-per-node": "4",
        "--nnodes": "3",
        "--node-rank": "2",
        "--master-addr": "node0",
        "--master-port": "29500",
    }
    cfg.master_port, cfg.extra_args = 6000, ["--max-restarts=1"]
    fixed = launch_command(cfg, Path("runs/x"), python="py")
    assert _flags(fixed)["--master-port"] == "6000" and fixed[-4] == "--max-restarts=1"


def test_accelerate_and_deepspeed_commands():
    cfg = LauncherConfig(name="accelerate", nproc_per_node=8, nnodes=2, node_rank=1, master_addr="10.0.0.1")
    acc = launch_command(cfg, Path("r"), python="py")
    assert acc[:3] == ["py", "-m", "accelerate.commands.launch"] and "--multi_gpu" in acc
    assert _flags(acc) == {
        "--num_processes": "16",  # accelerate counts all machines' processes
        "--num_machines": "2",
        "--machine_rank": "1",
        "--main_process_ip": "10.0.0.1",
        "--main_process_port": "29500",
    }
    single = launch_command(LauncherConfig(name="accelerate"), Path("r"), python="py")
    assert "--multi_gpu" not in single and _flags(single)["--main_process_port"] == "0"  # 0: a free port

    ds = launch_command(LauncherConfig(name="deepspeed", nproc_per_node=2), Path("r"), python="py")
    assert ds[:3] == ["py", "-m", "deepspeed.launcher.runner"]
    assert _flags(ds) == {"--num_gpus": "2", "--master_addr": "127.0.0.1", "--master_port": "29500"}
    assert ds[-3:] == ["--module", "deepalign.worker", "r"]
    with pytest.raises(ValueError, match="launcher.name"):
        launch_command(LauncherConfig(name="local"), Path("r"))


def test_worker_takes_the_local_rank_argument_of_the_deepspeed_launcher():
    assert parse_args(["--local_rank=1", "runs/x"]).run_dir == Path("runs/x")
    assert parse_args(["runs/x", "--local-rank", "3"]).run_dir == Path("runs/x")


def test_workers_rebuild_exactly_the_validated_config(tmp_path):
    chats = write_chats(tmp_path / "chats.jsonl")
    cfg = compose_config(
        [
            "model=tiny",
            "launcher=torchrun",
            "launcher.nproc_per_node=2",
            "loss=constrained",
            "data=chat_file",
            f"data.components.chat.source={chats}",
            f"logger.tags=[{FAKE_TOKEN}]",
        ]
    )
    sent = json.loads(payload(cfg, run_name="a=1"))
    assert sent["run_name"] == "a=1" and sent["argv"] == sys.argv
    assert sent["config"]["logger"]["tags"] == [FAKE_TOKEN], "workers get the real values (never on disk)"
    rebuilt = OmegaConf.merge(OmegaConf.structured(schema()), sent["config"])
    assert validate(rebuilt) == validate(cfg)
    assert "${" not in json.dumps(sent["config"]), "interpolations are resolved once, in the parent"


# --- slow: real multi-process runs on the CPU (gloo) -------------------------------------------------------

STEPS = 4


def _deepalign(cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true", **(env or {})}
    cmd = [sys.executable, "-m", "deepalign", *args]
    out = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    return out


def _train_args(chats: Path, loss: str, cache: Path) -> list[str]:
    """Global batch 4 per optimizer step: 2 processes x 2, or 1 process x 2 x accumulation 2."""
    return [
        "model=tiny",
        "logger=none",
        "data=chat_file",
        f"data.components.chat.source={chats}",
        "data.max_length=64",
        "train.per_device_batch_size=2",
        "train.optimizer.lr=1e-3",
        f"train.max_steps={STEPS}",
        f"loss={loss}",
        f"paths.cache_dir={cache}",
    ]


def _losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in rows if "train/loss" in r]


@pytest.fixture(scope="module")
def chats(tmp_path_factory) -> Path:
    return write_chats(tmp_path_factory.mktemp("launch") / "chats.jsonl")


@pytest.fixture(scope="module")
def one_process(chats, tmp_path_factory):
    """Per-step losses of the 1-process runs (accumulation 2, no DeepSpeed), by loss."""
    done: dict[str, list[float]] = {}

    def losses(loss: str) -> list[float]:
        if loss not in done:
            root = tmp_path_factory.mktemp(f"one-{loss}")
            args = [*_train_args(chats, loss, root / "cache"), "train.gradient_accumulation_steps=2"]
            _deepalign(root, *args, "stages=[train]", "hydra.run.dir=run")
            done[loss] = _losses(root / "run")
            assert len(done[loss]) == STEPS
        return done[loss]

    return losses


def _only_run_dir(root: Path) -> Path:
    """The run dir under root/out/runs/DATE/TIME, checking that it is the only one."""
    runs = [p for p in (root / "out" / "runs").glob("*/*") if p.is_dir()]
    assert len(runs) == 1, runs
    assert list(root.rglob(".hydra")) == [runs[0] / ".hydra"]
    configs = [p for p in root.rglob("config.yaml") if p.parent.name != ".hydra"]
    assert configs == [runs[0] / "config.yaml"], configs
    return runs[0]


@pytest.mark.parametrize("loss", ["sft", "constrained"])
def test_two_processes_with_zero2_train_like_one_with_accumulation(chats, tmp_path, one_process, loss):
    """torchrun, 2 ranks x batch 2, DeepSpeed ZeRO-2 (gloo) == 1 process x batch 2 x accumulation 2."""
    out = _deepalign(
        tmp_path,
        *_train_args(chats, loss, tmp_path / "cache"),  # a new cache: the ranks share one reference pass
        "launcher=torchrun",
        "launcher.nproc_per_node=2",
        "train.deepspeed=zero2",
        "stages=[train,probe]",
        "paths.output_dir=out",
        f"logger.tags=[{FAKE_TOKEN}]",
        env={"HF_TOKEN": FAKE_TOKEN},
    )
    run_dir = _only_run_dir(tmp_path)
    two = _losses(run_dir)
    one = one_process(loss)
    assert len(two) == STEPS
    assert max(abs(a - b) for a, b in zip(one, two)) < 1e-4, (one, two)
    assert two[-1] < two[0]

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train/steps"] == STEPS and metrics["probe/target_tokens"] > 0  # rank 0 evaluated
    assert json.loads((run_dir / "stages.json").read_text()).keys() == {"train", "probe"}
    launch = json.loads((run_dir / "launch.json").read_text())
    assert launch["world_size"] == 2 and "torch.distributed.run" in launch["command"]
    assert "launcher=torchrun" in json.loads((run_dir / "env.json").read_text())["argv"]  # the typed command
    assert (run_dir / "model" / "model.safetensors").is_file()
    assert "stage probe: done" in (run_dir / "deepalign.log").read_text()
    for path in [p for p in tmp_path.rglob("*") if p.is_file()]:
        assert FAKE_TOKEN.encode() not in path.read_bytes(), f"the secret leaked into {path}"
    assert FAKE_TOKEN not in out.stdout + out.stderr


@pytest.mark.parametrize(
    "launcher",
    [
        ["launcher=accelerate"],  # DDP (torch's gloo), through `accelerate launch --multi_gpu`
        ["launcher=deepspeed", "train.deepspeed=zero2"],  # the deepspeed runner appends --local_rank=N
    ],
    ids=["accelerate", "deepspeed"],
)
def test_accelerate_and_deepspeed_launchers_train_like_one_process(chats, tmp_path, one_process, launcher):
    _deepalign(
        tmp_path,
        *_train_args(chats, "sft", tmp_path / "cache"),
        *launcher,
        "launcher.nproc_per_node=2",
        f"launcher.master_port={_free_port()}",
        "stages=[train]",
        "paths.output_dir=out",
    )
    two = _losses(_only_run_dir(tmp_path))
    assert max(abs(a - b) for a, b in zip(one_process("sft"), two)) < 1e-4
