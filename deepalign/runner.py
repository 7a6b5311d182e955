"""The runner: validate a composed config, record the run, run its stages in order, skip what is done.

`run` is what `deepalign` does for one run dir (cli.py is the Hydra entrypoint around it); stages come from
the stage registry (deepalign/plugins.py) and each gets a `RunContext` (deepalign/context.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from deepalign.config import ConfigError, DeepAlignConfig, ModelConfig, validate
from deepalign.context import RunContext
from deepalign.data import DataError
from deepalign.fingerprint import config_fingerprint
from deepalign.flops import gflop_so_far
from deepalign.judges.base import failed_judgments
from deepalign.launch import end_process_group, launch, process_rank, world_size
from deepalign.memory import PeakMemory
from deepalign.plugins import STAGES
from deepalign.rundir import (
    MetricsFile,
    environment_record,
    lock_run_dir,
    read_stage_state,
    redact,
    scrub_files,
    write_json_atomic,
    write_text_atomic,
)
from deepalign.tracking import start_tracker

log = logging.getLogger("deepalign")


def fingerprint(config: dict[str, Any]) -> str:
    """A hash of the whole config (less the tracker, the launcher and the keys that only say where things
    are: fingerprint.LOCATIONS), the contents of the local files it names and of the model and dataset folders
    it loads (a retrained model at the same path redoes what depends on it). Stages use
    `RunContext.stage_fingerprint`: the part of `fingerprinted(...)` they depend on."""
    return config_fingerprint(config)


def fingerprinted(resolved: dict[str, Any], config: DeepAlignConfig) -> dict[str, Any]:
    """The resolved config as the stages' fingerprints read it: each attack and judge instance as its
    validated typed config with `type`, its type's defaults filled in (a plugin whose default changes is run
    again), secrets redacted as in `resolved`."""
    typed = {
        section: {
            name: {"type": instance.type, **dataclasses.asdict(instance)}
            for name, instance in getattr(config, section).items()
        }
        for section in ("attack", "judge")
    }
    return {**resolved, **redact(typed)}


def _check_writable(key: str, folder: Path) -> None:
    """Create `folder` if needed and a file in it, or raise ConfigError naming the key."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".deepalign-write-check-"):
            pass
    except OSError as err:
        raise ConfigError(f"{key}: cannot write into {folder} ({err.strerror or err})") from None


class Terminated(KeyboardInterrupt):
    """SIGTERM (SLURM preemption, `timeout`, `kill`), raised in the main thread by the `deepalign` command
    (cli.py): the run ends as on Ctrl-C, records kept and the run dir released, with exit code 143."""


# the keys of a transformers model config that give its context, in positions
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def model_context(cfg: ModelConfig) -> tuple[int, str] | None:
    """The model's context in positions and the config key that gives it, read from its config (config.json,
    or `model.arch` for a random model) without loading weights; None where its config names none or cannot
    be read here (loading the model then says why)."""
    from transformers import AutoConfig

    try:
        if cfg.source == "random":
            arch = dict(cfg.arch)
            config = AutoConfig.for_model(arch.pop("model_type"), **arch)
        elif cfg.source == "hf":
            config = AutoConfig.from_pretrained(
                cfg.path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
            )
        else:  # gguf: converted once, by the tokenizer's loading already
            from deepalign.models import convert_gguf

            config = AutoConfig.from_pretrained(convert_gguf(cfg.gguf_package, cfg.gguf_file, cfg.cache_dir))
    except (OSError, ValueError, KeyError) as err:
        log.debug("model %s: its context is not known before loading it (%s)", cfg.name, err)
        return None
    for key in CONTEXT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value, key
    return None


def check_context(config: DeepAlignConfig, items: list[Any], attacks: list[Any], tokenizer: Any) -> None:
    """Every evaluation item fits the model's context as the attack stage asks it: the prompt in the chat
    template (rendered by the same code as the requests, `attacks.variant_prefill`), with the deepest prefill
    of each prefill attack, each fixed prefill, a GCG suffix, plus `generation.max_new_tokens`. Past its
    context a model still answers (positions it never saw), slowly and in garbage that the judges count:
    a DataError naming the first such item and both lengths."""
    found = model_context(config.model)
    if found is None:
        return
    context, key = found
    from deepalign.attacks import PrefillAttack, Variant, variant_prefill
    from deepalign.attacks.gcg import GCGAttack
    from deepalign.generation import default_params

    base, new = default_params(config.generation), config.generation.max_new_tokens
    # the longest request of each attack: (what it adds to the prompt, its variant, tokens appended)
    longest: list[tuple[str, Variant, int]] = [("", Variant("plain", base), 0)]
    for attack in attacks:
        name, cfg = attack.name, attack.cfg
        if isinstance(attack, PrefillAttack):
            if any(cfg.depths):
                deepest = max(cfg.depths)
                variant = Variant(name, base, depth=deepest, source=cfg.source)
                longest.append((f", the attack.{name} prefill of depth {deepest}", variant, 0))
            for i, text in enumerate(cfg.strings):
                longest.append(
                    (f", the prefill attack.{name}.strings[{i}]", Variant(name, base, prefill=text), 0)
                )
        elif isinstance(attack, GCGAttack):
            what = f", the attack.{name} suffix (suffix_length {cfg.suffix_length})"
            longest.append((what, Variant(name, base), cfg.suffix_length))
    too_long = []
    for item in items:
        for what, variant, extra in longest:
            if variant.source is not None and item.response(variant.source) is None:
                continue  # not asked with this prefill
            ids, _ = variant_prefill(variant, item, item.prompt, tokenizer, system=config.data.system_prompt)
            if len(ids) + extra + new > context:
                too_long.append((item.id, len(ids) + extra, what))
                break
    if too_long:
        item_id, n, what = too_long[0]
        more = f" ({len(too_long) - 1} more items are too long as well)" if len(too_long) > 1 else ""
        raise DataError(
            f"eval.prompts: item {item_id} does not fit the model's context: {n} tokens (prompt, chat "
            f"template{what}) + {new} new tokens (generation.max_new_tokens) = {n + new}, more than the "
            f"{context} positions of model {config.model.name} ({key}){more}; shorten or drop the item, or "
            "lower generation.max_new_tokens"
        )


def preflight(
    config: DeepAlignConfig, run_dir: Path | None = None, *, tokenizers: dict[str, Any] | None = None
) -> None:
    """Checks that read files or the environment, done before any model loads: the run dir and the cache
    dir are writable, judges' keys and packages, the evaluation set's rows (long enough for the prefill
    depths, short enough for the model's context), the rows of the training data's local files.
    `tokenizers`: loaded tokenizers by model config, kept across calls (a sweep's points share them)."""
    if run_dir is not None:
        _check_writable("hydra.run.dir (the run dir, under paths.output_dir)", run_dir)
    _check_writable("paths.cache_dir", Path(config.paths.cache_dir).expanduser())
    if config.model.source == "hf" and config.model.path:
        from deepalign.models import check_model_folder

        check_model_folder("model.path", config.model.path)
    if "analyze" in config.stages and config.analysis.reference:
        from deepalign.models import check_model_folder

        check_model_folder("analysis.reference", config.analysis.reference)
    if "train" in config.stages:
        from deepalign.data import read_component

        if not config.data.components:
            raise DataError("data.components: no training data configured (choose a data= preset)")
        for name, comp in config.data.components.items():
            local = Path(comp.source).suffix.lower() in (".jsonl", ".json", ".csv")
            if local or comp.source.startswith("demo:"):  # hub sets are read by the stage
                read_component(comp, f"data.components.{name}")
    if "attack" in config.stages:
        from deepalign.judges import check_judges

        check_judges(config.judge)
    if "attack" in config.stages or "analyze" in config.stages:
        from deepalign.attacks import build_attacks, read_eval_items
        from deepalign.models import load_tokenizer

        loaded = {} if tokenizers is None else tokenizers

        def tokenizer() -> Any:  # loaded once, where a check needs it
            if repr(config.model) not in loaded:
                loaded[repr(config.model)] = load_tokenizer(config.model)
            return loaded[repr(config.model)]

        items = read_eval_items(config.eval)
        attacks = build_attacks(config.attack) if "attack" in config.stages else []
        for attack in attacks:  # e.g. harmful responses long enough for the prefill depths
            attack.check(items, tokenizer, system=config.data.system_prompt)
        if "attack" in config.stages:
            check_context(config, items, attacks, tokenizer())


def run(
    cfg: DictConfig,
    run_dir: Path,
    run_name: str | None = None,
    *,
    argv: list[str] | None = None,
    checked: bool = False,
) -> dict[str, float]:
    """Validate `cfg`, record the run, run every stage not already done with this config; return metrics.

    The run dir is locked for the duration (`rundir.lock_run_dir`): a second process on it fails at once.
    In a launched run (RANK / WORLD_SIZE set) every rank runs `train`; rank 0 alone writes config.yaml,
    env.json, metrics.json, stages.json and the W&B run, and runs the stages after `train` (the other
    ranks return once training is done). `checked`: a worker of a launched run, whose parent already ran
    the preflight checks and holds the lock; `argv`: the command line to record (the parent's).
    """
    if not checked:
        _check_writable("hydra.run.dir (the run dir, under paths.output_dir)", run_dir)
    with contextlib.nullcontext() if checked else lock_run_dir(run_dir):
        return _run(cfg, run_dir, run_name, argv, checked)


def _run(
    cfg: DictConfig, run_dir: Path, run_name: str | None, argv: list[str] | None, checked: bool
) -> dict[str, float]:
    """`run` in a run dir already held."""
    config = validate(cfg)  # fails here, naming the key, before anything heavy happens
    if not checked:
        preflight(config, run_dir)
    main_process, distributed = process_rank() == 0, world_size() > 1
    resolved = redact(OmegaConf.to_container(cfg, resolve=True))
    run_dir.mkdir(parents=True, exist_ok=True)
    # the records of earlier runs here, read before anything is written (a directory in a record's place
    # stops the run as it found it)
    metrics = MetricsFile(run_dir / "metrics.json")
    state_path = run_dir / "stages.json"
    state = read_stage_state(state_path)
    env = environment_record(argv, config)  # with the precision decision where a setting is auto
    if main_process:
        write_text_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(resolved)))
        write_json_atomic(run_dir / "env.json", env)
        if (run_dir / ".hydra").is_dir():
            scrub_files(run_dir / ".hydra")

    tracker = start_tracker(config.logger, run_dir, {**resolved, "env": env}, name=run_name)
    ctx = RunContext(
        config=config,
        run_dir=run_dir,
        metrics=metrics,
        tracker=tracker,
        raw_config=cfg,
        main_process=main_process,
        resolved=fingerprinted(resolved, config),
    )
    # a stage's record counts only under its current fingerprint (an old-format one: re-checked by running);
    # the models that finished stages saved are what later stages load (in the order they ran)
    for name in state:
        spec = STAGES.get(name, "stages") if name in STAGES else None
        if spec is not None and spec.model_dir and state[name] == ctx.stage_fingerprint(name):
            ctx.finished[name] = None
    exit_code = 1
    try:
        for name in config.stages:
            stage_fingerprint = ctx.stage_fingerprint(name)
            if state.get(name) == stage_fingerprint:
                ctx.finished[name] = None
                log.info("stage %s: already done in %s with this config, skipped", name, run_dir)
                continue
            if not main_process and name != "train":
                break  # evaluation runs on rank 0 alone (train is the first stage: validated)
            log.info("stage %s: start", name)
            start = time.perf_counter()
            spec = STAGES.get(name, "stages")
            work = gflop_so_far()
            with PeakMemory() as peak:
                values = spec.fn(ctx)
            if not isinstance(values, dict):
                raise TypeError(f"stage {name} returned {type(values).__name__}, not a dict of metrics")
            values[f"time/{name}_s"] = round(time.perf_counter() - start, 3)
            values[f"flops/{name}/gflop"] = round(gflop_so_far() - work, 1)
            values.update(peak.metrics(f"memory/{name}"))
            ctx.finished.pop(name, None)
            ctx.finished[name] = None
            if spec.model_dir:
                ctx.forget_model()  # later stages load the model it saved
            if distributed and name == "train":
                end_process_group()  # the ranks part here; rank 0 evaluates on its own
            if not main_process:
                continue
            metrics.update(values)
            tracker.log(values)
            failed = failed_judgments(values)  # not done: its next run asks for them again
            if failed:
                log.warning("stage %s: %d judgments failed; run it again to retry them", name, failed)
            else:
                state[name] = stage_fingerprint
                write_json_atomic(state_path, state)
            log.info("stage %s: done in %.1fs", name, values[f"time/{name}_s"])
        tracker.summary(metrics.values)
        exit_code = 0
    except KeyboardInterrupt as err:
        exit_code = 143 if isinstance(err, Terminated) else 130  # as a shell reports SIGTERM, Ctrl-C
        raise
    finally:
        tracker.finish(exit_code=exit_code)
    log.info("run dir: %s", run_dir)
    return dict(metrics.values)


def start_workers(cfg: DictConfig, run_dir: Path, run_name: str | None) -> None:
    """`launcher=torchrun|accelerate|deepspeed`: check the config once here, then start the workers
    (`python -m deepalign.worker RUN_DIR`) on this run dir; exits with their code if they fail."""
    config = validate(cfg)
    preflight(config, run_dir)
    if (run_dir / ".hydra").is_dir():
        scrub_files(run_dir / ".hydra")
    lc = config.launcher
    if lc.nnodes > 1:
        log.info("node %d of %d: all nodes need this run dir, shared: %s", lc.node_rank, lc.nnodes, run_dir)
    if lc.node_rank == 0:  # the run dir's one holder; the workers (and the other nodes) share it
        with lock_run_dir(run_dir):
            code = launch(cfg, lc, run_dir, run_name)
    else:
        code = launch(cfg, lc, run_dir, run_name)
    if code:
        print(f"deepalign: {lc.name} workers failed (exit {code}); see {run_dir}", file=sys.stderr)
        raise SystemExit(code)
