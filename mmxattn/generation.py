"""Caption generation: greedy, beam search and sampling, batched, with a KV cache.

Our own code (no ``transformers``). With ``use_cache=True`` (default) every step feeds only the newest token: the
text encoder's and the decoder's self-attention keys/values grow in a :class:`~mmxattn.text.towers.DecodingCache`
and the decoder's cross-attention keys/values of the image are projected once per image (then repeated per beam).
``use_cache=False`` recomputes the whole prefix each step (the reference the cache is tested against).

Every strategy returns ``(B, 1 + n)`` token ids starting with BOS; a row that ended is padded with ``pad_id``
after its EOS.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .text.towers import DecodingCache

__all__ = ["generate", "GenerationConfig"]

STRATEGIES = ("greedy", "beam", "sample")


class GenerationConfig:
    """Validated generation options (see :func:`generate`)."""

    def __init__(
        self,
        strategy: str = "greedy",
        max_new_tokens: int | None = None,
        min_new_tokens: int = 0,
        num_beams: int = 3,
        length_penalty: float = 1.0,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        if num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {num_beams}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if top_k < 0 or min_new_tokens < 0 or repetition_penalty <= 0:
            raise ValueError("top_k and min_new_tokens must be >= 0 and repetition_penalty > 0")
        if max_new_tokens is not None and max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.__dict__.update({k: v for k, v in locals().items() if k != "self"})


def _adjust_logits(logits: Tensor, ids: Tensor, step: int, cfg: GenerationConfig, special: dict[str, int]) -> Tensor:
    """Log-probabilities (N, V) of the next token after repetition penalty and forbidden tokens."""
    logits = logits.float()
    if cfg.repetition_penalty != 1.0:
        # CTRL's penalty (Keskar et al. 2019): shrink the logits of tokens already in the sequence.
        prev = logits.gather(1, ids)
        prev = torch.where(prev > 0, prev / cfg.repetition_penalty, prev * cfg.repetition_penalty)
        logits = logits.scatter(1, ids, prev)
    neg = torch.finfo(logits.dtype).min
    logits[:, special["pad"]] = neg  # never generated
    logits[:, special["bos"]] = neg
    if step < cfg.min_new_tokens:
        logits[:, special["eos"]] = neg
    return logits.log_softmax(-1)


def _sample(logp: Tensor, cfg: GenerationConfig) -> Tensor:
    logits = logp / cfg.temperature
    if cfg.top_k > 0:
        kth = logits.topk(min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        # nucleus (Holtzman et al. 2020): keep the smallest set of tokens whose probability reaches top_p
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cum - sorted_logits.softmax(-1) >= cfg.top_p  # keep the token that crosses top_p
        drop = drop_sorted.scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=cfg.generator).squeeze(1)


class _Stepper:
    """Feeds the model one step at a time, with or without the cache."""

    def __init__(self, model: Any, image_tokens: Tensor, use_cache: bool, repeat: int = 1) -> None:
        self.model = model
        self.cache: DecodingCache | None = None
        if use_cache:
            self.cache = model.new_cache()
            # cross-attention keys/values: projected once per image, then repeated for its beams
            for blk, c in zip(model.decoder.blocks, self.cache.dec_cross):
                k, v = blk.cross_attn.project_kv(image_tokens)  # (B, nh, L, hd)
                c.k, c.v = k.repeat_interleave(repeat, dim=0), v.repeat_interleave(repeat, dim=0)
        self.image_tokens = image_tokens.repeat_interleave(repeat, dim=0) if repeat > 1 else image_tokens

    def __call__(self, ids: Tensor) -> Tensor:
        if self.cache is None:
            return self.model.decode_step(ids, self.image_tokens, None)[:, -1]
        fed = ids if self.cache.length == 0 else ids[:, -1:]
        return self.model.decode_step(fed, self.image_tokens, self.cache)[:, -1]

    def reorder(self, index: Tensor) -> None:
        if self.cache is not None:
            self.cache.reorder(index)
        else:
            self.image_tokens = self.image_tokens.index_select(0, index)


@torch.no_grad()
def generate(
    model: Any,
    images: Any = None,
    max_new_tokens: int | None = None,
    strategy: str = "greedy",
    *,
    image_tokens: Tensor | None = None,
    **kwargs: Any,
) -> Tensor:
    """Generate captions for ``images`` (tensors (B,3,H,W), PIL images or paths) with ``model`` (an MMXAttn).

    Options: ``strategy`` "greedy" | "beam" | "sample"; ``max_new_tokens`` (default: fill the context);
    ``min_new_tokens``; ``num_beams``, ``length_penalty`` (beam; score / length ** penalty); ``temperature``,
    ``top_k``, ``top_p``, ``generator`` (sample; a seeded ``torch.Generator`` makes it reproducible);
    ``repetition_penalty``; ``use_cache``. ``image_tokens`` (B, L, D) from ``model.encode_image_tokens`` may be
    given instead of ``images`` to reuse an encoder pass.
    """
    if (images is None) == (image_tokens is None):
        raise ValueError("generate needs exactly one of images or image_tokens")
    cfg = GenerationConfig(strategy=strategy, max_new_tokens=max_new_tokens, **kwargs)
    t = model.cfg.text
    limit = t.context_length - 1
    n_new = limit if cfg.max_new_tokens is None else min(cfg.max_new_tokens, limit)
    special = {"pad": t.pad_id, "bos": t.bos_id, "eos": t.eos_id}
    was_training = model.training
    model.eval()
    try:
        if image_tokens is None:
            image_tokens = model.encode_image_tokens(model.preprocess(images))
        if strategy == "beam":
            return _beam(model, image_tokens, n_new, cfg, special)
        return _greedy_or_sample(model, image_tokens, n_new, cfg, special)
    finally:
        model.train(was_training)


def _greedy_or_sample(model, image_tokens, n_new, cfg, special) -> Tensor:
    B = image_tokens.shape[0]
    dev = image_tokens.device
    ids = torch.full((B, 1), special["bos"], dtype=torch.long, device=dev)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    step_fn = _Stepper(model, image_tokens, cfg.use_cache)
    for step in range(n_new):
        logp = _adjust_logits(step_fn(ids), ids, step, cfg, special)
        nxt = _sample(logp, cfg) if cfg.strategy == "sample" else logp.argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, special["pad"]), nxt)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        done |= nxt == special["eos"]
        if bool(done.all()):
            break
    return ids


def _beam(model, image_tokens, n_new, cfg, special) -> Tensor:
    B, K = image_tokens.shape[0], cfg.num_beams
    dev = image_tokens.device
    V = model.cfg.text.vocab_size
    step_fn = _Stepper(model, image_tokens, cfg.use_cache, repeat=K)
    ids = torch.full((B * K, 1), special["bos"], dtype=torch.long, device=dev)
    # only the first beam of each image is live at the start, so the K beams do not start as copies
    beam_scores = torch.full((B, K), float("-inf"), device=dev)
    beam_scores[:, 0] = 0.0
    finished: list[list[tuple[float, Tensor]]] = [[] for _ in range(B)]
    closed = [False] * B

    def norm(score: float, length: int) -> float:
        return score / (length**cfg.length_penalty)

    for step in range(n_new):
        logp = _adjust_logits(step_fn(ids), ids, step, cfg, special)  # (B*K, V)
        total = (beam_scores.view(-1, 1) + logp).view(B, K * V)
        top_s, top_i = total.topk(2 * K, dim=1)  # (B, 2K): enough to refill K beams after EOS candidates
        next_beam = torch.zeros(B, K, dtype=torch.long, device=dev)
        next_tok = torch.full((B, K), special["pad"], dtype=torch.long, device=dev)
        next_score = torch.full((B, K), float("-inf"), device=dev)
        for b in range(B):
            if closed[b]:
                next_beam[b] = torch.arange(K, device=dev)  # keep shapes; these rows are ignored
                continue
            filled = 0
            for s, i in zip(top_s[b].tolist(), top_i[b].tolist()):
                if s == float("-inf"):
                    break
                beam, tok = divmod(i, V)
                if tok == special["eos"]:
                    seq = torch.cat([ids[b * K + beam], torch.tensor([tok], device=dev)])
                    finished[b].append((norm(s, step + 1), seq))
                else:
                    next_beam[b, filled], next_tok[b, filled], next_score[b, filled] = beam, tok, s
                    filled += 1
                if filled == K:
                    break
            # stop this image once K hypotheses ended and no live beam can still beat the worst of them
            if len(finished[b]) >= K:
                best_live = (
                    norm(float(next_score[b].max()), n_new) if cfg.length_penalty > 0 else float(next_score[b].max())
                )
                worst = sorted(h[0] for h in finished[b])[-K]
                closed[b] = best_live <= worst
        index = (torch.arange(B, device=dev)[:, None] * K + next_beam).view(-1)
        ids = torch.cat([ids.index_select(0, index), next_tok.view(-1, 1)], dim=1)
        step_fn.reorder(index)
        beam_scores = next_score
        if all(closed):
            break
    for b in range(B):  # beams still alive at the end compete with the ended ones
        if not closed[b]:
            for k in range(K):
                if beam_scores[b, k] > float("-inf"):
                    finished[b].append((norm(float(beam_scores[b, k]), ids.shape[1] - 1), ids[b * K + k]))
    best = [max(finished[b], key=lambda h: h[0])[1] for b in range(B)]
    out = torch.full((B, max(len(s) for s in best)), special["pad"], dtype=torch.long, device=dev)
    for b, s in enumerate(best):
        out[b, : len(s)] = s
    return out
