"""Session fixtures: the demo tokenizer and one saved HF checkpoint per entry of MODELS."""

import pytest
from hf_checkpoints import MODELS, OTHER_WEIGHTS, save_hf_model
from hf_tiny import make_tokenizer


@pytest.fixture(scope="session")
def demo_tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def hf_models(demo_tokenizer, tmp_path_factory):
    """Root dir with one HF checkpoint per entry of MODELS, plus OTHER_WEIGHTS."""
    root = tmp_path_factory.mktemp("hf_models")
    for seed, (name, (family, overrides)) in enumerate(MODELS.items()):
        save_hf_model(family, demo_tokenizer, root / name, seed=seed, **overrides)
    family, overrides = MODELS["llama3"]
    save_hf_model(family, demo_tokenizer, root / OTHER_WEIGHTS, seed=99, **overrides)
    return root
