"""``python -m sept_megatron.bench``: the bench (and its torchrun sync workers)."""

import sys

from sept_megatron.bench.driver import main

sys.exit(main())
