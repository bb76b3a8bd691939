"""`train.py` with data or options a new user gets wrong: each stops with one `error: ...` line naming the input
(exit 2) before training starts, and `MMXATTN_TRACEBACK=1` gives the traceback; any other exception keeps its
traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from lit_helpers import make_csv, smoke_args

from mmxattn.data.formats import DatasetFormatError
from mmxattn.lit.cli import main as cli_main
from mmxattn.lit.module import MMXAttnModule


@pytest.fixture(autouse=True)
def _no_traceback_env(monkeypatch, tmp_path):
    monkeypatch.delenv("MMXATTN_TRACEBACK", raising=False)
    monkeypatch.chdir(tmp_path)  # the config's relative run folder lands here


@pytest.fixture
def no_step(monkeypatch):
    """Fail a test whose run gets as far as a training or validation (sanity check) step."""

    def step(self, *args, **kwargs):
        raise AssertionError("a step ran: the data error was not found at setup")

    monkeypatch.setattr(MMXAttnModule, "training_step", step)
    monkeypatch.setattr(MMXAttnModule, "validation_step", step)


def _args(tmp: Path, **data: str) -> list[str]:
    """A one-epoch CPU fit of configs/finetune_csv.yaml on make_csv's data (word tokenizer), ``data`` overriding."""
    paths = {**make_csv(tmp / "data"), "test_path": None, **data}
    args = smoke_args("finetune_csv.yaml", tmp, paths, fast_dev_run=0)
    return args + [
        "--data.init_args.tokenizer=word",
        "--trainer.max_epochs=1",
        "--trainer.limit_val_batches=1",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--test_after_fit=false",
    ]


def _fails(args: list[str], capsys) -> str:
    """The stderr of a run that must stop with exit status 2 and exactly one error line, no traceback."""
    with pytest.raises(SystemExit) as e:
        cli_main(args)
    out = capsys.readouterr()
    assert e.value.code == 2, out.err
    errors = [line for line in out.err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in out.err, out.err
    return errors[0]


def test_a_training_split_smaller_than_one_batch_is_one_line_naming_the_file(no_step, tmp_path, capsys):
    tiny = tmp_path / "tiny.csv"
    tiny.write_text("filepath,title\n0.jpg,a red circle\n1.jpg,a blue square\n2.jpg,a green shape\n")
    err = _fails(_args(tmp_path, train_path=str(tiny)), capsys)
    assert f"train_path {tiny}: the training split has 3 items, fewer than one batch (batch_size 4" in err


def test_a_validation_split_without_one_usable_caption_fails_at_setup(no_step, tmp_path, capsys):
    empty = tmp_path / "val_empty.csv"
    empty.write_text("filepath,title\n0.jpg,\n1.jpg,\n1.jpg, \n")
    err = _fails(_args(tmp_path, val_path=str(empty)), capsys)
    assert f"val_path (csv): {empty}: the split has no usable sample" in err and "3 x empty caption" in err
    assert not (tmp_path / "runs").exists()  # nothing trained, nothing saved


def test_a_wrong_image_root_read_at_setup_is_one_line(no_step, tmp_path, capsys):
    """With the shipped config's openclip tokenizer the train file is first read in setup, inside Trainer.fit."""
    args = _args(tmp_path, image_root=str(tmp_path))
    err = _fails([a for a in args if a != "--data.init_args.tokenizer=word"], capsys)
    assert "train_path (csv)" in err and "none of the first" in err and f"image_root={str(tmp_path)!r}" in err


def test_a_coco_json_given_as_csv_is_short_and_suggests_the_format(no_step, tmp_path, capsys):
    images = [{"id": i, "file_name": f"{i}.jpg"} for i in range(12)]
    anns = [{"id": i, "image_id": i, "caption": "a red circle on a white background"} for i in range(12) for _ in "ab"]
    coco = tmp_path / "captions.json"
    coco.write_text(json.dumps({"images": images, "annotations": anns}))
    err = _fails(_args(tmp_path, train_path=str(coco)), capsys)
    assert f"{coco}: missing column(s)" in err and "--data.init_args.format coco" in err and len(err) < 600


def test_setup_errors_keep_their_traceback_on_request(no_step, tmp_path, monkeypatch):
    monkeypatch.setenv("MMXATTN_TRACEBACK", "1")
    tiny = tmp_path / "tiny.csv"
    tiny.write_text("filepath,title\n0.jpg,a red circle\n")
    with pytest.raises(DatasetFormatError, match="fewer than one batch"):
        cli_main(_args(tmp_path, train_path=str(tiny)))


def test_other_exceptions_inside_fit_are_not_turned_into_an_error_line(tmp_path, monkeypatch):
    def boom(self, batch, batch_idx):
        raise RuntimeError("a bug, not bad data")

    monkeypatch.setattr(MMXAttnModule, "training_step", boom)
    with pytest.raises(RuntimeError, match="a bug, not bad data"):
        cli_main(_args(tmp_path) + ["--trainer.num_sanity_val_steps=0"])


@pytest.mark.parametrize(
    "bad, expected",
    [
        (
            ["--data.init_args.batchsize", "4"],
            "error: unknown option --data.init_args.batchsize of ImageTextDataModule; "
            "did you mean --data.init_args.batch_size?",
        ),
        (["--data.tokenizr=word"], "did you mean --data.init_args.tokenizer?"),
        (["--data.init_args.batch_size", "four"], "error: --data.init_args.batch_size: Expected a <class 'int'>"),
        (["--model.learning_rate", "0.01"], "error: unknown option --model.learning_rate"),
        (["--trainr.max_epochs", "2"], "error: unknown option --trainr.max_epochs; did you mean --trainer.max_epochs?"),
    ],
)
def test_a_mistyped_option_is_one_line_without_the_usage_text(bad, expected, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(_args(tmp_path) + bad)
    err = capsys.readouterr().err
    assert e.value.code == 2 and expected in err, err
    assert len(err.strip().splitlines()) == 2 and "usage:" not in err and "Union subtypes" not in err, err
    assert "--help` lists the options" in err


def test_a_mistyped_key_in_a_config_file_names_the_closest_one(tmp_path, capsys):
    (tmp_path / "typo.yaml").write_text("trainer:\n  max_epoch: 3\n")
    with pytest.raises(SystemExit) as e:
        cli_main(_args(tmp_path) + ["--config", str(tmp_path / "typo.yaml")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "'trainer.max_epoch'; did you mean trainer.max_epochs?" in err, err


@pytest.mark.parametrize(
    "option, expected",
    [
        ("--model.lr=-1", "lr must be a finite number > 0, got -1.0"),  # was AdamW's traceback, exit 1
        ("--model.lr=0", "lr must be a finite number > 0, got 0.0"),
        ("--model.weight_decay=-0.1", "weight_decay must be a finite number >= 0, got -0.1"),  # trained silently
        ("--model.warmup_steps=-5", "warmup_steps must be an int >= 0, got -5"),  # trained silently
        ("--model.min_lr_ratio=1.5", "min_lr_ratio must be in [0, 1], got 1.5"),
        ("--model.betas=[0.9,1.0]", "betas must be two numbers in [0, 1), got (0.9, 1.0)"),
        ("--model.caption_weight=-2", "caption_weight must be a finite number >= 0 (0 = off), got -2.0"),
    ],
)
def test_a_bad_optimiser_or_loss_setting_is_one_line_before_training(option, expected, no_step, tmp_path, capsys):
    err = _fails(_args(tmp_path) + [option], capsys)
    assert expected in err, err


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"lr": float("inf")}, "lr must be a finite number > 0"),
        ({"lr": True}, "lr must be a finite number > 0"),
        ({"contrastive_weight": float("nan")}, r"contrastive_weight must be a finite number >= 0 \(0 = off\), got nan"),
        ({"itm_weight": -0.5}, "itm_weight must be"),
        ({"warmup_steps": 2.5}, "warmup_steps must be an int >= 0"),
        ({"betas": (0.9,)}, r"betas must be two numbers in \[0, 1\)"),
    ],
)
def test_the_module_refuses_bad_optimiser_and_loss_settings_from_python_too(kw, match):
    """Values the command line's type checks already stop (NaN, inf) reach the module from Python code."""
    with pytest.raises(ValueError, match=match):
        MMXAttnModule(preset="mmx_tiny", **kw)
