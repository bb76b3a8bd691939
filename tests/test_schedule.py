"""The learning-rate schedule: warmup + cosine against its formula, and its restart after a first phase (the
module's ``word_only_schedule="restart"``); validation within that phase."""

import math
from types import SimpleNamespace

import pytest
import torch

from mmxattn.lit.module import MMXAttnModule
from mmxattn.lit.optim import warmup_cosine


def _factors(n: int, **kw) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = warmup_cosine(opt, **kw)
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"] / 2.0)
        opt.step()
        sched.step()
    return out


def _cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / (total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def test_warmup_cosine_follows_its_formula():
    got = _factors(30, warmup_steps=4, total_steps=24, min_ratio=0.1)
    want = [_cosine(s, 4, 24, 0.1) for s in range(30)]
    assert got == pytest.approx(want)
    assert got[3] == pytest.approx(1.0) and got[24:] == pytest.approx([0.1] * 6)


def test_restart_holds_the_peak_then_runs_a_fresh_schedule_over_the_rest():
    asked = []
    total = 30

    def total_steps() -> int:
        asked.append(True)
        return total

    got = _factors(34, warmup_steps=4, total_steps=total_steps, min_ratio=0.0, restart_at=10)
    # first phase: warmup, then the peak held (the total is not needed yet)
    assert got[:10] == pytest.approx([0.25, 0.5, 0.75, 1, 1, 1, 1, 1, 1, 1])
    # second phase: the same warmup and cosine as a schedule of total - restart_at steps started at step 10
    assert got[10:] == pytest.approx([_cosine(s, 4, total - 10, 0.0) for s in range(24)])
    assert len(asked) == 1
    with pytest.raises(ValueError, match="restart_at"):
        _factors(1, warmup_steps=4, total_steps=10, restart_at=-1)


def test_module_restarts_the_schedule_after_the_word_only_phase():
    kw = dict(preset="mmx_tiny", vocab_size=40, pad_id=0, bos_id=1, eos_id=2, context_length=12, img_size=64)
    kw.update(lr=1e-3, warmup_steps=3, word_weight=1.0, word_only_steps=5)
    with pytest.raises(ValueError, match="word_only_schedule"):
        MMXAttnModule(word_only_schedule="later", **kw)
    lrs = {}
    # steps within the warmups only: past them the schedule asks the trainer for the total
    for schedule, n in (("shared", 3), ("restart", 7)):
        conf = MMXAttnModule(word_only_schedule=schedule, **kw).configure_optimizers()
        opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
        seen = [opt.param_groups[0]["lr"]]
        for _ in range(n - 1):
            opt.step()
            sched.step()
            seen.append(opt.param_groups[0]["lr"])
        lrs[schedule] = seen
    assert lrs["shared"] == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3])
    assert lrs["restart"] == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3, 1e-3, 1e-3 / 3, 2e-3 / 3])


def test_validation_in_the_word_only_phase_skips_the_decoder():
    """Within the word-only phase the decoder is untrained: validation scores retrieval only (no captions, no
    re-ranking); the test, and validation after the phase, score everything."""
    kw = dict(preset="mmx_tiny", vocab_size=40, pad_id=0, bos_id=1, eos_id=2, context_length=12, img_size=64)
    mod = MMXAttnModule(word_weight=1.0, word_only_steps=5, rerank=4, rerank_with="lm", **kw)
    mod.model.tokenizer = object()  # captions need a tokenizer; none is called here
    val, test = mod._make_evaluator(test=False), mod._make_evaluator(test=True)
    assert (val.captions, val.rerank) == (False, 0)
    assert (test.captions, test.rerank) == (True, 4)
    mod._trainer = SimpleNamespace(global_step=5)  # the validation that closes the phase
    assert mod._make_evaluator(test=False).captions is False
    mod._trainer = SimpleNamespace(global_step=6)  # after it
    assert (mod._make_evaluator(test=False).captions, mod._make_evaluator(test=False).rerank) == (True, 4)
    plain = MMXAttnModule(word_weight=1.0, rerank=4, rerank_with="lm", **kw)
    plain.model.tokenizer = object()
    assert (plain._make_evaluator(test=False).captions, plain._make_evaluator(test=False).rerank) == (True, 4)
