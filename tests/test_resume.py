"""An interrupted run resumes without losing work: SIGKILL mid-epoch, `fit --ckpt_path last`, and the final
weights equal those of an uninterrupted run (CPU, deterministic) within 1e-6."""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml
from lit_helpers import data_linked

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


# ---------------------------------------------------------------------------------------- the run's tokenizer


def _word_run(root: Path, rows: list[str], steps: int):
    """A CSV run with tokenizer="word" (the vocabulary is rebuilt from the train file at every start)."""
    from PIL import Image

    from mmxattn.data.datamodule import ImageTextDataModule
    from mmxattn.lit.module import MMXAttnModule

    (root / "imgs").mkdir(parents=True, exist_ok=True)
    for k in range(4):
        Image.new("RGB", (32, 32), (60 * k, 90, 30)).save(root / "imgs" / f"{k}.jpg")
    (root / "train.csv").write_text("filepath,title\n" + "\n".join(rows) + "\n")
    dm = ImageTextDataModule(
        train_path=str(root / "train.csv"),
        image_root=str(root / "imgs"),
        tokenizer="word",
        img_size=32,
        batch_size=4,
        num_workers=0,
        context_length=8,
    )
    mod = MMXAttnModule(preset="mmx_tiny", **data_linked(dm), img_size=32, warmup_steps=1, itm_weight=0.0)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=str(root),
    )
    return trainer, mod, dm


class _RecordIds(pl.Callback):
    """Every training batch's (captions, ids)."""

    def __init__(self) -> None:
        self.seen: list[tuple[list[str], torch.Tensor]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen.append((list(batch["captions"]), batch["ids"].clone()))


def test_resume_after_the_word_vocabulary_changed_goes_on_with_the_checkpoints_tokenizer(tmp_path):
    """A small edit of the train file rebuilds a word vocabulary of the same size in another order: resuming must
    not give every embedding row another word. The checkpoint's tokenizer wins, for the model and the data (its
    batches are tokenized with it), with a warning naming what changed."""
    first = ["0.jpg,red red red circle", "1.jpg,blue circle", "2.jpg,red square", "3.jpg,blue square"]
    trainer, mod, dm = _word_run(tmp_path, first, steps=1)
    trainer.fit(mod, datamodule=dm)
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    saved = torch.load(tmp_path / "a.ckpt", weights_only=True)["mmxattn_tokenizer"]["vocab"]

    edited = ["0.jpg,red circle", "1.jpg,blue blue blue circle", "2.jpg,red square", "3.jpg,blue square"]
    trainer, mod, dm = _word_run(tmp_path, edited, steps=2)
    assert dm.tokenizer.vocab != saved and dm.tokenizer.vocab_size == len(saved)  # what the edit did
    record = _RecordIds()
    trainer.callbacks.append(record)
    with pytest.warns(UserWarning, match=r"a\.ckpt was trained with another tokenizer.*id 4 is 'blue' here, 'red'"):
        trainer.fit(mod, datamodule=dm, ckpt_path=str(tmp_path / "a.ckpt"))
    assert mod.model.tokenizer.vocab == saved and dm.tokenizer.vocab == saved
    assert record.seen, "no training batch after the resume"
    for captions, ids in record.seen:
        assert torch.equal(ids, mod.model.tokenizer(captions, context_length=8))
    # nothing changed: no warning, the data's own tokenizer object stays
    trainer, mod, dm = _word_run(tmp_path / "same", first, steps=2)
    own = dm.tokenizer
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*another tokenizer.*")
        trainer.fit(mod, datamodule=dm, ckpt_path=str(tmp_path / "a.ckpt"))
    assert dm.tokenizer is own and mod.model.tokenizer is own


def test_resume_with_a_data_module_that_cannot_take_the_checkpoints_tokenizer_is_an_error(tmp_path):
    from mmxattn.checkpoint import CheckpointError
    from mmxattn.data.datamodule import ShapesDataModule
    from mmxattn.lit.module import MMXAttnModule

    def run(steps: int):
        dm = ShapesDataModule(
            train_size=8, val_size=8, test_size=8, batch_size=8, num_workers=0, cache_dir=str(tmp_path)
        )
        mod = MMXAttnModule(preset="mmx_tiny", **data_linked(dm), img_size=64, warmup_steps=1, itm_weight=0.0)
        kw = dict(logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
        trainer = pl.Trainer(accelerator="cpu", max_steps=steps, num_sanity_val_steps=0, limit_val_batches=0, **kw)
        return trainer, mod, dm

    trainer, mod, dm = run(1)
    trainer.fit(mod, datamodule=dm)
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    ckpt = torch.load(tmp_path / "a.ckpt", weights_only=True)
    vocab = ckpt["mmxattn_tokenizer"]["vocab"]
    vocab[4], vocab[5] = vocab[5], vocab[4]  # the run was trained with another word order
    torch.save(ckpt, tmp_path / "b.ckpt")
    trainer, mod, dm = run(2)
    with pytest.raises(CheckpointError, match=r"b\.ckpt was trained with another tokenizer.*ShapesDataModule cannot"):
        trainer.fit(mod, datamodule=dm, ckpt_path=str(tmp_path / "b.ckpt"))
