"""`sept-megatron train` in one process, checking at the start of every round's rollout that the
engine generates from the trainer's current weights (run by tests/loop/test_round_weights.py).

    python tests/loop/_round_weights.py OUT_JSON key=value ...

Before each round's generation (``loop.round.generate_round``, as the driver calls it): the trainer's weights as HF tensors
(``reshard.stream_hf_buckets`` over the peer transport: the bucket export, not the CPU direct
sync the loop uses) and the rollout engine's weights, a SHA-256 per tensor of each. After it:
the same prompts answered by a fresh transformers model holding the trainer's weights, with the
round's own sampling parameters, compared token by token with the round's samples. The loop
itself runs unchanged through the CLI entry point.
"""

import hashlib
import json
import sys

import torch

from sept_megatron import cli
from sept_megatron.loop import driver
from sept_megatron.loop.round import rollout_sampling
from sept_megatron.rollout.hf import HFRolloutEngine
from sept_megatron.runtime import compat
from sept_megatron.trainer import model as mdl
from sept_megatron.weight_sync.gather import stream_hf_buckets

built: dict = {}
rounds: list[dict] = []


def capture_model() -> None:
    original = mdl.build_megatron_model

    def recorded(*args, **kwargs):
        built["model"] = original(*args, **kwargs)
        return built["model"]

    mdl.build_megatron_model = recorded


def digest(tensor: torch.Tensor) -> str:
    raw = tensor.detach().to("cpu", torch.float32).contiguous().view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(raw).hexdigest()


def trainer_hf_weights() -> dict[str, torch.Tensor]:
    """The trainer's weights under their HF names (copies: the stream reuses its buffers)."""
    weights = {}
    for bucket in stream_hf_buckets(built["model"], 1 << 22, transport="peer"):
        weights |= {name: tensor.detach().clone() for name, tensor in bucket}
    return weights


def reference_samples(cfg, engine: HFRolloutEngine, weights, questions, prompt_ids, tau_s, seed):
    """The round's prompts answered by a fresh model holding ``weights`` (same sampling, same
    batch size, so the same batches and padding as the loop's engine)."""
    from transformers import AutoModelForCausalLM

    with compat.suspended():
        model = AutoModelForCausalLM.from_pretrained(
            cfg.model.hf_path, local_files_only=True, torch_dtype=torch.float32
        ).eval()
        model.load_state_dict(weights, strict=True)
        reference = HFRolloutEngine(
            model=model, tokenizer=engine.tokenizer, progress=False, batch_size=engine.batch_size
        )
        sampling = rollout_sampling(cfg, tau_s, seed)
        return reference.generate([prompt_ids[q.index] for q in questions], sampling)


def check_rounds() -> None:
    original = driver.generate_round

    def checked(cfg, fleet, questions, prompt_ids, tau_s, seed, answered=None):
        engine = fleet.local
        trainer = trainer_hf_weights()
        engine_state = engine.model.state_dict()
        batch = original(cfg, fleet, questions, prompt_ids, tau_s, seed, answered)
        expected = reference_samples(cfg, engine, trainer, questions, prompt_ids, tau_s, seed)
        produced = [sample.response_ids for sample in batch.samples]
        rounds.append(
            {
                "round": len(rounds) + 1,
                "tau_s": tau_s,
                "trainer": {name: digest(t) for name, t in trainer.items()},
                "engine": {name: digest(engine_state[name]) for name in trainer if name in engine_state},
                "samples": produced,
                "reference": [list(g.token_ids) for gens in expected for g in gens],
            }
        )
        return batch

    driver.generate_round = checked


def main(out_path: str, *overrides: str) -> None:
    capture_model()
    check_rounds()
    rc = cli.main(["train", *overrides])
    with open(out_path, "w") as f:
        json.dump({"rc": rc, "rounds": rounds}, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
