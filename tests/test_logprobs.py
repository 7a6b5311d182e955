"""Padding a batch of token ids: values, dtypes and device of the ids, attention mask and label mask."""

from __future__ import annotations

import pytest
import torch

from deepalign.logprobs import pad_batch, pad_sequences
from deepalign.training import IGNORE, Collator

SEQS = [[5, 6, 7], [8], [9, 10]]
MASKS = [[False, True, True], [True], [False, False]]


def test_right_padding_puts_tokens_first_and_marks_them():
    padded = pad_batch(SEQS, 0)
    assert padded.input_ids.tolist() == [[5, 6, 7], [8, 0, 0], [9, 10, 0]]
    assert padded.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert padded.input_ids.dtype == torch.long and padded.attention_mask.dtype == torch.long
    assert padded.labels_mask is None
    assert padded.input_ids.device.type == "cpu"


def test_left_padding_puts_tokens_last_with_the_label_mask_alongside():
    padded = pad_batch(SEQS, 2, side="left", labels_masks=MASKS)
    assert padded.input_ids.tolist() == [[5, 6, 7], [2, 2, 8], [2, 9, 10]]
    assert padded.attention_mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    assert padded.labels_mask.dtype == torch.bool
    assert padded.labels_mask.tolist() == [
        [False, True, True],
        [False, False, True],
        [False, False, False],
    ]


def test_an_empty_sequence_is_all_padding():
    padded = pad_batch([[3, 4], []], 9, labels_masks=[[True, False], []])
    assert padded.input_ids.tolist() == [[3, 4], [9, 9]]
    assert padded.attention_mask.tolist() == [[1, 1], [0, 0]]
    assert padded.labels_mask.tolist() == [[True, False], [False, False]]


@pytest.mark.parametrize("side", ["right", "left"])
def test_same_tensors_as_padding_each_part_by_hand(side):
    """The tensors every caller built before from pad_sequences: bit-identical, dtype included."""
    padded = pad_batch(SEQS, 11, side=side, labels_masks=MASKS)
    by_hand = [
        pad_sequences(SEQS, 11, side=side),
        pad_sequences([[1] * len(s) for s in SEQS], 0, side=side),
        pad_sequences([[int(m) for m in mask] for mask in MASKS], 0, side=side).bool(),
    ]
    for got, want in zip([padded.input_ids, padded.attention_mask, padded.labels_mask], by_hand):
        assert got.dtype == want.dtype and torch.equal(got, want)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_every_tensor_lands_on_the_device(device):
    padded = pad_batch(SEQS, 0, labels_masks=MASKS, device=torch.device(device))
    for tensor in (padded.input_ids, padded.attention_mask, padded.labels_mask):
        assert tensor.device.type == device
    assert padded.input_ids.cpu().tolist() == [[5, 6, 7], [8, 0, 0], [9, 10, 0]]


def test_a_label_mask_of_another_length_or_an_unknown_side_is_refused():
    with pytest.raises(ValueError, match="as long as the sequence"):
        pad_batch(SEQS, 0, labels_masks=[[True, True], [True], [False, False]])
    with pytest.raises(ValueError, match="one mask per sequence"):
        pad_batch(SEQS, 0, labels_masks=MASKS[:2])
    with pytest.raises(ValueError, match="side"):
        pad_batch(SEQS, 0, side="center")


def test_collator_labels_only_target_tokens_and_pads_on_the_right():
    features = [{"input_ids": s, "labels_mask": m} for s, m in zip(SEQS, MASKS)]
    batch = Collator(pad_id=0)(features)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0], [9, 10, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert batch["labels"].tolist() == [
        [IGNORE, 6, 7],
        [8, IGNORE, IGNORE],
        [IGNORE, IGNORE, IGNORE],
    ]
    assert batch["labels"].dtype == torch.long
