"""The main job's training step with and without :func:`mmxattn.runtime.tune_cpu_allocator`, side by side.

    python benchmarks/cpu_allocator.py [--steps 8] [--rounds 3] [--phase joint|word] [--threads 2] [--json]

glibc's malloc settings cannot be undone inside a process, so every measurement is a fresh child process
(``MMXATTN_TUNE_MALLOC`` 1 or 0), the two kinds alternating ``--rounds`` times so that the machine's drifting
speed hits both alike. Each child builds the main job's model (configs/shapes.yaml: ``mmx_shapes``, conv stem,
word head and context, its loss weights) on a small shapes set with the main job's batch (64 images, 3 captions
each), runs 3 warm-up steps of the chosen phase (AdamW, gradient clipping) and times ``--steps`` more; it also
counts the minor page faults per step. Printed: per-round medians, then the median over rounds and the ratio
tuned / default (below 1: the tuning is faster). The last line with ``--json`` is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(0, os.path.dirname(_HERE))


def child(steps: int, phase: str, threads: int, cache_dir: str) -> dict[str, float]:
    """One measurement in this process (the allocator is whatever the environment made it)."""
    import resource
    import time

    import torch
    import vs_coca_quality as V

    from mmxattn.data.datamodule import ShapesDataModule
    from mmxattn.runtime import tune_cpu_allocator

    tuned = tune_cpu_allocator()
    torch.set_num_threads(threads)
    data = V.main_job_data()
    data.update(train_size=640, val_size=64, test_size=64, cache_dir=cache_dir, num_workers=0)
    dm = ShapesDataModule(**data)
    dm.prepare_data()
    dm.setup("fit")
    args = argparse.Namespace(seed=0, preset="mmx_shapes", word_phase=V.main_job_word_phase())
    module = V.build_ours(args, dm)
    module.train()
    module.hparams.word_only_steps = sys.maxsize if phase == "word" else 0  # the phase switch vs_coca_quality uses
    opt = torch.optim.AdamW(module.parameters(), lr=1e-4)
    batches = [b for b, _ in zip(iter(dm.train_dataloader()), range(4))]

    def step(i: int) -> None:  # vs_coca_quality's training step (AdamW, its gradient clipping), no schedule
        V._one_step(module, lambda b, _: module.compute_losses(b)[0], opt, None, batches[i % len(batches)], i, _noop)

    for i in range(3):
        step(i)
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        step(i)
        times.append(time.perf_counter() - t0)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0) / steps
    return {"tuned": tuned, "step_s": statistics.median(times), "faults_per_step": faults}


def _noop() -> None:
    pass


def main(argv: list[str] | None = None) -> dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--phase", choices=["joint", "word"], default="joint")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--cache-dir", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print("CHILD " + json.dumps(child(a.steps, a.phase, a.threads, a.cache_dir)), flush=True)
        return {}
    rows: dict[str, list[dict[str, float]]] = {"default": [], "tuned": []}
    with tempfile.TemporaryDirectory() as cache:
        for r in range(a.rounds):
            for name in ("default", "tuned") if r % 2 == 0 else ("tuned", "default"):
                env = {**os.environ, "MMXATTN_TUNE_MALLOC": "1" if name == "tuned" else "0"}
                cmd = [sys.executable, os.path.abspath(__file__), "--child", "--steps", str(a.steps)]
                cmd += ["--phase", a.phase, "--threads", str(a.threads), "--cache-dir", cache]
                out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
                res = json.loads(out.split("CHILD ", 1)[1].splitlines()[0])
                if res["tuned"] != (name == "tuned"):
                    raise RuntimeError(f"the {name} child reported tuned={res['tuned']}")
                rows[name].append(res)
                print(
                    f"round {r} {name:7s} step {res['step_s'] * 1e3:7.1f} ms  "
                    f"page faults/step {res['faults_per_step']:9.1f}",
                    flush=True,
                )
    summary: dict[str, object] = {"phase": a.phase, "steps": a.steps, "rounds": a.rounds, "threads": a.threads}
    for name, rs in rows.items():
        summary[f"{name}_step_s"] = statistics.median(x["step_s"] for x in rs)
        summary[f"{name}_faults_per_step"] = statistics.median(x["faults_per_step"] for x in rs)
    summary["step_time_ratio"] = summary["tuned_step_s"] / summary["default_step_s"]
    print(
        f"{a.phase} step, median over rounds: default {summary['default_step_s'] * 1e3:.1f} ms, tuned "
        f"{summary['tuned_step_s'] * 1e3:.1f} ms, tuned / default {summary['step_time_ratio']:.3f}"
    )
    if a.json:
        print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
