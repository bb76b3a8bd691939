"""MMXAttn vs open_clip's CoCa, side by side in one process: caption generation, training step, peak memory.

    .venv/bin/python benchmarks/vs_coca.py                      # mmx_cat_t vs a CoCa of the same text side
    .venv/bin/python benchmarks/vs_coca.py --quick --json       # tiny sizes (the smoke test)

The peer (open_clip 3.x ``CoCa``, random init, no network) gets the SAME text encoder / multimodal decoder widths,
depths, heads, vocabulary, context length and embedding size as our preset, the same image size, and a ViT
vision tower sized to our CAT encoder:

* patch size = image size / the finest token grid our decoder reads (CAT-T's stage 3 at 224 px is 14x14, so
  ViT/16: both start from the same spatial resolution);
* head width 64 (open_clip's default), width from (64 .. 768) and depth from 2..12 chosen so that the ViT trunk
  (without its attentional pooler and projection) has the parameter count closest to our CAT encoder (without
  classifier head). For mmx_cat_t this gives ViT width 384, depth 9, 6 heads, patch 16: 16.3M vs CAT-T 16.4M,
  and somewhat more forward FLOPs (6.9 vs 5.5 GFLOPs per 224 px image, attention included, torch's
  FlopCounterMode on SDPA's math path);
* CoCa's attentional pooler (open_clip's original CoCa setup) gets ``our image token count + 1`` queries: it
  keeps query 0 as the pooled embedding and hands the rest to the decoder, so both decoders cross-attend to the
  same number of image tokens (245 for mmx_cat_t).

Generation: ours is ``model.generate`` (KV cache). open_clip's ``CoCa.generate`` needs ``transformers``, which we do
not depend on, so its decoding loop is reproduced here as open_clip runs it: the image is encoded once, then every
step calls ``CoCa.forward(image_latent=..., image_embs=..., output_labels=False)`` on the WHOLE prefix (text tower
+ multimodal decoder, no cache) and keeps the last position's logits. EOS is banned on both sides (ours:
``min_new_tokens``) so every row makes exactly ``--new-tokens`` tokens. CoCa's beam search here is a plain batched
top-k over (beam, token) with EOS banned, so it needs no finished-hypothesis bookkeeping; the image is encoded
once per image (open_clip's own beam search encodes every image ``num_beams`` times): both choices favour the
peer. Tokens/s are end to end (image encoding included, as a user calling ``generate`` sees it); the decode-only
rates subtract each model's image-encoding time measured in the same run.

Training: forward, contrastive + 2 x caption loss (open_clip's ``CoCaLoss(caption_loss_weight=2,
clip_loss_weight=1)`` for CoCa, :mod:`mmxattn.losses` for ours), backward, AdamW step, on random images and
random captions of random lengths (pad after EOS), the same lengths for both.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import os
import sys
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import bf16_autocast, fmt_bytes, median, peak_memory, tensor_bytes, time_alternating  # noqa: E402

import mmxattn  # noqa: E402
from mmxattn.config import config_to_dict  # noqa: E402
from mmxattn.generation import _encode_images  # noqa: E402
from mmxattn.runtime import tune_cpu_allocator  # noqa: E402

VIT_WIDTHS = (64, 128, 192, 256, 384, 512, 768)
VIT_DEPTHS = range(2, 13)
QUICK_PRESET = "mmx_tiny"


# ---------------------------------------------------------------------------------------------- models
def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def build_ours(preset: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return mmxattn.create_model(preset)


def _vit_trunk_params(width: int, depth: int, base: dict[str, Any]) -> int:
    """Parameters of a CoCa ViT trunk (no pooler / ln_post / proj), built on the meta device (no memory)."""
    import open_clip

    vision = dict(base["vision_cfg"], width=width, layers=depth, head_width=min(64, width))
    with torch.device("meta"):
        v = open_clip.CoCa(base["embed_dim"], base["multimodal_cfg"], base["text_cfg"], vision).visual
    return n_params(v) - n_params(v.attn_pool) - n_params(v.ln_post) - v.proj.numel()


def coca_config_for(model: torch.nn.Module) -> dict[str, Any]:
    """open_clip CoCa config matching our model's text side, embedding and image size; ViT sized to our encoder."""
    cfg = model.cfg
    t = cfg.text
    if cfg.embed_dim != t.width:
        raise ValueError(
            f"open_clip CoCa needs embed_dim == multimodal width (its pooled image tokens feed the decoder); "
            f"preset has embed_dim={cfg.embed_dim}, text width={t.width}"
        )
    img = cfg.vision.img_size
    grids = model.visual.grid_sizes(img, img)
    finest = grids[min(model.stages)][0]
    base = dict(
        embed_dim=cfg.embed_dim,
        special_ids=dict(bos=t.bos_id, eos=t.eos_id, pad=t.pad_id),  # ours; open_clip CoCa takes them as arguments
        vision_cfg=dict(
            image_size=img,
            patch_size=img // finest,
            attentional_pool=True,
            attn_pooler_heads=t.heads,
            attn_pooler_queries=model.num_image_tokens + 1,  # query 0 becomes the pooled embedding
            output_tokens=True,
        ),
        text_cfg=dict(
            context_length=t.context_length,
            vocab_size=t.vocab_size,
            width=t.width,
            heads=t.heads,
            layers=t.layers,
            mlp_ratio=t.mlp_ratio,
            embed_cls=True,
            output_tokens=True,
            pad_id=t.pad_id,
        ),
        multimodal_cfg=dict(
            context_length=t.context_length,
            vocab_size=t.vocab_size,
            width=t.width,
            heads=t.heads,
            layers=t.decoder_layers,
            mlp_ratio=int(t.mlp_ratio),
            attn_pooler_heads=t.heads,
        ),
    )
    target = n_params(model.visual) - (n_params(model.visual.head) if getattr(model.visual, "head", None) else 0)
    best = None
    for w in VIT_WIDTHS:
        # trunk params are affine in depth: two meta builds per width give every depth
        p2, p3 = _vit_trunk_params(w, 2, base), _vit_trunk_params(w, 3, base)
        for d in VIT_DEPTHS:
            p = p2 + (d - 2) * (p3 - p2)
            score = abs(math.log(p / target))
            if best is None or score < best[0]:
                best = (score, w, d, p)
    _, w, d, _ = best
    base["vision_cfg"].update(width=w, layers=d, head_width=min(64, w))
    return base


def build_coca(coca_cfg: dict[str, Any]) -> torch.nn.Module:
    import open_clip

    torch.manual_seed(0)
    c = coca_cfg
    pad = coca_special(c)[2]
    coca = open_clip.CoCa(c["embed_dim"], c["multimodal_cfg"], c["text_cfg"], c["vision_cfg"], pad_id=pad)
    init_coca_decoder(coca.text_decoder)
    return coca


def init_coca_decoder(decoder: torch.nn.Module) -> None:
    """What open_clip's ``MultimodalTransformer.init_parameters`` means to do (CLIP's stds: attention in ``w**-.5``,
    outputs ``w**-.5 (2L)**-.5``, MLP in ``(2w)**-.5``, projection ``w**-.5``). open_clip 3.3.0 never calls it,
    and it would fail if called (it reads ``self.transformer``, which the class does not have), so the decoder's
    ``text_projection`` -- its LM head -- stays ``torch.empty`` memory: losses of 1e28 or NaN from step 0."""
    w, n = decoder.width, decoder.layers
    proj_std, attn_std, fc_std = w**-0.5 * (2 * n) ** -0.5, w**-0.5, (2 * w) ** -0.5
    with torch.no_grad():
        for block in [*decoder.resblocks, *decoder.cross_attn]:
            torch.nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            torch.nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            torch.nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            torch.nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        torch.nn.init.normal_(decoder.text_projection, std=w**-0.5)


def coca_special(coca_cfg: dict[str, Any]) -> tuple[int, int, int]:
    """(sot, eos, pad) ids of the peer: the same as ours (stored in its config), so both read the same captions."""
    s = coca_cfg["special_ids"]
    return s["bos"], s["eos"], s["pad"]


# ---------------------------------------------------------------------------------------------- generation
@torch.no_grad()
def coca_generate(
    model: torch.nn.Module, images: torch.Tensor, n_new: int, strategy: str, num_beams: int, sot: int, eos: int
) -> torch.Tensor:
    """open_clip CoCa's decoding loop without ``transformers``: the whole prefix is re-run every step."""
    model.eval()
    image_latent, image_embs = model._encode_image(images)  # (B, E), (B, L, D): once per image
    B = images.shape[0]
    K = num_beams if strategy == "beam" else 1
    if K > 1:
        image_latent, image_embs = image_latent.repeat_interleave(K, 0), image_embs.repeat_interleave(K, 0)
    ids = torch.full((B * K, 1), sot, dtype=torch.long, device=images.device)
    scores = torch.full((B, K), float("-inf"), device=images.device)
    scores[:, 0] = 0.0  # only beam 0 is live at first, so the K beams do not start as copies
    for _ in range(n_new):
        # open_clip: self(image, x, image_latent=..., image_embs=..., output_labels=False)["logits"][:, -1]
        out = model(None, ids, image_latent=image_latent, image_embs=image_embs, output_labels=False)
        logits = out["logits"][:, -1].float()  # (B*K, V)
        logits[:, eos] = float("-inf")  # MinLengthLogitsProcessor up to n_new: exactly n_new tokens
        if K == 1:
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
            continue
        V = logits.shape[-1]
        total = (scores.view(-1, 1) + logits.log_softmax(-1)).view(B, K * V)
        scores, flat = total.topk(K, dim=1)  # (B, K), sorted
        index = (torch.arange(B, device=ids.device)[:, None] * K + flat // V).view(-1)
        ids = torch.cat([ids.index_select(0, index), (flat % V).view(-1, 1)], dim=1)
    return ids.view(B, K, -1)[:, 0]  # best beam (all have the same length)


# ---------------------------------------------------------------------------------------------- training
def random_batch(batch: int, img: int, ctx: int, vocab: int, bos: int, eos: int, pad: int, seed: int = 0):
    """Random images (B,3,H,W) and captions (B, ctx): BOS, random words, EOS at a random length, pad after."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, img, img, generator=g)
    words = torch.randint(0, vocab, (batch, ctx), generator=g)
    special = torch.tensor([bos, eos, pad])
    plain = min(set(range(4)) - {bos, eos, pad})
    words = torch.where(torch.isin(words, special), torch.full_like(words, plain), words)
    lengths = torch.randint(max(3, ctx // 4), ctx + 1, (batch,), generator=g)  # BOS..EOS inclusive
    pos = torch.arange(ctx)[None]
    ids = torch.where(pos < lengths[:, None] - 1, words, torch.full_like(words, pad))
    ids[torch.arange(batch), lengths - 1] = eos
    ids[:, 0] = bos
    return images, ids


def under_bf16(fn: Any, device: str, on: bool) -> Any:
    """``fn`` run under ``torch.autocast(device type, bfloat16)`` when ``on`` (else ``fn`` itself)."""
    if not on:
        return fn

    def wrapped(*a: Any, **k: Any) -> Any:
        with bf16_autocast(device):
            return fn(*a, **k)

    return wrapped


def make_train_step(
    which: str,
    spec: Any,
    batch: int,
    device: str,
    model: torch.nn.Module | None = None,
    bf16: bool = False,
    compile: bool = False,
):
    """(step, resident_bytes): one AdamW training step of ``which`` ("ours" or "coca") on a fixed random batch;
    forward and losses under bf16 autocast when ``bf16`` (fp32 weights, as Lightning's bf16-mixed), compiled with
    ``torch.compile`` when ``compile``."""
    import open_clip.loss

    from mmxattn.losses import CaptionLoss, ContrastiveLoss

    if model is None:
        model = build_ours(spec) if which == "ours" else build_coca(spec)
    model = model.to(device).train()
    if which == "ours":
        t = model.cfg.text
        img, ctx, vocab, bos, eos, pad = (
            model.cfg.vision.img_size,
            t.context_length,
            t.vocab_size,
            t.bos_id,
            t.eos_id,
            t.pad_id,
        )
        contrastive, caption = ContrastiveLoss(), CaptionLoss(pad, check_labels=False)

        def loss_fn(images, ids):
            out = model(images, ids)
            return contrastive(out.image_embeds, out.text_embeds, out.logit_scale) + 2.0 * caption(
                out.logits, ids[:, 1:]
            )
    else:
        tc = spec["text_cfg"]
        bos, eos, pad = coca_special(spec)
        img, ctx, vocab = spec["vision_cfg"]["image_size"], tc["context_length"], tc["vocab_size"]
        coca_loss = open_clip.loss.CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0, pad_id=pad)

        def loss_fn(images, ids):
            out = model(images, ids)
            clip, cap = coca_loss(
                out["image_features"], out["text_features"], out["logits"], out["labels"], out["logit_scale"]
            )
            return clip + cap

    loss_fn = under_bf16(loss_fn, device, bf16)
    if compile:
        loss_fn = torch.compile(loss_fn)
    images, ids = random_batch(batch, img, ctx, vocab, bos, eos, pad)
    images, ids = images.to(device), ids.to(device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.1)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(images, ids)
        loss.backward()
        opt.step()
        return loss

    def resident() -> int:
        state = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        return tensor_bytes([*model.parameters(), *model.buffers(), *grads, *state, images, ids])

    return step, resident


def _train_build(which: str, spec: Any, batch: int, device: str, bf16: bool = False):
    # module-level so that functools.partial of it pickles into the fresh process peak_memory spawns
    return make_train_step(which, spec, batch, device, bf16=bf16)


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="mmx_cat_t", help="our model preset (default mmx_cat_t)")
    p.add_argument("--quick", action="store_true", help=f"tiny sizes for the smoke test ({QUICK_PRESET})")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per setting (median); 5, quick 1")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds before each measurement")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--new-tokens", type=int, default=20, help="caption tokens per image (EOS banned)")
    p.add_argument("--gen-batches", default=None, help="comma-separated generation batch sizes; 1,8 (quick 1,2)")
    p.add_argument("--num-beams", type=int, default=3)
    p.add_argument("--train-batch", type=int, default=None, help="training batch; 16 (quick 4)")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: gen, train, memory")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for both models on the device given (GPU or CPU)")
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile both models' training forward + loss (compiled in the warm-up rounds; give --warmup 2)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    a = p.parse_args(argv)
    if a.quick:
        a.preset = QUICK_PRESET if a.preset == "mmx_cat_t" else a.preset
    a.repeats = a.repeats or (1 if a.quick else 5)
    a.gen_batches = [int(b) for b in (a.gen_batches or ("1,2" if a.quick else "1,8")).split(",")]
    a.train_batch = a.train_batch or (4 if a.quick else 16)
    a.skip = {s for s in a.skip.split(",") if s}
    bad = a.skip - {"gen", "train", "memory"}
    if bad:
        p.error(f"--skip takes gen, train, memory; got {sorted(bad)}")
    if a.repeats < 1 or a.new_tokens < 1 or min(a.gen_batches) < 1 or a.train_batch < 2:
        p.error("--repeats, --new-tokens and --gen-batches must be >= 1 and --train-batch >= 2")
    return a


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


def bench_generation(ours, coca, coca_cfg, args) -> dict[str, Any]:
    t = ours.cfg.text
    n_new = min(args.new_tokens, t.context_length - 1)
    sot, eos, _ = coca_special(coca_cfg)
    img = ours.cfg.vision.img_size
    images_all = torch.randn(max(args.gen_batches), 3, img, img, generator=torch.Generator().manual_seed(1))
    images_all = images_all.to(args.device)
    ours.eval()
    coca.eval()
    results: dict[str, Any] = {"new_tokens": n_new}
    for B in args.gen_batches:
        images = images_all[:B]
        fns = {}
        for s in ("greedy", "beam"):
            kw = dict(num_beams=args.num_beams) if s == "beam" else {}
            fns[f"ours_{s}"] = functools.partial(
                ours.generate, images, max_new_tokens=n_new, min_new_tokens=n_new, strategy=s, use_cache=True, **kw
            )
            fns[f"coca_{s}"] = functools.partial(coca_generate, coca, images, n_new, s, args.num_beams, sot, eos)
            if torch.device(args.device).type == "cuda":  # what replaying the captured decoding step buys
                fns[f"ours-nograph_{s}"] = functools.partial(fns[f"ours_{s}"], cuda_graph=False)
        fns = {k: under_bf16(f, args.device, args.bf16) for k, f in fns.items()}
        for name, fn in fns.items():  # the forced length is what makes tokens/s comparable
            shape = tuple(fn().shape)
            if shape != (B, 1 + n_new):
                raise RuntimeError(f"{name} generated shape {shape}, expected {(B, 1 + n_new)}")
        # image encoding alone, timed in the same rounds, for the decode-only rates
        # on CUDA ours.generate replays a captured encoder call: time that one
        on_cuda = torch.device(args.device).type == "cuda"
        fns["ours_encode"] = under_bf16(
            torch.no_grad()(functools.partial(_encode_images, ours, images, on_cuda)), args.device, args.bf16
        )
        fns["coca_encode"] = under_bf16(
            torch.no_grad()(functools.partial(coca._encode_image, images)), args.device, args.bf16
        )
        # one alternation per strategy: alternating our greedy (B rows) with our beam (B x beams rows) would make
        # every timed call of ours re-pack its text-side weights, which are packed per row count (InferenceLinear)
        times: dict[str, float] = {}
        for s in ("greedy", "beam"):
            group = {k: f for k, f in fns.items() if k.endswith(f"_{s}") or k.endswith("_encode")}
            measured = time_alternating(group, args.repeats, args.warmup, args.device)
            times.update({k: median(v) for k, v in measured.items() if k.endswith(f"_{s}")})
            times[f"ours_encode_{s}"], times[f"coca_encode_{s}"] = (
                median(measured["ours_encode"]),
                median(measured["coca_encode"]),
            )
        for s in ("greedy", "beam"):
            row: dict[str, Any] = {}
            for name in ("ours", "coca"):
                tg, te = times[f"{name}_{s}"], times[f"{name}_encode_{s}"]
                row[f"{name}_s"] = tg
                row[f"{name}_tokens_per_s"] = B * n_new / tg
                row[f"{name}_encode_s"] = te
                # None when noise makes generation look no slower than encoding alone
                row[f"{name}_decode_tokens_per_s"] = B * n_new / (tg - te) if tg > te else None
            row["ratio"] = _ratio(row["ours_tokens_per_s"], row["coca_tokens_per_s"])
            od, cd = row["ours_decode_tokens_per_s"], row["coca_decode_tokens_per_s"]
            row["decode_ratio"] = _ratio(od, cd) if od and cd else None
            if f"ours-nograph_{s}" in times:
                row["ours_nograph_tokens_per_s"] = B * n_new / times[f"ours-nograph_{s}"]
                row["cuda_graph_speedup"] = _ratio(row["ours_tokens_per_s"], row["ours_nograph_tokens_per_s"])
            results[f"{s}_b{B}"] = row
            dec = (
                "n/a"
                if row["decode_ratio"] is None
                else f"ours {od:8.1f}  coca {cd:8.1f}  ratio {row['decode_ratio']:6.2f}x"
            )
            graph = (
                f"  | without the CUDA graph ours {row['ours_nograph_tokens_per_s']:8.1f} tok/s "
                f"(graph {row['cuda_graph_speedup']:.2f}x)"
                if "cuda_graph_speedup" in row
                else ""
            )
            print(
                f"  gen {s:6s} B={B:<3d} ours {row['ours_tokens_per_s']:8.1f} tok/s  "
                f"coca {row['coca_tokens_per_s']:8.1f} tok/s  ratio {row['ratio']:6.2f}x  | decode-only {dec}{graph}",
                flush=True,
            )
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    tune_cpu_allocator()  # as train.py does; both peers share the process (MMXATTN_TUNE_MALLOC=0: off)
    if args.threads or args.quick:
        # tiny models: one thread, so a descheduled OpenMP worker on a busy machine cannot stall every op
        torch.set_num_threads(args.threads or 1)
    threads = torch.get_num_threads()
    ours = build_ours(args.preset)
    coca_cfg = coca_config_for(ours)
    coca = build_coca(coca_cfg)
    ours_cfg = config_to_dict(ours.cfg)
    params = param_counts(ours, coca)
    amp = ", bf16 autocast" if args.bf16 else ""
    print(f"device {args.device}{amp}, {threads} threads, repeats {args.repeats} (median), warmup {args.warmup}")
    print(f"ours ({args.preset}): {json.dumps(ours_cfg)}")
    print(f"coca (open_clip.CoCa): {json.dumps(coca_cfg)}")
    for name, p in params.items():
        print(f"  {name:4s} params: " + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in p.items()))
    ours.to(args.device)
    coca.to(args.device)
    out: dict[str, Any] = {
        "preset": args.preset,
        "device": str(args.device),
        "bf16": args.bf16,
        "compile": args.compile,
        "threads": threads,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "ours_config": ours_cfg,
        "coca_config": coca_cfg,
        "params": params,
    }

    if "gen" not in args.skip:
        gen = bench_generation(ours, coca, coca_cfg, args)
        head = f"greedy_b{max(args.gen_batches)}"
        out["gen"] = gen
        out["gen_headline"] = head
        out["gen_tokens_per_s_ratio"] = gen[head]["ratio"]
        out["gen_decode_tokens_per_s_ratio"] = gen[head]["decode_ratio"]

    if "train" not in args.skip:
        B = args.train_batch
        steps = {
            "ours": make_train_step("ours", args.preset, B, args.device, ours, args.bf16, args.compile)[0],
            "coca": make_train_step("coca", coca_cfg, B, args.device, coca, args.bf16, args.compile)[0],
        }
        times = time_alternating(steps, args.repeats, args.warmup, args.device)
        del steps  # frees both optimisers' state before the memory measurement
        tr = {f"{n}_images_per_s": B / median(times[n]) for n in ("ours", "coca")}
        tr["batch"] = B
        out["train"] = tr
        out["train_images_per_s_ratio"] = _ratio(tr["ours_images_per_s"], tr["coca_images_per_s"])
        print(
            f"  train B={B}: ours {tr['ours_images_per_s']:.2f} img/s  coca {tr['coca_images_per_s']:.2f} img/s  "
            f"ratio {out['train_images_per_s_ratio']:.2f}x",
            flush=True,
        )

    if "memory" not in args.skip:
        B = args.train_batch
        del ours, coca  # the CPU measurement runs in fresh processes; on CUDA free the timed models first
        gc.collect()
        mem = {}
        for name, spec in (("ours", args.preset), ("coca", coca_cfg)):
            build = functools.partial(_train_build, name, spec, B, args.device, args.bf16)
            mem[name] = peak_memory(build, args.device, warmup=1, calls=1, threads=threads)
        out["train_peak_mem"] = {
            "batch": B,
            "method": "cuda max_memory_allocated"
            if torch.device(args.device).type == "cuda"
            else "fresh process: peak RSS added by one step + resident params/grads/AdamW state",
            **{f"{n}_bytes": m["peak"] for n, m in mem.items()},
            **{f"{n}_step_added_bytes": m["added"] for n, m in mem.items()},
        }
        out["train_peak_mem_ratio"] = _ratio(mem["ours"]["peak"], mem["coca"]["peak"])
        print(
            f"  train peak memory B={B}: ours {fmt_bytes(mem['ours']['peak'])} "
            f"(step adds {fmt_bytes(mem['ours']['added'])})  coca {fmt_bytes(mem['coca']['peak'])} "
            f"(step adds {fmt_bytes(mem['coca']['added'])})  ratio {out['train_peak_mem_ratio']:.2f}",
            flush=True,
        )

    out["targets"] = {
        "gen_tokens_per_s_ratio >= 10": out.get("gen_tokens_per_s_ratio", 0) >= 10,
        "train_images_per_s_ratio >= 1.3": out.get("train_images_per_s_ratio", 0) >= 1.3,
        "train_peak_mem_ratio <= 1": out.get("train_peak_mem_ratio", float("inf")) <= 1,
    }
    if args.json:
        print(json.dumps(out))
    return out


def param_counts(ours: Any, coca: torch.nn.Module) -> dict[str, dict[str, int]]:
    v = coca.visual
    return {
        "ours": {
            "total": n_params(ours),
            "vision_encoder": n_params(ours.visual),
            "text_encoder": n_params(ours.text),
            "decoder_with_lm_head": n_params(ours.decoder) + ours.lm_head.weight.numel(),
        },
        "coca": {
            "total": n_params(coca),
            "vision_encoder": n_params(v),
            "vision_trunk": n_params(v) - n_params(v.attn_pool) - n_params(v.ln_post) - v.proj.numel(),
            "text_encoder": n_params(coca.text),
            "decoder_with_lm_head": n_params(coca.text_decoder),
        },
    }


if __name__ == "__main__":
    main()
