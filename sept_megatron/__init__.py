"""sept_megatron: reward-free self-training (SePT) on a Megatron-Core trainer."""

__version__ = "0.1.0"
