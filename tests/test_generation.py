"""Generation: the KV cache changes nothing, beam search with one beam is greedy, EOS stops rows, seeds rule
sampling, and the image's cross-attention keys/values are projected once."""

import warnings

import pytest
import torch

import mmxattn
from mmxattn import generation


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = mmxattn.create_model("mmx_tiny", vocab_size=40, context_length=14).eval()
    # Random init gives near-uniform logits; sharpen the LM head so decisions are not ties decided by noise.
    with torch.no_grad():
        m.text.token_embedding.weight.mul_(20)
    return m


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(1)
    return torch.randn(3, 3, 64, 64)


def test_cached_greedy_equals_recomputed(model, images):
    a = model.generate(images, strategy="greedy", use_cache=True)
    b = model.generate(images, strategy="greedy", use_cache=False)
    assert a.shape[1] > 2
    assert torch.equal(a, b)


@pytest.mark.parametrize("lp", [0.0, 1.0])
def test_cached_beam_equals_recomputed(model, images, lp):
    a = model.generate(images, strategy="beam", num_beams=3, length_penalty=lp, use_cache=True)
    b = model.generate(images, strategy="beam", num_beams=3, length_penalty=lp, use_cache=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "kw",
    [
        dict(strategy="greedy"),
        dict(strategy="beam", num_beams=3, length_penalty=1.0),
        dict(strategy="sample", temperature=1.5, top_k=5),
    ],
    ids=["greedy", "beam", "sample"],
)
def test_static_cache_equals_growing_cache(model, images, kw):
    """The fixed-buffer cache that CUDA graphs replay decodes token for token as the growing one (also across
    beam reordering, which moves rows inside the buffers)."""

    def run(static):
        g = torch.Generator().manual_seed(5) if kw["strategy"] == "sample" else None
        return model.generate(images, static_cache=static, generator=g, **kw)

    a, b = run(False), run(True)
    assert a.shape[1] > 2
    assert torch.equal(a, b)


def test_lagged_done_check_gives_the_same_ids(model, images, monkeypatch):
    """On a GPU the loop asks whether every row ended only every 4th step; the extra all-pad columns are cut."""
    original = model.decode_step
    eos = model.cfg.text.eos_id

    def step(ids, image_tokens, cache):
        logits = original(ids, image_tokens, cache)
        n = cache.length - 1  # new tokens so far
        logits[0, :, eos] = 1e4 if n >= 2 else -1e4  # rows end after 2, 5 and 6 new tokens
        logits[1, :, eos] = 1e4 if n >= 5 else -1e4
        logits[2, :, eos] = 1e4 if n >= 6 else -1e4
        return logits

    monkeypatch.setattr(model, "decode_step", step)
    every_step = model.generate(images, max_new_tokens=12)
    monkeypatch.setattr(generation, "_CHECK_DONE_EVERY", {"cpu": 4})
    lagged = model.generate(images, max_new_tokens=12)
    assert every_step.shape == (3, 8)  # bos + 6 tokens + eos of the last row
    assert torch.equal(lagged, every_step)


def test_one_beam_is_greedy(model, images):
    greedy = model.generate(images, strategy="greedy")
    beam = model.generate(images, strategy="beam", num_beams=1, length_penalty=0.0)
    assert torch.equal(greedy, beam)


def _seq_logprob(model, images, ids):
    tokens = model.encode_image_tokens(images)
    return model.caption_logprob(tokens, ids) * (ids[:, 1:] != model.cfg.text.pad_id).sum(1)


def test_beam_finds_likelier_sequences_than_greedy(model, images):
    greedy = model.generate(images, strategy="greedy", max_new_tokens=6)
    beam = model.generate(images, strategy="beam", num_beams=4, length_penalty=0.0, max_new_tokens=6)
    g, b = _seq_logprob(model, images, greedy), _seq_logprob(model, images, beam)
    assert (b >= g - 1e-4).all()


def _force_eos_after(model, n):
    """Wrap decode_step so that EOS becomes the best token once a row has n new tokens."""
    original = model.decode_step
    eos = model.cfg.text.eos_id

    def step(ids, image_tokens, cache):
        logits = original(ids, image_tokens, cache)
        length = (cache.length if cache is not None else ids.shape[1]) - 1  # new tokens so far
        if length >= n:
            logits[..., eos] = 1e4
        return logits

    return step


def test_stops_at_eos_and_pads_after(model, images, monkeypatch):
    monkeypatch.setattr(model, "decode_step", _force_eos_after(model, 3))
    ids = model.generate(images, strategy="greedy", max_new_tokens=10)
    t = model.cfg.text
    assert ids.shape == (3, 5)  # bos + 3 tokens + eos, then the loop stops
    assert (ids[:, 0] == t.bos_id).all() and (ids[:, 4] == t.eos_id).all()
    assert not (ids[:, 1:4] == t.eos_id).any()
    # min_new_tokens holds EOS back
    ids = model.generate(images, strategy="greedy", max_new_tokens=10, min_new_tokens=6)
    assert (ids[:, 1:7] != t.eos_id).all()


def test_rows_that_end_early_are_padded(model, images, monkeypatch):
    original = model.decode_step
    eos, pad = model.cfg.text.eos_id, model.cfg.text.pad_id

    def step(ids, image_tokens, cache):
        logits = original(ids, image_tokens, cache)
        logits[0, :, eos] = 1e4  # only the first image ends at once
        logits[1:, :, eos] = -1e4
        return logits

    monkeypatch.setattr(model, "decode_step", step)
    ids = model.generate(images, strategy="greedy", max_new_tokens=5)
    assert ids[0, 1] == eos and (ids[0, 2:] == pad).all()
    assert (ids[1:, 1:] != pad).all()


def test_sampling_is_seeded(model, images):
    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return model.generate(images, strategy="sample", temperature=1.5, generator=g, max_new_tokens=8)

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))
    # top_k = 1 leaves only the argmax: sampling becomes greedy
    g = torch.Generator().manual_seed(3)
    top1 = model.generate(images, strategy="sample", top_k=1, generator=g, max_new_tokens=8)
    assert torch.equal(top1, model.generate(images, strategy="greedy", max_new_tokens=8))
    # a tiny nucleus also keeps only the most likely token
    g = torch.Generator().manual_seed(3)
    nucleus = model.generate(images, strategy="sample", top_p=1e-6, generator=g, max_new_tokens=8)
    assert torch.equal(nucleus, top1)


def test_repetition_penalty_discourages_repeats(model, images):
    plain = model.generate(images, strategy="greedy", max_new_tokens=12)
    penalised = model.generate(images, strategy="greedy", max_new_tokens=12, repetition_penalty=1e6)

    def repeats(ids):
        return sum(len(r) - len(set(r)) for r in (row[row > 2].tolist() for row in ids))

    assert repeats(penalised) <= repeats(plain)
    assert repeats(penalised) == 0


def test_image_keys_values_projected_once_per_image(model, images):
    calls = []
    hooks = [
        b.cross_attn.kv.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0])) for b in model.decoder.blocks
    ]
    try:
        model.generate(images, strategy="beam", num_beams=3, max_new_tokens=6)
    finally:
        for h in hooks:
            h.remove()
    assert calls == [3] * len(model.decoder.blocks)  # once per layer, over the 3 images (not 9 beams, not per step)


def test_bad_options_raise(model, images):
    with pytest.raises(ValueError, match="strategy"):
        model.generate(images, strategy="nucleus")
    with pytest.raises(ValueError, match="temperature"):
        model.generate(images, strategy="sample", temperature=0)
    with pytest.raises(ValueError, match="top_p"):
        model.generate(images, strategy="sample", top_p=1.5)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model.generate(torch.randn(2, 1, 64, 64))
    with pytest.raises(ValueError, match="CUDA"):
        model.generate(images, cuda_graph=True)
    with pytest.raises(ValueError, match="use_cache"):
        model.generate(images, use_cache=False, static_cache=True)


def test_a_failed_graph_capture_warns_once_and_goes_eager(model):
    """Under the automatic choice a capture that fails (an op that syncs, a driver limit) costs a warning and the
    model generates eagerly from then on; asked for explicitly, the failure is raised."""
    from types import SimpleNamespace

    from mmxattn.generation import GenerationConfig, _graphed, _use_cuda_graph

    on_gpu = SimpleNamespace(device=torch.device("cuda"))  # only its device is looked at
    auto, explicit = GenerationConfig(), GenerationConfig(cuda_graph=True)
    victim = mmxattn.create_model("mmx_tiny")
    assert _use_cuda_graph(victim, on_gpu, auto)

    def boom():
        raise RuntimeError("operation not permitted when stream is capturing")

    with pytest.raises(RuntimeError, match="capturing"):
        _graphed(victim, explicit, boom)
    assert _use_cuda_graph(victim, on_gpu, auto)  # an explicit request's failure does not switch auto off
    with pytest.warns(UserWarning, match="without graphs from now on"):
        assert _graphed(victim, auto, boom) is None
    assert not _use_cuda_graph(victim, on_gpu, auto)
    assert _use_cuda_graph(model, on_gpu, auto)  # other models are unaffected


def test_generation_options_of_the_wrong_type_or_not_finite_are_named(model, images):
    """NaN fails every comparison, so NaN options used to pass the range checks (a NaN repetition penalty or length
    penalty silently changed the captions); floats for integer options failed deep in torch; a bool was taken as
    1; image_tokens of the wrong shape failed in a matmul."""
    for name, value in (
        ("repetition_penalty", float("nan")),
        ("length_penalty", float("nan")),
        ("temperature", float("nan")),
        ("temperature", "0.7"),
        ("top_p", float("inf")),
        ("num_beams", 2.5),
        ("top_k", 2.5),
        ("min_new_tokens", 1.0),
        ("max_new_tokens", True),
        ("max_new_tokens", 5.5),
    ):
        with pytest.raises(ValueError, match=name):
            model.generate(images, strategy="beam" if name == "length_penalty" else "sample", **{name: value})
    with pytest.raises(ValueError, match="image_tokens"):
        model.generate(image_tokens=torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match="image_tokens"):
        model.generate(image_tokens=(2, 5, 7))
    ids = model.generate(images, max_new_tokens=3, num_beams=2, strategy="beam")  # numpy-style ints still work
    import numpy as np

    assert torch.equal(model.generate(images, max_new_tokens=np.int64(3), num_beams=np.int64(2), strategy="beam"), ids)


@pytest.mark.parametrize(
    "strategy, kw, unused",
    [
        ("greedy", dict(num_beams=5), ["num_beams=5"]),
        ("greedy", dict(top_p=0.5), ["top_p=0.5"]),
        ("greedy", dict(generator=torch.Generator()), ["generator"]),
        (
            "greedy",
            dict(num_beams=2, length_penalty=0.5, temperature=0.7, top_k=3, top_p=0.9, generator=torch.Generator()),
            ["num_beams=2", "length_penalty=0.5", "temperature=0.7", "top_k=3", "top_p=0.9", "generator"],
        ),
        ("beam", dict(num_beams=2, temperature=0.1), ["temperature=0.1"]),
        ("beam", dict(top_k=4, top_p=0.8, generator=torch.Generator()), ["top_k=4", "top_p=0.8", "generator"]),
        ("sample", dict(num_beams=4, length_penalty=2.0, top_k=5), ["num_beams=4", "length_penalty=2.0"]),
    ],
    ids=["greedy-beams", "greedy-top_p", "greedy-generator", "greedy-all", "beam-temp", "beam-sampling", "sample-beam"],
)
def test_options_the_strategy_does_not_use_warn_once(model, images, strategy, kw, unused):
    """An option that the chosen strategy never reads (num_beams with greedy, temperature with beam, ...) used to be
    dropped without a word: now one UserWarning per call names every ignored option and the strategy, pointing at
    the caller's line; the strategy is not changed (the ids are those of the call without the ignored options)."""
    with pytest.warns(UserWarning) as record:
        model.generate(images, strategy=strategy, max_new_tokens=4, **kw)
    assert len(record) == 1
    w = record[0]
    msg = str(w.message)
    assert f"strategy={strategy!r}" in msg and "ignore" in msg
    for name in unused:
        assert name in msg
    assert w.filename == __file__  # stacklevel: the user's call, not mmxattn's or torch's frames
    if strategy == "greedy" and "num_beams" in kw:
        assert "strategy='beam'" in msg  # says how to get beam search instead
    # the options are ignored indeed: the ids are those of the call without them (same seed for sampling)
    names = {u.split("=")[0] for u in unused}
    used = {k: v for k, v in kw.items() if k not in names}
    seeded = dict(generator=torch.Generator().manual_seed(0)) if strategy == "sample" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ids = model.generate(images, strategy=strategy, max_new_tokens=4, **(kw | seeded))
        warnings.simplefilter("error")
        seeded = dict(generator=torch.Generator().manual_seed(0)) if strategy == "sample" else {}
        assert torch.equal(ids, model.generate(images, strategy=strategy, max_new_tokens=4, **(used | seeded)))


def test_default_and_relevant_options_do_not_warn(model, images):
    """Defaults (whether left out or passed explicitly) and the options a strategy does use stay silent; num_beams'
    default (3, for beam search) is not an ignored option of greedy or sample."""
    calls = [
        dict(),
        dict(strategy="greedy", num_beams=1, length_penalty=1.0, temperature=1.0, top_k=0, top_p=1.0, generator=None),
        dict(strategy="greedy", min_new_tokens=2, repetition_penalty=1.3, use_cache=False),
        dict(strategy="beam"),
        dict(strategy="beam", num_beams=2, length_penalty=0.5, repetition_penalty=1.2, min_new_tokens=1),
        dict(strategy="beam", temperature=1.0, top_k=0, top_p=1.0, generator=None),
        dict(strategy="sample"),
        dict(strategy="sample", temperature=0.7, top_k=5, top_p=0.9, generator=torch.Generator().manual_seed(0)),
        dict(strategy="sample", num_beams=1, length_penalty=1.0),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for kw in calls:
            model.generate(images, max_new_tokens=3, **kw)
        model.generate(image_tokens=model.encode_image_tokens(images), max_new_tokens=3)


def test_min_new_tokens_above_max_new_tokens_raises(model, images):
    """min_new_tokens=10, max_new_tokens=3 used to return 3 tokens: the minimum could not be met."""
    with pytest.raises(ValueError, match=r"min_new_tokens.*10.*max_new_tokens.*3"):
        model.generate(images, min_new_tokens=10, max_new_tokens=3)
    with pytest.raises(ValueError, match="min_new_tokens"):
        generation.GenerationConfig(min_new_tokens=4, max_new_tokens=2)
    ids = model.generate(images, min_new_tokens=3, max_new_tokens=3)  # equal is fine
    assert ids.shape == (3, 4)


@pytest.mark.parametrize("strategy", ["sample", "greedy", "beam"])
@pytest.mark.parametrize("bad", [0, "seed", torch.Generator], ids=["int", "str", "class"])
def test_a_generator_that_is_not_a_torch_generator_is_a_type_error(model, images, strategy, bad):
    """generator=0 used to fail deep in sampling with "'int' object has no attribute 'device'" (and was ignored
    by greedy and beam)."""
    with pytest.raises(TypeError, match="generator.*torch.Generator"):
        model.generate(images, strategy=strategy, generator=bad, max_new_tokens=2)


def test_image_tokens_are_cast_to_the_model_dtype(model, images):
    """Images in another float dtype are cast to the model's; image tokens used to fail in the decoder's matmul
    ("mat1 and mat2 must have the same dtype")."""
    tokens = model.encode_image_tokens(images)
    ref = model.generate(images, max_new_tokens=5)
    assert torch.equal(model.generate(image_tokens=tokens, max_new_tokens=5), ref)
    assert torch.equal(model.generate(image_tokens=tokens.double(), max_new_tokens=5), ref)
    beam = model.generate(images, strategy="beam", num_beams=2, max_new_tokens=5)
    assert torch.equal(
        model.generate(image_tokens=tokens.double(), strategy="beam", num_beams=2, max_new_tokens=5), beam
    )
    with pytest.raises(ValueError, match="image_tokens.*float"):
        model.generate(image_tokens=tokens.long())
