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


def compose_config(overrides: list[str] | None = None) -> DictConfig:
    """The root config with overrides, exactly as `deepalign ...` composes it (without running)."""
    register_configs()
    with initialize_config_module(config_module="deepalign.conf", version_base="1.3"):
        return compose(config_name="config", overrides=overrides or [], return_hydra_config=False)


@pytest.fixture(scope="session")
def tiny_model_config() -> ModelConfig:
    return validate(compose_config(["model=tiny", "logger=none"])).model


@pytest.fixture(scope="session")
def smollm2_tokenizer(tiny_model_config):
    """The real SmolLM2-135M-Instruct tokenizer (ChatML template), from the packaged GGUF."""
    from deepalign.models import load_tokenizer

    return load_tokenizer(tiny_model_config)
