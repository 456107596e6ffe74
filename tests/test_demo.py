"""`make demo` in reduced form (--quick: the same path with a fraction of the data and steps),
so CI keeps the whole pipeline alive: data_prep -> stage 0 -> Qwen3 export -> stages 1-3 at
TP/PP 2 -> NEO HF export -> evaluation -> summary."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path):
    demo_dir = tmp_path / "demo"
    out = subprocess.run([sys.executable, "-m", "pretrain.demo", "--quick", "--dir", str(demo_dir)],
                         capture_output=True, text=True, timeout=1500)
    assert out.returncode == 0, (out.stdout + out.stderr)[-6000:]
    summary = json.loads((demo_dir / "summary.json").read_text())
    assert set(summary["final_loss"]) == {"stage0_text", "stage1_prebuffer", "stage2_midtrain", "stage3_sft"}
    assert all(isinstance(v, float) for v in summary["final_loss"].values())
    for qa_type in ("color", "shape", "all"):
        row = summary["eval"][qa_type]
        assert row["n"] > 0 and 0.0 <= row["accuracy"] <= 1.0 and 0.0 < row["chance"] <= 1.0
    assert (demo_dir / "neo-hf" / "config.json").is_file()
    assert json.loads((demo_dir / "qwen3-pretrained" / "config.json").read_text())["model_type"] == "qwen3"
    assert "NEO demo summary" in out.stdout
    # SFT and the held-out questions go without " Answer with one word." (pretrain/demo.py DATA)
    hints = {name: json.loads((demo_dir / "data" / name / "manifest.json").read_text())["build"]["generator"]
             ["answer_hint"] for name in ("pretrain", "sft", "heldout")}
    assert hints == {"pretrain": True, "sft": False, "heldout": False}
