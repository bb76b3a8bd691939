"""An interrupted run resumes without losing work: SIGKILL mid-epoch, `fit --ckpt_path last`, and the final
weights equal those of an uninterrupted run (CPU, deterministic) within 1e-6; with gradient accumulation, a Ctrl-C
or SIGTERM in the middle of a window too (exactly)."""

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
        ckpt = torch.load(last, weights_only=True)
        assert ckpt["global_step"] == step, name  # the periodic save was at 3
        assert "mmxattn_partial_grads" not in ckpt  # no gradient accumulation: nothing to carry over
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


# ---------------------------------------------------------------------------------------- gradient accumulation

ACCUM = 3  # micro-batches per optimizer step; 6 training batches an epoch: windows 0-2 and 3-5


def _accum_fit(
    root: Path,
    *callbacks: pl.Callback,
    ckpt_path: Path | None = None,
    fp16: bool = False,
    module_kw: dict | None = None,
    accumulate: int = ACCUM,
) -> dict[str, torch.Tensor]:
    """One epoch of the tiny model with ``accumulate_grad_batches=accumulate``, last.ckpt saved on an interrupt (as
    train.py does); the final weights (an interrupt's exception goes through). ``fp16``: 16-mixed with its loss
    scaler (the Trainer would turn "16-mixed" into bf16 on the CPU, so the plugin is given)."""
    from pytorch_lightning.plugins.precision import MixedPrecision

    from mmxattn.data.datamodule import ShapesDataModule
    from mmxattn.lit.callbacks import InterruptCheckpoint
    from mmxattn.lit.module import MMXAttnModule

    pl.seed_everything(0)
    dm = ShapesDataModule(
        img_size=32, train_size=24, val_size=4, test_size=4, batch_size=4, num_workers=0, cache_dir=str(root.parent)
    )
    mod = MMXAttnModule(
        preset="mmx_tiny", **data_linked(dm), img_size=32, warmup_steps=1, lr=0.002, **(module_kw or {})
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        accumulate_grad_batches=accumulate,
        deterministic=True,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=str(root),
        callbacks=[InterruptCheckpoint(root / "ckpt"), *callbacks],
        plugins=[MixedPrecision("16-mixed", "cpu")] if fp16 else None,
    )
    trainer.fit(mod, datamodule=dm, ckpt_path=None if ckpt_path is None else str(ckpt_path))
    return {k: v.detach().clone() for k, v in mod.model.state_dict().items()}


@pytest.fixture(scope="module")
def accum_reference(tmp_path_factory) -> tuple[dict[str, torch.Tensor], dict[int, int]]:
    """The uninterrupted run's final weights and each batch's logging step."""
    from resume_helpers import RecordLoggingSteps

    steps = RecordLoggingSteps()
    return _accum_fit(tmp_path_factory.mktemp("accum_ref"), steps), steps.steps


def _interrupt(
    root: Path, where: str, batch: int, fp16: bool = False, module_kw: dict | None = None, accumulate: int = ACCUM
) -> dict:
    """Run until InterruptAt(batch, where) stops it; last.ckpt, loaded."""
    import signal

    from pytorch_lightning.utilities.exceptions import SIGTERMException
    from resume_helpers import InterruptAt

    sigint = signal.getsignal(signal.SIGINT)
    try:  # Lightning exits (SystemExit 1) on a KeyboardInterrupt, and ignores SIGINT from then on
        with pytest.raises(SIGTERMException if where == "sigterm" else SystemExit):
            _accum_fit(root, InterruptAt(batch, where), fp16=fp16, module_kw=module_kw, accumulate=accumulate)
    finally:
        signal.signal(signal.SIGINT, sigint)
    return torch.load(root / "ckpt" / "last.ckpt", weights_only=True)


def _differ(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    assert a.keys() == b.keys()
    return {k: (a[k].float() - b[k].float()).abs().max().item() for k in a if not torch.equal(a[k], b[k])}


@pytest.mark.parametrize(
    "where, batch, mid_window",
    [
        ("on_before_backward", 4, True),  # Ctrl-C in the forward of micro-batch 2 of 3: the step is redone
        ("on_after_backward", 1, True),  # ... right after its backward (its gradient is already in .grad)
        ("on_before_optimizer_step", 2, True),  # ... at the window's last micro-batch, before the optimizer step
        ("sigterm", 3, True),  # SIGTERM: stops after micro-batch 1 of 3
        ("sigterm", 2, False),  # ... after a window's optimizer step
        ("on_before_backward", 3, False),  # Ctrl-C in the forward of a window's first micro-batch
        # a real Ctrl-C inside AdamW's step, the weights updated: held back until the batch is counted (raised at
        # once, the checkpoint said the batch had not run, and the resume stepped its weights a second time)
        ("sigint_in_step", 2, False),
        ("sigint_in_step", 5, False),
    ],
)
def test_interrupted_run_with_gradient_accumulation_resumes_exactly(
    tmp_path, accum_reference, where, batch, mid_window
):
    """An interrupt in the middle of an accumulation window: the resumed run's first optimizer step sums the same
    micro-batch gradients as the uninterrupted run's (those accumulated before the interrupt are in last.ckpt),
    so the final weights are equal, and its metrics are logged at the uninterrupted run's steps (a Ctrl-C at a
    window's last micro-batch made Lightning's restart count that batch twice)."""
    from resume_helpers import RecordLoggingSteps

    reference, reference_steps = accum_reference
    ckpt = _interrupt(tmp_path, where, batch)
    after_the_batch = where in ("sigterm", "sigint_in_step")
    assert ckpt["global_step"] == (batch + after_the_batch) // ACCUM  # where the run stopped
    steps = RecordLoggingSteps()
    resumed = _accum_fit(tmp_path, steps, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert steps.steps == {b: s for b, s in reference_steps.items() if b >= batch + after_the_batch}
    differ = _differ(reference, resumed)
    assert not differ, f"{where} at batch {batch}: {len(differ)} tensors differ, by up to {max(differ.values())}"
    # gradients are saved only when the window is unfinished (nothing at a window's start, nor without accumulation)
    assert ("mmxattn_partial_grads" in ckpt) == mid_window
    if where == "on_before_backward" and mid_window:
        # a checkpoint written before the partial gradients were saved (no key) still resumes, as it always did:
        # the window's earlier micro-batches are lost, so the weights differ (what the saved gradients prevent)
        del ckpt["mmxattn_partial_grads"]
        torch.save(ckpt, tmp_path / "old.ckpt")
        with pytest.warns(UserWarning, match="resumed at batch 4, in the middle of an accumulation window of 3"):
            old = _accum_fit(tmp_path, ckpt_path=tmp_path / "old.ckpt")
        assert max(_differ(reference, old).values()) > 1e-4


@pytest.mark.parametrize("batch", [0, 3])
def test_a_run_resumed_from_a_ctrl_c_inside_a_step_logs_at_the_uninterrupted_runs_steps(tmp_path, batch):
    """Without accumulation, a Ctrl-C in a training step's forward: the resumed run redoes the batch and logs every
    batch at the step the uninterrupted run logged it at (Lightning's restart counted the redone batch as done: the
    whole rest of the run was logged one step later, the first step at 1), and ends with the same weights."""
    from resume_helpers import RecordLoggingSteps

    ref_steps = RecordLoggingSteps()
    reference = _accum_fit(tmp_path / "ref", ref_steps, accumulate=1)
    assert list(ref_steps.steps.values()) == list(range(6))
    ckpt = _interrupt(tmp_path / "run", "on_before_backward", batch, accumulate=1)
    assert ckpt["global_step"] == batch
    steps = RecordLoggingSteps()
    resumed = _accum_fit(tmp_path / "run", steps, ckpt_path=tmp_path / "run" / "ckpt" / "last.ckpt", accumulate=1)
    assert steps.steps == {b: s for b, s in ref_steps.steps.items() if b >= batch}
    assert not _differ(reference, resumed)


# micro-batch 2 of a window, its first (grad caching zeroes .grad itself there), its last (optimizer step follows)
@pytest.mark.parametrize("batch, mid_window", [(4, True), (3, True), (5, False)])
def test_ctrl_c_between_grad_cache_chunks_waits_for_the_batch_and_resumes_exactly(tmp_path, batch, mid_window):
    """Gradient caching (chunks of 2 of the 4 images): a real Ctrl-C in the second chunk's forward, the first
    chunk's gradients already in .grad. It is held back until the batch is counted, so the checkpoint holds the
    window's gradients with the whole batch in them (or none at a window's end) and the resumed run's weights are
    the uninterrupted run's (raised at once, the batch's partial sum was lost with the window's earlier ones)."""
    kw = {"grad_cache_chunk_size": 2}
    reference = _accum_fit(tmp_path / "ref", module_kw=kw)
    ckpt = _interrupt(tmp_path / "run", "sigint_in_chunk", batch, module_kw=kw)
    assert ckpt["global_step"] == (batch + 1) // ACCUM  # stopped once the batch was done
    assert ("mmxattn_partial_grads" in ckpt) == mid_window
    resumed = _accum_fit(tmp_path / "run", ckpt_path=tmp_path / "run" / "ckpt" / "last.ckpt", module_kw=kw)
    differ = _differ(reference, resumed)
    assert not differ, f"batch {batch}: {len(differ)} tensors differ, by up to {max(differ.values())}"


def test_16_mixed_interrupt_mid_window_resumes_exactly_with_the_scaled_gradients(tmp_path):
    """16-mixed (its loss scaler, here on the CPU): the saved gradients are those of the scaled loss, and the
    checkpoint's GradScaler state gives the resumed micro-batches the same scale, so they add up as in the
    uninterrupted run. Once the window's optimizer step has begun the scaler has unscaled them: they are not
    saved (with a warning) and the resume goes on as it always did."""
    reference = _accum_fit(tmp_path / "ref", fp16=True)
    ckpt = _interrupt(tmp_path / "cut", "on_after_backward", 4, fp16=True)
    saved = ckpt["mmxattn_partial_grads"]
    assert saved["restore"] == "after_backward" and saved["loss_scale"] == ckpt["MixedPrecision"]["scale"] > 1
    resumed = _accum_fit(tmp_path / "cut", ckpt_path=tmp_path / "cut" / "ckpt" / "last.ckpt", fp16=True)
    differ = _differ(reference, resumed)
    assert not differ, f"{len(differ)} tensors differ, by up to {max(differ.values())}"
    with pytest.warns(UserWarning, match="written during an optimizer step"):
        ckpt = _interrupt(tmp_path / "step", "on_before_optimizer_step", 5, fp16=True)
    assert "mmxattn_partial_grads" not in ckpt


def test_a_second_ctrl_c_during_the_optimizer_step_stops_at_once(tmp_path):
    """The held-back Ctrl-C can be overridden: a second one inside the step raises there (the step is not
    counted, as before the deferral existed), and the default SIGINT handler is back afterwards."""
    import signal

    ckpt = _interrupt(tmp_path, "2sigint_in_step", 2)
    assert ckpt["global_step"] == 0  # stopped inside the first window's optimizer step
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_sigint_deferral_holds_one_ctrl_c_and_gives_the_handler_back():
    import os
    import pickle
    import signal

    from mmxattn.lit.sigint import SigintDeferral

    d = SigintDeferral()
    d.start(lambda: True)
    os.kill(os.getpid(), signal.SIGINT)  # held back, not raised
    assert d.pending and d.active
    assert d.stop() is True and not d.active
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert d.stop() is False  # consumed
    # a handler left installed when the run is no longer training (an exception skipped stop) acts as the default
    d.start(lambda: False)
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
    assert not d.active and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    # someone else's handler is left alone
    seen = []
    previous = signal.signal(signal.SIGINT, lambda *a: seen.append(1))
    try:
        d.start(lambda: True)
        assert not d.active
        os.kill(os.getpid(), signal.SIGINT)
        assert seen == [1] and d.stop() is False
    finally:
        signal.signal(signal.SIGINT, previous)
    # a pickled module (ddp_spawn) carries no handler state
    d.start(lambda: True)
    try:
        copy = pickle.loads(pickle.dumps(d))
        assert not copy.active and not copy.pending
    finally:
        d.stop()
