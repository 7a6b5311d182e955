"""The `deepalign` entrypoint end to end: run dir, resume, secrets, help, completion, wheel install."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO

FAKE_SECRETS = {
    "HF_TOKEN": "hf_fakeTokenValue0123456789",
    "OPENAI_API_KEY": "sk-fakeOpenAIKey0123456789",
    "WANDB_API_KEY": "fakeWandbKey0123456789abcdef0123456789ab",
}


def deepalign(*args: str, cwd: Path, env: dict[str, str] | None = None, module: bool = False):
    cmd = [sys.executable, "-m", "deepalign"] if module else [str(Path(sys.executable).parent / "deepalign")]
    full_env = {**os.environ, "WANDB_SILENT": "true", **(env or {})}
    full_env.pop("WANDB_MODE", None)
    return subprocess.run([*cmd, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One real run of the probe stage on the tiny model, W&B offline, with fake secrets around."""
    cwd = tmp_path_factory.mktemp("cli")
    run_dir = cwd / "run"
    out = deepalign(
        "model=tiny",
        "logger=wandb",
        f"hydra.run.dir={run_dir}",
        f"logger.tags=[{FAKE_SECRETS['HF_TOKEN']}]",
        cwd=cwd,
        env=FAKE_SECRETS,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return run_dir, out


def test_run_dir_has_config_env_log_metrics_and_artifacts(tiny_run):
    run_dir, _ = tiny_run
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["model"]["name"] == "tiny"
    assert "${" not in (run_dir / "config.yaml").read_text(), "the saved config must be resolved"
    env = json.loads((run_dir / "env.json").read_text())
    assert env["packages"]["torch"] and env["packages"]["transformers"].split(".")[0] >= "5"
    assert set(env["git"]) == {"commit", "dirty"}
    assert "stage probe: done" in (run_dir / "deepalign.log").read_text()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert all(isinstance(v, (int, float)) for v in metrics.values())
    # A random 3M-parameter model over a 49k vocabulary: NLL near log(49152) = 10.8 nats.
    assert 9.0 < metrics["probe/nll"] < 12.5
    assert metrics["probe/target_tokens"] > 100 and metrics["probe/generated_tokens"] > 0
    rows = [json.loads(line) for line in (run_dir / "generations" / "probe.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and {"id", "prompt", "response"} <= set(rows[0])
    assert (run_dir / ".hydra" / "config.yaml").exists()


def test_wandb_offline_run_is_in_the_run_dir(tiny_run):
    run_dir, _ = tiny_run
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    assert any(offline[0].rglob("*.wandb")), "the offline run has no data file"


def test_no_secret_in_any_artifact(tiny_run):
    run_dir, out = tiny_run
    for path in [p for p in run_dir.rglob("*") if p.is_file()]:
        data = path.read_bytes()
        for name, value in FAKE_SECRETS.items():
            assert value.encode() not in data, f"{name} leaked into {path.relative_to(run_dir)}"
    for value in FAKE_SECRETS.values():
        assert value not in out.stdout + out.stderr


def test_same_run_dir_again_skips_finished_stages(tiny_run):
    run_dir, _ = tiny_run
    before = json.loads((run_dir / "metrics.json").read_text())
    out = deepalign(
        "model=tiny",
        "logger=wandb",
        f"hydra.run.dir={run_dir}",
        f"logger.tags=[{FAKE_SECRETS['HF_TOKEN']}]",
        "logger.mode=disabled",
        cwd=run_dir.parent,
        env=FAKE_SECRETS,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "stage probe: already done" in (run_dir / "deepalign.log").read_text()
    assert json.loads((run_dir / "metrics.json").read_text()) == before


def test_bad_config_exits_with_the_key_named_and_no_results(tmp_path):
    out = deepalign(
        "model=tiny",
        "logger=none",
        "loss=constrained",
        "loss.beta.first=0",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert out.returncode == 2
    assert "loss.beta.first" in out.stderr
    assert not (tmp_path / "run" / "metrics.json").exists()
    out = deepalign("train.optimizer.lr=fast", f"hydra.run.dir={tmp_path / 'run2'}", cwd=tmp_path)
    assert out.returncode != 0 and "train.optimizer.lr" in out.stderr


def test_cfg_job_prints_the_composed_config_without_running(tmp_path):
    out = deepalign("--cfg", "job", "model=tiny", "loss=constrained", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    cfg = yaml.safe_load(out.stdout)
    assert cfg["model"]["name"] == "tiny" and cfg["loss"]["beta"]["prefix"] == 2.0
    assert not (tmp_path / "outputs").exists()


def test_help_lists_groups_and_python_m_works(tmp_path):
    out = deepalign("--help", cwd=tmp_path, module=True)
    assert out.returncode == 0, out.stderr
    assert "attack: decoding, gcg, none, prefill" in out.stdout
    assert "loss: constrained, sft" in out.stdout


def test_shell_completion(tmp_path):
    out = deepalign("--shell-completion", "install=bash", cwd=tmp_path)
    assert out.returncode == 0 and "complete" in out.stdout
    out = deepalign("--shell-completion", "query=bash", cwd=tmp_path, env={"COMP_LINE": "deepalign los"})
    assert "loss=" in out.stdout.split()


def test_wheel_ships_the_config_tree(tmp_path):
    """Installed as a wheel (not editable), the app still finds conf/ inside the package."""
    wheel_dir, target = tmp_path / "wheel", tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheel_dir), str(REPO)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    wheel = next(wheel_dir.glob("deepalign-*.whl"))
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    assert (target / "deepalign" / "conf" / "config.yaml").is_file()
    assert (target / "deepalign" / "conf" / "experiment" / "smoke.yaml").is_file()
    env = {"PYTHONPATH": str(target)}
    probe = subprocess.run(
        [sys.executable, "-c", "import deepalign; print(deepalign.__file__)"],
        cwd=tmp_path,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    assert probe.stdout.startswith(str(target))
    out = deepalign("--cfg", "job", "experiment=smoke", "model=tiny", cwd=tmp_path, env=env, module=True)
    assert out.returncode == 0, out.stderr
    assert yaml.safe_load(out.stdout)["model"]["name"] == "tiny"


class RecordingTracker:
    def __init__(self):
        self.logged, self.finished = [], []

    def log(self, metrics, step=None):
        self.logged.append(metrics)

    def summary(self, metrics):
        pass

    def finish(self, exit_code=0):
        self.finished.append(exit_code)


def test_tracker_is_finished_also_when_a_stage_fails(tmp_path, monkeypatch):
    from conftest import compose_config

    from deepalign import cli

    tracker = RecordingTracker()
    monkeypatch.setattr(cli, "start_tracker", lambda *a, **k: tracker)

    def broken_stage(ctx):
        raise RuntimeError("stage blew up")

    monkeypatch.setattr(cli, "_stage_registry", lambda: {"probe": broken_stage})
    with pytest.raises(RuntimeError, match="stage blew up"):
        cli.run(compose_config(["model=tiny"]), tmp_path / "run")
    assert tracker.finished == [1]
    assert (tmp_path / "run" / "config.yaml").exists() and not (tmp_path / "run" / "stages.json").exists()


def test_new_contents_of_a_named_file_or_model_folder_redo_the_stages(tmp_path):
    """Skipping finished stages compares the config *and* its inputs: the bytes of the local files it names
    and the state of the model folders it loads."""
    from conftest import compose_config

    from deepalign import cli

    chats = tmp_path / "chats.jsonl"
    chats.write_text(json.dumps({"prompt": "Say hi.", "response": "Hi!"}) + "\n")
    overrides = ["model=tiny", "logger=none", "stages=[probe]", f"probe.chats={chats}"]
    fingerprint = lambda: json.loads((tmp_path / "run" / "stages.json").read_text())["probe"]  # noqa: E731
    first = cli.run(compose_config(overrides), tmp_path / "run")
    fp = fingerprint()
    cli.run(compose_config(overrides), tmp_path / "run")
    assert fingerprint() == fp  # same config, same file: skipped
    chats.write_text(json.dumps({"prompt": "Say hi.", "response": "Hello there, friend!"}) + "\n")
    second = cli.run(compose_config(overrides), tmp_path / "run")
    assert fingerprint() != fp and second["probe/nll"] != first["probe/nll"]
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"0")
    config = {"model": {"path": str(folder)}, "paths": {"cache_dir": str(tmp_path)}}
    before = cli._fingerprint(config)
    (tmp_path / "reference.pt").write_bytes(b"1")  # the cache folder is not an input
    assert cli._fingerprint(config) == before
    (folder / "model.safetensors").write_bytes(b"00")  # retrained at the same path
    assert cli._fingerprint(config) != before


def test_checkpoints_of_another_config_are_moved_aside_not_resumed(tmp_path):
    from deepalign.training import fresh_checkpoints

    folder = tmp_path / "checkpoints"
    fresh_checkpoints(folder, "aaa")
    assert (folder / "fingerprint.txt").read_text().strip() == "aaa"
    (folder / "checkpoint-4").mkdir()
    fresh_checkpoints(folder, "aaa")  # the same config: kept for resuming
    assert (folder / "checkpoint-4").is_dir()
    fresh_checkpoints(folder, "bbb")
    assert not (folder / "checkpoint-4").exists()
    assert (tmp_path / "checkpoints-aaa" / "checkpoint-4").is_dir()
    assert (folder / "fingerprint.txt").read_text().strip() == "bbb"
