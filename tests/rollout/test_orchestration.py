"""One process: the orchestration over a single engine is the engine itself (same samples)."""

import pytest
from hf_tiny import make_tiny_model, make_tokenizer

from sept_megatron.rollout import SamplingParams
from sept_megatron.rollout.hf import HFRolloutEngine
from sept_megatron.rollout.orchestration import DataParallelEngines, Request
from sept_megatron.rollout.placement import EngineGroup, Placement


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    tokenizer = make_tokenizer(tmp_path_factory.mktemp("tokenizer"))
    return HFRolloutEngine(
        model=make_tiny_model("qwen2", tokenizer), tokenizer=tokenizer, batch_size=3, progress=False
    )


def prompts_of(engine, count: int) -> list[list[int]]:
    texts = [f"Compute {i} * {i + 3} + {'(1 + 2) ' * (i % 4)}." for i in range(count)]
    return [engine.tokenizer.encode(t) for t in texts]


def test_one_engine_gives_what_the_engine_gives(engine):
    prompts = prompts_of(engine, 7)
    sampling = SamplingParams(temperature=1.0, n=3, max_new_tokens=6, seed=2)
    engines = DataParallelEngines.single(engine)
    assert engines.generate(prompts, sampling) == engine.generate(prompts, sampling)


def test_generate_many_packs_and_keeps_request_order(engine):
    engines = DataParallelEngines.single(engine)
    greedy = SamplingParams(temperature=0.0, n=2, max_new_tokens=4)
    sampled = SamplingParams(temperature=1.0, n=1, max_new_tokens=4, seed=0)
    a, b = prompts_of(engine, 4), prompts_of(engine, 2)
    rows = engines.generate_many([Request(a, greedy), Request(b, sampled)], pack=lambda g: len(g.token_ids))
    assert [len(r) for r in rows] == [4, 2] and [len(x) for x in rows[0]] == [2] * 4
    assert rows[1] == [[len(g.token_ids)] for (g,) in engine.generate(b, sampled)]


def test_an_owner_needs_an_engine():
    with pytest.raises(ValueError, match="owns engine 0 but was given no engine"):
        DataParallelEngines(Placement((EngineGroup(0, (0,)),), rank=0), None)


def test_an_engine_that_breaks_its_contract_is_named(engine):
    class Short:
        shard_sequences = 1

        def generate(self, prompts, sampling):
            return [[] for _ in prompts]

    with pytest.raises(RuntimeError, match="Short.generate returned 2 prompts' worth"):
        DataParallelEngines.single(Short()).generate(prompts_of(engine, 2), SamplingParams(n=1))


@pytest.mark.slow
def test_a_rollout_past_the_timeout_fails_the_waiting_ranks_naming_the_engine():
    from mp import run_torchrun

    out = run_torchrun(2, "tests/rollout/_engine_timeout_worker.py", timeout=240).output
    line = next(l for l in out.splitlines() if l.startswith("rank 1 "))
    assert " ERROR " in line, out
    seconds = float(line.split()[3])
    assert seconds < 15, line  # the 3 s limit, not the 20 s the slow engine takes
    assert "engine group(s) [(0,)]" in line and "generating 8 sequences" in line, line
    assert "within rollout.timeout_minutes=0.05" in line, line
