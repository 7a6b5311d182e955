"""Per-token log-probs scored a chunk of tokens at a time from the final hidden states (`target_logprobs`):
the same values and gradients as the model's full logits, for plain, soft-capped and LoRA-wrapped models,
and a loud failure for a model whose logits the output layer alone does not give."""

from __future__ import annotations

import pytest
import torch
import transformers

from deepalign.logprobs import chunk_rows, target_logprobs, token_logprobs, unwrap

VOCAB = 300
SMALL = 0.002  # MiB: 1 token per chunk at VOCAB 300 (every token its own chunk)


def tiny(kind: str = "llama"):
    torch.manual_seed(0)
    common = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
    )
    if kind == "gemma2":  # final logit soft-capping, which the chunked head must apply itself
        config = transformers.Gemma2Config(**common, final_logit_softcapping=3.0)
        return transformers.Gemma2ForCausalLM(config).eval()
    if kind == "cohere":  # scales its logits by logit_scale: not known to the chunked head
        return transformers.CohereForCausalLM(transformers.CohereConfig(**common, logit_scale=0.5)).eval()
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common)).eval()


def batch():
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (3, 11), generator=generator)
    attention = torch.ones_like(ids)
    attention[1, 7:] = 0
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, 5:] = True
    mask[1, 7:] = False
    return ids, attention, mask


def full(model, ids, attention):
    return token_logprobs(model(input_ids=ids, attention_mask=attention).logits, ids)


def test_chunk_rows_sizes_a_chunk_of_float32_logits():
    assert chunk_rows(256_000, 256) == 262
    assert chunk_rows(32_000, 256) == 2097
    assert chunk_rows(VOCAB, SMALL) == 1
    assert chunk_rows(10**9, 1) == 1  # never zero


@pytest.mark.parametrize("kind", ["llama", "gemma2"])
@pytest.mark.parametrize("chunk_mib", [SMALL, 0.01, 256])
def test_values_equal_the_full_logits_on_the_targets_and_zero_elsewhere(kind, chunk_mib):
    model = tiny(kind)
    ids, attention, mask = batch()
    with torch.no_grad():
        expected = full(model, ids, attention)
        got, outputs = target_logprobs(
            model, ids, attention_mask=attention, target_mask=mask, chunk_mib=chunk_mib
        )
        everything, _ = target_logprobs(model, ids, attention_mask=attention, chunk_mib=chunk_mib)
    assert outputs.logits.shape == (3, 1, VOCAB)  # the model itself scored only the last position
    torch.testing.assert_close(got[mask], expected[mask], atol=1e-5, rtol=0)
    assert bool((got[~mask] == 0).all())
    torch.testing.assert_close(everything, expected, atol=1e-5, rtol=0)  # no mask: every token (col 0: 0)


def test_gradients_equal_the_full_logits_path_with_every_token_its_own_chunk():
    ids, attention, mask = batch()
    grads = []
    for chunk_mib in (0, SMALL):
        model = tiny()
        model.train()
        logps, _ = target_logprobs(
            model, ids, attention_mask=attention, target_mask=mask, chunk_mib=chunk_mib
        )
        (logps[mask] * torch.linspace(0.5, 1.5, int(mask.sum()))).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 5
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)


def test_a_lora_wrapped_model_scores_through_its_adapters():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        tiny(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    assert unwrap(model) is model.get_base_model()
    ids, attention, mask = batch()
    with torch.no_grad():
        expected = full(model, ids, attention)
        got, _ = target_logprobs(model, ids, attention_mask=attention, target_mask=mask, chunk_mib=SMALL)
        with model.disable_adapter():
            plain, _ = target_logprobs(
                model, ids, attention_mask=attention, target_mask=mask, chunk_mib=SMALL
            )
    torch.testing.assert_close(got[mask], expected[mask], atol=1e-5, rtol=0)
    assert not torch.allclose(plain[mask], expected[mask])  # the adapters do change the values


def test_a_model_that_post_processes_its_logits_fails_loudly():
    model = tiny("cohere")
    ids, attention, mask = batch()
    with pytest.raises(ValueError, match="train.logprob_chunk_mib=0"):
        target_logprobs(model, ids, attention_mask=attention, target_mask=mask)
    logps, _ = target_logprobs(model, ids, attention_mask=attention, chunk_mib=0)  # the full-logits path
    assert torch.isfinite(logps).all()
