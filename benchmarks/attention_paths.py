"""The attention primitive's two CPU paths side by side: SDPA against the eager math, per problem shape.

    python benchmarks/attention_paths.py [--mode train|infer|both] [--repeats 15] [--threads 2] [--json]

:class:`mmxattn.attention.Attention` sends small CPU problems to the eager math (two matmuls and a softmax)
instead of ``F.scaled_dot_product_attention``, whose CPU kernel is slower there (``_small_cpu_problem``: at most
``_SMALL_CPU_KEYS`` keys, and at most ``_SMALL_CPU_SCORES`` scores without autograd, ``_SMALL_CPU_TRAIN_SCORES``
with it). This script times both paths on the shapes the project meets (CAT-T's IPSA
windows and CPSA rows at batch 16, the shapes job's windows, causal text and grouped cross-attention at its batch)
and on larger ones where SDPA should win, alternating the two in one process (``_common.time_alternating``).
``train`` times forward + backward (the queries, keys, values and, for IPSA, the relative position bias need
gradients), ``infer`` a no-grad forward. Printed per shape: median ms of each path, eager / SDPA (below 1: the eager
math is faster), and which path the rule picks. ``--json`` prints one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(0, os.path.dirname(_HERE))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _common import time_alternating  # noqa: E402

from mmxattn import attention as A  # noqa: E402

# name: (batch rows, heads, queries, keys, head dim, relative-position bias, causal)
SHAPES: dict[str, tuple[int, int, int, int, int, bool, bool]] = {
    "cat_t IPSA stage 0, batch 16": (1024, 2, 49, 49, 32, True, False),
    "cat_t IPSA stage 1, batch 16": (256, 4, 49, 49, 32, True, False),
    "cat_t CPSA stage 0, batch 16": (1024, 1, 64, 64, 49, False, False),
    "cat_t CPSA stage 1, batch 16": (2048, 1, 16, 16, 49, False, False),
    "cat_t CPSA stage 0, 448 px, batch 1": (64, 1, 256, 256, 49, False, False),
    "shapes IPSA stage 0, batch 64": (1024, 2, 16, 16, 24, True, False),
    "shapes CPSA stage 0, batch 64": (3072, 1, 16, 16, 16, False, False),
    "shapes causal text, 192 x 23": (192, 4, 23, 23, 32, False, True),
    "shapes cross-attention, 64 x 69 x 80": (64, 4, 69, 80, 32, False, False),
    "cross-attention, 128 x 32 x 128": (128, 4, 32, 128, 64, False, False),
    "ViT-S/16 self-attention, 16 x 197": (16, 6, 197, 197, 64, False, False),
    "causal 8 x 256": (8, 8, 256, 256, 64, False, True),
    "causal 2 x 1024": (2, 8, 1024, 1024, 64, False, True),
}
QUICK = ("shapes causal text, 192 x 23", "causal 8 x 256")


def _problem(shape: tuple, train: bool) -> tuple[dict, object]:
    B, nh, L, S, d, bias, causal = shape
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, nh, n, d, generator=gen, requires_grad=train) for n in (L, S, S))
    b = torch.randn(1, nh, L, S, generator=gen, requires_grad=train) if bias else None
    grad = torch.randn(B, nh, L, d, generator=gen)
    blocked = torch.ones(L, S, dtype=torch.bool).triu(1) if causal else None
    scale = d**-0.5

    def sdpa() -> None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=b, is_causal=causal, scale=scale)
        if train:
            out.backward(grad)

    def eager() -> None:
        out, _ = A._eager(q, k, v, scale, blocked, b, 0.0)
        if train:
            out.backward(grad)

    with torch.set_grad_enabled(train):
        picks_eager = A._small_cpu_problem(q, S, 0.0)
    return {"sdpa": sdpa, "eager": eager}, picks_eager


def measure(mode: str, names: list[str], repeats: int, warmup: int) -> list[dict[str, object]]:
    rows = []
    train = mode == "train"
    for name in names:
        fns, picks_eager = _problem(SHAPES[name], train)
        with torch.set_grad_enabled(train):
            times = time_alternating(fns, repeats=repeats, warmup=warmup)
        sdpa, eager = statistics.median(times["sdpa"]), statistics.median(times["eager"])
        rows.append(
            {
                "mode": mode,
                "shape": name,
                "sdpa_ms": sdpa * 1e3,
                "eager_ms": eager * 1e3,
                "eager_over_sdpa": eager / sdpa,
                "rule_picks": "eager" if picks_eager else "sdpa",
            }
        )
        r = rows[-1]
        print(
            f"{mode:5s}  {name:38s} sdpa {r['sdpa_ms']:8.2f} ms  eager {r['eager_ms']:8.2f} ms  "
            f"eager/sdpa {r['eager_over_sdpa']:.2f}  rule: {r['rule_picks']}",
            flush=True,
        )
    return rows


def main(argv: list[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=["train", "infer", "both"], default="both")
    ap.add_argument("--repeats", type=int, default=15, help="timed calls per path and shape (median)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--quick", action="store_true", help="two small shapes, for the smoke test")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = list(QUICK) if args.quick else list(SHAPES)
    modes = ["train", "infer"] if args.mode == "both" else [args.mode]
    rows = [row for mode in modes for row in measure(mode, names, args.repeats, args.warmup)]
    report = {"threads": args.threads, "repeats": args.repeats, "rows": rows}
    if args.json:
        print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
