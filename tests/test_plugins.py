"""The extension points as a user meets them: a loss in a module of one's own, named with `plugins=[...]`
on the `deepalign` command line, trains exactly like the built-in it copies; `--help` lists it; a wrong
loss name, a missing plugin and a plugin that fails to import are config errors naming the key or the
module; a loss gets the cached reference log-probs only when it asks for them; `validate` imports the
plugins a config names."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import compose_config

from deepalign import cli, plugins
from deepalign.config import validate
from deepalign.plugins import LOSSES, register_loss

MY_LOSSES = """\
# my_losses.py
from deepalign.plugins import register_loss

@register_loss("scaled_sft")
def scaled_sft(policy_logps, reference_logps, mask, n_tokens, params):
    # policy_logps, reference_logps: [batch, seq] per-token log-probs (reference None unless asked for);
    # mask: bool [batch, seq], the target tokens; n_tokens: target tokens of the whole optimizer step;
    # params: the extra keys of the loss section (loss.params)
    return -(policy_logps[mask]).sum() / n_tokens * float(params.get("scale", 1.0))
"""
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]
# metrics.json rounds losses to 6 decimals: two values 1e-6 apart may round 2e-6 apart
ROUNDED = 2e-6


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """plugins/my_losses.py, a small chat file and a model cache shared by this module's runs."""
    root = tmp_path_factory.mktemp("plugins")
    (root / "plugins").mkdir()
    (root / "plugins" / "my_losses.py").write_text(MY_LOSSES)
    rows = [
        {"prompt": f"Question {i}: list some words.", "response": " ".join(WORDS[i % 5 : i % 5 + 4 + i % 7])}
        for i in range(16)
    ]
    (root / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def train_args(workdir: Path, *extra: str) -> list[str]:
    """A few steps of the train stage on the tiny model (the training tests' settings)."""
    return [
        "model=tiny",
        "logger=none",
        "stages=[train]",
        "data=chat_file",
        f"data.components.chat.source={workdir / 'chats.jsonl'}",
        "data.max_length=64",
        "train.per_device_batch_size=4",
        "train.optimizer.lr=1e-3",
        f"paths.cache_dir={workdir / 'cache'}",
        *extra,
    ]


def deepalign(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    """The installed console script, with the plugin folder on PYTHONPATH."""
    path = [str(workdir / "plugins"), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    script = Path(sys.executable).parent / "deepalign"
    return subprocess.run(
        [str(script), *args], cwd=workdir, env=env, capture_output=True, text=True, timeout=600
    )


def losses_per_step(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    return [row["train/loss"] for row in rows if "train/loss" in row]


def test_plugin_loss_on_the_command_line_trains_like_the_builtin(workdir):
    steps = "train.max_steps=3"
    a = deepalign(
        workdir,
        "plugins=[my_losses]",
        *train_args(workdir, steps),
        "loss.name=scaled_sft",
        "++loss.params.scale=1.0",
        f"hydra.run.dir={workdir / 'a'}",
    )
    assert a.returncode == 0, a.stderr[-3000:]
    b = deepalign(workdir, *train_args(workdir, steps), "loss=sft", f"hydra.run.dir={workdir / 'b'}")
    assert b.returncode == 0, b.stderr[-3000:]
    ma = json.loads((workdir / "a" / "metrics.json").read_text())
    mb = json.loads((workdir / "b" / "metrics.json").read_text())
    assert ma["train/steps"] == mb["train/steps"] == 3
    for key in ("train/first_loss", "train/last_loss"):
        assert ma[key] == pytest.approx(mb[key], abs=ROUNDED), key
    la, lb = losses_per_step(workdir / "a"), losses_per_step(workdir / "b")
    assert len(la) == len(lb) == 3
    assert la == pytest.approx(lb, abs=1e-6)
    assert la[-1] < la[0]  # it trains
    # the plugin's own setting reaches it: twice the scale, twice the loss at the same first step
    c = deepalign(
        workdir,
        "plugins=[my_losses]",
        *train_args(workdir, "train.max_steps=1"),
        "loss.name=scaled_sft",
        "++loss.params.scale=2.0",
        f"hydra.run.dir={workdir / 'c'}",
    )
    assert c.returncode == 0, c.stderr[-3000:]
    mc = json.loads((workdir / "c" / "metrics.json").read_text())
    assert mc["train/first_loss"] == pytest.approx(2 * ma["train/first_loss"], abs=2 * ROUNDED)


def test_help_lists_the_plugin_loss(workdir):
    out = deepalign(workdir, "plugins=[my_losses]", "--help")
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("losses (loss.name):"))
    names = [n.strip() for n in line.split(":", 1)[1].split(",")]
    assert {"sft", "constrained", "kl_sft", "scaled_sft"} <= set(names)


def test_unknown_loss_is_a_config_error_naming_the_key_and_the_registered_losses(workdir):
    out = deepalign(
        workdir,
        "plugins=[my_losses]",
        *train_args(workdir),
        "loss.name=nope",
        f"hydra.run.dir={workdir / 'nope'}",
    )
    assert out.returncode == 2, out.stderr[-3000:]
    message = out.stderr.strip().splitlines()[-1]
    assert message.startswith("deepalign: config error: loss.name: unknown loss 'nope'"), message
    registered = message.split("registered:", 1)[1]
    for name in ("sft", "constrained", "kl_sft", "scaled_sft"):
        assert name in registered, message


def run_main(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """`deepalign ARGS` through the console script's function, in this process: (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", ["deepalign", *args])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    return exit_info.value.code, capsys.readouterr().err


def test_missing_plugin_names_the_key(monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    code, err = run_main(monkeypatch, capsys, "plugins=[not_there]", "model=tiny", "logger=none")
    assert code == 2
    assert "deepalign: config error: plugins[0]: no module 'not_there'" in err, err


def test_plugin_that_raises_on_import_names_it(monkeypatch, capsys, tmp_path):
    (tmp_path / "broken_losses.py").write_text(
        "from deepalign.plugins import register_loss\nraise RuntimeError('the plugin is broken')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    code, err = run_main(monkeypatch, capsys, "plugins=[broken_losses]", "model=tiny", "logger=none")
    assert code == 2
    assert "plugins[0]: plugin 'broken_losses' failed to import: the plugin is broken" in err, err
    assert "broken_losses" not in sys.modules


@pytest.fixture
def isolated_losses(monkeypatch):
    """Losses registered during a test are gone after it."""
    plugins.load_builtins()
    monkeypatch.setattr(LOSSES, "_specs", dict(LOSSES._specs))
    monkeypatch.setattr(plugins, "_loaded", set(plugins._loaded))


def recording_loss(name: str, needs_reference: bool) -> list[dict]:
    """Register a plain SFT loss under `name` that records what it receives, one dict per call."""
    calls: list[dict] = []

    @register_loss(name, needs_reference=needs_reference)
    def record(policy_logps, reference_logps, mask, n_tokens, params):
        calls.append(
            {
                "policy": policy_logps.detach().clone(),
                "reference": None if reference_logps is None else reference_logps.detach().clone(),
                "mask": mask.clone(),
                "params": dict(params),
            }
        )
        return -(policy_logps[mask]).sum() / n_tokens

    return calls


def test_a_loss_that_needs_the_reference_gets_the_cached_log_probs(workdir, tmp_path, isolated_losses):
    calls = recording_loss("test_plugins_with_reference", needs_reference=True)
    cache = tmp_path / "cache"
    cfg = compose_config(
        train_args(workdir, "train.max_steps=1", "train.per_device_batch_size=16")
        + [f"paths.cache_dir={cache}", "loss.name=test_plugins_with_reference", "++loss.params.width=3"]
    )
    metrics = cli.run(cfg, tmp_path / "run")
    assert metrics["train/reference_cache_hit"] == 0
    (cached_file,) = (cache / "reference").glob("*.pt")
    cached = torch.load(cached_file, weights_only=True)
    assert len(calls) == 1  # one step of one batch of all 16 examples
    call = calls[0]
    assert call["params"]["width"] == 3 and "beta" in call["params"]
    reference, mask = call["reference"], call["mask"]
    assert reference is not None and reference.shape == mask.shape
    # each row is one example's cached log-probs, right-padded with zeros; every example appears once
    matched = []
    for row in reference:
        hits = [
            i for i, c in enumerate(cached) if torch.equal(row[: len(c)], c) and not bool(row[len(c) :].any())
        ]
        assert len(hits) >= 1
        matched.append(hits[0])
    assert sorted(matched) == list(range(len(cached))) == list(range(16))
    # at the first step the policy is the aligned model: its log-probs are the reference's on the targets
    torch.testing.assert_close(call["policy"][mask], reference[mask], atol=1e-5, rtol=0)


def test_a_loss_that_does_not_ask_gets_no_reference(workdir, tmp_path, isolated_losses):
    calls = recording_loss("test_plugins_without_reference", needs_reference=False)
    cache = tmp_path / "cache"
    cfg = compose_config(
        train_args(workdir, "train.max_steps=2")
        + [f"paths.cache_dir={cache}", "loss.name=test_plugins_without_reference"]
    )
    metrics = cli.run(cfg, tmp_path / "run")
    assert len(calls) == 2 and all(c["reference"] is None for c in calls)
    assert "train/reference_cache_hit" not in metrics
    assert not list((cache / "reference").glob("*.pt"))  # no reference pass


def test_validate_imports_the_plugins_the_config_names(tmp_path, monkeypatch, isolated_losses):
    (tmp_path / "config_named_losses.py").write_text(
        "from deepalign.plugins import register_loss\n\n"
        "@register_loss('test_plugins_config_named')\n"
        "def config_named(policy_logps, reference_logps, mask, n_tokens, params):\n"
        "    return -(policy_logps[mask]).sum() / n_tokens\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = compose_config(
        ["model=tiny", "logger=none", "plugins=[config_named_losses]", "loss.name=test_plugins_config_named"]
    )
    assert "test_plugins_config_named" not in LOSSES
    config = validate(cfg)
    assert config.loss.name == "test_plugins_config_named"
    assert LOSSES.get("test_plugins_config_named", "loss.name").module == "config_named_losses"
    sys.modules.pop("config_named_losses", None)


def test_plugin_that_exits_on_import_is_a_config_error_naming_it(monkeypatch, capsys, tmp_path):
    """`sys.exit(3)` in a plugin's module used to end `deepalign` with exit code 3 and no word."""
    (tmp_path / "exiting_losses.py").write_text("import sys\nsys.exit(3)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    code, err = run_main(monkeypatch, capsys, "plugins=[exiting_losses]", "model=tiny", "logger=none")
    assert code == 2, err
    assert (
        "deepalign: config error: plugins[0]: plugin 'exiting_losses' failed to import: it called "
        "sys.exit(3) (SystemExit)" in err
    ), err
    assert not list(tmp_path.rglob("config.yaml"))  # nothing ran


BAD_LOSSES = {
    "float": ("return float(-(policy_logps[mask]).detach().sum() / n_tokens)", r"returned float \d"),
    "non-scalar": ("return -(policy_logps * mask)", r"returned a tensor of shape \(\d+, \d+\), not a scalar"),
    "no-grad": (
        "return (-(policy_logps[mask]).sum() / n_tokens).detach()",
        r"returned a tensor without gradient: it does not depend on policy_logps",
    ),
    "tuple": (
        "return -(policy_logps[mask]).sum() / n_tokens, 3",
        r"returned \(loss, int\); logs must be a dict",
    ),
}


@pytest.mark.parametrize("kind", BAD_LOSSES)
def test_a_loss_that_breaks_its_contract_is_named_with_its_module(kind, workdir, tmp_path, monkeypatch):
    """At the first micro-batch, before any optimizer step: a config error naming the loss and where it is
    defined, not a Trainer's traceback (or, for a detached loss, a run that trains nothing)."""
    body, expected = BAD_LOSSES[kind]
    module = f"bad_loss_{kind.replace('-', '_')}"
    (tmp_path / f"{module}.py").write_text(
        "from deepalign.plugins import register_loss\n\n"
        f"@register_loss('{module}')\n"
        "def broken(policy_logps, reference_logps, mask, n_tokens, params):\n"
        f"    {body}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(LOSSES, "_specs", dict(LOSSES._specs))
    monkeypatch.setattr(plugins, "_loaded", set(plugins._loaded))
    run_dir = tmp_path / "run"
    cfg = compose_config(
        train_args(workdir, "train.max_steps=2", f"plugins=[{module}]", f"loss.name={module}")
        + [f"paths.cache_dir={tmp_path / 'cache'}"]
    )
    with pytest.raises(plugins.PluginError, match=rf"^loss '{module}' \({module}\.broken\) {expected}"):
        cli.run(cfg, run_dir)
    assert not (run_dir / "metrics.json").exists() and not (run_dir / "stages.json").exists()
    assert not list(run_dir.rglob("checkpoint-*"))  # no step was taken
    sys.modules.pop(module, None)


def test_a_loss_that_keeps_its_contract_passes_unchanged():
    from deepalign.training import loss_output

    spec = LOSSES.get("sft", "loss.name")
    policy = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    loss = -policy.sum() / 2
    assert loss_output(spec, loss, needs_grad=True) == (loss, {})
    out, logs = loss_output(spec, (loss, {"weight": 0.5}), needs_grad=True)
    assert out is loss and logs == {"weight": 0.5}
    # evaluation (no_grad): a loss without gradient is what it should be
    with torch.no_grad():
        quiet = -policy.sum() / 2
    assert loss_output(spec, quiet, needs_grad=False)[0].item() == pytest.approx(1.5)
