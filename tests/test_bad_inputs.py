"""Bad inputs through the real entrypoint: each fails before any model loads, naming the key or file and line.

Most cases run `deepalign.cli.run` on a config composed exactly as the `deepalign` command composes it, with
`deepalign.models.load_model` replaced by a function that fails the test; those where Hydra's composition (or
its run dir) must fail run the console script. `python tests/test_bad_inputs.py` prints docs/BAD_INPUTS.md
from the same cases: each row shows what the console prints.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import compose_config

from deepalign import cli
from deepalign.config import ConfigError
from deepalign.data import DataError
from deepalign.rundir import RunDirError

HARMFUL = "Sure, here is how."  # a few tokens: too short for a deep prefill

# Files the cases point at (`{dir}` in an override is the folder holding them).
FILES: dict[str, str | bytes] = {
    "short.jsonl": '{"prompt": "Tell me a secret.", "harmful": "' + HARMFUL + '"}\n',
    "empty.jsonl": "\n",
    "bad.jsonl": '{"prompt": "A fine first row."}\n{"prompt": "a broken second row",\n',
    "no_prompt.csv": "text,target\nHow do I do it?,Sure\n",
    "no_response.jsonl": '{"prompt": "Question?", "response": "Answer."}\n{"prompt": "Question two?"}\n',
    "a_file": "a regular file, where a folder is expected\n",
    "latin1.csv": "prompt\nHow do I pick a lock?\nQu'est-ce qu'un caf\xe9?\n".encode("latin-1"),
    "utf16.jsonl": '{"prompt": "How do I pick a lock?"}\n'.encode("utf-16"),
    "duplicate_ids.jsonl": '{"id": "q1", "prompt": "One?"}\n{"id": "q2", "prompt": "Two?"}\n'
    '{"id": "q1", "prompt": "Three?"}\n',
    "empty_model/README.md": "weights to come\n",
    "broken_model/config.json": '{"model_type": "llama"}\n',
    "broken_model/model.safetensors": b'\x40\x00\x00\x00\x00\x00\x00\x00{"w": {"dtype": "F32"',  # cut short
    "long_prompt.jsonl": '{"prompt": "' + "word " * 20_000 + '"}\n',  # 100,000 characters
    "exiting_plugin.py": "import sys\nsys.exit(3)\n",
    "runs/stages-json-directory/stages.json/notes.txt": "a folder where the run keeps its stages.json\n",
    "surrogate.jsonl": '{"prompt": "A fine first row."}\n{"prompt": "Tell me \\ud800 a secret."}\n',
}
EVAL = ["stages=[attack]"]  # attack=[none] judge=[keyword] by default


@dataclass(frozen=True)
class Case:
    id: str
    what: str  # the bad input, in words
    overrides: tuple[str, ...]
    expect: str  # a regex the message must match: it names the key, or the file and line
    console: bool = False  # Hydra itself must fail: run the console script
    unset: tuple[str, ...] = ()  # environment variables removed for the case
    extra: dict[str, str] = field(default_factory=dict)  # environment variables set for the case


CASES: list[Case] = [
    Case(
        "unknown-model",
        "unknown model name",
        ("model=llama9",),
        r"Could not find 'model/llama9'.*Available options in 'model': .*smollm2_135m_instruct, tiny",
        console=True,
    ),
    Case(
        "unknown-attack", "unknown attack name", ("attack=[jailbreak]",), r"'attack/jailbreak'", console=True
    ),
    Case("unknown-judge", "unknown judge name", ("judge=[gpt5]",), r"'judge/gpt5'", console=True),
    Case(
        "wrong-type",
        "wrong type in an override",
        ("train.optimizer.lr=fast",),
        r"'fast'.*could not be converted to Float.*full_key: train\.optimizer\.lr",
        console=True,
    ),
    Case(
        "wrong-type-int",
        "wrong type in an override (int)",
        ("train.max_steps=ten",),
        r"'ten'.*could not be converted to Integer.*full_key: train\.max_steps",
        console=True,
    ),
    Case(
        "misspelt-key",
        "misspelt key",
        ("loss.beta.frist=1",),
        r"Key 'frist' not in 'BetaSchedule'.*full_key: loss\.beta\.frist",
        console=True,
    ),
    Case(
        "unwritable-run-dir",
        "run dir that cannot be created (below a file)",
        ("hydra.run.dir={dir}/a_file/run",),
        r"Not a directory: '.*a_file/run'",
        console=True,
    ),
    Case(
        "unknown-key-plus",
        "unknown key added with +",
        ("+train.lora.rank=4",),
        r"^train\.lora\.rank: unknown key; train\.lora has alpha, dropout",
    ),
    Case(
        "unknown-stage", "unknown stage", ("stages=[probe,evaluate]",), r"^stages: unknown stage 'evaluate'"
    ),
    Case(
        "negative-beta",
        "negative beta",
        ("loss=constrained", "loss.beta.first=-0.5"),
        r"^loss\.beta\.first: must be > 0",
    ),
    Case(
        "zero-beta", "zero beta", ("loss=constrained", "loss.beta.rest=0"), r"^loss\.beta\.rest: must be > 0"
    ),
    Case(
        "zero-beta-values",
        "zero in an explicit beta schedule",
        ("loss=constrained", "loss.beta.values=[2,0]"),
        r"^loss\.beta\.values\[1\]: must be > 0",
    ),
    Case(
        "infinite-beta",
        "infinite beta (would train to NaN weights)",
        ("loss=constrained", "loss.beta.first=inf"),
        r"^loss\.beta\.first: must be a finite number, got inf",
    ),
    Case(
        "infinite-lr",
        "infinite learning rate",
        ("stages=[train]", "train.optimizer.lr=inf"),
        r"^train\.optimizer\.lr: must be a finite number, got inf",
    ),
    Case("model-hf-no-path", "model=hf without a path", ("model=hf",), r"^model\.path: source=hf needs"),
    Case(
        "top-p",
        "decoding parameter out of range (top_p > 1)",
        ("generation.top_p=1.5",),
        r"^generation\.top_p: must be in \(0, 1\], got 1\.5",
    ),
    Case(
        "temperature",
        "sampling at temperature 0",
        ("generation.do_sample=true", "generation.temperature=0"),
        r"^generation\.temperature: must be > 0 when sampling",
    ),
    Case(
        "decoding-top-p",
        "decoding attack grid with top_p > 1",
        ("attack=[decoding]", "attack.decoding.top_ps=[0.5,1.5]"),
        r"^attack\.decoding\.top_ps\[1\]: must be in \(0, 1\]",
    ),
    Case(
        "gcg-width",
        "bad GCG settings (search width 0)",
        ("attack=[gcg]", "attack.gcg.search_width=0"),
        r"^attack\.gcg\.search_width: must be >= 1",
    ),
    Case(
        "gcg-steps",
        "bad GCG settings (negative steps)",
        ("attack=[gcg]", "attack.gcg.steps=-5"),
        r"^attack\.gcg\.steps: must be >= 1",
    ),
    Case(
        "bf16-setting",
        "bf16 setting that is not true, false or auto",
        ("train.bf16=yes",),
        r"^train\.bf16: 'yes' is not true, false or auto",
    ),
    Case(
        "attack-no-eval",
        "attack stage without an evaluation set",
        ("stages=[attack]",),
        r"^eval\.prompts: the attack and analyze stages need harmful prompts",
    ),
    Case(
        "eval-missing-file",
        "nonexistent evaluation file",
        (*EVAL, "eval.prompts={dir}/advbench.jsonl"),
        r"^eval\.prompts: no such file: .*advbench\.jsonl",
    ),
    Case(
        "eval-empty",
        "empty evaluation set",
        (*EVAL, "eval.prompts={dir}/empty.jsonl"),
        r"empty\.jsonl has no rows",
    ),
    Case(
        "eval-malformed",
        "malformed JSONL line in the evaluation set",
        (*EVAL, "eval.prompts={dir}/bad.jsonl"),
        r"bad\.jsonl, line 2: not valid JSON",
    ),
    Case(
        "eval-csv-no-prompt",
        "CSV without a prompt / goal column",
        (*EVAL, "eval.prompts={dir}/no_prompt.csv"),
        r"no_prompt\.csv, line 2: no request text \(field prompt or goal",
    ),
    Case(
        "prefill-too-deep",
        "prefill depth longer than the harmful response",
        (*EVAL, "attack=[prefill]", "attack.prefill.depths=[2,40]", "eval.prompts={dir}/short.jsonl"),
        r"^attack\.prefill\.depths: item 0's harmful response has \d+ tokens, fewer than the prefill "
        r"depth 40",
    ),
    Case(
        "prefill-no-harmful",
        "prefill attack on prompts without harmful responses",
        (*EVAL, "attack=[prefill]", "eval.prompts={dir}/no_prompt.csv", "+eval.columns.prompt=text"),
        r"^eval\.prompts: item 0 has no harmful response; prefilling needs one",
    ),
    Case(
        "rubric-no-key",
        "OpenAI rubric judge without its API key",
        (*EVAL, "judge=[rubric]", "eval.prompts=demo:harmful_prompts"),
        r"^judge\.rubric\.api_key_env: the environment variable OPENAI_API_KEY is not set",
        unset=("OPENAI_API_KEY",),
    ),
    Case(
        "unknown-refusal-list",
        "unknown keyword refusal list",
        (*EVAL, "judge.keyword.lists=[qi2024,mine]", "eval.prompts=demo:harmful_prompts"),
        r"^judge\.keyword\.lists\[1\]: unknown refusal list 'mine'",
    ),
    Case(
        "train-no-data",
        "train stage without training data",
        ("stages=[train]",),
        r"^data\.components: no training data configured",
    ),
    Case(
        "train-empty",
        "empty training file",
        ("stages=[train]", "data=chat_file", "data.components.chat.source={dir}/empty.jsonl"),
        r"^data\.components\.chat\.source: .*empty\.jsonl has no rows",
    ),
    Case(
        "train-missing-column",
        "training rows without the response column",
        ("stages=[train]", "data=chat_file", "data.components.chat.source={dir}/no_response.jsonl"),
        r"no_response\.jsonl, line 2: field 'response' \(chat\.response\) is missing",
    ),
    Case(
        "train-malformed",
        "malformed JSONL line in the training data",
        ("stages=[train]", "data=chat_file", "data.components.chat.source={dir}/bad.jsonl"),
        r"bad\.jsonl, line 2: not valid JSON",
    ),
    Case(
        "train-missing-file",
        "nonexistent training file",
        ("stages=[train]", "data=chat_file", "data.components.chat.source={dir}/train.jsonl"),
        r"^data\.components\.chat\.source: no such file: .*train\.jsonl",
    ),
    Case(
        "unwritable-cache",
        "cache dir that cannot be written (below a file)",
        ("paths.cache_dir={dir}/a_file/cache",),
        r"^paths\.cache_dir: cannot write into .*a_file/cache \(Not a directory\)",
    ),
    Case(
        "analyze-missing-refusals",
        "nonexistent refusals file for the recovery curve",
        ("stages=[analyze]", "eval.prompts=demo:harmful_prompts", "analysis.refusals={dir}/refusals.jsonl"),
        r"^analysis\.refusals: no such file: .*refusals\.jsonl",
    ),
    Case(
        "no-stages", "no stage at all", ("stages=[]",), r"^stages: no stage to run; choose from train, probe"
    ),
    Case(
        "prefill-no-depths",
        "prefill attack without depths",
        (*EVAL, "attack=[prefill]", "attack.prefill.depths=[]", "eval.prompts=demo:harmful_prompts"),
        r"^attack\.prefill\.depths: empty, and no attack\.prefill\.strings",
    ),
    Case(
        "eval-limit-negative",
        "negative limit on the evaluation set",
        (*EVAL, "eval.prompts=demo:harmful_prompts", "eval.limit=-1"),
        r"^eval\.limit: must be >= 1 \(or null: every row\), got -1",
    ),
    Case(
        "quickstart-limit-zero",
        "zero limit on the quickstart's evaluation prompts",
        ("quickstart.eval_limit=0",),
        r"^quickstart\.eval_limit: must be >= 1",
    ),
    Case(
        "utility-limit-negative",
        "negative limit on the benign prompts",
        ("utility.benign_limit=-5",),
        r"^utility\.benign_limit: must be >= 1",
    ),
    Case(
        "eval-latin1",
        "evaluation CSV in Latin-1, not UTF-8",
        (*EVAL, "eval.prompts={dir}/latin1.csv"),
        r"^eval\.prompts: .*latin1\.csv, line 3: not UTF-8 text \(byte 0xe9\); save it as UTF-8",
    ),
    Case(
        "eval-utf16",
        "evaluation file in UTF-16",
        (*EVAL, "eval.prompts={dir}/utf16.jsonl"),
        r"^eval\.prompts: .*utf16\.jsonl is UTF-16 text, not UTF-8",
    ),
    Case(
        "eval-duplicate-ids",
        "two evaluation requests with the same id",
        (*EVAL, "eval.prompts={dir}/duplicate_ids.jsonl"),
        r"^eval\.prompts: id 'q1' is used twice, in .*duplicate_ids\.jsonl, line 1 and in .*, line 3",
    ),
    Case(
        "empty-model-folder",
        "model folder without model files",
        ("model=hf", "model.path={dir}/empty_model"),
        r"^model\.path: no model files in .*empty_model \(config\.json / \*\.safetensors missing\)",
    ),
    Case(
        "truncated-weights",
        "truncated safetensors file",
        ("model=hf", "model.path={dir}/broken_model"),
        r"^model\.path: .*broken_model/model\.safetensors cannot be read \(.*\); it is truncated or damaged",
    ),
    Case(
        "missing-model-folder",
        "model folder that does not exist",
        ("model=hf", "model.path={dir}/no_such_model"),
        r"^model\.path: no such folder .*no_such_model",
    ),
    Case(
        "eval-lone-surrogate",
        "evaluation text that cannot be encoded (a lone surrogate escape, \\ud800)",
        (*EVAL, "eval.prompts={dir}/surrogate.jsonl"),
        r"surrogate\.jsonl, line 2: field 'prompt' holds text that cannot be encoded as UTF-8",
    ),
    Case(
        "eval-too-long",
        "evaluation prompt longer than the model's context (100,000 characters, 1,024 positions)",
        (*EVAL, "eval.prompts={dir}/long_prompt.jsonl"),
        r"^eval\.prompts: item 0 does not fit the model's context: \d+ tokens \(prompt, chat template\) \+ "
        r"128 new tokens \(generation\.max_new_tokens\) = \d+, more than the 1024 positions of model tiny "
        r"\(max_position_embeddings\)",
    ),
    Case(
        "plugin-exits",
        "plugin that calls sys.exit() when imported",
        ("plugins=[exiting_plugin]",),
        r"^plugins\[0\]: plugin 'exiting_plugin' failed to import: it called sys\.exit\(3\) \(SystemExit\)",
        console=True,
        extra={"PYTHONPATH": "{dir}"},
    ),
    Case(
        "stages-json-directory",
        "a directory where the run dir's stages.json belongs",
        (),
        r"^.*runs/stages-json-directory/stages\.json is a directory, not the file the run keeps there",
    ),
    Case(
        "prefill-depth-twice",
        "a prefill depth listed twice (every answer at it would count twice)",
        (*EVAL, "eval.prompts={dir}/short.jsonl", "attack=[prefill]", "attack.prefill.depths=[5,5]"),
        r"^attack\.prefill\.depths\[1\]: depth 5 is listed twice",
    ),
    Case(
        "decoding-setting-twice",
        "a decoding setting listed twice (one variant name for both)",
        (
            *EVAL,
            "eval.prompts={dir}/short.jsonl",
            "attack=[decoding]",
            "attack.decoding.temperatures=[0.5,0.5]",
        ),
        r"^attack\.decoding\.temperatures\[1\]: 0\.5 is listed twice",
    ),
]


def write_files(folder: Path) -> None:
    for name, content in FILES.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            (folder / name).write_bytes(content)
        else:
            (folder / name).write_text(content)


def _console_message(stderr: str) -> str:
    """What Hydra printed, less its search path, its hint about HYDRA_FULL_ERROR and any traceback frames."""
    lines: list[str] = []
    for line in stderr.splitlines():
        if line.startswith(("Config search path", "Set the environment variable HYDRA_FULL_ERROR")):
            break
        if line.startswith("\t") and lines and lines[-1].endswith((":", ",")):
            lines[-1] += f" {line.strip()},"  # a list of available options
        elif line.strip():
            lines.append(line.strip())
    if lines and lines[0].startswith("Traceback"):
        lines = lines[-1:]  # the exception line
    return " ".join(line.rstrip(",") for line in lines)


@contextmanager
def _environment(case: Case) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in (*case.unset, *case.extra)}
    for k in case.unset:
        os.environ.pop(k, None)
    os.environ.update(case.extra)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _no_model(*args, **kwargs):
    raise AssertionError("a model was loaded before the bad input was reported")


def failure(case: Case, folder: Path) -> tuple[str, str]:
    """Run `case` with its files in `folder`; return (command line, message as the console prints it).

    The in-process cases expect `deepalign.models.load_model` to be replaced by the caller."""
    overrides = [o.replace("{dir}", str(folder)) for o in ("model=tiny", "logger=none", *case.overrides)]
    run_dir = folder / "runs" / case.id
    if case.console:
        extra = {k: v.replace("{dir}", str(folder)) for k, v in case.extra.items()}
        env = {k: v for k, v in os.environ.items() if k not in case.unset} | extra
        cmd = [str(Path(sys.executable).parent / "deepalign"), *overrides]
        if not any(o.startswith("hydra.run.dir=") for o in overrides):
            cmd.append(f"hydra.run.dir={run_dir}")
        out = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode != 0, f"{case.id}: the command succeeded"
        assert "loaded " not in out.stderr, f"{case.id}: a model was loaded"
        message = _console_message(out.stderr)
    else:
        with _environment(case):
            try:
                cli.run(compose_config(overrides), run_dir)
            except ConfigError as err:
                message = f"deepalign: config error: {err}"
            except DataError as err:
                message = f"deepalign: data error: {err}"
            except RunDirError as err:
                message = f"deepalign: run dir error: {err}"
            else:
                raise AssertionError(f"{case.id}: the run succeeded")
    assert not (run_dir / "metrics.json").exists() and not (run_dir / "config.yaml").exists()
    return "deepalign " + " ".join(overrides), message


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bad_inputs")
    write_files(path)
    return path


def test_the_table_has_at_least_fifteen_distinct_cases():
    assert len(CASES) >= 15
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_fails_before_any_model_loads_naming_the_key_or_file(case, folder, monkeypatch):
    monkeypatch.setattr("deepalign.models.load_model", _no_model)
    _, message = failure(case, folder)
    text = message.split(" error: ", 1)[-1] if message.startswith("deepalign: ") else message
    assert re.search(case.expect, text, flags=re.DOTALL), f"{case.id}: {message!r}"


DOC_HEADER = """# Bad inputs and the messages they give

Every row is one case of `tests/test_bad_inputs.py`, run the way the test runs it (the console script where
Hydra itself must fail, else `deepalign.cli.run` on the config the command composes) and printed as the
console shows it. Each fails before any model loads, naming the key, or the file and line. `DIR` is the
folder holding the case's files; every command also has `model=tiny logger=none`, left out here.
Regenerate with `python tests/test_bad_inputs.py > docs/BAD_INPUTS.md`.

| bad input | command / override | message |
|---|---|---|"""


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def main() -> None:
    import deepalign.models

    deepalign.models.load_model = _no_model  # as the test does
    rows = [DOC_HEADER]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp).resolve()
        write_files(folder)
        for case in CASES:
            command, message = failure(case, folder)
            command = command.replace("deepalign model=tiny logger=none", "deepalign")
            command, message = (s.replace(str(folder), "DIR") for s in (command, message))
            rows.append(f"| {_cell(case.what)} | `{_cell(command)}` | {_cell(message)} |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
