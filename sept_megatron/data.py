"""The question bank: loading, prompt rendering and per-epoch sampling.

SePT trains on questions only (no answers are needed), and evaluation grades the same kind of
records against ground truths, so both read questions through :func:`load_questions`:

* verl-style parquet: ``prompt`` (a chat list), ``reward_model.ground_truth``, ``data_source``;
* JSONL: one object per line with ``prompt`` (a string or a chat list), ``question`` or
  ``problem``, and optionally ``answer`` / ``ground_truth`` / ``reward_model.ground_truth``;
* a local Hugging Face ``datasets`` directory written by ``save_to_disk`` (same fields).

Prompts are rendered to token ids by :func:`render_prompt`; prompts longer than the rollout
budget are dropped (never truncated: a truncated question is a different question) by
:func:`filter_by_prompt_length`. :class:`QuestionSampler` walks the bank in a fresh
deterministic order every epoch and can resume mid-epoch from its state dict.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass
class Question:
    """One question. ``index`` is its position in the file it came from, so results can be
    joined back to the source; ``source`` is the benchmark / dataset name."""

    prompt_messages: list[dict]
    question_text: str
    ground_truth: str | None
    source: str
    index: int


# ---------------------------------------------------------------------------------------------
# Loading


def load_tokenizer(model_dir: str | Path):
    """The tokenizer of a local HF model directory (never the hub: nothing is downloaded)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)


def load_questions(path: str | Path, *, split: str | None = None) -> list[Question]:
    """Load questions from a parquet file, a JSONL file or a ``save_to_disk`` directory.

    ``split`` picks one split of a saved ``DatasetDict`` with several. Raises ``ValueError``
    naming the file (and, for JSONL, the 1-based line) when a record is malformed or the
    file holds no questions.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such question file or directory: {path}")
    if path.is_dir():
        records = _read_saved_dataset(path, split)
    elif path.suffix == ".parquet":
        records = _read_parquet(path)
    elif path.suffix in (".jsonl", ".json"):
        records = _read_jsonl(path)
    else:
        raise ValueError(
            f"{path}: unsupported question file type {path.suffix!r}; "
            "use .parquet, .jsonl or a datasets save_to_disk directory"
        )
    default_source = path.stem if path.is_file() else path.name
    questions = [
        _to_question(record, index, default_source, where) for index, (where, record) in enumerate(records)
    ]
    if not questions:
        raise ValueError(f"{path}: no questions in file (it is empty)")
    return questions


def _read_jsonl(path: Path) -> list[tuple[str, Any]]:
    """(location, record) pairs; blank lines are skipped, anything else must be a JSON object."""
    records = []
    with path.open(encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path}: line {line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: not valid JSON ({error})") from None
            records.append((where, record))
    return records


def _read_parquet(path: Path) -> list[tuple[str, Any]]:
    import pandas as pd

    frame = pd.read_parquet(path)
    return [
        (f"{path}: row {row_number}", record)
        for row_number, record in enumerate(frame.to_dict(orient="records"), start=1)
    ]


def _read_saved_dataset(path: Path, split: str | None) -> list[tuple[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise ImportError(
            f"{path} is a directory, read as a Hugging Face datasets save_to_disk folder, but "
            "the `datasets` package is not installed: pip install datasets (or convert the "
            "questions to .parquet / .jsonl)"
        ) from None
    dataset = datasets.load_from_disk(str(path))
    if isinstance(dataset, datasets.DatasetDict):
        if split is None and len(dataset) == 1:
            split = next(iter(dataset))
        if split not in dataset:
            raise ValueError(f"{path}: pass split=one of {sorted(dataset)} (got {split!r})")
        dataset = dataset[split]
    return [(f"{path}: record {number}", record) for number, record in enumerate(dataset, 1)]


def _to_question(record: Any, index: int, default_source: str, where: str) -> Question:
    """Turn one raw record into a Question; errors name the record's location."""
    if not isinstance(record, Mapping):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    messages = _prompt_messages(record, where)
    user_turns = [m for m in messages if m["role"] == "user"]
    if not user_turns:
        raise ValueError(f"{where}: the prompt chat list has no 'user' message")
    source = record.get("data_source")
    return Question(
        prompt_messages=messages,
        question_text=user_turns[-1]["content"],
        ground_truth=_ground_truth(record, where),
        source=source if isinstance(source, str) and source else default_source,
        index=index,
    )


def _prompt_messages(record: Mapping, where: str) -> list[dict]:
    for field in ("prompt", "question", "problem"):
        value = record.get(field)
        if value is None:
            continue
        if isinstance(value, str):
            if not value.strip():
                raise ValueError(f"{where}: field {field!r} is an empty string")
            return [{"role": "user", "content": value}]
        if field == "prompt" and isinstance(value, (list, tuple, np.ndarray)):
            return [_message(message, where) for message in value]
        raise ValueError(
            f"{where}: field {field!r} must be a string"
            + (" or a list of {role, content} messages" if field == "prompt" else "")
            + f", got {type(value).__name__}"
        )
    raise ValueError(
        f"{where}: no 'prompt', 'question' or 'problem' field (has: {', '.join(map(str, record))})"
    )


def _message(message: Any, where: str) -> dict:
    if (
        not isinstance(message, Mapping)
        or not isinstance(message.get("role"), str)
        or not isinstance(message.get("content"), str)
    ):
        raise ValueError(f"{where}: each prompt message must be {{'role': str, 'content': str}}")
    return {"role": message["role"], "content": message["content"]}


def _ground_truth(record: Mapping, where: str) -> str | None:
    reward_model = record.get("reward_model")
    candidates = [record.get("ground_truth"), record.get("answer")]
    if isinstance(reward_model, Mapping):
        candidates.insert(0, reward_model.get("ground_truth"))
    for value in candidates:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue  # parquet stores a missing answer as NaN
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ValueError(f"{where}: the answer must be a string or number, got {type(value).__name__}")
        return str(value)
    return None


# ---------------------------------------------------------------------------------------------
# Prompt rendering

_QWEN_CHAT = (
    "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"
)
QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
# Named templates (everything except "auto"): the question text in a fixed wrapper. The first
# four are the paper's (Fig. 4), as the authors' recipe renders them: Qwen-Math and Qwen-Base
# put the reasoning prompt (BOXED_INSTRUCTION) in the system turn; Qwen-Instruct keeps Qwen's
# own system prompt and appends the reasoning prompt to the question (on a new line: the
# separator is our reading); DeepSeek-Math (-Instruct) is its chat format with the reasoning
# prompt as the system text: BOS (added by the tokenizer), the prompt, "User: ...",
# "Assistant:". The two "-legacy" forms are this project's earlier renderings, kept so old
# runs can be reproduced. "plain" is for base models without a chat format: the question, then
# the same boxed-answer instruction on its own line.
TEMPLATES: dict[str, str | None] = {
    "auto": None,  # the tokenizer's own chat template, applied to the prompt messages as-is
    "qwen-math": _QWEN_CHAT.replace("{system}", BOXED_INSTRUCTION),
    "qwen-base": _QWEN_CHAT.replace("{system}", BOXED_INSTRUCTION),
    "qwen-instruct": _QWEN_CHAT.replace("{system}", QWEN_SYSTEM).replace("{q}", "{q}\n" + BOXED_INSTRUCTION),
    "deepseek-math": BOXED_INSTRUCTION + "\n\nUser: {q}\n\nAssistant:",
    "qwen-instruct-legacy": _QWEN_CHAT.replace("{system}", "You are a helpful assistant."),
    "deepseek-math-legacy": "User: {q}\n" + BOXED_INSTRUCTION + "\n\nAssistant:",
    "plain": "{q}\n" + BOXED_INSTRUCTION + "\n",
}


def check_template(template: str) -> None:
    """Raise a ValueError listing the valid names unless ``template`` is one of them."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown chat template {template!r}; valid templates: {', '.join(TEMPLATES)}")


def prompt_text(question: Question, tokenizer: Any, template: str) -> str:
    """The prompt string for ``question``.

    ``auto`` renders all of ``question.prompt_messages`` with the tokenizer's chat template
    (so a system message in the data is kept); named templates use ``question_text`` (the last
    user turn) only, because they fix the system prompt themselves.
    """
    check_template(template)
    fmt = TEMPLATES[template]
    if fmt is not None:
        return fmt.replace("{q}", question.question_text)
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            "template 'auto' needs a tokenizer with a chat template, and this one has none; "
            f"pick a named template instead: {', '.join(t for t in TEMPLATES if t != 'auto')}"
        )
    return tokenizer.apply_chat_template(question.prompt_messages, tokenize=False, add_generation_prompt=True)


def render_prompt(question: Question, tokenizer: Any, template: str) -> list[int]:
    """Token ids of the prompt for ``question`` under ``template`` (see :data:`TEMPLATES`).

    Chat-template text already carries its special tokens, so it is encoded without adding
    more; named templates get the tokenizer's usual specials (a BOS for Llama/DeepSeek-style
    tokenizers, nothing for Qwen).
    """
    text = prompt_text(question, tokenizer, template)
    add_special_tokens = TEMPLATES[template] is not None
    return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))


def render_prompts(questions: Iterable[Question], tokenizer: Any, template: str) -> list[list[int]]:
    """:func:`render_prompt` for many questions."""
    check_template(template)
    return [render_prompt(question, tokenizer, template) for question in questions]


def filter_by_prompt_length(
    questions: Sequence[Question], token_lists: Sequence[Sequence[int]], max_len: int
) -> tuple[list[Question], list[list[int]], int]:
    """Drop questions whose prompt has more than ``max_len`` tokens.

    Returns the kept questions, their token lists and the number dropped (also logged).
    Prompts are never truncated: a cut question is a different, often unanswerable, question.
    """
    if len(questions) != len(token_lists):
        raise ValueError(
            f"filter_by_prompt_length: {len(questions)} questions but {len(token_lists)} token lists"
        )
    kept = [(q, list(ids)) for q, ids in zip(questions, token_lists) if len(ids) <= max_len]
    dropped = len(questions) - len(kept)
    if dropped:
        logger.warning(
            "dropped %d of %d questions whose prompts exceed %d tokens",
            dropped,
            len(questions),
            max_len,
        )
    return [q for q, _ in kept], [ids for _, ids in kept], dropped


# ---------------------------------------------------------------------------------------------
# Sampling


class QuestionSampler:
    """Endless batches of questions, reshuffled every epoch.

    Epoch ``e`` visits the bank in the order ``permutation(seed, e)``, a pure function of the
    two numbers, so the state is just ``(epoch, position)``: a run resumed from
    :meth:`state_dict` yields exactly the batches the uninterrupted run would have. A batch
    that crosses an epoch boundary takes the end of one order and the start of the next (a
    question may then appear twice in that batch).
    """

    def __init__(self, questions: Sequence[Question], *, seed: int, shuffle: bool = True) -> None:
        if not questions:
            raise ValueError("QuestionSampler: no questions to sample from")
        self.questions = list(questions)
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0
        self._order_epoch = -1
        self._order = np.arange(0)

    def _order_for(self, epoch: int) -> np.ndarray:
        if epoch != self._order_epoch:
            if self.shuffle:
                # SeedSequence([seed, epoch]) keeps (seed, epoch) pairs from colliding, which
                # seed + epoch would not (seed 1 epoch 0 == seed 0 epoch 1).
                rng = np.random.default_rng([self.seed, epoch])
                self._order = rng.permutation(len(self.questions))
            else:
                self._order = np.arange(len(self.questions))
            self._order_epoch = epoch
        return self._order

    def next_batch(self, n: int) -> list[Question]:
        """The next ``n`` questions, moving into the next epoch(s) when one runs out."""
        if n < 1:
            raise ValueError(f"QuestionSampler.next_batch: n must be >= 1, got {n}")
        batch = []
        while len(batch) < n:
            order = self._order_for(self.epoch)
            take = min(n - len(batch), len(order) - self.position)
            batch.extend(self.questions[i] for i in order[self.position : self.position + take])
            self.position += take
            if self.position == len(order):
                self.epoch, self.position = self.epoch + 1, 0
        return batch

    @property
    def epoch_float(self) -> float:
        """Fractional epochs consumed, e.g. 1.25 a quarter into the second epoch."""
        return self.epoch + self.position / len(self.questions)

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "num_questions": len(self.questions),
        }

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Resume; refuses a state saved for a different seed or question bank size."""
        for key, expected in (("seed", self.seed), ("num_questions", len(self.questions))):
            if key in state and state[key] != expected:
                raise ValueError(
                    f"QuestionSampler.load_state_dict: saved {key}={state[key]} but this sampler "
                    f"has {key}={expected}; resume with the same data and seed"
                )
        position = int(state["position"])
        if not 0 <= position < len(self.questions):
            raise ValueError(f"QuestionSampler.load_state_dict: position {position} out of range")
        self.epoch, self.position = int(state["epoch"]), position
