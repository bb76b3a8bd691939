"""Gradient caching (``MMXAttnModule(grad_cache_chunk_size=C)``, mmxattn/lit/gradcache.py): a batch trained C images
at a time has the gradient of the whole batch's losses, its contrastive loss included."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from lit_helpers import data_linked

from mmxattn.data.datamodule import ShapesDataModule
from mmxattn.lit.gradcache import split_batch
from mmxattn.lit.module import MMXAttnModule


class _Grads(pl.Callback):
    """Every optimizer step's gradients, by parameter name."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.steps.append({n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None})


def _fit(
    tmp: Path,
    chunk: int | None,
    steps: int = 1,
    accumulate: int = 1,
    drop_path: float = 0.0,
    data_kw: dict | None = None,
    patch=None,
    trainer_kw: dict | None = None,
    **module_kw,
) -> tuple[_Grads, MMXAttnModule]:
    pl.seed_everything(0)
    sizes = {"train_size": 32, "val_size": 8, "test_size": 8, "batch_size": 8, **(data_kw or {})}
    dm = ShapesDataModule(num_workers=0, cache_dir=str(tmp), **sizes)
    mod = MMXAttnModule(
        preset="mmx_tiny",
        **data_linked(dm),
        img_size=64,
        warmup_steps=2,
        grad_cache_chunk_size=chunk,
        overrides={"vision": {"drop_path_rate": drop_path}},
        **module_kw,
    )
    if patch is not None:
        patch(mod)
    grads = _Grads()
    trainer = pl.Trainer(
        max_steps=steps,
        accumulate_grad_batches=accumulate,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        enable_model_summary=False,
        default_root_dir=tmp,
        callbacks=[grads],
        **{"accelerator": "cpu", **(trainer_kw or {})},
    )
    trainer.fit(mod, datamodule=dm)
    return grads, mod


def _assert_same_grads(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    scale = max(g.abs().max().item() for g in a.values())
    for name in a:  # some gradients are ~1e-9 (a bias that softmax nearly ignores): measured on the whole's scale
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6 * scale)


@pytest.mark.parametrize(
    "case",
    [
        {},
        {"accumulate": 2},  # a window of two batches: .grad summed across both (zeroed once, before the first)
        {"data_kw": {"train_captions_per_image": 3}},  # 8 images, 24 captions: each chunk takes its images' captions
    ],
    ids=["plain", "accumulate", "captions_per_image"],
)
def test_chunks_give_the_whole_batchs_gradient(case, tmp_path):
    """Chunks of 3, 3 and 2 images against the batch of 8 in one piece: every gradient (the contrastive loss's over
    all 8 images included) is the same, and nothing but the chunking differs between the two runs."""
    whole, _ = _fit(tmp_path / "whole", None, itm_weight=0.0, **case)
    chunked, _ = _fit(tmp_path / "chunked", 3, itm_weight=0.0, **case)
    # one optimizer step: from the second on, gradients near zero (~1e-9, rounding apart) have stepped weights by
    # AdamW's lr * sign, differently in the two runs
    assert len(whole.steps) == len(chunked.steps) == 1
    _assert_same_grads(whole.steps[0], chunked.steps[0])


def test_chunks_under_a_loss_scaler_give_the_whole_batchs_unscaled_gradient(tmp_path):
    """16-mixed with its GradScaler (given as a plugin: the Trainer would pick bf16 on the CPU): every chunk's
    backward is scaled as Lightning scales the last one's, so the unscaled gradients at the optimizer step are the
    whole batch's, to half-precision rounding (a chunk left unscaled would be off by the scale, 1024)."""
    from pytorch_lightning.plugins.precision import MixedPrecision

    def fit(name: str, chunk: int | None) -> dict[str, torch.Tensor]:
        # a scale the tiny model's first gradients do not overflow at (65536 does, whole or chunked: step skipped)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        kw = {"trainer_kw": {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=scaler)]}, "itm_weight": 0.0}
        return _fit(tmp_path / name, chunk, **kw)[0].steps[0]

    whole, chunked = fit("whole", None), fit("chunked", 3)
    assert whole.keys() == chunked.keys()
    flat_a = torch.cat([whole[n].float().flatten() for n in whole])
    flat_b = torch.cat([chunked[n].float().flatten() for n in whole])
    assert torch.isfinite(flat_b).all()
    assert (flat_a - flat_b).norm() <= 0.02 * flat_a.norm()


def test_the_first_pass_and_the_graph_pass_draw_the_same_drop_path_masks(tmp_path):
    """With drop-path on, the embeddings whose contrastive gradient is cached are those the graph pass computes again
    (each chunk's random stream is entered from its start in both passes): otherwise the cached gradient belongs to
    other activations."""
    first, graph = [], []

    def patch(mod: MMXAttnModule) -> None:
        embed, forward = mod.model.training_embeddings, mod._train_forward

        def recorded_embed(*a, **k):
            first.append(embed(*a, **k))
            return first[-1]

        def recorded_forward(*a, **k):
            out = forward(*a, **k)
            graph.append((out.image_embeds.detach(), out.text_embeds.detach()))
            return out

        mod.model.training_embeddings, mod._train_forward = recorded_embed, recorded_forward

    _fit(tmp_path, 3, drop_path=0.5, itm_weight=0.0, patch=patch)
    assert len(first) == len(graph) == 3
    for (i1, t1), (i2, t2) in zip(first, graph):
        torch.testing.assert_close(i2, i1, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(t2, t1, rtol=1e-5, atol=1e-6)
    # and drop-path did draw: the same images embed differently in another draw
    assert not torch.allclose(first[0][0], first[1][0][: first[0][0].shape[0]])


def test_each_chunk_draws_from_its_own_random_stream(tmp_path, monkeypatch):
    """Replaying a chunk's masks must not make its later draws (the ITM term's hard-negative sampling) reuse random
    numbers another chunk drew from, nor those of another chunk's masks: every draw point sees another state."""
    import mmxattn.lit.module as module

    states = {"towers": [], "itm": []}
    sampler = module.sample_hard_negatives

    def recorded_sampler(*a, **k):
        states["itm"].append(torch.get_rng_state())
        return sampler(*a, **k)

    def patch(mod: MMXAttnModule) -> None:
        embed = mod.model.training_embeddings

        def recorded_embed(*a, **k):
            states["towers"].append(torch.get_rng_state())
            return embed(*a, **k)

        mod.model.training_embeddings = recorded_embed

    monkeypatch.setattr(module, "sample_hard_negatives", recorded_sampler)
    _fit(tmp_path, 3, drop_path=0.3, itm_weight=0.5, patch=patch)
    assert len(states["towers"]) == len(states["itm"]) == 3
    seen = [s for s in states["towers"] + states["itm"]]
    assert all(not torch.equal(a, b) for i, a in enumerate(seen) for b in seen[i + 1 :])


def test_batchnorm_statistics_move_once_per_chunk_and_the_user_is_told(tmp_path):
    """An encoder with BatchNorm (a timm ResNet backend): warned that each chunk is normalised on its own; the
    graph-free pass leaves the running statistics alone, so they move once per chunk (as with accumulation)."""
    kw = {"itm_weight": 0.0, "overrides": {"vision_backend": "timm:resnet10t", "vision_pretrained": None}}
    dm = ShapesDataModule(train_size=32, val_size=8, test_size=8, batch_size=8, num_workers=0, cache_dir=str(tmp_path))
    with pytest.warns(UserWarning, match="BatchNorm layers in the model"):
        mod = MMXAttnModule(preset="mmx_tiny", grad_cache_chunk_size=3, **data_linked(dm), img_size=64, **kw)
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, limit_val_batches=0, enable_model_summary=False,
                         default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(mod, datamodule=dm)
    counts = {int(b) for n, b in mod.model.named_buffers() if n.endswith("num_batches_tracked")}
    assert counts == {3}  # three chunks of one batch (the graph-free pass would have made it 6)


def test_one_image_chunks_cannot_train_the_matching_head():
    with pytest.raises(ValueError, match="a chunk of one image has none"):
        MMXAttnModule(preset="mmx_tiny", vocab_size=64, pad_id=0, bos_id=1, eos_id=2, context_length=16,
                      itm_weight=0.5, grad_cache_chunk_size=1)  # fmt: skip
    MMXAttnModule(preset="mmx_tiny", vocab_size=64, pad_id=0, bos_id=1, eos_id=2, context_length=16,
                  itm_weight=0.0, grad_cache_chunk_size=1)  # fmt: skip


def test_the_matching_term_is_the_mean_over_chunks_that_have_negatives(tmp_path, monkeypatch):
    """Batches of 8 in chunks of 3, 3, 2 and (batch 7) 3, 3, 1: the one-image chunk has no negatives (its ITM term
    is 0) and is left out of the term's average instead of diluting it."""
    import mmxattn.lit.module as module

    seen = []
    real = MMXAttnModule._itm

    def recorded(self, *a, **k):
        seen.append(real(self, *a, **k).detach())
        return seen[-1]

    monkeypatch.setattr(module.MMXAttnModule, "_itm", recorded)
    _, mod = _fit(tmp_path, 3, itm_weight=0.5, data_kw={"batch_size": 7})
    ones = mod.trainer.callback_metrics["train/itm"]
    per_chunk = seen[:3]  # the first batch's chunks: 3, 3 and 1 images
    assert float(per_chunk[2]) == 0.0 and float(per_chunk[0]) > 0
    torch.testing.assert_close(ones, (per_chunk[0] + per_chunk[1]) / 2)


def test_every_loss_trains_in_chunks_and_logs_the_whole_batchs_terms(tmp_path):
    """ITM (hard negatives within each chunk) and the word head train too; the logged terms are the batch's."""
    grads, mod = _fit(tmp_path, 3, steps=2, itm_weight=0.5, word_weight=0.5)
    assert len(grads.steps) == 2
    assert all(torch.isfinite(g).all() for g in grads.steps[-1].values())
    assert any("itm_head" in n for n in grads.steps[-1]) and any("word_head" in n for n in grads.steps[-1])
    logged = mod.trainer.callback_metrics
    assert {"train/contrastive", "train/caption", "train/itm", "train/word"} <= logged.keys()
    assert all(torch.isfinite(logged[k]) for k in logged if k.startswith("train/"))


def test_a_nonfinite_chunk_in_the_middle_of_a_window_is_skipped_without_touching_the_windows_gradients(tmp_path):
    """nonfinite="skip", two batches per window: a NaN in the second chunk of the window's second batch, after the
    first chunk's backward. The step gets the first batch's gradients alone, as if the second had been skipped
    before any backward (its chunks' partial sum is undone)."""

    def poison(where: int):
        def patch(mod: MMXAttnModule) -> None:
            real, calls = mod.compute_losses, {"n": 0}

            def compute_losses(batch, contrastive=True):
                calls["n"] += 1  # 3 chunks per batch: calls 4-6 are the second batch's
                loss, terms, out = real(batch, contrastive=contrastive)
                return (loss * float("nan") if calls["n"] == where else loss), terms, out

            mod.compute_losses = compute_losses

        return patch

    late, _ = _fit(tmp_path / "late", 3, accumulate=2, itm_weight=0.0, nonfinite="skip", patch=poison(5))
    early, _ = _fit(tmp_path / "early", 3, accumulate=2, itm_weight=0.0, nonfinite="skip", patch=poison(4))
    assert len(late.steps) == len(early.steps) == 1
    _assert_same_grads(early.steps[0], late.steps[0])


def test_a_nonfinite_stop_in_the_middle_of_a_window_saves_the_windows_gradients_so_far(tmp_path):
    """nonfinite="stop", two batches per window, a NaN in the second chunk of the second batch (after the first
    chunk's backward): the last-good checkpoint holds the first batch's gradients for a resume, as unchunked."""
    from mmxattn.lit.module import NonFiniteLossError

    def poison(mod: MMXAttnModule) -> None:
        real, calls = mod.compute_losses, {"n": 0}

        def compute_losses(batch, contrastive=True):
            calls["n"] += 1  # whole batches: call 2 is the second batch; chunks of 3: call 5 its second chunk
            loss, terms, out = real(batch, contrastive=contrastive)
            return (loss * float("nan") if calls["n"] == (2 if contrastive else 5) else loss), terms, out

        mod.compute_losses = compute_losses

    saved = {}
    for name, chunk in (("whole", None), ("chunked", 3)):
        with pytest.raises(NonFiniteLossError):
            _fit(tmp_path / name, chunk, accumulate=2, itm_weight=0.0, patch=poison)
        ckpt = torch.load(tmp_path / name / "nonfinite-last-good.ckpt", weights_only=True)
        saved[name] = ckpt["mmxattn_partial_grads"]["grads"]
    _assert_same_grads(saved["whole"], saved["chunked"])


def test_split_batch_keeps_every_caption_with_its_image():
    images = torch.randn(5, 3, 8, 8)
    tii = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4])
    ids = torch.arange(8)[:, None].repeat(1, 4)
    chunks = split_batch({"images": images, "ids": ids, "text_image_index": tii, "pos_ids": tii * 10}, 2)
    assert [(c.start, c.stop) for c in chunks] == [(0, 2), (2, 4), (4, 5)]
    assert [c.rows.tolist() for c in chunks] == [[0, 1, 2], [3, 4, 5, 6], [7]]
    assert chunks[1].batch["text_image_index"].tolist() == [0, 0, 0, 1]
    assert chunks[1].batch["pos_ids"].tolist() == [20, 20, 20, 30]
    assert torch.equal(chunks[1].batch["images"], images[2:4]) and torch.equal(chunks[1].batch["ids"], ids[3:7])
    with pytest.raises(ValueError, match="5 images, 8 token rows"):
        split_batch({"images": images, "ids": ids}, 2)
    with pytest.raises(ValueError, match="must index the 5 images"):  # caption 7 would be in no chunk
        split_batch({"images": images, "ids": ids, "text_image_index": torch.tensor([0, 0, 1, 2, 2, 2, 3, 5])}, 2)
    with pytest.raises(ValueError, match=r"shape \(8,\)"):
        split_batch({"images": images, "ids": ids, "text_image_index": tii[:5]}, 2)


@pytest.mark.parametrize("bad", [0, -2, 2.5, True, "4"])
def test_bad_chunk_sizes_are_refused_when_the_module_is_built(bad):
    with pytest.raises(ValueError, match="grad_cache_chunk_size must be an int >= 1"):
        MMXAttnModule(preset="mmx_tiny", vocab_size=64, pad_id=0, bos_id=1, eos_id=2, context_length=16,
                      grad_cache_chunk_size=bad)  # fmt: skip


def test_grad_cache_is_refused_with_a_strategy_that_syncs_in_every_backward():
    from pytorch_lightning.strategies import FSDPStrategy

    mod = MMXAttnModule(preset="mmx_tiny", vocab_size=64, pad_id=0, bos_id=1, eos_id=2, context_length=16,
                        grad_cache_chunk_size=4)  # fmt: skip
    mod._trainer = SimpleNamespace(strategy=FSDPStrategy(), world_size=2, datamodule=None)  # what setup reads
    with pytest.raises(ValueError, match="grad_cache_chunk_size=4 works with one device or DDP; FSDPStrategy"):
        mod.setup("fit")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_chunks_give_the_whole_batchs_gradient_under_mixed_precision_on_a_gpu(precision, tmp_path):
    """On a GPU under autocast (16-mixed: every chunk's backward scaled by the GradScaler, as Lightning scales the
    last): the chunked step's unscaled gradients are the whole batch's, to half-precision rounding."""
    kw = {"trainer_kw": {"accelerator": "gpu", "devices": 1, "precision": precision}, "itm_weight": 0.0}
    whole, _ = _fit(tmp_path / "whole", None, **kw)
    chunked, _ = _fit(tmp_path / "chunked", 3, **kw)
    a, b = whole.steps[0], chunked.steps[0]
    assert a.keys() == b.keys()
    flat_a = torch.cat([a[n].float().flatten() for n in a])
    flat_b = torch.cat([b[n].float().flatten() for n in a])
    assert torch.isfinite(flat_b).all()
    assert (flat_a - flat_b).norm() <= 0.02 * flat_a.norm()  # half-precision towers: relative to the whole step


def test_the_cli_takes_the_chunk_size(tmp_path, monkeypatch):
    """``--model.grad_cache_chunk_size 2`` on the fine-tuning config (batches of 4 from a CSV data set): the steps
    run in chunks (the graph-free first pass runs per chunk) and the run finishes."""
    from lit_helpers import make_csv, smoke_args

    from mmxattn.lit.cli import main as cli_main
    from mmxattn.model import MMXAttn

    monkeypatch.chdir(tmp_path)
    calls = []
    real = MMXAttn.training_embeddings

    def counted(self, images, token_ids):
        calls.append(images.shape[0])
        return real(self, images, token_ids)

    monkeypatch.setattr(MMXAttn, "training_embeddings", counted)
    args = smoke_args("finetune_csv.yaml", tmp_path, make_csv(tmp_path / "csv"), overlays=())
    cli = cli_main([*args, "--model.grad_cache_chunk_size=2", "--model.freeze_encoder_steps=0"])
    assert cli.trainer.state.finished and cli.trainer.global_step == 2
    assert cli.model.hparams.grad_cache_chunk_size == 2
    assert calls == [2, 2, 2, 2]  # two training batches of 4 images, two chunks each


def test_the_train_memory_benchmark_runs_the_grad_cache_setting():
    """benchmarks/train_memory.py's grad_cache row at its --quick sizes (batch 4: chunks of 2, the ITM term's
    smallest): it runs a step through training_step and reports a speed. No timing is asserted."""
    import sys

    bench = str(Path(__file__).resolve().parents[1] / "benchmarks")
    sys.path.insert(0, bench)
    try:
        import train_memory
    finally:
        sys.path.remove(bench)
    out = train_memory.main(["--quick", "--settings", "fp32,grad_cache", "--no-memory", "--repeats", "1"])
    assert out["grad_cache_chunk"] == 2 and out["settings"]["grad_cache"]["images_per_s"] > 0
