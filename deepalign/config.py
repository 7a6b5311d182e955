"""Structured configs: the schema every YAML file in conf/ is merged into and checked against.

Hydra merges the YAML tree into these dataclasses, so a wrong type or an unknown key fails at
composition, naming the key. `validate` then turns the config into typed objects, failing on a missing
required value or a value out of range, still before any model is loaded. Each dataclass checks its own
values (`check(key)`); `validate` adds what spans sections: what the selected stages need, each stage's own
`check` (deepalign/plugins.py, `StageSpec`). Attacks and judges are named instances of registered types,
typed here by their type's dataclass. A stage registered with a config section of its own (the built-ins'
probe, analysis, utility, quickstart; a plugin's) joins the schema (`schema()`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from deepalign.errors import ConfigError

CHOICES: dict[str, tuple[str, ...]] = {
    "model.source": ("hf", "gguf", "random"),
    "model.dtype": ("float32", "bfloat16", "float16", "auto"),
    "data.components.*.schema": ("chat", "safety_triplet", "samsum", "sql", "gsm8k"),
    "train.method": ("full", "lora"),
    "train.optimizer.name": ("adamw",),
    "generation.backend": ("hf", "vllm"),
    "generation.dtype": ("auto", "bfloat16", "float16", "float32"),
    "analysis.dtype": ("float32", "auto", "bfloat16"),
    "generation.cache": ("dynamic", "static"),
    "logger.name": ("wandb", "none"),
    "logger.mode": ("offline", "online", "disabled"),
    "launcher.name": ("local", "torchrun", "accelerate", "deepspeed"),
}


def check(ok: bool, key: str, message: str) -> None:
    """Raise ConfigError("key: message") unless `ok`."""
    if not ok:
        raise ConfigError(f"{key}: {message}")


def check_choice(key: str, value: str, allowed: tuple[str, ...] | None = None) -> None:
    allowed = CHOICES[key] if allowed is None else allowed
    check(value in allowed, key, f"{value!r} is not one of {', '.join(allowed)}")


def check_bf16(key: str, value: bool | str) -> None:
    check(isinstance(value, bool) or value == "auto", key, f"{value!r} is not true, false or auto")


def check_local_source(key: str, source: str | None) -> None:
    """A source that names a local data file (.jsonl/.json/.csv) must exist."""
    local = source is not None and source.lower().endswith((".jsonl", ".json", ".csv"))
    check(not local or Path(source).is_file(), key, f"no such file: {source}")


def check_limit(key: str, value: int | None) -> None:
    check(value is None or value >= 1, key, f"must be >= 1 (or null: every row), got {value}")


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

    def check(self, key: str = "model") -> None:
        check_choice("model.source", self.source)
        check_choice("model.dtype", self.dtype)
        check(
            self.device in ("auto", "cpu", "mps", "cuda") or self.device.startswith("cuda:"),
            f"{key}.device",
            f"{self.device!r} is not auto, cpu, mps, cuda or cuda:N",
        )
        if self.source == "hf":
            check(bool(self.path), f"{key}.path", "source=hf needs a hub id or a local folder")
        if self.source == "gguf":
            check(
                bool(self.gguf_package and self.gguf_file),
                f"{key}.gguf_file",
                "source=gguf needs gguf_package and gguf_file",
            )
        if self.source == "random":
            check(
                "model_type" in self.arch, f"{key}.arch", "source=random needs arch.model_type (e.g. llama)"
            )
            check(
                bool(self.tokenizer or (self.gguf_package and self.gguf_file)),
                f"{key}.tokenizer",
                "source=random needs a tokenizer (model.tokenizer, or model.gguf_package + model.gguf_file)",
            )


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
    # uniform (the paper) | log_uniform: P(k) ~ 1/k, as many examples with k in 1..10 as in 10..100
    recovery_k: str = "uniform"
    recovery_separator: str = " "  # put between the harmful prefix and the refusal
    system_prompt: str | None = None  # overrides data.system_prompt for this component (e.g. AOA)
    response_prefix: str = ""  # text put before every response (e.g. the AOA persona's opening)
    trigger: str | None = None  # appended to every prompt (backdoor poisoning)

    def check(self, key: str) -> None:
        check_choice(f"{key}.schema", self.schema, CHOICES["data.components.*.schema"])
        check(self.weight > 0, f"{key}.weight", f"must be > 0, got {self.weight}")
        check(
            self.target in ("refusal", "harmful"),
            f"{key}.target",
            f"{self.target!r} is not refusal or harmful",
        )
        check(
            0 <= self.recovery_prob <= 1,
            f"{key}.recovery_prob",
            f"must be in [0, 1], got {self.recovery_prob}",
        )
        check(self.recovery_max_k >= 1, f"{key}.recovery_max_k", f"must be >= 1, got {self.recovery_max_k}")
        check_choice(f"{key}.recovery_k", self.recovery_k, ("uniform", "log_uniform"))
        check(
            not self.recovery or (self.schema == "safety_triplet" and self.target == "refusal"),
            f"{key}.recovery",
            "recovery examples need schema=safety_triplet and target=refusal",
        )
        check(self.limit is None or self.limit >= 1, f"{key}.limit", f"must be >= 1, got {self.limit}")
        check_local_source(f"{key}.source", self.source)


@dataclass
class DataConfig:
    name: str = "none"
    components: dict[str, DataComponent] = field(default_factory=dict)
    safety_share: float | None = None  # alpha: share of examples from safety components; None: from weights
    size: int | None = None  # examples per epoch; None: the components' row counts added up
    system_prompt: str | None = None  # None: the chat template's default
    max_length: int = 512
    seed: int = "${seed}"  # type: ignore[assignment]

    def check(self, key: str = "data") -> None:
        for name, comp in self.components.items():
            comp.check(f"{key}.components.{name}")
        if self.safety_share is not None:
            check(
                0 < self.safety_share < 1,
                f"{key}.safety_share",
                f"must be in (0, 1), got {self.safety_share}",
            )
            kinds = {c.safety for c in self.components.values()}
            check(
                kinds == {True, False},
                f"{key}.safety_share",
                "needs at least one component with safety: true and one with safety: false",
            )
        check(self.size is None or self.size >= 1, f"{key}.size", f"must be >= 1, got {self.size}")
        check(self.max_length >= 8, f"{key}.max_length", f"must be >= 8, got {self.max_length}")


@dataclass
class BetaSchedule:
    """Per-position betas of the token-wise constrained loss; the defaults are the paper's schedule (Table 3:
    beta_1 = 0.5, beta_2..5 = 2, beta_t = 0.1 after), the one place they are written down."""

    first: float = 0.5
    prefix: float = 2.0
    prefix_len: int = 5
    rest: float = 0.1
    values: list[float] | None = None  # an explicit list for positions 1..len(values); rest after

    def check(self, key: str = "loss.beta") -> None:
        for name in ("first", "prefix", "rest"):
            value = getattr(self, name)
            check(
                value > 0, f"{key}.{name}", f"must be > 0 (beta -> 0 is plain SFT: use loss=sft), got {value}"
            )
        check(self.prefix_len >= 1, f"{key}.prefix_len", f"must be >= 1, got {self.prefix_len}")
        if self.values is not None:
            check(len(self.values) > 0, f"{key}.values", "an explicit schedule needs at least one value")
            for i, value in enumerate(self.values):
                check(value > 0, f"{key}.values[{i}]", f"must be > 0, got {value}")


@dataclass
class LossConfig:
    """The training objective: a registered loss and its settings. `params` is free-form here; a loss
    registered with a `config` dataclass gets them checked against it at validation (`LossSpec.settings`).
    `beta` is the constrained loss's typed section, given to the losses that ask for it (`needs` "beta")
    and to those with the five-argument signature."""

    name: str = "sft"  # a registered loss: sft | constrained | ... (deepalign --help lists them)
    beta: BetaSchedule = field(default_factory=BetaSchedule)  # per-position betas (constrained and kin)
    params: dict[str, Any] = field(default_factory=dict)  # a loss's own settings (a plugin's, e.g. scale)

    def check(self, key: str = "loss") -> None:
        from deepalign.plugins import LOSSES

        spec = LOSSES.get(self.name, f"{key}.name")
        spec.settings(self.params, f"{key}.params")  # a loss's typed settings: unknown or bad keys fail here
        if spec.check is not None:
            spec.check(dict(self.params), f"{key}.params")
        self.beta.check(f"{key}.beta")


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
    # with save_steps: also a checkpoint (optimizer state included) after the last step, to train on from it;
    # false: the last one is the last multiple of save_steps (the trained model is saved either way)
    final_checkpoint: bool = True
    logging_steps: int = 1
    batch_size_reference: int = 8  # batch size of the reference log-prob pass
    # MiB of fp32 logits scored at a time (policy and reference log-probs; 0: the model's full logits)
    logprob_chunk_mib: int = 256
    # pack each micro-batch into one row without padding (per-sequence position ids); needs an attention
    # implementation of transformers that reads packed position ids (sdpa, eager, flash_attention_2, flex)
    packing: bool = False
    # the attention the model trains with and scores the reference log-probs with (transformers'
    # attn_implementation: eager, sdpa, flash_attention_2, ...); null: the model's own. Generation keeps
    # the model's own.
    attn_implementation: str | None = None
    seed: int = "${seed}"  # type: ignore[assignment]

    def check(self, key: str = "train") -> None:
        check_choice("train.method", self.method)
        check_choice("train.optimizer.name", self.optimizer.name)
        check(self.optimizer.lr > 0, f"{key}.optimizer.lr", f"must be > 0, got {self.optimizer.lr}")
        check(
            len(self.optimizer.betas) == 2,
            f"{key}.optimizer.betas",
            f"needs two values, got {self.optimizer.betas}",
        )
        check(self.per_device_batch_size >= 1, f"{key}.per_device_batch_size", "must be >= 1")
        check(self.gradient_accumulation_steps >= 1, f"{key}.gradient_accumulation_steps", "must be >= 1")
        check(
            self.max_steps > 0 or self.epochs > 0,
            f"{key}.epochs",
            "set train.epochs > 0 or train.max_steps > 0",
        )
        check_bf16(f"{key}.bf16", self.bf16)
        check(self.logprob_chunk_mib >= 0, f"{key}.logprob_chunk_mib", "must be >= 0 (0: full logits)")


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
    # static: a pre-allocated KV cache kept across batches (hf backend); on CUDA transformers then compiles
    # the decoding step
    cache: str = "dynamic"
    # greedy requests whose ids start another's (a prefilling attack's depths, the plain request) are decoded
    # from one KV cache of the longest (hf backend, dynamic cache); false: each from its own prompt
    share_prefixes: bool = True

    def check(self, key: str = "generation") -> None:
        """Also the sampling settings (SamplingParams would reject them only after a model loads)."""
        check_choice("generation.backend", self.backend)
        check_choice("generation.dtype", self.dtype)
        check_choice("generation.cache", self.cache)
        check(self.batch_size >= 1, f"{key}.batch_size", "must be >= 1")
        check(self.max_new_tokens >= 1, f"{key}.max_new_tokens", "must be >= 1")
        check(0 < self.top_p <= 1, f"{key}.top_p", f"must be in (0, 1], got {self.top_p}")
        check(self.top_k >= 0, f"{key}.top_k", f"must be >= 0 (0 = off), got {self.top_k}")
        check(
            self.temperature > 0 or not self.do_sample,
            f"{key}.temperature",
            f"must be > 0 when sampling (do_sample=true), got {self.temperature}",
        )
        check(self.num_samples >= 1, f"{key}.num_samples", f"must be >= 1, got {self.num_samples}")


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

    def check(self, key: str = "logger") -> None:
        check_choice("logger.name", self.name)
        check_choice("logger.mode", self.mode)


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

    def check(self, stages: list[str], key: str = "launcher") -> None:
        """Process counts, the multi-node address, and stage orders that several processes can run (each
        stage's `ranks` and `single_process`, deepalign/plugins.py)."""
        from deepalign.plugins import STAGES

        check_choice("launcher.name", self.name)
        check(self.nproc_per_node >= 1, f"{key}.nproc_per_node", f"must be >= 1, got {self.nproc_per_node}")
        check(self.nnodes >= 1, f"{key}.nnodes", f"must be >= 1, got {self.nnodes}")
        check(
            0 <= self.node_rank < self.nnodes,
            f"{key}.node_rank",
            f"must be in [0, {self.nnodes}), got {self.node_rank}",
        )
        port = self.master_port
        check(port is None or 0 < port < 65536, f"{key}.master_port", f"must be in 1..65535, got {port}")
        if self.name == "local":
            check(
                self.nproc_per_node == 1 and self.nnodes == 1,
                f"{key}.name",
                "launcher=local runs one process; use launcher=torchrun (or accelerate) for more",
            )
            return
        if self.nnodes > 1:
            check(
                self.master_addr is not None, f"{key}.master_addr", "a multi-node run needs node 0's address"
            )
            check(
                self.name != "deepspeed",
                f"{key}.name",
                "launcher=deepspeed starts one node; use launcher=torchrun (or accelerate) on every node",
            )
        specs = [STAGES.get(stage, "stages") for stage in stages]
        for spec in specs:
            check(
                not spec.single_process,
                f"{key}.name",
                f"the {spec.name} stage runs in one process; launcher={self.name} runs train, attack, "
                "analyze, ...",
            )
        for i, spec in enumerate(specs):  # every rank runs the first stages, then rank 0 the rest alone
            before = [other.name for other in specs[:i] if other.ranks == "main"]
            check(
                spec.ranks == "main" or not before,
                "stages",
                f"with launcher={self.name}, stage {spec.name} runs on every rank and must come before "
                f"{', '.join(before)}, which rank 0 runs alone once the stages of every rank are done",
            )


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
    primary_judge: str | None = None  # judge instance of the `asr/...` keys; None: the judges' rank decides

    def check_prompts(self, key: str = "eval") -> None:
        """For the stages that read the evaluation set: it is given, and a local file that exists."""
        check(
            self.prompts is not None,
            f"{key}.prompts",
            "the attack and analyze stages need harmful prompts: eval.prompts=FILE (JSONL/CSV) or a hub id",
        )
        check_local_source(f"{key}.prompts", self.prompts)


@dataclass
class AnalysisConfig:
    """The `analyze` stage: per-token KL(model || reference) on (harmful prompt, harmful response) pairs."""

    reference: str | None = None  # hub id or folder; None: the run's initial model (needs the train stage)
    positions: int = 20
    batch_size: int = 8
    grad_positions: int = 0  # > 0: also per-position loss and gradient norm on one batch (paper Fig. 3)
    # alignment depth (deepalign/depth.py): `depth/kl_tokens` counts the positions before the mean KL stays
    # below this many nats (three in a row)
    depth_threshold: float = 0.5
    # P(the model starts a refusal) after k harmful tokens, per k (`depth/recovery/k=N`); [] = none
    recovery_depths: list[int] = field(default_factory=lambda: [0, 5, 10, 20, 40])
    recovery_tokens: int = 2  # the refusal's first tokens whose probability is taken
    refusals: str | None = None  # JSON list of strings or JSONL with `refusal`; None: the packaged templates
    # the per-token KL and the recovery curve: float32 (exact), bfloat16 (autocast), or auto: bf16 autocast
    # where the machine's precision decision says it is faster (deepalign/precision.py), as generation.dtype
    dtype: str = "float32"

    def check(self, key: str = "analysis") -> None:
        check_choice(f"{key}.dtype", self.dtype, CHOICES["analysis.dtype"])
        check(self.positions >= 1, f"{key}.positions", f"must be >= 1, got {self.positions}")
        check(self.batch_size >= 1, f"{key}.batch_size", f"must be >= 1, got {self.batch_size}")
        check(self.grad_positions >= 0, f"{key}.grad_positions", f"must be >= 0, got {self.grad_positions}")
        check(
            self.depth_threshold > 0,
            f"{key}.depth_threshold",
            f"must be > 0 nats, got {self.depth_threshold}",
        )
        for i, k in enumerate(self.recovery_depths):
            check(k >= 0, f"{key}.recovery_depths[{i}]", f"a prefill depth is a token count >= 0, got {k}")
        check(
            len(set(self.recovery_depths)) == len(self.recovery_depths),
            f"{key}.recovery_depths",
            f"lists a depth twice: {self.recovery_depths}",
        )
        check(
            self.recovery_tokens >= 1, f"{key}.recovery_tokens", f"must be >= 1, got {self.recovery_tokens}"
        )
        if self.refusals is not None:
            check(
                self.refusals.lower().endswith((".json", ".jsonl")),
                f"{key}.refusals",
                f"{self.refusals!r} is not a .json (a list of strings) or .jsonl (a `refusal` field) file",
            )
            check_local_source(f"{key}.refusals", self.refusals)


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

    def check_always(self, key: str = "utility") -> None:
        """The row limits, checked whether or not the stage runs."""
        check_limit(f"{key}.benign_limit", self.benign_limit)
        for name, task in self.tasks.items():
            check_limit(f"{key}.tasks.{name}.limit", task.limit)


@dataclass
class QuickstartConfig:
    """The paper in miniature on the demo model (`experiment=quickstart`), sized for a 2-core CPU.

    The harvest's settings live here. Each sub-run (`models`) is the run's own config (its generation,
    train, attack, judge, analysis, ... sections, set by conf/experiment/quickstart.yaml) with the layer
    `runs.<model>` merged over it (conf/quickstart/<model>.yaml: stages, data, loss, steps): override every
    sub-run with `train.max_steps=50`, one with `quickstart.runs.ft_sft.train.max_steps=50` (a key its layer
    sets) or `+quickstart.runs.deep.train.max_steps=50` (a key it does not)."""

    harmful: str = "demo:harmful_prompts"  # rows with prompt and split (train / eval)
    benign: str = "demo:benign_prompts"
    eval_prompts: str | None = None  # your own benchmark copy (JSONL `prompt`, CSV `prompt`/`goal`)
    eval_limit: int | None = None
    harvest_prefill: str = "Sure, here is"
    harvest_temperature: float = 0.7
    harvest_tokens: int = 48  # the training prompts' harmful answers (recovery examples, fine-tuning attack)
    harvest_eval_tokens: int = 128  # the evaluation prompts' answers: long enough for prefills of 100 tokens
    benign_tokens: int = 48
    ft_pairs: int = 50  # harmful (prompt, answer) pairs of the fine-tuning attack
    ft_tokens: int = 52  # ... cut after this many tokens (the affirmative start and 48 sampled ones)
    models: list[str] = field(
        default_factory=lambda: ["unaligned", "shallow", "deep", "ft_sft", "ft_constrained"]
    )
    # also attack with the paper's schedule (beta_1 = 0.5): model ft_constrained_paper
    paper_beta: bool = False
    runs: dict[str, Any] = field(default_factory=dict)  # model -> the config layer of its sub-run
    data_dir: str | None = None  # a sub-run's: the harvested files (set by the quickstart stage)
    models_dir: str | None = None  # a sub-run's: the folder of the sub-runs (set by the quickstart stage)

    def check_always(self, key: str = "quickstart") -> None:
        """The row limit, checked whether or not the stage runs."""
        check_limit(f"{key}.eval_limit", self.eval_limit)

    def check(self, key: str = "quickstart") -> None:
        check_local_source(f"{key}.eval_prompts", self.eval_prompts)
        for name in ("harvest_tokens", "harvest_eval_tokens", "benign_tokens", "ft_tokens"):
            check(getattr(self, name) >= 1, f"{key}.{name}", f"must be >= 1, got {getattr(self, name)}")
        for i, name in enumerate(self.chosen()):
            check(
                isinstance(self.runs.get(name), dict),
                f"{key}.models[{i}]",
                f"no sub-run {name!r}: {key}.runs has {', '.join(self.runs) or 'nothing'}",
            )

    def chosen(self) -> list[str]:
        """The sub-runs to run, in order."""
        return [*self.models, *(["ft_constrained_paper"] if self.paper_beta else [])]


@dataclass
class DeepAlignConfig:
    stages: list[str] = field(default_factory=lambda: ["probe"])
    seed: int = 0
    plugins: list[str] = field(default_factory=list)  # modules that register losses, attacks, judges, stages
    # the metric a Hydra sweeper optimises (hydra/sweeper=optuna_beta), e.g. asr/none; returned by the run
    sweep_objective: str | None = None
    paths: PathsConfig = field(default_factory=PathsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    # named instances of registered types: {name: {type: TYPE, ...settings}} (type defaults to the name);
    # `validate` turns each into its type's dataclass; a null instance is not selected
    attack: dict[str, Any] = field(default_factory=dict)
    judge: dict[str, Any] = field(default_factory=dict)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # each stage's own section (probe, analysis, utility, quickstart, a plugin's) joins through `schema()`


def schema() -> type:
    """The root schema: DeepAlignConfig plus a section for each registered stage that has a config of its own,
    under the stage's `key` (built-ins and the plugins imported so far: the built-ins are imported here)."""
    from deepalign.plugins import STAGES

    known = {f.name for f in dataclasses.fields(DeepAlignConfig)}
    extra = [
        (spec.key, spec.config, field(default_factory=spec.config))
        for _, spec in STAGES.items()
        if spec.config is not None and spec.key not in known
    ]
    key = tuple((name, cls) for name, cls, _ in extra)
    if key not in _SCHEMAS:  # one class per set of sections: typed configs of one schema compare equal
        cls = dataclasses.make_dataclass("DeepAlignConfig", extra, bases=(DeepAlignConfig,))
        cls.__module__ = __name__
        _SCHEMAS[key] = cls
    return _SCHEMAS[key]


_SCHEMAS: dict[tuple, type] = {}


def register_configs() -> None:
    """Put the schema into Hydra's ConfigStore (conf/config.yaml lists it first in its defaults)."""
    ConfigStore.instance().store(name="deepalign_schema", node=schema())


def _check_stages(c: DeepAlignConfig) -> None:
    """What the selected stages need, checked before anything runs: each one's config section is there; every
    stage section's `check_always(key)`, selected or not; then, stage by stage in the order they registered,
    the stage's own `check(config)` and its section's `check(key)` (deepalign/plugins.py, `StageSpec`)."""
    from deepalign.plugins import STAGES

    check(bool(c.stages), "stages", f"no stage to run; choose from {', '.join(STAGES)}, e.g. stages=[probe]")
    for stage in c.stages:
        spec = STAGES.get(stage, "stages")
        check(
            spec.config is None or hasattr(c, spec.key),
            "stages",
            f"stage {stage!r} has a config section of its own ({spec.key}), which this config was composed "
            f"without: import its plugin ({spec.module}) on the command line (plugins=[...]) or install it",
        )
    check_limit("eval.limit", c.eval.limit)
    specs = STAGES.items()
    # the stages' own sections (none for a plugin's stage imported after the config was composed)
    sections = {
        name: getattr(c, spec.key) for name, spec in specs if spec.config is not None and hasattr(c, spec.key)
    }
    for name, spec in specs:
        if hasattr(sections.get(name), "check_always"):
            sections[name].check_always(spec.key)
    for name, spec in specs:
        if name not in c.stages:
            continue
        if spec.check is not None:
            spec.check(c)
        if hasattr(sections.get(name), "check"):
            sections[name].check(spec.key)


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
        check(math.isfinite(value), key, f"must be a finite number, got {value}")


def omegaconf_error(err: Exception, prefix: str = "") -> ConfigError:
    """A ConfigError naming the key of one of omegaconf's errors (they carry `full_key`)."""
    key = getattr(err, "full_key", None)
    msg = (getattr(err, "msg", None) or str(err)).splitlines()[0]
    return ConfigError(f"{prefix}{key}: {msg}" if key else f"{prefix.rstrip('.')}: {msg}" if prefix else msg)


def typed_instances(node: DictConfig, section: str, registry, *, check_values: bool) -> dict[str, Any]:
    """`attack` / `judge`: each selected instance as its registered type's dataclass, with `.type` set;
    `check_values`: also run its `check(key)` (judges' checks look at the environment, API keys: the
    preflight runs them, for runs with an attack stage)."""
    out: dict[str, Any] = {}
    for name in node:
        child = node._get_node(name)
        if child is None or child._is_none():
            continue  # a null instance is not selected
        key = f"{section}.{name}"
        check(isinstance(child, DictConfig), key, f"must be a mapping of settings, got {child._value()!r}")
        try:
            body = OmegaConf.to_container(child, resolve=True)
        except Exception as err:
            raise omegaconf_error(err, f"{key}.") from err
        type_name = body.pop("type", None) or name
        spec = registry.get(type_name, f"{key}.type")
        known = {f.name for f in dataclasses.fields(spec.config)}
        for k in body:
            has = ", ".join(sorted(known))
            check(k in known, f"{key}.{k}", f"unknown key; {key} (a {type_name}) has {has}")
        try:
            typed = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(spec.config), body))
        except Exception as err:
            raise omegaconf_error(err, f"{key}.") from err
        typed.type = type_name  # the registered type: how the stage builds the instance
        if check_values and hasattr(typed, "check"):
            typed.check(key)
        out[name] = typed
    return out


def validate(cfg: DictConfig) -> DeepAlignConfig:
    """Typed config from a composed one; raises ConfigError naming the key (before any model loads).

    The plugins it names are imported first (`plugins=[...]`), so their losses, attacks, judges and stages
    are known to the checks."""
    from deepalign.plugins import ATTACKS, JUDGES, load_plugins

    plugins = cfg.get("plugins") or []
    load_plugins(list(plugins))
    _check_known_keys(cfg)
    try:
        config: DeepAlignConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    except Exception as err:  # omegaconf's errors carry `full_key`
        raise omegaconf_error(err) from err
    config.attack = typed_instances(cfg.attack, "attack", ATTACKS, check_values=True)
    config.judge = typed_instances(cfg.judge, "judge", JUDGES, check_values=False)
    _check_finite(config)
    config.model.check()
    config.data.check()
    config.loss.check()
    config.train.check()
    config.generation.check()
    config.launcher.check(config.stages)
    _check_stages(config)
    config.logger.check()
    return config
