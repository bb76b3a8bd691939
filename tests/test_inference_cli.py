"""``python -m mmxattn``: the inference CLI on the shipped tiny checkpoint (and the same model as a ``.ckpt`` file).

``caption`` prints the captions of ``model.caption``; ``retrieve`` the rankings of ``model.retrieve`` (both
directions, with its re-ranking and gallery normalisation); ``attention`` a PNG of the per-word cross-attention and
the caption; ``export`` a directory ``mmxattn.load`` reads back to the same weights. Bad input gives one clear line
naming it and exit status 2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from lit_helpers import record_preprocess_batches
from PIL import Image

import mmxattn
from mmxattn.__main__ import RERANK_CHOICES, main
from mmxattn.checkpoint import preprocess_info
from mmxattn.config import config_to_dict
from mmxattn.data.datamodule import ShapesDataModule

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "tiny_shapes"
REPO = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mmxattn", *args], capture_output=True, text=True, cwd=REPO, timeout=120
    )


@pytest.fixture(scope="module")
def model():
    assert (FIXTURE / "model.safetensors").exists(), f"{FIXTURE} is missing: run tests/fixtures/make_tiny_checkpoint.py"
    return mmxattn.load(FIXTURE)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    """Two shapes test images on disk: one RGBA (opaque), one grayscale of another size (80 x 96)."""
    d = tmp_path_factory.mktemp("imgs")
    ds = ShapesDataModule(val_size=8, test_size=2, num_workers=0).dataset("test")
    rgb = [Image.fromarray(ds[i]["image"]) for i in range(2)]
    rgba = rgb[0].convert("RGBA")
    assert np.asarray(rgba)[..., 3].min() == 255
    rgba.save(d / "rgba.png")
    rgb[1].convert("L").resize((80, 96)).save(d / "gray image.png")  # a space in the name, for the TAB format
    return [d / "rgba.png", d / "gray image.png"]


def test_help_lists_subcommands_and_other_entry_points(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "caption" in out and "train.py" in out and "mmxattn.evaluate" in out
    assert all(cmd in out for cmd in ("retrieve", "attention", "export"))
    from mmxattn.model import RERANK_METHODS

    assert RERANK_CHOICES == RERANK_METHODS  # --rerank-with offers what retrieve takes


def test_caption_plain_and_json_match_the_api(model, images, capsys):
    expected = [model.caption([Image.open(p)])[0] for p in images]  # load_image converts RGBA / L to RGB
    assert all(expected)
    assert main(["caption", "--ckpt", str(FIXTURE), *map(str, images)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"{p}\t{c}" for p, c in zip(images, expected)]
    assert main(["caption", "--ckpt", str(FIXTURE), "--json", *map(str, images)]) == 0
    assert json.loads(capsys.readouterr().out) == [{"image": str(p), "caption": c} for p, c in zip(images, expected)]


def test_caption_options_reach_generation(model, images, capsys):
    beam = model.caption([Image.open(images[0])], strategy="beam", num_beams=2, max_new_tokens=3)[0]
    args = ["caption", "--ckpt", str(FIXTURE), "--strategy", "beam", "--num-beams", "2", "--max-new-tokens", "3"]
    assert main([*args, str(images[0])]) == 0
    out = capsys.readouterr().out
    assert out == f"{images[0]}\t{beam}\n"
    assert 1 <= len(out.split("\t")[1].split()) <= 3


def test_caption_takes_any_readable_image_as_the_api_does(model, tmp_path, capsys):
    """A 4 x 3 pixel image is captioned as model.caption captions it (the data pipeline's 8-pixel floor for
    training files does not apply to inference)."""
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (4, 3), (200, 30, 30)).save(tiny)
    assert main(["caption", "--ckpt", str(FIXTURE), str(tiny)]) == 0
    assert capsys.readouterr().out == f"{tiny}\t{model.caption([Image.open(tiny)])[0]}\n"


def test_bad_image_path_exits_2_naming_the_file(images, tmp_path):
    missing = tmp_path / "no_such_image.png"
    r = _run("caption", "--ckpt", str(FIXTURE), str(images[0]), str(missing))
    assert r.returncode == 2, r.stderr
    assert str(missing) in r.stderr and "not found" in r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    (tmp_path / "notes.png").write_text("not an image")
    assert main(["caption", "--ckpt", str(FIXTURE), str(tmp_path / "notes.png")]) == 2


def test_bad_checkpoint_gives_the_checkpoint_error(images, tmp_path, capsys):
    bogus = tmp_path / "bogus.ckpt"
    bogus.write_text("hello")
    assert main(["caption", "--ckpt", str(bogus), str(images[0])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(bogus) in err and "is not a PyTorch checkpoint" in err
    assert main(["caption", "--ckpt", str(tmp_path), str(images[0])]) == 2  # a directory that is no export
    assert "not an exported mmxattn model" in capsys.readouterr().err
    assert main(["caption", "--ckpt", str(FIXTURE), "--num-beams", "0", str(images[0])]) == 2
    assert "--num-beams" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- retrieve / attention / export
@pytest.fixture(scope="module")
def gallery(tmp_path_factory) -> tuple[Path, list[str], list[str]]:
    """A folder of five shapes test images (img0..img4.png) and a text file the gallery skips; their first
    reference captions (caption i was written for image i)."""
    d = tmp_path_factory.mktemp("gallery")
    ds = ShapesDataModule(val_size=8, test_size=5, num_workers=0).dataset("test")
    for i in range(5):
        Image.fromarray(ds[i]["image"]).save(d / f"img{i}.png")
    (d / "notes.txt").write_text("not part of the gallery")
    return d, [str(d / f"img{i}.png") for i in range(5)], [ds[i]["captions"][0] for i in range(5)]


@pytest.fixture(scope="module")
def ckpt_file(model, tmp_path_factory) -> Path:
    """The fixture model as a Lightning-style ``.ckpt`` (the keys ``MMXAttnModule.on_save_checkpoint`` writes and
    ``mmxattn.load`` reads), so the commands also run on a checkpoint file, as after training."""
    path = tmp_path_factory.mktemp("ckpt") / "run.ckpt"
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save(
        {
            "state_dict": state,
            "mmxattn_config": config_to_dict(model.cfg),
            "mmxattn_tokenizer": model.tokenizer.to_dict(),
            "mmxattn_preprocess": preprocess_info(model),
        },
        path,
    )
    return path


def _texts(texts: list[str]) -> list[str]:
    return [arg for t in texts for arg in ("--text", t)]


def _ranked(indices, scores, results: list[str], key: str) -> list[dict]:
    return [
        {"rank": n, "index": i, "score": s, key: results[i]}
        for n, (i, s) in enumerate(zip(indices.tolist(), scores.float().tolist()), 1)
    ]


def test_retrieve_text_to_image_lines_match_the_api(model, gallery, capsys):
    d, paths, captions = gallery
    texts = captions[:3]
    expected = model.retrieve(paths, texts, k=3)
    # the tiny model scores the image a caption was written for highest for some of them: those come first
    sim = model.similarity(paths, texts)  # (N_img, N_txt)
    own_first = [j for j in range(len(texts)) if int(sim[:, j].argmax()) == j]
    assert own_first, sim
    assert main(["retrieve", "--ckpt", str(FIXTURE), "--image-dir", str(d), *_texts(texts), "-k", "3"]) == 0
    rows = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 9 and all(len(r) == 4 for r in rows)
    for j, t in enumerate(texts):
        mine = rows[3 * j : 3 * j + 3]
        assert [r[:2] for r in mine] == [[t, "1"], [t, "2"], [t, "3"]]
        assert [r[3] for r in mine] == [paths[i] for i in expected.t2i_indices[j].tolist()]  # notes.txt skipped
        assert [float(r[2]) for r in mine] == pytest.approx(expected.t2i_scores[j].tolist(), abs=1e-4)
    for j in own_first:
        assert rows[3 * j][3] == paths[j]


def test_retrieve_image_dir_skips_unreadable_files_and_names_them(model, gallery, tmp_path, capsys):
    """A broken file in a folder gallery is skipped before the model loads (named on stderr), and the ranking is
    that of the readable images; a folder of broken files only is an error."""
    import shutil

    d, paths, captions = gallery
    mixed = tmp_path / "mixed"
    shutil.copytree(d, mixed)
    (mixed / "0_broken.png").write_bytes(b"\x89PNG not really")
    good = [str(mixed / Path(p).name) for p in paths]
    expected = model.retrieve(good, captions[:1], k=2, direction="t2i")
    assert main(["retrieve", "--ckpt", str(FIXTURE), "--image-dir", str(mixed), "--text", captions[0], "-k", "2"]) == 0
    out, err = capsys.readouterr()
    assert "skipped 1 unreadable file(s)" in err and "0_broken.png" in err
    assert [line.split("\t")[3] for line in out.splitlines()] == [good[i] for i in expected.t2i_indices[0].tolist()]
    only = tmp_path / "only_broken"
    only.mkdir()
    (only / "a.jpg").write_bytes(b"nope")
    assert main(["retrieve", "--ckpt", str(FIXTURE), "--image-dir", str(only), "--text", "x"]) == 2
    assert "none of its 1 image files can be read" in capsys.readouterr().err


def test_image_dir_follows_symlinks_and_names_a_dangling_one(tmp_path, capsys):
    """--image-dir: a symlink to an image is an image of the gallery; a dangling one (a moved photo) is an unreadable
    file, skipped and named like a broken one, not silently left out; sub-folders and hidden files are not read."""
    from mmxattn.__main__ import _image_dir

    d = tmp_path / "photos"
    (d / "sub").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(d / "a.png")
    Image.new("RGB", (8, 8)).save(d / "sub" / "b.png")
    Image.new("RGB", (8, 8)).save(d / ".hidden.png")
    (d / "link.png").symlink_to(d / "a.png")
    (d / "moved.jpg").symlink_to(d / "no_such.jpg")
    good, bad = _image_dir(str(d))
    assert good == [str(d / "a.png"), str(d / "link.png")]
    assert [p for p, _ in bad] == [str(d / "moved.jpg")]
    assert main(["retrieve", "--ckpt", str(FIXTURE), "--image-dir", str(d), "--text", "a red circle"]) == 0
    err = capsys.readouterr().err
    assert "skipped 1 unreadable file(s)" in err and "moved.jpg" in err


def test_retrieve_image_dir_skips_files_that_fail_to_decode_and_decodes_each_file_once(
    model, gallery, tmp_path, monkeypatch, capsys
):
    """A PNG cut off after 300 bytes passes the header check, and its decoding ended the whole command (exit 2). In
    an --image-dir gallery it is skipped, named and counted with the other unreadable files in the one summary
    line; the ranking (with --rerank too) is that of the readable images, each decoded once. Files the user named
    with --images still stop the command, named; a folder whose files all fail to decode is an error."""
    import mmxattn.data.robust as robust

    d, paths, captions = gallery
    mixed = tmp_path / "mixed"
    shutil.copytree(d, mixed)
    (mixed / "img2_trunc.png").write_bytes(Path(paths[2]).read_bytes()[:300])
    (mixed / "0_broken.png").write_bytes(b"\x89PNG not really")  # fails the header check
    good = [str(mixed / Path(p).name) for p in paths]
    decoded = []
    real = robust.load_image
    monkeypatch.setattr(robust, "load_image", lambda src, *a, **k: decoded.append(str(src)) or real(src, *a, **k))
    for extra, kwargs in (([], {}), (["--rerank", "3"], {"rerank": 3})):
        expected = model.retrieve(good, captions[:2], k=2, direction="t2i", **kwargs)
        decoded.clear()
        args = ["retrieve", "--ckpt", str(FIXTURE), "--image-dir", str(mixed), *_texts(captions[:2]), "-k", "2"]
        assert main([*args, "--batch-size", "2", *extra]) == 0
        out, err = capsys.readouterr()
        assert sorted(decoded) == sorted([*good, str(mixed / "img2_trunc.png")]), decoded  # each file once
        assert err.count("\n") == 1 and "skipped 2 unreadable file(s)" in err, err
        assert "0_broken.png" in err and "img2_trunc.png: truncated/corrupt image" in err, err
        rows = [line.split("\t") for line in out.splitlines()]
        assert [r[3] for r in rows] == [good[i] for i in expected.t2i_indices.flatten().tolist()]
        assert [float(r[2]) for r in rows] == pytest.approx(expected.t2i_scores.flatten().tolist(), abs=1e-4)
    # files named with --images are the user's choice: a truncated one stops the command, named
    assert (
        main(
            [
                "retrieve",
                "--ckpt",
                str(FIXTURE),
                "--images",
                good[0],
                str(mixed / "img2_trunc.png"),
                "--text",
                captions[0],
            ]
        )
        == 2
    )
    out, err = capsys.readouterr()
    assert err.startswith(f"error: image {mixed / 'img2_trunc.png'}: truncated/corrupt image") and out == ""
    assert err.count("\n") == 1, err
    only = tmp_path / "only_truncated"
    only.mkdir()
    shutil.copy(mixed / "img2_trunc.png", only / "a.png")
    assert main(["retrieve", "--ckpt", str(FIXTURE), "--image-dir", str(only), "--text", captions[0]]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("error: --image-dir") and "none of its 1 image files can be read" in err, err
    assert "a.png: truncated/corrupt image" in err and err.count("\n") == 1 and out == ""


def test_retrieve_names_query_words_the_model_does_not_know_once(gallery, capsys):
    """Words outside the word vocabulary read as <unk> (they match nothing): the model's one warning names them."""
    d, _, _ = gallery
    assert main(["retrieve", "--ckpt", str(FIXTURE), "--image-dir", str(d), *_texts(["a purple hexagon", "zzz"])]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: texts: 2 of 2 text(s) have words"), err
    assert "'hexagon', 'zzz'" in err


@pytest.mark.parametrize(
    "extra, kwargs",
    [
        ([], {}),
        (["--rerank", "4"], {"rerank": 4}),
        (["--rerank", "4", "--rerank-with", "lm"], {"rerank": 4, "rerank_with": "lm"}),
        (["--gallery-norm"], {"gallery_norm": True}),
    ],
)
def test_retrieve_json_equals_the_api_with_its_options(model, gallery, ckpt_file, extra, kwargs, capsys):
    _, paths, captions = gallery
    texts = captions[1:3]
    expected = model.retrieve(paths, texts, k=2, **kwargs)
    args = ["retrieve", "--ckpt", str(ckpt_file), "--images", *paths, *_texts(texts), "-k", "2", "--json", *extra]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out) == [
        {"query": t, "results": _ranked(expected.t2i_indices[j], expected.t2i_scores[j], paths, "image")}
        for j, t in enumerate(texts)
    ]


def test_retrieve_image_to_text_from_a_captions_file(model, gallery, tmp_path, capsys):
    _, paths, captions = gallery
    f = tmp_path / "captions.txt"
    f.write_text(f"{captions[0]}\n\n  {captions[1]}  \n" + "\n".join(captions[2:]) + "\n\n", encoding="utf-8")
    lines = [1, 3, 4, 5, 6]  # line numbers of the five captions (blank lines skipped, spaces stripped)
    queries = [paths[3], paths[0]]
    expected = model.retrieve(queries, captions, k=2, rerank=3)
    base = ["retrieve", "--ckpt", str(FIXTURE), "--captions", str(f), "--query-image", queries[0]]
    assert main([*base, "--query-image", queries[1], "-k", "2", "--rerank", "3", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    want = []
    for q, (idx, sc) in enumerate(zip(expected.i2t_indices, expected.i2t_scores)):
        ranked = _ranked(idx, sc, captions, "caption")
        for r in ranked:
            r["line"] = lines[r["index"]]
        want.append({"query": queries[q], "results": ranked})
    assert got == want
    assert main([*base, "-k", "2", "--rerank", "3"]) == 0  # plain lines: query image, rank, score, caption
    rows = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert [[r[0], r[1], r[3]] for r in rows] == [
        [queries[0], str(r["rank"]), r["caption"]] for r in want[0]["results"]
    ]


def test_captions_file_lines_are_the_lines_an_editor_shows(tmp_path):
    """A BOM, CRLF and old-Mac CR endings are line ends; a U+2028, U+0085 or form feed inside a caption (text pasted
    from the web) is not: the caption stays whole and keeps the line number an editor or `sed -n Np` shows."""
    from mmxattn.__main__ import _read_captions

    f = tmp_path / "captions.txt"
    f.write_bytes("\ufeffa red circle\r\na blue\u2028square\r\n\r\na green\x0ctriangle\ra grey\x85star\n".encode())
    texts, lines = _read_captions(str(f))
    assert texts == ["a red circle", "a blue\u2028square", "a green\x0ctriangle", "a grey\x85star"]
    assert lines == [1, 2, 4, 5]


def test_retrieve_k_above_the_gallery_shows_all_with_a_note(gallery, capsys):
    d, paths, captions = gallery
    assert main(["retrieve", "--ckpt", str(FIXTURE), "--image-dir", str(d), "--text", captions[0], "-k", "50"]) == 0
    out, err = capsys.readouterr()
    assert sorted(line.split("\t")[3] for line in out.splitlines()) == paths
    assert "-k 50" in err and "5 images" in err and "error" not in err


def test_retrieve_bad_input_exits_2_naming_it(gallery, tmp_path, capsys):
    d, paths, captions = gallery
    (tmp_path / "empty").mkdir()
    (tmp_path / "texts_only").mkdir()
    (tmp_path / "texts_only" / "a.txt").write_text("x")
    (tmp_path / "fake.png").write_text("not an image")
    (tmp_path / "blank.txt").write_text("\n  \n")
    missing = str(tmp_path / "missing.png")
    ckpt = ["--ckpt", str(FIXTURE)]
    t2i = [*ckpt, "--text", captions[0]]
    i2t = [*ckpt, "--query-image", paths[0]]
    cases = [
        ([*t2i, "--images", paths[0], missing], [missing, "not found"]),
        ([*t2i, "--images", str(tmp_path / "fake.png")], [str(tmp_path / "fake.png"), "not an image"]),
        ([*t2i, "--image-dir", str(tmp_path / "empty")], [str(tmp_path / "empty"), "no image files"]),
        ([*t2i, "--image-dir", str(tmp_path / "texts_only")], [str(tmp_path / "texts_only"), "no image files"]),
        ([*t2i, "--image-dir", str(tmp_path / "nowhere")], [str(tmp_path / "nowhere"), "not found"]),
        ([*i2t, "--captions", str(tmp_path / "blank.txt")], [str(tmp_path / "blank.txt"), "no captions"]),
        ([*i2t, "--captions", str(tmp_path / "none.txt")], [str(tmp_path / "none.txt"), "not found"]),
        ([*ckpt, "--query-image", missing, "--captions", str(tmp_path / "blank.txt")], [missing]),
        ([*t2i, "--image-dir", str(d), "-k", "0"], ["-k must be >= 1"]),
        ([*t2i, "--image-dir", str(d), "--rerank", "-1"], ["--rerank must be >= 0"]),
        (["--ckpt", str(tmp_path / "no.ckpt"), "--text", "x", "--image-dir", str(d)], [str(tmp_path / "no.ckpt")]),
        ([*ckpt, "--image-dir", str(d)], ["nothing to retrieve"]),
        ([*t2i, "--image-dir", str(d), "--captions", str(tmp_path / "blank.txt")], ["not both"]),
        ([*t2i], ["--images", "--image-dir"]),
        ([*i2t], ["--captions FILE is missing"]),
        ([*ckpt, "--text", " ", "--image-dir", str(d)], ["--text ' '", "empty query"]),
    ]
    for args, named in cases:
        assert main(["retrieve", *args]) == 2, args
        out, err = capsys.readouterr()
        assert err.startswith("error: ") and err.count("\n") == 1 and out == "", (args, err)
        assert all(n in err for n in named), (args, err)


def test_attention_writes_a_png_and_prints_the_caption(model, images, tmp_path, capsys, monkeypatch):
    from mmxattn.model import MMXAttn

    expected = model.caption([Image.open(images[0])])[0]
    out = tmp_path / "new folder" / "map.png"
    calls = []
    real = MMXAttn.generate
    monkeypatch.setattr(MMXAttn, "generate", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    assert main(["attention", "--ckpt", str(FIXTURE), str(images[0]), "--out", str(out)]) == 0
    assert capsys.readouterr().out.splitlines() == [expected, str(out)]
    assert len(calls) == 1  # one generation gives the printed caption and the figure's words (it was two)
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width >= 400 and im.height >= 200
        pixels = np.asarray(im.convert("RGB"), dtype=np.float32)
    assert pixels.std() > 20  # a drawn figure, not a blank canvas
    beam = model.caption([Image.open(images[1])], strategy="beam", num_beams=2, max_new_tokens=3)[0]
    out2 = tmp_path / "beam.png"
    args = ["--strategy", "beam", "--num-beams", "2", "--max-new-tokens", "3", "--max-words", "2", "--json"]
    assert main(["attention", "--ckpt", str(FIXTURE), str(images[1]), "--out", str(out2), *args]) == 0
    assert json.loads(capsys.readouterr().out) == {"image": str(images[1]), "caption": beam, "out": str(out2)}
    with Image.open(out2) as im:
        assert im.format == "PNG"


def test_attention_draws_with_agg_whatever_the_environment_asks(images, tmp_path):
    out = tmp_path / "map.png"
    code = (
        "import sys, matplotlib; from mmxattn.__main__ import main; rc = main(sys.argv[1:]); "
        "print(matplotlib.get_backend()); sys.exit(rc)"
    )
    args = ["attention", "--ckpt", str(FIXTURE), str(images[0]), "--out", str(out)]
    env = {**os.environ, "MPLBACKEND": "TkAgg"}  # an interactive backend a desktop user may have set
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=REPO, env=env,
                       timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1].lower() == "agg" and out.stat().st_size > 0


def test_attention_bad_input_exits_2_naming_it(images, tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    missing = str(tmp_path / "missing.png")
    ok_out = str(tmp_path / "map.png")
    base = ["attention", "--ckpt", str(FIXTURE)]
    cases = [
        ([*base, missing, "--out", ok_out], [missing, "not found"]),
        ([*base, str(images[0]), "--out", str(tmp_path / "a_file" / "map.png")], [str(tmp_path / "a_file")]),
        ([*base, str(images[0]), "--out", str(tmp_path)], [str(tmp_path), "is a directory"]),
        ([*base, str(images[0]), "--out", ok_out, "--max-words", "0"], ["--max-words"]),
        (["attention", "--ckpt", str(tmp_path / "no.ckpt"), str(images[0]), "--out", ok_out], ["no.ckpt"]),
    ]
    for args, named in cases:
        assert main(args) == 2, args
        out, err = capsys.readouterr()
        assert err.startswith("error: ") and err.count("\n") == 1 and out == "", (args, err)
        assert all(n in err for n in named), (args, err)
    assert not Path(ok_out).exists()


def test_export_writes_a_directory_that_loads_to_the_same_model(model, ckpt_file, images, tmp_path, capsys):
    out = tmp_path / "exported"
    assert main(["export", "--ckpt", str(ckpt_file), "--out", str(out)]) == 0
    assert capsys.readouterr().out == f"{out}\n"
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "model.safetensors",
        "preprocess.json",
        "tokenizer.json",
    ]
    loaded = mmxattn.load(out)
    theirs = loaded.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in model.state_dict().items())
    img = Image.open(images[0])
    assert loaded.caption([img]) == model.caption([img])
    # a non-empty directory: refused, untouched, unless --force
    config = (out / "config.json").read_text()
    (out / "config.json").write_text("{}")
    assert main(["export", "--ckpt", str(ckpt_file), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "not empty" in err and "--force" in err
    assert (out / "config.json").read_text() == "{}"
    assert main(["export", "--ckpt", str(ckpt_file), "--out", str(out), "--force"]) == 0
    assert (out / "config.json").read_text() == config
    capsys.readouterr()


def test_export_bad_input_exits_2_naming_it(tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    copy = tmp_path / "copy"
    shutil.copytree(FIXTURE, copy)
    before = {p.name: p.read_bytes() for p in copy.iterdir()}
    cases = [
        ([str(tmp_path / "no.ckpt"), str(tmp_path / "out")], [str(tmp_path / "no.ckpt"), "not found"]),
        ([str(tmp_path / "a_file"), str(tmp_path / "out")], [str(tmp_path / "a_file"), "is not a PyTorch checkpoint"]),
        ([str(FIXTURE), str(tmp_path / "a_file")], [str(tmp_path / "a_file"), "not a directory"]),
        ([str(FIXTURE), str(tmp_path / "a_file" / "out")], [str(tmp_path / "a_file")]),
        ([str(copy), str(copy), "--force"], [str(copy), "is the checkpoint"]),
    ]
    for (ckpt, out, *extra), named in cases:
        assert main(["export", "--ckpt", ckpt, "--out", out, *extra]) == 2, (ckpt, out)
        stdout, err = capsys.readouterr()
        assert err.startswith("error: ") and err.count("\n") == 1 and stdout == "", (ckpt, out, err)
        assert all(n in err for n in named), (ckpt, out, err)
    assert not (tmp_path / "out").exists()
    assert {p.name: p.read_bytes() for p in copy.iterdir()} == before


def test_caption_and_similarity_in_batches_equal_one_batch_and_read_batch_size_images_at_a_time(
    model, gallery, monkeypatch
):
    """model.caption(batch_size=N) preprocesses and captions N images at a time (a folder never sits in memory at
    once) and gives the captions of one batch of all, greedy and beam; bad values are named."""
    _, paths, _ = gallery
    for kw in ({}, {"strategy": "beam", "num_beams": 2}):
        whole = model.caption(paths, **kw)
        sizes = record_preprocess_batches(model, monkeypatch)
        assert model.caption(paths, batch_size=2, **kw) == whole
        monkeypatch.undo()
        assert max(sizes) == 2 and sum(sizes) == len(paths)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        model.caption(paths, batch_size=0)
    texts = ["a red circle", "two shapes"]
    sizes = record_preprocess_batches(model, monkeypatch)
    torch.testing.assert_close(model.similarity(paths, texts, batch_size=2), model.similarity(paths, texts))
    assert sizes[:3] == [2, 2, 1]  # then the one batch of all


def test_caption_reads_headers_first_and_names_a_truncated_file_at_its_batch(model, images, tmp_path, capsys):
    """Only headers are read before the model loads (pixels are decoded a batch at a time); a file whose header
    is fine but whose data is cut off fails at its batch, named, after the captions of the batches before it."""
    whole = Path(images[0]).read_bytes()
    cut = tmp_path / "cut.png"
    cut.write_bytes(whole[: len(whole) // 2])
    first = model.caption([Image.open(images[0])])[0]
    assert main(["caption", "--ckpt", str(FIXTURE), "--batch-size", "1", str(images[0]), str(cut)]) == 2
    out, err = capsys.readouterr()
    assert out == f"{images[0]}\t{first}\n"
    assert str(cut) in err and err.startswith("error: image ")


def test_a_closed_pipe_stops_the_cli_quietly(images):
    """`python -m mmxattn caption ... | head -1`: the reader closing the pipe ends the command without a
    traceback (exit 141, as a shell reports SIGPIPE)."""
    import subprocess

    proc = subprocess.Popen(
        [sys.executable, "-m", "mmxattn", "caption", "--ckpt", str(FIXTURE), *map(str, images)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
    )
    proc.stdout.close()  # the reader is gone before the first line is written (as `head` after its lines)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert "Traceback" not in err and "BrokenPipeError" not in err


def test_importing_the_package_and_the_cli_stays_light():
    """`import mmxattn` and the CLI's parser load neither the model code nor timm (seconds of imports): the CLI's
    --help and errors in its arguments answer at once, and the model is imported only when a command needs it."""
    code = (
        "import sys, mmxattn, mmxattn.__main__ as m; m.build_parser(); "
        "print(sorted(k for k in ('mmxattn.model', 'timm', 'pytorch_lightning') if k in sys.modules))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_json_output_stays_json_with_non_finite_scores_and_library_value_errors_are_one_line(
    gallery, ckpt_file, monkeypatch, capsys
):
    """A NaN score (a damaged model) printed as a bare NaN made --json output that JSON parsers reject: it is null.
    A ValueError from the library's input checks ends as one `error:` line (exit 2), not a traceback."""
    from mmxattn.model import MMXAttn

    _, paths, captions = gallery
    real = MMXAttn.retrieve

    def nan_scores(self, *args, **kwargs):
        res = real(self, *args, **kwargs)
        res.t2i_scores[0, 0] = float("nan")
        return res

    monkeypatch.setattr(MMXAttn, "retrieve", nan_scores)
    args = ["retrieve", "--ckpt", str(ckpt_file), "--images", *paths, *_texts(captions[:1]), "-k", "2", "--json"]
    assert main(args) == 0

    def reject(constant):
        raise AssertionError(f"not JSON: {constant}")

    out = json.loads(capsys.readouterr().out, parse_constant=reject)
    assert out[0]["results"][0]["score"] is None and isinstance(out[0]["results"][1]["score"], float)

    def bad_input(self, *args, **kwargs):
        raise ValueError("images: NaN or infinite pixel values in image 0")

    monkeypatch.setattr(MMXAttn, "caption", bad_input)
    assert main(["caption", "--ckpt", str(ckpt_file), paths[0]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: images: NaN or infinite pixel values in image 0") and "Traceback" not in err
