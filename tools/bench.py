"""Benchmarks of our paths against the plain libraries, side by side; one JSON line each.

    python tools/bench.py --shape tiny                      # CPU, every benchmark
    python tools/bench.py --shape 1.5b --only train         # one GPU

Same as ``sept-megatron bench`` (see ``sept_megatron/bench/`` for the flags and formulas).
"""

import sys

from sept_megatron.bench import main
from sept_megatron.bench.options import build_parser  # noqa: F401 (the docs test reads it)

if __name__ == "__main__":
    sys.exit(main())
