"""The `deepalign` entrypoint end to end: run dir, resume, secrets, help, completion, wheel install."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, STAGE_CODE, replace_stage

from deepalign import runner

FAKE_SECRETS = {
    "HF_TOKEN": "hf_fakeTokenValue0123456789",
    "OPENAI_API_KEY": "sk-fakeOpenAIKey0123456789",
    "WANDB_API_KEY": "fakeWandbKey0123456789abcdef0123456789ab",
}
TYPED_SECRETS = {  # on the command line only: a URL's user and password, a credential-named env_set
    "url_user": "urlUserName0123",
    "url_password": "urlPassw0rd0123456789",
    "env_set": "envSetToken0123456789",
}
SECRET_OVERRIDES = (
    f"logger.tags=[{FAKE_SECRETS['HF_TOKEN']}]",
    "judge=[keyword,rubric]",
    f"judge.rubric.base_url=http://{TYPED_SECRETS['url_user']}:{TYPED_SECRETS['url_password']}@llm.example.org/v1",
    f"++hydra.job.env_set.SERVICE_TOKEN={TYPED_SECRETS['env_set']}",
)


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
        *SECRET_OVERRIDES,
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
    secrets = {**FAKE_SECRETS, **TYPED_SECRETS}
    for path in [p for p in run_dir.rglob("*") if p.is_file()]:
        data = path.read_bytes()
        for name, value in secrets.items():
            assert value.encode() not in data, f"{name} leaked into {path.relative_to(run_dir)}"
    for value in secrets.values():
        assert value not in out.stdout + out.stderr
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["judge"]["rubric"]["base_url"] == "http://***REDACTED***@llm.example.org/v1"
    assert any(p.name.endswith(".wandb") for p in (run_dir / "wandb").rglob("*")), "W&B files were read"


def test_same_run_dir_again_skips_finished_stages(tiny_run):
    run_dir, _ = tiny_run
    before = json.loads((run_dir / "metrics.json").read_text())
    out = deepalign(
        "model=tiny",
        "logger=wandb",
        f"hydra.run.dir={run_dir}",
        *SECRET_OVERRIDES,
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
    assert "loss: constrained, kl_sft, sft" in out.stdout
    assert "losses (loss.name): sft, constrained, kl_sft" in out.stdout


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
    monkeypatch.setattr(runner, "start_tracker", lambda *a, **k: tracker)

    def broken_stage(ctx):
        raise RuntimeError("stage blew up")

    replace_stage(monkeypatch, "probe", broken_stage)
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
    before = runner.fingerprint(config)
    (tmp_path / "reference.pt").write_bytes(b"1")  # the cache folder is not an input
    assert runner.fingerprint(config) == before
    (folder / "model.safetensors").write_bytes(b"00")  # retrained at the same path
    assert runner.fingerprint(config) != before


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


def test_a_second_command_on_a_run_dir_in_use_fails_at_once_and_a_killed_one_leaves_no_lock(tmp_path):
    """Two identical commands in one run dir: the second stops, naming the first; the first's lock goes with
    its process, also when the process is killed."""
    from deepalign.rundir import lock_run_dir

    run_dir, started = tmp_path / "run", tmp_path / "started"
    args = ["model=tiny", "logger=none", f"hydra.run.dir={run_dir}"]
    holder_code = (
        "import pathlib, sys, time\nfrom deepalign import cli\n"
        "def stage(ctx):\n"
        f"    pathlib.Path({str(started)!r}).touch()\n"
        "    time.sleep(120)\n" + STAGE_CODE.format(name="probe", fn="stage") + "cli.main()\n"
    )
    env = {**os.environ, "WANDB_SILENT": "true"}
    holder = subprocess.Popen([sys.executable, "-c", holder_code, *args], cwd=tmp_path, env=env)
    try:
        deadline = time.time() + 120
        while not started.exists():
            assert holder.poll() is None and time.time() < deadline, (
                "the first command never started its stage"
            )
            time.sleep(0.2)
        out = deepalign(*args, cwd=tmp_path)
        assert out.returncode == 2, out.stderr[-3000:]
        assert re.search(
            rf"deepalign: run dir error: run dir {re.escape(str(run_dir))} is in use by another deepalign "
            rf"process \(pid {holder.pid} on \S+, started \d{{4}}-\d\d-\d\dT",
            out.stderr,
        ), out.stderr[-3000:]
        assert "loaded " not in out.stderr
    finally:
        holder.kill()
        holder.wait()
    with lock_run_dir(run_dir):  # the killed holder's lock is gone
        pass


def test_the_launcher_holds_the_run_dir_and_its_workers_do_not_wait_for_it(tmp_path, monkeypatch):
    from conftest import compose_config

    from deepalign import cli
    from deepalign.rundir import RunDirError, lock_run_dir

    run_dir, seen = tmp_path / "run", []
    cfg = compose_config(["model=tiny", "logger=none", "launcher=torchrun"])
    replace_stage(monkeypatch, "probe", lambda ctx: {"probe/x": 1.0})

    def workers(cfg, launcher, run_dir, run_name):  # what `python -m deepalign.worker` runs, in process
        with pytest.raises(RunDirError, match="in use by another deepalign process"), lock_run_dir(run_dir):
            pass
        seen.append(cli.run(cfg, run_dir, checked=True))
        return 0

    monkeypatch.setattr(runner, "launch", workers)
    cli.start_workers(cfg, run_dir, None)
    measured = {k: v for k, v in seen[0].items() if k.startswith(("time/", "memory/", "flops/"))}
    assert seen == [{"probe/x": 1.0, **measured}] and "time/probe_s" in measured
    with lock_run_dir(run_dir):  # released
        pass


@pytest.mark.parametrize(("interrupt", "code"), [(KeyboardInterrupt, 130), (runner.Terminated, 143)])
def test_ctrl_c_and_sigterm_finish_the_tracker_with_130_and_143(tmp_path, monkeypatch, interrupt, code):
    from conftest import compose_config

    from deepalign import cli

    tracker = RecordingTracker()
    monkeypatch.setattr(runner, "start_tracker", lambda *a, **k: tracker)

    def interrupted(ctx):
        raise interrupt

    replace_stage(monkeypatch, "probe", interrupted)
    with pytest.raises(interrupt):
        cli.run(compose_config(["model=tiny", "logger=none"]), tmp_path / "run")
    assert tracker.finished == [code]
    assert not (tmp_path / "run" / ".deepalign.lock.json").exists()


def test_sigterm_ends_the_run_as_ctrl_c_does(tmp_path):
    """SLURM preemption, `timeout`: the resume message on stderr and in the log, the lock released, the
    records of the finished stages kept (a rerun resumes from them), exit code 143."""
    from deepalign.rundir import lock_run_dir

    run_dir, started = tmp_path / "run", tmp_path / "started"
    args = ["model=tiny", "logger=none", "stages=[warmup,probe]", f"hydra.run.dir={run_dir}"]
    code = (
        "import pathlib, time\nfrom deepalign import cli\nfrom deepalign.plugins import register_stage\n"
        "@register_stage('warmup')\ndef warmup(ctx):\n    return {'warmup/x': 1.0}\n"
        "def stage(ctx):\n"
        f"    pathlib.Path({str(started)!r}).touch()\n"
        "    time.sleep(120)\n" + STAGE_CODE.format(name="probe", fn="stage") + "cli.main()\n"
    )
    env = {**os.environ, "WANDB_SILENT": "true"}
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 120
        while not started.exists():
            assert proc.poll() is None and time.time() < deadline, "the run never started its stage"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 143, stderr[-3000:]
    message = f"deepalign: interrupted; rerun the same command (same hydra.run.dir={run_dir}) to resume"
    assert stderr.endswith(message + "\n"), stderr[-3000:]
    assert "Traceback" not in stderr
    assert message in (run_dir / "deepalign.log").read_text()
    assert not (run_dir / ".deepalign.lock.json").exists()
    with lock_run_dir(run_dir):  # released
        pass
    assert json.loads((run_dir / "metrics.json").read_text())["warmup/x"] == 1.0
    assert list(json.loads((run_dir / "stages.json").read_text())) == ["warmup"]  # kept: resumed from


def test_a_directory_in_place_of_stages_json_stops_the_run_before_it_writes(tmp_path, monkeypatch):
    from conftest import compose_config

    from deepalign import cli
    from deepalign.rundir import RunDirError

    calls = []
    replace_stage(monkeypatch, "probe", lambda ctx: calls.append(1) or {"p": 1.0})
    run_dir = tmp_path / "run"
    (run_dir / "stages.json").mkdir(parents=True)
    with pytest.raises(RunDirError, match=r"stages\.json is a directory, not the file the run keeps there"):
        cli.run(compose_config(["model=tiny", "logger=none"]), run_dir)
    assert calls == [] and sorted(p.name for p in run_dir.iterdir()) == [".deepalign.lock", "stages.json"]


def test_damaged_stages_json_reruns_the_stages_and_damaged_metrics_json_stops(tmp_path, monkeypatch):
    from conftest import compose_config

    from deepalign import cli
    from deepalign.rundir import RunDirError

    calls = []
    replace_stage(monkeypatch, "probe", lambda ctx: calls.append(1) or {"p": 1.0})
    cfg, run_dir = compose_config(["model=tiny", "logger=none"]), tmp_path / "run"
    cli.run(cfg, run_dir)
    cli.run(cfg, run_dir)
    assert len(calls) == 1  # finished: skipped
    (run_dir / "stages.json").write_text('{"probe": "1234')  # cut short
    cli.run(cfg, run_dir)
    assert len(calls) == 2, "a damaged stages.json counts as nothing finished"
    assert [p.name.split("-")[0] for p in run_dir.glob("stages.json.corrupt-*")] == ["stages.json.corrupt"]
    assert json.loads((run_dir / "stages.json").read_text()).keys() == {"probe"}
    (run_dir / "metrics.json").write_text('{"p": 1.')
    with pytest.raises(
        RunDirError, match=r"metrics\.json is damaged, not valid JSON .*repair it, or move it"
    ):
        cli.run(cfg, run_dir)
    assert (run_dir / "metrics.json").read_text() == '{"p": 1.'
    assert len(calls) == 2
