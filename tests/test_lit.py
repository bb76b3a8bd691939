"""The Lightning layer: every shipped config runs, checkpoints load safely, export/load round-trips, the evaluate
command prints its JSON, and a non-finite loss stops (or skips) with a clear message."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from lit_helpers import CONFIGS, REPO, data_linked, make_coco, make_csv, make_wds, smoke_args

import mmxattn
from mmxattn.checkpoint import CheckpointError, export, load, read_checkpoint
from mmxattn.data.datamodule import ShapesDataModule
from mmxattn.lit.checkpoint_io import AtomicCheckpointIO
from mmxattn.lit.cli import main as cli_main
from mmxattn.lit.module import MMXAttnModule, NonFiniteLossError

OVERLAYS = ("shapes_tensorboard.yaml", "ddp.yaml")  # put on top of another config, not run alone
SHIPPED = sorted(p.name for p in CONFIGS.glob("*.yaml") if p.name not in OVERLAYS)


@pytest.mark.slow
@pytest.mark.parametrize("config", SHIPPED)
def test_every_shipped_config_runs(config, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # relative run folders of the configs land here
    data = {
        "coco.yaml": lambda: make_coco(tmp_path / "coco"),
        "finetune_csv.yaml": lambda: make_csv(tmp_path / "csv"),
        "wds.yaml": lambda: make_wds(tmp_path / "wds"),
    }.get(config, lambda: None)()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # gpu_ddp.yaml compiles the training forward; compiling is tested on its own (test_finetune.py), and here
        # on 2 CPU cores it would add three minutes for two steps
        cli = cli_main(smoke_args(config, tmp_path, data) + ["--model.compile=false"])
    assert cli.trainer.state.finished
    assert cli.trainer.global_step == 2
    # every config writes checkpoints atomically, and the CLI's config saving does not warn about it
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert not [w for w in caught if "serialize" in str(w.message)], [str(w.message) for w in caught]
    out = capsys.readouterr().out
    if config != "wds.yaml":  # wds.yaml has no test split
        line = next(s for s in out.splitlines() if s.startswith("TEST METRICS "))
        metrics = json.loads(line[len("TEST METRICS ") :])
        for key in ("i2t_r1", "t2i_r1", "cider", "bleu4", "n_images"):
            assert key in metrics
        assert metrics["n_images"] > 0
        if config == "shapes.yaml":  # generated captions checked against their scenes, with the baseline beside
            assert 0.0 <= metrics["caption_fit"] <= 1.0 and 0.0 <= metrics["constant_caption_fit"] <= 1.0
        if metrics.get("caption_fit") is not None:  # the shapes data: zero-shot accuracies with their baseline
            assert 0.0 <= metrics["zeroshot_count_acc"] <= 1.0
            assert 0.0 < metrics["zeroshot_count_majority"] <= 1.0  # the baseline over the same test images
        else:
            assert metrics.get("zeroshot_count_acc") is None and metrics.get("zeroshot_count_majority") is None


@pytest.mark.parametrize("data_config", ["coco.yaml", "wds.yaml", "finetune_csv.yaml"])
def test_ddp_overlay_changes_only_the_devices_and_compile(data_config, capsys):
    """configs/ddp.yaml on top of a data config: that config's model, data, run folder and checkpoints stay (the
    README's multi-GPU line used gpu_ddp.yaml there, which swapped in the shapes data and mmx_shapes silently)."""
    import yaml

    def printed(*names: str) -> dict:
        with pytest.raises(SystemExit) as e:
            cli_main(["fit", *(a for n in names for a in ("--config", str(CONFIGS / n))), "--print_config"])
        assert e.value.code in (0, None)
        return yaml.safe_load(capsys.readouterr().out)

    alone, stacked = printed(data_config), printed(data_config, "ddp.yaml")
    t = stacked["trainer"]
    assert (t["accelerator"], t["devices"], t["strategy"], t["precision"]) == ("gpu", -1, "ddp", "bf16-mixed")
    assert stacked["model"]["compile"] is True
    assert stacked["data"] == alone["data"]
    assert {k: v for k, v in stacked["model"].items() if k != "compile"} == {
        k: v for k, v in alone["model"].items() if k != "compile"
    }
    for key in ("default_root_dir", "callbacks", "logger", "max_epochs", "max_steps"):
        assert t[key] == alone["trainer"][key], key
    overlay = yaml.safe_load((CONFIGS / "ddp.yaml").read_text())
    assert set(overlay) == {"trainer", "model"} and set(overlay["model"]) == {"compile"}


def test_tensorboard_config_composes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = smoke_args("shapes.yaml", tmp_path, fast_dev_run=1, overlays=("shapes_tensorboard.yaml",))
    cli = cli_main(args + ["--test_after_fit=false"])
    assert type(cli.trainer.logger).__name__ in ("TensorBoardLogger", "DummyLogger")
    # the main job's encoder: configs/shapes.yaml's model.overrides reach the model (the conv stem, not CAT's patchify)
    assert cli.model.model.cfg.vision.stem == "conv"
    assert isinstance(cli.model.model.visual.patch_embed.proj, torch.nn.Sequential)
    # and its word phase: a stage-0 word head trained alone first, read by the decoder and pooler afterwards
    cfg, hp = cli.model.model.cfg, cli.model.hparams
    assert cfg.word_head and cfg.word_head_stage == 0 and cfg.word_context
    assert hp.word_only_steps > 0 and hp.word_only_schedule == "restart" and hp.word_weight > 0
    # and the decoder's attention pulled towards the word head's maps, on the layers grounding scores
    n_dec = len(cli.model.model.decoder.blocks)
    assert hp.attn_word_weight > 0 and cli.model._grounding_attn == [
        f"decoder.blocks.{i}.cross_attn" for i in range(n_dec)
    ]
    # taught per phrase: every size, colour and shape word (singular and plural) of the generator is a phrase word
    from mmxattn.data.shapes_render import COLOURS, SHAPE_PLURALS, SHAPES, SIZES

    assert sorted(hp.attn_word_phrase_words) == sorted([*SIZES, *COLOURS, *SHAPES, *SHAPE_PLURALS])
    ids = cli.model._phrase_ids(hp.attn_word_phrase_words)  # each is one token of the data's tokenizer
    assert len(set(ids)) == len(hp.attn_word_phrase_words)


def _tiny_fit(
    tmp_path: Path, steps: int = 4, data_kw: dict | None = None, **module_kw
) -> tuple[pl.Trainer, MMXAttnModule, ShapesDataModule]:
    dm = ShapesDataModule(
        train_size=32, val_size=8, test_size=8, batch_size=8, num_workers=0, cache_dir=str(tmp_path), **(data_kw or {})
    )
    mod = MMXAttnModule(
        preset="mmx_tiny",
        vocab_size=dm.vocab_size,
        pad_id=dm.pad_id,
        bos_id=dm.bos_id,
        eos_id=dm.eos_id,
        context_length=dm.context_length,
        img_size=64,
        rerank=4,
        warmup_steps=2,
        **module_kw,
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
        limit_val_batches=1,
        enable_model_summary=False,
        plugins=[mmxattn.lit.checkpoint_io.AtomicCheckpointIO()],
    )
    return trainer, mod, dm


def test_checkpoint_is_plain_data_and_loads_everywhere(tmp_path):
    trainer, mod, dm = _tiny_fit(tmp_path, steps=3)
    trainer.fit(mod, datamodule=dm)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)  # no pickled objects anywhere
    assert {"mmxattn_config", "mmxattn_tokenizer", "mmxattn_preprocess", "mmxattn_data", "state_dict"} <= set(ckpt)
    model = load(path)
    assert not model.training and model.tokenizer.vocab_size == dm.vocab_size
    from PIL import Image

    pil = [Image.fromarray(dm.dataset("test", None)[i]["image"]) for i in range(2)]  # uint8 HWC arrays
    caps = model.caption(pil, max_new_tokens=5)
    assert len(caps) == 2 and all(isinstance(c, str) for c in caps)
    # export -> load gives the same outputs, tokenizer and preprocessing
    exported = export(model, tmp_path / "export")
    again = load(exported)
    x = model.preprocess(pil)
    ids = model.tokenizer(["a red circle", "two squares"])
    torch.testing.assert_close(again(x, ids).logits, model(x, ids).logits)
    assert again.tokenizer.to_dict() == model.tokenizer.to_dict()
    assert again.caption(pil, max_new_tokens=5) == caps


def test_load_errors_say_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load(tmp_path / "nope.ckpt")
    (tmp_path / "empty.ckpt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty file"):
        load(tmp_path / "empty.ckpt")
    (tmp_path / "text.ckpt").write_text("hello")
    with pytest.raises(CheckpointError, match=r"is not a PyTorch checkpoint .*starts with b'hello'"):
        load(tmp_path / "text.ckpt")
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match="not an mmxattn checkpoint"):
        load(tmp_path / "other.ckpt")
    # a pickle that would run code is refused, and the code never runs
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"x": Evil()}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match="holds objects that the safe loader refuses") as e:
        read_checkpoint(tmp_path / "evil.ckpt")
    assert not marker.exists()
    assert "weights_only" not in str(e.value)  # not torch's advice to load it unsafely
    # weights that do not fit the config
    model = mmxattn.create_model("mmx_tiny")
    d = export(model, tmp_path / "exp")
    cfg = json.loads((d / "config.json").read_text())
    cfg["text"]["width"] = 32
    cfg["text"]["heads"] = 2
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="do not fit"):
        load(d)
    with pytest.raises(CheckpointError, match="missing"):
        load(tmp_path)
    # damaged files of an export: each error names the file
    for name, damage in (
        ("config.json", lambda f: f.write_text("{not json")),
        ("config.json", lambda f: f.write_text(json.dumps({**cfg, "text": {**cfg["text"], "heads": 3}}))),
        ("model.safetensors", lambda f: f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])),
        ("tokenizer.json", lambda f: f.write_text('{"kind": ')),
        ("preprocess.json", lambda f: f.write_text("[1, 2")),
    ):
        d = export(mmxattn.create_model("mmx_tiny", tokenizer=_tiny_tokenizer()), tmp_path / f"bad_{name}")
        damage(d / name)
        with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
            load(d)


def test_malformed_checkpoint_fields_and_weights_of_the_wrong_kind_are_named_errors(tmp_path):
    from safetensors.torch import load_file, save_file

    trainer, mod, dm = _tiny_fit(tmp_path, steps=1)
    trainer.fit(mod, datamodule=dm)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    good = torch.load(tmp_path / "m.ckpt", weights_only=True)
    sd = good["state_dict"]
    bad_fields = {
        "tokenizer": {"mmxattn_tokenizer": {"kind": "nonsense"}},
        "tokenizer string": {"mmxattn_tokenizer": "word"},
        "img_size": {"mmxattn_preprocess": {"img_size": "big"}},
        "mean": {"mmxattn_preprocess": {"mean": [0.5]}},
        "itm_weight": {"hyper_parameters": {**good["hyper_parameters"], "itm_weight": "lots"}},
        "state_dict list": {"state_dict": list(sd.items())},
        "a float weight": {"state_dict": {**sd, "model.logit_scale": 2.0}},
        "int weights": {"state_dict": {**sd, "model.pooler.query": sd["model.pooler.query"].to(torch.int8)}},
        "complex": {"state_dict": {**sd, "model.logit_scale": sd["model.logit_scale"].to(torch.complex64)}},
    }
    for what, change in bad_fields.items():
        path = tmp_path / "bad.ckpt"
        torch.save({**good, **change}, path)
        with pytest.raises(CheckpointError, match=str(path).replace(".", r"\.")) as e:
            load(path)
        assert e.type is CheckpointError, what
    half = {**sd, "model.pooler.query": sd["model.pooler.query"].half()}  # another float width is fine
    torch.save({**good, "state_dict": half}, tmp_path / "half.ckpt")
    load(tmp_path / "half.ckpt")
    d = export(load(tmp_path / "m.ckpt"), tmp_path / "exp")
    weights = load_file(str(d / "model.safetensors"))
    weights["pooler.query"] = weights["pooler.query"].to(torch.uint8)  # wrecked weights used to load silently
    save_file(weights, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"pooler\.query: file torch\.uint8 vs model torch\.float32"):
        load(d)


def _tiny_tokenizer():
    from mmxattn.text.tokenizer import WordTokenizer

    return WordTokenizer([*WordTokenizer.SPECIALS, *(f"w{i}" for i in range(64 - len(WordTokenizer.SPECIALS)))])


def test_export_and_load_refuse_a_tokenizer_that_does_not_fit_the_model(tmp_path):
    """A tokenizer of another vocabulary size or other special ids names other words than the weights were
    trained with: export refuses it before writing anything, and load refuses such a tokenizer.json or checkpoint
    tokenizer, naming the file. A tokenizer of another context length is attached at the model's."""
    from mmxattn.config import config_to_dict
    from mmxattn.text.tokenizer import OpenCLIPTokenizer, WordTokenizer

    def small(**kw):
        return mmxattn.create_model("mmx_tiny", vocab_size=10, context_length=10, **kw).eval()

    fits = WordTokenizer([*WordTokenizer.SPECIALS, *(f"w{i}" for i in range(6))], context_length=10)
    model = small()
    for wrong, match in (
        (OpenCLIPTokenizer(context_length=10), "vocab_size 49409 vs the model's 10"),
        (WordTokenizer([*WordTokenizer.SPECIALS, "a"], context_length=10), "vocab_size 5 vs the model's 10"),
    ):
        model.tokenizer = wrong
        with pytest.raises(CheckpointError, match=f"{re.escape(str(tmp_path / 'out'))}.*{match}"):
            export(model, tmp_path / "out")
        assert not (tmp_path / "out").exists()
    other_ids = small(pad_id=3, eos_id=2, bos_id=1)  # same vocabulary size, another pad id
    other_ids.tokenizer = fits
    with pytest.raises(CheckpointError, match="pad_id 0 vs the model's 3"):
        export(other_ids, tmp_path / "out")
    # an exported folder whose tokenizer.json does not fit
    model.tokenizer = fits
    d = export(model, tmp_path / "exp")
    assert load(d).tokenizer.to_dict() == fits.to_dict()
    (d / "tokenizer.json").write_text(json.dumps(OpenCLIPTokenizer(context_length=10).to_dict()))
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: its tokenizer does not fit.*vocab_size 49409"):
        load(d)
    # a Lightning checkpoint whose tokenizer does not fit
    ckpt = {
        "mmxattn_config": config_to_dict(model.cfg),
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "mmxattn_tokenizer": WordTokenizer([*WordTokenizer.SPECIALS, "a"], context_length=10).to_dict(),
    }
    torch.save(ckpt, tmp_path / "m.ckpt")
    with pytest.raises(CheckpointError, match=f"{re.escape(str(tmp_path / 'm.ckpt'))}: its tokenizer does not fit"):
        load(tmp_path / "m.ckpt")
    torch.save({**ckpt, "mmxattn_tokenizer": fits.to_dict()}, tmp_path / "m.ckpt")
    assert load(tmp_path / "m.ckpt").tokenizer.to_dict() == fits.to_dict()
    # another context length: harmless (the model encodes texts at its own), attached at the model's
    model.tokenizer = WordTokenizer(fits.vocab, context_length=32)
    again = load(export(model, tmp_path / "ctx"))
    assert again.tokenizer.context_length == 10 and again.tokenizer.vocab == fits.vocab


def test_loaded_and_exported_models_keep_normalisation_and_the_runs_rerank_score(tmp_path):
    """A checkpoint of a run that never trained its ITM head loads with "lm" as retrieve()'s default re-ranking
    score (an explicit "itm" warns); export of the loaded model keeps that and the checkpoint's normalisation."""
    from mmxattn.checkpoint import preprocess_info
    from mmxattn.config import config_to_dict

    _, mod, _ = _tiny_fit(tmp_path, steps=0, itm_weight=0.0, rerank_with="itm")
    assert (mod.model.rerank_with_default, mod.model.itm_trained) == ("lm", False)
    torch.manual_seed(0)
    model = mmxattn.create_model("mmx_tiny", tokenizer=_tiny_tokenizer())
    pre = {**preprocess_info(model), "mean": [0.1, 0.2, 0.3], "std": [0.5, 0.6, 0.7]}
    ckpt = {
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "mmxattn_config": config_to_dict(model.cfg),
        "mmxattn_tokenizer": model.tokenizer.to_dict(),
        "mmxattn_preprocess": pre,
        "hyper_parameters": {"itm_weight": 0.0, "rerank_with": "itm"},
    }
    torch.save(ckpt, tmp_path / "itm0.ckpt")
    loaded = load(tmp_path / "itm0.ckpt")
    again = load(export(loaded, tmp_path / "exp"))
    for m in (loaded, again):
        assert m.transform.mean == [0.1, 0.2, 0.3] and m.transform.std == [0.5, 0.6, 0.7]
        assert (m.rerank_with_default, m.itm_trained) == ("lm", False)
    images = torch.randn(3, 3, 64, 64)
    texts = ["w1 w2", "w3", "w4 w5 w6"]
    r = again.retrieve(images, texts, k=2, rerank=3)
    torch.testing.assert_close(r.i2t_scores, again.retrieve(images, texts, k=2, rerank=3, rerank_with="lm").i2t_scores)
    with pytest.warns(UserWarning, match="never trained"):
        again.retrieve(images, texts, k=2, rerank=3, rerank_with="itm")
    ckpt["hyper_parameters"] = {"itm_weight": 0.5, "rerank_with": "pmi"}
    torch.save(ckpt, tmp_path / "pmi.ckpt")
    assert (load(tmp_path / "pmi.ckpt").rerank_with_default, load(tmp_path / "pmi.ckpt").itm_trained) == ("pmi", True)


def test_several_captions_per_image_train_with_every_loss(tmp_path, monkeypatch):
    """train_captions_per_image=3 through the Trainer, ITM on: the losses see 8 images and 24 captions, the
    matching head's hard negatives never pair an image with one of its own captions, and training runs."""
    trainer, mod, dm = _tiny_fit(tmp_path, steps=2, data_kw={"train_captions_per_image": 3}, itm_weight=0.5)
    seen = []
    real_c, real_s = mod.contrastive.forward, mmxattn.lit.module.sample_hard_negatives

    def contrastive(img, txt, scale, **kw):
        seen.append((img.shape[0], txt.shape[0], kw["text_image_index"].tolist()))
        return real_c(img, txt, scale, **kw)

    def negatives(sim, **kw):
        neg_t, neg_i = real_s(sim, **kw)
        own = kw["pos_mask"]
        rows = torch.arange(sim.shape[0])
        assert not own[rows[neg_t >= 0], neg_t[neg_t >= 0]].any() and not own[neg_i[neg_i >= 0], rows[neg_i >= 0]].any()
        seen.append("itm")
        return neg_t, neg_i

    monkeypatch.setattr(mod.contrastive, "forward", contrastive)
    monkeypatch.setattr(mmxattn.lit.module, "sample_hard_negatives", negatives)
    trainer.fit(mod, datamodule=dm)
    assert trainer.global_step == 2
    assert seen[0] == (8, 24, [i for i in range(8) for _ in range(3)]) and "itm" in seen
    assert all(torch.isfinite(p).all() for p in mod.parameters())


@pytest.mark.parametrize("where", ["loss", "forward"])
@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_nonfinite_loss(policy, where, tmp_path, monkeypatch):
    """A NaN loss, or a NaN forward (a diverged model: the ITM term's hard-negative sampling sees NaN similarities
    before any loss is checked), at the third batch: stop with the last good state saved, or skip the batch."""
    trainer, mod, dm = _tiny_fit(tmp_path, steps=5, nonfinite=policy, itm_weight=0.5)
    calls = {"n": 0}
    if where == "loss":
        real = mod.contrastive.forward

        def poisoned(*a, **k):
            calls["n"] += 1
            out = real(*a, **k)
            return out * float("nan") if calls["n"] == 3 else out

        monkeypatch.setattr(mod.contrastive, "forward", poisoned)
    else:
        import dataclasses

        real = mod._train_forward

        def poisoned(*a, **k):
            calls["n"] += 1
            out = real(*a, **k)
            return dataclasses.replace(out, image_embeds=out.image_embeds * float("nan")) if calls["n"] == 3 else out

        monkeypatch.setattr(mod, "_train_forward", poisoned)
    if policy == "stop":
        with pytest.raises(NonFiniteLossError, match=r"step 2, epoch 0, batch 2"):
            trainer.fit(mod, datamodule=dm)
        saved = tmp_path / "nonfinite-last-good.ckpt"
        state = torch.load(saved, weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
        assert torch.load(saved, weights_only=True)["global_step"] == 2
    else:
        trainer.fit(mod, datamodule=dm)
        # 5 batches; the poisoned one returned no loss, so its optimizer call had no gradient to apply
        assert trainer.global_step == 5 and calls["n"] == 5
        assert all(torch.isfinite(p).all() for p in mod.parameters())


def test_evaluate_command_prints_one_json_object(tmp_path):
    trainer, mod, dm = _tiny_fit(tmp_path, steps=2)
    trainer.fit(mod, datamodule=dm)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    cmd = [sys.executable, "-m", "mmxattn.evaluate", "--ckpt", str(path), "--no-meteor", "--rerank", "4"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = [s for s in res.stdout.strip().splitlines() if s.startswith("{")]
    assert len(lines) == 1
    out = json.loads(lines[0])
    for key in ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5", "cider", "bleu4", "grounding_acc", "n_images"):
        assert key in out
    assert out["n_images"] == 8 and out["meteor"] is None
    assert out["ceilings"]["t2i_r1"] <= 1 and "heldout_reference" in out["ceilings"]
    assert all(math.isfinite(out[k]) for k in ("i2t_r1", "t2i_r1", "cider"))
    bad = subprocess.run(
        [sys.executable, "-m", "mmxattn.evaluate", "--ckpt", str(tmp_path / "x.ckpt")],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert bad.returncode == 2 and "not found" in bad.stderr


def test_data_settings_from_a_cli_checkpoint_rebuild_the_data_module(tmp_path):
    """LightningCLI puts "_class_path" into the data module's hparams; the checkpoint's data settings must still
    rebuild the data module (python -m mmxattn.evaluate --ckpt without --config)."""
    from mmxattn.evaluate import build_datamodule

    trainer, mod, dm = _tiny_fit(tmp_path, steps=1)
    dm.hparams["_class_path"] = f"{type(dm).__module__}.{type(dm).__name__}"  # what LightningCLI adds
    trainer.fit(mod, datamodule=dm)
    path = tmp_path / "cli.ckpt"
    trainer.save_checkpoint(path)
    data = torch.load(path, weights_only=True)["mmxattn_data"]
    assert not any(k.startswith("_") for k in data["init_args"])
    again = build_datamodule(data)
    assert type(again) is type(dm) and again.hparams["batch_size"] == dm.hparams["batch_size"]
    # checkpoints written before the filter carried the key: they load too
    old = {**data, "init_args": {**data["init_args"], "_class_path": "x"}}
    assert type(build_datamodule(old)) is type(dm)


def _train_on_one_batch(mod: MMXAttnModule, batch: dict, term: str, weight: float, base: tuple[str, ...]) -> None:
    """12 AdamW steps of ``mod`` on ``batch``. The first step checks that the total is the ``base`` terms with their
    hparam weights plus ``weight`` times ``term``; with ``weight`` 0 the term must not be computed at all."""
    opt = torch.optim.AdamW(mod.parameters(), lr=3e-3)
    for step in range(12):
        loss, terms, _ = mod.compute_losses(batch)
        if step == 0 and weight:
            rest = sum(getattr(mod.hparams, f"{k}_weight") * terms[k] for k in base)
            torch.testing.assert_close(loss, rest + weight * terms[term])
        if not weight:
            assert term not in terms
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_word_attention_term_pulls_the_decoder_attention_to_the_word_maps(tmp_path):
    """attn_word_weight > 0: the term is in the total with its weight, trains the decoder's cross-attention and
    not the word head (its maps are detached targets), and a few optimizer steps on one batch leave the decoder's
    attention closer to the word head's maps than the same steps without it."""
    dm = ShapesDataModule(train_size=16, val_size=8, test_size=8, batch_size=16, num_workers=0, cache_dir=str(tmp_path))
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    kw = dict(preset="mmx_tiny", img_size=64, itm_weight=0.0, word_weight=1.0, **data_linked(dm))
    with pytest.raises(ValueError, match="attn_word_weight"):
        MMXAttnModule(attn_word_weight=1.0, **{**kw, "word_weight": 0.0})
    with pytest.raises(ValueError, match="attn_word_weight"):
        MMXAttnModule(attn_word_weight=-1.0, **kw)
    with pytest.raises(ValueError, match="attn_word_objective"):
        MMXAttnModule(attn_word_weight=1.0, attn_word_objective="kl", **kw)
    # the grounding layers are the ones pulled
    last = MMXAttnModule(grounding_layers=[-1], **{**kw, "overrides": {"text": {"decoder_layers": 2}}})
    assert last._grounding_attn == ["decoder.blocks.1.cross_attn"]
    torch.manual_seed(0)
    mod = MMXAttnModule(attn_word_weight=1.0, **kw)
    _, terms, _ = mod.compute_losses(batch)
    terms["word_attention"].backward()
    m = mod.model
    assert m.word_head.weight.grad is None or m.word_head.weight.grad.abs().max() == 0
    for blk in m.decoder.blocks:
        assert blk.cross_attn.q.weight.grad.abs().max() > 0 and blk.cross_attn.kv.weight.grad.abs().max() > 0
    measured = {}
    for weight in (0.0, 5.0):
        torch.manual_seed(0)
        mod = MMXAttnModule(attn_word_weight=weight, **kw)
        _train_on_one_batch(mod, batch, "word_attention", weight, ("contrastive", "caption", "word"))
        probe = MMXAttnModule(attn_word_weight=1.0, **kw)
        probe.model.load_state_dict(mod.model.state_dict())
        with torch.no_grad():
            measured[weight] = probe.compute_losses(batch)[1]["word_attention"].item()
    assert measured[5.0] < 0.7 * measured[0.0], measured


def test_word_attention_phrase_words_are_looked_up_in_the_tokenizer(tmp_path):
    dm = ShapesDataModule(train_size=16, val_size=8, test_size=8, batch_size=16, num_workers=0, cache_dir=str(tmp_path))
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    kw = dict(preset="mmx_tiny", img_size=64, itm_weight=0.0, word_weight=1.0, **data_linked(dm))
    with pytest.warns(UserWarning, match="attn_word_phrase_words is ignored"):
        off = MMXAttnModule(attn_word_phrase_words=["red", "banana"], **kw)  # without the term it shapes nothing
    off.model.tokenizer = dm.tokenizer
    assert "word_attention" not in off.compute_losses(batch)[1]  # and is never looked up ("banana" raises below)
    terms = {}
    from mmxattn.data.shapes_render import COLOURS, SHAPES, SIZES

    attributes = [*SIZES, *COLOURS, *SHAPES]  # "a small red circle": one phrase of three words
    for words in (None, attributes):
        torch.manual_seed(0)
        mod = MMXAttnModule(attn_word_weight=1.0, attn_word_phrase_words=words, **kw)
        mod.model.tokenizer = dm.tokenizer
        terms[bool(words)] = mod.compute_losses(batch)[1]["word_attention"].item()
    assert mod.word_attention.phrase_ids == tuple(dm.tokenizer.vocab.index(w) for w in attributes)
    assert terms[True] != pytest.approx(terms[False])
    bad = MMXAttnModule(attn_word_weight=1.0, attn_word_phrase_words=["red", "banana"], **kw)
    bad.model.tokenizer = dm.tokenizer
    with pytest.raises(ValueError, match="banana"):
        bad.compute_losses(batch)


def test_attention_entropy_penalty_sharpens_the_decoder_cross_attention(tmp_path):
    """attn_entropy_weight > 0: the term is in the total with its weight, and a few optimizer steps on one batch
    leave the decoder's cross-attention sharper, and its objective lower, than the same steps without it."""
    dm = ShapesDataModule(train_size=16, val_size=8, test_size=8, batch_size=16, num_workers=0, cache_dir=str(tmp_path))
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    kw = dict(preset="mmx_tiny", img_size=64, itm_weight=0.0, **data_linked(dm))
    with pytest.raises(ValueError, match="attn_entropy_weight"):
        MMXAttnModule(attn_entropy_weight=-1.0, **kw)
    measured = {}
    for weight in (0.0, 5.0):
        torch.manual_seed(0)
        mod = MMXAttnModule(attn_entropy_weight=weight, **kw)
        _train_on_one_batch(mod, batch, "attn_entropy", weight, ("contrastive", "caption"))
        measured[weight] = []
        for diversity in (0.0, 1.0):  # sharpness alone, then the objective itself
            probe = MMXAttnModule(attn_entropy_weight=1.0, attn_diversity=diversity, **kw)
            probe.model.load_state_dict(mod.model.state_dict())
            with torch.no_grad():
                measured[weight].append(probe.compute_losses(batch)[1]["attn_entropy"].item())
    (sharp_0, obj_0), (sharp_5, obj_5) = measured[0.0], measured[5.0]
    assert sharp_0 > 0.8  # without the penalty the decoder still looks nearly everywhere
    assert sharp_5 < sharp_0 - 0.1 and obj_5 < obj_0 - 0.1, measured


def test_itm_term_is_zero_for_a_batch_without_negatives_and_the_step_goes_on(tmp_path):
    """One pair, or captions that are all the same string, leave ITM no negative: the term is 0 for that batch
    (the head still in the graph, with zero gradient), not a crash of the training step."""
    _, mod, dm = _tiny_fit(tmp_path, steps=0, itm_weight=0.5)
    mod.train()
    torch.manual_seed(0)
    ids1 = mod.model.tokenizer(["a red circle"]) if mod.model.tokenizer else None
    ids1 = dm.tokenizer(["a red circle"]) if ids1 is None else ids1
    for images, ids, pos_ids in (
        (torch.randn(1, 3, 64, 64), ids1, None),
        (torch.randn(3, 3, 64, 64), ids1.expand(3, -1), torch.zeros(3, dtype=torch.long)),
    ):
        out = mod._train_forward(images, ids, None)
        itm = mod._itm(out, ids, pos_ids)
        assert itm.item() == 0.0
        mod.zero_grad(set_to_none=True)
        itm.backward()
        assert mod.model.itm_head.weight.grad is not None and not mod.model.itm_head.weight.grad.any()
    images = torch.randn(3, 3, 64, 64)  # with negatives the term is a real loss
    ids3 = dm.tokenizer(["a red circle", "two blue squares", "a green star"])
    assert mod._itm(mod._train_forward(images, ids3, None), ids3, None).item() > 0


def test_evaluate_cli_from_another_directory_uses_the_models_size_and_tokenizer(tmp_path, monkeypatch, capsys):
    """A run trained on a CSV with relative paths and a word vocabulary built from its train file: its checkpoint's
    data settings hold absolute paths (the CLI evaluates from any directory), evaluation tokenizes the references
    with the model's own tokenizer and runs at the model's image size whatever a --config says; data settings that
    do not work end in one "error:" line and exit status 2."""
    from mmxattn.data.datamodule import ImageTextDataModule
    from mmxattn.evaluate import main as evaluate_main

    run = tmp_path / "run"
    run.mkdir()
    monkeypatch.chdir(run)
    make_csv(run / "data", n_images=8, caps=2)
    kw = dict(train_path="data/pairs.csv", test_path="data/pairs.csv", image_root="data/images", tokenizer="word")
    dm = ImageTextDataModule(**kw, img_size=64, context_length=16, batch_size=8, num_workers=0)
    t = dm.tokenizer
    mod = MMXAttnModule(preset="mmx_tiny", vocab_size=t.vocab_size, pad_id=t.pad_id, bos_id=t.bos_id,
                        eos_id=t.eos_id, context_length=16, img_size=64, itm_weight=0.0)  # fmt: skip
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, limit_val_batches=0, enable_model_summary=False)  # fmt: skip
    trainer.fit(mod, datamodule=dm)
    ckpt = run / "m.ckpt"
    trainer.save_checkpoint(ckpt)
    init = torch.load(ckpt, weights_only=True)["mmxattn_data"]["init_args"]
    assert init["train_path"] == str(run / "data/pairs.csv") and init["image_root"] == str(run / "data/images")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    (run / "data/pairs.csv").rename(run / "data/test.csv")  # evaluation never needs the train file...
    cfg = tmp_path / "other.yaml"  # ...nor a config's image size or vocabulary
    cfg.write_text(json.dumps({"data": {"class_path": "ImageTextDataModule", "init_args": {
        **init, "train_path": str(run / "data/test.csv"), "test_path": str(run / "data/test.csv"),
        "img_size": 96, "batch_size": 4}}}))  # fmt: skip
    args = ["--ckpt", str(ckpt), "--rerank", "0", "--no-meteor", "--max-batches", "1"]
    assert evaluate_main([*args, "--config", str(cfg)]) == 0
    out, err = capsys.readouterr()
    assert "the model's img_size=64 (the data settings say 96)" in err
    assert json.loads(out.strip().splitlines()[-1])["n_images"] == 4
    assert evaluate_main(args) == 2  # the checkpoint's test file is gone: one clear line
    _, err = capsys.readouterr()
    assert err.startswith("error:") and "test_path" in err and "Traceback" not in err


def test_evaluate_tokenizes_references_with_the_models_tokenizer(tmp_path):
    from mmxattn.data.datamodule import ImageTextDataModule
    from mmxattn.evaluate import evaluate
    from mmxattn.text.tokenizer import WordTokenizer

    paths = make_csv(tmp_path / "data", n_images=4, caps=1)
    dm = ImageTextDataModule(**paths, tokenizer="word", img_size=64, context_length=16, batch_size=4, num_workers=0)
    vocab = dm.tokenizer.vocab
    reordered = WordTokenizer([*vocab[: len(WordTokenizer.SPECIALS)], *reversed(vocab[len(WordTokenizer.SPECIALS) :])],
                              context_length=16)  # fmt: skip
    model = mmxattn.create_model("mmx_tiny", vocab_size=len(vocab), context_length=16, tokenizer=reordered,
                                 pad_id=reordered.pad_id, bos_id=reordered.bos_id, eos_id=reordered.eos_id).eval()  # fmt: skip
    evaluate(model, dm, "test", rerank=0, meteor=False, gen_kwargs={"max_new_tokens": 2})
    batch = next(iter(dm.test_dataloader()))
    assert torch.equal(batch["ref_ids"], reordered([c for refs in batch["references"] for c in refs]))


def test_resuming_from_a_damaged_checkpoint_names_it_and_the_others(tmp_path):
    io = AtomicCheckpointIO()
    io.save_checkpoint({"x": torch.ones(2)}, tmp_path / "epoch=0.ckpt")
    assert torch.equal(io.load_checkpoint(tmp_path / "epoch=0.ckpt")["x"], torch.ones(2))
    (tmp_path / "last.ckpt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"last\.ckpt: an empty file.*epoch=0\.ckpt"):
        io.load_checkpoint(tmp_path / "last.ckpt")
    (tmp_path / "last.ckpt").write_bytes((tmp_path / "epoch=0.ckpt").read_bytes()[:100])  # truncated
    with pytest.raises(CheckpointError, match=r"cannot resume from .*last\.ckpt"):
        io.load_checkpoint(tmp_path / "last.ckpt")
    with pytest.raises(FileNotFoundError):
        io.load_checkpoint(tmp_path / "nope.ckpt")


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(gen_strategy="beem"), "strategy must be one of"),
        (dict(gen_strategy="beam", gen_num_beams=0), "num_beams must be >= 1"),
        (dict(gen_max_new_tokens=0), "max_new_tokens must be >= 1"),
        (dict(rerank=-1), "rerank must be an int >= 0"),
        (dict(rerank_with="foo"), "rerank_with must be one of"),
    ],
)
def test_bad_evaluation_options_fail_when_the_module_is_built(bad, match):
    with pytest.raises(ValueError, match=match):
        MMXAttnModule(preset="mmx_tiny", vocab_size=64, pad_id=0, bos_id=1, eos_id=2, context_length=16, **bad)


@pytest.mark.parametrize("bad", [["--rerank", "-1"], ["--max-batches", "0"], ["--batch-size", "0"]])
def test_evaluate_cli_refuses_bad_numbers_before_loading_anything(bad, tmp_path, capsys):
    from mmxattn.evaluate import main as evaluate_main

    with pytest.raises(SystemExit) as e:
        evaluate_main(["--ckpt", str(tmp_path / "never_read.ckpt"), *bad])
    assert e.value.code == 2 and bad[0] in capsys.readouterr().err


def test_checkpoints_get_a_plain_files_permissions(tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        AtomicCheckpointIO().save_checkpoint({"x": torch.ones(1)}, tmp_path / "a.ckpt")
        torch.save({"x": torch.ones(1)}, tmp_path / "plain.ckpt")
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "a.ckpt").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "plain.ckpt").stat().st_mode) == 0o644


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_last_ckpt_of_every_config_is_replaced_by_a_new_run_in_the_same_folder(name):
    """Lightning's version counter would write "last-v1.ckpt" beside an old run's last.ckpt, and --ckpt_path last,
    mmxattn.load and the caption CLI would then read the stale one."""
    import yaml

    callbacks = (yaml.safe_load((CONFIGS / name).read_text()).get("trainer") or {}).get("callbacks") or []
    last = [c["init_args"] for c in callbacks if c["class_path"].endswith("ModelCheckpoint")]
    last = [a for a in last if a.get("save_last")]
    assert all(a.get("enable_version_counter") is False for a in last), last


def test_stand_alone_test_names_the_checkpoint_it_tested(tmp_path, monkeypatch, capsys):
    """`train.py test --ckpt_path X` reports X, not the best checkpoint of the run that wrote X."""
    monkeypatch.chdir(tmp_path)
    args = smoke_args("shapes.yaml", tmp_path, fast_dev_run=0)
    args = [a for a in args if not a.startswith(("--trainer.fast_dev_run", "--data.init_args.train_size"))]
    args += ["--data.init_args.train_size=8", "--trainer.max_epochs=1", "--trainer.limit_test_batches=1"]
    # an unfinished in-process wandb run would be reused by later tests
    args += ["--trainer.logger=pytorch_lightning.loggers.CSVLogger", f"--trainer.logger.save_dir={tmp_path}"]
    cli_main(args + ["--trainer.enable_progress_bar=false"])
    out = capsys.readouterr().out
    best = next(s for s in out.splitlines() if s.startswith("best checkpoint: ")).split(": ", 1)[1]
    assert Path(best).name.startswith("best-") and Path(best).exists()
    assert f"tested checkpoint: {best}" in out  # after fit, the best one is tested

    other = tmp_path / "copy.ckpt"
    other.write_bytes(Path(best).read_bytes())
    cli_main(["test", *args[1:], "--trainer.enable_progress_bar=false", f"--ckpt_path={other}"])
    out = capsys.readouterr().out
    assert "TEST METRICS " in out and f"tested checkpoint: {other}" in out
    assert "best checkpoint" not in out, out


def test_bad_settings_are_one_error_line_naming_them(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # configs/finetune_csv.yaml's data/train.csv is not here
    with pytest.raises(SystemExit) as e:
        cli_main(["fit", "--config", str(CONFIGS / "finetune_csv.yaml")])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert (
        f"error: ImageTextDataModule: train_path 'data/train.csv' does not exist (relative to the working directory {tmp_path})"
        in err
    )
    assert "Union subtypes" not in err and "Traceback" not in err
    shapes = smoke_args("shapes.yaml", tmp_path)
    with pytest.raises(SystemExit) as e:
        cli_main(shapes + ["--model.gen_num_beams=-1"])
    assert e.value.code == 2 and "error: num_beams must be >= 1, got -1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # no predict split in any data module: not offered at all
        cli_main(["predict", "--config", str(CONFIGS / "shapes.yaml")])
    assert e.value.code == 2 and "invalid choice: 'predict'" in capsys.readouterr().err
    monkeypatch.setenv("MMXATTN_TRACEBACK", "1")  # the traceback, for whoever wants it
    with pytest.raises(ValueError, match="num_beams must be >= 1"):
        cli_main(shapes + ["--model.gen_num_beams=-1"])


def test_the_learned_temperature_is_bounded_keeps_its_gradient_and_training_clamps_it(tmp_path):
    model = mmxattn.create_model("mmx_tiny")
    bound = math.log(model.cfg.max_logit_scale)
    with torch.no_grad():
        model.logit_scale.fill_(bound + 0.1)  # where Adam's step can leave it
    s = model.get_logit_scale()
    assert s.shape == () and s.item() == model.cfg.max_logit_scale
    s.backward()  # a plain clamp would give 0 here, and the temperature could never come back down
    assert model.logit_scale.grad.item() == pytest.approx(model.cfg.max_logit_scale * math.exp(0.1), rel=1e-5)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(20.0))
    assert model.get_logit_scale().item() == pytest.approx(20.0)  # below the bound: exp of the parameter

    trainer, mod, dm = _tiny_fit(tmp_path, steps=1, lr=1e-6)
    with torch.no_grad():
        mod.model.logit_scale.fill_(bound + 0.5)
    trainer.fit(mod, datamodule=dm)
    # CLIP's rule: the parameter is clamped after the step (to the float32 nearest log(100))
    assert mod.model.logit_scale.item() == torch.tensor(bound).item()


def test_evaluate_command_takes_an_exported_folder_with_a_config(tmp_path, capsys):
    from mmxattn.evaluate import main as evaluate_main

    trainer, mod, dm = _tiny_fit(tmp_path, steps=1)
    trainer.fit(mod, datamodule=dm)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    export(load(path), tmp_path / "exported")
    assert evaluate_main(["--ckpt", str(tmp_path / "exported"), "--no-meteor", "--rerank", "0"]) == 2
    assert "stores no data settings; pass --config" in capsys.readouterr().err
    data = {"class_path": "mmxattn.data.datamodule.ShapesDataModule", "init_args": dict(dm.hparams)}
    (tmp_path / "data.yaml").write_text(json.dumps({"data": data}))  # JSON is YAML
    args = ["--no-meteor", "--rerank", "4", "--config", str(tmp_path / "data.yaml")]
    assert evaluate_main(["--ckpt", str(tmp_path / "exported"), *args]) == 0
    from_folder = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluate_main(["--ckpt", str(path), *args]) == 0
    from_ckpt = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert from_folder["n_images"] == 8 and from_folder == from_ckpt  # the same model, the same numbers


def test_evaluate_never_runs_a_command_named_by_a_checkpoints_data_settings(tmp_path, capsys):
    """WebDataset runs `pipe:` URLs as shell commands: a checkpoint whose stored data settings name one must not
    get it run by `python -m mmxattn.evaluate --ckpt` (which rebuilds the data from those settings)."""
    from mmxattn.evaluate import main as evaluate_main

    trainer, mod, dm = _tiny_fit(tmp_path, steps=1)
    trainer.fit(mod, datamodule=dm)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    ckpt = torch.load(tmp_path / "m.ckpt", weights_only=True)
    marker = tmp_path / "MARKER"
    for path in (f"pipe:touch {marker}; true", "http://example.invalid/x-{000..001}.tar"):
        ckpt["mmxattn_data"] = {
            "class_path": "mmxattn.data.datamodule.ImageTextDataModule",
            "init_args": {"format": "wds", "train_path": None, "test_path": path, "tokenizer": "openclip"},
        }
        torch.save(ckpt, tmp_path / "evil.ckpt")  # plain data: weights_only loading accepts it
        assert evaluate_main(["--ckpt", str(tmp_path / "evil.ckpt"), "--no-meteor", "--rerank", "0"]) == 2
        err = capsys.readouterr().err
        assert "a command or a remote URL" in err and "test_path" in err, err
        assert not marker.exists()


def test_ckpt_path_file_keeps_the_command_line_and_names_bad_or_foreign_files(tmp_path, monkeypatch, capsys):
    """Lightning's CLI replaced the model's settings with the checkpoint's for `--ckpt_path FILE` (not for `last`)
    and tracebacked on damaged files; a checkpoint of another preset was 200 lines of size mismatches."""
    monkeypatch.chdir(tmp_path)
    args = smoke_args("shapes.yaml", tmp_path, fast_dev_run=0)
    args = [a for a in args if not a.startswith(("--trainer.fast_dev_run", "--data.init_args.train_size"))]
    args += ["--data.init_args.train_size=8", "--trainer.max_epochs=1", "--trainer.limit_test_batches=1"]
    args += ["--trainer.logger=pytorch_lightning.loggers.CSVLogger", f"--trainer.logger.save_dir={tmp_path}"]
    best = cli_main(args + ["--test_after_fit=false"]).trainer.checkpoint_callback.best_model_path
    assert best and read_checkpoint(best)["hyper_parameters"]["gen_num_beams"] == 3
    test = ["test", *args[1:], f"--ckpt_path={best}"]
    cli = cli_main(test + ["--model.gen_strategy=beam", "--model.gen_num_beams=5"])
    assert (cli.model.hparams.gen_strategy, cli.model.hparams.gen_num_beams) == ("beam", 5)
    capsys.readouterr()

    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(Path(best).read_bytes()[:5000])
    with pytest.raises(SystemExit) as e:
        cli_main(["test", *args[1:], f"--ckpt_path={cut}"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"error: --ckpt_path: {cut} is a damaged or truncated checkpoint archive" in err

    with pytest.raises(SystemExit) as e:
        cli_main(test + ["--model.preset=mmx_shapes"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "written by a model of another configuration" in err, err
    assert "preset: 'mmx_tiny' in the checkpoint, 'mmx_shapes' here" in err and "Traceback" not in err


def test_a_save_killed_mid_write_leaves_no_temporary_file_for_long(tmp_path):
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()
    orphan = tmp_path / f".last.ckpt.pid{dead.pid}.abc123.tmp"  # what a SIGKILL during a save leaves
    live = tmp_path / f".last.ckpt.pid{os.getppid()}.def456.tmp"  # a writer still running
    other = tmp_path / f".best.ckpt.pid{dead.pid}.x.tmp"  # another checkpoint's: its own next save cleans it
    for p in (orphan, live, other):
        p.write_bytes(b"partial")
    AtomicCheckpointIO().save_checkpoint({"x": torch.ones(1)}, tmp_path / "last.ckpt")
    assert not orphan.exists() and live.exists() and other.exists()
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["x"].item() == 1.0
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == sorted([live.name, other.name])


def test_fused_adamw_is_refused_when_clipping_under_a_loss_scaler():
    """The fused AdamW unscales gradients inside its step, so a precision plugin with a loss scaler skips the
    unscaling before clipping: FSDP's 16-mixed clipped gradients still multiplied by the scale (65536), clipping
    every step and shrinking every update. With clipping under any scaler (or Lightning's mixed precision) the
    optimizer is the unfused one; without clipping, or without a scaler, fused stays allowed."""
    from types import SimpleNamespace

    from pytorch_lightning.plugins.precision import MixedPrecision, Precision

    mod = MMXAttnModule(preset="mmx_tiny", vocab_size=64, pad_id=0, bos_id=1, eos_id=2, context_length=16, img_size=64)

    class ScaledPlugin(Precision):  # stands for FSDPPrecision("16-mixed"): a Precision subclass holding a scaler
        scaler = object()

    cases = [
        (1.0, ScaledPlugin(), False),
        (1.0, MixedPrecision("bf16-mixed", "cpu"), False),
        (1.0, Precision(), True),
        (None, ScaledPlugin(), True),
    ]
    for clip, plugin, allowed in cases:
        mod._trainer = SimpleNamespace(gradient_clip_val=clip, precision_plugin=plugin)
        assert mod._fused_adamw_allowed() is allowed, (clip, type(plugin).__name__)
    mod._trainer = None


def test_export_into_a_folder_of_an_earlier_export_leaves_no_stale_tokenizer(tmp_path):
    """Exporting a model without a tokenizer over an earlier export removes that export's tokenizer.json: load
    would otherwise attach it to weights it was never trained with. Other files in the folder are kept."""
    from mmxattn.text.tokenizer import WordTokenizer

    model = mmxattn.create_model("mmx_tiny", vocab_size=10, context_length=10).eval()
    model.tokenizer = WordTokenizer([*WordTokenizer.SPECIALS, *(f"w{i}" for i in range(6))], context_length=10)
    d = export(model, tmp_path / "exp")
    (d / "notes.txt").write_text("mine")
    assert load(d).tokenizer is not None
    model.tokenizer = None
    export(model, d)
    assert not (d / "tokenizer.json").exists() and load(d).tokenizer is None
    assert (d / "notes.txt").read_text() == "mine"


def test_a_new_fit_in_the_folder_of_a_finished_run_trains_anew(tmp_path, monkeypatch, capsys):
    """`train.py fit` without --ckpt_path in a folder that holds an earlier run's last.ckpt starts a new run (with
    Lightning's OnExceptionCheckpoint among the callbacks, fit silently restored that file and, the old run being
    finished, trained nothing). Resuming is what `--ckpt_path last` is for."""
    monkeypatch.chdir(tmp_path)
    args = smoke_args("shapes.yaml", tmp_path, fast_dev_run=0)
    args = [a for a in args if not a.startswith(("--trainer.fast_dev_run", "--data.init_args.train_size"))]
    args += ["--data.init_args.train_size=8", "--trainer.max_epochs=1", "--trainer.limit_test_batches=1"]
    args += ["--trainer.logger=pytorch_lightning.loggers.CSVLogger", f"--trainer.logger.save_dir={tmp_path}"]
    args += ["--trainer.enable_progress_bar=false"]
    cli = cli_main(args + ["--seed_everything=0"])
    last = Path(cli.trainer.checkpoint_callback.dirpath) / "last.ckpt"
    old = torch.load(last, map_location="cpu", weights_only=True)["state_dict"]
    cli = cli_main(args + ["--seed_everything=1"])
    new = {k: v.detach() for k, v in cli.model.state_dict().items()}
    assert cli.trainer.global_step == 2  # trained its own steps
    assert any(not torch.equal(old[k], new[k]) for k in old if k in new and old[k].is_floating_point())
    capsys.readouterr()
