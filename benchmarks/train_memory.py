"""Peak memory and images/s of one training step of MMXAttnModule under each memory / speed switch.

One full optimizer step (forward, the module's losses, backward, AdamW) of a model preset (default ``mmx_cat_t``,
224 px) at batch 16, for each setting:

* ``fp32``: the baseline;
* ``bf16-mixed``: ``torch.autocast(device, bfloat16)`` around forward and losses, as Lightning's ``bf16-mixed``
  precision does (fp32 weights and optimizer; the module takes the losses in fp32);
* ``grad_ckpt``: ``grad_checkpointing=True`` (encoder, text and decoder blocks recomputed in backward);
* ``grad_cache``: ``grad_cache_chunk_size=--chunk`` (default a quarter of the batch, at least 2): the batch's
  contrastive loss with one chunk's activations (a graph-free pass of the towers first, then each chunk's forward
  and backward; the step runs through ``training_step``, as under the Trainer);
* ``compile``: ``compile=True`` (``torch.compile`` of the model's forward; compilation happens in the two warmup
  steps and is not timed; on CPU the module switches CAT's oneDNN linear off, which inductor cannot lower).

Timing: :func:`_common.time_alternating` (settings interleaved, order rotated, median of ``--repeats``); the
machine may be shared, so compare settings within one run. Memory: :func:`_common.peak_memory` (CPU: a fresh
process per setting, peak RSS added by a step + resident parameters, gradients and AdamW state; CUDA:
``max_memory_allocated``).

    .venv/bin/python benchmarks/train_memory.py [--preset mmx_cat_t] [--batch 16] [--repeats 3] [--json]
    .venv/bin/python benchmarks/train_memory.py --quick        # tiny model, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys
import warnings
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import fmt_bytes, median, peak_memory, tensor_bytes, time_alternating  # noqa: E402

SETTINGS = ("fp32", "bf16-mixed", "grad_ckpt", "grad_cache", "compile")
QUICK_PRESET = "mmx_tiny"


def make_step(
    preset: str,
    setting: str,
    batch: int,
    device: str,
    img_size: int | None = None,
    onednn: bool = True,
    chunk: int | None = None,
):
    """(step, resident_bytes) for :func:`_common.peak_memory`: ``step()`` runs one optimizer step."""
    from mmxattn.lit.module import MMXAttnModule
    from mmxattn.lit.optim import build_optimizer
    from mmxattn.vision.windows import set_onednn_linear

    set_onednn_linear(onednn)  # process-wide; every setting of one run uses the same linear (see main)
    torch.manual_seed(0)
    kw: dict[str, Any] = {"grad_checkpointing": setting == "grad_ckpt", "compile": setting == "compile"}
    if setting == "grad_cache":
        kw["grad_cache_chunk_size"] = chunk or max(2, batch // 4)  # chunks of one image have no ITM negatives
    mod = MMXAttnModule(preset=preset, img_size=img_size, **kw).to(device).train()
    if setting == "compile":
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a silent fallback to eager would be reported as "compile"
            mod.setup("fit")
    model = mod.model
    t, S = model.cfg.text, model.cfg.vision.img_size
    images = torch.randn(batch, 3, S, S, device=device)
    ids = torch.randint(0, min(t.vocab_size, 1000), (batch, t.context_length), device=device)
    ids[:, 0], ids[:, -1] = t.bos_id, t.eos_id
    data = {"images": images, "ids": ids}
    opt = build_optimizer(model, lr=1e-4, weight_decay=0.05)
    amp = (
        torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
        if setting == "bf16-mixed"
        else contextlib.nullcontext()
    )

    def step() -> None:
        with amp:
            if setting == "grad_cache":  # every chunk but the last is backpropagated inside
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # self.log without a Trainer
                    loss = mod.training_step(data, 0)
            else:
                loss, _, _ = mod.compute_losses(data)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if mod.hparams.compile and mod._compiled is None:
            raise RuntimeError("torch.compile fell back to eager")

    def resident() -> int:
        state = [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        return tensor_bytes([*model.parameters(), *state, images, ids])

    return step, resident


def _build(preset: str, setting: str, batch: int, device: str, img_size: int | None, onednn: bool, chunk: int | None):
    # module-level so that functools.partial of it pickles into the fresh process peak_memory spawns
    return make_step(preset, setting, batch, device, img_size, onednn, chunk)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="mmx_cat_t")
    p.add_argument("--quick", action="store_true", help=f"tiny sizes ({QUICK_PRESET}, 64 px, batch 4)")
    p.add_argument("--batch", type=int, default=None, help="training batch (default 16, quick 4)")
    p.add_argument(
        "--chunk", type=int, default=None, help="grad_cache's chunk size (default a quarter of the batch, at least 2)"
    )
    p.add_argument("--repeats", type=int, default=None, help="timed steps per setting (median); 3, quick 1")
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated subset of {SETTINGS}")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    a = p.parse_args(argv)
    if a.quick and a.preset == "mmx_cat_t":
        a.preset = QUICK_PRESET
    a.batch = a.batch or (4 if a.quick else 16)
    a.repeats = a.repeats or (1 if a.quick else 3)
    a.img_size = 64 if a.preset == QUICK_PRESET else None
    a.settings = [s for s in a.settings.split(",") if s]
    bad = set(a.settings) - set(SETTINGS)
    if bad:
        p.error(f"--settings takes {SETTINGS}; got {sorted(bad)}")
    return a


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"preset {args.preset}, batch {args.batch}, device {args.device}, {threads} threads, load {load:.2f}")
    settings = list(args.settings)
    if "compile" in settings:
        from mmxattn.lit.module import compile_unsupported_reason

        reason = compile_unsupported_reason(args.device)
        if reason:
            print(f"compile skipped: {reason}")
            settings.remove("compile")
    # On CPU, compile needs CAT's oneDNN linear off (inductor cannot lower it in training graphs) and switches it
    # off process-wide; so that the settings compare like with like, it is off for all of them in that case.
    onednn = "compile" not in settings or torch.device(args.device).type != "cpu"
    print(f"CAT oneDNN linear: {'on' if onednn else 'off (for every setting: compile needs it off)'}")
    steps = {
        s: make_step(args.preset, s, args.batch, args.device, args.img_size, onednn, args.chunk)[0] for s in settings
    }
    # 2 warmup rounds: lazy AdamW state, oneDNN kernel choice, and compilation for "compile" (its second call
    # recompiles once: the image projector's position cache is filled by the first)
    times = time_alternating(steps, repeats=args.repeats, warmup=2, device=args.device)
    del steps
    rows: dict[str, dict[str, Any]] = {}
    for s in settings:
        sec = median(times[s])
        rows[s] = {"step_s": sec, "images_per_s": args.batch / sec, "peak_bytes": None}
    if not args.no_memory:
        for s in settings:
            build = functools.partial(
                _build, args.preset, s, args.batch, args.device, args.img_size, onednn, args.chunk
            )
            warm = 2 if s == "compile" else 1
            rows[s]["peak_bytes"] = peak_memory(build, args.device, warmup=warm, calls=1, threads=threads)["peak"]
    base = rows.get("fp32")
    print(f"\n{'setting':<12} {'images/s':>9} {'x fp32':>7} {'peak memory':>13} {'x fp32':>7}")
    for s, r in rows.items():
        speed = r["images_per_s"] / base["images_per_s"] if base else float("nan")
        mem = fmt_bytes(r["peak_bytes"]) if r["peak_bytes"] is not None else "-"
        mem_ratio = r["peak_bytes"] / base["peak_bytes"] if base and r["peak_bytes"] and base["peak_bytes"] else None
        print(
            f"{s:<12} {r['images_per_s']:>9.2f} {speed:>7.2f} {mem:>13} {(f'{mem_ratio:.2f}' if mem_ratio else '-'):>7}"
        )
    out = {
        "preset": args.preset,
        "batch": args.batch,
        "device": args.device,
        "threads": threads,
        "load_avg_1min": load,
        "repeats": args.repeats,
        "onednn_linear": onednn,
        "grad_cache_chunk": args.chunk or max(2, args.batch // 4),
        "settings": rows,
    }
    if args.json:
        print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
