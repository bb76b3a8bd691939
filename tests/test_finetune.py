"""Fine-tuning controls of MMXAttnModule: fine-tuning from a pretrained encoder file on a CSV of JPEGs, encoder
freezing (with resume mid-freeze), layer-wise LR decay, per-component learning rates, EMA weights in checkpoints,
gradient checkpointing, torch.compile and mixed precision."""

from __future__ import annotations

import copy
import csv
import json
import math
import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from lit_helpers import data_linked, make_csv, smoke_args
from safetensors.torch import save_file

import mmxattn
from mmxattn.data.datamodule import ShapesDataModule
from mmxattn.lit.cli import main as cli_main
from mmxattn.lit.module import MMXAttnModule, compile_unsupported_reason
from mmxattn.lit.optim import build_optimizer, component_of, default_fused
from mmxattn.vision import windows
from mmxattn.vision.adapters import freeze_layer_groups, layer_decay_scales


# ------------------------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> ShapesDataModule:
    cache = tmp_path_factory.mktemp("shapes")
    return ShapesDataModule(train_size=32, val_size=8, test_size=8, batch_size=8, num_workers=0, cache_dir=str(cache))


def _module(dm: ShapesDataModule, **kw) -> MMXAttnModule:
    args = dict(preset="mmx_tiny", img_size=64, rerank=4, warmup_steps=2, weight_decay=0.1, lr=3e-3)
    args.update(kw)
    return MMXAttnModule(**data_linked(dm), **args)


def _trainer(tmp_path: Path, max_steps: int, callbacks=()) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False, num_sanity_val_steps=0,
        default_root_dir=tmp_path, limit_val_batches=0, enable_model_summary=False, enable_checkpointing=False,
        callbacks=list(callbacks),
    )  # fmt: skip


class Snapshots(pl.Callback):
    """Parameters after every optimizer step: ``steps[global_step] = {name: tensor}``."""

    def __init__(self) -> None:
        self.steps: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps[trainer.global_step] = {n: p.detach().clone() for n, p in pl_module.model.named_parameters()}


def _same(a: dict, b: dict, prefix: str, names: set[str] | None = None) -> bool:
    keys = [k for k in a if k.startswith(prefix) and (names is None or k in names)]
    assert keys
    return all(torch.equal(a[k], b[k]) for k in keys)


def _batch(dm: ShapesDataModule) -> dict:
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


# ------------------------------------------------------------------------------------------------ (a) end to end
def _losses_by_epoch(metrics_csv: Path) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    with open(metrics_csv) as f:
        for row in csv.DictReader(f):
            if row.get("train/loss"):
                out.setdefault(int(row["epoch"]), []).append(float(row["train/loss"]))
    return out


@pytest.mark.slow  # ~10 s on an idle 2-core machine, several times that when shared
def test_finetune_csv_from_pretrained_encoder_file(tmp_path, monkeypatch, capsys):
    """The shipped fine-tuning config, a CAT encoder loaded from a local safetensors file, a CSV of real JPEGs:
    the loss falls over the epochs and the test reports retrieval and captioning metrics."""
    monkeypatch.chdir(tmp_path)  # the config's relative run folders land here
    # Java (PTB tokenizer, METEOR) costs ~10 s of process starts here; test_lit covers that path
    monkeypatch.setattr("mmxattn.metrics.java_available", lambda: False)
    data = make_csv(tmp_path / "csv", n_images=12, caps=2)
    torch.manual_seed(0)
    enc = mmxattn.create_encoder("cat_pico")
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(0.01)  # distinguishable from a fresh init
    weights = tmp_path / "cat_pico.safetensors"
    save_file({k: v.contiguous() for k, v in enc.state_dict().items()}, str(weights))
    overrides = json.dumps({"vision_pretrained": str(weights)})

    # the model the CLI builds starts from the file's weights
    probe = MMXAttnModule(preset="mmx_tiny", overrides={"vision_pretrained": str(weights)}, img_size=64)
    for k, v in enc.state_dict().items():
        torch.testing.assert_close(probe.model.visual.state_dict()[k], v, rtol=0, atol=0)

    args = [a for a in smoke_args("finetune_csv.yaml", tmp_path, data) if "fast_dev_run" not in a]
    args += [
        f"--model.overrides={overrides}",
        "--model.lr=0.002",
        "--model.warmup_steps=2",
        "--model.freeze_encoder_steps=3",
        "--model.layer_decay=0.8",
        "--model.ema_decay=0.9",
        "--trainer.max_epochs=6",
        "--trainer.check_val_every_n_epoch=6",
        "--trainer.log_every_n_steps=1",
        "--trainer.logger=pytorch_lightning.loggers.CSVLogger",
        f"--trainer.logger.save_dir={tmp_path / 'logs'}",
        "--trainer.enable_progress_bar=false",
        "--data.init_args.batch_size=8",
        "--data.init_args.tokenizer=word",  # a 49k-token LM head would dominate this tiny model's CPU time
    ]
    cli = cli_main(args)
    assert cli.trainer.state.finished and cli.trainer.global_step == 18  # 24 pairs / 8, 6 epochs

    losses = _losses_by_epoch(next((tmp_path / "logs").rglob("metrics.csv")))
    first, last = sum(losses[0]) / len(losses[0]), sum(losses[5]) / len(losses[5])
    print("train loss by epoch", {e: [round(x, 3) for x in v] for e, v in losses.items()})
    assert last < 0.85 * first and last < losses[0][0] - 0.5, losses  # measured: 9.4 -> 7.1 (first step 8.2)

    line = next(s for s in capsys.readouterr().out.splitlines() if s.startswith("TEST METRICS "))
    metrics = json.loads(line[len("TEST METRICS ") :])
    for key in ("i2t_r1", "t2i_r1", "cider", "bleu4"):
        assert isinstance(metrics[key], float) and math.isfinite(metrics[key]), (key, metrics[key])
    assert metrics["n_images"] == 12
    assert math.isfinite(cli.model.last_metrics["test/i2t_r1"]) and math.isfinite(cli.model.last_metrics["test/cider"])


# ------------------------------------------------------------------------------------------------ (b) freezing
@pytest.mark.parametrize("mode", ["requires_grad", "drop_grads"])
def test_freeze_encoder_then_unfreeze_and_resume_mid_freeze(mode, shapes, tmp_path, monkeypatch):
    """Frozen for optimizer steps 0..2 (weights, incl. weight decay, and Adam state untouched), trains from step 3;
    a run resumed at step 2 is still frozen at step 3's start. ``drop_grads`` is the DDP path (gradients computed
    and reduced, then dropped before the step)."""
    if mode == "drop_grads":
        monkeypatch.setattr(MMXAttnModule, "_set_frozen", lambda self, frozen: None)
    torch.manual_seed(0)
    mod = _module(shapes, freeze_encoder_steps=3)
    init = {n: p.detach().clone() for n, p in mod.model.named_parameters()}
    snaps = Snapshots()
    trainer = _trainer(tmp_path, 2, [snaps])
    trainer.fit(mod, datamodule=shapes)
    ckpt = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(ckpt)
    visual = {id(p) for p in mod.model.visual.parameters()}
    assert not any(id(p) in visual for p in trainer.optimizers[0].state)  # no Adam moments for frozen weights

    torch.manual_seed(1)
    mod2 = _module(shapes, freeze_encoder_steps=3)
    trainer2 = _trainer(tmp_path, 5, [snaps])
    trainer2.fit(mod2, datamodule=shapes, ckpt_path=ckpt)

    for step in (1, 2, 3):
        assert _same(snaps.steps[step], init, "visual."), f"encoder moved at step {step}"
        assert not _same(snaps.steps[step], snaps.steps[step - 1] if step > 1 else init, "decoder.")
    assert not _same(snaps.steps[4], snaps.steps[3], "visual."), "encoder still frozen after its steps"
    assert all(p.requires_grad for p in mod2.model.visual.parameters())


def test_word_only_steps_train_the_word_path_first_then_everything(shapes, tmp_path):
    """``word_only_steps``: the first steps move only the image side and the word head (the text tower, decoder
    and pooler get no gradient, so AdamW leaves them exactly as they were), the steps after move everything."""
    with pytest.raises(ValueError, match="word_only_steps"):
        _module(shapes, word_only_steps=2)  # no word loss to train
    torch.manual_seed(0)
    mod = _module(shapes, word_weight=1.0, word_only_steps=2, itm_weight=0.0)
    init = {n: p.detach().clone() for n, p in mod.model.named_parameters()}
    snaps = Snapshots()
    _trainer(tmp_path, 4, [snaps]).fit(mod, datamodule=shapes)
    for step in (1, 2):
        before = snaps.steps[step - 1] if step > 1 else init
        for moved in ("visual.", "image_proj.", "word_head."):
            assert not _same(snaps.steps[step], before, moved), f"{moved} did not move at step {step}"
        for kept in ("text.", "decoder.", "pooler."):
            assert _same(snaps.steps[step], before, kept), f"{kept} moved in the word-only phase (step {step})"
    for part in ("text.", "decoder.", "pooler.", "visual."):
        assert not _same(snaps.steps[3], snaps.steps[2], part), f"{part} did not move after the phase"
    # in the phase a training step computes the word loss alone; outside training (validation) every loss
    fresh = _module(shapes, word_weight=1.0, word_only_steps=2, itm_weight=0.0)
    batch = _batch(shapes)
    with torch.no_grad():
        assert set(fresh.train().compute_losses(batch)[1]) == {"word"}
        assert {"contrastive", "caption", "word"} <= set(fresh.eval().compute_losses(batch)[1])


def test_freeze_keeps_last_layer_groups_trainable(shapes, tmp_path):
    torch.manual_seed(0)
    mod = _module(shapes, freeze_encoder_steps=10, freeze_encoder_trainable_last=2)
    groups = [{f"visual.{n}" for n in g} for g in mod.model.visual.layer_groups()]
    init = {n: p.detach().clone() for n, p in mod.model.named_parameters()}
    snaps = Snapshots()
    _trainer(tmp_path, 2, [snaps]).fit(mod, datamodule=shapes)
    after = snaps.steps[2]
    frozen, trainable = set().union(*groups[:-2]), groups[-2] | groups[-1]
    assert _same(after, init, "visual.", frozen)
    # every weight matrix of the trainable groups moved (1-D params may be zero-gradient at init)
    moved = [not torch.equal(after[n], init[n]) for n in trainable if after[n].dim() > 1]
    assert moved and all(moved)
    with pytest.raises(ValueError, match="nothing would be frozen"):
        _module(shapes, freeze_encoder_steps=1, freeze_encoder_trainable_last=len(groups))


# ------------------------------------------------------------------------------------------------ (c, d) lrs
def test_cat_layer_groups_contract():
    enc = mmxattn.create_encoder("cat_t")
    groups = enc.layer_groups()
    names = [n for n, _ in enc.named_parameters()]
    assert sorted(n for g in groups for n in g) == sorted(names)  # every parameter exactly once
    assert len(groups) == 1 + sum(enc.cfg.depths)
    assert set(groups[0]) == {n for n in names if n.startswith("patch_embed.") or n == "ape"}
    stage_of_group = [None] + [s for s, d in enumerate(enc.cfg.depths) for _ in range(d)]
    for i, g in enumerate(groups[1:], start=1):
        for n in g:
            if n.startswith("layers."):
                assert int(n.split(".")[1]) == stage_of_group[i], n
        if any(".downsample." in n for n in g):  # merging rides with its stage's last CAB
            assert stage_of_group[i + 1] != stage_of_group[i]
    assert {"norm.weight", "norm.bias", "head.weight"} <= set(groups[-1])
    freeze_layer_groups(enc, 1)
    assert {n for n, p in enc.named_parameters() if p.requires_grad} == set(groups[-1])


def _group_lr(opt: torch.optim.Optimizer) -> dict[int, float]:
    return {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}


def test_layer_decay_gives_per_group_lrs():
    model = mmxattn.create_model("mmx_tiny")
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.05, encoder_lr=2e-4, layer_decay=0.5)
    lr_of = _group_lr(opt)
    scales = layer_decay_scales(model.visual, 0.5, prefix="visual.")
    n = len(model.visual.layer_groups())
    named = dict(model.named_parameters())
    for name, scale in scales.items():
        assert lr_of[id(named[name])] == pytest.approx(2e-4 * scale), name
    assert lr_of[id(named["visual.patch_embed.proj.weight"])] == pytest.approx(2e-4 * 0.5 ** (n - 1))
    assert lr_of[id(named["visual.norm.weight"])] == pytest.approx(2e-4)
    assert lr_of[id(named["decoder.blocks.0.mlp.fc1.weight"])] == pytest.approx(1e-3)  # untouched by the decay


def test_separate_lrs_land_in_their_components():
    model = mmxattn.create_model("mmx_tiny", word_head=True, word_context=True)
    opt = build_optimizer(model, lr=4.0, weight_decay=0.05, encoder_lr=1.0, text_lr=2.0, decoder_lr=3.0)
    lr_of = _group_lr(opt)
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len({id(p) for p in model.parameters()})  # each parameter once
    expected = {"encoder": 1.0, "text": 2.0, "decoder": 3.0}
    seen = set()
    for name, p in model.named_parameters():  # tied lm_head.weight appears once, as text.token_embedding.weight
        assert lr_of[id(p)] == expected[component_of(name)], name
        seen.add(name.split(".")[0])
    parts = "visual text pooler image_proj logit_scale decoder itm_head word_head word_context"
    assert seen == set(parts.split())
    assert component_of("pooler.query") == component_of("image_proj.stage_embed") == "text"
    assert component_of("word_head.weight") == component_of("word_context.weight") == "text"
    assert component_of("logit_scale") == "text" and component_of("itm_head.weight") == "decoder"
    # weight decay: matrices decay, 1-D / position tables do not
    wd = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert wd[id(model.decoder.blocks[0].mlp.fc1.weight)] == 0.05 and wd[id(model.logit_scale)] == 0.0
    # the default keeps the two-group layout (older checkpoints resume)
    assert [g["name"] for g in build_optimizer(model, lr=1e-3, weight_decay=0.05).param_groups] == [
        "decay",
        "no_decay",
    ]


@pytest.mark.skipif(torch.torch_version.TorchVersion(torch.__version__) < (2, 4), reason="CPU fused AdamW: torch>=2.4")
def test_fused_adamw_on_the_cpu_steps_as_torchs_reference_loop():
    """``build_optimizer(..., fused=True)`` on the CPU (torch's fused kernel; the default there stays torch's
    per-parameter loop, with which the documented runs were made) steps as the loop implementation does given the
    same gradients (both parameter groups: with and without weight decay; a parameter without a gradient stays)."""
    torch.manual_seed(0)
    model = mmxattn.create_model("mmx_tiny", word_head=True, word_context=True)
    ref, init = copy.deepcopy(model), copy.deepcopy(model)
    assert not build_optimizer(model, lr=1e-2, weight_decay=0.05).defaults["fused"]  # the CPU default: the loop
    opt = build_optimizer(model, lr=1e-2, weight_decay=0.05, fused=True)
    assert opt.defaults["fused"] is True
    ref_named = dict(ref.named_parameters())
    name_of = {id(p): n for n, p in model.named_parameters()}
    ref_opt = torch.optim.AdamW(
        [{**{k: v for k, v in g.items() if k not in ("params", "fused", "foreach")}, "fused": False, "foreach": False,
          "params": [ref_named[name_of[id(p)]] for p in g["params"]]} for g in opt.param_groups],
    )  # fmt: skip
    skipped = "decoder.blocks.0.mlp.fc1.bias"
    for _ in range(3):
        for name, p in model.named_parameters():
            g = None if name == skipped else torch.randn_like(p) * 10 ** torch.empty(()).uniform_(-4, 0)
            p.grad, ref_named[name].grad = g, None if g is None else g.clone()
        opt.step()
        ref_opt.step()
    assert not any(g["fused"] or g["foreach"] for g in ref_opt.param_groups)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, ref_named[name], rtol=1e-5, atol=1e-7)
    start = dict(init.named_parameters())
    assert torch.equal(model.get_parameter(skipped), start[skipped])
    assert not torch.allclose(model.decoder.blocks[0].mlp.fc1.weight, start["decoder.blocks.0.mlp.fc1.weight"])
    assert default_fused(model) is False and default_fused(torch.nn.Module()) is False


# ------------------------------------------------------------------------------------------------ (e) EMA
def test_ema_weights_evaluated_and_saved_as_plain_tensors(shapes, tmp_path):
    torch.manual_seed(0)
    decay = 0.6
    mod = _module(shapes, ema_decay=decay, ema_warmup=False)
    snaps = Snapshots()
    trainer = _trainer(tmp_path, 3, [snaps])
    trainer.fit(mod, datamodule=shapes)
    raw = {k: v.detach().clone() for k, v in mod.model.state_dict().items()}
    ema = mod._ema.state_dict()
    name = "decoder.blocks.0.mlp.fc1.weight"
    # outside reference: the EMA recursion over the weights after each step (update 0 copies)
    ref = snaps.steps[1][name]
    for step in (2, 3):
        ref = decay * ref + (1 - decay) * snaps.steps[step][name]
    torch.testing.assert_close(ema[name], ref)
    assert not torch.equal(ema[name], raw[name])
    assert mod.eval_model is mod._ema.module and mod.eval_model.tokenizer is mod.model.tokenizer
    torch.testing.assert_close(
        ema["visual.layers.0.pre_ipsa_blocks.0.attn.relative_position_index"],
        raw["visual.layers.0.pre_ipsa_blocks.0.attn.relative_position_index"],
        rtol=0,
        atol=0,
    )

    path = tmp_path / "ema.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    torch.testing.assert_close(ckpt["state_dict"][f"model.{name}"], ema[name])  # readers get the EMA weights
    torch.testing.assert_close(ckpt["mmxattn_ema"]["training_weights"][name], raw[name])
    assert ckpt["mmxattn_ema"]["num_updates"] == 3
    torch.testing.assert_close(mmxattn.load(path).state_dict()[name], ema[name])
    # resume: the training weights go back into the model, the average into the EMA
    again = MMXAttnModule.load_from_checkpoint(path, weights_only=True)
    torch.testing.assert_close(again.model.state_dict()[name], raw[name])
    torch.testing.assert_close(again._ema.state_dict()[name], ema[name])
    assert again._ema.num_updates == 3


def test_testing_an_ema_checkpoint_without_ema_decay_evaluates_the_ema_weights(shapes, tmp_path):
    torch.manual_seed(0)
    mod = _module(shapes, ema_decay=0.6, ema_warmup=False)
    trainer = _trainer(tmp_path, 3)
    trainer.fit(mod, datamodule=shapes)
    path = tmp_path / "ema.ckpt"
    trainer.save_checkpoint(path)
    averaged = torch.load(path, weights_only=True)["state_dict"]
    plain = _module(shapes, ema_decay=0.0)
    tester = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, limit_test_batches=1,
                        enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    with pytest.warns(UserWarning, match="evaluating the EMA weights"):
        tester.test(plain, datamodule=shapes, ckpt_path=str(path), weights_only=True)
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(v, averaged[k], rtol=0, atol=0, msg=k)


def test_step_checkpoints_hold_the_ema_of_that_step_and_resume_continues_it(shapes, tmp_path):
    """ModelCheckpoint(every_n_train_steps) saves in on_train_batch_end, before the module's own hook: the EMA
    update of a step must already be in that step's checkpoint, and a run resumed from it must end with the EMA
    of the uninterrupted run."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    name = "decoder.blocks.0.mlp.fc1.weight"

    def fit(steps: int, ckpt: str | None = None) -> MMXAttnModule:
        torch.manual_seed(0)
        mod = _module(shapes, ema_decay=0.6, ema_warmup=False, itm_weight=0.0)
        every = ModelCheckpoint(tmp_path / "steps", every_n_train_steps=1, save_top_k=-1, filename="{step}")
        trainer = pl.Trainer(
            accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False, num_sanity_val_steps=0,
            default_root_dir=tmp_path, limit_val_batches=0, enable_model_summary=False, callbacks=[every],
        )  # fmt: skip
        trainer.fit(mod, datamodule=shapes, ckpt_path=ckpt)
        return mod

    full = fit(4)
    assert full._ema.num_updates == 4
    step2 = torch.load(tmp_path / "steps" / "step=2.ckpt", weights_only=True)
    assert step2["mmxattn_ema"]["num_updates"] == 2
    resumed = fit(4, ckpt=str(tmp_path / "steps" / "step=2.ckpt"))
    assert resumed._ema.num_updates == 4
    torch.testing.assert_close(resumed._ema.state_dict()[name], full._ema.state_dict()[name])


# ------------------------------------------------------------------------------------------------ (f, g) speed
def _loss_and_grads(mod: MMXAttnModule, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    mod.train()
    mod.zero_grad(set_to_none=True)
    torch.manual_seed(123)  # ITM hard-negative sampling
    loss, _, _ = mod.compute_losses(batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in mod.model.named_parameters() if p.grad is not None}


def test_grad_checkpointing_same_loss_and_grads(shapes):
    batch = _batch(shapes)
    torch.manual_seed(0)
    plain = _module(shapes)
    torch.manual_seed(0)
    ckpt = _module(shapes, grad_checkpointing=True)
    assert ckpt.model.visual.grad_checkpointing and ckpt.model.decoder.grad_checkpointing
    loss_a, grads_a = _loss_and_grads(plain, batch)
    loss_b, grads_b = _loss_and_grads(ckpt, batch)
    torch.testing.assert_close(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys()
    for k in grads_a:
        torch.testing.assert_close(grads_a[k], grads_b[k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.slow
@pytest.mark.skipif(compile_unsupported_reason("cpu") is not None, reason=str(compile_unsupported_reason("cpu")))
def test_compile_on_cpu_matches_eager_and_keeps_keys(shapes, monkeypatch):
    monkeypatch.setattr(windows, "_ONEDNN", windows._ONEDNN)  # compile switches it off process-wide: restore it
    batch = _batch(shapes)
    torch.manual_seed(0)
    eager = _module(shapes)
    torch.manual_seed(0)
    compiled = _module(shapes, compile=True)
    compiled.setup("fit")
    assert compiled._compiled is not None
    loss_a, grads_a = _loss_and_grads(eager, batch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a silent fallback to eager would pass for the wrong reason
        loss_b, grads_b = _loss_and_grads(compiled, batch)
    assert compiled._compiled_ok
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-4, atol=1e-5)
    for k in grads_a:
        torch.testing.assert_close(grads_a[k], grads_b[k], rtol=1e-3, atol=1e-5, msg=k)
    assert not any("_orig_mod" in k for k in compiled.state_dict())


@pytest.mark.parametrize("clip", [1.0, None])
def test_fused_adamw_is_not_used_where_lightning_clips_under_mixed_precision(shapes, tmp_path, monkeypatch, clip):
    """Lightning's mixed-precision clipping refuses optimizers that unscale gradients themselves (the fused
    AdamW, chosen by default on CUDA): the shipped configs clip, so on a GPU every bf16-mixed fit stopped at its
    first step. Forcing the CUDA default on the CPU reproduces that; with clipping the module now builds the
    unfused AdamW and trains, without clipping it keeps the fused kernel."""
    monkeypatch.setattr("mmxattn.lit.optim.default_fused", lambda model: True)
    mod = _module(shapes)
    trainer = pl.Trainer(
        accelerator="cpu", precision="bf16-mixed", gradient_clip_val=clip, max_steps=2, logger=False,
        enable_progress_bar=False, num_sanity_val_steps=0, default_root_dir=tmp_path, limit_val_batches=0,
        enable_checkpointing=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(mod, datamodule=shapes)
    assert trainer.global_step == 2
    assert bool(trainer.optimizers[0].defaults["fused"]) is (clip is None)
    assert all(torch.isfinite(p).all() for p in mod.parameters())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compile_on_gpu_matches_eager_and_trains(shapes, tmp_path):
    """On CUDA (inductor's Triton backend): the compiled training forward gives the eager loss and gradients, and
    a Lightning fit with compile=True and bf16-mixed runs compiled (no fallback to eager) to finite weights."""
    reason = compile_unsupported_reason("cuda")
    assert reason is None, reason  # a GPU machine without Triton is a broken install, not a skip
    batch = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in _batch(shapes).items()}
    torch.manual_seed(0)
    eager = _module(shapes).cuda()
    torch.manual_seed(0)
    compiled = _module(shapes, compile=True).cuda()
    compiled._compiled = torch.compile(compiled.model.forward)  # what setup("fit") does on a CUDA trainer
    loss_a, grads_a = _loss_and_grads(eager, batch)
    fallback = "(torch.compile failed|compile=True ignored)"  # the module's warnings when it runs eager instead
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=fallback, category=UserWarning)
        loss_b, grads_b = _loss_and_grads(compiled, batch)
    assert compiled._compiled_ok
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-3, atol=1e-4)
    for k in grads_a:
        torch.testing.assert_close(grads_a[k], grads_b[k], rtol=1e-2, atol=1e-4, msg=k)

    mod = _module(shapes, compile=True)
    trainer = pl.Trainer(
        accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=3, logger=False, enable_progress_bar=False,
        num_sanity_val_steps=0, default_root_dir=tmp_path, limit_val_batches=0, enable_checkpointing=False,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=fallback, category=UserWarning)
        trainer.fit(mod, datamodule=shapes)
    assert mod._compiled is not None and mod._compiled_ok and trainer.global_step == 3
    assert all(torch.isfinite(p).all() for p in mod.parameters())


def test_compile_falls_back_to_eager_with_a_warning(shapes, monkeypatch):
    monkeypatch.setattr(windows, "_ONEDNN", windows._ONEDNN)
    batch = _batch(shapes)
    monkeypatch.setattr("mmxattn.lit.module.shutil.which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    mod = _module(shapes, compile=True)
    with pytest.warns(UserWarning, match="no C.. compiler"):
        mod.setup("fit")
    assert mod._compiled is None

    def broken(*a, **k):
        raise RuntimeError("inductor exploded")

    monkeypatch.setattr(torch, "compile", lambda fn, **k: broken)
    monkeypatch.setattr("mmxattn.lit.module.compile_unsupported_reason", lambda device: None)
    mod.setup("fit")
    mod.train()
    with pytest.warns(UserWarning, match="inductor exploded"):
        loss, _, _ = mod.compute_losses(batch)
    assert torch.isfinite(loss) and mod._compiled is None


# ------------------------------------------------------------------------------------------------ precision
def test_losses_are_fp32_under_bf16_autocast(shapes):
    batch = _batch(shapes)
    torch.manual_seed(0)
    mod = _module(shapes).train()
    torch.manual_seed(5)
    ref, _, _ = mod.compute_losses(batch)
    torch.manual_seed(5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, terms, out = mod.compute_losses(batch)
    assert out.logits.dtype == torch.bfloat16  # autocast is really on
    assert loss.dtype == torch.float32 and all(v.dtype == torch.float32 for v in terms.values())
    torch.testing.assert_close(loss, ref, rtol=0.05, atol=0.05)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in mod.parameters() if p.grad is not None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_fit_on_gpu(precision, shapes, tmp_path):
    torch.manual_seed(0)
    mod = _module(shapes, freeze_encoder_steps=1, ema_decay=0.9, grad_checkpointing=True)
    trainer = pl.Trainer(
        accelerator="gpu", devices=1, precision=precision, max_steps=3, logger=False, enable_progress_bar=False,
        num_sanity_val_steps=0, default_root_dir=tmp_path, limit_val_batches=1, enable_checkpointing=False,
    )  # fmt: skip
    trainer.fit(mod, datamodule=shapes)
    assert trainer.global_step == 3
    assert all(torch.isfinite(p).all() for p in mod.parameters())
    assert next(mod.parameters()).dtype == torch.float32  # mixed precision keeps fp32 master weights
    assert all(math.isfinite(v) for k, v in mod.last_metrics.items() if k.endswith("i2t_r1"))


# ------------------------------------------------------------------------------------------------ init_from
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "tiny_shapes"  # an export folder (word tokenizer, 64 px)


def test_init_from_an_export_starts_a_new_run_from_its_weights_and_tokenizer(tmp_path):
    """--model.init_from: the model's architecture, weights and tokenizer come from a trained model (the data's
    own word vocabulary is replaced, warned), while step, epoch, optimizer and schedule start anew."""
    from mmxattn.data.datamodule import ImageTextDataModule

    trained = mmxattn.load(FIXTURE)
    data = make_csv(tmp_path / "csv", n_images=8, caps=2)
    dm = ImageTextDataModule(**data, tokenizer="word", img_size=64, context_length=24, batch_size=4, num_workers=0)
    assert dm.tokenizer.to_dict() != trained.tokenizer.to_dict()  # another caption set, another vocabulary
    mod = _module(dm, preset="mmx_cat_t", init_from=str(FIXTURE))  # preset not read: the file's architecture
    assert mod.model.cfg == trained.cfg
    for k, v in trained.state_dict().items():
        assert torch.equal(mod.model.state_dict()[k], v), k
    snaps = Snapshots()
    trainer = _trainer(tmp_path, max_steps=2, callbacks=[snaps])
    with pytest.warns(UserWarning, match=r"init_from .*tiny_shapes was trained with another tokenizer"):
        trainer.fit(mod, datamodule=dm)
    assert dm.tokenizer.to_dict() == trained.tokenizer.to_dict()  # captions read with the model's ids
    assert mod.model.tokenizer.to_dict() == trained.tokenizer.to_dict()
    assert sorted(snaps.steps) == [1, 2]  # a new run: counting from step 0, not the file's
    moved = snaps.steps[2]["text.token_embedding.weight"] - trained.state_dict()["text.token_embedding.weight"]
    assert moved.abs().max() > 0  # and it trains


def test_init_from_a_checkpoint_file_and_what_it_refuses(tmp_path, shapes):
    """A .ckpt of this module works as an export does (its evaluated weights, without its step counters); a data
    img_size other than the model's, or overrides that change weight shapes, are errors naming the file; weights
    the overrides add start fresh, warned."""
    from mmxattn.checkpoint import CheckpointError

    first = _module(shapes)
    trainer = _trainer(tmp_path, max_steps=3)
    trainer.fit(first, datamodule=shapes)
    ckpt = tmp_path / "first.ckpt"
    trainer.save_checkpoint(ckpt)
    mod = _module(shapes, init_from=str(ckpt))
    for k, v in first.model.state_dict().items():
        assert torch.equal(mod.model.state_dict()[k], v), k
    snaps = Snapshots()
    _trainer(tmp_path, max_steps=2, callbacks=[snaps]).fit(mod, datamodule=shapes)
    assert sorted(snaps.steps) == [1, 2]  # fit(ckpt_path=...) would have gone on from step 3 (and stopped)
    with pytest.raises(CheckpointError, match=r"first.ckpt: the model was trained at img_size 64, the data gives 96"):
        _module(shapes, init_from=str(ckpt), img_size=96)
    with pytest.raises(CheckpointError, match="the overrides change the shapes of its weights"):
        _module(shapes, init_from=str(ckpt), overrides={"text": {"width": 96}})
    with pytest.warns(UserWarning, match=r"weights are not in the file and start fresh .*word_head"):
        with_head = _module(shapes, init_from=str(ckpt), word_weight=0.5)
    assert with_head.model.word_head is not None
    with pytest.raises(CheckpointError, match="init_from: checkpoint not found"):
        _module(shapes, init_from=str(tmp_path / "nope.ckpt"))


def test_a_grown_word_vocabulary_on_resume_points_to_the_runs_tokenizer_or_init_from(tmp_path, shapes):
    """Resuming on a train file with new words: the vocabulary sizes differ, and the hint named --model.* settings
    (wrong: the data's vocabulary changed); it now names the two ways out."""
    from mmxattn.checkpoint import CheckpointError

    first = _module(shapes)
    trainer = _trainer(tmp_path, max_steps=1)
    trainer.fit(first, datamodule=shapes)
    trainer.save_checkpoint(tmp_path / "first.ckpt")
    ckpt = torch.load(tmp_path / "first.ckpt", weights_only=True)
    linked = {**data_linked(shapes), "vocab_size": shapes.vocab_size + 2}  # what two new words in the file give
    grown = MMXAttnModule(preset="mmx_tiny", img_size=64, **linked)
    with pytest.raises(CheckpointError, match=r"text.vocab_size: \d+ in the checkpoint, \d+ here") as e:
        grown.on_load_checkpoint(ckpt)
    assert "--data.init_args.tokenizer DIR" in str(e.value) and "--model.init_from" in str(e.value)
    with pytest.raises(CheckpointError, match=r"Build the model as the run did"):  # other differences: as before
        _module(shapes, overrides={"text": {"width": 96}}).on_load_checkpoint(ckpt)
