"""Two-process DDP on CPU (gloo) through Lightning, launched the way users launch it: the contrastive loss sees
the global batch, both ranks end with the same weights."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize(
    "model_args",
    [{}, {"word_weight": 1.0, "word_only_steps": 2}],
    ids=["default", "word_only_steps"],  # the second: the phase's partial graph must not stall DDP's reducer
)
def test_two_process_ddp_contrastive_loss_sees_global_batch(tmp_path, model_args):
    probe_dir = tmp_path / "probe"
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 2,
            "strategy": "ddp",
            "max_steps": 3,
            "logger": False,
            "enable_progress_bar": False,
            "enable_checkpointing": False,
            "limit_val_batches": 0,
            "num_sanity_val_steps": 0,
            "default_root_dir": str(tmp_path),
            "callbacks": [{"class_path": "ddp_helpers.GlobalBatchProbe", "init_args": {"out_dir": str(probe_dir)}}],
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
    ranks = [json.loads((probe_dir / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rec in ranks:
        assert rec["global_step"] == 3 and len(rec["steps"]) == 3
        for step in rec["steps"]:
            assert step["local"] == 6 and step["global"] == 12
            assert abs(step["mean_loss"] - step["reference"]) < 1e-5
            assert abs(step["local_only"] - step["reference"]) > 1e-4  # a local-only loss would be told apart
    assert ranks[0]["checksum"] == pytest.approx(ranks[1]["checksum"], rel=1e-9, abs=1e-9)
