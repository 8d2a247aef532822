"""The rollout of the SePT loop at any launch size (test_engine_data_parallel.py).

    torchrun --nproc-per-node=N tests/loop/_rollout_worker.py INPUTS OUT_JSON TP PP
    python tests/loop/_rollout_worker.py INPUTS OUT_JSON 1 1

Runs the loop's own set-up (config check, Megatron layout, question bank, one engine per rank)
and then, without training, two rounds of generation (different seeds and temperatures, n=2),
the offline-mode answers for part of the bank, and one in-training validation. Every rank
writes what it received (token ids) to ``OUT_JSON.rank<r>``, so the test can check that every
rank holds the same batch and that it equals the one-process run's.
"""

import json
import sys
from pathlib import Path

import torch.distributed as dist

from sept_megatron.config import load_config
from sept_megatron.data import QuestionSampler
from sept_megatron.logging import NullRunLogger
from sept_megatron.loop import startup
from sept_megatron.loop.round import answer_once, generate_round
from sept_megatron.loop.validation import validate_round
from sept_megatron.runtime import distributed


def main(inputs: str, out: str, tp: str, pp: str) -> None:
    root = Path(inputs)
    cfg = load_config(
        None,
        [
            f"model.hf_path={root / 'hf'}",
            f"data.train_files={root / 'train.jsonl'}",
            f"eval.benchmarks={root / 'val.jsonl'}",
            "eval.n=2",
            "eval.max_questions=5",
            "eval.every_n_rounds=1",
            "eval.temperature=1.0",
            "train.prompts_per_round=8",
            "train.mini_batch_size=8",
            "rollout.n=2",
            "rollout.batch_size=4",
            "data.max_response_length=12",
            f"parallel.tensor_parallel={tp}",
            f"parallel.pipeline_parallel={pp}",
            "logging.progress=false",
            "train.rounds=2",
        ],
    )
    arch, questions = startup.check_run(cfg, distributed.world_size_from_env())
    env = distributed.initialize(
        tensor_parallel=int(tp), pipeline_parallel=int(pp), seed=cfg.train.seed, device="cpu"
    )
    tokenizer = startup.tokenizer_of(cfg)
    bank, prompt_ids = startup.load_bank(cfg, questions, tokenizer, NullRunLogger())
    fleet = startup.build_fleet(cfg, env.rank)
    sampler = QuestionSampler(bank, seed=cfg.data.shuffle_seed)
    record: dict = {"engines": fleet.engines.num_engines, "rounds": []}
    for round_index, tau in enumerate((0.6, 1.0)):
        batch = generate_round(cfg, fleet, sampler.next_batch(8), prompt_ids, tau, round_index)
        record["rounds"].append(
            {
                "questions": [q.index for q in batch.questions],
                "samples": [[s.prompt_ids, s.response_ids] for s in batch.samples],
                "finish": [row["finish_reason"] for row in batch.rows],
            }
        )
    offline = answer_once(cfg, fleet, bank[:11], prompt_ids, cfg.rollout.tau_start)
    record["offline"] = {str(index): [list(g.token_ids) for g in gens] for index, gens in offline.items()}
    record["validation"] = validate_round(cfg, fleet, tokenizer, round_index=0)
    rank = dist.get_rank()
    Path(f"{out}.rank{rank}").write_text(json.dumps(record))
    distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:5])
