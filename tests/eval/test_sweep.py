"""The temperature sweep, in-training validation and the ``eval`` CLI, with a fake engine."""

from __future__ import annotations

import json
import random
import sys
import types
from pathlib import Path

import pytest

from sept_megatron.data import Question, load_questions
from sept_megatron.eval import cli
from sept_megatron.eval.sweep import check_sweep_args, evaluate_once, run_sweep, temperature_label
from sept_megatron.rollout.base import Generation, SamplingParams

TEMPERATURES = [0.0, 0.6, 1.2]


class CharTokenizer:
    """One token per character: prompts decode back to their exact text. No chat template."""

    chat_template = None
    eos_token_id = 0

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(ch) for ch in text]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(chr(i) for i in ids)


class FakeEngine:
    """Answers from a lookup table, correctly with a probability that peaks at T = 0.6.

    Deterministic: the outcome of sample ``s`` of a prompt depends only on (prompt, T, s, seed).
    Some wrong answers are unboxed or truncated, to exercise those paths. It records every
    call and the number of correct answers it meant to produce, to check the grading.
    """

    shard_sequences = 1

    def __init__(self, answers: dict[str, str], fail_on_call: int | None = None) -> None:
        self.tokenizer = CharTokenizer()
        self.answers = answers
        self.calls: list[tuple[int, SamplingParams]] = []
        self.intended_correct = 0
        self.fail_on_call = fail_on_call

    @staticmethod
    def accuracy(temperature: float) -> float:
        return 0.45 if temperature == 0 else max(0.05, 0.7 - 0.5 * abs(temperature - 0.6))

    def generate(self, prompts, sampling: SamplingParams) -> list[list[Generation]]:
        if self.fail_on_call is not None and len(self.calls) == self.fail_on_call:
            raise KeyboardInterrupt("simulated interruption")
        self.calls.append((len(prompts), sampling))
        return [[self._sample(p, sampling, s) for s in range(sampling.n)] for p in prompts]

    def _sample(self, prompt, sampling: SamplingParams, sample: int) -> Generation:
        text = self.tokenizer.decode(prompt)
        question = next(q for q in self.answers if q in text)
        rng = random.Random(f"{text}|{sampling.temperature}|{sample}|{sampling.seed}")
        if rng.random() < self.accuracy(sampling.temperature):
            self.intended_correct += 1
            response, finish = f"Reasoning. So the answer is \\boxed{{{self.answers[question]}}}.", "stop"
        elif rng.random() < 0.5:
            response, finish = f"I think it is \\boxed{{{self.answers[question]}+1}}", "stop"
        else:
            response, finish = "Let me keep thinking and thinking", "length"
        return Generation(token_ids=[ord(c) for c in response], text=response, finish_reason=finish)

    def update_weights(self, buckets) -> None: ...
    def release_memory(self) -> None: ...
    def resume_memory(self) -> None: ...


def synthetic_benchmarks() -> dict[str, list[Question]]:
    def bank(name: str, count: int) -> list[Question]:
        return [
            Question(
                prompt_messages=[{"role": "user", "content": f"[{name}-{i}] what is {i}*{i}?"}],
                question_text=f"[{name}-{i}] what is {i}*{i}?",
                ground_truth=str(i * i),
                source=name,
                index=i,
            )
            for i in range(count)
        ]

    return {"alpha": bank("alpha", 5), "beta": bank("beta", 7)}


def engine_for(benchmarks: dict[str, list[Question]], **kwargs) -> FakeEngine:
    return FakeEngine({q.question_text: q.ground_truth for qs in benchmarks.values() for q in qs}, **kwargs)


def sweep(engine, benchmarks, out_dir: Path, n: int = 4, temperatures=TEMPERATURES) -> dict:
    return run_sweep(
        engine,
        engine.tokenizer,
        benchmarks,
        temperatures,
        n,
        out_dir,
        max_new_tokens=64,
        template="plain",
        seed=0,
        progress=False,
    )


# --------------------------------------------------------------------------------------------
# The sweep


def test_sweep_on_real_benchmark_slices_writes_every_output(benchmark_dir: Path, tmp_path: Path) -> None:
    benchmarks = {
        "aime": load_questions(benchmark_dir / "aime.parquet")[:6],
        "math500": load_questions(benchmark_dir / "math500.parquet")[:8],
    }
    engine = engine_for(benchmarks)
    summary = sweep(engine, benchmarks, tmp_path, n=8)

    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert summary["benchmarks"] == ["aime", "math500"] and summary["temperatures"] == TEMPERATURES
    correct_total = 0
    for name, questions in benchmarks.items():
        for t in TEMPERATURES:
            label = temperature_label(t)
            cell = summary["cells"][name][label]
            n_drawn = 1 if t == 0 else 8
            assert cell["n"] == n_drawn and cell["num_questions"] == len(questions)
            assert set(cell) >= {f"pass@{k}" for k in (1, 2, 4, 8)}
            assert "pass@16" not in cell or t == 0
            if t == 0:  # greedy: pass@k is pass@1 for every k
                assert len({cell[f"pass@{k}"] for k in (1, 8, 32)}) == 1
            lines = (tmp_path / "responses" / f"{name}_T{label}.jsonl").read_text().splitlines()
            records = [json.loads(line) for line in lines]
            assert len(records) == len(questions) * n_drawn
            assert all(isinstance(r["correct"], bool) and r["benchmark"] == name for r in records)
            correct_total += sum(r["correct"] for r in records)
            stored = json.loads((tmp_path / "cells" / f"{name}_T{label}.json").read_text())
            assert sum(stored["correct_counts"]) == sum(r["correct"] for r in records)
    assert correct_total == engine.intended_correct  # the grader agrees with the engine's intent

    assert summary["avg_ks"][temperature_label(0.6)] == [1, 8]  # n = 8 < 32
    best = max(TEMPERATURES, key=lambda t: summary["avg"][temperature_label(t)])
    assert summary["best_temperature"] == best
    markdown = (tmp_path / "results.md").read_text()
    assert f"**{temperature_label(best)}** (baseline)" in markdown
    assert "| T | aime | math500 |" in markdown
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.rglob("*.tmp"))


def test_rerun_skips_finished_cells(tmp_path: Path) -> None:
    benchmarks = synthetic_benchmarks()
    first = sweep(engine_for(benchmarks), benchmarks, tmp_path)
    again = engine_for(benchmarks)
    assert sweep(again, benchmarks, tmp_path) == first
    assert again.calls == []

    (tmp_path / "cells" / "beta_T0.6.json").unlink()  # as if that cell never finished
    redo = engine_for(benchmarks)
    assert sweep(redo, benchmarks, tmp_path) == first  # same seed -> same samples
    assert [(count, s.temperature) for count, s in redo.calls] == [(7, 0.6)]


def test_interrupted_sweep_resumes_where_it_stopped(tmp_path: Path) -> None:
    benchmarks = synthetic_benchmarks()
    reference = sweep(engine_for(benchmarks), benchmarks, tmp_path / "reference")

    interrupted = engine_for(benchmarks, fail_on_call=4)  # dies during the 5th cell
    with pytest.raises(KeyboardInterrupt):
        sweep(interrupted, benchmarks, tmp_path / "run")
    assert len(list((tmp_path / "run" / "cells").glob("*.json"))) == 4
    assert not (tmp_path / "run" / "results.json").exists()

    resumed = engine_for(benchmarks)
    assert sweep(resumed, benchmarks, tmp_path / "run") == reference
    assert len(resumed.calls) == 2  # the unfinished cell and the one never started


def test_rerun_with_other_settings_is_refused(tmp_path: Path) -> None:
    benchmarks = synthetic_benchmarks()
    sweep(engine_for(benchmarks), benchmarks, tmp_path, n=4)
    with pytest.raises(ValueError, match=r"different settings \(n\)"):
        sweep(engine_for(benchmarks), benchmarks, tmp_path, n=8)
    changed = {**benchmarks, "alpha": benchmarks["alpha"][:3]}
    with pytest.raises(ValueError, match="num_questions"):
        sweep(engine_for(changed), changed, tmp_path, n=4)


def test_sweep_may_add_temperatures_to_a_finished_one(tmp_path: Path) -> None:
    benchmarks = synthetic_benchmarks()
    sweep(engine_for(benchmarks), benchmarks, tmp_path, temperatures=[0.0, 0.6])
    more = engine_for(benchmarks)
    summary = sweep(more, benchmarks, tmp_path, temperatures=[0.0, 0.6, 1.0])
    assert {s.temperature for _, s in more.calls} == {1.0}
    assert summary["temperatures"] == [0.0, 0.6, 1.0]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"temperatures": [0.0, -0.1]}, "temperature"),
        ({"temperatures": [0.5, 0.5]}, "repeat"),
        ({"temperatures": [float("nan")]}, "temperature"),
        ({"n": 0}, "n"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"template": "nope"}, "valid templates"),
    ],
)
def test_bad_sweep_arguments_fail_before_generation(change: dict, message: str) -> None:
    args = {
        "benchmarks": synthetic_benchmarks(),
        "temperatures": [0.0],
        "n": 2,
        "max_new_tokens": 8,
        "template": "plain",
        **change,
    }
    with pytest.raises(ValueError, match=message):
        check_sweep_args(**args)


def test_questions_without_ground_truth_cannot_be_swept() -> None:
    benchmarks = synthetic_benchmarks()
    benchmarks["alpha"][2].ground_truth = None
    with pytest.raises(ValueError, match="no ground truth"):
        check_sweep_args(benchmarks, [0.0], 2, 8, "plain")


def test_temperature_labels() -> None:
    assert [temperature_label(t) for t in (0, 0.2, 1.0, 1.25, 0.1 + 0.2)] == [
        "0.0",
        "0.2",
        "1.0",
        "1.25",
        "0.3",
    ]


# --------------------------------------------------------------------------------------------
# In-training validation


def test_evaluate_once_returns_val_metrics() -> None:
    benchmarks = synthetic_benchmarks()
    engine = engine_for(benchmarks)
    metrics = evaluate_once(
        engine,
        engine.tokenizer,
        benchmarks,
        temperature=0.6,
        n=4,
        max_questions=3,
        max_new_tokens=32,
        template="plain",
    )
    assert [count for count, _ in engine.calls] == [3, 3]
    assert set(metrics) == {f"val/{b}/pass@{k}" for b in benchmarks for k in (1, 2, 4)} | {
        "val/avg",
        "val/mean_response_tokens",
    }
    assert 0 <= metrics["val/avg"] <= 1
    assert metrics["val/avg"] == pytest.approx(
        (metrics["val/alpha/pass@1"] + metrics["val/beta/pass@1"]) / 2
    )  # n = 4: AVG is pass@1


def test_evaluate_once_greedy() -> None:
    benchmarks = synthetic_benchmarks()
    engine = engine_for(benchmarks)
    metrics = evaluate_once(engine, engine.tokenizer, benchmarks, temperature=0.0, n=8, template="plain")
    assert all(s.n == 1 for _, s in engine.calls)
    assert metrics["val/alpha/pass@32"] == metrics["val/alpha/pass@1"]


# --------------------------------------------------------------------------------------------
# The CLI


def write_benchmark(path: Path, count: int) -> Path:
    lines = [
        json.dumps({"question": f"[{path.stem}-{i}] what is {i}*{i}?", "answer": str(i * i)})
        for i in range(count)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--temperatures", "0,abc"], "argument --temperatures: 'abc' is not a number"),
        (["--temperatures", "0,-0.5"], "argument --temperatures: temperature -0.5 is invalid"),
        (["--n", "0"], "argument --n: must be >= 1"),
        (["--max-questions", "0"], "argument --max-questions"),
        (["--benchmarks", "missing.parquet"], "argument --benchmarks: no such file: missing.parquet"),
        (["--model", "./no/such/model"], "argument --model: no such directory"),
        (["--template", "nope"], "argument --template: invalid choice"),
        (["--backend", "vllm"], "argument --backend: invalid choice"),
    ],
)
def test_cli_rejects_bad_arguments(tmp_path: Path, capsys, flags: list[str], message: str) -> None:
    bench = write_benchmark(tmp_path / "alpha.jsonl", 2)
    argv = ["--model", str(tmp_path), "--benchmarks", str(bench), "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(argv + flags)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_defaults_and_benchmark_directory(tmp_path: Path) -> None:
    write_benchmark(tmp_path / "alpha.jsonl", 2)
    write_benchmark(tmp_path / "beta.jsonl", 2)
    (tmp_path / "notes.txt").write_text("ignored")
    args = cli.parse_args(["--model", str(tmp_path), "--benchmarks", str(tmp_path), "--out", "o"])
    assert args.temperatures == [i / 10 for i in range(17)]  # the reference's grid
    assert [p.name for p in args.benchmark_files] == ["alpha.jsonl", "beta.jsonl"]
    assert (args.n, args.max_new_tokens, args.template, args.backend) == (32, 3072, "auto", "hf")


def test_cli_runs_a_sweep_through_build_engine(tmp_path: Path, monkeypatch, capsys) -> None:
    files = [write_benchmark(tmp_path / "alpha.jsonl", 4), write_benchmark(tmp_path / "beta.jsonl", 3)]
    benchmarks = {p.stem: load_questions(p) for p in files}
    built = {}

    def fake_build_engine(backend, model_path, **kwargs):
        built.update(backend=backend, model_path=model_path, **kwargs)
        return engine_for(benchmarks)

    monkeypatch.setattr("sept_megatron.rollout.build_engine", fake_build_engine)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    argv = [
        "--model",
        str(model_dir),
        "--benchmarks",
        ",".join(map(str, files)),
        "--temperatures",
        "0,1",
        "--n",
        "2",
        "--out",
        str(tmp_path / "out"),
        "--template",
        "plain",
        "--max-questions",
        "3",
        "--batch-size",
        "5",
        "--device",
        "cpu",
    ]
    assert cli.main(argv) == 0
    assert built["backend"] == "hf" and built["model_path"] == str(model_dir)
    assert built["batch_size"] == 5 and built["device"] == "cpu"
    summary = json.loads((tmp_path / "out" / "results.json").read_text())
    assert summary["cells"]["alpha"]["1.0"]["num_questions"] == 3
    assert "best temperature (baseline)" in capsys.readouterr().out

    other_model = tmp_path / "other"
    other_model.mkdir()
    with pytest.raises(SystemExit, match="fresh --out"):
        cli.main(argv[:1] + [str(other_model)] + argv[2:])


def test_cli_exports_a_megatron_checkpoint_first(tmp_path: Path, monkeypatch) -> None:
    bench = write_benchmark(tmp_path / "alpha.jsonl", 2)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "latest").write_text("iter_0000010\n")
    exports = []

    def fake_export(ckpt_dir, out_dir):
        exports.append((ckpt_dir, out_dir))
        Path(out_dir).mkdir(parents=True)
        (Path(out_dir) / "config.json").write_text("{}")
        return out_dir

    fake_convert = types.ModuleType("sept_megatron.convert")
    fake_convert.export_megatron_to_hf = fake_export
    monkeypatch.setitem(sys.modules, "sept_megatron.convert", fake_convert)
    loaded = []
    monkeypatch.setattr(
        "sept_megatron.rollout.build_engine",
        lambda backend, path, **kw: loaded.append(path) or engine_for({"alpha": load_questions(bench)}),
    )
    out = tmp_path / "out"
    argv = [
        "--model",
        str(ckpt),
        "--benchmarks",
        str(bench),
        "--temperatures",
        "0",
        "--out",
        str(out),
        "--template",
        "plain",
        "--device",
        "cpu",
    ]
    assert cli.main(argv) == 0
    assert exports == [(str(ckpt), str(out / "hf_model"))]
    assert loaded == [str(out / "hf_model")]
    assert cli.main(argv) == 0  # resumed: the export is reused
    assert len(exports) == 1


@pytest.mark.slow
def test_cli_end_to_end_with_a_tiny_hf_model(tmp_path: Path) -> None:
    """The real hf backend on a random-init tiny model: the answers are junk, but every stage
    (load, template, generate, grade, report) runs for real."""
    from hf_tiny import make_tiny_model, make_tokenizer

    tokenizer = make_tokenizer(tmp_path / "tok")
    model = make_tiny_model("qwen2", tokenizer)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    bench = write_benchmark(tmp_path / "alpha.jsonl", 3)
    argv = [
        "--model",
        str(tmp_path / "model"),
        "--benchmarks",
        str(bench),
        "--temperatures",
        "0,1",
        "--n",
        "2",
        "--max-new-tokens",
        "6",
        "--out",
        str(tmp_path / "out"),
        "--device",
        "cpu",
    ]
    assert cli.main(argv) == 0
    summary = json.loads((tmp_path / "out" / "results.json").read_text())
    assert summary["cells"]["alpha"]["1.0"]["n"] == 2
    assert (tmp_path / "out" / "sweep.png").is_file()


@pytest.mark.slow
def test_cli_under_torchrun_equals_one_process(tmp_path: Path) -> None:
    """Two ranks, one hf engine each, questions and cells spread over both, rank 0 grading in
    a pool: the same results.json and responses as one process."""
    from hf_tiny import make_tiny_model, make_tokenizer
    from mp import run_python, run_torchrun

    tokenizer = make_tokenizer(tmp_path / "tok")
    make_tiny_model("qwen2", tokenizer).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    files = [write_benchmark(tmp_path / "alpha.jsonl", 1), write_benchmark(tmp_path / "beta.jsonl", 5)]
    common = [
        "eval",
        "--model",
        tmp_path / "model",
        "--benchmarks",
        ",".join(map(str, files)),
        "--temperatures",
        "0,1",
        "--samples",
        "2",
        "--max-new-tokens",
        "6",
        "--batch-size",
        "2",
        "--device",
        "cpu",
    ]
    run_python("sept_megatron.cli", *common, "--out", tmp_path / "one", "--grading-workers", "0")
    run_torchrun(2, "sept_megatron.cli", *common, "--out", tmp_path / "two", "--grading-workers", "1")
    one, two = tmp_path / "one", tmp_path / "two"
    assert json.loads((two / "results.json").read_text()) == json.loads((one / "results.json").read_text())
    responses = sorted(p.name for p in (one / "responses").iterdir())
    assert len(responses) == 4 and responses == sorted(p.name for p in (two / "responses").iterdir())
    for name in responses:
        assert (two / "responses" / name).read_text() == (one / "responses" / name).read_text()
    sampled = [json.loads(line) for line in (one / "responses" / "beta_T1.0.jsonl").read_text().splitlines()]
    assert len({r["response"] for r in sampled}) > 1
