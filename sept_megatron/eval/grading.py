"""Rule-based grading of a model response against a ground-truth answer.

The answer is the content of the *last* ``\\boxed{...}`` (or ``\\boxed x`` / ``\\fbox{...}``) in
the response, as in the Qwen2.5-Math and SimpleRL evaluation harnesses; a response without a
box is wrong. Equivalence is decided in two steps:

1. a fast path: the two strings are equal after light LaTeX normalisation (spaces, ``$``,
   ``\\left``/``\\right``, ``\\dfrac``...), which settles most correct answers without sympy;
2. ``math_verify`` (``parse`` + ``verify``), which handles fractions vs decimals, ``\\frac12``,
   percentages, intervals, tuples, sets and symbolic equality.

Grading must never crash or hang on adversarial output, because one stuck answer stalls a
whole evaluation sweep. So inputs are capped in length, every failure grades as wrong, and
``math_verify`` runs under a deadline of CPU time (so grades do not depend on machine load). ``math_verify``'s own timeouts use
``signal.alarm`` and so only work in the main thread (and only with whole seconds, once per
comparison rather than once per answer); we switch them off and instead:

* in the main thread, arm ``signal.setitimer`` once for the whole answer and raise a
  ``BaseException`` (which ``math_verify``'s ``except Exception`` handlers cannot swallow);
* in any other thread, send the answer to a spawned child process, which grades it in *its*
  main thread with the same deadline; if the child still overruns (e.g. stuck inside C code,
  where signals are not delivered) it is killed and replaced.

Many answers at once (a sweep cell): :class:`GradingPool` extracts the boxed answers in the
caller, grades each distinct (answer, ground truth) pair once, in a pool of spawned processes
(each grades in its main thread, so every answer keeps its deadline), and can run while the
caller generates the next cell. Its grades equal :func:`is_correct`'s, answer by answer.
"""

from __future__ import annotations

import functools
import logging
import math
import multiprocessing
import multiprocessing.pool
import os
import re
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

logger = logging.getLogger(__name__)

# Only the tail of a response is searched: real responses are a few thousand tokens, and a
# final answer sits at the end. This bounds the work on a multi-megabyte garbage response.
MAX_RESPONSE_CHARS = 65_536
# Longest boxed answer handed to sympy; longer ones can still match on the string fast path.
# The longest ground truth in the six benchmarks is ~210 characters.
MAX_ANSWER_CHARS = 1_024
# CPU-time budget for math_verify on one answer (parse both sides + compare).
ANSWER_TIMEOUT_S = 1.5
# Extra wall time a child process gets before it is killed: a backstop for a child stuck in
# C code, where no signal arrives; generous, since the deadline itself counts CPU time.
_WORKER_GRACE_S = 10.0
_WORKER_STARTUP_S = 120.0

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_SCIENTIFIC_RE = re.compile(r"^([-+]?\d+(?:\.\d*)?|[-+]?\.\d+)[eE]([-+]?\d+)$")
_LATEX_SCIENTIFIC_RE = re.compile(r"^([-+]?\d+(?:\.\d*)?)\\(?:times|cdot)10\^\{?([-+]?\d+)\}?$")
_INT_RE = re.compile(r"^[-+]?\d+$")
_DECIMAL_RE = re.compile(r"^[-+]?(?:\d+\.\d*|\.\d+)$")
_GROUPED_INT_RE = re.compile(r"^[-+]?\d{1,3}(?:,\d{3})+$")
_TEXT_WRAPPER_RE = re.compile(r"\\(?:text|textbf|mathrm)\{")
_PERCENT_RE = re.compile(r"\\?%$")
_NORMALISE_DROP = (r"\left", r"\right", r"\!", r"\,", r"\;", r"\:", r"\displaystyle", "$")


def extract_last_boxed(text: str) -> str | None:
    """Return the content of the last ``\\boxed{..}``/``\\fbox{..}``/``\\boxed x`` in ``text``.

    Braces are matched with nesting; escaped braces (``\\{``, ``\\}``) do not count. Returns
    ``None`` when there is no box or the last box is unbalanced (a response cut off by the
    token limit mid-answer has no final answer). For nested boxes the innermost, which starts
    last, is returned. Only the last :data:`MAX_RESPONSE_CHARS` characters are searched.
    """
    if not isinstance(text, str):
        return None
    text = text[-MAX_RESPONSE_CHARS:]
    matches = list(_BOX_RE.finditer(text))
    last_match = matches[-1] if matches else None
    if last_match is None:
        return None
    rest = text[last_match.end() :]
    stripped = rest.lstrip()
    if stripped.startswith("{"):
        return _braced_content(stripped)
    if len(stripped) == len(rest) or not stripped:
        return None  # "\boxed" followed by neither "{" nor a space-separated token
    # "\boxed 5$" form: the answer runs to the next space or "$".
    answer = re.split(r"[\s$]", stripped, maxsplit=1)[0]
    return answer or None


def _braced_content(text: str) -> str | None:
    """Content of the brace group that ``text`` starts with, or None if it never closes."""
    depth = 0
    i = 0
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2  # skip the escaped character: "\{" and "\}" are literal braces
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[1:i]
        i += 1
    return None


def normalise_answer(answer: str) -> str:
    """Light, always-safe normalisation for the exact-match fast path.

    Only rewrites that cannot change a value: spacing and sizing macros, ``$``, ``\\dfrac``
    and ``\\tfrac`` spellings, a trailing full stop and ``\\text{}`` around a bare answer.
    """
    answer = _unwrap_text(answer.strip())
    for token in _NORMALISE_DROP:
        answer = answer.replace(token, "")
    answer = answer.replace(r"\dfrac", r"\frac").replace(r"\tfrac", r"\frac")
    answer = re.sub(r"\s+", "", answer)
    return answer.rstrip(".")


def _unwrap_text(answer: str) -> str:
    """``\\text{\\text{East}}`` -> ``East``: every ``\\text``/``\\textbf``/``\\mathrm`` group that
    wraps the whole answer, however deeply nested (the reference grader, verl's entropy_math,
    strips them all; one level only rejected doubly wrapped answers)."""
    while True:
        opening = _TEXT_WRAPPER_RE.match(answer)
        if opening is None:
            return answer
        inner = _braced_content(answer[opening.end() - 1 :])
        if inner is None or opening.end() + len(inner) + 1 != len(answer):
            return answer  # "\text{a} + \text{b}": the group does not wrap the whole answer
        answer = inner.strip()


def _percent_free_numbers_equal(answer: str, ground_truth: str) -> bool:
    """``-5\\%`` vs ``-5``: equal numbers once a trailing percent sign is dropped, as the
    reference grader drops ``\\%``. Only ever accepts: other percent readings (``50\\%`` =
    ``0.5``) are still math_verify's to decide."""
    expected = _plain_number(_PERCENT_RE.sub("", normalise_answer(ground_truth)))
    actual = _plain_number(_PERCENT_RE.sub("", normalise_answer(answer)), allow_grouping=True)
    return expected is not None and actual is not None and _numbers_equal(expected, actual)


def is_correct(response: str, ground_truth: str) -> bool:
    """Whether the last boxed answer of ``response`` equals ``ground_truth``. Never raises."""
    try:
        answer = extract_last_boxed(response)
        if answer is None or not isinstance(ground_truth, str):
            return False
        return grade_answer(answer, ground_truth)
    except Exception:  # noqa: BLE001 - a grader bug must cost one answer, not the sweep
        logger.debug("grading failed; counted as wrong", exc_info=True)
        return False


@functools.lru_cache(maxsize=200_000)
def grade_answer(answer: str, ground_truth: str) -> bool:
    """Whether an already-extracted answer equals the ground truth.

    Cached: at 32 samples per question most answers repeat, and grading is a pure function.
    """
    if not answer.strip() or not ground_truth.strip():
        return False
    if normalise_answer(answer) == normalise_answer(ground_truth):
        return True
    if len(answer) > MAX_ANSWER_CHARS or len(ground_truth) > MAX_ANSWER_CHARS:
        return False
    if _percent_free_numbers_equal(answer, ground_truth):
        return True
    numbers = _plain_number(ground_truth), _plain_number(answer, allow_grouping=True)
    if numbers[0] is not None and numbers[1] is not None:
        return _numbers_equal(*numbers)
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer"):
        return _verify_in_process(ground_truth, answer, ANSWER_TIMEOUT_S)
    return _WORKER.grade(ground_truth, answer, ANSWER_TIMEOUT_S)


def _plain_number(text: str, *, allow_grouping: bool = False) -> int | float | None:
    """The value of a plain integer, decimal or ``1.2e-8``/``1.2\\times10^{-8}`` number, else None.

    Plain numbers are most answers, and compared here without sympy. This is also *more*
    correct than math_verify for tiny values: it rounds to 6 decimals, so it calls
    ``1.325e-27`` equal to ``1.325e-28`` (Minerva has physical constants of that size).
    ``allow_grouping`` accepts thousands separators (``27,648``) on the response side only; a
    ground truth like ``1,2`` is a list, not a number.
    """
    text = normalise_answer(text).replace("{,}", ",")
    if allow_grouping and _GROUPED_INT_RE.match(text):
        text = text.replace(",", "")
    latex_scientific = _LATEX_SCIENTIFIC_RE.match(text)
    if latex_scientific:
        text = f"{latex_scientific.group(1)}e{latex_scientific.group(2)}"
    if _INT_RE.match(text):
        return int(text)
    if _DECIMAL_RE.match(text) or _SCIENTIFIC_RE.match(text):
        value = float(text)
        return value if math.isfinite(value) else None
    return None


def _numbers_equal(expected: int | float, actual: int | float) -> bool:
    """Integers exactly; otherwise a relative tolerance of 1e-6, matching math_verify's
    six-decimal rounding for values of order one but scale-free."""
    if isinstance(expected, int) and isinstance(actual, int):
        return expected == actual
    return math.isclose(expected, actual, rel_tol=1e-6, abs_tol=0.0)


class _AnswerTimeout(BaseException):
    """Raised by our alarm. A BaseException, so math_verify's broad handlers let it through."""


@contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    """Raise :class:`_AnswerTimeout` in the main thread after ``seconds`` of this process's CPU time.

    CPU time (``ITIMER_PROF``), not wall time: on a loaded machine a descheduled grader would
    otherwise time out on answers it grades in time when idle, and the same answer would get
    different grades from one process and from a pool (seen at load 5 on 2 cores: 1 in 1000).
    Runaway sympy work burns CPU, so it is still cut off. A profiler's timer is put back.
    """

    def on_timeout(signum: int, frame: object) -> None:
        raise _AnswerTimeout()

    started = time.process_time()
    previous_handler = signal.signal(signal.SIGPROF, on_timeout)
    previous_delay, previous_interval = signal.setitimer(signal.ITIMER_PROF, seconds)
    try:
        yield
    finally:
        try:
            signal.setitimer(signal.ITIMER_PROF, 0)
        finally:  # the timer may fire just as it is being cancelled; restore regardless
            signal.signal(signal.SIGPROF, previous_handler)
            if previous_delay > 0:
                remaining = max(previous_delay - (time.process_time() - started), 1e-3)
                signal.setitimer(signal.ITIMER_PROF, remaining, previous_interval)


def _verify_in_process(ground_truth: str, answer: str, timeout_s: float) -> bool:
    """math_verify equivalence under a CPU-time deadline; a timeout or error is wrong."""
    _warm_up_child()  # importing math_verify (sympy) takes seconds: no answer's budget pays it
    try:
        with _deadline(timeout_s):
            return _math_verify(ground_truth, answer)
    except _AnswerTimeout:
        logger.debug("math_verify timed out after %.1fs; counted as wrong", timeout_s)
        return False
    except Exception:  # noqa: BLE001
        logger.debug("math_verify failed; counted as wrong", exc_info=True)
        return False


def _math_verify(ground_truth: str, answer: str) -> bool:
    """Parse both sides with math_verify and compare; its own signal timeouts are off."""
    from math_verify import parse, verify

    _silence_math_verify_timeout_warnings()
    # "first_match": the answer is already extracted, so parse it whole or not at all. The
    # default "any_match" falls back to a fragment when the whole fails to parse, which makes
    # e.g. "\frac{1}{3} E_{1}+\frac{2}{3} E_{2}" parse as 2/3 and equal "... E_{3}".
    gold = parse(_as_latex(ground_truth), extraction_mode="first_match", parsing_timeout=None)
    predicted = parse(_as_latex(answer), extraction_mode="first_match", parsing_timeout=None)
    if not gold or not predicted:
        return False
    return bool(verify(gold, predicted, timeout_seconds=None))


def _as_latex(answer: str) -> str:
    """Wrap a bare answer for math_verify's boxed extractor.

    ``1.24e-8`` (Minerva's ground truths) is rewritten as ``1.24\\times10^{-8}``: the LaTeX
    parser would otherwise read ``e`` as Euler's number.
    """
    answer = answer.strip().strip("$").strip()
    scientific = _SCIENTIFIC_RE.match(answer)
    if scientific:
        answer = rf"{scientific.group(1)}\times10^{{{scientific.group(2)}}}"
    return rf"\boxed{{{answer}}}"


class _DropTimeoutDisabledWarning(logging.Filter):
    """math_verify warns once that its timeouts are off; ours are on, so the warning misleads."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


@functools.cache
def _silence_math_verify_timeout_warnings() -> None:
    for name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).addFilter(_DropTimeoutDisabledWarning())


def _grade_in_child(ground_truth: str, answer: str, timeout_s: float) -> bool:
    """Runs in the child process's main thread, where the signal deadline works."""
    return _verify_in_process(ground_truth, answer, timeout_s)


@functools.cache
def _warm_up_child() -> bool:
    import math_verify  # noqa: F401 - pay the sympy import before the first deadline

    return True


class _GradingWorker:
    """One spawned child process that grades for non-main threads; replaced when it hangs.

    ``spawn`` rather than ``fork``: the parent may hold CUDA contexts and NCCL threads, which
    do not survive a fork. Calls are serialised; the in-training evaluator grades from one
    background thread, so a single child is enough.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pool: multiprocessing.pool.Pool | None = None

    def grade(self, ground_truth: str, answer: str, timeout_s: float) -> bool:
        with self._lock:
            try:
                pool = self._ensure_pool()
                pending = pool.apply_async(_grade_in_child, (ground_truth, answer, timeout_s))
                return bool(pending.get(timeout_s + _WORKER_GRACE_S))
            except multiprocessing.TimeoutError:
                logger.warning("grading child overran %.1fs; restarting it", timeout_s)
                self._restart()
                return False
            except Exception:  # noqa: BLE001
                logger.debug("grading child failed; counted as wrong", exc_info=True)
                self._restart()
                return False

    def _ensure_pool(self) -> multiprocessing.pool.Pool:
        if self._pool is None:
            self._pool = multiprocessing.get_context("spawn").Pool(processes=1)
            self._pool.apply_async(_warm_up_child).get(_WORKER_STARTUP_S)
        return self._pool

    def _restart(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool = None


_WORKER = _GradingWorker()


# --- many answers at once ------------------------------------------------------------------
_PAIRS_PER_TASK = 32  # small enough to spread a cell over every worker, big enough to amortise IPC


def _grade_pair(answer: str, ground_truth: str) -> bool:
    """:func:`is_correct` after extraction: never raises."""
    try:
        return grade_answer(answer, ground_truth)
    except Exception:  # noqa: BLE001 - as in is_correct
        logger.debug("grading failed; counted as wrong", exc_info=True)
        return False


def _grade_pairs_in_child(pairs: list[tuple[str, str]]) -> list[bool]:
    """Runs in a pool worker's main thread, where :func:`grade_answer` arms its deadline."""
    return [_grade_pair(answer, truth) for answer, truth in pairs]


class PendingGrades:
    """Grades being computed; :meth:`result` waits for them (in response order)."""

    def __init__(
        self,
        pool: GradingPool,
        answers: list[str | None],
        truths: Sequence,
        pairs: list[tuple[str, str]],
        pending,
    ) -> None:
        self._pool, self._answers, self._truths = pool, answers, truths
        self._pairs, self._pending = pairs, pending

    def result(self) -> list[bool]:
        grades = self._pool._collect(self._pairs, self._pending)
        return [
            answer is not None and isinstance(truth, str) and grades[(answer, truth)]
            for answer, truth in zip(self._answers, self._truths)
        ]


class GradingPool:
    """Grade many responses in ``workers`` spawned processes (0: in this process).

    ``spawn``, not ``fork``: the caller may hold CUDA contexts and NCCL threads. Workers start
    on first use and live until :meth:`close`. If a worker overruns every deadline (stuck in C
    code, where signals do not reach), the pool is killed and the batch is graded here instead,
    still under the per-answer deadline.
    """

    def __init__(self, workers: int) -> None:
        if workers < 0:
            raise ValueError(f"grading workers must be >= 0 (0 grades in-process), got {workers}")
        self.workers = workers
        self._pool: multiprocessing.pool.Pool | None = None

    def grade(self, responses: Sequence[str], ground_truths: Sequence[str | None]) -> list[bool]:
        """``[is_correct(r, t) for r, t in zip(responses, ground_truths)]``, in parallel."""
        return self.submit(responses, ground_truths).result()

    def submit(self, responses: Sequence[str], ground_truths: Sequence[str | None]) -> PendingGrades:
        """Start grading and return at once; the caller may generate meanwhile."""
        if len(responses) != len(ground_truths):
            raise ValueError(f"{len(responses)} responses but {len(ground_truths)} ground truths")
        answers = [_safe_extract(r) for r in responses]
        pairs = list(
            dict.fromkeys(
                (a, t) for a, t in zip(answers, ground_truths) if a is not None and isinstance(t, str)
            )
        )
        pending = None
        if self.workers and pairs:
            tasks = [pairs[i : i + _PAIRS_PER_TASK] for i in range(0, len(pairs), _PAIRS_PER_TASK)]
            pending = self._ensure_pool().map_async(_grade_pairs_in_child, tasks)
        return PendingGrades(self, answers, ground_truths, pairs, pending)

    def _collect(self, pairs: list[tuple[str, str]], pending) -> dict[tuple[str, str], bool]:
        if pending is not None:
            # Every answer at its deadline, tasks spread over the workers, plus start-up.
            per_worker = math.ceil(len(pairs) / self.workers) + _PAIRS_PER_TASK
            budget = _WORKER_STARTUP_S + per_worker * (ANSWER_TIMEOUT_S + 0.5)
            try:
                grades = [g for chunk in pending.get(budget) for g in chunk]
                return dict(zip(pairs, grades))
            except multiprocessing.TimeoutError:
                logger.warning(
                    "grading pool overran %.0fs; grading %d answers in-process", budget, len(pairs)
                )
                self.close()
        return {pair: _grade_pair(*pair) for pair in pairs}

    def _ensure_pool(self) -> multiprocessing.pool.Pool:
        if self._pool is None:
            self._pool = multiprocessing.get_context("spawn").Pool(
                processes=self.workers, initializer=_warm_up_child
            )
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None

    def __enter__(self) -> GradingPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _safe_extract(response: str) -> str | None:
    try:
        return extract_last_boxed(response)
    except Exception:  # noqa: BLE001 - as in is_correct
        return None


def default_grading_workers() -> int:
    """One per core, at most 8 (a cell of 500 questions x 32 samples has ~10k distinct pairs)."""
    return max(1, min(8, os.cpu_count() or 1))
