"""No credential reaches a file the run writes, whichever way the `deepalign` command ends.

Each case runs the real console (a subprocess) with credentials typed on the command line (a rejected
`+judge.rubric.api_key=...`, a URL with user and password, a credential-named `hydra.job.env_set`) and in
the environment, then reads every file under the run dir. The successful run is `tests/test_cli.py`'s.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ENV_SECRETS = {
    "HF_TOKEN": "hf_envTokenValue0123456789",
    "OPENAI_API_KEY": "sk-envOpenAIKey0123456789",
}
TYPED = {  # typed on the command line, in no environment variable
    "override": "sk-typedOverride0123456789",
    "url_user": "urlUser0123",
    "url_password": "urlPassw0rd0123456789",
    "env_set": "envSetValue0123456789",
}
SECRETS = [*ENV_SECRETS.values(), *TYPED.values()]
URL = f"http://{TYPED['url_user']}:{TYPED['url_password']}@llm.example.org/v1"

# The console with a stand-in stage (and launcher): `deepalign` as installed, less the real work.
RUNNER = """
import dataclasses, os, signal, sys, time
from deepalign import cli, runner
from deepalign.plugins import STAGES

# Ctrl-C as in a shell's foreground job, whatever the test runner's disposition: a job started in the
# background by a non-interactive shell ignores SIGINT, and its children inherit that
signal.signal(signal.SIGINT, signal.default_int_handler)

def stage(ctx):
{body}

STAGES._specs["probe"] = dataclasses.replace(STAGES.get("probe", "stages"), fn=stage)
runner.launch = lambda *args, **kwargs: 3  # launcher=torchrun: the workers fail with exit code 3
cli.main()
"""


def files_containing(folder: Path, needles: list[str]) -> dict[str, list[str]]:
    """Every regular file under `folder` whose bytes contain one of `needles`."""
    hits: dict[str, list[str]] = {}
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            if found := [n for n in needles if n.encode() in data]:
                hits[str(path.relative_to(folder))] = found
    return hits


@dataclass(frozen=True)
class Way:
    id: str
    overrides: tuple[str, ...]
    stage: str | None  # the stand-in stage's body; None: the console script itself
    code: int  # the exit code
    stderr: str  # a regex the console's last words match


WAYS = [
    Way(
        "config-error",
        (f"+judge.rubric.api_key={TYPED['override']}",),
        None,
        2,
        r"deepalign: config error: judge\.rubric\.api_key: unknown key",
    ),
    Way(
        "data-error",
        ("stages=[train]", "data=chat_file", "data.components.chat.source={dir}/bad.jsonl"),
        None,
        2,
        r"deepalign: data error: .*bad\.jsonl, line 1: not valid JSON",
    ),
    Way("exception", (), "    raise RuntimeError('the stage broke')", 1, r"RuntimeError: the stage broke"),
    Way(
        "ctrl-c",
        ("logger=wandb",),
        # to the main thread itself (os.kill may hand a process-wide SIGINT to another thread)
        "    signal.raise_signal(signal.SIGINT)\n    time.sleep(60)",
        130,
        r"deepalign: interrupted; rerun the same command \(same hydra\.run\.dir=\S+/run\) to resume\n$",
    ),
    Way("launcher", ("launcher=torchrun",), "    return {}", 3, r"torchrun workers failed \(exit 3\)"),
]


@pytest.mark.parametrize("way", WAYS, ids=[w.id for w in WAYS])
def test_no_credential_in_the_run_dir_on_any_way_out(way, tmp_path):
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    run_dir = tmp_path / "run"
    overrides = [
        "model=tiny",
        "logger=none",
        f"hydra.run.dir={run_dir}",
        "judge=[keyword,rubric]",
        f"judge.rubric.base_url={URL}",
        f"++hydra.job.env_set.SERVICE_TOKEN={TYPED['env_set']}",
        *(o.replace("{dir}", str(tmp_path)) for o in way.overrides),
    ]
    if way.stage is None:
        cmd = [str(Path(sys.executable).parent / "deepalign")]
    else:
        cmd = [sys.executable, "-c", RUNNER.format(body=way.stage)]
    env = {**os.environ, **ENV_SECRETS, "WANDB_SILENT": "true"}
    env.pop("WANDB_MODE", None)
    out = subprocess.run(
        [*cmd, *overrides], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == way.code, out.stderr[-3000:]
    assert re.search(way.stderr, out.stderr), out.stderr[-3000:]
    assert (run_dir / ".hydra" / "overrides.yaml").is_file()
    assert files_containing(run_dir, SECRETS) == {}
    assert not [s for s in SECRETS if s in out.stdout + out.stderr]
    if way.id == "ctrl-c":
        assert "Traceback" not in out.stderr
        assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb")), "the W&B run was started"
    if way.id == "config-error":  # the rejected override is still recorded, without its value
        assert "+judge.rubric.api_key=***REDACTED***" in (run_dir / ".hydra" / "overrides.yaml").read_text()
