"""GPU check (`make gpu-check`): the real trainer, launched with torchrun, at neo_2b widths in bf16
on CUDA GPUs. Every test here is marked ``gpu``; tests/conftest.py skips them, with the reason,
where they cannot or should not run."""
