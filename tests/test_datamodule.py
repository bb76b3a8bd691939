"""Data modules: the batch contract, tokenisation and grounding positions, determinism per (seed, epoch), exact
resume through a real Trainer, and real formats (CSV, COCO, WebDataset) with setup errors and skipped samples."""

from __future__ import annotations

import io
import json
import tarfile
import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from pytorch_lightning.callbacks import ModelCheckpoint

from mmxattn.data.batching import EpochIndexed, ResumableSampler
from mmxattn.data.datamodule import ImageTextDataModule, ShapesDataModule
from mmxattn.data.formats import DatasetFormatError
from mmxattn.data.robust import DataSetupError
from mmxattn.data.shapes_render import COLOURS, SHAPE_PLURALS, SHAPES, SIZES
from mmxattn.losses import text_pos_ids

TRAIN_KEYS = {"images", "ids", "pos_ids", "image_ids", "captions", "skipped"}
EVAL_KEYS = {"images", "image_ids", "references", "ref_ids", "ref_image_index", "skipped"}


def _shapes(**kw) -> ShapesDataModule:
    args = dict(train_size=48, val_size=12, test_size=12, batch_size=8, num_workers=0)
    return ShapesDataModule(**{**args, **kw})


def _train_batches(dm, epoch: int = 0) -> list[dict]:
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(epoch)
    return list(loader)


def _check_eval_contract(b: dict, tok) -> None:
    assert EVAL_KEYS <= set(b)
    n = len(b["image_ids"])
    assert b["images"].dtype == torch.float32 and b["images"].shape[0] == n
    flat = [c for refs in b["references"] for c in refs]
    assert b["ref_ids"].dtype == torch.long and torch.equal(b["ref_ids"], tok(flat))
    expected = [i for i, refs in enumerate(b["references"]) for _ in refs]
    assert b["ref_image_index"].dtype == torch.long and b["ref_image_index"].tolist() == expected


# ---------------------------------------------------------------------------------------------------- shapes


def test_shapes_train_batch_contract_and_tokenizer_round_trip():
    dm = _shapes()
    b = next(iter(dm.train_dataloader()))
    assert set(b) == TRAIN_KEYS and b["skipped"] == []
    assert b["images"].shape == (8, 3, 64, 64) and b["images"].dtype == torch.float32
    assert b["ids"].shape == (8, dm.context_length) and b["ids"].dtype == torch.long
    assert torch.equal(b["pos_ids"], text_pos_ids(b["captions"]))
    assert dm.tokenizer.batch_decode(b["ids"]) == b["captions"]  # lowercase words: decoding is exact
    assert (b["ids"] < dm.vocab_size).all() and (b["ids"][:, 0] == dm.bos_id).all()
    assert dm.pad_id == 0 and dm.eos_id in b["ids"][0].tolist()
    ds = dm.dataset("train")
    for image_id, caption in zip(b["image_ids"], b["captions"]):  # each caption is one of its image's captions
        assert caption in ds[image_id]["captions"]
    # the vocabulary is the generator's, whatever the seed or size: a resumed run gets the same ids
    assert _shapes(seed=5, train_size=100).tokenizer.vocab == dm.tokenizer.vocab


def test_shapes_several_captions_per_image_in_a_train_batch():
    """train_captions_per_image=3: every image brings its drawn caption and the next two of its captions, the
    image is in the batch once, and text_image_index maps each caption row to it."""
    dm = _shapes(train_captions_per_image=3)
    one = _shapes()
    b, b1 = next(iter(dm.train_dataloader())), next(iter(one.train_dataloader()))
    assert set(b) == TRAIN_KEYS | {"text_image_index"}
    assert b["images"].shape == (8, 3, 64, 64) and b["ids"].shape == (24, dm.context_length)
    assert b["text_image_index"].tolist() == [i for i in range(8) for _ in range(3)]
    assert torch.equal(b["images"], b1["images"]) and b["image_ids"] == b1["image_ids"]  # same images, same order
    assert dm.tokenizer.batch_decode(b["ids"]) == b["captions"] and torch.equal(
        b["pos_ids"], text_pos_ids(b["captions"])
    )
    ds = dm.dataset("train")
    for i, image_id in enumerate(b["image_ids"]):
        caps = ds[image_id]["captions"]
        mine = b["captions"][3 * i : 3 * i + 3]
        assert mine[0] == b1["captions"][i]  # the caption the one-caption batch draws comes first
        j = caps.index(mine[0])
        assert mine == [caps[(j + d) % len(caps)] for d in range(3)]  # then the following ones, distinct
    with pytest.raises(ValueError, match="train_captions_per_image=6 > captions_per_image=5"):
        _shapes(train_captions_per_image=6)
    with pytest.raises(ValueError, match="train_captions_per_image must be >= 1"):
        _shapes(train_captions_per_image=0)


def test_shapes_eval_batches_hold_all_references_and_grounded_token_positions():
    dm = _shapes(captions_per_image=3)
    batches = list(dm.val_dataloader())
    assert sum(len(b["image_ids"]) for b in batches) == 12  # every val image, none dropped
    raw = dm.dataset("val")
    n_grounded = 0
    for b in batches:
        _check_eval_contract(b, dm.tokenizer)
        assert all(len(refs) == 3 for refs in b["references"])
        for k, image_id in enumerate(b["image_ids"]):
            sample = raw[image_id]
            assert b["references"][k] == sample["captions"]
            assert torch.allclose(b["boxes"][k], torch.as_tensor(sample["boxes"]))  # eval: no resize, same pixels
            labels = sample["labels"]
            for caption, ground, ids in zip(
                b["references"][k], b["groundings"][k], b["ref_ids"][b["ref_image_index"] == k]
            ):
                words = caption.split()
                for positions, obj in ground:
                    for p in positions:
                        word = dm.tokenizer.vocab[ids[p]]
                        assert word == words[p - 1]  # token position p holds word p - 1
                        shape, colour, size = labels[obj]
                        assert word in (SHAPES[shape], SHAPE_PLURALS[shape], COLOURS[colour], SIZES[size])
                        n_grounded += 1
    assert n_grounded > 20


def test_shapes_same_seed_same_batches_and_captions_change_with_epoch():
    a, b = _train_batches(_shapes()), _train_batches(_shapes())
    assert [x["image_ids"] for x in a] == [x["image_ids"] for x in b]
    assert all(torch.equal(x["images"], y["images"]) and torch.equal(x["ids"], y["ids"]) for x, y in zip(a, b))
    other = _train_batches(_shapes(seed=1))
    assert [x["captions"] for x in other] != [x["captions"] for x in a]

    def captions_by_image(batches):
        return {i: c for x in batches for i, c in zip(x["image_ids"], x["captions"])}

    e0, e1 = captions_by_image(a), captions_by_image(_train_batches(_shapes(), epoch=1))
    assert len(e0) == 48 and set(e0) == set(e1)  # drop_last with 48 = 6 x 8: every image once per epoch
    assert sum(e0[i] != e1[i] for i in e0) >= 24  # 5 captions per image: most change between epochs


def test_shapes_persistent_workers_see_the_epoch():
    """Workers keep their copy of the data set across epochs; the epoch must reach them through the indices."""
    dm = _shapes(num_workers=2)
    loader = dm.train_dataloader()
    assert loader.persistent_workers and loader.pin_memory == torch.cuda.is_available()
    epochs = []
    for epoch in range(2):
        dm.set_epoch(epoch)
        epochs.append({i: c for x in loader for i, c in zip(x["image_ids"], x["captions"])})
    reference = [_train_batches(_shapes(), epoch=e) for e in range(2)]
    for got, ref in zip(epochs, reference):
        assert got == {i: c for x in ref for i, c in zip(x["image_ids"], x["captions"])}  # same as num_workers=0


def test_flip_augmentation_is_a_function_of_seed_epoch_and_index():
    def flips(num_workers):
        dm = _shapes(flip=True, num_workers=num_workers)
        return [c for x in _train_batches(dm) for c in x["captions"]]

    assert flips(0) == flips(0)
    assert flips(0) == flips(2)  # not of the worker that loads the sample


def test_epoch_indexed_seeds_the_cpu_generator_only_and_restores_it(monkeypatch):
    """Each sample's random draws are a function of (seed, epoch, index); the caller's CPU RNG state is restored, and
    no accelerator generator is reseeded (fork_rng(devices=[]) would not restore it: on a GPU with num_workers=0
    every batch would reset the training process's CUDA dropout RNG)."""
    reseeded = []
    for mod in (torch.cuda, getattr(torch, "xpu", None), getattr(torch, "mtia", None)):
        if mod is not None and hasattr(mod, "manual_seed_all"):
            monkeypatch.setattr(mod, "manual_seed_all", lambda *a, **k: reseeded.append(a))
    ds = EpochIndexed(
        type("D", (), {"__len__": lambda self: 4, "__getitem__": lambda self, i: torch.rand(3)})(), seed=7
    )
    torch.manual_seed(123)
    reseeded.clear()  # that call was ours
    before = torch.get_rng_state()
    first = [ds[code] for code in range(8)]  # epochs 0 and 1
    assert torch.equal(torch.get_rng_state(), before)
    assert all(torch.equal(a, b) for a, b in zip(first, [ds[code] for code in range(8)]))
    assert not torch.equal(first[0], first[4]) and not torch.equal(first[0], first[1])
    assert reseeded == []


def test_resumable_sampler_partitions_ranks_and_skips():
    ds = EpochIndexed(list(range(20)))
    shares = [list(ResumableSampler(ds, 2, r, seed=3)) for r in range(2)]
    assert sorted(shares[0] + shares[1]) == list(range(20)) and len(shares[0]) == 10
    s = ResumableSampler(ds, 2, 0, seed=3)
    s.set_epoch(4)
    full = list(s)
    assert all(c // 20 == 4 for c in full) and [c % 20 for c in full] != [c % 20 for c in shares[0]]
    s.resume(4, 6)
    assert list(s) == full[6:] and list(s) == full  # the skip applies to one pass only
    assert len(s) == 10


def test_shapes_setup_errors():
    with pytest.raises(ValueError, match="holdout"):
        _shapes(holdout=["red"])
    with pytest.raises(ValueError, match="holdout"):
        _shapes(holdout=["pink circle"])
    with pytest.raises(ValueError, match="context_length"):
        _shapes(context_length=10)
    dm = _shapes(holdout=["red circle"])
    assert dm.dataset("train").holdout == (("red", "circle"),)


# -------------------------------------------------------------------------------------------- exact resume


class _Recorder(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[tuple[int, list, list]] = []

    def training_step(self, batch, batch_idx):
        self.trainer.datamodule.skip_tracker.update_from_batch(batch)
        self.seen.append((self.current_epoch, list(batch["image_ids"]), list(batch["captions"])))
        return (self.w - batch["images"].mean()) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _recording_trainer(tmp_path: Path, max_epochs: int, callbacks=()) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=bool(callbacks),
        callbacks=list(callbacks),
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )


def _fit(tmp_path: Path, ckpt: str | None = None, callbacks=(), num_workers: int = 0, **dm_kw) -> list:
    model = _Recorder()
    trainer = _recording_trainer(tmp_path, 2, callbacks)
    trainer.fit(model, datamodule=_shapes(train_size=32, num_workers=num_workers, **dm_kw), ckpt_path=ckpt)
    return model.seen


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.filterwarnings("ignore::pytorch_lightning.utilities.warnings.PossibleUserWarning")
@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_from_mid_epoch_and_epoch_end_sees_the_same_batches(tmp_path, num_workers):
    """Lightning creates the resumed run's first iterator before it calls set_epoch (and workers fetch at once):
    the position must come from the restored loop progress. Step 4 is the last batch of epoch 0, "ends/epoch=0"
    is saved in on_train_epoch_end (epoch already counted as processed)."""
    every_step = ModelCheckpoint(tmp_path / "steps", every_n_train_steps=1, save_top_k=-1, filename="{step}")
    epoch_end = ModelCheckpoint(tmp_path / "ends", save_on_train_epoch_end=True, save_top_k=-1, filename="{epoch}")
    full = _fit(tmp_path, callbacks=[every_step, epoch_end], num_workers=num_workers)
    assert len(full) == 8 and [e for e, _, _ in full] == [0] * 4 + [1] * 4
    cases = [("steps/step=2.ckpt", 2), ("steps/step=4.ckpt", 4), ("steps/step=5.ckpt", 5), ("ends/epoch=0.ckpt", 4)]
    for ckpt, done in cases if num_workers == 0 else cases[:1]:
        assert _fit(tmp_path, ckpt=str(tmp_path / ckpt), num_workers=num_workers) == full[done:], ckpt


@pytest.mark.filterwarnings("ignore::pytorch_lightning.utilities.warnings.PossibleUserWarning")
def test_resume_with_another_batch_size_continues_after_the_samples_already_trained(tmp_path):
    """Saved after 2 batches of 8 (16 samples), resumed with batch_size 4: the rest of epoch 0 is its samples
    16..31 (not 8..31, which 2 batches of the NEW size would say), with a warning."""
    every_step = ModelCheckpoint(tmp_path / "steps", every_n_train_steps=1, save_top_k=-1, filename="{step}")
    full = _fit(tmp_path, callbacks=[every_step], batch_size=8)
    with pytest.warns(UserWarning, match="batch_size 4 instead of the saved run's 8"):
        rest = _fit(tmp_path, ckpt=str(tmp_path / "steps/step=2.ckpt"), batch_size=4)
    epoch0 = [i for e, ids, _ in full if e == 0 for i in ids]
    assert [ids for e, ids, _ in rest if e == 0] == [epoch0[16:20], epoch0[20:24], epoch0[24:28], epoch0[28:32]]
    assert len([e for e, _, _ in rest if e == 1]) == 8  # the next epoch is whole, in batches of 4
    # a LARGER batch: Lightning counted 3 batches (of 4) done against the new epoch's 4 batches of 8, so only one
    # more ran and 8 samples of the epoch were never trained; now the rest, samples 12..27, come in 2 batches of 8
    # (the last 4 do not fill a batch: drop_last, as in every epoch)
    full4 = _fit(
        tmp_path / "b4",
        callbacks=[ModelCheckpoint(tmp_path / "b4", every_n_train_steps=1, save_top_k=-1, filename="{step}")],
        batch_size=4,
    )
    with pytest.warns(UserWarning, match="batch_size 8 instead of the saved run's 4"):
        rest = _fit(tmp_path, ckpt=str(tmp_path / "b4/step=3.ckpt"), batch_size=8)
    epoch0 = [i for e, ids, _ in full4 if e == 0 for i in ids]
    assert [ids for e, ids, _ in rest if e == 0] == [epoch0[12:20], epoch0[20:28]]
    assert len([e for e, _, _ in rest if e == 1]) == 4


def test_a_training_split_smaller_than_one_batch_is_an_error():
    dm = _shapes(train_size=6, batch_size=8)
    with pytest.raises(DatasetFormatError, match=r"train_size=6\).* 6 items, fewer than one batch"):
        dm.setup("fit")  # at setup, before the trainer's sanity check and the first step
    with pytest.raises(ValueError, match="fewer than one batch"):
        dm.train_dataloader()


def test_a_csv_training_split_smaller_than_one_batch_names_the_file_at_setup(csv_data):
    (csv_data / "tiny.csv").write_text("filepath,title\n0.jpg,a photo\n1.jpg,another photo\n")
    for tokenizer in ("word", "openclip"):  # the train file read at construction, or at setup
        dm = ImageTextDataModule(
            **_csv_module_kwargs(csv_data, train_path=str(csv_data / "tiny.csv"), tokenizer=tokenizer)
        )
        with pytest.raises(DatasetFormatError, match=r"train_path .*tiny\.csv: the training split has 2 items, fewer"):
            dm.setup("fit")
    dm.setup("validate")  # no training: no batch-size requirement


# ---------------------------------------------------------------------------------------------- real formats


def _jpeg(path: Path, colour=(200, 40, 40)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), colour).save(path, format="JPEG")


@pytest.fixture
def csv_data(tmp_path: Path) -> Path:
    for k in range(6):
        _jpeg(tmp_path / "imgs" / f"{k}.jpg", (40 * k, 100, 50))
    rows = [f"{k}.jpg,a photo number {k}" for k in range(6)] + ["0.jpg,another photo of zero", "missing.jpg,gone"]
    (tmp_path / "train.csv").write_text("filepath,title\n" + "\n".join(rows) + "\n")
    return tmp_path


def _csv_module_kwargs(csv_data: Path, **overrides) -> dict:
    """ImageTextDataModule arguments over the csv_data fixture: word tokenizer, 32 px, in-process loading."""
    kw = dict(
        train_path=str(csv_data / "train.csv"),
        image_root=str(csv_data / "imgs"),
        tokenizer="word",
        img_size=32,
        batch_size=8,
        num_workers=0,
        context_length=12,
    )
    return {**kw, **overrides}


def test_csv_datamodule_batches_and_skipped_rows(csv_data):
    csv = _csv_module_kwargs(csv_data)
    dm = ImageTextDataModule(**csv, val_path=str(csv_data / "train.csv"))
    assert dm.vocab_size == len(dm.tokenizer.vocab) and "photo" in dm.tokenizer.vocab
    b = next(iter(dm.train_dataloader()))  # 8 pairs, one of them a missing file
    assert set(b) == TRAIN_KEYS and b["images"].shape == (7, 3, 32, 32) and b["ids"].shape == (7, 12)
    assert [reason for _, reason in b["skipped"]] == ["file not found"] and "missing.jpg" in b["skipped"][0][0]
    assert dm.tokenizer.batch_decode(b["ids"]) == b["captions"]
    # several captions per pair: an image with two captions brings both (the drawn one first), others their one
    dm2 = ImageTextDataModule(**csv, train_captions_per_image=2)
    b2 = next(iter(dm2.train_dataloader()))
    assert b2["image_ids"] == b["image_ids"] and b2["text_image_index"].shape == (b2["ids"].shape[0],)
    for i, image_id in enumerate(b2["image_ids"]):
        mine = [c for c, k in zip(b2["captions"], b2["text_image_index"].tolist()) if k == i]
        assert mine[0] == b["captions"][i]
        assert len(mine) == (2 if image_id == "0.jpg" else 1), (image_id, mine)
    dm.skip_tracker.update_from_batch(b)
    assert dm.skip_tracker.summary()["n_skipped"] == 1
    v = list(dm.val_dataloader())
    refs = {i: r for x in v for i, r in zip(x["image_ids"], x["references"])}
    assert refs["0.jpg"] == ["a photo number 0", "another photo of zero"] and len(refs) == 6
    for x in v:
        _check_eval_contract(x, dm.tokenizer)


def test_evaluation_counts_broken_samples_and_refuses_an_all_broken_split(csv_data):
    """evaluate() over a split with a missing image: the metrics are over the readable images, n_skipped says how
    many were dropped, and a warning names them; a split with no readable image is a BadDataError naming them."""
    import mmxattn
    from mmxattn.data.robust import BadDataError
    from mmxattn.evaluate import evaluate

    test_csv = csv_data / "test.csv"
    test_csv.write_text("filepath,title\n0.jpg,a photo\n1.jpg,a photo number 1\nmissing.jpg,gone\n")
    dm = ImageTextDataModule(**_csv_module_kwargs(csv_data, img_size=64), test_path=str(test_csv))
    t = dm.tokenizer
    model = mmxattn.create_model(
        "mmx_tiny", vocab_size=t.vocab_size, pad_id=t.pad_id, bos_id=t.bos_id, eos_id=t.eos_id, context_length=12
    ).eval()
    with pytest.warns(UserWarning, match="1 broken sample.*missing.jpg"):
        out = evaluate(model, dm, "test", rerank=0, meteor=False, gen_kwargs={"max_new_tokens": 3})
    assert (out["n_images"], out["n_skipped"]) == (2, 1)
    for name in ("empty.jpg", "text.jpg"):  # files that exist but are not images
        (csv_data / "imgs" / name).write_bytes(b"" if name == "empty.jpg" else b"<html>not an image</html>")
    test_csv.write_text("filepath,title\nempty.jpg,gone\ntext.jpg,gone too\n")
    dm = ImageTextDataModule(**_csv_module_kwargs(csv_data, img_size=64), test_path=str(test_csv))
    with pytest.raises(BadDataError, match="every one of the 2 samples.*empty.jpg: empty file"):
        evaluate(model, dm, "test", rerank=0, meteor=False, gen_kwargs={"max_new_tokens": 3})


def test_csv_datamodule_per_image_items(csv_data):
    """train_items="images": an epoch is every image once (7 items: 6 images and the missing file, not 8 pairs), each
    with K of its captions; the drawn caption depends on (seed, epoch, index), so a rerun sees the same batches."""
    kw = _csv_module_kwargs(csv_data, batch_size=7, train_captions_per_image=2)
    dm = ImageTextDataModule(**kw, train_items="images")
    loader = dm.train_dataloader()
    assert len(loader.dataset) == 7  # 6 images + the missing one (a counted skip), not 8 pairs
    epochs, first_of_zero = [], set()
    for epoch in range(8):
        dm.set_epoch(epoch)
        (b,) = list(loader)
        assert sorted(b["image_ids"]) == [f"{k}.jpg" for k in range(6)] and len(b["skipped"]) == 1
        zero = [c for c, k in zip(b["captions"], b["text_image_index"].tolist()) if b["image_ids"][k] == "0.jpg"]
        assert sorted(zero) == ["a photo number 0", "another photo of zero"]  # K = 2: both, the drawn one first
        epochs.append((b["image_ids"], b["captions"]))
        first_of_zero.add(zero[0])
    assert len(first_of_zero) == 2  # the drawn caption changes with the epoch
    again = ImageTextDataModule(**kw, train_items="images").train_dataloader()
    (b0,) = list(again)
    assert (b0["image_ids"], b0["captions"]) == epochs[0]
    with pytest.raises(ValueError, match="train_items must be 'pairs' or 'images'"):
        ImageTextDataModule(**kw, train_items="image")


def test_csv_setup_errors_name_the_file(csv_data):
    (csv_data / "bad.csv").write_text("path,title\n0.jpg,x\n")
    with pytest.raises(DatasetFormatError, match=r"bad\.csv.*missing column.*'filepath'"):
        ImageTextDataModule(train_path=str(csv_data / "bad.csv"), image_root=str(csv_data / "imgs")).setup("fit")
    dm = ImageTextDataModule(train_path=str(csv_data / "train.csv"), image_root=str(csv_data))  # wrong root
    with pytest.raises(FileNotFoundError, match=r"train_path.*train\.csv.*image_root") as ei:
        dm.setup("fit")
    assert isinstance(ei.value, DataSetupError)  # train.py prints it as one error line (it comes from inside fit)
    with pytest.raises(FileNotFoundError, match="val_path 'nope.csv'"):
        ImageTextDataModule(train_path=str(csv_data / "train.csv"), val_path="nope.csv")
    with pytest.raises(DatasetFormatError, match=r"bad\.csv"):  # the word tokenizer reads the file at construction
        ImageTextDataModule(train_path=str(csv_data / "bad.csv"), tokenizer="word")
    with pytest.raises(ValueError, match="format"):
        ImageTextDataModule(format="parquet")


def test_coco_datamodule_with_openclip_tokenizer(tmp_path):
    for k in range(3):
        _jpeg(tmp_path / "val2014" / f"{k}.jpg")
    ann = {
        "images": [{"id": 10 + k, "file_name": f"{k}.jpg"} for k in range(3)],
        "annotations": [{"id": n, "image_id": 10 + n % 3, "caption": f"A red square, take {n}."} for n in range(7)],
    }
    (tmp_path / "captions.json").write_text(json.dumps(ann))
    dm = ImageTextDataModule(
        format="coco",
        train_path=str(tmp_path / "captions.json"),
        test_path=str(tmp_path / "captions.json"),
        image_root=str(tmp_path / "val2014"),
        img_size=32,
        batch_size=4,
        num_workers=0,
        normalization="openai",
    )
    assert dm.vocab_size == 49409 and dm.pad_id == 49408 and dm.context_length == 32
    b = next(iter(dm.train_dataloader()))
    assert set(b) == TRAIN_KEYS and b["ids"].shape == (4, 32) and (b["ids"][:, 0] == dm.bos_id).all()
    (t,) = list(dm.test_dataloader())
    _check_eval_contract(t, dm.tokenizer)
    assert t["image_ids"] == [10, 11, 12] and [len(r) for r in t["references"]] == [3, 2, 2]


def _shard(path: Path, samples: list[tuple[str, bytes | None, dict]]) -> None:
    with tarfile.open(path, "w") as tf:
        for key, jpg, meta in samples:
            for ext, data in (("jpg", jpg), ("json", json.dumps(meta).encode())):
                if data is None:
                    continue
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def test_wds_datamodule_train_and_eval(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (24, 24), (10, 200, 10)).save(buf, format="JPEG")
    jpg = buf.getvalue()
    for s in range(2):
        samples = [(f"s{s}_bad", b"not a jpeg", {"captions": ["broken"]})]  # first: never in the dropped tail
        samples += [(f"s{s}_{k}", jpg, {"captions": [f"green {s} {k}", f"a green tile {k}"]}) for k in range(4)]
        _shard(tmp_path / f"shard-{s}.tar", samples)
    dm = ImageTextDataModule(
        format="wds",
        train_path=str(tmp_path / "shard-{0..1}.tar"),
        val_path=str(tmp_path),
        tokenizer="openclip",
        img_size=32,
        batch_size=4,
        num_workers=0,
        shuffle_buffer=0,
    )
    batches = list(dm.train_dataloader())
    assert all(set(b) == TRAIN_KEYS for b in batches)
    assert sum(len(b.get("captions", [])) + len(b["skipped"]) for b in batches) == 16  # 18 entries, drop_last
    assert sum(len(b["skipped"]) for b in batches) == 2  # the two undecodable images, once each
    v = list(dm.val_dataloader())
    refs = [r for x in v for r in x["references"]]
    assert len(refs) == 8 and all(len(r) == 2 for r in refs)
    for x in v:
        _check_eval_contract(x, dm.tokenizer)


def test_wds_datamodule_fixed_epoch_length_and_the_ddp_warning(tmp_path, monkeypatch):
    buf = io.BytesIO()
    Image.new("RGB", (24, 24), (10, 200, 10)).save(buf, format="JPEG")
    _shard(tmp_path / "shard-0.tar", [(f"k{k}", buf.getvalue(), {"captions": [f"green {k}"]}) for k in range(3)])
    kw = dict(format="wds", train_path=str(tmp_path), tokenizer="openclip", img_size=32, batch_size=4, num_workers=0)
    dm = ImageTextDataModule(**kw, samples_per_epoch=10)
    batches = list(dm.train_dataloader())  # 10 items from 3 samples, 2 full batches (drop_last)
    assert [len(b["captions"]) for b in batches] == [4, 4]
    assert dm.val_dataloader() == []  # the fixed length is the train stream's only
    monkeypatch.setattr(ImageTextDataModule, "_replicas", lambda self: (2, 0))
    with pytest.warns(UserWarning, match="samples_per_epoch"):
        ImageTextDataModule(**kw).train_dataloader()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ImageTextDataModule(**kw, samples_per_epoch=8).train_dataloader()
    with pytest.raises(ValueError, match="samples_per_epoch is for WebDataset"):
        ImageTextDataModule(format="csv", samples_per_epoch=8)


class _EpochSettingRecorder(_Recorder):
    def on_train_epoch_start(self) -> None:  # as MMXAttnModule does
        self.trainer.datamodule.set_epoch(self.current_epoch)


def _fit_wds(tmp_path: Path, num_workers: int, hook: bool, ckpt: str | None = None, callbacks=()) -> list:
    model = _EpochSettingRecorder() if hook else _Recorder()
    trainer = _recording_trainer(tmp_path, 3, callbacks)
    dm = ImageTextDataModule(format="wds", train_path=str(tmp_path / "shards"), tokenizer="openclip", img_size=16,
                             batch_size=4, num_workers=num_workers, shuffle_buffer=0)  # fmt: skip
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt)
    return model.seen


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.filterwarnings("ignore::pytorch_lightning.utilities.warnings.PossibleUserWarning")
@pytest.mark.parametrize("num_workers, hook", [(0, False), (0, True), (1, True)])
def test_wds_resumed_run_sees_the_uninterrupted_runs_epoch_order(tmp_path, num_workers, hook):
    """Shard order is a function of (seed, epoch): a run resumed at epoch 1 must not replay epoch 0's order.
    Lightning only sets samplers' epochs; the data module gives the stream the restored epoch (and ``set_epoch``,
    which MMXAttnModule calls, reaches it), before persistent workers take their copy."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 200, 10)).save(buf, format="JPEG")
    (tmp_path / "shards").mkdir()
    for s in range(6):
        _shard(tmp_path / "shards" / f"s{s}.tar", [(f"s{s}_{k}", buf.getvalue(), {"captions": [f"shard {s}"]}) for k in range(2)])  # fmt: skip
    every_step = ModelCheckpoint(tmp_path / "steps", every_n_train_steps=1, save_top_k=-1, filename="{step}")
    epoch_end = ModelCheckpoint(tmp_path / "ends", save_on_train_epoch_end=True, save_top_k=-1, filename="{epoch}")
    full = _fit_wds(tmp_path, num_workers, hook, callbacks=[every_step, epoch_end])
    orders = [[c for e, _, caps in full if e == epoch for c in caps] for epoch in range(3)]
    assert len(full) == 9 and len({tuple(o) for o in orders}) == 3  # 3 batches of 4 per epoch, orders differ
    # saved at the epoch's end, and at its last batch (Lightning then counts the epoch as done when it restores)
    for ckpt in ("ends/epoch=0.ckpt", "steps/step=3.ckpt", "ends/epoch=1.ckpt"):
        done = 6 if ckpt == "ends/epoch=1.ckpt" else 3
        assert _fit_wds(tmp_path, num_workers, hook, ckpt=str(tmp_path / ckpt)) == full[done:], ckpt
