"""Every problem a config has before start-up, collected at once: ``sept-megatron config``.

    sept-megatron config --config X.yaml --world-size 8 [--hf-config PATH] [key=value ...]

``sept-megatron train`` refuses a config at its first failing check (``loop.check_config``);
this runs the same checks -- the tree through :func:`sept_megatron.config.validate` at the
given world size with the model's shapes, the planner's memory check, the data files and the
start checkpoint -- but keeps going, so one run lists everything to fix.
"""

from __future__ import annotations

import os

from sept_megatron.config import Config, ConfigError, validate


def _arch_or_problem(cfg: Config, hf_config: str | None):
    """The model's shapes from ``--hf-config`` or ``model.hf_path`` (as train and plan read
    them), or the reason they cannot be read."""
    from sept_megatron.plan import load_arch

    if not (hf_config or cfg.model.hf_path):
        return None, None  # validate() reports the unset model.hf_path
    try:
        return load_arch(cfg, hf_config), None
    except ConfigError as exc:
        return None, str(exc)


def _file_problems(cfg: Config) -> list[str]:
    problems = []
    if not cfg.data.train_files:
        problems.append("data.train_files is empty: give one or more parquet/JSONL files")
    for field_name, paths in (("data.train_files", cfg.data.train_files),
                              ("eval.benchmarks", cfg.eval.benchmarks)):
        problems += [f"{field_name}: {path!r} does not exist" for path in paths
                     if not os.path.exists(path)]
    return problems


def _checkpoint_problem(cfg: Config, arch) -> str | None:
    from sept_megatron import checkpoint as ckpt_io

    if not cfg.model.megatron_ckpt or arch is None:
        return None
    try:
        ckpt_io.check_compatible(ckpt_io.read_meta(cfg.model.megatron_ckpt), arch,
                                 cfg.parallel.tensor_parallel)
    except (OSError, ValueError) as exc:
        return f"model.megatron_ckpt={cfg.model.megatron_ckpt!r}: {exc}"
    return None


def config_problems(cfg: Config, world_size: int, hf_config: str | None = None) -> list[str]:
    """Every problem train's start-up checks would find at ``world_size`` ranks, one per entry."""
    arch, arch_problem = _arch_or_problem(cfg, hf_config)
    problems = [arch_problem] if arch_problem else []
    try:
        validate(cfg, world_size, arch)
    except ConfigError as exc:
        problems += [line.strip() for line in str(exc).splitlines()[1:]]
    if arch is not None and not problems:  # the planner needs a valid layout to size
        from sept_megatron.plan import check_fits

        try:
            check_fits(cfg, arch, world_size)
        except ConfigError as exc:
            problems.append(str(exc))
    problems += _file_problems(cfg)
    checkpoint_problem = _checkpoint_problem(cfg, arch)
    return problems + ([checkpoint_problem] if checkpoint_problem else [])
