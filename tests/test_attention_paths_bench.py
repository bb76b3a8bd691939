"""Smoke test of benchmarks/attention_paths.py: both modes run on the quick shapes, every timing is a positive
finite number, the ratio is eager / SDPA, and the reported path is the one the attention primitive's rule picks
(small text: the eager math; 256 keys: SDPA). No timing is asserted."""

import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import attention_paths  # noqa: E402


def test_quick_run_reports_both_paths_and_the_rules_pick():
    report = attention_paths.main(
        ["--quick", "--repeats", "1", "--warmup", "0", "--threads", str(torch.get_num_threads())]
    )
    rows = {(r["mode"], r["shape"]): r for r in report["rows"]}
    assert set(rows) == {(m, s) for m in ("train", "infer") for s in attention_paths.QUICK}
    for r in rows.values():
        for key in ("sdpa_ms", "eager_ms"):
            assert math.isfinite(r[key]) and r[key] > 0
        assert r["eager_over_sdpa"] == r["eager_ms"] / r["sdpa_ms"]
    for mode in ("train", "infer"):
        assert rows[(mode, "shapes causal text, 192 x 23")]["rule_picks"] == "eager"
        assert rows[(mode, "causal 8 x 256")]["rule_picks"] == "sdpa"  # 256 keys
