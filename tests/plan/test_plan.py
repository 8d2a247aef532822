"""``sept-megatron plan``: the recipes fit their stated hardware, the hf-engine 70B recipe does
not (and says why), the byte counts behave as the parallel layouts say, and ``train`` refuses
a layout that cannot fit before loading anything. Pure arithmetic: no process, no weights."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from published import PUBLISHED, PUBLISHED_PARAMS, write_config

from sept_megatron.cli import main as cli_main
from sept_megatron.config import ConfigError, load_config
from sept_megatron.convert.hf_config import arch_from_hf_config, load_hf_config
from sept_megatron.plan import memory
from sept_megatron.plan import planner as plan

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
H100 = 80.0
# recipe -> (architecture, nodes of 8 x H100 80GB it is written for)
RECIPES = {
    "qwen2.5-math-7b": ("qwen2.5-math-7b", 1),
    "deepseek-math-7b": ("deepseek-math-7b", 1),
    "qwen2.5-32b": ("qwen2.5-32b", 2),
    "llama3-70b": ("llama3-70b", 4),
}


@pytest.fixture(scope="module")
def archs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("published")
    return {name: write_config(root, name) for name in PUBLISHED}


def arch_of(path: Path):
    return arch_from_hf_config(load_hf_config(str(path)))


def run_plan(capsys, recipe: Path, hf_dir: Path, nodes: int, *overrides: str) -> tuple[int, str]:
    rc = cli_main(
        [
            "plan",
            "--config",
            str(recipe),
            "--nodes",
            str(nodes),
            "--gpus-per-node",
            "8",
            "--gpu-mem-gb",
            str(H100),
            "--hf-config",
            str(hf_dir),
            *overrides,
        ]
    )
    return rc, capsys.readouterr().out


def test_param_counts_are_the_published_ones(archs):
    for name, path in archs.items():
        arch = arch_of(path)
        assert memory.param_counts(arch, arch.vocab_size).total == PUBLISHED_PARAMS[name], name


# --- the recipes --------------------------------------------------------------------------
@pytest.mark.parametrize("recipe,nodes", [(r, n) for r, (_, n) in RECIPES.items()] + [("llama3-70b", 8)])
def test_recipe_fits_its_stated_hardware(capsys, archs, recipe, nodes):
    path = EXAMPLES / f"{recipe}.yaml"
    rc, out = run_plan(capsys, path, archs[RECIPES[recipe][0]], nodes)
    assert rc == 0 and ": fits" in out, out
    # The recipe states its hardware and names its rollout engine explicitly.
    text = path.read_text()
    assert f"--nodes {RECIPES[recipe][1]} --gpus-per-node 8 --gpu-mem-gb 80" in text
    rollout = yaml.safe_load(text)["rollout"]
    assert rollout["backend"] == "sglang"
    assert {"engine_tp", "mem_fraction_static"} <= set(rollout)
    cfg = load_config(str(path))
    assert f"engine TP={cfg.rollout.engine_tp}" in out and "KV pool" in out


@pytest.mark.parametrize("recipe", ["qwen2.5-math-7b", "deepseek-math-7b"])
def test_7b_recipes_use_the_papers_hyperparameters(recipe):
    cfg = load_config(str(EXAMPLES / f"{recipe}.yaml"))
    r, t, d = cfg.rollout, cfg.train, cfg.data
    assert (r.tau_start, r.tau_end, r.anneal, r.n) == (0.6, 1.0, "linear", 1)
    assert r.anneal_fraction == pytest.approx(2 / 3, abs=1e-3)
    assert (t.lr, t.warmup_steps, t.weight_decay, t.grad_clip) == (1e-7, 10, 0.01, 1.0)
    assert (t.prompts_per_round, t.mini_batch_size) == (128, 64)
    assert (d.max_prompt_length, d.max_response_length) == (1024, 3072)


def test_70b_with_the_single_gpu_hf_engine_does_not_fit(capsys, archs, tmp_path):
    hf_recipe = tmp_path / "llama3-70b-hf.yaml"
    tree = yaml.safe_load((EXAMPLES / "llama3-70b.yaml").read_text())
    tree["rollout"] |= {"backend": "hf", "engine_tp": 1}
    hf_recipe.write_text(yaml.safe_dump(tree))
    rc, out = run_plan(capsys, hf_recipe, archs["llama3-70b"], 4)
    assert rc == 1 and "DOES NOT FIT" in out, out
    # The reason: one full bf16 copy of 70.55B parameters is 131.4 GiB on one 80 GiB GPU.
    assert "the hf backend holds one full bf16 copy of the model (131.4 GiB) on one GPU of 80 GiB" in out
    proposals = out.split("smallest layouts that fit")[1]
    assert "sglang engine TP=" in proposals and "| hf " not in proposals


def test_config_error_exits_2_and_still_proposes(capsys, archs):
    # TP=3 divides neither 64 heads nor 8 KV heads.
    rc, out = run_plan(
        capsys, EXAMPLES / "llama3-70b.yaml", archs["llama3-70b"], 4, "parallel.tensor_parallel=3"
    )
    assert rc == 2 and "parallel.tensor_parallel=3" in out and "smallest layouts" in out


# --- the counts behave like the layouts -------------------------------------------------------
def qwen7b(archs, *overrides: str):
    cfg = load_config(str(EXAMPLES / "qwen2.5-math-7b.yaml"), list(overrides))
    arch = arch_of(archs["qwen2.5-math-7b"])
    return cfg, arch, plan.resolve_kernels(cfg, arch, on_gpu=True, te_available=True)


def line(stage: plan.StageMemory, prefix: str) -> float:
    return next(l.gib for l in stage.training if l.counted and l.label.startswith(prefix))


def test_tensor_parallel_and_distributed_optimizer_shard_the_state(archs):
    hw = plan.Hardware(1, 8, H100)
    by_tp = {}
    for tp in (1, 2, 4):
        cfg, arch, kernels = qwen7b(archs, f"parallel.tensor_parallel={tp}")
        by_tp[tp] = plan.estimate(cfg, arch, hw, kernels).stages[0]
    # Everything but the norms is sharded by TP.
    assert line(by_tp[2], "weights") == pytest.approx(line(by_tp[1], "weights") / 2, rel=0.01)
    assert line(by_tp[4], "gradients") == pytest.approx(line(by_tp[1], "gradients") / 4, rel=0.01)
    # 12 bytes/param of optimizer, whole or / DP (DP = 8 / TP).
    whole = plan.estimate(
        *qwen7b(archs, "parallel.use_distributed_optimizer=false")[:2], hw, qwen7b(archs)[2]
    ).stages[0]
    assert line(whole, "optimizer") == pytest.approx(6 * line(whole, "weights"), rel=1e-6)
    assert line(by_tp[2], "optimizer") == pytest.approx(line(whole, "optimizer") / 4, rel=1e-6)


def test_pipeline_stages_and_micro_batches_in_flight(archs):
    cfg, arch, kernels = qwen7b(
        archs,
        "parallel.tensor_parallel=1",
        "parallel.pipeline_parallel=4",
        "parallel.sequence_parallel=false",
    )
    first, last = plan.estimate(cfg, arch, plan.Hardware(1, 8, H100), kernels).stages
    # 1F1B: the first stage keeps 4 micro-batches of its 7 layers, the last stage one.
    assert line(first, "activations") == pytest.approx(4 * line(last, "activations"), rel=1e-6)
    assert any(l.label.startswith("working set: logits") for l in last.training)
    # Interleaving holds more on the first stage: PP (1 + (PP-1)/(PP v)).
    assert memory.in_flight(4, 2, 64, 0) == pytest.approx(4 * (1 + 3 / 8))
    assert memory.in_flight(4, None, 2, 0) == 2  # never more than the step's micro-batches


def test_recomputation_and_the_attention_kernel(archs):
    cfg, arch, _ = qwen7b(archs)
    common = dict(tp=1, sequence_parallel=False, seq_len=4096)
    fused = memory.Kernels(2, True, True)
    unfused = memory.Kernels(2, False, False)
    none_fused = memory.layer_activation_bytes(arch, fused, recompute="none", **common)
    full_fused = memory.layer_activation_bytes(arch, fused, recompute="full", **common)
    assert full_fused == 2 * arch.hidden_size  # only the layer's input is kept
    none_unfused = memory.layer_activation_bytes(arch, unfused, recompute="none", **common)
    selective = memory.layer_activation_bytes(arch, unfused, recompute="selective", **common)
    # Unfused attention keeps fp32 softmax + its bf16 copy: 6 bytes x heads x s per token.
    assert none_unfused - selective > 6 * arch.num_attention_heads * 4096
    assert selective < none_unfused and full_fused < none_fused
    # Full recomputation rebuilds one layer at a time in backward: its activations come back
    # on top of that layer's gradients, once, not per layer.
    grads = memory.backward_working_bytes(arch, fused, recompute="none", **common)
    rebuilt = memory.backward_working_bytes(arch, fused, recompute="full", **common)
    assert rebuilt == grads + none_fused


@pytest.mark.parametrize("attention,fused", [("sdpa", True), ("unfused", False)])
def test_model_attention_decides_the_score_terms(archs, attention, fused):
    # Local layers (no TE): model.attention picks the core attention; the planner reads it
    # from the layer spec. SDPA keeps no [b * heads, s, s] scores; DotProductAttention does.
    cfg, arch, _ = qwen7b(archs, "model.transformer_impl=local", f"model.attention={attention}")
    kernels = plan.resolve_kernels(cfg, arch, on_gpu=True, te_available=False)
    assert kernels.fused_attention is fused and not kernels.transformer_engine
    stage = plan.estimate(cfg, arch, plan.Hardware(1, 8, H100), kernels).stages[0]
    has_buffer = any("score buffer" in l.label for l in stage.training)
    assert has_buffer is (not fused)
    # With TE the attention is TE's fused one whatever model.attention says.
    te = plan.resolve_kernels(
        qwen7b(archs, f"model.attention={attention}")[0], arch, on_gpu=True, te_available=True
    )
    assert te.fused_attention and te.transformer_engine


def test_sglang_pool_too_small_is_a_problem_with_the_fix(archs):
    # SGLang 0.5.21: pool = fraction x free at engine start - weights (76 x 0.15 < 14.2 GiB).
    cfg, arch, kernels = qwen7b(archs, "rollout.mem_fraction_static=0.15")
    result = plan.estimate(cfg, arch, plan.Hardware(1, 8, H100), kernels)
    assert not result.fits
    assert any("set rollout.mem_fraction_static=0.24" in p for p in result.problems), result.problems


def test_sglang_fraction_that_crowds_out_the_trainer_is_a_problem_with_the_fix(archs):
    # The pre-0.5.21 reading (fraction of the GPU, trainer included) gave 0.65 here.
    cfg, arch, kernels = qwen7b(archs, "rollout.mem_fraction_static=0.65")
    result = plan.estimate(cfg, arch, plan.Hardware(1, 8, H100), kernels)
    assert not result.fits
    assert any(
        "static pool takes 49.4 of the 76.0 GiB" in p and "set rollout.mem_fraction_static=0.24" in p
        for p in result.problems
    ), result.problems


def test_disaggregated_engines_are_checked_on_their_own_gpus(archs):
    cfg, arch, kernels = qwen7b(
        archs, "rollout.placement=disaggregated", "rollout.server_urls=[http://a:30000,http://b:30000]"
    )
    result = plan.estimate(cfg, arch, plan.Hardware(1, 8, H100), kernels)
    assert result.engines == 2 and result.engine_gpu is not None
    assert not result.stages[0].rollout  # the trainer's GPUs hold no engine
    assert not any(l.label.startswith("SGLang") for l in result.stages[0].training)
    kv = next(l for l in result.engine_gpu.rollout if "KV cache: 64 sequences" in l.label)
    assert kv.gib > 0


def test_proposals_fit_with_headroom_and_come_smallest_first(archs):
    cfg, arch, kernels = qwen7b(archs)
    hw = plan.Hardware(1, 8, H100)
    proposals = plan.propose(cfg, arch, hw, kernels)
    assert proposals
    sizes = [p.layout.tensor_parallel * p.layout.pipeline_parallel for p in proposals]
    assert sizes == sorted(sizes)
    assert all(p.fits and p.peak_gib <= plan.PROPOSAL_HEADROOM * H100 for p in proposals)


# --- train's check ----------------------------------------------------------------------------
def test_train_check_is_skipped_on_cpu_without_a_memory_figure(archs, monkeypatch):
    monkeypatch.setenv("SEPT_DEVICE", "cpu")
    cfg, arch, _ = qwen7b(archs)
    assert plan.check_fits(cfg, arch, 8) is None


def test_train_check_refuses_what_cannot_fit_with_the_table(archs, monkeypatch):
    monkeypatch.setenv("SEPT_DEVICE", "cpu")
    cfg, arch, _ = qwen7b(archs)
    fits = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, gpu_mem_gb=1000.0))
    assert plan.check_fits(fits, arch, 8).fits
    small = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, gpu_mem_gb=40.0))
    with pytest.raises(ConfigError) as raised:
        plan.check_fits(small, arch, 8)
    message = str(raised.value)
    assert "does not fit in 40 GiB per GPU" in message and "training phase" in message
    assert "DOES NOT FIT" in message and "smallest layouts" in message


@pytest.mark.slow
def test_sept_megatron_train_refuses_before_loading_anything(tiny_run_inputs, tmp_path):
    from loop.test_train_cli import base_args, run_train

    run_dir = tmp_path / "run"
    rc, output = run_train(
        base_args(tiny_run_inputs, run_dir) + ["parallel.gpu_mem_gb=0.001"], expect_ok=False
    )
    assert rc == 2, output[-3000:]
    assert "sept-megatron train: error: the layout does not fit in 0.001 GiB" in output
    assert "per-GPU memory, GiB" in output and "activations kept, recompute=none" in output
    assert not run_dir.exists()  # refused before any process group, weight or file


def test_offload_during_rollout_leaves_the_engine_room_for_a_larger_pool(archs):
    """train.offload_during_rollout: the rollout phase counts no resident trainer state, so a
    mem_fraction_static that crowds out the resident trainer fits once the trainer is parked."""
    cfg = load_config(str(EXAMPLES / "qwen2.5-math-7b.yaml"), ["rollout.mem_fraction_static=0.8"])
    arch = arch_of(archs[RECIPES["qwen2.5-math-7b"][0]])
    hardware = plan.Hardware(RECIPES["qwen2.5-math-7b"][1], 8, H100)
    kernels = plan.resolve_kernels(cfg, arch, on_gpu=True, te_available=True)
    kept = plan.estimate(cfg, arch, hardware, kernels)
    cfg.train.offload_during_rollout = True
    moved = plan.estimate(cfg, arch, hardware, kernels)

    def line(result, prefix):
        return next(l for l in result.stages[0].rollout if l.label.startswith(prefix))

    assert line(kept, "trainer state kept resident").gib > 1
    assert line(moved, "trainer state offloaded").gib == 0
    assert any("static pool takes" in problem for problem in kept.problems), kept.problems
    assert not any("static pool takes" in problem for problem in moved.problems), moved.problems


def test_fused_swiglu_keeps_two_ffn_wide_tensors_fewer_per_layer(archs):
    cfg, arch, gpu = qwen7b(archs)
    cpu = plan.resolve_kernels(cfg, arch, on_gpu=False, te_available=False)
    assert gpu.fused_swiglu and not cpu.fused_swiglu
    unfused = dataclasses.replace(gpu, fused_swiglu=False)
    kept = {
        kernels.fused_swiglu: memory.layer_activation_bytes(
            arch, kernels, tp=2, sequence_parallel=True, seq_len=4096, recompute="none"
        )
        for kernels in (gpu, unfused)
    }
    assert kept[False] - kept[True] == 2 * gpu.param_bytes * arch.ffn_hidden_size / 2


# --- the backend reports its engine's memory --------------------------------------------------
def test_the_planner_asks_the_backend_for_its_engine_memory(archs, monkeypatch):
    """A backend the package does not know (tests/rollout/toy_backend) gets its own lines in
    the table, its own layout line, and the built-in backends that can shard wider as
    alternatives: the planner names no backend."""
    import importlib.util

    from sept_megatron.rollout import registry

    spec = importlib.util.spec_from_file_location(
        "toy_sept_backend", Path(__file__).parents[1] / "rollout" / "toy_backend" / "toy_sept_backend.py"
    )
    toy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(toy)
    monkeypatch.setattr(registry, "_REGISTERED", {"toy": toy.ToyEngine})
    cfg, arch, kernels = qwen7b(archs, "rollout.backend=toy", "rollout.engine_tp=1")
    result = plan.estimate(cfg, arch, plan.Hardware(1, 8, H100), kernels)
    engine_lines = [l for l in result.stages[0].rollout if not l.label.startswith("trainer state")]
    assert [l.label for l in engine_lines] == ["toy engine: one bf16 copy"]
    assert engine_lines[0].gib == pytest.approx(
        memory.param_counts(arch, arch.vocab_size).total * 2 / plan.GIB
    )
    assert result.layout.describe().endswith("| toy engine TP=1")
    choices = plan.engine_choices(cfg, arch, plan.Hardware(1, 8, H100))
    assert choices[0] == ("toy", 1) and ("sglang", 4) in choices and ("hf", 1) not in choices


def test_a_backend_without_a_memory_model_is_named_in_the_error(archs, monkeypatch):
    from sept_megatron.rollout import registry

    class Old:  # written before RolloutBackend.memory_model existed
        @classmethod
        def check_config(cls, rollout, *, arch=None):
            return []

    monkeypatch.setattr(registry, "_REGISTERED", {"old": Old})
    cfg, arch, kernels = qwen7b(archs)
    assert ("old", 1) not in plan.engine_choices(cfg, arch, plan.Hardware(1, 8, H100))
    cfg.rollout.backend = "old"
    with pytest.raises(ConfigError, match=r"rollout.backend=old: Old does not implement .*memory_model"):
        plan.estimate(cfg, arch, plan.Hardware(1, 8, H100), kernels)


def test_proposals_with_the_trainer_offloaded_tune_the_engine_without_it(archs):
    """With train.offload_during_rollout no trainer state sits beside the engine, so the tuned
    mem_fraction_static may take what the trainer would have held: the one-GPU engine's pool
    (0.57 of the free memory) holds its whole share, where counting the parked trainer would
    have capped the fraction and sent the proposal to a two-GPU engine."""
    cfg = load_config(str(EXAMPLES / "deepseek-math-7b.yaml"), ["train.offload_during_rollout=true"])
    arch = arch_of(archs["deepseek-math-7b"])
    kernels = plan.resolve_kernels(cfg, arch, on_gpu=True, te_available=True)
    proposals = plan.propose(cfg, arch, plan.Hardware(1, 8, H100), kernels)
    layouts = {(p.layout.tensor_parallel, p.layout.pipeline_parallel): p.layout for p in proposals}
    assert all(layout.engine_tp == 1 for layout in layouts.values()), layouts
    assert layouts[(1, 1)].engine_settings == (("mem_fraction_static", 0.57),)
