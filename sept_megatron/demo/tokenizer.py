"""A tiny SentencePiece-BPE tokenizer for the demo task, saved as a transformers tokenizer.

Why not reuse a real tokenizer: a 150k-entry vocabulary would be most of a 1-5M parameter
model. SentencePiece trains a few-hundred-piece BPE on the task text in well under a second.

How it becomes a transformers tokenizer offline: transformers 5 has no slow/fast split any
more (``PreTrainedTokenizerFast`` is an alias of ``TokenizersBackend``) and its Llama
conversion expects a Llama-shaped vocabulary, so we build the ``tokenizers`` object ourselves,
the way ``convert_slow_tokenizer.LlamaConverter`` does: the SentencePiece pieces become a BPE
vocabulary with ``byte_fallback``, merges are recovered from the vocabulary (a piece's merges
rank by its id, as SentencePiece BPE applies higher-scored = lower-id pieces first), and a
``Metaspace`` pre-tokenizer plays SentencePiece's whitespace handling. The result encodes
exactly like the SentencePiece model (the tests check this on task text) and is saved as
``tokenizer.json`` + ``tokenizer_config.json`` + ``chat_template.jinja``, which
``AutoTokenizer.from_pretrained(out_dir)`` loads without network.

Choices, and why:
- ``split_digits``: every digit is its own token, so arithmetic is learnable digit by digit.
- ``byte_fallback``: any text (newlines, unseen characters) still round-trips exactly.
- no dummy prefix (``add_dummy_prefix=False``, ``prepend_scheme="never"``) and an identity
  normaliser: a text tokenises the same at the start of a prompt or mid-conversation, and
  ``decode(encode(text)) == text`` for every text.
- Qwen-style chat template with ``<|im_start|>``/``<|im_end|>``: the same turn format as the
  real models this project trains, at about eight tokens of overhead per prompt (the role
  names are single pieces). ``<|im_end|>`` is the EOS, so generation stops at the end of the
  assistant turn. No system prompt is added unless the messages carry one.

Note: in transformers 5 ``apply_chat_template(..., tokenize=True)`` returns a ``BatchEncoding``
by default; pass ``return_dict=False`` to get the plain list of ids.
"""

from __future__ import annotations

import io
from pathlib import Path

import sentencepiece as spm
from tokenizers import Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE
from transformers import PreTrainedTokenizerFast

UNK, BOS, EOS, PAD, IM_START = "<unk>", "<s>", "<|im_end|>", "<pad>", "<|im_start|>"
ROLES = ("system", "user", "assistant")

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _training_lines(texts: list[str]) -> list[str]:
    """One SentencePiece sentence per non-empty line, plus the role names.

    The role names are repeated once per text because every chat-formatted example carries
    them; that frequency makes each a single piece, which keeps prompts short.
    """
    lines = [line for text in texts for line in text.split("\n") if line]
    return lines + [role for role in ROLES for _ in range(max(1, len(texts)))]


def train_sentencepiece(texts: list[str], vocab_size: int = 512) -> spm.SentencePieceProcessor:
    """Train a BPE SentencePiece model in memory; deterministic for a given corpus.

    ``vocab_size`` is an upper bound (``hard_vocab_limit=False``): on a small-alphabet corpus
    BPE runs out of merges earlier, and a smaller vocabulary is what a tiny model wants.
    ``num_threads=1`` and no sentence sampling/shuffling make the result reproducible.
    """
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(_training_lines(texts)),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            hard_vocab_limit=False,
            character_coverage=1.0,
            byte_fallback=True,
            split_digits=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=3,
            unk_piece=UNK,
            bos_piece=BOS,
            eos_piece=EOS,
            pad_piece=PAD,
            control_symbols=[IM_START],
            num_threads=1,
            input_sentence_size=0,
            shuffle_input_sentence=False,
            minloglevel=2,
        )
    except RuntimeError as err:  # e.g. vocab_size smaller than 256 bytes + specials + alphabet
        raise ValueError(f"sentencepiece training failed with vocab_size={vocab_size}: {err}") from err
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def _bpe_from_sentencepiece(sp: spm.SentencePieceProcessor) -> Tokenizer:
    """The ``tokenizers`` equivalent of a SentencePiece BPE model (see module docstring)."""
    size = sp.get_piece_size()
    vocab = {sp.id_to_piece(i): i for i in range(size)}
    mergeable = {
        sp.id_to_piece(i): i
        for i in range(size)
        if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i))
    }
    merges: list[tuple[str, str]] = []
    for piece, _ in sorted(mergeable.items(), key=lambda item: item[1]):
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece))]
        splits = [(left, right) for left, right in splits if left in mergeable and right in mergeable]
        merges += sorted(splits, key=lambda pair: (mergeable[pair[0]], mergeable[pair[1]]))
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=UNK, fuse_unk=True, byte_fallback=True))
    # split=True mirrors SentencePiece's split_by_whitespace: no piece spans a space.
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    return tokenizer


def train_tokenizer(texts: list[str], out_dir: str | Path, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train on ``texts``, save a transformers tokenizer to ``out_dir``, and return it.

    The returned tokenizer has ``eos_token="<|im_end|>"``, ``pad_token="<pad>"``,
    ``bos_token="<s>"`` (defined but never added automatically, like Qwen) and the chat
    template above; ``AutoTokenizer.from_pretrained(out_dir)`` gives an identical one.
    """
    sp = train_sentencepiece(texts, vocab_size)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_bpe_from_sentencepiece(sp),
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[IM_START],
        chat_template=CHAT_TEMPLATE,
    )
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer
