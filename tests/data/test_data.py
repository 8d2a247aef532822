"""The question bank: loaders, prompt templates, the length filter and the sampler."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest

from sept_megatron.data import (
    BOXED_INSTRUCTION,
    TEMPLATES,
    Question,
    QuestionSampler,
    filter_by_prompt_length,
    load_questions,
    prompt_text,
    render_prompt,
    render_prompts,
)

BENCHMARKS = ("aime", "aime25", "amc23", "math500", "minerva", "olympiadbench")


@pytest.fixture(scope="module")
def tokenizer():
    """A real transformers tokenizer built offline: byte-level, no merges, Qwen-style specials
    and chat template. No BOS, like Qwen's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", additional_special_tokens=["<|im_start|>"]
    )
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return tok


def make_questions(count: int) -> list[Question]:
    return [
        Question(
            prompt_messages=[{"role": "user", "content": f"q{i}"}],
            question_text=f"q{i}",
            ground_truth=str(i),
            source="synthetic",
            index=i,
        )
        for i in range(count)
    ]


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------
# Loading


@pytest.mark.parametrize("name", BENCHMARKS)
def test_load_shared_benchmark_parquet(benchmark_dir: Path, name: str) -> None:
    questions = load_questions(benchmark_dir / f"{name}.parquet")
    assert questions and all(q.source == name for q in questions)
    assert [q.index for q in questions] == list(range(len(questions)))
    for q in questions:
        assert isinstance(q.ground_truth, str) and q.ground_truth
        assert q.prompt_messages[-1]["role"] == "user"
        assert q.question_text == q.prompt_messages[-1]["content"]
        assert isinstance(q.prompt_messages, list) and isinstance(q.prompt_messages[0], dict)


def test_math500_first_question(benchmark_dir: Path) -> None:
    first = load_questions(benchmark_dir / "math500.parquet")[0]
    assert first.ground_truth == r"\left( 3, \frac{\pi}{2} \right)"
    assert first.question_text.startswith("Convert the point $(0,3)$")
    assert len(load_questions(benchmark_dir / "math500.parquet")) == 500


def test_load_jsonl_accepts_every_supported_shape(tmp_path: Path) -> None:
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "1+1?"}]
    path = write_lines(
        tmp_path / "mixed.jsonl",
        [
            json.dumps({"prompt": "What is 2+3?", "answer": "5"}),
            "",  # blank lines are skipped
            json.dumps({"prompt": chat, "ground_truth": "2", "data_source": "tiny"}),
            json.dumps({"question": "Name a prime.", "answer": 7}),
            json.dumps({"problem": "Unanswered?"}),
            json.dumps({"prompt": "verl style", "reward_model": {"ground_truth": "x", "style": "rule"}}),
        ],
    )
    questions = load_questions(path)
    assert [q.index for q in questions] == [0, 1, 2, 3, 4]
    assert [q.ground_truth for q in questions] == ["5", "2", "7", None, "x"]
    assert [q.source for q in questions] == ["mixed", "tiny", "mixed", "mixed", "mixed"]
    assert questions[0].prompt_messages == [{"role": "user", "content": "What is 2+3?"}]
    assert questions[1].prompt_messages == chat and questions[1].question_text == "1+1?"


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"text": "no question field"}), "no 'prompt', 'question' or 'problem' field"),
        (json.dumps({"prompt": 5}), "must be a string or a list"),
        (json.dumps({"prompt": [{"role": "user"}]}), "role"),
        (json.dumps({"prompt": [{"role": "system", "content": "s"}]}), "no 'user' message"),
        (json.dumps({"question": "q", "answer": ["a"]}), "string or number"),
        (json.dumps([1, 2]), "expected a JSON object"),
    ],
)
def test_malformed_jsonl_line_is_named_by_file_and_line(tmp_path: Path, bad_line: str, message: str) -> None:
    path = write_lines(
        tmp_path / "data.jsonl",
        [
            json.dumps({"question": "ok", "answer": "1"}),
            "",
            bad_line,
        ],
    )
    with pytest.raises(ValueError, match=message) as error:
        load_questions(path)
    assert f"{path}: line 3" in str(error.value)


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_empty_file_is_an_error_naming_it(tmp_path: Path, content: str) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match="empty") as error:
        load_questions(path)
    assert str(path) in str(error.value)


def test_missing_and_unsupported_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_questions(tmp_path / "nope.jsonl")
    (tmp_path / "q.csv").write_text("question\nq\n")
    with pytest.raises(ValueError, match="unsupported"):
        load_questions(tmp_path / "q.csv")


def test_parquet_written_here_round_trips(tmp_path: Path) -> None:
    import pandas as pd

    frame = pd.DataFrame(
        {
            "prompt": [[{"role": "user", "content": "a?"}], [{"role": "user", "content": "b?"}]],
            "reward_model": [{"ground_truth": "1", "style": "rule"}, {"ground_truth": "2", "style": "rule"}],
        }
    )
    frame.to_parquet(tmp_path / "mini.parquet")
    questions = load_questions(tmp_path / "mini.parquet")
    assert [(q.question_text, q.ground_truth, q.source) for q in questions] == [
        ("a?", "1", "mini"),
        ("b?", "2", "mini"),
    ]


def test_datasets_directory_without_datasets_installed_is_a_clear_error(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ImportError, match="pip install datasets"):
        load_questions(tmp_path)


def test_datasets_directory_loads(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list([{"question": "q?", "answer": "3"}]).save_to_disk(str(tmp_path / "ds"))
    [question] = load_questions(tmp_path / "ds")
    assert (question.question_text, question.ground_truth, question.source) == ("q?", "3", "ds")


# --------------------------------------------------------------------------------------------
# Prompts

QUESTION = Question(
    prompt_messages=[{"role": "user", "content": "What is $1+1$?"}],
    question_text="What is $1+1$?",
    ground_truth="2",
    source="t",
    index=0,
)


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        (
            "qwen-math",
            "<|im_start|>system\nPlease reason step by step, and put your final answer "
            "within \\boxed{}.<|im_end|>\n<|im_start|>user\nWhat is $1+1$?<|im_end|>\n"
            "<|im_start|>assistant\n",
        ),
        # The paper's templates (Fig. 4), as the authors' recipe renders them (issue 20).
        (
            "qwen-base",
            "<|im_start|>system\nPlease reason step by step, and put your final answer "
            "within \\boxed{}.<|im_end|>\n<|im_start|>user\nWhat is $1+1$?<|im_end|>\n"
            "<|im_start|>assistant\n",
        ),
        (
            "qwen-instruct",
            "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a "
            "helpful assistant.<|im_end|>\n<|im_start|>user\nWhat is $1+1$?\n"
            "Please reason step by step, and put your final answer within "
            "\\boxed{}.<|im_end|>\n<|im_start|>assistant\n",
        ),
        (
            "deepseek-math",
            "Please reason step by step, and put your final answer within "
            "\\boxed{}.\n\nUser: What is $1+1$?\n\nAssistant:",
        ),
        (
            "qwen-instruct-legacy",
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
            "<|im_start|>user\nWhat is $1+1$?<|im_end|>\n"
            "<|im_start|>assistant\n",
        ),
        (
            "deepseek-math-legacy",
            "User: What is $1+1$?\nPlease reason step by step, and put your "
            "final answer within \\boxed{}.\n\nAssistant:",
        ),
        ("plain", "What is $1+1$?\n" + BOXED_INSTRUCTION + "\n"),
        ("auto", "<|im_start|>user\nWhat is $1+1$?<|im_end|>\n<|im_start|>assistant\n"),
    ],
)
def test_templates_render_the_documented_text(tokenizer, template: str, expected: str) -> None:
    assert prompt_text(QUESTION, tokenizer, template) == expected
    ids = render_prompt(QUESTION, tokenizer, template)
    assert tokenizer.decode(ids) == expected


def test_auto_template_keeps_special_tokens_as_single_ids(tokenizer) -> None:
    ids = render_prompt(QUESTION, tokenizer, "auto")
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids.count(tokenizer.eos_token_id) == 1


def test_unknown_template_lists_the_valid_ones(tokenizer) -> None:
    with pytest.raises(ValueError, match="qwen-math") as error:
        render_prompt(QUESTION, tokenizer, "qwen_math")
    assert all(name in str(error.value) for name in TEMPLATES)


def test_auto_template_needs_a_chat_template(tokenizer) -> None:
    bare = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, eos_token="<|im_end|>")
    bare.chat_template = None
    with pytest.raises(ValueError, match="named template"):
        render_prompt(QUESTION, bare, "auto")


def test_filter_drops_long_prompts_without_truncating(tokenizer, caplog) -> None:
    questions = make_questions(4)
    token_lists = [[1] * 5, [2] * 11, [3] * 10, [4] * 30]
    with caplog.at_level(logging.WARNING, logger="sept_megatron.data"):
        kept, kept_ids, dropped = filter_by_prompt_length(questions, token_lists, max_len=10)
    assert dropped == 2
    assert [q.index for q in kept] == [0, 2]
    assert kept_ids == [[1] * 5, [3] * 10]
    assert "dropped 2 of 4" in caplog.text
    with pytest.raises(ValueError):
        filter_by_prompt_length(questions, token_lists[:2], max_len=10)


def test_render_prompts_matches_render_prompt(tokenizer) -> None:
    questions = make_questions(3)
    assert render_prompts(questions, tokenizer, "plain") == [
        render_prompt(q, tokenizer, "plain") for q in questions
    ]


# --------------------------------------------------------------------------------------------
# Sampler


def indices(batches: list[list[Question]]) -> list[list[int]]:
    return [[q.index for q in batch] for batch in batches]


def test_sampler_is_deterministic_and_reshuffles_each_epoch() -> None:
    questions = make_questions(10)
    first = QuestionSampler(questions, seed=3)
    second = QuestionSampler(questions, seed=3)
    epochs_a = [[q.index for q in first.next_batch(10)] for _ in range(3)]
    epochs_b = [[q.index for q in second.next_batch(10)] for _ in range(3)]
    assert epochs_a == epochs_b
    assert all(sorted(epoch) == list(range(10)) for epoch in epochs_a)  # each epoch a permutation
    assert len({tuple(epoch) for epoch in epochs_a}) == 3
    other_seed = [q.index for q in QuestionSampler(questions, seed=4).next_batch(10)]
    assert other_seed != epochs_a[0]


def test_sampler_batches_cross_epoch_boundaries() -> None:
    sampler = QuestionSampler(make_questions(4), seed=0)
    assert sampler.epoch_float == 0.0
    batch = sampler.next_batch(3)
    assert sampler.epoch_float == pytest.approx(0.75)
    batch += sampler.next_batch(3)
    assert (sampler.epoch, sampler.position) == (1, 2)
    assert sampler.epoch_float == pytest.approx(1.5)
    assert sorted(q.index for q in batch[:4]) == [0, 1, 2, 3]
    big = sampler.next_batch(10)  # more than the bank: spans several epochs
    assert len(big) == 10 and sampler.epoch_float == pytest.approx(4.0)


def test_resumed_sampler_yields_the_same_batches() -> None:
    questions = make_questions(10)
    uninterrupted = QuestionSampler(questions, seed=7)
    expected = [uninterrupted.next_batch(3) for _ in range(8)]

    before = QuestionSampler(questions, seed=7)
    head = [before.next_batch(3) for _ in range(3)]
    state = json.loads(json.dumps(before.state_dict()))  # as a checkpoint would store it
    resumed = QuestionSampler(questions, seed=7)
    resumed.load_state_dict(state)
    assert resumed.epoch_float == before.epoch_float
    tail = [resumed.next_batch(3) for _ in range(5)]
    assert indices(head + tail) == indices(expected)


def test_sampler_refuses_a_state_from_another_run() -> None:
    state = QuestionSampler(make_questions(10), seed=1).state_dict()
    with pytest.raises(ValueError, match="seed"):
        QuestionSampler(make_questions(10), seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="num_questions"):
        QuestionSampler(make_questions(9), seed=1).load_state_dict(state)


def test_sampler_without_shuffle_keeps_file_order() -> None:
    sampler = QuestionSampler(make_questions(5), seed=0, shuffle=False)
    assert indices([sampler.next_batch(7)]) == [[0, 1, 2, 3, 4, 0, 1]]


def test_sampler_rejects_empty_bank_and_bad_batch() -> None:
    with pytest.raises(ValueError):
        QuestionSampler([], seed=0)
    with pytest.raises(ValueError):
        QuestionSampler(make_questions(2), seed=0).next_batch(0)
