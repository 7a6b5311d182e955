"""deepalign/rundir.py (metrics.json, env record, stages.json, the lock), deepalign/storage/redaction.py
(secrets), deepalign/storage/atomic.py (atomic files) and deepalign/tracking.py."""

from __future__ import annotations

import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import compose_config

from deepalign import rundir
from deepalign.config import LoggerConfig, validate
from deepalign.rundir import (
    MetricsFile,
    RunDirError,
    environment_record,
    git_commit,
    lock_run_dir,
    read_stage_state,
)
from deepalign.storage import atomic
from deepalign.storage.atomic import write_json_atomic, write_text_atomic
from deepalign.storage.redaction import (
    REDACTED,
    RedactingFilter,
    redact,
    scrub_file,
    scrub_files,
    scrub_run_dir,
    secret_values,
)
from deepalign.tracking import NullTracker, WandbTracker, start_tracker

FAKE = {
    "HF_TOKEN": "hf_fakeTOKEN123456",
    "OPENAI_API_KEY": "sk-fakeOPENAI987654321",
    "WANDB_API_KEY": "wbfakeWANDBKEY0000000000",
}


@pytest.fixture
def fake_secrets(monkeypatch) -> dict[str, str]:
    for name, value in FAKE.items():
        monkeypatch.setenv(name, value)
    return dict(FAKE)


def _leftovers(folder: Path, name: str) -> list[str]:
    """Temporary files that write_text_atomic would leave next to `name`."""
    return [p.name for p in folder.iterdir() if p.name != name and p.name.startswith(f".{name}.")]


def _files_containing(folder: Path, needles: list[str]) -> dict[str, list[str]]:
    """Every regular file under `folder` (symlinks not followed) whose bytes contain one of `needles`."""
    hits: dict[str, list[str]] = {}
    for root, _dirs, files in os.walk(folder):
        for name in files:
            path = Path(root) / name
            if path.is_symlink() or not path.is_file():
                continue
            data = path.read_bytes()
            found = [n for n in needles if n.encode() in data]
            if found:
                hits[str(path.relative_to(folder))] = found
    return hits


# ---------------------------------------------------------------- secrets


def test_secret_values_come_from_credential_named_variables(fake_secrets, monkeypatch):
    monkeypatch.setenv("DEEPALIGN_TEST_PLAIN", "not-a-secret-value")
    monkeypatch.setenv("DEEPALIGN_TEST_TOKEN", "abc")  # too short to be replaced everywhere
    monkeypatch.setenv("db_password", "hunter2hunter2")  # the name is matched case-insensitively
    values = secret_values()
    assert set(fake_secrets.values()) <= set(values)
    assert "hunter2hunter2" in values
    assert "not-a-secret-value" not in values
    assert "abc" not in values
    assert [len(v) for v in values] == sorted((len(v) for v in values), reverse=True)


def test_redact_nested_containers(fake_secrets):
    hf, openai, wandb_key = (
        fake_secrets["HF_TOKEN"],
        fake_secrets["OPENAI_API_KEY"],
        fake_secrets["WANDB_API_KEY"],
    )
    original = {
        "model": {"path": f"https://user:{hf}@example.org/repo", "name": "tiny", "seed": 3},
        "overrides": ["model=tiny", f"+extra={openai}", 7, None, {"deep": [wandb_key]}],
        "pair": ("plain", hf),
        "flag": True,
        "ratio": 0.5,
    }
    snapshot = json.dumps(original)
    clean = redact(original)
    assert clean == {
        "model": {"path": f"https://{REDACTED}@example.org/repo", "name": "tiny", "seed": 3},
        "overrides": ["model=tiny", f"+extra={REDACTED}", 7, None, {"deep": [REDACTED]}],
        "pair": ["plain", REDACTED],
        "flag": True,
        "ratio": 0.5,
    }
    assert json.dumps(original) == snapshot, "redact must not change its argument"
    for secret in fake_secrets.values():
        assert secret not in json.dumps(clean)


def test_redact_embedded_and_repeated(fake_secrets):
    hf = fake_secrets["HF_TOKEN"]
    assert redact(f"Bearer {hf}") == f"Bearer {REDACTED}"
    assert redact(f"{hf}{hf}x") == f"{REDACTED}{REDACTED}x"
    assert redact("nothing secret here") == "nothing secret here"


def test_redact_longest_secret_first(monkeypatch):
    monkeypatch.setenv("SHORT_TOKEN", "abcdef")
    monkeypatch.setenv("LONG_TOKEN", "abcdefghijkl")
    # the longer secret must not be left half-visible by replacing its prefix first
    assert redact("x=abcdefghijkl y=abcdef") == f"x={REDACTED} y={REDACTED}"


def test_redact_with_explicit_secrets_ignores_the_environment(fake_secrets):
    assert redact({"a": "one SECRETVALUE two"}, ["SECRETVALUE"]) == {"a": f"one {REDACTED} two"}
    assert redact(fake_secrets["HF_TOKEN"], []) == fake_secrets["HF_TOKEN"]


def test_redact_credential_named_keys(fake_secrets):
    clean = redact(
        {
            "api_key": "literal-key-not-in-env",
            "hf_token": "another-literal",
            "HF_TOKEN": "upper-case-key",
            "password": {"nested": "anything"},
            "rubric": {"api_key_env": "OPENAI_API_KEY", "model": "gpt-4o-2024-08-06", "apikey": "zzz"},
            "max_new_tokens": 128,
            "tokenizer": "HuggingFaceTB/SmolLM2-135M-Instruct",
            "unset_token": None,
        }
    )
    assert clean["api_key"] == REDACTED
    assert clean["hf_token"] == REDACTED
    assert clean["HF_TOKEN"] == REDACTED
    assert clean["password"] == REDACTED
    assert clean["rubric"] == {
        "api_key_env": "OPENAI_API_KEY",
        "model": "gpt-4o-2024-08-06",
        "apikey": REDACTED,
    }
    assert clean["max_new_tokens"] == 128
    assert clean["tokenizer"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert clean["unset_token"] is None


def test_redact_composed_config_keeps_the_api_key_variable_name(fake_secrets):
    from omegaconf import OmegaConf

    cfg = compose_config(["model=tiny", "judge=[keyword,rubric]", "logger=none"])
    resolved = redact(OmegaConf.to_container(cfg, resolve=True))
    assert resolved["judge"]["rubric"]["api_key_env"] == "OPENAI_API_KEY"
    assert resolved["model"]["name"] == "tiny"


# ---------------------------------------------------------------- atomic files


def test_write_text_atomic_writes_and_overwrites(tmp_path):
    path = tmp_path / "sub" / "dir" / "config.yaml"
    write_text_atomic(path, "a: 1\n")
    assert path.read_text() == "a: 1\n"
    write_text_atomic(path, "b: 2\n")
    assert path.read_text() == "b: 2\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["config.yaml"]


def test_write_json_atomic(tmp_path):
    path = tmp_path / "env.json"
    obj = {"b": [1, 2.5, None], "a": {"x": "y"}}
    write_json_atomic(path, obj)
    text = path.read_text()
    assert json.loads(text) == obj
    assert text.endswith("\n")
    assert text.index('"a"') < text.index('"b"'), "keys are sorted"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["env.json"]


def test_failed_replace_keeps_the_old_file_and_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    write_json_atomic(path, {"old": 1})
    old = path.read_bytes()

    def broken_replace(src, dst):
        raise OSError("disk on fire")

    monkeypatch.setattr(atomic.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk on fire"):
        write_json_atomic(path, {"new": 2})
    assert path.read_bytes() == old
    assert _leftovers(tmp_path, "metrics.json") == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_failed_write_keeps_the_old_file_and_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "config.yaml"
    write_text_atomic(path, "old: true\n")

    def broken_fsync(fd):
        raise OSError("fsync failed")

    monkeypatch.setattr(atomic.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="fsync failed"):
        write_text_atomic(path, "new: true\n")
    assert path.read_text() == "old: true\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


def test_unserialisable_json_keeps_the_old_file(tmp_path):
    path = tmp_path / "stages.json"
    write_json_atomic(path, {"probe": "abc"})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"probe": object()})
    assert json.loads(path.read_text()) == {"probe": "abc"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stages.json"]


# ---------------------------------------------------------------- metrics.json


def test_metrics_accumulate_across_instances(tmp_path):
    path = tmp_path / "metrics.json"
    first = MetricsFile(path)
    assert first.values == {}
    first.update({"probe/nll": 2.5, "time/probe_s": 1})
    assert json.loads(path.read_text()) == {"probe/nll": 2.5, "time/probe_s": 1}

    second = MetricsFile(path)
    assert second.values == {"probe/nll": 2.5, "time/probe_s": 1}
    second.update({"attack/asr": 0.25, "probe/nll": 2.0})
    third = MetricsFile(path)
    assert third.values == {"probe/nll": 2.0, "time/probe_s": 1, "attack/asr": 0.25}
    assert isinstance(third.values["time/probe_s"], int)


@pytest.mark.parametrize("bad", ["0.5", True, False, None, [1.0], {"x": 1}])
def test_metrics_reject_non_numbers(tmp_path, bad):
    path = tmp_path / "metrics.json"
    metrics = MetricsFile(path)
    metrics.update({"ok": 1.0})
    with pytest.raises(TypeError, match=r"metric 'probe/bad' must be a number"):
        metrics.update({"probe/bad": bad})
    assert json.loads(path.read_text()) == {"ok": 1.0}, "a rejected update writes nothing"
    assert "probe/bad" not in metrics.values


def test_metrics_non_finite_become_null_and_the_file_stays_strict_json(tmp_path):
    path = tmp_path / "metrics.json"
    metrics = MetricsFile(path)

    def strict_load() -> dict:
        def no_constants(name):
            raise ValueError(f"non-standard JSON constant {name}")

        return json.loads(path.read_text(), parse_constant=no_constants)

    metrics.update({"loss": float("nan")})
    assert strict_load() == {"loss": None}
    metrics.update({"grad_norm": math.inf, "neg": -math.inf})
    assert strict_load() == {"loss": None, "grad_norm": None, "neg": None}
    metrics.update({"loss": 0.75})
    assert strict_load() == {"loss": 0.75, "grad_norm": None, "neg": None}
    assert MetricsFile(path).values == {"loss": 0.75, "grad_norm": None, "neg": None}
    assert _leftovers(tmp_path, "metrics.json") == []


# ---------------------------------------------------------------- scrub_files


def test_scrub_files_replaces_secrets_in_yaml(tmp_path, fake_secrets):
    hydra_dir = tmp_path / ".hydra"
    hydra_dir.mkdir()
    hf, openai = fake_secrets["HF_TOKEN"], fake_secrets["OPENAI_API_KEY"]
    (hydra_dir / "overrides.yaml").write_text(f"- model=tiny\n- +model.hf_token={hf}\n")
    (hydra_dir / "config.yaml").write_text(
        f"judge:\n  note: key {openai} here\n  api_key_env: OPENAI_API_KEY\n"
    )
    clean_text = "model:\n  name: tiny\n"
    (hydra_dir / "hydra.yaml").write_text(clean_text)
    before = (hydra_dir / "hydra.yaml").stat().st_mtime_ns

    scrub_files(hydra_dir)

    assert (hydra_dir / "overrides.yaml").read_text() == f"- model=tiny\n- +model.hf_token={REDACTED}\n"
    assert (hydra_dir / "config.yaml").read_text() == (
        f"judge:\n  note: key {REDACTED} here\n  api_key_env: OPENAI_API_KEY\n"
    )
    assert (hydra_dir / "hydra.yaml").read_text() == clean_text
    assert (hydra_dir / "hydra.yaml").stat().st_mtime_ns == before, "a clean file is not rewritten"
    assert _files_containing(hydra_dir, list(fake_secrets.values())) == {}
    assert sorted(p.name for p in hydra_dir.iterdir()) == ["config.yaml", "hydra.yaml", "overrides.yaml"]


# ---------------------------------------------------------------- environment record


def test_environment_record(fake_secrets, monkeypatch):
    import torch
    import transformers

    monkeypatch.setattr(
        sys, "argv", ["deepalign", "model=tiny", f"+model.hf_token={fake_secrets['HF_TOKEN']}"]
    )
    record = environment_record()
    assert record["python"] == platform.python_version()
    assert record["platform"]
    packages = record["packages"]
    assert set(rundir.TRACKED_PACKAGES) == set(packages)
    assert torch.__version__.startswith(packages["torch"])  # a build tag (+cu130) is not in the metadata
    assert packages["transformers"] == transformers.__version__
    assert packages["deepalign"]
    assert set(record["git"]) == {"commit", "dirty"}
    commit = record["git"]["commit"]
    assert commit is None or re.fullmatch(r"[0-9a-f]{40}", commit)
    assert (record["git"]["dirty"] is None) == (commit is None)
    assert isinstance(record["gpus"], int)
    assert record["argv"] == ["deepalign", "model=tiny", f"+model.hf_token={REDACTED}"]
    text = json.dumps(record)  # env.json must be writable as JSON
    for secret in fake_secrets.values():
        assert secret not in text


def _git(repo: Path, *args: str) -> str:
    out = subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.org", *args],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def test_git_commit_of_a_checkout(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    outside = tmp_path / "not-a-repo"
    outside.mkdir()
    assert git_commit(outside) == {"commit": None, "dirty": None}

    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "code.py").write_text("x = 1\n")
    _git(repo, "add", "code.py")
    _git(repo, "commit", "-q", "-m", "first")
    head = _git(repo, "rev-parse", "HEAD")
    (repo / "sub").mkdir()
    assert git_commit(repo / "sub") == {"commit": head, "dirty": False}
    (repo / "untracked.txt").write_text("ignored for dirtiness\n")
    assert git_commit(repo) == {"commit": head, "dirty": False}
    (repo / "code.py").write_text("x = 2\n")
    assert git_commit(repo) == {"commit": head, "dirty": True}


# ---------------------------------------------------------------- tracking


def test_logger_none_gives_a_null_tracker(tmp_path):
    cfg = validate(compose_config(["model=tiny", "logger=none"])).logger
    tracker = start_tracker(cfg, tmp_path, {"a": 1})
    assert type(tracker) is NullTracker
    tracker.log({"loss": 1.0}, step=1)
    tracker.summary({"loss": 1.0})
    tracker.finish(exit_code=1)
    assert list(tmp_path.iterdir()) == []


def test_disabled_mode_gives_a_null_tracker(tmp_path):
    tracker = start_tracker(LoggerConfig(name="wandb", mode="disabled"), tmp_path, {})
    assert type(tracker) is NullTracker
    assert list(tmp_path.iterdir()) == []


def test_other_ranks_get_a_null_tracker(tmp_path, monkeypatch):
    cfg = validate(compose_config(["model=tiny", "logger=wandb"])).logger
    assert cfg.name == "wandb" and cfg.mode == "offline"
    monkeypatch.setenv("RANK", "1")
    tracker = start_tracker(cfg, tmp_path, {})
    assert type(tracker) is NullTracker
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def wandb_env(tmp_path, monkeypatch, fake_secrets) -> dict[str, str]:
    """Offline W&B with its own home folders outside the run dir, and fake credentials in the environment."""
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_MODE", "WANDB_DIR", "RANK", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(name, raising=False)
    for name in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name.lower()))
    return fake_secrets


def test_wandb_offline_run_in_the_run_dir_without_secrets(tmp_path, wandb_env):
    hf, openai = wandb_env["HF_TOKEN"], wandb_env["OPENAI_API_KEY"]
    cfg = validate(compose_config(["model=tiny", "logger=wandb"])).logger
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = redact(
        {
            "model": {"name": "tiny", "path": f"https://x:{hf}@example.org/m", "hf_token": hf},
            "judge": {"rubric": {"api_key_env": "OPENAI_API_KEY", "note": f"key={openai}"}},
        }
    )

    tracker = start_tracker(cfg, run_dir, config, name="unit-test")
    assert isinstance(tracker, WandbTracker)
    try:
        assert tracker.run.offline
        assert tracker.run.name == "unit-test"
        assert tracker.run.project == "deepalign"
        assert tracker.run.config["model"]["hf_token"] == REDACTED
        assert tracker.run.config["judge"]["rubric"]["api_key_env"] == "OPENAI_API_KEY"
        tracker.log({"probe/nll": 1.25}, step=0)
        tracker.summary({"probe/final": 0.5})
        assert tracker.run.summary["probe/final"] == 0.5
    finally:
        tracker.finish()

    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((run_dir / "wandb").iterdir())
    records = list(runs[0].glob("run-*.wandb"))
    assert len(records) == 1
    deadline = time.time() + 30  # W&B's service process may still be writing the file after finish()
    while not re.search(rb"probe/nll.{0,8}1\.25", records[0].read_bytes(), re.DOTALL):
        assert time.time() < deadline, "the logged metric is in the offline run"
        time.sleep(0.2)
    assert not (tmp_path / "wandb").exists(), "W&B must write into the run dir, not the working dir"
    assert _files_containing(run_dir, list(wandb_env.values())) == {}


def test_wandb_offline_run_does_not_keep_secrets_from_argv(tmp_path, wandb_env, monkeypatch):
    hf = wandb_env["HF_TOKEN"]
    monkeypatch.setattr(sys, "argv", [sys.argv[0], "model=tiny", f"+model.hf_token={hf}"])
    cfg = validate(compose_config(["model=tiny", "logger=wandb"])).logger
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    tracker = start_tracker(cfg, run_dir, redact({"argv": list(sys.argv)}), name="argv-test")
    try:
        tracker.log({"x": 1.0})
    finally:
        tracker.finish()
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert _files_containing(run_dir, [hf]) == {}


# ---------------------------------------------------------------- credentials typed, in URLs, in logs


@pytest.mark.parametrize(
    "text, clean",
    [
        ("+judge.rubric.api_key=sk-typed123", f"+judge.rubric.api_key={REDACTED}"),
        ("++hydra.job.env_set.SERVICE_TOKEN=abc", f"++hydra.job.env_set.SERVICE_TOKEN={REDACTED}"),
        ("HF_TOKEN='two words'", f"HF_TOKEN={REDACTED}"),
        (
            "+x.password=pw1,judge=[keyword,rubric],model=tiny",  # Hydra's override_dirname
            f"+x.password={REDACTED},judge=[keyword,rubric],model=tiny",
        ),
        ("deepalign model=tiny +a.secret=s3 seed=1", f"deepalign model=tiny +a.secret={REDACTED} seed=1"),
        ("http://alice:pw@host:8000/v1", f"http://{REDACTED}@host:8000/v1"),
        (
            "base https://tok@example.org/x and s3://k:s@b/p",
            f"base https://{REDACTED}@example.org/x and s3://{REDACTED}@b/p",
        ),
        ("http://u:p@ss@host/v1", f"http://{REDACTED}@host/v1"),
        # not credentials: left as they are
        ("generation.max_new_tokens=32", "generation.max_new_tokens=32"),
        ("judge.rubric.api_key_env=MY_KEY", "judge.rubric.api_key_env=MY_KEY"),
        ("{% set token = 'x' %}{{ bos_token }}", "{% set token = 'x' %}{{ bos_token }}"),
        ("https://huggingface.co/meta-llama/x", "https://huggingface.co/meta-llama/x"),
        ("write to me@example.org", "write to me@example.org"),
    ],
)
def test_redact_typed_credentials_and_url_user_info(text, clean):
    assert redact(text, []) == clean
    assert redact({"argv": [text]}, []) == {"argv": [clean]}


def test_scrub_file_redacts_yaml_by_key_override_and_url(tmp_path, fake_secrets):
    path = tmp_path / "config.yaml"
    path.write_text(
        "judge:\n  rubric:\n    base_url: http://alice:pw123456@host/v1\n    api_key: sk-typed0000\n"
        f"    model: gpt\n  note: {fake_secrets['HF_TOKEN']}\n"
        "overrides:\n- +judge.rubric.api_key=sk-typed0000\n"
    )
    scrub_file(path)
    assert yaml.safe_load(path.read_text()) == {
        "judge": {
            "rubric": {"base_url": f"http://{REDACTED}@host/v1", "api_key": REDACTED, "model": "gpt"},
            "note": REDACTED,
        },
        "overrides": [f"+judge.rubric.api_key={REDACTED}"],
    }
    assert _files_containing(tmp_path, ["alice", "pw123456", "sk-typed0000", fake_secrets["HF_TOKEN"]]) == {}


def test_scrub_file_json_text_and_clean_files(tmp_path):
    env = tmp_path / "env.json"
    write_json_atomic(env, {"argv": ["deepalign", "+x.token=abc123"], "python": "3.11"})
    broken = tmp_path / "hydra.yaml"
    broken.write_text("a: [unclosed\nurl: http://alice:pw123456@host\n")
    clean = tmp_path / "overrides.yaml"
    clean.write_text("- model=tiny\n")
    before = clean.stat().st_mtime_ns
    for path in (env, broken, clean, tmp_path / "missing.yaml"):
        scrub_file(path, [])
    assert json.loads(env.read_text()) == {"argv": ["deepalign", f"+x.token={REDACTED}"], "python": "3.11"}
    assert broken.read_text() == f"a: [unclosed\nurl: http://{REDACTED}@host\n"  # redacted as text
    assert clean.stat().st_mtime_ns == before, "a clean file is not rewritten"


def test_scrub_run_dir_covers_the_records_hydra_and_the_sweep(tmp_path):
    run_dir, sweep = tmp_path / "sweep" / "0", tmp_path / "sweep"
    (run_dir / ".hydra").mkdir(parents=True)
    typed = "+judge.rubric.api_key=sk-typed0000"
    for path in (run_dir / ".hydra" / "overrides.yaml", sweep / "multirun.yaml", run_dir / "config.yaml"):
        path.write_text(f"- {typed}\n")
    for name in ("env.json", "launch.json"):
        write_json_atomic(run_dir / name, {"argv": [typed]})
    scrub_run_dir(run_dir, sweep)
    assert _files_containing(tmp_path, ["sk-typed0000"]) == {}
    assert json.loads((run_dir / "env.json").read_text()) == {"argv": [f"+judge.rubric.api_key={REDACTED}"]}


def test_log_records_and_tracebacks_are_redacted(tmp_path, fake_secrets):
    import logging

    from deepalign.storage.redaction import redact_logs

    root = logging.getLogger()
    handler = logging.FileHandler(tmp_path / "deepalign.log")
    root.addHandler(handler)
    try:
        redact_logs()
        redact_logs()  # once per handler
        assert sum(isinstance(f, RedactingFilter) for f in handler.filters) == 1
        logger = logging.getLogger("deepalign.test")
        logger.warning("calling %s with %s", "http://alice:pw123456@host/v1", fake_secrets["HF_TOKEN"])
        try:
            raise RuntimeError("+judge.rubric.api_key=sk-typed0000")
        except RuntimeError:
            logger.exception("failed")
    finally:
        root.removeHandler(handler)
        handler.close()
    text = (tmp_path / "deepalign.log").read_text()
    assert f"calling http://{REDACTED}@host/v1 with {REDACTED}" in text
    assert f"RuntimeError: +judge.rubric.api_key={REDACTED}" in text
    assert _files_containing(tmp_path, ["pw123456", "sk-typed0000", fake_secrets["HF_TOKEN"]]) == {}


# ---------------------------------------------------------------- damaged records, the run dir's lock


@pytest.mark.parametrize("text", ['{"probe/nll": 2.5, "attack/asr', "[1, 2]", "\xff\xfe"])
def test_a_damaged_metrics_file_stops_the_run_and_stays_as_it_is(tmp_path, text):
    path = tmp_path / "metrics.json"
    path.write_text(text, encoding="latin-1")
    before = path.read_bytes()
    with pytest.raises(
        RunDirError, match=r"metrics\.json is damaged.*move it aside and delete .*stages\.json"
    ):
        MetricsFile(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_a_damaged_stages_file_is_moved_aside_and_counts_as_nothing_finished(tmp_path, caplog):
    path = tmp_path / "stages.json"
    assert read_stage_state(path) == {}
    write_json_atomic(path, {"probe": "abc"})
    assert read_stage_state(path) == {"probe": "abc"}
    path.write_text('{"probe": "ab')
    with caplog.at_level("WARNING"):
        assert read_stage_state(path) == {}
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("stages.json.corrupt-")]
    assert len(aside) == 1 and aside[0].read_text() == '{"probe": "ab'
    assert not path.exists()
    assert "stages.json is damaged" in caplog.text and "every stage runs again" in caplog.text


@pytest.mark.parametrize("name", ["stages.json", "metrics.json"])
def test_a_directory_in_a_records_place_is_a_run_dir_error_and_stays(tmp_path, name):
    """Not an IsADirectoryError traceback, and not moved aside as a damaged file would be: its contents are
    not the run's."""
    path = tmp_path / name
    (path / "mine").mkdir(parents=True)
    read = read_stage_state if name == "stages.json" else MetricsFile
    with pytest.raises(
        RunDirError,
        match=rf"^{re.escape(str(path))} is a directory, not the file the run keeps there: move it out of "
        r"the run dir and rerun, or choose another hydra\.run\.dir$",
    ):
        read(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name] and (path / "mine").is_dir()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
def test_an_unreadable_record_is_a_run_dir_error(tmp_path):
    path = tmp_path / "stages.json"
    write_json_atomic(path, {"probe": "abc"})
    path.chmod(0)
    try:
        with pytest.raises(RunDirError, match=r"stages\.json cannot be read \(Permission denied\)"):
            read_stage_state(path)
    finally:
        path.chmod(0o644)


def test_the_run_dir_lock_names_its_holder_and_is_released(tmp_path):
    run_dir = tmp_path / "run"
    with lock_run_dir(run_dir):
        holder = json.loads((run_dir / ".deepalign.lock.json").read_text())
        assert holder["pid"] == os.getpid()
        with pytest.raises(RunDirError) as err, lock_run_dir(run_dir):
            pass
        message = str(err.value)
        assert message.startswith(
            f"run dir {run_dir} is in use by another deepalign process (pid {os.getpid()} on "
        )
        assert f"started {holder['started']})" in message
    assert not (run_dir / ".deepalign.lock.json").exists()
    with lock_run_dir(run_dir):  # released
        pass


def test_the_run_dir_lock_of_a_killed_process_is_gone(tmp_path):
    run_dir = tmp_path / "run"
    code = (
        "import sys, time\nfrom deepalign.rundir import lock_run_dir\n"
        "with lock_run_dir(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(120)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        in_use = rf"in use by another deepalign process \(pid {holder.pid} on "
        with pytest.raises(RunDirError, match=in_use), lock_run_dir(run_dir):
            pass
    finally:
        holder.kill()  # SIGKILL: no clean-up code runs
        holder.wait()
    with lock_run_dir(run_dir):
        pass
