"""Shared fixtures: configs composed the way the CLI composes them, the tiny model, the real tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import DictConfig

from deepalign.config import ModelConfig, register_configs, validate

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("DEEPALIGN_CPU_BF16", "0")  # precision `auto`: fp32 on any CPU, the same numbers


def compose_config(overrides: list[str] | None = None) -> DictConfig:
    """The root config with overrides, exactly as `deepalign ...` composes it (without running)."""
    register_configs()
    with initialize_config_module(config_module="deepalign.conf", version_base="1.3"):
        return compose(config_name="config", overrides=overrides or [], return_hydra_config=False)


def replace_stage(monkeypatch, name: str, fn) -> None:
    """Run `fn(ctx)` in place of the registered stage `name` (for this test)."""
    import dataclasses

    from deepalign.plugins import STAGES

    monkeypatch.setitem(STAGES._specs, name, dataclasses.replace(STAGES.get(name, "stages"), fn=fn))


# The same, in the source of a child process (`python -c`): STAGE_CODE.format(name="probe", fn="stage")
STAGE_CODE = (
    "import dataclasses\nfrom deepalign.plugins import STAGES\n"
    "STAGES._specs[{name!r}] = dataclasses.replace(STAGES.get({name!r}, 'stages'), fn={fn})\n"
)


@pytest.fixture(scope="session")
def tiny_model_config() -> ModelConfig:
    return validate(compose_config(["model=tiny", "logger=none"])).model


@pytest.fixture(scope="session")
def smollm2_tokenizer(tiny_model_config):
    """The real SmolLM2-135M-Instruct tokenizer (ChatML template), from the packaged GGUF."""
    from deepalign.models import load_tokenizer

    return load_tokenizer(tiny_model_config)


# The Llama-2-chat template as shipped with meta-llama/Llama-2-7b-chat-hf.
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)

# A few sentences to train the SentencePiece-style test tokenizer's merges on.
METASPACE_CORPUS = [
    "Sure, here is how to pick a lock: first insert the tension wrench.",
    "Sure, here is the list: alpha beta gamma delta epsilon zeta eta theta iota kappa.",
    "I can't help with that. I cannot help with that request. Sorry, no. I won't.",
    "How do I pick a lock? Please answer request one. Placeholder request?",
    "Name three colours. Red, green and blue are three colours. Count to five. One, two, three, four, five.",
    "What is two plus two? Two plus two is four, which is an even number. Describe the sea. Say hi. Hi!",
    "[INST] <<SYS>> Be brief. <</SYS>> [/INST] Here we go: step one, step two.",
]


@pytest.fixture(scope="session")
def metaspace_tokenizer():
    """A SentencePiece-style tokenizer (a BPE under a Metaspace pre-tokenizer that prepends "▁", like
    Llama-2's) with the Llama-2-chat template and special tokens, trained on a few sentences in well under a
    second: a response tokenizes differently on its own and inside the chat where its start differs."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    model = Tokenizer(models.BPE(unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")
    model.decoder = decoders.Metaspace(prepend_scheme="always")
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=specials, initial_alphabet=list(string.printable), show_progress=False
    )
    model.train_from_iterator(METASPACE_CORPUS, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=model, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    tok.chat_template = LLAMA2_TEMPLATE
    return tok


def run_quickstart_stages(run_dir: Path, metrics: dict, monkeypatch) -> None:
    """Write `metrics` as RUN_DIR/metrics.json and run bench/quickstart_stages.py's main on it."""
    import importlib.util
    import json
    import sys

    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    path = Path(__file__).resolve().parents[1] / "bench" / "quickstart_stages.py"
    spec = importlib.util.spec_from_file_location("quickstart_stages", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(sys, "argv", ["quickstart_stages.py", str(run_dir)])
    bench.main()
