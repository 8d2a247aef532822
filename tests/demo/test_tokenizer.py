"""The demo tokenizer: exact round trip, SentencePiece parity, determinism, chat template."""

from __future__ import annotations

import json

import pytest
from hf_tiny import tokenizer_corpus
from transformers import AutoTokenizer

from sept_megatron.demo.tokenizer import train_sentencepiece, train_tokenizer

EXTRA_TEXTS = [
    "Compute (12 + 7) * 3 - 45.",
    "12 + 7 = 19. 19 * 3 = 57. 57 - 45 = 12. The answer is \\boxed{12}.",
    "The answer is \\boxed{-1024}.",
    "  two  spaces, a tab\tand a newline\nthen unicode: é ≤ 🙂",
]


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return tokenizer_corpus()


@pytest.fixture(scope="module")
def saved_dir(corpus, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("tok")
    train_tokenizer(corpus, str(out_dir))
    return out_dir


@pytest.fixture(scope="module")
def loaded(saved_dir):
    return AutoTokenizer.from_pretrained(str(saved_dir), local_files_only=True)


def test_loads_with_autotokenizer_and_special_tokens(loaded, saved_dir):
    assert (saved_dir / "tokenizer.json").exists()
    assert loaded.eos_token == "<|im_end|>" and loaded.pad_token == "<pad>"
    assert loaded.bos_token == "<s>" and loaded.unk_token == "<unk>"
    assert len({loaded.eos_token_id, loaded.pad_token_id, loaded.bos_token_id, loaded.unk_token_id}) == 4
    assert len(loaded) <= 512
    assert loaded.encode("Compute 1 + 2.")[0] != loaded.bos_token_id  # no BOS added


def test_round_trip_and_sentencepiece_parity(corpus, loaded):
    sp = train_sentencepiece(corpus)
    for text in corpus[:400] + EXTRA_TEXTS:
        ids = loaded.encode(text, add_special_tokens=False)
        assert loaded.decode(ids) == text
        assert ids == sp.encode(text)
    assert loaded.unk_token_id not in loaded.encode(EXTRA_TEXTS[-1])  # byte fallback


def test_digits_are_single_tokens(loaded):
    pieces = loaded.convert_ids_to_tokens(loaded.encode("1234 + 56 = 1290"))
    assert [p for p in pieces if any(c.isdigit() for c in p)] == list("1234561290")


def test_training_is_deterministic(corpus, tmp_path, saved_dir):
    train_tokenizer(corpus, str(tmp_path))
    first = json.loads((saved_dir / "tokenizer.json").read_text())
    second = json.loads((tmp_path / "tokenizer.json").read_text())
    assert first["model"]["vocab"] == second["model"]["vocab"]
    assert first == second


def test_chat_template(loaded):
    messages = [{"role": "user", "content": "Compute 3 * 4 + 5."}]
    text = loaded.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\nCompute 3 * 4 + 5.<|im_end|>\n<|im_start|>assistant\n"
    ids = loaded.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert ids == loaded.encode(text, add_special_tokens=False)
    assert len(ids) <= len(loaded.encode("Compute 3 * 4 + 5.")) + 8  # short overhead
    # A full SFT example ends its assistant turn with EOS, which is where generation stops.
    full = messages + [{"role": "assistant", "content": "3 * 4 = 12. 12 + 5 = 17."}]
    full_ids = loaded.apply_chat_template(full, return_dict=False)
    assert full_ids[: len(ids)] == ids
    assert loaded.eos_token_id in full_ids[len(ids) :]
    assert loaded.decode(full_ids, skip_special_tokens=True).endswith("12 + 5 = 17.\n")


def test_too_small_vocab_is_a_clear_error(corpus, tmp_path):
    with pytest.raises(ValueError, match="vocab_size=100"):
        train_tokenizer(corpus, str(tmp_path), vocab_size=100)
