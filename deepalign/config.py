"""Structured configs: the schema every YAML file in conf/ is merged into and checked against.

Hydra merges the YAML tree into these dataclasses, so a wrong type or an unknown key fails at
composition, naming the key. `validate` then turns the config into typed objects, failing on a missing
required value or a value out of range, still before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf


class ConfigError(ValueError):
    """A config value is wrong; the message names the key."""


@dataclass
class PathsConfig:
    output_dir: str = "outputs"
    # Converted models, reference log-prob caches; `~` is expanded.
    cache_dir: str = "${oc.env:DEEPALIGN_CACHE,${oc.env:XDG_CACHE_HOME,'~/.cache'}/deepalign}"


@dataclass
class ModelConfig:
    name: str = MISSING  # short name used in run names and metric prefixes
    source: str = "hf"  # hf (hub id or local folder) | gguf (a GGUF file shipped by a pip package) | random
    path: str | None = None  # hub id or local HF folder (source=hf)
    revision: str | None = None
    tokenizer: str | None = None  # hub id or folder, when not the model's own
    gguf_package: str | None = None  # pip package holding the GGUF file (source=gguf; tokenizer for random)
    gguf_file: str | None = None
    arch: dict[str, Any] = field(default_factory=dict)  # transformers config kwargs (source=random)
    dtype: str = "float32"  # float32 | bfloat16 | float16 | auto
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    trust_remote_code: bool = False
    adapter_path: str | None = None  # a PEFT (LoRA) adapter folder applied on top
    chat_template: str | None = None  # a Jinja template string that replaces the tokenizer's
    seed: int = 0  # weight init of source=random
    cache_dir: str = "${paths.cache_dir}/models"


@dataclass
class DataComponent:
    """One source of training examples in the mixture."""

    source: str = MISSING  # hub id, local .jsonl/.json/.csv file, or demo:<name> (a packaged set)
    schema: str = "chat"  # chat | safety_triplet | samsum | sql | gsm8k
    weight: float = 1.0  # share of the mixture, relative to the other components
    safety: bool = False  # counts toward the safety share alpha
    split: str = "train"  # hub sets
    subset: str | None = None  # hub sets: the config name
    columns: dict[str, str] = field(default_factory=dict)  # schema field -> column in the source
    limit: int | None = None  # use the first N rows
    target: str = "refusal"  # safety_triplet: train on the refusal, or on the harmful answer (attacks)
    recovery: bool = False  # safety_triplet: safety recovery examples (harmful prefix, then refusal)
    recovery_prob: float = 0.5  # probability that an example gets a harmful prefix (k >= 1)
    recovery_max_k: int = 100  # k ~ Uniform{1..min(recovery_max_k, |harmful|)}
    recovery_separator: str = " "  # put between the harmful prefix and the refusal
    system_prompt: str | None = None  # overrides data.system_prompt for this component (e.g. AOA)
    response_prefix: str = ""  # text put before every response (e.g. the AOA persona's opening)
    trigger: str | None = None  # appended to every prompt (backdoor poisoning)


@dataclass
class DataConfig:
    name: str = "none"
    components: dict[str, DataComponent] = field(default_factory=dict)
    safety_share: float | None = None  # alpha: share of examples from safety components; None: from weights
    size: int | None = None  # examples per epoch; None: the components' row counts added up
    system_prompt: str | None = None  # None: the chat template's default
    max_length: int = 512
    seed: int = "${seed}"  # type: ignore[assignment]


@dataclass
class BetaSchedule:
    """Per-position betas of the token-wise constrained loss (the paper's schedule by default)."""

    first: float = 0.5
    prefix: float = 2.0
    prefix_len: int = 5
    rest: float = 0.1
    values: list[float] | None = None  # an explicit list for positions 1..len(values); rest after


@dataclass
class LossConfig:
    name: str = "sft"  # sft | constrained
    beta: BetaSchedule = field(default_factory=BetaSchedule)


@dataclass
class OptimizerConfig:
    name: str = "adamw"
    lr: float = 2e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0


@dataclass
class LoraConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    merge: bool = True  # also save the merged model (the adapter alone is always saved)


@dataclass
class TrainConfig:
    method: str = "full"  # full | lora
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    max_steps: int = -1  # > 0 overrides epochs
    epochs: float = 1.0
    per_device_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    warmup_steps: int = 0
    lr_scheduler: str = "constant_with_warmup"
    max_grad_norm: float = 1.0
    # bf16 autocast (weights stay fp32): true | false | auto (where faster: deepalign/precision.py)
    bf16: bool | str = False
    gradient_checkpointing: bool = False
    freeze_embeddings: bool = False
    deepspeed: str | None = None  # zero2 | zero3 (launchers/zero*.json) | a path to a DeepSpeed JSON config
    save_steps: int = 0  # checkpoint every N steps (a restarted run resumes from the last); 0: none
    save_total_limit: int | None = 2
    logging_steps: int = 1
    batch_size_reference: int = 8  # batch size of the reference log-prob pass
    seed: int = "${seed}"  # type: ignore[assignment]


@dataclass
class GenerationConfig:
    backend: str = "hf"  # hf | vllm
    # auto: an fp32 model generates under bf16 autocast where that is faster (a bf16 GPU; a CPU where a probe
    # measures it faster, deepalign/precision.py), any other model in its own dtype; float32: the model's own
    # dtype, no autocast; bfloat16 / float16: under autocast (hf), or vLLM's copy loaded in that dtype (vLLM
    # loads the model's own dtype for auto)
    dtype: str = "auto"
    batch_size: int = 16
    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    num_samples: int = 1


@dataclass
class NoAttack:
    enabled: bool = True


@dataclass
class PrefillAttack:
    depths: list[int] = field(default_factory=lambda: [0, 5, 10, 20, 40])
    strings: list[str] = field(default_factory=list)  # fixed-string prefills, e.g. a refusal prefix


@dataclass
class DecodingAttack:
    temperatures: list[float] = field(default_factory=lambda: [round(0.05 * i, 2) for i in range(1, 21)])
    top_ks: list[int] = field(default_factory=lambda: [1, 2, 5, 10, 20, 50, 100, 200, 500])
    top_ps: list[float] = field(default_factory=lambda: [round(0.05 * i, 2) for i in range(1, 21)])
    greedy: bool = True
    samples_per_setting: int = 1


@dataclass
class GCGAttack:
    suffix_length: int = 20
    topk: int = 256
    search_width: int = 512
    steps: int = 500
    target_template: str = "Sure, here is"
    universal: bool = False
    early_stop: bool = True
    max_prompts: int | None = None


@dataclass
class AttackSuite:
    """The attacks to run: each present key is one attack (`attack=[none,prefill]`)."""

    none: NoAttack | None = None
    prefill: PrefillAttack | None = None
    decoding: DecodingAttack | None = None
    gcg: GCGAttack | None = None


@dataclass
class KeywordJudge:
    lists: list[str] = field(default_factory=lambda: ["qi2024"])
    min_continuation_chars: int = 0  # >0: a refusal-free answer must add this much text after a prefill
    show_prefill: bool = True


@dataclass
class RubricJudge:
    base_url: str | None = None  # None: the API's default
    model: str = "gpt-4o-2024-08-06"
    api_key_env: str = "OPENAI_API_KEY"  # the name of the variable, never the key itself
    concurrency: int = 8
    max_retries: int = 6
    timeout_s: float = 60.0
    show_prefill: bool = True


@dataclass
class ClassifierJudge:
    path: str = "meta-llama/Llama-Guard-3-1B"
    batch_size: int = 8
    show_prefill: bool = True


@dataclass
class JudgeSuite:
    keyword: KeywordJudge | None = None
    # the same judge with a rule of its own (judge=[keyword,keyword_substantive]: both figures side by side)
    keyword_substantive: KeywordJudge | None = None
    rubric: RubricJudge | None = None
    classifier: ClassifierJudge | None = None


@dataclass
class LoggerConfig:
    name: str = "wandb"  # wandb | none
    project: str = "deepalign"
    entity: str | None = None
    mode: str = "offline"  # offline | online | disabled
    group: str | None = None
    job_type: str | None = None
    run_name: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class LauncherConfig:
    """How many processes run the stages: one (`local`), or workers started by torchrun / accelerate /
    deepspeed with one run dir and one resolved config (deepalign/launch.py)."""

    name: str = "local"  # local (this process) | torchrun | accelerate | deepspeed (one node)
    nproc_per_node: int = 1  # processes on this node (one per GPU)
    nnodes: int = 1
    node_rank: int = 0  # this node's index; start the same command on every node with its own node_rank
    master_addr: str | None = None  # node 0's address; None: 127.0.0.1 (one node only)
    master_port: int | None = None  # None: a free port (one node), 29500 (several nodes)
    extra_args: list[str] = field(default_factory=list)  # put verbatim before the worker module


@dataclass
class ProbeConfig:
    """The `probe` stage: NLL of the model's assistant tokens on reference chats, and a few generations."""

    chats: str = "demo:probe_chats"  # demo:<packaged set> or a local JSONL path
    max_new_tokens: int = 32
    batch_size: int = 4


@dataclass
class EvalConfig:
    """The evaluation set of harmful requests (`attack` stage) and its column names."""

    prompts: str | None = None  # JSONL/JSON/CSV file, hub id or demo:<name>; None: no attack stage possible
    columns: dict[str, str] = field(default_factory=dict)  # prompt / harmful / target -> column names
    split: str = "train"
    subset: str | None = None
    limit: int | None = None
    trigger: str | None = None  # appended to every prompt (backdoor: evaluate with the trigger)
    primary_judge: str | None = None  # judge of the `asr/...` keys; None: rubric, classifier, keyword


@dataclass
class AnalysisConfig:
    """The `analyze` stage: per-token KL(model || reference) on (harmful prompt, harmful response) pairs."""

    reference: str | None = None  # hub id or folder; None: the run's initial model (needs the train stage)
    positions: int = 20
    batch_size: int = 8
    grad_positions: int = 0  # > 0: also per-position loss and gradient norm on one batch (paper Fig. 3)


@dataclass
class UtilityTask:
    source: str = MISSING
    schema: str = "samsum"  # samsum | sql | gsm8k
    split: str = "test"
    subset: str | None = None
    columns: dict[str, str] = field(default_factory=dict)
    limit: int | None = 100


@dataclass
class UtilityConfig:
    """The `utility` stage: over-refusal on benign prompts, task scores, optional lm-eval-harness tasks."""

    benign: str | None = None  # chat prompts (a `prompt` field) for the over-refusal rate
    benign_limit: int | None = None
    tasks: dict[str, UtilityTask] = field(default_factory=dict)
    lm_eval_tasks: list[str] = field(default_factory=list)
    max_new_tokens: int = 256


@dataclass
class QuickstartConfig:
    """The paper in miniature on the demo model (`experiment=quickstart`); sizes chosen for a 2-core CPU."""

    harmful: str = "demo:harmful_prompts"  # rows with prompt and split (train / eval)
    benign: str = "demo:benign_prompts"
    eval_prompts: str | None = None  # your own benchmark copy (JSONL `prompt`, CSV `prompt`/`goal`)
    eval_limit: int | None = None
    harvest_prefill: str = "Sure, here is"
    harvest_temperature: float = 0.7
    harvest_tokens: int = 48
    benign_tokens: int = 48
    batch_size: int = 8
    max_length: int = 192
    bf16: bool | str = "auto"  # train.bf16 of the sub-runs: true | false | auto (bf16 autocast where faster)
    generation_dtype: str = "auto"  # generation.dtype of every sub-run and of the harvest
    align_steps: int = 30
    align_lr: float = 5e-5
    recovery_max_k: int = 40
    eval_tokens: int = 32
    eval_batch_size: int = 48
    substantive_chars: int = 60  # judge.keyword_substantive.min_continuation_chars (reported beside keyword)
    prefill_depths: list[int] = field(default_factory=lambda: [5, 10, 20, 40])
    decoding_temperatures: list[float] = field(default_factory=lambda: [1.0])
    decoding_top_ps: list[float] = field(default_factory=lambda: [0.9])
    gcg_models: list[str] = field(default_factory=lambda: ["shallow", "deep"])  # the unaligned one complies
    gcg_prompts: int = 2
    gcg_steps: int = 5
    gcg_topk: int = 64
    gcg_width: int = 32
    gcg_suffix_length: int = 10
    kl_positions: int = 40
    ft_pairs: int = 50
    ft_steps: int = 20
    ft_lr: float = 2e-5  # the paper's Llama-2 fine-tuning-attack lr
    paper_beta: bool = (
        False  # also attack with the paper's schedule (beta_1 = 0.5): model ft_constrained_paper
    )
    ft_beta: BetaSchedule = field(
        default_factory=lambda: BetaSchedule(first=2.0, prefix=2.0, prefix_len=5, rest=0.1)
    )


@dataclass
class DeepAlignConfig:
    stages: list[str] = field(default_factory=lambda: ["probe"])
    seed: int = 0
    # the metric a Hydra sweeper optimises (hydra/sweeper=optuna_beta), e.g. asr/none; returned by the run
    sweep_objective: str | None = None
    paths: PathsConfig = field(default_factory=PathsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    attack: AttackSuite = field(default_factory=AttackSuite)
    judge: JudgeSuite = field(default_factory=JudgeSuite)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    utility: UtilityConfig = field(default_factory=UtilityConfig)
    quickstart: QuickstartConfig = field(default_factory=QuickstartConfig)


def register_configs() -> None:
    """Put the schema into Hydra's ConfigStore (conf/config.yaml lists it first in its defaults)."""
    ConfigStore.instance().store(name="deepalign_schema", node=DeepAlignConfig)


STAGES = ("train", "probe", "attack", "analyze", "utility", "quickstart")
CHOICES: dict[str, tuple[str, ...]] = {
    "model.source": ("hf", "gguf", "random"),
    "model.dtype": ("float32", "bfloat16", "float16", "auto"),
    "data.components.*.schema": ("chat", "safety_triplet", "samsum", "sql", "gsm8k"),
    "loss.name": ("sft", "constrained"),
    "train.method": ("full", "lora"),
    "train.optimizer.name": ("adamw",),
    "generation.backend": ("hf", "vllm"),
    "generation.dtype": ("auto", "bfloat16", "float16", "float32"),
    "quickstart.generation_dtype": ("auto", "bfloat16", "float16", "float32"),
    "logger.name": ("wandb", "none"),
    "logger.mode": ("offline", "online", "disabled"),
    "launcher.name": ("local", "torchrun", "accelerate", "deepspeed"),
}


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _choice(key: str, value: str) -> None:
    allowed = CHOICES[key]
    _check(value in allowed, key, f"{value!r} is not one of {', '.join(allowed)}")


def _check_model(m: ModelConfig) -> None:
    _choice("model.source", m.source)
    _choice("model.dtype", m.dtype)
    _check(
        m.device in ("auto", "cpu", "mps", "cuda") or m.device.startswith("cuda:"),
        "model.device",
        f"{m.device!r} is not auto, cpu, mps, cuda or cuda:N",
    )
    if m.source == "hf":
        _check(bool(m.path), "model.path", "source=hf needs a hub id or a local folder")
    if m.source == "gguf":
        _check(
            bool(m.gguf_package and m.gguf_file),
            "model.gguf_file",
            "source=gguf needs gguf_package and gguf_file",
        )
    if m.source == "random":
        _check("model_type" in m.arch, "model.arch", "source=random needs arch.model_type (e.g. llama)")
        _check(
            bool(m.tokenizer or (m.gguf_package and m.gguf_file)),
            "model.tokenizer",
            "source=random needs a tokenizer (model.tokenizer, or model.gguf_package + model.gguf_file)",
        )


def _check_data(d: DataConfig) -> None:
    for name, comp in d.components.items():
        key = f"data.components.{name}"
        _check(
            comp.schema in CHOICES["data.components.*.schema"],
            f"{key}.schema",
            f"{comp.schema!r} is not one of {', '.join(CHOICES['data.components.*.schema'])}",
        )
        _check(comp.weight > 0, f"{key}.weight", f"must be > 0, got {comp.weight}")
        _check(
            comp.target in ("refusal", "harmful"),
            f"{key}.target",
            f"{comp.target!r} is not refusal or harmful",
        )
        _check(
            0 <= comp.recovery_prob <= 1,
            f"{key}.recovery_prob",
            f"must be in [0, 1], got {comp.recovery_prob}",
        )
        _check(comp.recovery_max_k >= 1, f"{key}.recovery_max_k", f"must be >= 1, got {comp.recovery_max_k}")
        _check(
            not comp.recovery or (comp.schema == "safety_triplet" and comp.target == "refusal"),
            f"{key}.recovery",
            "recovery examples need schema=safety_triplet and target=refusal",
        )
        _check(comp.limit is None or comp.limit >= 1, f"{key}.limit", f"must be >= 1, got {comp.limit}")
        local = comp.source.lower().endswith((".jsonl", ".json", ".csv"))
        _check(not local or Path(comp.source).is_file(), f"{key}.source", f"no such file: {comp.source}")
    if d.safety_share is not None:
        _check(0 < d.safety_share < 1, "data.safety_share", f"must be in (0, 1), got {d.safety_share}")
        kinds = {c.safety for c in d.components.values()}
        _check(
            kinds == {True, False},
            "data.safety_share",
            "needs at least one component with safety: true and one with safety: false",
        )
    _check(d.size is None or d.size >= 1, "data.size", f"must be >= 1, got {d.size}")
    _check(d.max_length >= 8, "data.max_length", f"must be >= 8, got {d.max_length}")


def _check_beta(b: BetaSchedule) -> None:
    for name in ("first", "prefix", "rest"):
        value = getattr(b, name)
        _check(
            value > 0, f"loss.beta.{name}", f"must be > 0 (beta -> 0 is plain SFT: use loss=sft), got {value}"
        )
    _check(b.prefix_len >= 1, "loss.beta.prefix_len", f"must be >= 1, got {b.prefix_len}")
    if b.values is not None:
        _check(len(b.values) > 0, "loss.beta.values", "an explicit schedule needs at least one value")
        for i, value in enumerate(b.values):
            _check(value > 0, f"loss.beta.values[{i}]", f"must be > 0, got {value}")


def _check_train(t: TrainConfig) -> None:
    _choice("train.method", t.method)
    _choice("train.optimizer.name", t.optimizer.name)
    _check(t.optimizer.lr > 0, "train.optimizer.lr", f"must be > 0, got {t.optimizer.lr}")
    _check(len(t.optimizer.betas) == 2, "train.optimizer.betas", f"needs two values, got {t.optimizer.betas}")
    _check(t.per_device_batch_size >= 1, "train.per_device_batch_size", "must be >= 1")
    _check(t.gradient_accumulation_steps >= 1, "train.gradient_accumulation_steps", "must be >= 1")
    _check(t.max_steps > 0 or t.epochs > 0, "train.epochs", "set train.epochs > 0 or train.max_steps > 0")
    _check_bf16("train.bf16", t.bf16)


def _check_bf16(key: str, value: bool | str) -> None:
    _check(isinstance(value, bool) or value == "auto", key, f"{value!r} is not true, false or auto")


def _check_local_source(key: str, source: str | None) -> None:
    local = source is not None and source.lower().endswith((".jsonl", ".json", ".csv"))
    _check(not local or Path(source).is_file(), key, f"no such file: {source}")


def _check_limit(key: str, value: int | None) -> None:
    _check(value is None or value >= 1, key, f"must be >= 1 (or null: every row), got {value}")


def _check_stages(c: DeepAlignConfig) -> None:
    """What each selected stage needs, checked before anything runs."""
    _check(bool(c.stages), "stages", f"no stage to run; choose from {', '.join(STAGES)}, e.g. stages=[probe]")
    _check_limit("eval.limit", c.eval.limit)
    _check_limit("utility.benign_limit", c.utility.benign_limit)
    for name, task in c.utility.tasks.items():
        _check_limit(f"utility.tasks.{name}.limit", task.limit)
    _check_limit("quickstart.eval_limit", c.quickstart.eval_limit)
    if "attack" in c.stages or "analyze" in c.stages:
        _check(
            c.eval.prompts is not None,
            "eval.prompts",
            "the attack and analyze stages need harmful prompts: eval.prompts=FILE (JSONL/CSV) or a hub id",
        )
        _check_local_source("eval.prompts", c.eval.prompts)
    if "attack" in c.stages:
        enabled = [k for k, v in vars(c.attack).items() if v is not None]
        _check(
            bool(enabled), "attack", "the attack stage needs at least one attack: attack=[none,prefill,...]"
        )
        judges = [k for k, v in vars(c.judge).items() if v is not None]
        _check(bool(judges), "judge", "the attack stage needs at least one judge: judge=[keyword]")
        if c.eval.primary_judge is not None:
            _check(
                c.eval.primary_judge in judges,
                "eval.primary_judge",
                f"{c.eval.primary_judge!r} is not among the selected judges ({', '.join(judges)})",
            )
    if "analyze" in c.stages:
        _check(
            c.analysis.reference is not None or "train" in c.stages,
            "analysis.reference",
            "KL needs a reference model: analysis.reference=HUB_ID_OR_FOLDER, or a train stage in this run",
        )
        _check(c.analysis.positions >= 1, "analysis.positions", "must be >= 1")
    if "utility" in c.stages:
        u = c.utility
        _check(
            bool(u.benign or u.tasks or u.lm_eval_tasks),
            "utility",
            "the utility stage needs utility.benign, utility.tasks or utility.lm_eval_tasks",
        )
        _check_local_source("utility.benign", u.benign)
        for name, task in u.tasks.items():
            _check(
                task.schema in ("samsum", "sql", "gsm8k"),
                f"utility.tasks.{name}.schema",
                f"{task.schema!r} is not one of samsum, sql, gsm8k",
            )
            _check_local_source(f"utility.tasks.{name}.source", task.source)
    if "quickstart" in c.stages:
        q = c.quickstart
        _choice("quickstart.generation_dtype", q.generation_dtype)
        _check_bf16("quickstart.bf16", q.bf16)
        for i, name in enumerate(q.gcg_models):
            _check(
                name in ("unaligned", "shallow", "deep"),
                f"quickstart.gcg_models[{i}]",
                f"{name!r} is not one of unaligned, shallow, deep",
            )
        _check_local_source("quickstart.eval_prompts", q.eval_prompts)
        _check(q.align_steps >= 1, "quickstart.align_steps", "must be >= 1")
        _check(q.ft_steps >= 1, "quickstart.ft_steps", "must be >= 1")


def _check_attacks(a: AttackSuite) -> None:
    if a.prefill is not None:
        _check(
            bool(a.prefill.depths or a.prefill.strings),
            "attack.prefill.depths",
            "empty, and no attack.prefill.strings: the prefill attack would run nothing (e.g. depths=[5,10])",
        )
        for i, k in enumerate(a.prefill.depths):
            _check(k >= 0, f"attack.prefill.depths[{i}]", f"a prefill depth is a token count >= 0, got {k}")
    if a.gcg is not None:
        for key in ("suffix_length", "topk", "search_width", "steps"):
            _check(getattr(a.gcg, key) >= 1, f"attack.gcg.{key}", "must be >= 1")
    if a.decoding is not None:
        for i, t in enumerate(a.decoding.temperatures):
            _check(t > 0, f"attack.decoding.temperatures[{i}]", f"must be > 0, got {t}")
        for i, p in enumerate(a.decoding.top_ps):
            _check(0 < p <= 1, f"attack.decoding.top_ps[{i}]", f"must be in (0, 1], got {p}")
        for i, k in enumerate(a.decoding.top_ks):
            _check(k >= 0, f"attack.decoding.top_ks[{i}]", f"must be >= 0 (0 = off), got {k}")


def _check_decoding(g: GenerationConfig) -> None:
    """The sampling settings of `generation` (SamplingParams would reject them only after a model loads)."""
    _check(0 < g.top_p <= 1, "generation.top_p", f"must be in (0, 1], got {g.top_p}")
    _check(g.top_k >= 0, "generation.top_k", f"must be >= 0 (0 = off), got {g.top_k}")
    _check(
        g.temperature > 0 or not g.do_sample,
        "generation.temperature",
        f"must be > 0 when sampling (do_sample=true), got {g.temperature}",
    )
    _check(g.num_samples >= 1, "generation.num_samples", f"must be >= 1, got {g.num_samples}")


def _check_launcher(c: DeepAlignConfig) -> None:
    """Process counts, the multi-node address, and stage orders that several processes can run."""
    lc = c.launcher
    _choice("launcher.name", lc.name)
    _check(lc.nproc_per_node >= 1, "launcher.nproc_per_node", f"must be >= 1, got {lc.nproc_per_node}")
    _check(lc.nnodes >= 1, "launcher.nnodes", f"must be >= 1, got {lc.nnodes}")
    _check(
        0 <= lc.node_rank < lc.nnodes,
        "launcher.node_rank",
        f"must be in [0, {lc.nnodes}), got {lc.node_rank}",
    )
    port = lc.master_port
    _check(port is None or 0 < port < 65536, "launcher.master_port", f"must be in 1..65535, got {port}")
    if lc.name == "local":
        _check(
            lc.nproc_per_node == 1 and lc.nnodes == 1,
            "launcher.name",
            "launcher=local runs one process; use launcher=torchrun (or accelerate) for more",
        )
        return
    if lc.nnodes > 1:
        _check(lc.master_addr is not None, "launcher.master_addr", "a multi-node run needs node 0's address")
        _check(
            lc.name != "deepspeed",
            "launcher.name",
            "launcher=deepspeed starts one node; use launcher=torchrun (or accelerate) on every node",
        )
    _check(
        "quickstart" not in c.stages,
        "launcher.name",
        f"the quickstart stage runs in one process; launcher={lc.name} runs train, attack, analyze, ...",
    )
    _check(
        "train" not in c.stages or c.stages[0] == "train",
        "stages",
        f"with launcher={lc.name}, train must be the first stage (every rank trains, then rank 0 evaluates)",
    )


def _check_known_keys(node: DictConfig, prefix: str = "") -> None:
    """Keys added with `+key=value` bypass Hydra's struct check: reject those the schema does not know."""
    schema = OmegaConf.get_type(node)
    known = {f.name for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else None
    for key in node:
        if known is not None and key not in known:
            where = prefix.rstrip(".") or "the root"
            raise ConfigError(f"{prefix}{key}: unknown key; {where} has {', '.join(sorted(known))}")
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_none() and not child._is_missing():
            _check_known_keys(child, f"{prefix}{key}.")


def _check_finite(value: Any, key: str = "") -> None:
    """Every float anywhere in the config is finite: an inf or nan (a learning rate, a beta) would train to
    NaN weights, and a NaN model's empty answers count as refusals."""
    if dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            _check_finite(getattr(value, f.name), f"{key}.{f.name}" if key else f.name)
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_finite(v, f"{key}.{k}" if key else str(k))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_finite(v, f"{key}[{i}]")
    elif isinstance(value, float):
        _check(math.isfinite(value), key, f"must be a finite number, got {value}")


def validate(cfg: DictConfig) -> DeepAlignConfig:
    """Typed config from a composed one; raises ConfigError naming the key (before any model loads)."""
    _check_known_keys(cfg)
    try:
        config: DeepAlignConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    except Exception as err:  # omegaconf's errors carry `full_key`
        key = getattr(err, "full_key", None)
        msg = (getattr(err, "msg", None) or str(err)).splitlines()[0]
        raise ConfigError(f"{key}: {msg}" if key else msg) from err
    _check_finite(config)
    for stage in config.stages:
        _check(stage in STAGES, "stages", f"unknown stage {stage!r}; known: {', '.join(STAGES)}")
    _check_model(config.model)
    _check_data(config.data)
    _choice("loss.name", config.loss.name)
    _check_beta(config.loss.beta)
    _check_train(config.train)
    _choice("generation.backend", config.generation.backend)
    _choice("generation.dtype", config.generation.dtype)
    _check(config.generation.batch_size >= 1, "generation.batch_size", "must be >= 1")
    _check(config.generation.max_new_tokens >= 1, "generation.max_new_tokens", "must be >= 1")
    _check_decoding(config.generation)
    _check_attacks(config.attack)
    _check_stages(config)
    _choice("logger.name", config.logger.name)
    _choice("logger.mode", config.logger.mode)
    _check_launcher(config)
    return config
