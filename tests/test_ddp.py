"""Two-process DDP on CPU (gloo) through Lightning, launched the way users launch it: the contrastive loss sees
the global batch, both ranks end with the same weights."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize(
    "model_args",
    [
        {},
        {"word_weight": 1.0, "word_only_steps": 2},
        {"word_weight": 1.0, "word_only_steps": 2, "grad_cache_chunk_size": 4},
    ],
    # the second: the phase's partial graph must not stall DDP's reducer; the third: nor grad caching's chunks
    # (chunks of 4 and 2), in the word-only phase and after it
    ids=["default", "word_only_steps", "grad_cache"],
)
def test_two_process_ddp_contrastive_loss_sees_global_batch(tmp_path, model_args):
    """... and a validation at step 3 computes the same metrics on both ranks (each gathers the whole evaluation
    set) and logs them without Lightning's sync_dist warning per metric."""
    probe_dir = tmp_path / "probe"
    cfg = _config(tmp_path, "ddp_helpers.GlobalBatchProbe", probe_dir, max_steps=3, **model_args)
    cfg["trainer"].update(limit_val_batches=1, val_check_interval=3)
    stderr = _run_ddp(tmp_path, cfg)
    assert "sync_dist" not in stderr, stderr[-3000:]
    ranks = [json.loads((probe_dir / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rec in ranks:
        assert rec["global_step"] == 3 and len(rec["steps"]) == 3
        for step in rec["steps"]:
            assert step["local"] == 6 and step["global"] == 12
            assert abs(step["mean_loss"] - step["reference"]) < 1e-5
            assert abs(step["local_only"] - step["reference"]) > 1e-4  # a local-only loss would be told apart
    assert ranks[0]["checksum"] == pytest.approx(ranks[1]["checksum"], rel=1e-9, abs=1e-9)
    assert len(ranks[0]["val"]) > 20 and "val/rsum" in ranks[0]["val"]
    assert ranks[0]["val"] == ranks[1]["val"]


@pytest.mark.slow
def test_two_process_ddp_grad_cache_gives_the_global_batchs_gradient(tmp_path):
    """grad_cache_chunk_size=2 on 2 ranks of 6 images (3 chunks each): the first step's all-reduced gradients are
    those of the unchunked DDP step, whose contrastive loss sees all 12 images (the cached gradients come through
    the same gather), on both ranks."""
    flat = {"itm_weight": 0.0, "overrides": {"vision": {"drop_path_rate": 0.0}}}  # no drop-path: same activations
    runs = {}
    for name, extra in (("whole", {}), ("chunked", {"grad_cache_chunk_size": 2})):
        out = tmp_path / name
        _run_ddp(out, _config(out, "ddp_helpers.SaveFirstGrads", out / "grads", max_steps=1, **flat, **extra))
        runs[name] = [torch.load(out / "grads" / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    whole, chunked = runs["whole"], runs["chunked"]
    assert whole[0].keys() == chunked[0].keys() == chunked[1].keys()
    scale = max(g.abs().max().item() for g in whole[0].values())
    for name in whole[0]:
        torch.testing.assert_close(chunked[0][name], whole[0][name], rtol=1e-4, atol=1e-6 * scale)
        torch.testing.assert_close(chunked[1][name], chunked[0][name], rtol=0, atol=0)  # all-reduced: the same


def _config(tmp_path: Path, callback: str, out_dir: Path, max_steps: int, **model_args) -> dict:
    """A 2-process CPU DDP run of the tiny model on the shapes data, batches of 6 per rank."""
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 2,
            "strategy": "ddp",
            "max_steps": max_steps,
            "logger": False,
            "enable_progress_bar": False,
            "enable_checkpointing": False,
            "limit_val_batches": 0,
            "num_sanity_val_steps": 0,
            "default_root_dir": str(tmp_path),
            "callbacks": [{"class_path": callback, "init_args": {"out_dir": str(out_dir)}}],
        },
        "model": {"preset": "mmx_tiny", "itm_weight": 0.0, **model_args},
        "data": {
            "class_path": "mmxattn.data.datamodule.ShapesDataModule",
            "init_args": {
                "train_size": 64,
                "val_size": 8,
                "test_size": 8,
                "batch_size": 6,
                "num_workers": 0,
                "cache_dir": str(tmp_path / "cache"),
            },
        },
    }


def _run_ddp(tmp_path: Path, cfg: dict) -> str:
    """Runs train.py fit on ``cfg`` in 2 processes; its stderr."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "ddp.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests"), "GLOO_SOCKET_IFNAME": "lo", "MASTER_ADDR": "127.0.0.1"}
    cmd = [
        sys.executable,
        str(REPO / "train.py"),
        "fit",
        "--config",
        str(tmp_path / "ddp.yaml"),
        "--test_after_fit=false",
    ]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stderr
