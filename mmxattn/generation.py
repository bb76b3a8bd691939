"""Caption generation: greedy, beam search and sampling, batched, with a KV cache.

Our own code (no ``transformers``). With ``use_cache=True`` (default) every step feeds only the newest token: the
text encoder's and the decoder's self-attention keys/values grow in a :class:`~mmxattn.text.towers.DecodingCache`
and the decoder's cross-attention keys/values of the image are projected once per image (then repeated per beam).
``use_cache=False`` recomputes the whole prefix each step (the reference the cache is tested against).

On CUDA the image encoder's call and the cached step are captured once in CUDA graphs and replayed (``cuda_graph``,
on by default there; :mod:`mmxattn.cuda_graph`): a decoding step of a small model is a few hundred tiny kernels, so
launching them one by one from Python costs more than running them. A graph needs fixed shapes and addresses, so
the step decodes into a static cache (fixed-size key/value buffers written at a device-side position,
:meth:`~mmxattn.text.towers.DecodingCache.static`), which can also be asked for on its own (``static_cache=True``).
Graphs are kept per model, batch size, image or image-token shape, dtype and autocast state, and reused by later
calls.

Every strategy returns ``(B, 1 + n)`` token ids starting with BOS; a row that ended is padded with ``pad_id``
after its EOS.
"""

from __future__ import annotations

import math
import numbers
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from . import cuda_graph
from .attention import Attention, fused_attention_enabled
from .runtime import user_stacklevel
from .text.towers import DecodingCache

__all__ = ["generate", "GenerationConfig"]

STRATEGIES = ("greedy", "beam", "sample")

# Options that only one strategy reads, and the value at which they change nothing: greedy never reads num_beams or
# length_penalty (nor the sampling options), beam never reads the sampling options, sample never reads the beam ones.
# (max_new_tokens, min_new_tokens, repetition_penalty and the cache options apply to every strategy.)
_STRATEGY_OPTIONS: dict[str, dict[str, Any]] = {
    "beam": {"num_beams": 1, "length_penalty": 1.0},
    "sample": {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "generator": None},
}


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
        static_cache: bool | None = None,
        cuda_graph: bool | None = None,
    ) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        for name, value in (("num_beams", num_beams), ("top_k", top_k), ("min_new_tokens", min_new_tokens)):
            _check_int(name, value)
        if max_new_tokens is not None:
            _check_int("max_new_tokens", max_new_tokens)
        for name, value in (
            ("length_penalty", length_penalty),
            ("temperature", temperature),
            ("top_p", top_p),
            ("repetition_penalty", repetition_penalty),
        ):
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
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
        if max_new_tokens is not None and min_new_tokens > max_new_tokens:
            raise ValueError(
                f"min_new_tokens ({min_new_tokens}) must be <= max_new_tokens ({max_new_tokens}): a caption cannot "
                "be both"
            )
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(
                f"generator must be a torch.Generator (e.g. torch.Generator().manual_seed(0)) or None, got "
                f"{type(generator).__name__} {generator!r}"
            )
        num_beams, top_k, min_new_tokens = int(num_beams), int(top_k), int(min_new_tokens)
        max_new_tokens = None if max_new_tokens is None else int(max_new_tokens)
        del name, value
        if not use_cache and (static_cache or cuda_graph):
            raise ValueError("static_cache and cuda_graph decode with a cache; they need use_cache=True")
        self.__dict__.update({k: v for k, v in locals().items() if k != "self"})


def _warn_unused_options(strategy: str, options: dict[str, Any]) -> None:
    """One UserWarning naming every option in ``options`` (those the caller passed) that ``strategy`` does not read
    and that is not at its neutral value (num_beams=1, length_penalty=1.0, temperature=1.0, top_k=0, top_p=1.0,
    generator=None). The strategy is never switched (unlike transformers, where num_beams > 1 means beam search)."""
    groups = {
        owner: [k for k in neutral if k in options and options[k] != neutral[k]]  # a Generator != None
        for owner, neutral in _STRATEGY_OPTIONS.items()
        if owner != strategy
    }
    groups = {owner: names for owner, names in groups.items() if names}
    if not groups:
        return
    shown = ", ".join(
        f"{k}=<torch.Generator>" if k == "generator" else f"{k}={options[k]!r}" for ks in groups.values() for k in ks
    )
    how = {"beam": "beam search", "sample": "sampling"}
    why = "; ".join(
        f"{', '.join(ks)} {'is' if len(ks) == 1 else 'are'} only read by strategy={owner!r} (pass that for {how[owner]})"
        for owner, ks in groups.items()
    )
    warnings.warn(f"generate(strategy={strategy!r}) ignores {shown}: {why}", UserWarning, stacklevel=user_stacklevel())


def _check_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int, got {value!r}")


def _adjust_logits(logits: Tensor, ids: Tensor, step: int, cfg: GenerationConfig, special: dict[str, int]) -> Tensor:
    """Log-probabilities (N, V) of the next token after repetition penalty and forbidden tokens."""
    logits = logits.float()
    if cfg.repetition_penalty != 1.0:
        # CTRL's penalty (Keskar et al. 2019): shrink the logits of tokens already in the sequence.
        prev = logits.gather(1, ids)
        prev = torch.where(prev > 0, prev / cfg.repetition_penalty, prev * cfg.repetition_penalty)
        logits = logits.scatter(1, ids, prev)
    # -inf, not a finite minimum: beam search reads candidates until -inf, and a forbidden one with a finite score
    # (an EOS before min_new_tokens, with more beams than allowed tokens) could win under a negative length penalty
    neg = float("-inf")
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
    probs = logits.softmax(-1)
    gen = cfg.generator
    if gen is not None and gen.device != probs.device:  # e.g. a CPU generator for a CUDA model: draw on its device
        return torch.multinomial(probs.to(gen.device), 1, generator=gen).squeeze(1).to(probs.device)
    return torch.multinomial(probs, 1, generator=gen).squeeze(1)


def _recording(model: Any) -> bool:
    return any(isinstance(m, Attention) and m._recorder is not None for m in model.modules())


# Models whose graph capture failed under the automatic choice: they generate eagerly from then on.
_CAPTURE_FAILED: weakref.WeakSet[Any] = weakref.WeakSet()


def _use_cuda_graph(model: Any, x: Tensor, cfg: GenerationConfig) -> bool:
    """Whether to replay captured graphs for inputs like ``x`` (images or image tokens)."""
    on_cuda = x.device.type == "cuda"
    if cfg.cuda_graph is None:  # auto: on CUDA, unless attention is being captured (that needs the eager path)
        return cfg.use_cache and on_cuda and not _recording(model) and model not in _CAPTURE_FAILED
    if cfg.cuda_graph:
        if not on_cuda:
            raise ValueError(f"cuda_graph=True needs the model and images on a CUDA device, got {x.device}")
        if _recording(model):
            raise ValueError("cuda_graph=True cannot run inside capture_attention (it needs the eager path)")
    return bool(cfg.cuda_graph)


def _graphed(model: Any, cfg: GenerationConfig, build: Callable[[], Any]) -> Any:
    """``build()`` (a capture, or a replay of one); under the automatic choice a failure warns once and returns None
    (the caller goes eager), with ``cuda_graph=True`` it raises."""
    try:
        return build()
    except Exception as e:  # noqa: BLE001 -- capture fails in many ways (an op that syncs, a driver limit, ...)
        if cfg.cuda_graph:
            raise
        _CAPTURE_FAILED.add(model)
        warnings.warn(
            f"CUDA-graph generation failed ({type(e).__name__}: {str(e)[:200]}); this model generates without "
            "graphs from now on (cuda_graph=True raises instead)",
            stacklevel=3,
        )
        return None


def _cross_kv(model: Any, image_tokens: Tensor, repeat: int) -> list[tuple[Tensor, Tensor]]:
    """Every decoder layer's cross-attention keys/values (B * repeat, nh, L, hd): projected once per image, then
    repeated for its beams, contiguous (views into the kv projection's output cost SDPA a strided read at every
    step: 150 against 121 us a call at batch 8 on the CPU; a whole beam-3 generate at batch 8, 0.976 of the time)."""
    out = []
    for blk in model.decoder.blocks:
        k, v = blk.cross_attn.project_kv(image_tokens)
        if repeat > 1:
            k, v = k.repeat_interleave(repeat, dim=0), v.repeat_interleave(repeat, dim=0)
        out.append((k.contiguous(), v.contiguous()))
    return out


class _CudaGraphStep:
    """One cached decoding step of a model for a batch of ``batch`` rows, captured in a CUDA graph.

    Inputs live in fixed buffers (the newest token, the image's cross-attention keys/values, the static cache and
    its position); replaying the graph runs the whole step (text encoder, decoder, LM head, position + 1) and
    leaves the logits in ``self.logits``. Holds no reference to the model (the registry is keyed weakly by it)."""

    def __init__(self, model: Any, batch: int, image_shape: tuple[int, int], dtype: torch.dtype, device) -> None:
        self.cache = model.new_cache(static=True, device=device)
        self.tok = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self._fill_cross(model, torch.zeros(batch, *image_shape, dtype=dtype, device=device), 1)
        # warm-up allocates the static buffers; the capture records the step from position 0
        self.graph, logits = cuda_graph.capture(
            lambda: model.decode_step(self.tok, None, self.cache), device, before_capture=self.cache.reset
        )
        self.logits = logits[:, -1]
        self.cache.reset()

    def _fill_cross(self, model: Any, image_tokens: Tensor, repeat: int) -> None:
        for c, (k, v) in zip(self.cache.dec_cross, _cross_kv(model, image_tokens, repeat)):
            if c.k is None:
                c.k, c.v = k, v
            else:  # the graph reads these addresses
                c.k.copy_(k)
                c.v.copy_(v)

    def start(self, model: Any, image_tokens: Tensor, repeat: int) -> None:
        """Load a new batch's image keys/values and empty the cache."""
        self._fill_cross(model, image_tokens, repeat)
        self.cache.reset()

    def __call__(self, ids: Tensor) -> Tensor:
        self.cache.reserve(1)
        self.tok.copy_(ids[:, -1:])
        self.graph.replay()
        return self.logits


def _graph_step(model: Any, image_tokens: Tensor, repeat: int) -> _CudaGraphStep:
    B, L, D = image_tokens.shape
    key = ("decode_step", B * repeat, L, D, image_tokens.dtype, image_tokens.device, fused_attention_enabled())
    step = cuda_graph.cached(
        model, key, lambda: _CudaGraphStep(model, B * repeat, (L, D), image_tokens.dtype, image_tokens.device)
    )
    step.start(model, image_tokens, repeat)
    return step


def _encode_images(model: Any, images: Tensor, graphed: bool) -> Tensor:
    """The image tokens of a preprocessed batch; on CUDA with ``graphed``, by replaying a captured encoder call
    (copied out of the graph's buffer: the decoder's keys/values are projected from it)."""
    if not graphed:
        return model.encode_image_tokens(images)
    key = ("encode_image_tokens", tuple(images.shape), images.dtype, images.device, fused_attention_enabled())
    call = cuda_graph.cached(model, key, lambda: cuda_graph.GraphedCall(model.encode_image_tokens, images))
    return call(images).clone()


class _Stepper:
    """Feeds the model one step at a time: without a cache (whole prefix), with a growing or a static cache, or by
    replaying a CUDA graph of the cached step."""

    def __init__(self, model: Any, image_tokens: Tensor, cfg: GenerationConfig, repeat: int = 1) -> None:
        self.model = model
        self.cache: DecodingCache | None = None
        self.graph: _CudaGraphStep | None = None
        if _use_cuda_graph(model, image_tokens, cfg):
            self.graph = _graphed(model, cfg, lambda: _graph_step(model, image_tokens, repeat))
        if self.graph is not None:
            self.cache = self.graph.cache
        elif cfg.use_cache:
            self.cache = model.new_cache(static=bool(cfg.static_cache), device=image_tokens.device)
            for c, (k, v) in zip(self.cache.dec_cross, _cross_kv(model, image_tokens, repeat)):
                c.k, c.v = k, v
        # only the uncached step reads the image tokens themselves; cached steps read the projected keys/values
        self.image_tokens = (
            image_tokens.repeat_interleave(repeat, 0) if repeat > 1 and not cfg.use_cache else image_tokens
        )

    def __call__(self, ids: Tensor) -> Tensor:
        if self.graph is not None:
            return self.graph(ids)
        if self.cache is None:
            return self.model.decode_step(ids, self.image_tokens, None)[:, -1]
        fed = ids if self.cache.length == 0 else ids[:, -1:]
        if self.cache.is_static:
            self.cache.reserve(fed.shape[1])
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
    ``min_new_tokens``; ``num_beams``, ``length_penalty`` (beam; a hypothesis ranks by score / length ** penalty,
    score the sum of its tokens' log-probabilities renormalised over the tokens allowed at each step, length its new
    tokens with the EOS and without BOS, ``max_new_tokens`` for one still open at the end: HF's convention);
    ``temperature``, ``top_k`` (tokens tied with the k-th are kept too), ``top_p``, ``generator`` (sample; a seeded
    ``torch.Generator`` makes it reproducible);
    ``repetition_penalty``; ``use_cache``; ``static_cache`` (fixed-size cache buffers; the CUDA graphs always use
    them); ``cuda_graph`` (replay captured graphs of the encoder call and the decoding step; default: on for CUDA
    unless attention is being captured). ``image_tokens`` (B, L, D) from ``model.encode_image_tokens`` may be given
    instead of ``images`` to reuse an encoder pass (cast to the decoder's dtype and device).

    ``min_new_tokens`` must not exceed ``max_new_tokens``; ``generator`` must be a ``torch.Generator``. An option
    that the strategy does not read, set to anything but its neutral value (``num_beams`` > 1 or ``length_penalty``
    with greedy or sample; ``temperature``, ``top_k``, ``top_p`` or ``generator`` with greedy or beam), warns once
    per call, naming them; the strategy is never switched (``num_beams=5`` alone stays greedy: pass
    ``strategy="beam"``).
    """
    if (images is None) == (image_tokens is None):
        raise ValueError("generate needs exactly one of images or image_tokens")
    if image_tokens is not None:
        width = model.cfg.text.width
        if not isinstance(image_tokens, Tensor) or image_tokens.dim() != 3 or image_tokens.shape[-1] != width:
            got = tuple(image_tokens.shape) if isinstance(image_tokens, Tensor) else type(image_tokens).__name__
            raise ValueError(f"image_tokens must be (B, L, {width}) (model.encode_image_tokens), got {got}")
        if not image_tokens.is_floating_point():
            raise ValueError(
                f"image_tokens must be a float tensor (model.encode_image_tokens), got {image_tokens.dtype}"
            )
        image_tokens = _to_decoder(model, image_tokens)
    cfg = GenerationConfig(strategy=strategy, max_new_tokens=max_new_tokens, **kwargs)
    _warn_unused_options(strategy, {k: getattr(cfg, k) for k in kwargs})  # the validated values
    t = model.cfg.text
    limit = t.context_length - 1
    n_new = limit if cfg.max_new_tokens is None else min(cfg.max_new_tokens, limit)
    special = {"pad": t.pad_id, "bos": t.bos_id, "eos": t.eos_id}
    from .model import eval_mode

    with eval_mode(model):
        if image_tokens is None:
            pixels = model.preprocess(images)
            if _use_cuda_graph(model, pixels, cfg):
                image_tokens = _graphed(model, cfg, lambda: _encode_images(model, pixels, graphed=True))
            if image_tokens is None:
                image_tokens = model.encode_image_tokens(pixels)
        if strategy == "beam":
            return _beam(model, image_tokens, n_new, cfg, special)
        return _greedy_or_sample(model, image_tokens, n_new, cfg, special)


def _to_decoder(model: Any, image_tokens: Tensor) -> Tensor:
    """``image_tokens`` in the dtype and on the device of the decoder's weights, as ``model.preprocess`` and the
    image encoder do for images (float64 tokens failed in the cross-attention's matmul; CPU tokens for a CUDA model
    in its first kernel)."""
    for p in model.decoder.parameters():
        if p.is_floating_point():
            return image_tokens.to(device=p.device, dtype=p.dtype)
    return image_tokens


# Asking the device whether every row has ended makes the host wait for it; on a GPU only every 4th step asks, and
# the extra columns (pad in every row, since live rows never emit pad) are cut at the end.
_CHECK_DONE_EVERY = {"cuda": 4}


def _greedy_or_sample(model, image_tokens, n_new, cfg, special) -> Tensor:
    B = image_tokens.shape[0]
    dev = image_tokens.device
    ids = torch.full((B, 1), special["bos"], dtype=torch.long, device=dev)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    step_fn = _Stepper(model, image_tokens, cfg)
    check_every = _CHECK_DONE_EVERY.get(dev.type, 1)
    for step in range(n_new):
        logp = _adjust_logits(step_fn(ids), ids, step, cfg, special)
        nxt = _sample(logp, cfg) if cfg.strategy == "sample" else logp.argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, special["pad"]), nxt)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        done |= nxt == special["eos"]
        if (step + 1) % check_every == 0 or step == n_new - 1:
            if bool(done.all()):
                break
    if check_every > 1:
        live = (ids != special["pad"]).any(0).nonzero()
        ids = ids[:, : int(live.max()) + 1]
    return ids


def _beam(model, image_tokens, n_new, cfg, special) -> Tensor:
    B, K = image_tokens.shape[0], cfg.num_beams
    dev = image_tokens.device
    V = model.cfg.text.vocab_size
    step_fn = _Stepper(model, image_tokens, cfg, repeat=K)
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
