"""The demo at toy scale (a 2-layer base model, 2 rounds, 16 test questions), as a script the
tests launch in its own process: ``toy_script("run_seeds(out, [0], False, DEMO, BASE, ...)")``."""

_TOY = """
import sys
from sept_megatron.demo.base_model import BaseModelRecipe
from sept_megatron.demo.run import DemoRecipe, run_demo, run_seeds

BASE = BaseModelRecipe(hidden_size=32, num_layers=2, ffn_hidden_size=64, n_train=400, steps=20,
                       batch_size=16)
DEMO = DemoRecipe(rounds=2, prompts_per_round=16, mini_batch_size=8, temperatures=(0.0, 1.0),
                  eval_samples=8, test_questions=16, val_questions=16, max_response_length=48)

if __name__ == "__main__":
    out, cache = sys.argv[1], sys.argv[2]
"""


def toy_script(call: str) -> str:
    """The script text; ``call`` runs with ``out``, ``cache``, ``DEMO`` and ``BASE`` defined."""
    return _TOY + f"    {call}\n"
