"""Smoke test of benchmarks/vs_coca.py: the script runs end to end at tiny sizes and reports, as its last stdout
line, a JSON object with the ratios the project tracks. No timing is asserted (the CPU is shared); only that every
ratio is a positive finite number and that both models were configured alike."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "vs_coca.py"


@pytest.fixture(scope="module")
def report() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--json", "--repeats", "1", "--warmup", "1", "--threads", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=env,
    )
    assert proc.returncode == 0, f"vs_coca.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    lines = proc.stdout.strip().splitlines()
    assert lines, "vs_coca.py printed nothing"
    return json.loads(lines[-1])


def _positive_finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def test_headline_ratios_are_positive_and_finite(report):
    for key in ("gen_tokens_per_s_ratio", "train_images_per_s_ratio", "train_peak_mem_ratio"):
        assert key in report, f"missing {key}; keys: {sorted(report)}"
        assert _positive_finite(report[key]), f"{key} = {report[key]!r}"


def test_every_generation_setting_is_reported(report):
    gen = report["gen"]
    for strategy in ("greedy", "beam"):
        for b in (1, 2):
            row = gen[f"{strategy}_b{b}"]
            for key in ("ours_tokens_per_s", "coca_tokens_per_s", "ratio"):
                assert _positive_finite(row[key]), f"{strategy}_b{b}.{key} = {row[key]!r}"
            assert row["ratio"] == pytest.approx(row["ours_tokens_per_s"] / row["coca_tokens_per_s"])
    assert report["gen_tokens_per_s_ratio"] == gen[report["gen_headline"]]["ratio"]


def test_memory_counts_at_least_the_parameters(report):
    mem = report["train_peak_mem"]
    for name in ("ours", "coca"):
        # a training step holds parameters, gradients and two AdamW moments: at least 4 x fp32 parameters
        assert mem[f"{name}_bytes"] >= 4 * 4 * report["params"][name]["total"]


def test_peer_is_configured_like_ours(report):
    ours, coca = report["ours_config"], report["coca_config"]
    t, tc, mm = ours["text"], coca["text_cfg"], coca["multimodal_cfg"]
    assert coca["embed_dim"] == ours["embed_dim"]
    assert coca["vision_cfg"]["image_size"] == ours["vision"]["img_size"]
    for k in ("vocab_size", "context_length", "width", "heads"):
        assert tc[k] == t[k] and mm[k] == t[k], k
    assert tc["layers"] == t["layers"] and mm["layers"] == t["decoder_layers"]
    # the ViT is sized to our encoder: parameter counts within 25% at tiny sizes
    p = report["params"]
    assert 0.75 < p["coca"]["vision_trunk"] / p["ours"]["vision_encoder"] < 1.25


@pytest.mark.parametrize("gallery_norm", [False, True])
def test_retrieve_scale_runs_and_both_peers_rank_alike(gallery_norm):
    """benchmarks/retrieve_scale.py at --quick sizes: it refuses to time peers that rank differently, so a report
    means our streamed retrieve equalled the full-matrix top-k both ways (also gallery-normalised); every number it
    reports is a positive finite one."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, str(ROOT / "benchmarks" / "retrieve_scale.py"), "--quick", "--json", "--threads", "1"]
    proc = subprocess.run(
        cmd + (["--gallery-norm"] if gallery_norm else []), capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, f"retrieve_scale.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    rep = json.loads(proc.stdout.strip().splitlines()[-1])
    assert rep["same_results"] is True and rep["gallery_norm"] is gallery_norm
    for key in ("mmxattn_s", "full_matrix_s", "time_ratio", "mmxattn_added_bytes", "full_matrix_added_bytes"):
        assert _positive_finite(rep[key]), (key, rep[key])
