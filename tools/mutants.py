"""Mutation testing: the project's own list of plausible SePT bugs, each planted in a scratch
copy of the repository, with the tests that should catch it run against it.

    python tools/mutants.py --quick            # every mutant, its fast test subset (< 10 min)
    python tools/mutants.py                    # every mutant, its fuller test set
    python tools/mutants.py --only skip-sync,temperature-ignored-hf
    python tools/mutants.py --list             # the table, nothing run
    python tools/mutants.py --baseline --quick # also run each test set unmutated first
    python tools/mutants.py --only skip-sync --tests tests/loop/test_round_weights.py

A mutant is *killed* when its tests fail (the first failing test is printed: ``-x``), *survived*
when they pass. The scratch copy holds the tracked and untracked-but-not-ignored files of this
checkout (``git ls-files``), so uncommitted work is tested too; its tests run with
``PYTHONPATH`` pointing at the copy, and ``../shared`` (benchmarks) is linked beside it.

The list is data: one :class:`Mutant` per bug (file, exact text to find, replacement, tests).
Files move when the package is restructured: every path is in :data:`FILES`, and a mutant whose
find-text is missing (or not unique) stops the tool before anything runs, naming the mutant,
the file and the text, so the table can be updated. New modules add their mutants here.
Exit status: 0 every mutant killed, 1 some survived, 2 the table does not match the code.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

# Where each mutated piece lives today (one place to update when modules move).
FILES = {
    "metrics": "sept_megatron/eval/metrics.py",
    "grading": "sept_megatron/eval/grading.py",
    "sft": "sept_megatron/trainer/sft.py",
    "losses": "sept_megatron/trainer/losses.py",
    "hf_engine": "sept_megatron/rollout/hf.py",
    "sglang_engine": "sept_megatron/rollout/sglang_requests.py",
    "schedule": "sept_megatron/loop/schedule.py",
    "driver": "sept_megatron/loop/driver.py",
    "checkpointer": "sept_megatron/loop/checkpointer.py",
    "adapters": "sept_megatron/convert/adapters.py",
    "fp8_quantiser": "sept_megatron/convert/fp8.py",
    "prompts": "sept_megatron/data.py",
    "sampler": "sept_megatron/data.py",
    "planner": "sept_megatron/plan/planner.py",
    "sglang_memory": "sept_megatron/rollout/sglang_memory.py",
    "same_device": "sept_megatron/weight_sync/same_device.py",
    "offload": "sept_megatron/trainer/offload.py",
}

# Test files (and node ids) the mutants name; same reason.
TESTS = {
    "metrics": "tests/eval/test_metrics.py",
    "grading_tolerance": "tests/eval/test_grading_tolerance.py",
    "grading": "tests/eval/test_grading.py",
    "micro_batch": "tests/trainer/sft/test_micro_batch.py",
    "sft_trainer": "tests/trainer/sft/test_sft_trainer.py",
    "hf_engine": "tests/rollout/test_hf_engine.py",
    "sampling_temperature": "tests/rollout/test_sampling_temperature.py",
    "sglang_engine": "tests/rollout/test_sglang_engine.py",
    "sglang_loop": "tests/loop/test_sglang_loop.py",
    "schedule": "tests/loop/test_schedule.py",
    "round_sampling": "tests/loop/test_round_sampling.py",
    "round_weights": "tests/loop/test_round_weights.py",
    "train_cli": "tests/loop/test_train_cli.py",
    "adapters": "tests/convert/test_adapters.py",
    "conversion": "tests/convert/test_conversion_acceptance.py",
    "fp8": "tests/convert/test_fp8.py",
    "data": "tests/data/test_data.py",
    "state_bytes": "tests/plan/test_state_bytes.py",
    "plan": "tests/plan/test_plan.py",
    "memory_estimate": "tests/plan/test_memory_estimate.py",
    "sglang_memory": "tests/rollout/test_sglang_memory.py",
    "same_device": "tests/weight_sync/test_same_device.py",
    "offload": "tests/trainer/sft/test_offload.py",
    "losses": "tests/trainer/losses/test_losses.py",
}


@dataclasses.dataclass(frozen=True)
class Mutant:
    id: str
    kind: str  # the kind of bug, as issue 25 lists them
    description: str
    file: str  # key of FILES
    edits: tuple[tuple[str, str], ...]  # (exact text, replacement); each text found once
    quick: tuple[str, ...]  # test paths / node ids that must catch it, fast (TESTS keys + "::node")
    full: tuple[str, ...] = ()  # more tests for the full run (on top of ``quick``)


def tests(*names: str) -> tuple[str, ...]:
    """``"key"`` or ``"key::node"`` -> test path or node id via :data:`TESTS`."""
    out = []
    for name in names:
        key, _, node = name.partition("::")
        out.append(TESTS[key] + (f"::{node}" if node else ""))
    return tuple(out)


MUTANTS: tuple[Mutant, ...] = (
    Mutant(
        "pass-at-k-off-by-one",
        "pass@k off by one",
        "the unbiased estimator's product starts one term early (n - c instead of n - c + 1)",
        "metrics",
        (("for i in range(n - c + 1, n + 1):", "for i in range(n - c, n + 1):"),),
        tests("metrics"),
    ),
    Mutant(
        "avg-definition",
        "AVG definition",
        "AVG averages every reported pass@k (1, 2, 4, 8, 16, 32) instead of pass@1, 8, 32",
        "metrics",
        (("AVG_KS: tuple[int, ...] = (1, 8, 32)", "AVG_KS: tuple[int, ...] = KS"),),
        tests("metrics"),
    ),
    Mutant(
        "grading-text-unwrap",
        "grading normalisation",
        r"normalise_answer no longer unwraps \text{...} (only \textbf, \mathrm)",
        "grading",
        ((r'r"\\(?:text|textbf|mathrm)\{"', r'r"\\(?:textbf|mathrm)\{"'),),
        tests("grading_tolerance"),
        tests("grading"),
    ),
    Mutant(
        "grading-exact-numbers",
        "grading tolerance",
        "decimals compared with exact equality instead of a 1e-6 relative tolerance",
        "grading",
        (("return math.isclose(expected, actual, rel_tol=1e-6, abs_tol=0.0)", "return expected == actual"),),
        tests("grading_tolerance"),
        tests("grading"),
    ),
    Mutant(
        "grading-loose-tolerance",
        "grading tolerance",
        "decimals compared with a 1e-5 relative tolerance (ten times too loose)",
        "grading",
        (("rel_tol=1e-6, abs_tol=0.0", "rel_tol=1e-5, abs_tol=0.0"),),
        tests("grading_tolerance"),
        tests("grading"),
    ),
    Mutant(
        "loss-mask-drops-eos",
        "loss mask and EOS",
        "the loss mask stops one token early: the EOS is never trained on",
        "sft",
        (
            (
                "mask[row, len(s.prompt_ids) : len(ids)] = 1.0",
                "mask[row, len(s.prompt_ids) : len(ids) - 1] = 1.0",
            ),
        ),
        tests("micro_batch"),
        tests("sft_trainer"),
    ),
    Mutant(
        "loss-mask-includes-prompt",
        "loss mask and EOS",
        "the loss mask starts one token early: the last prompt token is trained on",
        "sft",
        (
            (
                "mask[row, len(s.prompt_ids) : len(ids)] = 1.0",
                "mask[row, len(s.prompt_ids) - 1 : len(ids)] = 1.0",
            ),
        ),
        tests("micro_batch"),
        tests("sft_trainer"),
    ),
    Mutant(
        "engine-drops-eos",
        "loss mask and EOS",
        "the hf engine cuts the answer before its EOS, so SFT never learns to stop",
        "hf_engine",
        (
            (
                "token_ids = new_tokens if stop is None else new_tokens[: stop + 1]",
                "token_ids = new_tokens if stop is None else new_tokens[: stop]",
            ),
        ),
        tests("hf_engine::test_cut_after_first_eos"),
        tests("hf_engine"),
    ),
    Mutant(
        "loss-per-sequence",
        "loss normalisation",
        "the loss is divided by the number of sequences instead of the number of response tokens",
        "losses",
        (
            (
                "count = mask.sum()",
                "count = (mask.sum(dim=-1) > 0).sum()",
            ),
        ),
        tests("sft_trainer::test_loss_is_the_token_mean_nll_of_response_tokens"),
    ),
    Mutant(
        "tau-schedule-anneal-fraction",
        "tau_s schedule",
        "the anneal runs over progress * fraction instead of progress / fraction",
        "schedule",
        (
            (
                "x = min(1.0, max(0.0, progress / rollout.anneal_fraction))",
                "x = min(1.0, max(0.0, progress * rollout.anneal_fraction))",
            ),
        ),
        tests("schedule", "round_sampling"),
    ),
    Mutant(
        "tau-schedule-next-round",
        "tau_s schedule",
        "round r is sampled at the temperature of round r + 1",
        "schedule",
        (
            (
                "return sampling_temperature(self.rollout, round_index / self.rounds)",
                "return sampling_temperature(self.rollout, (round_index + 1) / self.rounds)",
            ),
        ),
        tests("round_sampling"),
        tests("train_cli::test_single_process_run_logs_every_metric"),
    ),
    Mutant(
        "gate-up-order",
        "gate/up and QKV split order",
        "linear_fc1 fused as cat(up, gate) (and split back the same way)",
        "adapters",
        (
            ("        return torch.cat(hf, dim=0)\n", "        return torch.cat(hf[::-1], dim=0)\n"),
            (
                "        return list(full.chunk(2, dim=0))\n",
                "        return list(full.chunk(2, dim=0))[::-1]\n",
            ),
        ),
        tests("adapters"),
        tests("conversion"),
    ),
    Mutant(
        "qkv-order",
        "gate/up and QKV split order",
        "each query group fused as [q; v; k] (and split back the same way)",
        "adapters",
        (
            (
                "k.reshape(groups, d, *tail), v.reshape(groups, d, *tail)]",
                "v.reshape(groups, d, *tail), k.reshape(groups, d, *tail)]",
            ),
            ("for t in (q, k, v)]", "for t in (q, v, k)]"),
        ),
        tests("adapters"),
        tests("conversion"),
    ),
    Mutant(
        "vocab-padding-exported",
        "vocab padding on export",
        "the export keeps Megatron's padded vocab rows",
        "adapters",
        (("return [full[: arch.vocab_size]]", "return [full]"),),
        tests("adapters"),
        tests("conversion"),
    ),
    Mutant(
        "resume-round",
        "resume round and sampler position",
        "a checkpoint records the round after the one it ends (the resumed run skips a round)",
        "checkpointer",
        (
            (
                '"round": rounds_done,',
                '"round": rounds_done + 1,',
            ),
        ),
        tests("train_cli::test_kill_and_resume_continues_with_the_same_prompts"),
    ),
    Mutant(
        "resume-sampler-position",
        "resume round and sampler position",
        "the question sampler forgets its position within the epoch when saved",
        "sampler",
        (('"position": self.position,', '"position": 0,'),),
        tests("data"),
        tests("train_cli::test_kill_and_resume_continues_with_the_same_prompts"),
    ),
    Mutant(
        "fp8-scale-power-of-two",
        "FP8 scale rounding",
        "block scales rounded up to a power of two (the largest element no longer lands on 448)",
        "fp8_quantiser",
        (
            (
                "torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))",
                (
                    "torch.where(amax > 0, torch.exp2(torch.ceil(torch.log2(amax / E4M3_MAX))), "
                    "torch.ones_like(amax))"
                ),
            ),
        ),
        tests("fp8"),
    ),
    Mutant(
        "no-generation-prompt",
        "generation prompt",
        "chat prompts rendered without the assistant turn's opening (add_generation_prompt=False)",
        "prompts",
        (("tokenize=False, add_generation_prompt=True", "tokenize=False, add_generation_prompt=False"),),
        tests("data"),
    ),
    Mutant(
        "planner-fp32-optimizer-halved",
        "planner terms",
        "the planner counts 4 instead of 8 optimizer bytes per fp32 parameter",
        "planner",
        (
            (
                "opt_bytes = 12 if kernels.param_bytes < 4 else 8",
                "opt_bytes = 12 if kernels.param_bytes < 4 else 4",
            ),
        ),
        tests("state_bytes"),
        tests("plan", "memory_estimate"),
    ),
    Mutant(
        "planner-bf16-optimizer-no-master",
        "planner terms",
        "the planner forgets the fp32 master copy of bf16 weights (8 bytes, not 12)",
        "planner",
        (
            (
                "opt_bytes = 12 if kernels.param_bytes < 4 else 8",
                "opt_bytes = 8 if kernels.param_bytes < 4 else 8",
            ),
        ),
        tests("state_bytes"),
        tests("plan"),
    ),
    Mutant(
        "planner-no-sharded-alternative",
        "planner terms",
        "the planner proposes only the configured backend: a model one hf engine cannot hold gets no SGLang layout",
        "planner",
        (("        if max(tps, default=1) > 1:", "        if False:"),),
        tests("plan::test_70b_with_the_single_gpu_hf_engine_does_not_fit"),
    ),
    Mutant(
        "sglang-pool-keeps-its-weights",
        "planner terms",
        "the SGLang KV pool is counted without taking the engine's weights out of its fraction",
        "sglang_memory",
        (
            (
                "free_after_load_gib=free_at_start_gib - engine_weights_gib,",
                "free_after_load_gib=free_at_start_gib,",
            ),
        ),
        tests("sglang_memory"),
    ),
    Mutant(
        "same-device-sync-drops-a-tensor",
        "skipped sync",
        "the in-place sync leaves the last tensor of the plan (the output layer) stale",
        "same_device",
        (("torch._foreach_copy_(targets, sources)", "torch._foreach_copy_(targets[:-1], sources[:-1])"),),
        tests("same_device"),
    ),
    Mutant(
        "offload-loses-the-state",
        "offload",
        "the trainer's state comes back from host memory as fresh, unwritten storage",
        "offload",
        (
            (
                "torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage).copy_(host)",
                "torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)",
            ),
        ),
        tests("offload"),
    ),
    Mutant(
        "kl-reversed",
        "loss",
        "the KL penalty estimates KL(reference || current) instead of verl's k3 of KL(current || reference)",
        "losses",
        (("log_ratio = ref_log_probs - log_probs", "log_ratio = log_probs - ref_log_probs"),),
        tests("losses::test_low_var_kl_is_verls_k3_estimator_by_hand"),
    ),
    Mutant(
        "skip-sync",
        "skipped sync",
        "the engine is refreshed only every other round",
        "driver",
        (
            (
                "fleet.sync(model, refresh=schedule.refreshes_engine)",
                "fleet.sync(model, refresh=schedule.refreshes_engine and round_index % 2 == 0)",
            ),
        ),
        tests("round_weights"),
    ),
    Mutant(
        "temperature-ignored-hf",
        "temperature ignored",
        "the hf engine samples at T = 1 whatever tau_s is",
        "hf_engine",
        (("TemperatureLogitsWarper(sampling.temperature)", "TemperatureLogitsWarper(1.0)"),),
        tests("sampling_temperature"),
        tests("hf_engine"),
    ),
    Mutant(
        "temperature-ignored-sglang",
        "temperature ignored",
        "SGLang requests carry T = 1 whatever tau_s is",
        "sglang_engine",
        (
            (
                '"temperature": 0.0 if greedy else float(sampling.temperature),',
                '"temperature": 0.0 if greedy else 1.0,',
            ),
        ),
        tests("round_sampling"),
        tests("sglang_engine", "sglang_loop::test_one_engine_group_of_two_ranks"),
    ),
)


# --- applying -----------------------------------------------------------------------------------
class TableError(Exception):
    """The mutant table does not match the code (a file moved, a line changed)."""


def check_table(mutants, root: Path) -> None:
    """Every mutant's file exists and each find-text occurs exactly once; every test path exists."""
    problems = []
    for mutant in mutants:
        path = root / FILES[mutant.file]
        if not path.is_file():
            problems.append(f"{mutant.id}: file {FILES[mutant.file]} (FILES[{mutant.file!r}]) is missing")
            continue
        source = path.read_text()
        for find, _ in mutant.edits:
            count = source.count(find)
            if count != 1:
                problems.append(
                    f"{mutant.id}: the text {find!r} occurs {count} times in "
                    f"{FILES[mutant.file]} (need exactly once)"
                )
        for test in mutant.quick + mutant.full:
            if not (root / test.split("::")[0]).is_file():
                problems.append(f"{mutant.id}: test file {test.split('::')[0]} is missing")
    if problems:
        raise TableError(
            "the mutant table does not match the code; update FILES / TESTS / the "
            "mutant's text in tools/mutants.py:\n  " + "\n  ".join(problems)
        )


def mutated_source(source: str, mutant: Mutant) -> str:
    for find, replace in mutant.edits:
        source = source.replace(find, replace, 1)
    return source


def scratch_copy(root: Path, into: Path) -> Path:
    """The checkout's tracked and untracked-but-not-ignored files, copied under ``into/repo``;
    ``into/shared`` links to the checkout's ``../shared`` (benchmarks) when there is one."""
    listed = (
        subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=root,
            check=True,
            capture_output=True,
        )
        .stdout.decode()
        .split("\0")
    )
    repo = into / "repo"
    for name in filter(None, listed):
        source = root / name
        if source.is_file():
            target = repo / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    shared = root.parent / "shared"
    if shared.is_dir():
        (into / "shared").symlink_to(shared)
    return repo


@dataclasses.dataclass
class Verdict:
    mutant: Mutant
    killed: bool
    caught_by: str
    seconds: float
    cpu_seconds: float  # user + system of the test processes: the wall time on idle cores


FAILED_RE = re.compile(r"^(FAILED|ERROR) (\S+)", re.MULTILINE)


def run_tests(repo: Path, test_ids: tuple[str, ...], timeout_s: int) -> tuple[int | None, str]:
    env = dict(
        os.environ,
        PYTHONPATH=f"{repo}{os.pathsep}{repo / 'tests'}",
        OMP_NUM_THREADS="1",
        SEPT_DEVICE="cpu",
        PYTHONDONTWRITEBYTECODE="1",
        PYTHONWARNINGS="ignore",
    )
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-x",
        "-rfE",
        "-p",
        "no:cacheprovider",
        "--no-header",
        *test_ids,
    ]
    proc = subprocess.Popen(
        command,
        cwd=repo,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # pytest and every rank it launched
        output, _ = proc.communicate()
        return None, output
    return proc.returncode, output


def judge(mutant: Mutant, repo: Path, test_ids: tuple[str, ...], timeout_s: int) -> Verdict:
    path = repo / FILES[mutant.file]
    original = path.read_text()
    path.write_text(mutated_source(original, mutant))
    start, cpu_start = time.perf_counter(), children_cpu_seconds()
    try:
        rc, output = run_tests(repo, test_ids, timeout_s)
    finally:
        path.write_text(original)
    timing = time.perf_counter() - start, children_cpu_seconds() - cpu_start
    if rc is None:
        return Verdict(mutant, True, f"timeout after {timeout_s} s (counted as killed)", *timing)
    if rc == 0:
        return Verdict(mutant, False, "", *timing)
    failed = FAILED_RE.search(output)
    if failed:
        return Verdict(mutant, True, f"{failed.group(1)} {failed.group(2)}", *timing)
    if rc == 5:  # pytest: nothing collected / all deselected
        raise TableError(f"{mutant.id}: pytest collected no test from {' '.join(test_ids)}")
    tail = output.strip().splitlines()[-1] if output.strip() else ""
    return Verdict(mutant, True, f"pytest exited {rc}: {tail}", *timing)


def children_cpu_seconds() -> float:
    """CPU time of finished child processes (pytest and everything it launched and waited for).
    On a shared machine wall time says little; this is what the run costs on idle cores."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def check_baseline(repo: Path, test_ids: tuple[str, ...], timeout_s: int) -> None:
    rc, output = run_tests(repo, test_ids, timeout_s)
    if rc != 0:
        raise TableError(
            f"the unmutated code fails {' '.join(test_ids)} (rc={rc}); fix that first:\n"
            + "\n".join(output.strip().splitlines()[-15:])
        )


# --- command line ------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python tools/mutants.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="run each mutant's fast test subset only (under 10 minutes on 2 cores)",
    )
    parser.add_argument("--only", default="", help="comma-separated mutant ids")
    parser.add_argument("--list", action="store_true", help="print the table and exit")
    parser.add_argument(
        "--baseline",
        action="store_true",
        help="first run each mutant's tests on the unmutated copy (must pass)",
    )
    parser.add_argument(
        "--tests",
        default="",
        help="comma-separated test paths / node ids to run instead of each mutant's "
        "own (to see one test kill a mutant)",
    )
    parser.add_argument("--timeout", type=int, default=600, help="seconds per mutant's test run")
    parser.add_argument("--keep", action="store_true", help="keep the scratch copy (path printed)")
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def select(only: str) -> list[Mutant]:
    if not only:
        return list(MUTANTS)
    wanted = [name.strip() for name in only.split(",") if name.strip()]
    known = {m.id: m for m in MUTANTS}
    unknown = [name for name in wanted if name not in known]
    if unknown:
        raise SystemExit(f"--only: unknown mutant(s) {', '.join(unknown)}; see --list")
    return [known[name] for name in wanted]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    mutants = select(args.only)
    if args.list:
        for m in mutants:
            print(
                f"{m.id:34s} [{m.kind}] {m.description}\n{'':34s} {FILES[m.file]}; quick: "
                f"{' '.join(m.quick)}" + (f"; full adds: {' '.join(m.full)}" if m.full else "")
            )
        return 0
    try:
        check_table(mutants, REPO_ROOT)
    except TableError as exc:
        print(f"mutants: {exc}", file=sys.stderr)
        return 2
    scratch = Path(tempfile.mkdtemp(prefix="sept-mutants-"))
    verdicts = []
    started = time.perf_counter()
    try:
        repo = scratch_copy(REPO_ROOT, scratch)
        for number, mutant in enumerate(mutants, 1):
            test_ids = mutant.quick if args.quick else mutant.quick + mutant.full
            if args.tests:
                test_ids = tuple(t.strip() for t in args.tests.split(",") if t.strip())
            if args.baseline:
                check_baseline(repo, test_ids, args.timeout)
            verdict = judge(mutant, repo, test_ids, args.timeout)
            verdicts.append(verdict)
            status = "killed  " if verdict.killed else "SURVIVED"
            print(
                f"[{number:2d}/{len(mutants)}] {status} {mutant.id:34s} {verdict.seconds:6.1f} s "
                f"(cpu {verdict.cpu_seconds:5.1f} s)  "
                f"{verdict.caught_by or '(tests: ' + ' '.join(test_ids) + ')'}",
                flush=True,
            )
    except TableError as exc:
        print(f"mutants: {exc}", file=sys.stderr)
        return 2
    finally:
        if args.keep:
            print(f"scratch copy kept at {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    killed = sum(v.killed for v in verdicts)
    cpu = sum(v.cpu_seconds for v in verdicts)
    print(
        f"\n{killed}/{len(verdicts)} mutants killed ({killed / len(verdicts):.0%}) in "
        f"{time.perf_counter() - started:.0f} s wall, {cpu:.0f} s cpu"
        f"{' (--quick)' if args.quick else ''}"
    )
    survivors = [v.mutant.id for v in verdicts if not v.killed]
    if survivors:
        print("survived: " + ", ".join(survivors))
    return 0 if not survivors else 1


if __name__ == "__main__":
    sys.exit(main())
