"""An interrupted run resumes without losing work: SIGKILL mid-epoch, `fit --ckpt_path last`, and the final
weights equal those of an uninterrupted run (CPU, deterministic) within 1e-6."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]


def _config(tmp: Path, name: str, extra_callbacks: list[dict]) -> Path:
    run = tmp / name
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_epochs": 2,
            "deterministic": True,
            "logger": False,
            "enable_progress_bar": False,
            "limit_val_batches": 0,
            "num_sanity_val_steps": 0,
            "default_root_dir": str(run),
            "callbacks": [
                {
                    "class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
                    "init_args": {
                        "dirpath": str(run / "ckpt"),
                        "save_last": True,
                        "save_top_k": 0,
                        "every_n_train_steps": 3,
                    },
                },
                *extra_callbacks,
            ],
        },
        "model": {"preset": "mmx_tiny", "warmup_steps": 2, "lr": 0.002},
        "data": {
            "class_path": "mmxattn.data.datamodule.ShapesDataModule",
            "init_args": {
                "train_size": 32,
                "val_size": 8,
                "test_size": 8,
                "batch_size": 8,
                "num_workers": 0,
                "cache_dir": str(tmp / "cache"),
                "train_captions_per_image": 3,  # as configs/shapes.yaml trains
            },
        },
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _fit(config: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests")}
    cmd = [sys.executable, str(REPO / "train.py"), "fit", "--config", str(config), "--test_after_fit=false", *extra]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path):
    final = {"class_path": "resume_helpers.SaveFinalWeights"}
    log = {"class_path": "resume_helpers.LogBatches"}
    ref_log, cut_log = (
        {**log, "init_args": {"path": str(tmp_path / "ref.txt")}},
        {**log, "init_args": {"path": str(tmp_path / "cut.txt")}},
    )
    ref_cfg = _config(tmp_path, "ref", [ref_log, {**final, "init_args": {"path": str(tmp_path / "ref.pt")}}])
    res = _fit(ref_cfg)
    assert res.returncode == 0, res.stderr[-3000:]

    kill = {"class_path": "resume_helpers.KillAtStep", "init_args": {"step": 5}}
    cut_cfg = _config(tmp_path, "cut", [cut_log, kill, {**final, "init_args": {"path": str(tmp_path / "cut.pt")}}])
    res = _fit(cut_cfg)
    assert res.returncode == -9, f"expected SIGKILL, got {res.returncode}: {res.stderr[-2000:]}"
    last = tmp_path / "cut" / "ckpt" / "last.ckpt"
    assert last.exists() and torch.load(last, weights_only=True)["global_step"] == 3  # mid-epoch 0 (4 steps)
    assert not (tmp_path / "cut.pt").exists()

    resume_cfg = _config(tmp_path, "cut", [cut_log, {**final, "init_args": {"path": str(tmp_path / "cut.pt")}}])
    res = _fit(resume_cfg, "--ckpt_path", "last")
    assert res.returncode == 0, res.stderr[-3000:]
    ref, cut = torch.load(tmp_path / "ref.pt"), torch.load(tmp_path / "cut.pt")
    assert ref.keys() == cut.keys()
    worst = max((ref[k].float() - cut[k].float()).abs().max().item() for k in ref)
    assert worst <= 1e-6, f"resumed weights differ by {worst}"
    # and training did change the weights (the comparison is not between two untouched models)
    init = _untrained_state()
    assert max((ref[k].float() - init[k].float()).abs().max().item() for k in ref if k in init) > 1e-3


@pytest.mark.slow
def test_ctrl_c_and_sigterm_save_last_ckpt_and_the_resumed_run_matches_uninterrupted(tmp_path):
    """A Ctrl-C in the middle of a training step and a SIGTERM (what schedulers send) save last.ckpt at the step
    they stopped, not only at the periodic save (every 3 steps here), exit non-zero, and resume exactly."""
    final = {"class_path": "resume_helpers.SaveFinalWeights"}
    res = _fit(_config(tmp_path, "ref", [{**final, "init_args": {"path": str(tmp_path / "ref.pt")}}]))
    assert res.returncode == 0, res.stderr[-3000:]
    ref = torch.load(tmp_path / "ref.pt")
    for name, signum, after, code, step in (("int", 2, False, 1, 5), ("term", 15, True, 143, 5)):
        sig = {"class_path": "resume_helpers.SignalAtStep", "init_args": {"step": 5, "signum": signum, "after": after}}
        out = {**final, "init_args": {"path": str(tmp_path / f"{name}.pt")}}
        res = _fit(_config(tmp_path, name, [sig, out]))
        assert res.returncode == code, (name, res.returncode, res.stderr[-2000:])
        last = tmp_path / name / "ckpt" / "last.ckpt"
        assert torch.load(last, weights_only=True)["global_step"] == step, name  # the periodic save was at 3
        res = _fit(_config(tmp_path, name, [out]), "--ckpt_path", "last")
        assert res.returncode == 0, res.stderr[-3000:]
        cut = torch.load(tmp_path / f"{name}.pt")
        worst = max((ref[k].float() - cut[k].float()).abs().max().item() for k in ref)
        assert worst <= 1e-6, f"{name}: resumed weights differ by {worst}"


def _untrained_state():
    import pytorch_lightning as pl

    import mmxattn
    from mmxattn.data.datamodule import ShapesDataModule

    pl.seed_everything(0)
    dm = ShapesDataModule(train_size=8, val_size=8, test_size=8, batch_size=8, num_workers=0)
    return mmxattn.create_model("mmx_tiny", vocab_size=dm.vocab_size, context_length=dm.context_length).state_dict()
