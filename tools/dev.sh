#!/usr/bin/env bash
# Fresh-machine entry point: creates .venv (torch 2.13.0 pinned first, so that nothing later
# pulls another torch), installs sept_megatron[test], then runs:
#   bash tools/dev.sh demo [demo flags]   # the embedded SePT demo on this CPU
#   bash tools/dev.sh test [pytest args]  # the test suite
#   bash tools/dev.sh lint                # ruff: lint and format check (CI runs it first)
#   bash tools/dev.sh setup               # only the set-up
# Which torch build: whatever pip's own configuration resolves torch==2.13.0 to (on a default
# Linux pip: PyPI's CUDA build, several GB). For the CPU build there, name PyTorch's CPU index:
#   SEPT_TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu bash tools/dev.sh setup
# No index is used unless asked, so a set-up whose pip already has the CPU wheel stays offline.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SEPT_VENV:-.venv}
PY=${PYTHON:-python3}

setup() {
  local stamp="$VENV/.sept-setup-$(cat setup.py pyproject.toml tools/sglang-cpu-requirements.txt | sha1sum | cut -c1-12)"
  [ -f "$stamp" ] && return 0
  echo "== setting up $VENV (once) =="
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    "$VENV/bin/python" -m pip install -q ${SEPT_TORCH_INDEX_URL:+--index-url "$SEPT_TORCH_INDEX_URL"} \
      "torch==2.13.0"
  fi
  "$VENV/bin/python" -m pip install -q -e ".[test]"
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    # SGLang's CPU-importable parts, so tests/rollout/ checks our SGLang backend against the
    # real package; --no-deps keeps its CUDA kernels and CUDA torch out (on disk: triton
    # 691 MB, sglang 179 MB).
    "$VENV/bin/python" -m pip install -q --no-deps -r tools/sglang-cpu-requirements.txt
  fi
  touch "$stamp"
}

cmd=${1:-test}
shift || true
setup
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore}
case "$cmd" in
  setup) ;;
  demo) exec "$VENV/bin/sept-megatron" demo "$@" ;;
  test) exec "$VENV/bin/python" -m pytest "$@" ;;
  lint) "$VENV/bin/ruff" check . && exec "$VENV/bin/ruff" format --check . ;;
  *) echo "usage: bash tools/dev.sh {demo|test|lint|setup} [args]" >&2; exit 2 ;;
esac
