"""Damaged local model folders: named, with the file, before any model loads (preflight) and at load time."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from deepalign.config import ConfigError
from deepalign.models import build_random_model, check_model_folder, load_model


@pytest.fixture(scope="module")
def saved_model(tiny_model_config, smollm2_tokenizer, tmp_path_factory) -> Path:
    """The tiny random model saved as a local HF folder (config.json, model.safetensors, tokenizer)."""
    folder = tmp_path_factory.mktemp("model")
    build_random_model(tiny_model_config, vocab_size=len(smollm2_tokenizer)).save_pretrained(folder)
    smollm2_tokenizer.save_pretrained(folder)
    return folder


def truncated_copy(folder: Path, target: Path) -> Path:
    """A copy of `folder` whose model.safetensors lost its second half (an interrupted download)."""
    target.mkdir()
    for path in folder.iterdir():
        data = path.read_bytes()
        (target / path.name).write_bytes(data[: len(data) // 2] if path.name == "model.safetensors" else data)
    return target / "model.safetensors"


def test_a_complete_folder_passes_and_loads(saved_model, tiny_model_config):
    check_model_folder("model.path", str(saved_model))
    cfg = dataclasses.replace(tiny_model_config, source="hf", path=str(saved_model), tokenizer=None)
    assert load_model(cfg).source == str(saved_model)


def test_a_truncated_weights_file_is_named_before_and_at_load_time(saved_model, tiny_model_config, tmp_path):
    weights = truncated_copy(saved_model, tmp_path / "copy")
    expected = rf"^model\.path: {weights} cannot be read \(.+\); it is truncated or damaged: copy or download"
    with pytest.raises(ConfigError, match=expected):
        check_model_folder("model.path", str(weights.parent))
    cfg = dataclasses.replace(tiny_model_config, source="hf", path=str(weights.parent), tokenizer=None)
    with pytest.raises(ConfigError, match=expected) as err:
        load_model(cfg)  # e.g. the run's own trained model, which no preflight checked
    assert err.value.__cause__ is not None, "the loader's own error stays attached"


@pytest.mark.parametrize(
    "files, missing",
    [
        ([], "config.json / *.safetensors"),
        (["config.json"], "*.safetensors"),
        (["model.safetensors"], "config.json"),
    ],
)
def test_an_incomplete_folder_says_which_files_are_missing(tmp_path, files, missing):
    for name in files:
        (tmp_path / name).write_text("{}")
    with pytest.raises(ConfigError) as err:
        check_model_folder("model.path", str(tmp_path))
    assert str(err.value) == f"model.path: no model files in {tmp_path} ({missing} missing)"


def test_hub_ids_are_left_to_the_hub_and_missing_paths_are_named(tmp_path):
    check_model_folder("model.path", "HuggingFaceTB/SmolLM2-135M-Instruct")  # not a local folder: no check
    with pytest.raises(ConfigError, match=rf"^analysis\.reference: no such folder {tmp_path / 'gone'}$"):
        check_model_folder("analysis.reference", str(tmp_path / "gone"))
