"""``train.py fit --help`` describes every option: jsonargparse reads each ``__init__`` parameter's description from
the class docstring's ``Args:`` section (one entry per name), so a parameter documented elsewhere, or in an entry
grouping several names, shows up with its type alone."""

from __future__ import annotations

import inspect

import docstring_parser
import pytest

from mmxattn.data.datamodule import ImageTextDataModule, ShapesDataModule
from mmxattn.lit.cli import main as cli_main
from mmxattn.lit.module import MMXAttnModule


@pytest.mark.parametrize("cls", [MMXAttnModule, ImageTextDataModule, ShapesDataModule], ids=lambda c: c.__name__)
def test_every_constructor_argument_has_its_own_docstring_entry(cls):
    described = {p.arg_name for p in docstring_parser.parse(cls.__doc__ or "").params}
    params = [p for p in inspect.signature(cls.__init__).parameters if p != "self" and not p.startswith("*")]
    assert [p for p in params if p not in described] == []


def test_fit_help_prints_the_descriptions(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # help text is wrapped to the terminal width
    assert "--model.grad_cache_chunk_size GRAD_CACHE_CHUNK_SIZE gradient caching (Gao et al. 2021;" in out
    assert "--model.lr LR AdamW's peak learning rate" in out
