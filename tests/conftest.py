"""Test-suite-wide rules. One: when tests marked ``gpu`` run.

``gpu`` tests launch real training on CUDA GPUs for minutes (``make gpu-check``, which selects them
with ``-m gpu``). Everywhere else each one is reported as SKIPPED with its reason (``-rs``/``-ra``
prints it); nothing here ever lets a test pass without running:
  - no CUDA:            "torch.cuda.is_available() is False ..." (unless NEO_GPU_CHECK_CPU=1, which
                        asks for the tiny CPU version of the same tests);
  - not asked for:      a run whose ``-m`` expression does not name ``gpu`` (plain ``make test``),
                        so a GPU node running the ordinary suite does not spend minutes on them.
"""

from __future__ import annotations

import os

import pytest

CPU_MODE_VAR = "NEO_GPU_CHECK_CPU"  # =1: run the gpu tests at tiny sizes without CUDA (tests/gpu/sizes.py)


def gpu_skip_reason(config: pytest.Config) -> str | None:
    """Why the ``gpu`` tests of this session do not run, or None when they do."""
    if os.environ.get(CPU_MODE_VAR) != "1":
        import torch

        if not torch.cuda.is_available():
            return (f"torch.cuda.is_available() is False: run `make gpu-check` on a GPU node "
                    f"({CPU_MODE_VAR}=1 runs the tiny CPU version)")
    if "gpu" not in (config.option.markexpr or ""):  # ("not gpu" deselects them before this matters)
        return "gpu tests run only when selected: `make gpu-check` (pytest -m gpu)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    reason = gpu_skip_reason(config)
    if reason is not None:
        for item in gpu_items:
            item.add_marker(pytest.mark.skip(reason=reason))
