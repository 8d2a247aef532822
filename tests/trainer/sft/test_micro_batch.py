"""Micro-batch layout: next-token labels, a loss mask over response tokens only (EOS included)."""

import pytest
import torch

from sept_megatron.trainer.sft import Sample, make_micro_batch, padded_length

PAD = 0
EOS = 2


def test_labels_are_the_next_token_and_the_mask_covers_the_response():
    samples = [Sample([5, 6, 7], [8, 9, EOS]), Sample([5], [8, EOS])]
    mb = make_micro_batch(samples, seq_len=8, pad_id=PAD)
    assert mb.tokens.tolist() == [[5, 6, 7, 8, 9, EOS, PAD, PAD], [5, 8, EOS, PAD, PAD, PAD, PAD, PAD]]
    assert mb.labels.tolist() == [[6, 7, 8, 9, EOS, PAD, PAD, PAD], [8, EOS, PAD, PAD, PAD, PAD, PAD, PAD]]
    # Loss where the label is a response token: 8, 9 and the EOS; never a prompt token or pad.
    assert mb.loss_mask.tolist() == [[0, 0, 1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0]]
    masked_labels = mb.labels[mb.loss_mask.bool()].tolist()
    assert masked_labels == [8, 9, EOS, 8, EOS]


def test_truncated_response_without_eos_is_still_trained_on():
    mb = make_micro_batch([Sample([5, 6], [7, 8, 9])], seq_len=8, pad_id=PAD)
    assert mb.labels[mb.loss_mask.bool()].tolist() == [7, 8, 9]


def test_a_sequence_of_exactly_seq_len_plus_one_fits():
    sample = Sample([1, 2, 3, 4], [5, 6, 7, EOS, 9])  # 9 tokens -> 8 inputs, 8 labels
    mb = make_micro_batch([sample], seq_len=8, pad_id=PAD)
    assert mb.tokens.tolist() == [[1, 2, 3, 4, 5, 6, 7, EOS]]
    assert mb.labels.tolist() == [[2, 3, 4, 5, 6, 7, EOS, 9]]
    assert mb.loss_mask.sum() == 5


def test_shapes_positions_and_causal_mask():
    samples = [Sample([3] * 4, [4] * 3), Sample([3], [4])]
    mb = make_micro_batch(samples, seq_len=16, pad_id=PAD)
    assert mb.tokens.shape == mb.labels.shape == mb.loss_mask.shape == (2, 16)
    assert mb.tokens.dtype == torch.long and mb.loss_mask.dtype == torch.float
    assert mb.positions.tolist() == [list(range(16))] * 2
    assert mb.attention_mask.shape == (1, 1, 16, 16)
    assert mb.attention_mask[0, 0, 3, 4] and not mb.attention_mask[0, 0, 4, 3]


@pytest.mark.parametrize(
    "lengths, expected", [((3, 4), 8), ((9, 1), 8), ((10, 1), 16), ((2, 1), 8), ((30, 3), 32), ((34, 3), 40)]
)
def test_padded_length_is_one_multiple_of_8_for_the_mini_batch(lengths, expected):
    samples = [Sample([1] * (n - 1), [2]) for n in lengths]
    assert padded_length(samples) == expected
    longest = max(lengths) - 1
    assert padded_length(samples) >= longest
