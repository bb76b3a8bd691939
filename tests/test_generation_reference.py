"""Generation against references written from the definitions, not from generation.py.

Every reference reads the model only through its teacher-forced forward pass (``model.text`` + ``model.decode``
over the whole sequence at once, what training and ``caption_logprob`` use; itself checked against
``caption_logprob`` below), never through generation.py's stepping, cache or logit processing:

* beam search with enough beams returns the optimum of an exhaustive search over every continuation, and with
  fewer beams the hypothesis of a plain beam search without early stopping;
* ``strategy="sample"`` draws from the distribution that temperature, top-k, top-p (nucleus) and the repetition
  penalty define, checked on the probabilities handed to ``torch.multinomial`` (random logits with ties, and every
  step of real generations) and statistically on seeded draws;
* greedy picks the argmax of the model's next-token distribution; EOS never comes before ``min_new_tokens``.

Definitions used (those documented in generation.py, with HF transformers' conventions where it is silent):

* allowed tokens: PAD and BOS are never generated, EOS not while fewer than ``min_new_tokens`` new tokens exist
  (HF's MinNewTokensLength: EOS may be the (min_new_tokens + 1)-th new token). A step's log-probabilities are the
  model's log-softmax renormalised over the allowed tokens (``_adjust_logits``'s docstring: "log-probabilities of
  the next token after repetition penalty and forbidden tokens").
* repetition penalty (Keskar et al. 2019, CTRL): the logit of every token already generated is divided by the
  penalty if positive and multiplied by it otherwise, once per token whatever its count, before the softmax.
* beam score: ``sum of step log-probabilities / length ** length_penalty``, the ``score / length ** penalty`` of
  ``generate``'s docstring, i.e. HF's BeamHypotheses (not GNMT's ``((5 + length) / 6) ** alpha`` of Wu et al. 2016),
  where length counts the new tokens including the EOS (not BOS); a hypothesis still open at ``max_new_tokens``
  competes with length ``max_new_tokens``.
* sampling: temperature divides the log-probabilities, then top-k keeps the tokens whose value is at least the k-th
  largest (ties at the k-th value are kept, as HF's TopKLogitsWarper), then top-p (Holtzman et al. 2020) keeps,
  of the renormalised top-k distribution, the smallest set of most likely tokens whose mass reaches p (at least one
  token; with ties at the boundary any such set is accepted).
"""

from __future__ import annotations

import contextlib
import itertools
import math

import pytest
import torch

import mmxattn
from mmxattn import generation

WORDS = 4  # the small model's vocabulary: PAD, BOS, EOS and 4 words
N_NEW = 4  # max_new_tokens of the exhaustive search: 4**4 open + 85 ended hypotheses per image
# More beams than live prefixes at any step but the last (4**3): every candidate but the weakest open ones of the
# last step is kept, and those cannot win (an open hypothesis of full length outranks them at equal length).
EXHAUSTIVE_BEAMS = WORDS ** (N_NEW - 1) + 1
NEG_INF = float("-inf")


def _model(vocab_size: int, context_length: int, seed: int, eos_bias: float = 2.0):
    """A tiny MMXAttn whose next-token distributions are spread (neither uniform nor one-hot) and depend on the
    prefix and on the image (untied LM head: the tied one of the random init mostly predicts its input token), and
    that ends captions now and then (a constant EOS logit bias through a constant unit of the final norm)."""
    torch.manual_seed(seed)
    m = mmxattn.create_model(
        "mmx_tiny", vocab_size=vocab_size, context_length=context_length, tie_embeddings=False
    ).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.startswith(("text.", "decoder.")) and p.dim() == 2:
                p.mul_(5)
        torch.nn.init.normal_(m.lm_head.weight, std=0.2)
        m.decoder.ln_final.weight[0], m.decoder.ln_final.bias[0] = 0.0, 1.0  # hidden unit 0 is always 1
        m.lm_head.weight[:, 0] = 0.0
        m.lm_head.weight[m.cfg.text.eos_id, 0] = eos_bias
    return m


@pytest.fixture(scope="module")
def small():
    return _model(3 + WORDS, N_NEW + 2, seed=2)


@pytest.fixture(scope="module")
def small_tokens():
    torch.manual_seed(1)
    return torch.randn(4, 6, 64) * 3  # four "images" as image tokens (B, L, width): strong image dependence


@pytest.fixture(scope="module")
def wide():
    return _model(40, 12, seed=2)


@pytest.fixture(scope="module")
def wide_tokens():
    torch.manual_seed(3)
    return torch.randn(4, 6, 64) * 3


# ---------------------------------------------------------------------------------------------------- references
@torch.no_grad()
def _teacher_forced_logits(model, image_tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(B, T, V) float64 logits of the token after every prefix of ``ids`` (B, T) (no PAD in ``ids``): one causal
    pass of the text tower and the decoder over the whole sequence, not generation.py's step or cache."""
    _, states = model.text(ids)
    return model.decode(image_tokens, states).double()


def _special(model) -> tuple[int, int, int]:
    t = model.cfg.text
    return t.pad_id, t.bos_id, t.eos_id


def _ref_logprobs(model, logits, generated, min_new_tokens: int, repetition_penalty: float) -> list[float]:
    """The next token's log-probabilities (a list over the vocabulary, -inf for forbidden tokens) from the raw
    logits after ``generated`` (the new tokens so far), by the definitions in the module docstring."""
    pad, bos, eos = _special(model)
    x = [float(v) for v in logits]
    if repetition_penalty != 1.0:
        for t in set(generated):
            x[t] = x[t] / repetition_penalty if x[t] > 0 else x[t] * repetition_penalty
    banned = {pad, bos} | ({eos} if len(generated) < min_new_tokens else set())
    allowed = [i for i in range(len(x)) if i not in banned]
    top = max(x[i] for i in allowed)
    lse = top + math.log(sum(math.exp(x[i] - top) for i in allowed))
    return [x[i] - lse if i not in banned else NEG_INF for i in range(len(x))]


def _softmax(x: list[float]) -> list[float]:
    top = max(x)
    e = [math.exp(v - top) if v != NEG_INF else 0.0 for v in x]
    s = sum(e)
    return [v / s for v in e]


def _ref_top_k(logp: list[float], temperature: float, top_k: int) -> list[float]:
    """Temperature then top-k (ties at the k-th value kept): the distribution top-p then filters."""
    x = [v / temperature for v in logp]
    if top_k > 0:
        kth = sorted(x, reverse=True)[min(top_k, len(x)) - 1]
        x = [v if v >= kth else NEG_INF for v in x]
    return _softmax(x)


def _check_drawn_from(probs: list[float], logp: list[float], temperature: float, top_k: int, top_p: float) -> None:
    """``probs`` (what was handed to torch.multinomial) is the distribution that temperature, top-k and top-p
    define from ``logp``; at the nucleus boundary any of the equally good sets is accepted (ties), and masses are
    compared with a float32 tolerance."""
    tol = 2e-6
    q = _ref_top_k(logp, temperature, top_k)
    assert abs(sum(probs) - 1) < 1e-5
    if top_p >= 1.0:
        assert max(abs(a - b) for a, b in zip(probs, q)) < tol, (probs, q)
        return
    kept = [i for i, p in enumerate(probs) if p > 0]
    dropped = [i for i, v in enumerate(q) if v > 0 and i not in kept]
    assert kept, "nothing kept"
    assert all(q[i] > 0 for i in kept), "a token outside the temperature/top-k support was kept"
    mass = sum(q[i] for i in kept)
    smallest = min(q[i] for i in kept)
    assert mass >= top_p - tol, f"kept mass {mass} does not reach top_p={top_p}"
    assert len(kept) == 1 or mass - smallest < top_p + tol, f"not the smallest set: {mass} - {smallest} >= {top_p}"
    assert not dropped or smallest >= max(q[i] for i in dropped) - 1e-9, "a likelier token was dropped"
    for i in kept:  # renormalised over the nucleus
        assert abs(probs[i] - q[i] / mass) < tol * 5, (i, probs[i], q[i] / mass)


@contextlib.contextmanager
def _multinomial_spy():
    """Record the probabilities every torch.multinomial call of generation.py draws from (and draw as usual)."""
    seen: list[torch.Tensor] = []
    real = torch.multinomial

    def spy(probs, num_samples, *args, **kwargs):
        seen.append(probs.detach().double().cpu().clone())
        return real(probs, num_samples, *args, **kwargs)

    mp = pytest.MonkeyPatch()
    mp.setattr(torch, "multinomial", spy)
    try:
        yield seen
    finally:
        mp.undo()


def _new_tokens(row: torch.Tensor, model) -> tuple[int, ...]:
    """The new tokens of a generated row (BOS dropped, the padding after EOS cut)."""
    pad, bos, eos = _special(model)
    assert int(row[0]) == bos
    out = []
    for t in row[1:].tolist():
        if t == pad:
            break
        out.append(t)
    assert pad not in row[1 : len(out) + 1].tolist() and all(t == pad for t in row[len(out) + 1 :].tolist())
    return tuple(out)


class _Tree:
    """Every prefix's step log-probabilities for one image of the small model, from one teacher-forced pass over
    all WORDS ** (N_NEW - 1) word sequences (position j of a row is the prefix of its first j words)."""

    def __init__(self, model, image_tokens: torch.Tensor, min_new_tokens: int, repetition_penalty: float):
        _, bos, self.eos = _special(model)
        self.words = list(range(3, 3 + WORDS))
        rows = list(itertools.product(self.words, repeat=N_NEW - 1))
        ids = torch.tensor([[bos, *r] for r in rows])
        logits = _teacher_forced_logits(model, image_tokens.expand(len(rows), -1, -1), ids)
        self.logp: dict[tuple[int, ...], list[float]] = {}
        for r, lg in zip(rows, logits):
            for j in range(N_NEW):
                if r[:j] not in self.logp:
                    self.logp[r[:j]] = _ref_logprobs(model, lg[j], r[:j], min_new_tokens, repetition_penalty)

    def score(self, seq: tuple[int, ...]) -> float:
        """Sum of the step log-probabilities of the new tokens ``seq``."""
        return sum(self.logp[seq[:j]][t] for j, t in enumerate(seq))

    def hypotheses(self) -> dict[tuple[int, ...], float]:
        """Every complete hypothesis -> its summed log-probability: a word prefix followed by EOS where EOS is
        allowed, or N_NEW words (open at max_new_tokens)."""
        out = {}
        for n in range(N_NEW + 1):
            for prefix in itertools.product(self.words, repeat=n):
                if n == N_NEW:
                    out[prefix] = self.score(prefix)
                elif self.logp[prefix][self.eos] > NEG_INF:
                    out[(*prefix, self.eos)] = self.score((*prefix, self.eos))
        return out

    def beam(self, num_beams: int, length_penalty: float) -> tuple[tuple[int, ...], float]:
        """Textbook beam search without early stopping: at every step the candidates (each live beam extended by
        each allowed token) are taken best first; one ending in EOS becomes a finished hypothesis, the others live
        beams, until num_beams live beams are filled; at max_new_tokens the live beams join the finished ones.
        Returns the best hypothesis and the smallest score gap at any decision (to rule out float near-ties)."""
        live, finished, gap = [((), 0.0)], [], math.inf
        for _ in range(N_NEW):
            cands = sorted(
                ((s + lp, (*seq, t)) for seq, s in live for t, lp in enumerate(self.logp[seq]) if lp > NEG_INF),
                reverse=True,
            )
            live = []
            for i, (s, seq) in enumerate(cands):
                if seq[-1] == self.eos:
                    finished.append((s / len(seq) ** length_penalty, seq))
                else:
                    live.append((seq, s))
                if len(live) == num_beams:
                    if i + 1 < len(cands):
                        gap = min(gap, s - cands[i + 1][0])
                    break
        finished += [(s / N_NEW**length_penalty, seq) for seq, s in live]
        finished.sort(reverse=True)
        if len(finished) > 1:
            gap = min(gap, finished[0][0] - finished[1][0])
        return finished[0][1], gap


# ---------------------------------------------------------------------------------------------- the reference itself
def test_reference_forward_is_the_models_caption_logprob(small, small_tokens):
    """The references' teacher-forced pass gives the model's own likelihood (``caption_logprob``)."""
    pad, bos, eos = _special(small)
    torch.manual_seed(0)
    B = small_tokens.shape[0]
    ids = torch.cat([torch.full((B, 1), bos), torch.randint(3, 3 + WORDS, (B, N_NEW)), torch.full((B, 1), eos)], 1)
    logp = _teacher_forced_logits(small, small_tokens, ids).log_softmax(-1)[:, :-1]
    ours = logp.gather(-1, ids[:, 1:, None]).squeeze(-1).sum(1)
    theirs = small.caption_logprob(small_tokens, ids, normalize=False).double()
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------------------ beam search
BEAM_CASES = [
    # (length_penalty, min_new_tokens, repetition_penalty)
    (0.0, 0, 1.0),
    (0.0, 2, 1.0),
    (0.5, 0, 1.0),
    (1.0, 0, 1.0),
    (2.0, 0, 1.0),
    (-0.5, 0, 1.0),
    (1.0, 2, 1.0),
    (0.5, 1, 1.8),
    (1.5, 3, 0.6),
]
BEAM_IDS = [f"lp{lp}-min{m}-rep{r}" for lp, m, r in BEAM_CASES]


@pytest.mark.parametrize("length_penalty, min_new_tokens, repetition_penalty", BEAM_CASES, ids=BEAM_IDS)
def test_beam_search_with_enough_beams_is_exhaustive(
    small, small_tokens, length_penalty, min_new_tokens, repetition_penalty
):
    """With more beams than live prefixes, beam search returns the best of ALL hypotheses (every word sequence up
    to max_new_tokens, ended by EOS where allowed or open at the limit) under score / length ** length_penalty;
    with fewer beams, a valid hypothesis scoring no better than that optimum."""
    opts = dict(length_penalty=length_penalty, min_new_tokens=min_new_tokens, repetition_penalty=repetition_penalty)
    got = small.generate(
        image_tokens=small_tokens, strategy="beam", num_beams=EXHAUSTIVE_BEAMS, max_new_tokens=N_NEW, **opts
    )
    few = {k: small.generate(image_tokens=small_tokens, strategy="beam", num_beams=k, max_new_tokens=N_NEW, **opts)
           for k in (1, 2, 5)}  # fmt: skip
    for b in range(small_tokens.shape[0]):
        tree = _Tree(small, small_tokens[b : b + 1], min_new_tokens, repetition_penalty)
        hyps = {seq: s / len(seq) ** length_penalty for seq, s in tree.hypotheses().items()}
        ranked = sorted(hyps.items(), key=lambda kv: kv[1], reverse=True)
        (best, best_score), (_, runner_up) = ranked[:2]
        seq = _new_tokens(got[b], small)
        assert seq in hyps, f"beam returned {seq}, not a valid hypothesis"
        assert best_score - runner_up > 1e-4, "near-tie: the setting does not decide the optimum"
        assert seq == best, (
            f"image {b}: beam search with {EXHAUSTIVE_BEAMS} beams returned {seq} (score {hyps[seq]:.5f}), "
            f"the exhaustive optimum is {best} (score {best_score:.5f})"
        )
        for k, ids in few.items():
            s = _new_tokens(ids[b], small)
            assert s in hyps, f"num_beams={k} returned {s}, not a valid hypothesis"
            assert hyps[s] <= best_score + 1e-5


def test_the_exhaustive_optimum_depends_on_the_options(small, small_tokens):
    """Guard on the test above: in its setting the optimum changes with the length penalty, min_new_tokens, the
    repetition penalty and the image, and has various lengths, so a beam search that ignored any of them (or
    normalised by another length) would fail it."""

    def optimum(lp, m, r, b):
        tree = _Tree(small, small_tokens[b : b + 1], m, r)
        hyps = {seq: s / len(seq) ** lp for seq, s in tree.hypotheses().items()}
        return max(hyps, key=hyps.get)

    assert len({len(optimum(lp, m, r, b)) for lp, m, r in BEAM_CASES for b in (0, 1)}) >= 3
    assert optimum(0.0, 0, 1.0, 1) != optimum(0.5, 0, 1.0, 1)  # length penalty
    assert optimum(1.0, 0, 1.0, 0) != optimum(2.0, 0, 1.0, 0)
    assert optimum(0.0, 0, 1.0, 1) != optimum(0.0, 2, 1.0, 1)  # min_new_tokens
    assert optimum(0.5, 1, 1.8, 1) != optimum(0.5, 1, 1.0, 1)  # repetition penalty
    assert optimum(1.5, 3, 0.6, 0) != optimum(1.5, 3, 1.0, 0)
    assert optimum(0.0, 0, 1.0, 0) != optimum(0.0, 0, 1.0, 1)  # the image


@pytest.mark.parametrize("num_beams", [1, 2, 3, 5])
@pytest.mark.parametrize("length_penalty, min_new_tokens, repetition_penalty", BEAM_CASES, ids=BEAM_IDS)
def test_beam_search_equals_textbook_beam_search(
    small, small_tokens, num_beams, length_penalty, min_new_tokens, repetition_penalty
):
    """With few beams, generation.py's beam search (2K candidates, early stop once no live beam can beat the
    K-th finished one) returns the hypothesis of a plain beam search that runs every step to max_new_tokens: the
    early stop is exact and the candidate bookkeeping keeps the K best live beams."""
    opts = dict(length_penalty=length_penalty, min_new_tokens=min_new_tokens, repetition_penalty=repetition_penalty)
    got = small.generate(image_tokens=small_tokens, strategy="beam", num_beams=num_beams, max_new_tokens=N_NEW, **opts)
    for b in range(small_tokens.shape[0]):
        tree = _Tree(small, small_tokens[b : b + 1], min_new_tokens, repetition_penalty)
        want, gap = tree.beam(num_beams, length_penalty)
        assert gap > 1e-5, "near-tie in the reference beam search: the setting does not decide it"
        assert _new_tokens(got[b], small) == want, f"image {b}"


def test_beam_never_returns_a_forbidden_hypothesis_whatever_the_length_penalty(small, small_tokens):
    """A hypothesis that min_new_tokens forbids is not a hypothesis: however strongly the length penalty favours
    short ones, beam search returns the best ALLOWED one (the exhaustive optimum), never [BOS, EOS] (forbidden
    tokens had the finite logit finfo.min, so with more beams than allowed tokens that EOS became a finished
    hypothesis of score ~ -3.4e38, which a length penalty of -80 let win)."""
    eos = _special(small)[2]
    lp, m = -80.0, 2
    # more beams than the 4 words plus PAD and BOS: the first step's walk reaches the forbidden EOS
    got = small.generate(
        image_tokens=small_tokens, strategy="beam", num_beams=WORDS + 3, max_new_tokens=N_NEW, min_new_tokens=m,
        length_penalty=lp,
    )  # fmt: skip
    for b in range(small_tokens.shape[0]):
        seq = _new_tokens(got[b], small)
        assert eos not in seq[:m], f"image {b}: {seq} ends before min_new_tokens={m}"
        tree = _Tree(small, small_tokens[b : b + 1], m, 1.0)
        hyps = {s: v / len(s) ** lp for s, v in tree.hypotheses().items()}
        assert seq == max(hyps, key=hyps.get)


# --------------------------------------------------------------------------------------------------------- sampling
def _random_logp_cases(n_cases: int, seed: int):
    """(log-probabilities (R, V) float32 as _adjust_logits returns them, temperature, top_k, top_p): random
    vocabularies, logits drawn continuous or on a coarse grid (many exact ties), some tokens forbidden
    (-inf), temperatures around 1, top_k from 1 to past V, top_p from ~0 to ~1 and exact cumulative masses."""
    g = torch.Generator().manual_seed(seed)
    for case in range(n_cases):
        V = int(torch.randint(3, 30, (1,), generator=g))
        x = torch.randn(6, V, generator=g) * float(torch.empty(1).uniform_(0.3, 4, generator=g))
        if case % 2:
            x = (x * 2).round() / 2  # ties
        if case % 3 == 0:
            x[:, :2] = float("-inf")  # forbidden (PAD, BOS)
        logp = x.float().log_softmax(-1)
        temperature = [0.25, 0.7, 1.0, 1.6, 5.0][case % 5]
        top_k = [0, 0, 1, 2, 3, 5, V, V + 3][case % 8]
        top_p = [1.0, 1.0, 1e-6, 0.05, 0.3, 0.5, 0.9, 0.95, 0.999, 0.999999][case % 10]
        yield logp, temperature, top_k, top_p
    # a nucleus boundary on exact masses, with ties: {0.5, 0.25, 0.25}, p = 0.75 and p = 0.5
    three = torch.tensor([[0.5, 0.25, 0.25, 0.0]]).log().float()
    for p in (0.5, 0.75, 0.7501, 1.0):
        yield three, 1.0, 0, p


def test_sample_filters_as_defined_on_random_logits():
    """The probabilities ``_sample`` hands to torch.multinomial are temperature -> top-k -> top-p of its input,
    on many random cases (ties, forbidden tokens, top_k of 1 and past V, top_p near 0 and 1)."""
    n = 0
    for logp, temperature, top_k, top_p in _random_logp_cases(400, seed=0):
        cfg = generation.GenerationConfig(strategy="sample", temperature=temperature, top_k=top_k, top_p=top_p)
        with _multinomial_spy() as seen:
            drawn = generation._sample(logp, cfg)
        assert len(seen) == 1 and seen[0].shape == logp.shape
        for row, probs in zip(logp.double().tolist(), seen[0].tolist()):
            _check_drawn_from(probs, row, temperature, top_k, top_p)
            n += 1
        assert all(seen[0][i, int(t)] > 0 for i, t in enumerate(drawn))
    assert n > 2000


def test_top_k_and_top_p_keep_the_right_number_of_tokens():
    """Hand-made cases with the answer written out (independent of the helper above)."""
    cfg = generation.GenerationConfig
    logp = torch.tensor([[0.1, 0.4, 0.2, 0.3]]).log()

    def support(**kw):
        with _multinomial_spy() as seen:
            generation._sample(logp, cfg(strategy="sample", **kw))
        return (seen[0][0] > 0).nonzero().flatten().tolist()

    assert support(top_k=1) == [1]
    assert support(top_k=2) == [1, 3]
    assert support(top_k=10) == [0, 1, 2, 3]
    assert support(top_p=0.39) == [1]  # 0.4 reaches 0.39 (exact boundaries are left to float rounding)
    assert support(top_p=0.41) == [1, 3]
    assert support(top_p=0.69) == [1, 3]
    assert support(top_p=0.71) == [1, 2, 3]
    assert support(top_p=1e-9) == [1]  # always at least one token
    assert support(top_k=3, top_p=0.5) == [1, 3]  # top-p of the top-k distribution (0.4/0.9 < 0.5)
    assert support(top_k=2, top_p=0.5) == [1]  # 0.4/0.7 = 0.57 reaches 0.5
    assert support(temperature=0.1, top_p=0.9) == [1]  # a cold distribution: the argmax carries > 0.9
    assert support(temperature=10.0, top_p=0.5) == [1, 3]  # a hot one: two tokens (0.27 + 0.26) reach 0.5


def test_sample_frequencies_match_the_reference_distribution():
    """Statistically: 40000 seeded draws of one step follow the filtered reference distribution (chi-square far
    under its 6-sigma bound; no draw outside the support). Deterministic (fixed seed)."""
    logp = torch.tensor([[2.0, 1.7, 1.5, 1.1, 0.9, 0.4, 0.3, -0.2, -1.0, -1.5, -2.5, -3.0]]).log_softmax(-1)
    temperature, top_k, top_p, n = 0.8, 9, 0.9, 40000
    q = _ref_top_k(logp[0].double().tolist(), temperature, top_k)
    order = sorted(range(len(q)), key=lambda i: -q[i])
    keep, mass = [], 0.0
    for i in order:  # the nucleus, written out (no ties here)
        if mass >= top_p:
            break
        keep.append(i)
        mass += q[i]
    assert 2 < len(keep) < top_k  # both filters bite
    want = torch.zeros(len(q), dtype=torch.float64)
    want[keep] = torch.tensor([q[i] / mass for i in keep], dtype=torch.float64)
    cfg = generation.GenerationConfig(
        strategy="sample", temperature=temperature, top_k=top_k, top_p=top_p, generator=torch.Generator().manual_seed(0)
    )
    draws = generation._sample(logp.expand(n, -1).contiguous(), cfg)
    counts = torch.bincount(draws, minlength=len(q)).double()
    assert counts[want == 0].sum() == 0, counts
    expected = want[keep] * n
    chi2 = float(((counts[keep] - expected) ** 2 / expected).sum())
    dof = len(keep) - 1
    assert chi2 < dof + 6 * math.sqrt(2 * dof), (chi2, counts, expected)


SAMPLE_CASES = [
    # (temperature, top_k, top_p, repetition_penalty, min_new_tokens)
    (1.0, 0, 1.0, 1.0, 0),
    (0.7, 5, 1.0, 1.3, 2),
    (1.3, 0, 0.8, 1.0, 0),
    (1.0, 10, 0.6, 2.0, 3),
    (2.0, 3, 0.95, 0.7, 1),
]


@pytest.mark.parametrize("temperature, top_k, top_p, repetition_penalty, min_new_tokens", SAMPLE_CASES)
def test_every_sampling_step_draws_from_the_reference_distribution(
    wide, wide_tokens, temperature, top_k, top_p, repetition_penalty, min_new_tokens
):
    """In real generations, every step of every live row draws from the distribution that the definitions give
    from the model's teacher-forced logits of the row's own prefix (repetition penalty over its tokens, PAD/BOS
    and early EOS forbidden, then temperature, top-k, top-p)."""
    opts = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    with _multinomial_spy() as seen:
        ids = wide.generate(
            image_tokens=wide_tokens.repeat(2, 1, 1), strategy="sample", max_new_tokens=8,
            min_new_tokens=min_new_tokens, repetition_penalty=repetition_penalty,
            generator=torch.Generator().manual_seed(7), **opts,
        )  # fmt: skip
    assert len(seen) == ids.shape[1] - 1
    pad, _, eos = _special(wide)
    checked = 0
    for b in range(ids.shape[0]):
        new = _new_tokens(ids[b], wide)
        logits = _teacher_forced_logits(wide, wide_tokens.repeat(2, 1, 1)[b : b + 1], ids[b : b + 1, : len(new) + 1])
        for j in range(len(new)):
            logp = _ref_logprobs(wide, logits[0, j], new[:j], min_new_tokens, repetition_penalty)
            _check_drawn_from(seen[j][b].tolist(), logp, **opts)
            checked += 1
    assert checked >= 30


# -------------------------------------------------------------------------------------------------- greedy, min len
def test_greedy_first_token_is_the_argmax_of_caption_logprob(wide, wide_tokens):
    """The first token of greedy decoding is the word that ``caption_logprob`` (the model's own teacher-forced
    likelihood) rates likeliest after BOS, among the tokens that may be generated."""
    pad, bos, eos = _special(wide)
    V = wide.cfg.text.vocab_size
    B = wide_tokens.shape[0]
    cands = [t for t in range(V) if t not in (pad, bos)]
    ids = torch.tensor([[bos, t] for t in cands])
    scores = torch.stack(
        [
            wide.caption_logprob(wide_tokens[b : b + 1].expand(len(cands), -1, -1), ids, normalize=False)
            for b in range(B)
        ]
    )  # (B, candidates)
    want = torch.tensor(cands)[scores.argmax(1)]
    got = wide.generate(image_tokens=wide_tokens, strategy="greedy", max_new_tokens=3)
    assert torch.equal(got[:, 1], want)
    assert len(set(want.tolist())) > 1  # the images disagree: a batched mix-up would show
    # with min_new_tokens EOS is out of the running
    words = [i for i, t in enumerate(cands) if t != eos]
    want_min = torch.tensor(cands)[torch.tensor(words)[scores[:, words].argmax(1)]]
    got_min = wide.generate(image_tokens=wide_tokens, strategy="greedy", max_new_tokens=3, min_new_tokens=1)
    assert torch.equal(got_min[:, 1], want_min)


@pytest.mark.parametrize("min_new_tokens, repetition_penalty", [(0, 1.0), (3, 1.0), (2, 1.6), (0, 0.5)])
def test_greedy_follows_the_teacher_forced_argmax(wide, wide_tokens, min_new_tokens, repetition_penalty):
    """Every greedy token is the argmax of the reference next-token log-probabilities of its prefix; rows stop at
    EOS (then PAD) or at max_new_tokens."""
    max_new = 10
    ids = wide.generate(
        image_tokens=wide_tokens, strategy="greedy", max_new_tokens=max_new, min_new_tokens=min_new_tokens,
        repetition_penalty=repetition_penalty,
    )  # fmt: skip
    eos = _special(wide)[2]
    for b in range(ids.shape[0]):
        new = _new_tokens(ids[b], wide)
        assert new[-1] == eos or len(new) == max_new
        assert eos not in new[:-1]
        logits = _teacher_forced_logits(wide, wide_tokens[b : b + 1], ids[b : b + 1, : len(new) + 1])
        for j, t in enumerate(new):
            logp = _ref_logprobs(wide, logits[0, j], new[:j], min_new_tokens, repetition_penalty)
            assert logp[t] >= max(logp) - 1e-5, f"row {b} step {j}: took {t}, the argmax is {logp.index(max(logp))}"


def _eos_boosted(model, boost: float):
    original = model.decode_step
    eos = _special(model)[2]

    def step(ids, image_tokens, cache):
        logits = original(ids, image_tokens, cache).clone()
        logits[..., eos] += boost
        return logits

    return step


@pytest.mark.parametrize("strategy", ["greedy", "beam", "sample"])
@pytest.mark.parametrize("min_new_tokens", [0, 1, 3])
@pytest.mark.parametrize("boost", [3.0, 40.0])
def test_eos_never_before_min_new_tokens(wide, wide_tokens, monkeypatch, strategy, min_new_tokens, boost):
    """Whatever the strategy, and however strongly the model wants to end, the first min_new_tokens new tokens
    are not EOS; when EOS dominates (boost 40) it comes exactly as the (min_new_tokens + 1)-th token (the minimum
    is not overshot either)."""
    monkeypatch.setattr(wide, "decode_step", _eos_boosted(wide, boost))
    tokens = wide_tokens.repeat(4, 1, 1)  # 16 rows
    kw = dict(strategy=strategy, max_new_tokens=6, min_new_tokens=min_new_tokens)
    if strategy == "beam":
        kw |= dict(num_beams=3, length_penalty=1.0)
    if strategy == "sample":
        kw |= dict(generator=torch.Generator().manual_seed(min_new_tokens), temperature=1.5)
    ids = wide.generate(image_tokens=tokens, **kw)
    eos = _special(wide)[2]
    for b in range(ids.shape[0]):
        new = _new_tokens(ids[b], wide)
        assert eos not in new[:min_new_tokens], f"row {b}: {new}"
        assert len(new) > min_new_tokens
        if boost > 10:
            assert new[min_new_tokens] == eos, f"row {b}: {new}"
