"""The config tree: YAML + key=value overrides in, typed sections out, every error explained."""

import re

import pytest

from sept_megatron.config import Config, ConfigError, load_config, validate
from sept_megatron.trainer.arch import ModelArch


def tiny_arch(**overrides) -> ModelArch:
    fields = dict(
        model_type="qwen2",
        vocab_size=1000,
        hidden_size=64,
        num_layers=4,
        num_attention_heads=4,
        num_query_groups=2,
        head_dim=16,
        ffn_hidden_size=128,
        norm_eps=1e-6,
        rope_theta=10000.0,
        rope_scaling_factor=None,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        qkv_bias=True,
        qk_layernorm=False,
    )
    fields.update(overrides)
    return ModelArch(**fields)


def good_config(*overrides: str) -> Config:
    """Valid for 1 process: 8 prompts x 2 answers = 16 samples, 2 mini-batches of 8."""
    return load_config(
        None,
        [
            "model.hf_path=/models/tiny",
            "train.prompts_per_round=8",
            "rollout.n=2",
            "train.mini_batch_size=8",
            "train.micro_batch_size=2",
            *overrides,
        ],
    )


def validation_errors(cfg: Config, world_size: int = 1, arch=None) -> str:
    with pytest.raises(ConfigError) as info:
        validate(cfg, world_size=world_size, arch=arch)
    return str(info.value)


# --- loading -----------------------------------------------------------------------------
def test_yaml_then_overrides_with_type_coercion(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "model:\n  hf_path: /models/a\n  fp8: delayed\n"
        "parallel:\n  tensor_parallel: 2\n"
        "train:\n  lr: 1.0e-6\n  prompts_per_round: 64\n"
        "data:\n  train_files: [x.jsonl]\n"
    )
    cfg = load_config(
        str(path),
        [
            "train.lr=2e-7",  # YAML 1.1 reads "2e-7" as a string: must still become a float
            "parallel.pipeline_parallel=4",
            "parallel.sequence_parallel=true",
            "rollout.tau_start=1",
            "train.rounds=12.0",
            "data.train_files=a.jsonl,b.jsonl,c.jsonl",
            "model.fp8=null",
            "eval.max_questions=null",
            "logging.run_name=my-run",
        ],
    )
    assert cfg.model.hf_path == "/models/a"  # from YAML, untouched by overrides
    assert cfg.parallel.tensor_parallel == 2
    assert cfg.train.lr == 2e-7 and isinstance(cfg.train.lr, float)
    assert cfg.train.prompts_per_round == 64
    assert cfg.parallel.pipeline_parallel == 4 and isinstance(cfg.parallel.pipeline_parallel, int)
    assert cfg.parallel.sequence_parallel is True
    assert cfg.rollout.tau_start == 1.0 and isinstance(cfg.rollout.tau_start, float)
    assert cfg.train.rounds == 12 and isinstance(cfg.train.rounds, int)
    assert cfg.data.train_files == ["a.jsonl", "b.jsonl", "c.jsonl"]
    assert cfg.model.fp8 is None
    assert cfg.eval.max_questions is None
    assert cfg.logging.run_name == "my-run"
    # Untouched sections keep their defaults.
    assert cfg.checkpoint.keep_last == 2


def test_no_yaml_gives_defaults_and_to_dict_round_trips():
    cfg = load_config(None, [])
    assert cfg == Config()
    assert cfg.to_dict()["train"]["tau_train"] == 1.0


def test_unknown_field_names_the_field_and_lists_valid_ones():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["train.learning_rate=1e-6"])
    message = str(info.value)
    assert "train.learning_rate" in message and "unknown field" in message
    for valid in ("lr", "warmup_steps", "tau_train", "mini_batch_size"):
        assert valid in message


def test_unknown_section_lists_the_sections(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optimizer:\n  lr: 1.0\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    message = str(info.value)
    assert "optimizer" in message
    for section in ("model", "parallel", "rollout", "train"):
        assert section in message


@pytest.mark.parametrize(
    "override, field",
    [
        ("train.lr=fast", "train.lr"),
        ("parallel.tensor_parallel=2.5", "parallel.tensor_parallel"),
        ("parallel.sequence_parallel=maybe", "parallel.sequence_parallel"),
        ("train.warmup_steps=true", "train.warmup_steps"),  # a bool is not an int
    ],
)
def test_bad_type_names_field_and_value(override, field):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    message = str(info.value)
    assert field in message
    assert override.split("=", 1)[1] in message.lower()


def test_override_without_equals_sign_is_explained():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.lr"])


# --- validation --------------------------------------------------------------------------
def test_valid_config_passes():
    validate(good_config(), world_size=1, arch=tiny_arch())
    validate(
        good_config("parallel.tensor_parallel=2", "parallel.pipeline_parallel=2"),
        world_size=8,
        arch=tiny_arch(),
    )


def test_heads_not_divisible_by_tp():
    message = validation_errors(
        good_config("parallel.tensor_parallel=3"),
        world_size=3,
        arch=tiny_arch(num_attention_heads=6, num_query_groups=2, ffn_hidden_size=192),
    )
    assert "parallel.tensor_parallel=3" in message
    assert "2 key/value heads" in message  # 6 heads are fine, 2 query groups are not
    assert "6 attention heads" not in message


def test_attention_heads_not_divisible_by_tp():
    message = validation_errors(
        good_config("parallel.tensor_parallel=3"),
        world_size=3,
        arch=tiny_arch(num_attention_heads=4, num_query_groups=4, ffn_hidden_size=192),
    )
    assert "parallel.tensor_parallel=3" in message and "4 attention heads" in message


@pytest.mark.parametrize("pp, vpp, layers", [(3, None, 4), (2, 2, 6)])
def test_layers_not_divisible_by_pipeline_stages(pp, vpp, layers):
    overrides = [f"parallel.pipeline_parallel={pp}"]
    if vpp:
        overrides.append(f"parallel.virtual_pipeline={vpp}")
    message = validation_errors(good_config(*overrides), world_size=pp, arch=tiny_arch(num_layers=layers))
    assert f"parallel.pipeline_parallel={pp}" in message
    assert f"{layers} layers" in message
    if vpp:
        assert f"parallel.virtual_pipeline={vpp}" in message


def test_virtual_pipeline_that_divides_layers_passes():
    validate(
        good_config("parallel.pipeline_parallel=2", "parallel.virtual_pipeline=2"),
        world_size=2,
        arch=tiny_arch(num_layers=8),
    )


def test_world_size_not_a_multiple_of_tp_x_pp():
    message = validation_errors(
        good_config("parallel.tensor_parallel=2", "parallel.pipeline_parallel=2"), world_size=6
    )
    assert "world size 6" in message
    assert "parallel.tensor_parallel=2" in message and "parallel.pipeline_parallel=2" in message


def test_mini_batch_not_divisible_by_dp_x_micro_batch():
    # world 4, TP=1, PP=1 -> DP=4; 4 x micro 2 = 8 does not divide 12.
    cfg = good_config(
        "train.prompts_per_round=12", "rollout.n=1", "train.mini_batch_size=12", "train.micro_batch_size=2"
    )
    message = validation_errors(cfg, world_size=4)
    assert "train.mini_batch_size=12" in message
    assert "data-parallel size 4" in message and "train.micro_batch_size=2" in message


def test_samples_per_round_not_divisible_by_mini_batch():
    cfg = good_config(
        "train.prompts_per_round=6", "rollout.n=3", "train.mini_batch_size=4", "train.micro_batch_size=1"
    )
    message = validation_errors(cfg)
    assert "train.prompts_per_round x rollout.n = 18" in message
    assert "train.mini_batch_size=4" in message


@pytest.mark.parametrize(
    "field, value", [("train.tau_train", "0"), ("rollout.tau_start", "-0.5"), ("rollout.tau_end", "0.0")]
)
def test_non_positive_temperature(field, value):
    message = validation_errors(good_config(f"{field}={value}"))
    assert re.search(rf"{re.escape(field)}=-?0(\.\d+)?", message), message
    assert "> 0" in message


@pytest.mark.parametrize(
    "field, value",
    [
        ("rollout.backend", "vllm"),
        ("train.mode", "offpolicy"),
        ("model.fp8", "mxfp4"),
        ("rollout.anneal", "exp"),
        ("model.params_dtype", "fp8"),
    ],
)
def test_bad_choice_names_field_value_and_choices(field, value):
    message = validation_errors(good_config(f"{field}={value}"))
    assert f"{field}='{value}'" in message
    assert "choose one of" in message


def test_backend_choice_lists_the_valid_backends():
    message = validation_errors(good_config("rollout.backend=vllm"))
    assert "hf" in message and "sglang" in message


def test_fp8_with_local_layers_is_rejected():
    message = validation_errors(good_config("model.fp8=delayed", "model.transformer_impl=local"))
    assert "model.fp8" in message and "Transformer Engine" in message


def test_several_errors_are_reported_at_once():
    cfg = good_config(
        "rollout.backend=vllm", "train.tau_train=0", "rollout.n=0", "parallel.tensor_parallel=3"
    )
    message = validation_errors(cfg, world_size=3, arch=tiny_arch())
    lines = [line for line in message.splitlines()[1:] if line.strip()]
    assert len(lines) >= 4, message
    assert "rollout.backend='vllm'" in message
    assert "train.tau_train=0" in message
    assert "rollout.n=0" in message
    assert "parallel.tensor_parallel=3" in message


def test_missing_hf_path_is_an_error():
    cfg = load_config(None, ["train.prompts_per_round=8", "train.mini_batch_size=8"])
    assert "model.hf_path" in validation_errors(cfg)


# --- FP8 (issue 10) -------------------------------------------------------------------------
def test_fp8_rollout_weights_with_the_hf_engine_is_rejected_with_the_fix():
    message = validation_errors(good_config("rollout.weights=fp8"))
    assert "rollout.weights=fp8 needs rollout.backend=sglang" in message
    assert "rollout.weights=native" in message


def test_fp8_rollout_weights_with_sglang_checks_the_128_blocks_per_engine_gpu():
    shaped = tiny_arch(
        hidden_size=1536, num_attention_heads=12, num_query_groups=2, head_dim=128, ffn_hidden_size=8960
    )  # Qwen2.5-1.5B
    validate(good_config("rollout.weights=fp8", "rollout.backend=sglang"), world_size=1, arch=shaped)
    message = validation_errors(
        good_config("rollout.weights=fp8", "rollout.backend=sglang", "rollout.engine_tp=4"), arch=shaped
    )
    assert "rollout.weights=fp8" in message and "2240" in message and "rollout.engine_tp" in message


def test_fp8_training_on_the_cpu_device_is_rejected():
    message = validation_errors(good_config("model.fp8=blockwise", "parallel.device=cpu"))
    assert "model.fp8=blockwise" in message and "parallel.device=cpu" in message


def test_fp8_training_rejects_dimensions_te_cannot_run_in_fp8():
    arch = tiny_arch(
        hidden_size=72, num_attention_heads=4, num_query_groups=2, head_dim=18, ffn_hidden_size=200
    )
    message = validation_errors(good_config("model.fp8=delayed"), arch=arch)
    assert "model.fp8=delayed: hidden_size = 72 is not a multiple of 16" in message
    assert "heads x head_dim / TP) = 72 is not a multiple of 16" in message
    assert "ffn_hidden_size per TP rank = 200 is not a multiple of 16" in message
    assert "q/k/v rows" not in message  # (4 + 2 x 2) x 18 = 144 = 9 x 16 fits
    validate(good_config("model.fp8=delayed"), world_size=1, arch=tiny_arch())  # 64/128 fit


def test_hf_static_cache_is_an_option_of_the_hf_backend_only():
    validate(good_config("rollout.hf_static_cache=true"), world_size=1)
    message = validation_errors(good_config("rollout.hf_static_cache=true", "rollout.backend=sglang"))
    assert "rollout.hf_static_cache=true" in message and "rollout.hf_static_cache=false" in message


def test_rollout_timeout_must_be_positive():
    from sept_megatron.config import ConfigError, load_config, validate

    with pytest.raises(ConfigError, match=r"rollout.timeout_minutes=0.0: must be > 0"):
        validate(load_config(None, ["model.hf_path=/m", "rollout.timeout_minutes=0"]), world_size=1)


def test_kl_coef_is_grpos_and_non_negative():
    message = validation_errors(good_config("train.kl_coef=0.1"))
    assert "train.kl_coef=0.1" in message and "train.mode=grpo" in message
    message = validation_errors(good_config("train.mode=grpo", "rollout.n=2", "train.kl_coef=-1"))
    assert "train.kl_coef=-1.0: must be >= 0" in message
    validate(good_config("train.mode=grpo", "rollout.n=2", "train.kl_coef=0.001"), world_size=1)
