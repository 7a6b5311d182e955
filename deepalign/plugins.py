"""Extension points: losses, attacks, judges and stages register by name, built-ins and plugins alike.

A plugin is a module that registers components when it is imported:

    from deepalign.plugins import register_loss

    @register_loss("scaled_sft")
    def scaled_sft(inputs, params):
        return -(inputs.policy_logps[inputs.mask]).sum() / inputs.n_tokens * float(params.get("scale", 1.0))

and is named in the config (`plugins=[my_losses]`, importable from PYTHONPATH) or installed as a package
that declares an entry point in the group `deepalign.plugins`. Plugins are imported before the config is
composed (those on the command line and installed ones) or validated (those in a YAML file), so their
components are known to `validate` and listed by `deepalign --help`. See docs/EXTENDING.md.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import pkgutil
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import MISSING, dataclass, fields, is_dataclass
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


# Extra inputs a loss may ask for (`register_loss(needs=...)`); each is a field of `LossInputs`.
LOSS_NEEDS = ("reference", "beta", "hidden_states", "logits_at", "no_adapter")


@dataclass(frozen=True)
class LossSpec:
    """A training objective, one of two signatures (`legacy` tells which), returning a scalar loss, or
    (loss, logs) where logs maps names to floats averaged between log steps and logged as `train/<name>`.

    `fn(inputs, params)`: inputs, a `deepalign.losses.inputs.LossInputs` (the target log-probs, the mask,
    the step's target-token count, the extras in `needs` and the typed `config`); params: `loss.params`.
    `fn(policy_logps, reference_logps, mask, n_tokens, params)` (five positional parameters, `legacy`):
    params is `loss.params` plus `beta` (the `loss.beta` schedule); no extras but the reference.

    needs: the extra inputs, names from LOSS_NEEDS. config: a dataclass of the loss's settings, read from
    `loss.params` and checked at validation (`settings`); "logits_at" needs one with a field `logits_at`,
    the token ids. check: an optional `check(params, key)` raising ConfigError on bad `loss.params`, run at
    validation (before loading)."""

    name: str
    fn: Callable[..., Any]
    needs: tuple[str, ...] = ()
    module: str = ""
    check: Callable[[dict[str, Any], str], None] | None = None
    config: type | None = None
    legacy: bool = False

    @property
    def needs_reference(self) -> bool:
        """Whether the train stage computes (and caches) the reference model's log-probs first."""
        return "reference" in self.needs

    def settings(self, params: Mapping[str, Any], key: str = "loss.params") -> Any:
        """`params` as the loss's `config` dataclass, checked (None for a loss without one); a ConfigError
        names the key (`key.NAME`)."""
        if self.config is None:
            return None
        settings = typed_settings(self.config, params, key, f"loss {self.name}")
        if "logits_at" in self.needs:
            ids = settings.logits_at
            ok = isinstance(ids, list) and ids and all(type(i) is int and i >= 0 for i in ids)
            if not ok:
                raise ConfigError(f"{key}.logits_at: loss {self.name} needs a list of token ids, got {ids!r}")
        return settings


def typed_settings(
    config: type, params: Mapping[str, Any], key: str, owner: str, *, ignore_unknown: bool = False
) -> Any:
    """`params` (plain values) as an instance of the dataclass `config`, its `check(key)` run where it has
    one. An unknown key (unless `ignore_unknown`) or a missing required one is a ConfigError naming it."""
    names = [f.name for f in fields(config)]
    for name in params:
        if name not in names and not ignore_unknown:
            raise ConfigError(f"{key}.{name}: unknown key; {owner} has {', '.join(names) or 'no settings'}")
    for f in fields(config):
        if f.default is MISSING and f.default_factory is MISSING and f.name not in params:
            raise ConfigError(f"{key}.{f.name}: {owner} needs it (set ++{key}.{f.name}=VALUE)")
    settings = config(**{name: params[name] for name in names if name in params})
    if callable(getattr(settings, "check", None)):
        settings.check(key)
    return settings


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
    """A stage: `fn(ctx: RunContext) -> metrics`, and what the runner needs to know to run it.

    - sections: the config sections (or dotted keys) its result depends on, for its fingerprint; None: the
      whole config.
    - config: a dataclass for the stage's own top-level section, stored under `key` (default: the stage's
      name). Its optional `check(key)` runs at validation when the stage is selected, an optional
      `check_always(key)` for every config (values wrong whatever runs, such as a row limit below 1).
    - model_dir: where, in the run dir, the stage saves a model that the later stages of the run evaluate
      (train: `model`); None for stages that only measure.
    - ranks: "main" (rank 0 alone runs it, after the all-rank stages) or "all" (every process of a launched
      run runs it: such stages come first; after the last of them the process group ends).
    - single_process: the stage runs in one process; a multi-process launcher is rejected at validation.
    - check: `check(config)`, run at validation when the stage is selected: raises ConfigError naming the
      key (what the stage needs across sections).
    - preflight: `preflight(config, tokenizer)`, run before any model loads when the stage is selected:
      checks that read files or the environment; `tokenizer()` loads the run's tokenizer once.
    - fingerprint: `fingerprint(ctx) -> dict`, values added to the stage's fingerprint that its sections do
      not show (what an `auto` setting resolves to on this machine)."""

    name: str
    fn: Callable[..., dict[str, float]]
    sections: tuple[str, ...] | None = None
    config: type | None = None
    model_dir: str | None = None
    module: str = ""
    key: str = ""  # the config section of `config`; empty: the stage's name
    ranks: str = "main"
    single_process: bool = False
    check: Callable[[Any], None] | None = None
    preflight: Callable[[Any, Callable[[], Any]], None] | None = None
    fingerprint: Callable[[Any], dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        if not self.key:
            object.__setattr__(self, "key", self.name)  # frozen: filled in once, here


RANKS = ("main", "all")  # a stage runs on rank 0 alone, or on every rank of a launched run


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

    def registered(self) -> list[tuple[str, T]]:
        """The specs registered so far, without importing the built-ins (for checks while registering)."""
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
    name: str,
    *,
    config: type | None = None,
    needs: Iterable[str] = (),
    needs_reference: bool = False,
    check: Callable[[dict[str, Any], str], None] | None = None,
) -> Callable[[T], T]:
    """Register a loss function under `name` (`loss.name=NAME`); see `LossSpec` for its two signatures.
    `config`: the dataclass of its settings (`loss.params`). `needs`: extra inputs, from LOSS_NEEDS
    ("reference": the train stage computes and caches the reference model's log-probs first, as
    `needs_reference=True` does). `check(params, key)`: validates `loss.params` before anything runs."""
    wanted = tuple(dict.fromkeys([*needs, *(["reference"] if needs_reference else [])]))
    unknown = [n for n in wanted if n not in LOSS_NEEDS]
    if unknown:
        raise PluginError(f"loss {name!r}: unknown needs {unknown}; known: {', '.join(LOSS_NEEDS)}")
    if config is not None and not is_dataclass(config):
        raise PluginError(f"loss {name!r}: config must be a dataclass, got {config!r}")
    if "logits_at" in wanted and (config is None or "logits_at" not in {f.name for f in fields(config)}):
        raise PluginError(f"loss {name!r} needs logits_at: its config needs a field logits_at, the token ids")

    def add(fn: T) -> T:
        legacy = _positional_parameters(fn) == 5
        extras = [n for n in wanted if n not in ("reference", "beta")]
        if legacy and extras:
            raise PluginError(
                f"loss {name!r} needs {', '.join(extras)}: the five-argument signature gets no extra inputs; "
                "write fn(inputs, params)"
            )
        module = getattr(fn, "__module__", "")
        LOSSES.add(name, LossSpec(name, fn, wanted, module, check, config, legacy))  # type: ignore[arg-type]
        return fn

    return add


def _positional_parameters(fn: Callable[..., Any]) -> int:
    """How many positional parameters `fn` takes (five: the loss signature from before `LossInputs`)."""
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(p.kind in kinds for p in inspect.signature(fn).parameters.values())


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
    key: str | None = None,
    model_dir: str | None = None,
    ranks: str = "main",
    single_process: bool = False,
    check: Callable[[Any], None] | None = None,
    preflight: Callable[[Any, Callable[[], Any]], None] | None = None,
    fingerprint: Callable[[Any], dict[str, Any]] | None = None,
) -> Callable[[T], T]:
    """Register a stage function `fn(ctx) -> metrics` under `name` (`stages=[..., NAME]`); see `StageSpec`."""
    if config is not None and not is_dataclass(config):
        raise PluginError(f"stage {name!r}: config must be a dataclass, got {config!r}")
    if key is not None and config is None:
        raise PluginError(f"stage {name!r}: key {key!r} names the section of a config; give config= too")
    if ranks not in RANKS:
        raise PluginError(f"stage {name!r}: ranks must be one of {', '.join(RANKS)}, got {ranks!r}")
    if key is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
        raise PluginError(f"stage {name!r}: key {key!r}: use letters, digits and _ (it is a config key)")
    section = name if key is None else key

    def add(fn: T) -> T:
        module = getattr(fn, "__module__", "")
        for other, spec in STAGES.registered():  # two sections under one key would be one section
            if config is not None and spec.config is not None and other != name and spec.key == section:
                raise PluginError(
                    f"stage {name!r} ({module}): config section {section!r} already belongs to stage "
                    f"{other!r} ({spec.module}); give it another key"
                )
        spec = StageSpec(
            name,
            fn,  # type: ignore[arg-type]
            sections=tuple(sections) if sections is not None else None,
            config=config,
            model_dir=model_dir,
            module=module,
            key=section,
            ranks=ranks,
            single_process=single_process,
            check=check,
            preflight=preflight,
            fingerprint=fingerprint,
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
