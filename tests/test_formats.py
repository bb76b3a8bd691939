"""CSV/TSV, COCO (official and Karpathy) and WebDataset loaders: parsing, grouping, modes, setup errors, and the
exactly-once split of shards over DataLoader workers and ranks."""

from __future__ import annotations

import io
import json
import tarfile
import warnings
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image
from torch.utils.data import DataLoader

from mmxattn.data.formats import CocoCaptionsDataset, CsvDataset, DatasetFormatError, WebDatasetCaptions
from mmxattn.data.robust import BrokenSample, SkipTracker, collate_skipping


def _img(path: Path, size=(16, 16), color=(120, 60, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def _items(ds) -> list:
    return [ds[i] for i in range(len(ds))] if hasattr(ds, "__getitem__") else list(ds)


def _ok(items) -> list[dict]:
    return [x for x in items if not isinstance(x, BrokenSample)]


# ------------------------------------------------------------------------------------------------------ CSV


def test_csv_groups_captions_per_image_in_train_and_eval(tmp_path):
    for name in ("a.png", "b.png", "c.png"):
        _img(tmp_path / "imgs" / name)
    (tmp_path / "d.csv").write_text(
        'filepath,title\na.png,a one\nb.png,"b, with comma"\na.png,a two\nc.png,c one\na.png,a three\n'
    )
    train = CsvDataset(tmp_path / "d.csv", image_root=tmp_path / "imgs")
    assert len(train) == 5  # one item per (image, caption) pair
    s = train[0]
    assert set(s) == {"image", "caption", "captions", "image_id", "path", "key"}
    assert s["image"].mode == "RGB" and s["caption"] == "a one" and s["captions"] == ["a one", "a two", "a three"]
    assert s["image_id"] == "a.png" and s["path"] == str(tmp_path / "imgs" / "a.png")
    assert sorted(x["caption"] for x in _items(train)) == ["a one", "a three", "a two", "b, with comma", "c one"]

    ev = CsvDataset(tmp_path / "d.csv", image_root=tmp_path / "imgs", mode="eval", transform=lambda im: im.size)
    assert [(x["key"], x["captions"]) for x in _items(ev)] == [
        ("a.png", ["a one", "a two", "a three"]),
        ("b.png", ["b, with comma"]),
        ("c.png", ["c one"]),
    ]
    assert ev[0]["image"] == (16, 16)  # transform applied


def test_csv_train_images_mode_draws_one_caption_per_image(tmp_path):
    """mode="train_images": one item per image, its caption drawn from torch's RNG (seeded per sample by the loader)."""
    import torch

    for name in ("a.png", "b.png"):
        _img(tmp_path / "imgs" / name)
    (tmp_path / "d.csv").write_text("filepath,title\na.png,a one\nb.png,b one\na.png,a two\na.png,\na.png,a three\n")
    with pytest.warns(UserWarning, match="1 unusable caption"):
        ds = CsvDataset(tmp_path / "d.csv", image_root=tmp_path / "imgs", mode="train_images")
    assert len(ds) == 2 and [ds[i]["key"] for i in range(2)] == ["a.png", "b.png"]
    drawn = set()
    for seed in range(30):
        torch.manual_seed(seed)
        x = ds[0]
        assert x["captions"] == ["a one", "a two", "a three"] and x["caption"] in x["captions"]
        drawn.add(x["caption"])
        torch.manual_seed(seed)
        assert ds[0]["caption"] == x["caption"]  # a function of the RNG state only
    assert drawn == {"a one", "a two", "a three"}
    with pytest.raises(ValueError, match="mode must be one of"):
        CsvDataset(tmp_path / "d.csv", image_root=tmp_path / "imgs", mode="pairs")


def test_tsv_separator_columns_and_absolute_paths(tmp_path):
    absolute = _img(tmp_path / "elsewhere" / "x.png")
    _img(tmp_path / "rel.png")
    (tmp_path / "d.tsv").write_text(f"id\timage\ttext\n1\trel.png\ta, b and c\n2\t{absolute}\tsecond\n")
    ds = CsvDataset(tmp_path / "d.tsv", img_key="image", caption_key="text")  # tab from the extension
    assert [(x["path"], x["caption"]) for x in _items(ds)] == [
        (str(tmp_path / "rel.png"), "a, b and c"),
        (str(absolute), "second"),
    ]
    (tmp_path / "d.txt").write_text("filepath;title\nrel.png;semi\n")
    assert CsvDataset(tmp_path / "d.txt", sep=";")[0]["caption"] == "semi"


def test_csv_bad_captions_are_counted_markers(tmp_path):
    _img(tmp_path / "a.png")
    _img(tmp_path / "b.png")
    raw = b"filepath,title\na.png,good one\na.png,   \nb.png,caf\xe9 latin-1\nb.png,\n,no path here\n"
    (tmp_path / "d.csv").write_bytes(raw)
    with pytest.warns(UserWarning, match="unusable caption"):
        train = CsvDataset(tmp_path / "d.csv")
    items = _items(train)
    broken = [x for x in items if isinstance(x, BrokenSample)]
    assert len(_ok(items)) == 1 and len(broken) == 4
    reasons = Counter(b.reason for b in broken)
    assert reasons == {"empty caption": 2, "caption not valid UTF-8": 1, "empty 'filepath' (image path)": 1}
    assert any("line 4" in b.source for b in broken)  # names the row of the non-UTF-8 caption
    with pytest.warns(UserWarning):
        ev = CsvDataset(tmp_path / "d.csv", mode="eval")
    by_key = {x["key"]: x for x in _items(ev) if not isinstance(x, BrokenSample)}
    assert by_key["a.png"]["captions"] == ["good one"]  # eval keeps the image, drops its bad caption
    assert "b.png" not in by_key  # no valid caption left: a marker instead


def test_csv_skip_messages_name_the_first_line_of_a_record(tmp_path):
    """A quoted caption can span lines: skip messages count physical lines, not records."""
    for name in ("a.png", "b.png"):
        _img(tmp_path / name)
    (tmp_path / "d.csv").write_text('filepath,title\na.png,"a caption\nspanning\nthree lines"\nb.png,   \n,x\n')
    with pytest.warns(UserWarning, match="line 5"):
        ds = CsvDataset(tmp_path / "d.csv")
    assert ds.caption_issues == [("d.csv line 5 (b.png)", "empty caption")]
    assert [x.source for x in _items(ds) if isinstance(x, BrokenSample)][0] == f"{tmp_path / 'd.csv'} line 6"
    assert _ok(_items(ds))[0]["caption"] == "a caption\nspanning\nthree lines"


def test_csv_unbalanced_quote_is_an_error_naming_file_and_line(tmp_path):
    """An opening quote that is never closed used to swallow every following row into one caption."""
    for name in "abcd":
        _img(tmp_path / f"{name}.png")
    (tmp_path / "q.csv").write_text('filepath,title\na.png,ok\nb.png,"best day ever\nc.png,a cat\nd.png,a car\n')
    with pytest.raises(DatasetFormatError, match=r"q\.csv line 3: malformed CSV .*runs on to line 5.*unbalanced"):
        CsvDataset(tmp_path / "q.csv")
    (tmp_path / "mid.csv").write_text('filepath,title\na.png,"quoted" then more\n')  # closed mid-field
    with pytest.raises(DatasetFormatError, match=r"mid\.csv line 2: malformed CSV"):
        CsvDataset(tmp_path / "mid.csv")
    # in a large file the swallowed rows overflow the csv module's field limit: the same error, not a raw csv.Error
    rows = "".join(f"a.png,an ordinary caption number {i}\n" for i in range(4000))
    (tmp_path / "big.csv").write_text('filepath,title\na.png,"best day ever\n' + rows)
    with pytest.raises(DatasetFormatError, match=r"big\.csv line 2: malformed CSV \(field larger than field limit"):
        CsvDataset(tmp_path / "big.csv")


def test_csv_rows_merged_by_a_quote_closed_in_a_later_row_are_warned(tmp_path):
    """An unbalanced quote that a later stray quote closes is valid CSV (one long multi-line caption), so it cannot be
    an error; the continued lines that start with an image path and the separator give it away: a warning naming the
    record's line. A caption that legitimately spans lines (with commas) gives none."""
    for name in "abcd":
        _img(tmp_path / f"{name}.png")
    (tmp_path / "m.csv").write_text('filepath,title\na.png,ok\nb.png,"best day ever\nc.png,a cat\nd.png,a 12"\n')
    with pytest.warns(UserWarning, match=r"m\.csv: 1 caption\(s\) span several lines .*line 3\)"):
        ds = CsvDataset(tmp_path / "m.csv", mode="eval")
    assert len(ds) == 2  # what the warning is about: c.png and d.png were swallowed into b.png's caption
    assert ds[1]["captions"] == ["best day ever\nc.png,a cat\nd.png,a 12"]
    (tmp_path / "fine.csv").write_text('filepath,title\na.png,"a caption, then\non a new line, more"\nb.png,x\n')
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(CsvDataset(tmp_path / "fine.csv", mode="eval")) == 2


def test_tsv_has_no_quoting(tmp_path):
    """TSV (.tsv/.tab) fields hold quotes literally, as web alt-text does; CSV quoting is for .csv files."""
    for name in "abcd":
        _img(tmp_path / f"{name}.png")
    (tmp_path / "d.tsv").write_text('filepath\ttitle\na.png\t"best day ever\nb.png\ta dog\nc.png\t12" ruler\n')
    ds = CsvDataset(tmp_path / "d.tsv", mode="eval")
    assert [(x["key"], x["captions"]) for x in _items(ds)] == [
        ("a.png", ['"best day ever']),
        ("b.png", ["a dog"]),
        ("c.png", ['12" ruler']),
    ]
    # a caption wrapped in quotes is kept as written, with a warning (the file may have been written with quoting)
    (tmp_path / "w.tsv").write_text('filepath\ttitle\na.png\t"a ""red"" car"\n')
    with pytest.warns(UserWarning, match=r"1 caption\(s\) are wrapped in double quotes.*name it \.csv"):
        assert CsvDataset(tmp_path / "w.tsv")[0]["caption"] == '"a ""red"" car"'
    (tmp_path / "w.csv").write_text('filepath\ttitle\na.png\t"a ""red"" car"\n')  # the way to read such a file
    assert CsvDataset(tmp_path / "w.csv", sep="\t")[0]["caption"] == 'a "red" car'


def test_csv_same_image_spelled_differently_is_one_image(tmp_path):
    for name in ("a.png", "b.png"):
        _img(tmp_path / "imgs" / name)
    absolute = tmp_path / "imgs" / "a.png"
    (tmp_path / "d.csv").write_text(f"filepath,title\na.png,one\n./a.png,two\n{absolute},three\nb.png,four\n")
    ev = CsvDataset(tmp_path / "d.csv", image_root=tmp_path / "imgs", mode="eval")
    assert [(x["path"], x["captions"]) for x in _items(ev)] == [
        (str(absolute), ["one", "two", "three"]),
        (str(tmp_path / "imgs" / "b.png"), ["four"]),
    ]


def test_csv_setup_errors_name_file_and_problem(tmp_path):
    _img(tmp_path / "a.png")
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        CsvDataset(tmp_path / "nope.csv")
    (tmp_path / "cols.csv").write_text("image,caption\na.png,x\n")
    with pytest.raises(DatasetFormatError) as ei:
        CsvDataset(tmp_path / "cols.csv")
    msg = str(ei.value)
    assert "cols.csv" in msg and "'filepath'" in msg and "'title'" in msg and "['image', 'caption']" in msg
    (tmp_path / "tabs.csv").write_text("filepath\ttitle\na.png\tx\n")
    with pytest.raises(DatasetFormatError, match="separator"):
        CsvDataset(tmp_path / "tabs.csv")
    (tmp_path / "empty.csv").write_text("filepath,title\n")
    with pytest.raises(DatasetFormatError, match="empty.csv.*empty"):
        CsvDataset(tmp_path / "empty.csv")
    (tmp_path / "ok.csv").write_text("filepath,title\na.png,x\n")
    (tmp_path / "wrong").mkdir()
    with pytest.raises(FileNotFoundError) as ei:
        CsvDataset(tmp_path / "ok.csv", image_root=tmp_path / "wrong")
    assert str(tmp_path / "wrong") in str(ei.value) and str(tmp_path / "wrong" / "a.png") in str(ei.value)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        CsvDataset(tmp_path / "ok.csv", image_root=tmp_path / "missing_root")
    with pytest.raises(ValueError, match="mode"):
        CsvDataset(tmp_path / "ok.csv", mode="test")


def test_csv_missing_columns_of_a_json_file_are_short_and_suggest_coco(tmp_path):
    _img(tmp_path / "a.png")
    coco = {"images": [{"id": i, "file_name": "a.png"} for i in range(300)], "annotations": []}
    for name in ("captions.json", "captions.csv"):  # by name, or by content
        (tmp_path / name).write_text(json.dumps(coco))
        with pytest.raises(DatasetFormatError) as ei:
            CsvDataset(tmp_path / name)
        msg = str(ei.value)
        assert name in msg and "missing column(s) 'filepath'" in msg and "--data.init_args.format coco" in msg
        assert len(msg) < 600 and "characters)" in msg, len(msg)  # the "header" was the whole file
    (tmp_path / "wide.csv").write_text(",".join(f"column_{i}" for i in range(100)) + "\n" + "x," * 99 + "x\n")
    with pytest.raises(DatasetFormatError) as ei:
        CsvDataset(tmp_path / "wide.csv")
    assert "format coco" not in str(ei.value) and len(str(ei.value)) < 500 and "'column_0'" in str(ei.value)


@pytest.mark.parametrize("mode", ["train", "train_images", "eval"])
def test_a_split_whose_every_row_is_unusable_is_a_setup_error(tmp_path, mode):
    _img(tmp_path / "a.png")
    _img(tmp_path / "b.png")
    (tmp_path / "v.csv").write_text('filepath,title\na.png,\nb.png," "\na.png,\n,no image path\n')
    with pytest.raises(DatasetFormatError) as ei:
        CsvDataset(tmp_path / "v.csv", mode=mode)
    msg = str(ei.value)
    assert "v.csv: the split has no usable sample: all 4 entries are unusable" in msg
    assert "3 x empty caption" in msg and "1 x empty 'filepath'" in msg
    (tmp_path / "w.csv").write_text("filepath,title\na.png,\nb.png,a caption\n")  # one usable row: a warning
    with pytest.warns(UserWarning, match="1 unusable caption"):
        assert len(_ok(_items(CsvDataset(tmp_path / "w.csv", mode=mode)))) == 1


# ------------------------------------------------------------------------------------------------------ COCO


def _official(tmp_path: Path) -> Path:
    for i in (1, 2):
        _img(tmp_path / "train2014" / f"COCO_{i}.jpg")
    ann = {
        "info": {},
        "images": [{"id": 1, "file_name": "COCO_1.jpg"}, {"id": 2, "file_name": "COCO_2.jpg"}],
        "annotations": [
            {"id": 10, "image_id": 1, "caption": "one a"},
            {"id": 11, "image_id": 2, "caption": "two a"},
            {"id": 12, "image_id": 1, "caption": "one b "},
        ],
    }
    (tmp_path / "annotations").mkdir()
    path = tmp_path / "annotations" / "captions_train2014.json"
    path.write_text(json.dumps(ann))
    return path


def test_coco_official_format(tmp_path):
    path = _official(tmp_path)
    train = CocoCaptionsDataset(path, tmp_path / "train2014")
    assert train.format == "official" and len(train) == 3
    assert sorted((x["image_id"], x["caption"]) for x in _items(train)) == [(1, "one a"), (1, "one b"), (2, "two a")]
    ev = CocoCaptionsDataset(path, tmp_path / "train2014", mode="eval")
    assert [(x["image_id"], x["captions"]) for x in _items(ev)] == [(1, ["one a", "one b"]), (2, ["two a"])]
    with pytest.raises(FileNotFoundError, match="image_root"):  # default root (the JSON's folder) is wrong here
        CocoCaptionsDataset(path)


def _karpathy(tmp_path: Path) -> Path:
    images = []
    for i, split in enumerate(["train", "restval", "val", "test", "test"]):
        folder = "train2014" if split in ("train", "restval") else "val2014"
        _img(tmp_path / folder / f"im{i}.jpg")
        sentences = [{"raw": f"image {i} caption {k}", "tokens": []} for k in range(2)]
        images.append({"filepath": folder, "filename": f"im{i}.jpg", "split": split, "cocoid": 100 + i,
                       "sentences": sentences})  # fmt: skip
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return path


def test_coco_karpathy_splits(tmp_path):
    path = _karpathy(tmp_path)
    train = CocoCaptionsDataset(path, split="train")
    assert train.format == "karpathy" and len(train) == 4  # train + restval, 2 captions each
    assert sorted({x["image_id"] for x in _items(train)}) == [100, 101]
    test = CocoCaptionsDataset(path, split="test", mode="eval")
    items = _items(test)
    assert [x["image_id"] for x in items] == [103, 104]
    assert items[0]["captions"] == ["image 3 caption 0", "image 3 caption 1"]
    assert items[0]["path"] == str(tmp_path / "val2014" / "im3.jpg")


def test_coco_setup_errors(tmp_path):
    path = _karpathy(tmp_path)
    with pytest.raises(DatasetFormatError, match=r"pass split=.*'restval': 1"):
        CocoCaptionsDataset(path)
    with pytest.raises(DatasetFormatError, match="'dev' has no images"):
        CocoCaptionsDataset(path, split="dev")
    (tmp_path / "other.json").write_text(json.dumps({"categories": [], "images": [{"id": 1}]}))
    with pytest.raises(DatasetFormatError, match="other.json: neither COCO"):
        CocoCaptionsDataset(tmp_path / "other.json")
    (tmp_path / "broken.json").write_text('{"images": [')
    with pytest.raises(DatasetFormatError, match="broken.json: not valid JSON"):
        CocoCaptionsDataset(tmp_path / "broken.json")


def test_coco_duplicate_image_id_with_another_file_is_an_error(tmp_path):
    path = _official(tmp_path)
    ann = json.loads(path.read_text())
    ann["images"].append({"id": 1, "file_name": "COCO_1.jpg"})  # the same entry twice: harmless
    path.write_text(json.dumps(ann))
    ev = CocoCaptionsDataset(path, tmp_path / "train2014", mode="eval")
    assert [(x["image_id"], x["captions"]) for x in _items(ev)] == [(1, ["one a", "one b"]), (2, ["two a"])]
    ann["images"].append({"id": 2, "file_name": "COCO_1.jpg"})  # id 2 again, another file: whose captions?
    path.write_text(json.dumps(ann))
    with pytest.raises(DatasetFormatError, match=r"captions_train2014\.json: images\[3\] has id 2 .*'COCO_1\.jpg'"):
        CocoCaptionsDataset(path, tmp_path / "train2014")


def test_karpathy_entry_that_is_not_an_object_is_an_error(tmp_path):
    path = _karpathy(tmp_path)
    obj = json.loads(path.read_text())
    obj["images"].append("junk")
    path.write_text(json.dumps(obj))
    with pytest.raises(DatasetFormatError, match=r"dataset_coco\.json: images\[5\] is a str, not an object"):
        CocoCaptionsDataset(path, split="train")


def test_coco_broken_images_become_markers(tmp_path):
    path = _official(tmp_path)
    (tmp_path / "train2014" / "COCO_2.jpg").write_bytes(b"")
    items = _items(CocoCaptionsDataset(path, tmp_path / "train2014"))
    assert len(_ok(items)) == 2
    (marker,) = [x for x in items if isinstance(x, BrokenSample)]
    assert marker.source.endswith("COCO_2.jpg") and marker.reason == "empty file"


# ------------------------------------------------------------------------------------------------ WebDataset


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _encoded(fmt: str, size=(16, 16)) -> bytes:
    b = io.BytesIO()
    Image.new("RGB", size, (20, 90, 200)).save(b, fmt)
    return b.getvalue()


def _shards(root: Path, n_shards=4, per_shard=10) -> list[str]:
    """Shards of alternating jpg+txt and png+json samples; keys are globally unique."""
    root.mkdir(parents=True, exist_ok=True)
    jpg, png = _encoded("JPEG"), _encoded("PNG")
    for s in range(n_shards):
        with tarfile.open(root / f"shards-{s:03d}.tar", "w") as tf:
            for i in range(per_shard):
                key = f"s{s}_{i:03d}"
                if i % 2:
                    _add(tf, f"{key}.png", png)
                    _add(tf, f"{key}.json", json.dumps({"caption": f"json {key}"}).encode())
                else:
                    _add(tf, f"{key}.jpg", jpg)
                    _add(tf, f"{key}.txt", f"text {key}".encode())
    return [f"s{s}_{i:03d}" for s in range(n_shards) for i in range(per_shard)]


def _keys(ds, num_workers=2) -> list[str]:
    loader = DataLoader(ds, batch_size=3, num_workers=num_workers, collate_fn=collate_skipping)
    return [k for batch in loader for k in batch.get("key", [])]


def test_webdataset_exactly_once_over_workers_and_ranks(tmp_path):
    expected = _shards(tmp_path)
    keys = _keys(WebDatasetCaptions(str(tmp_path / "shards-{000..003}.tar")))
    assert len(keys) == len(expected) and set(keys) == set(expected)
    per_rank = [_keys(WebDatasetCaptions(str(tmp_path), rank=r, world_size=2)) for r in range(2)]
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == sorted(expected)


@pytest.mark.parametrize("n_shards", [1, 3])  # fewer shards than the 2 ranks x 2 workers: split by sample
def test_webdataset_exactly_once_with_few_shards(tmp_path, n_shards):
    expected = _shards(tmp_path, n_shards=n_shards, per_shard=7)
    shards = sorted(str(p) for p in tmp_path.glob("*.tar"))
    keys = [k for r in range(2) for k in _keys(WebDatasetCaptions(shards, rank=r, world_size=2, shuffle_shards=True))]
    assert sorted(keys) == sorted(expected)


def test_webdataset_shard_shuffle_is_per_epoch_and_exact(tmp_path):
    expected = _shards(tmp_path, n_shards=4, per_shard=3)
    orders = []
    for epoch in range(3):
        keys = []
        for r in range(2):
            ds = WebDatasetCaptions(str(tmp_path), rank=r, world_size=2, shuffle_shards=True, shuffle_buffer=4, seed=1)
            ds.set_epoch(epoch)
            keys += [x["key"] for x in ds]
        assert sorted(keys) == sorted(expected)
        orders.append(keys)
    assert orders[0] != orders[1] or orders[1] != orders[2]


def _batches_per_rank(ds_kw: dict, world: int = 2, workers: int = 2) -> list[list[list[str]]]:
    """Each rank's training batches (drop_last, as ImageTextDataModule loads a stream), as lists of path:key."""
    out = []
    for r in range(world):
        ds = WebDatasetCaptions(rank=r, world_size=world, **ds_kw)
        loader = DataLoader(ds, batch_size=3, num_workers=workers, drop_last=True, collate_fn=collate_skipping)
        out.append([[f"{p}:{k}" for p, k in zip(b["path"], b["key"])] for b in loader])
    return out


def test_webdataset_samples_per_epoch_gives_every_rank_the_same_steps(tmp_path):
    for name, n in (("a", 12), ("b", 3), ("c", 5)):  # unequal shards: 17 vs 3 samples on 2 ranks
        _shards(tmp_path / name, n_shards=1, per_shard=n)
    shards = [str(tmp_path / name / "shards-000.tar") for name in "abc"]
    plain = _batches_per_rank(dict(shards=shards))
    assert len(plain[0]) != len(plain[1])  # the hazard: DDP would wait at the epoch's end for the shorter rank
    fixed = _batches_per_rank(dict(shards=shards, samples_per_epoch=48, shuffle_buffer=4))
    assert len(fixed[0]) == len(fixed[1]) == 2 * 4  # 48 / 4 readers = 12 items each -> 4 batches per worker
    seen = [x for rank in fixed for b in rank for x in b]
    every = {f"{p}:s0_{i:03d}" for p, n in zip(shards, (12, 3, 5)) for i in range(n)}
    assert set(seen) == every and len(seen) == 48  # the short rank re-reads its shard
    with_shuffle = _batches_per_rank(dict(shards=shards, samples_per_epoch=47, shuffle_shards=True, seed=3))
    assert len(with_shuffle[0]) == len(with_shuffle[1]) == 2 * 4  # ceil(47 / 4) = 12


def test_webdataset_samples_per_epoch_errors(tmp_path):
    (tmp_path / "junk.tar").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(RuntimeError, match=r"junk.tar.*gave no usable sample"):
        list(WebDatasetCaptions(str(tmp_path / "junk.tar"), samples_per_epoch=5))
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="samples_per_epoch must be a positive integer"):
            WebDatasetCaptions(str(tmp_path / "junk.tar"), samples_per_epoch=bad)


def test_webdataset_sample_dict_and_modes(tmp_path):
    jpg = _encoded("JPEG")
    with tarfile.open(tmp_path / "m.tar", "w") as tf:
        _add(tf, "k1.jpg", jpg)
        _add(tf, "k1.json", json.dumps({"alt": ["first", "second", " "]}).encode())
    (default,) = WebDatasetCaptions(tmp_path / "m.tar")  # default json fields are caption/text
    assert isinstance(default, BrokenSample) and default.reason.startswith("no caption field ['caption', 'text']")
    train = list(WebDatasetCaptions(str(tmp_path / "m.tar"), json_caption_fields=("alt",)))
    ok = _ok(train)
    assert [x["caption"] for x in ok] == ["first", "second"] and ok[0]["captions"] == ["first", "second"]
    # the image id names the shard too: keys such as 000000 repeat across shards, and evaluation tells images
    # apart by id
    assert (ok[0]["key"], ok[0]["image_id"], ok[0]["path"]) == (
        "k1",
        f"{tmp_path / 'm.tar'}:k1",
        str(tmp_path / "m.tar"),
    )
    with tarfile.open(tmp_path / "n.tar", "w") as tf:  # the same key in another shard: another image
        _add(tf, "k1.jpg", jpg)
        _add(tf, "k1.txt", b"third")
    with pytest.warns(UserWarning, match="unusable captions are dropped"):  # m.tar's " "
        ev = list(WebDatasetCaptions([str(tmp_path / "m.tar"), str(tmp_path / "n.tar")], json_caption_fields=("alt",),
                                     mode="eval"))  # fmt: skip
    ids = {x["image_id"] for x in _ok(ev)}
    assert len(ids) == 2
    assert ok[0]["image"].mode == "RGB"
    assert [x.reason for x in train if isinstance(x, BrokenSample)] == ["empty caption"]
    with pytest.warns(UserWarning, match="unusable captions are dropped"):  # the image stays, without " "
        ev = list(WebDatasetCaptions(str(tmp_path / "m.tar"), json_caption_fields=("alt",), mode="eval"))
    assert len(ev) == 1 and ev[0]["captions"] == ["first", "second"]


def test_webdataset_train_images_mode_one_sample_per_image_caption_per_epoch(tmp_path):
    jpg = _encoded("JPEG")
    caps = [f"caption {j}" for j in range(4)]
    with tarfile.open(tmp_path / "m.tar", "w") as tf:
        for k in range(6):
            _add(tf, f"k{k}.jpg", jpg)
            _add(tf, f"k{k}.json", json.dumps({"captions": caps}).encode())

    def draw(epoch: int, seed: int = 0) -> dict[str, str]:
        ds = WebDatasetCaptions(
            str(tmp_path / "m.tar"), json_caption_fields=("captions",), mode="train_images", seed=seed
        )
        ds.set_epoch(epoch)
        items = _ok(list(ds))
        assert all(x["captions"] == caps for x in items)
        return {x["key"]: x["caption"] for x in items}

    e0 = draw(0)
    assert sorted(e0) == [f"k{k}" for k in range(6)] and set(e0.values()) <= set(caps)  # each image once
    assert draw(0) == e0  # (seed, epoch, key) decide the caption
    assert draw(1) != e0 or draw(2) != e0
    assert len({c for e in range(4) for c in draw(e).values()}) > 1


def test_webdataset_txt_caption_byte_order_mark_is_dropped(tmp_path):
    with tarfile.open(tmp_path / "m.tar", "w") as tf:  # Windows Notepad saves UTF-8 with a BOM
        _add(tf, "k.jpg", _encoded("JPEG"))
        _add(tf, "k.txt", "red circle".encode("utf-8-sig"))
        _add(tf, "j.jpg", _encoded("JPEG"))
        _add(tf, "j.json", b"\xef\xbb\xbf" + json.dumps({"caption": "blue square"}).encode())
    assert [x["caption"] for x in WebDatasetCaptions(tmp_path / "m.tar")] == ["red circle", "blue square"]


@pytest.mark.parametrize("mode", ["train_images", "eval"])
def test_webdataset_unusable_captions_outside_train_mode_are_warned_and_counted(tmp_path, mode):
    """Mode "train" yields a BrokenSample per unusable caption; per-image modes drop them, but not silently."""
    with tarfile.open(tmp_path / "m.tar", "w") as tf:
        for key in ("k1", "k2"):
            _add(tf, f"{key}.jpg", _encoded("JPEG"))
            _add(tf, f"{key}.json", json.dumps({"captions": ["one", None, 5, "  ", "two"]}).encode())
    ds = WebDatasetCaptions(tmp_path / "m.tar", mode=mode, json_caption_fields=("captions",))
    with pytest.warns(UserWarning, match=r"unusable captions are dropped, e\.g\. .*m\.tar:k1: missing caption") as w:
        items = list(ds)
    assert len(items) == 2 and not [x for x in items if isinstance(x, BrokenSample)]
    assert all(set(x["captions"]) == {"one", "two"} for x in items)
    assert ds.n_caption_issues == 6 and sum("unusable captions" in str(x.message) for x in w) == 1  # once per reader


def test_webdataset_broken_samples_and_shards_are_counted(tmp_path):
    _shards(tmp_path / "good", n_shards=1, per_shard=6)
    jpg = _encoded("JPEG")
    with tarfile.open(tmp_path / "bad.tar", "w") as tf:
        _add(tf, "b0.jpg", jpg[:150])  # truncated JPEG
        _add(tf, "b0.txt", b"fine caption")
        _add(tf, "b1.jpg", jpg)
        _add(tf, "b1.txt", b"caf\xe9")  # latin-1, not UTF-8
        _add(tf, "b2.jpg", b"not an image at all")
        _add(tf, "b2.txt", b"fine")
        _add(tf, "b3.jpg", _encoded("PNG", size=(1, 1)))
        _add(tf, "b3.txt", b"too small")
        _add(tf, "b4.txt", b"caption without image")
        _add(tf, "b5.jpg", jpg)
        _add(tf, "b5.txt", b"good one")
    whole = (tmp_path / "good" / "shards-000.tar").read_bytes()
    (tmp_path / "cut_mid.tar").write_bytes(whole[: len(whole) // 3 + 100])  # inside a member
    with tarfile.open(tmp_path / "good" / "shards-000.tar") as tf:
        boundary = tf.getmembers()[2].offset  # end of the first sample (jpg + txt)
    (tmp_path / "cut_edge.tar").write_bytes(whole[:boundary])  # on a member boundary: tarfile does not complain
    (tmp_path / "junk.tar").write_bytes(b"\x00garbage" * 100)
    shards = [str(tmp_path / n) for n in ("bad.tar", "cut_mid.tar", "cut_edge.tar", "junk.tar")]
    shards.append(str(tmp_path / "good" / "shards-000.tar"))

    tracker = SkipTracker(max_fraction=1.0, min_samples=0)
    loader = DataLoader(WebDatasetCaptions(shards), batch_size=4, num_workers=2, collate_fn=collate_skipping)
    keys, good_keys = [], []
    for batch in loader:
        tracker.update_from_batch(batch)
        keys += batch.get("key", [])
        good_keys += [k for k, p in zip(batch.get("key", []), batch.get("path", [])) if p.endswith("shards-000.tar")]
    summary = tracker.end_epoch()
    reasons = {src.rsplit("/", 1)[-1]: why for src, why in summary["examples"]}
    assert "b5" in keys and sorted(good_keys) == [f"s0_{i:03d}" for i in range(6)]
    assert keys.count("s0_000") == 3  # samples before the damage are kept (cut_mid, cut_edge, good)
    assert reasons["bad.tar:b0.jpg"].startswith("truncated/corrupt image")
    assert reasons["bad.tar:b1"] == "caption not valid UTF-8"
    assert reasons["bad.tar:b2.jpg"].startswith("not an image")
    assert reasons["bad.tar:b3.jpg"] == "too small (1x1)"
    assert reasons["bad.tar:b4"].startswith("no image")
    for shard in ("cut_mid.tar", "cut_edge.tar", "junk.tar"):
        assert reasons[shard].startswith("unreadable/truncated shard"), (shard, reasons.get(shard))


def test_webdataset_setup_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no .tar"):
        WebDatasetCaptions(tmp_path)
    _shards(tmp_path, n_shards=2, per_shard=2)
    with pytest.raises(FileNotFoundError, match=r"1 of 3 shard\(s\) do not exist.*shards-002.tar"):
        WebDatasetCaptions(str(tmp_path / "shards-{000..002}.tar"))
    with pytest.raises(ValueError, match="rank"):
        WebDatasetCaptions(str(tmp_path), rank=2, world_size=2)
