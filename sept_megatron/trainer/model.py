"""Model provider: a Megatron-Core ``GPTModel`` built from a Hugging Face config.

The model families (Llama incl. DeepSeek-Math, Mistral, Qwen2/2.5, Qwen3) are declared once, in
:mod:`sept_megatron.convert.adapters`; the HF config is read once into
:class:`~sept_megatron.trainer.arch.ModelArch` (:func:`sept_megatron.convert.hf_config.arch_from_hf_config`),
the small frozen record that the converter, the weight sync and the trainer all share.

Transformer Engine vs local layers are chosen in exactly one place, :func:`layer_spec`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from sept_megatron.runtime import compat, distributed
from sept_megatron.trainer.arch import ModelArch
from sept_megatron.trainer.fp8 import FP8_RECIPES, require_fp8_training

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel: int) -> int:
    """Megatron pads the vocab so each TP rank holds an equal, aligned slice."""
    multiple = divisible_by * tensor_parallel
    return ((vocab_size + multiple - 1) // multiple) * multiple


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"model.params_dtype={name!r}; choose one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]


def use_transformer_engine(impl: str) -> bool:
    """``auto`` means TE when it is importable and CUDA is present, the local spec otherwise."""
    if impl == "local":
        return False
    if impl == "transformer_engine":
        return True
    if not torch.cuda.is_available():
        return False
    return transformer_engine_runs()


def transformer_engine_runs() -> bool:
    """Does TE work here: ``transformer_engine.pytorch`` imports and a tiny TE layer runs a
    forward and backward pass on the GPU? ``import transformer_engine`` alone proves nothing:
    TE's ``__init__`` swallows the ImportError of a torch extension built against another
    torch, and the failure would surface later, deep in model construction."""
    try:
        import transformer_engine.pytorch as te

        layer = te.Linear(16, 16, params_dtype=torch.bfloat16, device="cuda")
        inputs = torch.ones(8, 16, dtype=torch.bfloat16, device="cuda", requires_grad=True)
        layer(inputs).float().sum().backward()
        torch.cuda.synchronize()
    except Exception as error:  # noqa: BLE001  ImportError, OSError (the .so), RuntimeError
        logging.getLogger(__name__).warning(
            "model.transformer_impl=auto: Transformer Engine does not run here (%s: %s); using "
            "Megatron's local layers. Build TE against this torch (README, GPU install)",
            type(error).__name__,
            error,
        )
        return False
    return True


def layer_spec(arch: ModelArch, *, transformer_engine: bool, attention: str = "sdpa"):
    """The one place that chooses Transformer Engine (FP8-capable) or local layers.

    Local layers take their core attention from ``attention`` (``model.attention``): ``sdpa``
    (:class:`sept_megatron.trainer.attention.SDPAttention`, flash kernels, the default) or ``unfused``
    (Megatron's ``DotProductAttention``). TE brings its own fused attention.
    """
    from megatron.core.models.gpt import gpt_layer_specs

    from sept_megatron.trainer.attention import core_attention_class

    if transformer_engine:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=arch.qk_layernorm)
    spec = gpt_layer_specs.get_gpt_layer_local_spec(qk_layernorm=arch.qk_layernorm, normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = core_attention_class(attention)
    return spec


def fp8_kwargs(fp8_recipe: str | None, fp8_format: str) -> dict[str, Any]:
    """TransformerConfig fields for FP8 through TE; empty when FP8 is off."""
    if fp8_recipe is None:
        return {}
    if fp8_recipe not in FP8_RECIPES:
        raise ValueError(f"model.fp8={fp8_recipe!r}; choose one of {', '.join(FP8_RECIPES)} or null")
    if fp8_format not in ("e4m3", "hybrid"):
        raise ValueError(f"model.fp8_format={fp8_format!r}; choose 'e4m3' or 'hybrid'")
    return {"fp8": fp8_format, "fp8_recipe": fp8_recipe, "fp8_param": False}


def transformer_config(
    arch: ModelArch,
    *,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    virtual_pipeline: int | None = None,
    sequence_parallel: bool = False,
    params_dtype: torch.dtype = torch.float32,
    fp8_recipe: str | None = None,
    fp8_format: str = "hybrid",
    recompute: str = "none",
):
    """A Megatron ``TransformerConfig`` equivalent to the HF architecture.

    Fusions that need CUDA kernels are off; they change speed, not results. ``recompute`` is
    ``train.recompute`` (see :func:`recompute_kwargs`).
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.head_dim,
        ffn_hidden_size=arch.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=arch.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        # On CUDA, Megatron's SwiGLU autograd function (torch.compile'd): it keeps only FC1's
        # output and recomputes silu in backward, 3 instead of 5 ffn-wide tensors per layer
        # (the unfused path also keeps silu's output and a copy made by adding the 0 offset).
        # Off on the CPU: there it would need inductor's C++ compile, and the CPU's numbers stay.
        bias_activation_fusion=distributed.compute_device().type == "cuda",
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        virtual_pipeline_model_parallel_size=virtual_pipeline,
        sequence_parallel=sequence_parallel,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=not torch.cuda.is_available(),
        **fp8_kwargs(fp8_recipe, fp8_format),
        **recompute_kwargs(recompute),
    )


def build_gpt_model(
    arch: ModelArch,
    config,
    *,
    padded_vocab: int,
    transformer_engine: bool,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
    attention: str = "sdpa",
):
    """One Megatron ``GPTModel`` stage (the whole model when PP=1)."""
    from megatron.core.models.gpt import GPTModel

    return GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(arch, transformer_engine=transformer_engine, attention=attention),
        vocab_size=padded_vocab,
        max_sequence_length=arch.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(arch.rope_theta),
        rope_scaling=arch.rope_scaling_factor is not None,
        rope_scaling_factor=arch.rope_scaling_factor or 8.0,
        vp_stage=vp_stage,
    )


def causal_mask(seq_len: int, device=None) -> torch.Tensor:
    """Megatron's boolean mask convention: True = masked out. Passed explicitly (see compat)."""
    return torch.triu(torch.ones(1, 1, seq_len, seq_len, dtype=torch.bool, device=device), diagonal=1)


RECOMPUTE_MODES = ("none", "selective", "full")
SELECTIVE_RECOMPUTE_MODULES = ("core_attn",)


def recompute_kwargs(recompute: str) -> dict[str, Any]:
    """``train.recompute`` -> Megatron's own activation-recomputation settings.

    ``selective``: Megatron's selective recomputation of :data:`SELECTIVE_RECOMPUTE_MODULES`
    (core attention, the paper's choice, arXiv 2205.05198). ``full``: every transformer layer
    keeps only its input and is recomputed in backward (``uniform`` method, one layer per
    checkpoint, as Megatron-LM's ``--recompute-granularity full --recompute-method uniform
    --recompute-num-layers 1``).
    """
    if recompute == "none":
        return {}
    if recompute == "selective":
        return {"recompute_granularity": "selective", "recompute_modules": list(SELECTIVE_RECOMPUTE_MODULES)}
    if recompute == "full":
        return {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
    raise ValueError(f"train.recompute={recompute!r}: choose one of {', '.join(RECOMPUTE_MODES)}")


def build_model_stages(
    arch: ModelArch, config, *, padded_vocab: int, transformer_engine: bool, attention: str = "sdpa"
) -> list:
    """This rank's model chunks: one per virtual pipeline stage (one when VPP is off)."""
    from megatron.core import parallel_state as ps

    vpp = config.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        chunks.append(
            build_gpt_model(
                arch,
                config,
                padded_vocab=padded_vocab,
                transformer_engine=transformer_engine,
                pre_process=ps.is_pipeline_first_stage(ignore_virtual=vpp is None, vp_stage=stage),
                post_process=ps.is_pipeline_last_stage(ignore_virtual=vpp is None, vp_stage=stage),
                vp_stage=stage,
                attention=attention,
            )
        )
    return chunks


def declared_dtype(hf_config) -> torch.dtype | None:
    """The dtype config.json declares for its weights, if any."""
    value = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(value, str):
        return _DTYPES.get(value)
    return value if isinstance(value, torch.dtype) else None


def unwrap_module(chunk):
    """The GPTModel inside Megatron's DDP / Float16Module wrappers of one model chunk."""
    module = chunk
    while hasattr(module, "module"):
        module = module.module
    return module


@dataclass
class MegatronModel:
    """This rank's stage(s) of the model plus the facts every consumer needs."""

    chunks: list
    arch: ModelArch
    config: Any
    padded_vocab: int


def build_megatron_model(
    arch: ModelArch,
    *,
    tensor_parallel: int,
    pipeline_parallel: int,
    virtual_pipeline: int | None = None,
    sequence_parallel: bool = False,
    params_dtype: torch.dtype = torch.float32,
    transformer_impl: str = "auto",
    fp8: str | None = None,
    fp8_format: str = "hybrid",
    padded_vocab: int,
    attention: str = "sdpa",
    recompute: str = "none",
) -> MegatronModel:
    """Build this rank's stages (process groups must exist). Weights are random here.

    ``attention`` is ``model.attention`` (local layers only), ``recompute`` ``train.recompute``.
    """
    te = use_transformer_engine(transformer_impl)
    if fp8:  # refuse before anything is built or loaded
        require_fp8_training(fp8, arch, tensor_parallel=tensor_parallel, transformer_engine=te)
    config = transformer_config(
        arch,
        tensor_parallel=tensor_parallel,
        pipeline_parallel=pipeline_parallel,
        virtual_pipeline=virtual_pipeline,
        sequence_parallel=sequence_parallel,
        params_dtype=params_dtype,
        fp8_recipe=fp8,
        fp8_format=fp8_format,
        recompute=recompute,
    )
    chunks = build_model_stages(
        arch, config, padded_vocab=padded_vocab, transformer_engine=te, attention=attention
    )
    device = distributed.compute_device()
    chunks = [chunk.to(device) for chunk in chunks]
    for chunk in chunks:
        compat.guard_model_inputs(chunk)  # strict mode: inputs made without a device fail here
    return MegatronModel(chunks, arch, config, padded_vocab)


def gather_vocab_logits(logits: torch.Tensor) -> torch.Tensor:
    """Vocab-parallel logits [b, s, V/tp] -> full logits on every TP rank."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    return gather_from_tensor_model_parallel_region(logits)
