"""sept_megatron: reward-free LLM self-training (SePT) on Megatron-Core + SGLang.

CPU machines: install torch's CPU build first (``pip install torch==2.13.0 --index-url
https://download.pytorch.org/whl/cpu``, unless pip is already set up for it): PyPI's Linux torch
is the multi-GB CUDA build. megatron-core newer than 0.16.x needs Python 3.12.
"""

from setuptools import find_packages, setup

setup(
    name="sept_megatron",
    version="0.1.0",
    description="Self-evolving Post-Training (SePT) on a Megatron-Core trainer with an SGLang rollout engine",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    # 3.11: what the suite runs on; transformers 5.23, numpy 2.4 and pandas 3 need it too.
    python_requires=">=3.11",
    packages=find_packages(include=["sept_megatron", "sept_megatron.*"]),
    install_requires=[
        "torch>=2.6",
        # The CPU compatibility layer is tested with 0.16.x; newer releases need Python >= 3.12.
        "megatron-core==0.16.1; python_version<'3.12'",
        "megatron-core>=0.16.1,<0.20; python_version>='3.12'",
        # 5.23.0 on CPU (pip takes the newest allowed); the [gpu] extra's sglang 0.5.21 pins
        # transformers 5.12.1, sentencepiece 0.2.1 and tokenizers 0.22.2, which our code and
        # tests also pass with (README, "SGLang rollout": the chosen versions).
        "transformers>=5.12.1,<=5.23.0",
        "safetensors==0.8.0",
        "math-verify==0.9.0",
        "sentencepiece>=0.2.1,<=0.2.3",
        "numpy>=1.26",
        "pyarrow>=15",
        "pandas>=2.2",
        "pyyaml>=6.0",
        "tqdm>=4.66",
        "rich>=13",
        "wandb==0.31.0",
        "matplotlib>=3.8",
        "psutil>=5.9",  # dist_checkpointing's async writer imports it
    ],
    extras_require={
        # datasets: the HF-datasets-dir loader test; accelerate: transformers' FP8 loader
        # (loading an exported FP8 checkpoint on CPU, tests/convert/test_fp8_export.py).
        # ruff: the lint and format check CI runs before the tests (pyproject.toml [tool.ruff]).
        "test": ["pytest==9.2.0", "datasets>=3.0", "accelerate==1.15.0", "ruff==0.17.6"],
        # GPU only: import lazily, never required on CPU. (Never the PyPI package "apex".)
        # TE: the range megatron-core 0.16.1 declares; its torch extension must be built
        # against the installed torch (README: GPU install, --no-build-isolation).
        "gpu": ["transformer-engine[pytorch]>=2.9.0a0,<2.12.0", "sglang==0.5.21"],
    },
    entry_points={"console_scripts": ["sept-megatron=sept_megatron.cli:main"]},
)
