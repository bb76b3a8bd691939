"""CAT-T against timm's ViT-S/16 and ViT-Ti/16 (random weights, ``img_size`` set to the input size), same run.

Per input size and batch, for each model:

* eval forward latency (``torch.inference_mode``), median over ``--repeats`` timed calls after one warm-up call;
* one training step (forward, backward, AdamW step), median the same way. Calls longer than ``--budget`` seconds
  are not repeated: the warm-up call is then the sample (its one-off costs are small at that scale);
* FLOPs of one forward (and of forward + backward) counted with ``torch.utils.flop_counter.FlopCounterMode``
  (matmuls, convolutions, SDPA; CAT counted with its oneDNN fast path off so every matmul is seen), and the
  achieved GFLOP/s, next to the machine's fp32 matmul GFLOP/s (``torch.mm`` of 2048 x 2048, measured here);
* peak memory: each (model, size, batch, mode) runs again in a fresh subprocess that builds the model and
  input, resets the kernel's peak-RSS counter (``/proc/self/clear_refs`` <- 5, Linux) before a call, and
  reports the peak RSS (``VmHWM``) of the call minus the RSS just before it, for the first call (one-off costs
  included: kernel code and caches built on first use, AdamW's state) and, in eval, for the second (what every
  further call of an inference run costs): the peak extra memory of that call (activations, autograd buffers, gradients, AdamW state, allocator overheads), untouched by model
  construction or by other measurements; the subprocess runs with ``MALLOC_MMAP_THRESHOLD_`` fixed (see
  ``_common.py``) so that freed tensors leave the RSS;
* CAT-T's eval forward on the CPU on long streams (above 8192 tokens, e.g. 896 px) runs block by block in slices that add
  into the stream in place (``mmxattn.vision.cat.set_inference_chunk_tokens``; 0 turns it off).

Timings are interleaved model by model and repeated, and medians reported, because the CPU may be shared.

On a GPU (``--device cuda``) every timed call ends with ``torch.cuda.synchronize``, peak memory is
``torch.cuda.max_memory_allocated`` over one call (after a warm-up call) minus what was allocated before it, in
the same process, and ``--bf16`` runs every call under ``torch.autocast(<device type>, bfloat16)`` (the matmul rate is
then measured in bf16 too).
By default the training step at 896 px with batch 8 is skipped (ViT-S needs about a minute per step on 2 cores);
``--full`` includes it.

    .venv/bin/python benchmarks/encoder_speed.py [--sizes 224,448,896] [--batches 1,8] [--repeats 3] [--json out.json]
    python benchmarks/encoder_speed.py --device cuda --bf16 --batches 1,64   # on a GPU (add --compile: torch.compile)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import bf16_autocast  # noqa: E402

from mmxattn.runtime import tune_cpu_allocator  # noqa: E402

MODELS = ("cat_t", "vit_s", "vit_ti")


def build(name: str, size: int) -> torch.nn.Module:
    if name == "cat_t":
        from mmxattn.presets import create_encoder

        return create_encoder("cat_t")  # any input size; 1000-class head like the ViTs
    import timm

    arch = {"vit_s": "vit_small_patch16_224", "vit_ti": "vit_tiny_patch16_224"}[name]
    return timm.create_model(arch, pretrained=False, img_size=size)


def make_step(model: torch.nn.Module, x: torch.Tensor, mode: str, bf16: bool = False) -> Callable[[], None]:
    """One eval forward or one training step of ``model`` on ``x`` (on ``x``'s device; the model is moved there),
    under bf16 autocast when ``bf16``. On CUDA the call waits for its kernels, so wall-clock time covers them."""
    device = x.device
    model.to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if mode == "eval":
        model.eval()

        def step() -> None:
            with torch.inference_mode(), bf16_autocast(device, bf16):
                model(x)
            sync()

        return step
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    target = torch.randint(0, 1000, (x.shape[0],), device=device)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with bf16_autocast(device, bf16):
            loss = torch.nn.functional.cross_entropy(model(x).float(), target)
        loss.backward()
        opt.step()
        sync()

    return step


def count_flops(model: torch.nn.Module, x: torch.Tensor, mode: str) -> int:
    """FLOPs of one forward (eval) or forward + backward (train), counted in fp32 (no autocast).

    Attention runs on SDPA's math backend while counting: the counter has no formula for the CPU flash kernel
    (``_scaled_dot_product_flash_attention_for_cpu``) and counted it as 0, which left out ViT's attention (0.7 of
    ViT-S's 9.2 GFLOP at 224 px, most of its work at 896 px) and CAT's few SDPA calls."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from mmxattn.vision import windows

    previous = windows._ONEDNN
    windows.set_onednn_linear(False)  # the fused oneDNN op has no FLOP formula
    try:
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
            if mode == "eval":
                with torch.no_grad():
                    model.eval()(x)
            else:
                model.train()(x).sum().backward()
                model.zero_grad(set_to_none=True)
    finally:
        windows.set_onednn_linear(previous)
    return fc.get_total_flops()


def matmul_gflops(n: int = 2048, repeats: int = 5, device: str = "cpu", dtype: torch.dtype = torch.float32) -> float:
    """The machine's matmul rate (GFLOP/s) for an n x n product on ``device`` in ``dtype``."""
    if torch.device(device).type == "cuda":
        n = max(n, 8192)  # a GPU needs a larger product to reach its rate
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    a @ b
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        sync()
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e9


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def measure_peak(name: str, size: int, batch: int, mode: str) -> tuple[float, float | None]:
    """In a fresh interpreter: peak RSS increase (MB) of the first call and, in eval, of the second, both above the
    resident set before the first call. The first includes one-off costs (kernel code, caches built on first use;
    in training AdamW's state and the gradients); the second eval call is what a long inference run holds at its
    peak, the caches the first call built and kept included (CAT's packed weight copies: until the twenty-fourth
    session the second call was measured from its own start, which left them out). (A second training call is not
    reported: its gradients, held between steps, are freed and re-allocated inside the step, so its peak above the
    resident set says little.)"""
    torch.manual_seed(0)
    step = make_step(build(name, size), torch.randn(batch, 3, size, size), mode)
    peaks: list[float | None] = []
    gc.collect()
    base = _status_kb("VmRSS")  # before any call: what the model's weights and the input already take
    for _ in range(2 if mode == "eval" else 1):
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:  # "5" resets the peak RSS (VmHWM) to the current RSS
            f.write("5")
        step()
        peaks.append((_status_kb("VmHWM") - base) / 1024)
    return peaks[0], (peaks[1] if len(peaks) > 1 else None)


def peak_memory_mb(name: str, size: int, batch: int, mode: str) -> tuple[float, float | None]:
    """(first call, second call or None) peak MB, measured in a fresh subprocess (:func:`measure_peak`)."""
    code = (
        "import sys; sys.path.insert(0, 'benchmarks'); import encoder_speed as b; "
        f"print(*b.measure_peak({name!r}, {size}, {batch}, {mode!r}))"
    )
    # glibc's dynamic mmap threshold keeps freed large blocks in the heap, so the peak RSS would follow the
    # allocator's history rather than the tensors held; a fixed threshold (as _common.peak_memory uses) maps every
    # large tensor separately and returns it to the kernel when freed.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    first, second = out.stdout.strip().splitlines()[-1].split()
    return float(first), (None if second == "None" else float(second))


def cuda_peak_mb(step: Callable[[], None]) -> float:
    """Peak extra CUDA memory (MB) of one call of ``step`` (already warmed up): allocated at the call's peak
    minus allocated before it (parameters, gradients and AdamW state held between calls are not counted)."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def timed(step: Callable[[], None], repeats: int, budget: float, warm: bool = False) -> list[float]:
    """Up to ``repeats`` timed calls, stopping after one that takes longer than ``budget`` seconds. Unless ``warm``,
    one untimed call first (first-call allocations, oneDNN kernel generation, a torch.compile): never a sample, so
    a slow model's median is not a cold call's (it used to be, for calls over the budget)."""
    if not warm:
        step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        if times[-1] > budget:
            break
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="224,448,896")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budget", type=float, default=10.0, help="seconds above which a call is not repeated")
    ap.add_argument("--modes", default="eval,train")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--full", action="store_true", help="include the training step at 896 px, batch 8")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument(
        "--bf16", action="store_true", help="bf16 autocast on the device given (GPU, or CPU with bf16 support)"
    )
    ap.add_argument(
        "--compile", action="store_true", help="torch.compile every model (timed after the compile; no CPU memory)"
    )
    args = ap.parse_args()
    tune_cpu_allocator()  # as train.py does; both peers share the process (MMXATTN_TUNE_MALLOC=0: off)
    device = torch.device(args.device)
    if args.compile and device.type == "cpu":
        args.no_memory = True  # the CPU memory is measured in fresh processes, of uncompiled models
    on_gpu = device.type == "cuda"
    if on_gpu:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # fp32 runs as timm users run
    sizes = [int(s) for s in args.sizes.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    modes = args.modes.split(",")

    mm_dtype = torch.bfloat16 if args.bf16 else torch.float32
    mm = matmul_gflops(device=args.device, dtype=mm_dtype)
    where = torch.cuda.get_device_name(device) if on_gpu else f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}, {'bf16' if args.bf16 else 'fp32'} matmul {mm:.1f} GFLOP/s")
    rows = []
    for size in sizes:
        models = {}
        for name in MODELS:
            torch.manual_seed(0)
            models[name] = build(name, size)
        # timed models: compiled (a wrapper sharing the parameters) with --compile; FLOPs are counted on the plain ones
        timed_models = {n: torch.compile(m) if args.compile else m for n, m in models.items()}
        for batch in batches:
            x = torch.randn(batch, 3, size, size, device=device)
            for mode in modes:
                if mode == "train" and size >= 896 and batch >= 8 and not args.full and not on_gpu:
                    print(f"skip train {size}px batch {batch} (--full runs it)")
                    continue
                steps = {n: make_step(m, x, mode, args.bf16) for n, m in timed_models.items()}
                samples: dict[str, list[float]] = {n: [] for n in MODELS}
                for r in range(2):  # two interleaved rounds: CAT, ViT-S, ViT-Ti, CAT, ... (warm-up in the first)
                    for n in MODELS:
                        per_round = max(1, args.repeats // 2 + args.repeats % 2)
                        samples[n] += timed(steps[n], per_round, args.budget, warm=r > 0)
                for n in MODELS:
                    t = statistics.median(samples[n])
                    flops = count_flops(models[n].to(device), x, mode)
                    if args.no_memory:
                        mem, steady = None, None
                    elif on_gpu:
                        mem, steady = cuda_peak_mb(steps[n]), None
                    else:
                        mem, steady = peak_memory_mb(n, size, batch, mode)
                    rows.append(
                        dict(
                            model=n,
                            size=size,
                            batch=batch,
                            mode=mode,
                            ms=t * 1e3,
                            samples=len(samples[n]),
                            gflop=flops / 1e9,
                            gflops_per_s=flops / t / 1e9,
                            peak_mb=mem,
                            peak_steady_mb=steady,
                        )
                    )
                    r = rows[-1]
                    mem_s = "-" if mem is None else f"{mem:6.0f} MB {'one call' if on_gpu else 'first call'}"
                    if steady is not None:
                        mem_s += f", {steady:6.0f} MB after"
                    print(
                        f"{mode:5s} {size:4d}px b{batch:<2d} {n:7s} {r['ms']:10.1f} ms  {r['gflop']:8.1f} GFLOP  "
                        f"{r['gflops_per_s']:6.1f} GFLOP/s ({r['gflops_per_s'] / mm:4.0%} of mm)  peak {mem_s}",
                        flush=True,
                    )

    print("\nratios CAT-T / ViT (time; peak memory)")
    ratios = []
    for r in rows:
        if r["model"] != "cat_t":
            continue
        key = (r["size"], r["batch"], r["mode"])
        peers = {p["model"]: p for p in rows if (p["size"], p["batch"], p["mode"]) == key}
        entry = dict(size=r["size"], batch=r["batch"], mode=r["mode"])
        for peer in ("vit_s", "vit_ti"):
            entry[f"time_vs_{peer}"] = r["ms"] / peers[peer]["ms"]
            if r["peak_mb"] is not None and peers[peer]["peak_mb"]:
                entry[f"mem_vs_{peer}"] = r["peak_mb"] / peers[peer]["peak_mb"]
            if r["peak_steady_mb"] is not None and peers[peer]["peak_steady_mb"]:
                entry[f"mem_steady_vs_{peer}"] = r["peak_steady_mb"] / peers[peer]["peak_steady_mb"]
        ratios.append(entry)
        mem = ""
        if "mem_vs_vit_s" in entry:
            mem = f"   memory first call: /ViT-S {entry['mem_vs_vit_s']:.2f}  /ViT-Ti {entry['mem_vs_vit_ti']:.2f}"
        if "mem_steady_vs_vit_s" in entry:
            mem += f"   after: /ViT-S {entry['mem_steady_vs_vit_s']:.2f}  /ViT-Ti {entry['mem_steady_vs_vit_ti']:.2f}"
        print(
            f"{r['mode']:5s} {r['size']:4d}px b{r['batch']:<2d} time: /ViT-S {entry['time_vs_vit_s']:.2f}  "
            f"/ViT-Ti {entry['time_vs_vit_ti']:.2f}{mem}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                dict(
                    torch=torch.__version__,
                    device=str(device),
                    bf16=args.bf16,
                    compiled=args.compile,
                    where=where,
                    threads=torch.get_num_threads(),
                    matmul_gflops=mm,
                    rows=rows,
                    ratios=ratios,
                ),
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
