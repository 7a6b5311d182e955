"""Extension points: losses, attacks, judges and stages register by name, built-ins and plugins alike.

A plugin is a module that registers components when it is imported:

    from deepalign.plugins import register_loss

    @register_loss("scaled_sft")
    def scaled_sft(policy_logps, reference_logps, mask, n_tokens, params):
        return -(policy_logps[mask]).sum() / n_tokens * float(params.get("scale", 1.0))

and is named in the config (`plugins=[my_losses]`, importable from PYTHONPATH) or installed as a package
that declares an entry point in the group `deepalign.plugins`. Plugins are imported before the config is
composed (those on the command line and installed ones) or validated (those in a YAML file), so their
components are known to `validate` and listed by `deepalign --help`. See docs/EXTENDING.md.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, is_dataclass
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

from deepalign.errors import ConfigError

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "deepalign.plugins"
# The packages of the built-in components: each of their modules is imported first, and registers the same way
# a plugin does (a new built-in is one new module in one of them).
BUILTIN_PACKAGES = ("deepalign.losses", "deepalign.attacks", "deepalign.judges", "deepalign.stages")

T = TypeVar("T")


class PluginError(ConfigError):
    """A plugin cannot be imported, registers a name twice, or breaks its contract (a loss that returns no
    scalar tensor with gradients); the message names it and its module."""


@dataclass(frozen=True)
class LossSpec:
    """A training objective: `fn(policy_logps, reference_logps, mask, n_tokens, params)` -> scalar loss, or
    (loss, logs) where logs maps names to floats averaged between log steps and logged as `train/<name>`.

    policy_logps, reference_logps: [batch, seq] per-token log-probs of the targets (reference None unless
    `needs_reference`); mask: bool [batch, seq], the target tokens; n_tokens: the target tokens of the whole
    optimizer step (divide by it: gradient accumulation and data parallelism then match one big batch);
    params: `loss.params`, plus `beta` (the `loss.beta` schedule, a `BetaSchedule`). check: an optional
    `check(params, key)` raising ConfigError on bad `loss.params`, run at validation (before loading)."""

    name: str
    fn: Callable[..., Any]
    needs_reference: bool = False
    module: str = ""
    check: Callable[[dict[str, Any], str], None] | None = None


@dataclass(frozen=True)
class ComponentSpec:
    """An attack or judge type: `cls(name, cfg, **context)` builds one instance from its config, an
    instance of the dataclass `config` (whose optional `check(key)` method raises ConfigError)."""

    name: str
    cls: type
    config: type
    module: str = ""
    rank: int = 100  # judges: the primary judge is the selected one of lowest rank (eval.primary_judge unset)


@dataclass(frozen=True)
class StageSpec:
    """A stage: `fn(ctx: RunContext) -> metrics`.

    sections: the config sections (or dotted keys) its result depends on, for its fingerprint; None: the
    whole config. config: a dataclass for the stage's own top-level section (its key is the stage's name).
    model_dir: where, in the run dir, the stage saves a model that the later stages of the run evaluate
    (train: `model`); None for stages that only measure."""

    name: str
    fn: Callable[..., dict[str, float]]
    sections: tuple[str, ...] | None = None
    config: type | None = None
    model_dir: str | None = None
    module: str = ""


class Registry(Generic[T]):
    """Named components of one kind, in registration order."""

    def __init__(self, kind: str):
        self.kind = kind
        self._specs: dict[str, T] = {}

    def add(self, name: str, spec: T) -> None:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise PluginError(
                f"{self.kind} name {name!r}: use letters, digits and _ (it becomes a config key)"
            )
        old = self._specs.get(name)
        if old is not None:
            before, now = _registered(old), _registered(spec)
            if before[0] != now[0]:
                raise PluginError(f"{self.kind} {name!r} is registered twice: by {before[0]} and by {now[0]}")
            if before[1] != now[1]:  # the same definition again is the module run again (importlib.reload)
                raise PluginError(
                    f"{self.kind} {name!r} is registered twice by {now[0]}: by {before[1]} and by {now[1]}; "
                    "give one of them another name"
                )
        self._specs[name] = spec

    def get(self, name: str, key: str) -> T:
        """The spec named `name`, or a ConfigError naming the config key and the registered names."""
        load_builtins()
        if name not in self._specs:
            raise ConfigError(
                f"{key}: unknown {self.kind} {name!r}; registered: {', '.join(self._specs)} "
                "(a plugin's components: plugins=[MODULE])"
            )
        return self._specs[name]

    def __contains__(self, name: object) -> bool:
        load_builtins()
        return name in self._specs

    def __iter__(self) -> Iterator[str]:
        load_builtins()
        return iter(list(self._specs))

    def items(self) -> list[tuple[str, T]]:
        load_builtins()
        return list(self._specs.items())


def _registered(spec: Any) -> tuple[str, str]:
    """The module and the qualified name of what a spec registers (its function or class)."""
    obj = getattr(spec, "fn", None) or getattr(spec, "cls", None)
    return getattr(spec, "module", ""), getattr(obj, "__qualname__", repr(obj))


LOSSES: Registry[LossSpec] = Registry("loss")
ATTACKS: Registry[ComponentSpec] = Registry("attack")
JUDGES: Registry[ComponentSpec] = Registry("judge")
STAGES: Registry[StageSpec] = Registry("stage")


def register_loss(
    name: str, *, needs_reference: bool = False, check: Callable[[dict[str, Any], str], None] | None = None
) -> Callable[[T], T]:
    """Register a loss function under `name` (`loss.name=NAME`); see `LossSpec` for its signature.
    `needs_reference=True`: the train stage computes (and caches) the reference model's log-probs first.
    `check(params, key)`: validates `loss.params` before anything runs."""

    def add(fn: T) -> T:
        module = getattr(fn, "__module__", "")
        LOSSES.add(name, LossSpec(name, fn, needs_reference, module, check))  # type: ignore[arg-type]
        return fn

    return add


def _component(registry: Registry[ComponentSpec], name: str, config: type, rank: int) -> Callable[[T], T]:
    if not is_dataclass(config):
        raise PluginError(f"{registry.kind} {name!r}: config must be a dataclass, got {config!r}")

    def add(cls: T) -> T:
        registry.add(name, ComponentSpec(name, cls, config, getattr(cls, "__module__", ""), rank))  # type: ignore[arg-type]
        return cls

    return add


def register_attack(name: str, *, config: type) -> Callable[[T], T]:
    """Register an attack class (see `deepalign.attacks.Attack`) and its settings dataclass under `name`:
    selected with `attack=[NAME]` (a conf/attack/NAME.yaml) or `+attack.INSTANCE={type: NAME, ...}`."""
    return _component(ATTACKS, name, config, 100)


def register_judge(name: str, *, config: type, rank: int = 100) -> Callable[[T], T]:
    """Register a judge class (see `deepalign.judges.JudgeBase`) and its settings dataclass under `name`:
    selected with `judge=[NAME]` or `+judge.INSTANCE={type: NAME, ...}`. When `eval.primary_judge` is unset,
    the selected judge of lowest `rank` gives the `asr/...` keys (built-ins: rubric and strongreject 0;
    classifier, harmbench, llamaguard, wildguard 1; keyword 2)."""
    return _component(JUDGES, name, config, rank)


def register_stage(
    name: str,
    *,
    sections: Iterable[str] | None = None,
    config: type | None = None,
    model_dir: str | None = None,
) -> Callable[[T], T]:
    """Register a stage function `fn(ctx) -> metrics` under `name` (`stages=[..., NAME]`); see `StageSpec`."""
    if config is not None and not is_dataclass(config):
        raise PluginError(f"stage {name!r}: config must be a dataclass, got {config!r}")

    def add(fn: T) -> T:
        spec = StageSpec(
            name,
            fn,  # type: ignore[arg-type]
            tuple(sections) if sections is not None else None,
            config,
            model_dir,
            getattr(fn, "__module__", ""),
        )
        STAGES.add(name, spec)
        return fn

    return add


_builtins_loaded = False
_loaded: set[str] = set()


def load_builtins() -> None:
    """Import every module of the built-in packages (once)."""
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    try:
        for name in BUILTIN_PACKAGES:
            package = importlib.import_module(name)
            for module in pkgutil.iter_modules(package.__path__):
                if not module.name.startswith("_"):
                    importlib.import_module(f"{name}.{module.name}")
    except BaseException:
        _builtins_loaded = False  # the next call reports the same failure instead of a half-filled registry
        raise


def load_plugins(names: Iterable[str] = (), *, key: str = "plugins", entry_points_too: bool = True) -> None:
    """Import the built-ins, the installed plugins (entry-point group `deepalign.plugins`) and the named
    modules (importable: on PYTHONPATH or installed). A module that fails to import (whatever it raises,
    SystemExit included) is a PluginError naming it and the config key."""
    load_builtins()
    if entry_points_too:
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if ep.value in _loaded:
                continue
            try:
                ep.load()
            except (Exception, SystemExit) as err:  # sys.exit() in a module would end the run without a word
                raise PluginError(
                    f"installed plugin {ep.name} ({ep.value}) failed to import: {_import_error(err)}"
                ) from err
            _loaded.add(ep.value)
    for i, name in enumerate(names):
        if name in _loaded:
            continue
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name is not None and name.split(".")[0] == err.name.split(".")[0]:
                raise PluginError(
                    f"{key}[{i}]: no module {name!r} (put its folder on PYTHONPATH, or install it)"
                ) from None
            raise PluginError(f"{key}[{i}]: plugin {name!r} failed to import: {err}") from err
        except (Exception, SystemExit) as err:
            raise PluginError(f"{key}[{i}]: plugin {name!r} failed to import: {_import_error(err)}") from err
        _loaded.add(name)
        log.debug("plugin %s imported", name)


def _import_error(err: BaseException) -> str:
    """What a failed import raised, in words: its message, or its type where that says more."""
    if isinstance(err, SystemExit):
        return f"it called sys.exit({err.code!r}) (SystemExit)"
    return str(err) or type(err).__name__


def describe() -> str:
    """The registered components, one line per kind (for `deepalign --help`)."""
    lines = []
    for title, registry in (
        ("losses (loss.name)", LOSSES),
        ("attacks (attack=[...])", ATTACKS),
        ("judges (judge=[...])", JUDGES),
        ("stages (stages=[...])", STAGES),
    ):
        lines.append(f"{title}: {', '.join(registry)}")
    return "\n".join(lines)
