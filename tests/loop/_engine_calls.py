"""`sept-megatron train` in one process, recording what reaches the model and the rollout engine
(run by tests/loop/test_engine_memory.py).

    python tests/loop/_engine_calls.py OUT_JSON key=value ...

Records, in order, every call of the hf engine's generate / release_memory / resume_memory /
update_weights / bind_weights and of the loop's weight sync (``sync``), and the attention
module and recompute setting of the Megatron model the loop built; the loop itself runs unchanged through the CLI entry point.
"""

import json
import sys

from sept_megatron import cli
from sept_megatron.loop.fleet import EngineFleet
from sept_megatron.rollout.hf import HFRolloutEngine
from sept_megatron.trainer import model as mdl

ENGINE_METHODS = ("generate", "release_memory", "resume_memory", "update_weights", "bind_weights")


def record_engine_calls(calls: list[str]) -> None:
    for name in ENGINE_METHODS:
        original = getattr(HFRolloutEngine, name)

        def recorded(self, *args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(self, *args, **kwargs)

        setattr(HFRolloutEngine, name, recorded)


def record_syncs(calls: list[str]) -> None:
    original = EngineFleet.sync

    def recorded(self, model, *, refresh: bool = True):
        if refresh:
            calls.append("sync")
        return original(self, model, refresh=refresh)

    EngineFleet.sync = recorded


def record_model(built: dict) -> None:
    original = mdl.build_megatron_model

    def recorded(*args, **kwargs):
        model = original(*args, **kwargs)
        layer = model.chunks[0].decoder.layers[0]
        built.update(
            core_attention=type(layer.self_attention.core_attention).__name__,
            recompute_granularity=model.config.recompute_granularity,
            recompute_method=model.config.recompute_method,
        )
        return model

    mdl.build_megatron_model = recorded


def main(out_path: str, *overrides: str) -> None:
    calls: list[str] = []
    built: dict = {}
    record_engine_calls(calls)
    record_syncs(calls)
    record_model(built)
    rc = cli.main(["train", *overrides])
    with open(out_path, "w") as f:
        json.dump({"rc": rc, "calls": calls, "model": built}, f, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:])
