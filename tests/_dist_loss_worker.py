"""One rank of the 2-process gloo check of ContrastiveLoss (driven by tests/test_losses.py; not a test itself).

Usage: python _dist_loss_worker.py RANK WORLD INIT_FILE CASES_FILE OUT_FILE

CASES_FILE (torch.save'd list of dicts) holds, per case, the FULL batch (raw_img (N, Di), raw_txt (N, Dt)), the
shared parameters (proj_img (Di, E), proj_txt (Dt, E), log_scale ()), the per-rank image and text row counts, the
texts' image index (or None: one text per image) and the loss options.
Each rank embeds its own rows with the shared parameters, computes the loss, backpropagates, and saves its loss and
the gradients of the parameters and of its local embeddings, for the test to compare with one process.
"""

import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mmxattn.losses import ContrastiveLoss


def main() -> None:
    rank, world = int(sys.argv[1]), int(sys.argv[2])
    init_file, cases_file, out_file = sys.argv[3:6]
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    results = []
    for case in torch.load(cases_file, weights_only=True):
        start = sum(case["sizes"][:rank])
        rows = slice(start, start + case["sizes"][rank])
        tstart = sum(case["tsizes"][:rank])
        trows = slice(tstart, tstart + case["tsizes"][rank])
        tii = None if case["tii"] is None else case["tii"][trows] - start  # local image rows of the local texts
        p_img = case["proj_img"].clone().requires_grad_(True)
        p_txt = case["proj_txt"].clone().requires_grad_(True)
        log_scale = case["log_scale"].clone().requires_grad_(True)
        img = F.normalize(case["raw_img"][rows] @ p_img, dim=-1)  # (b, E)
        txt = F.normalize(case["raw_txt"][trows] @ p_txt, dim=-1)  # (t, E)
        img.retain_grad()
        txt.retain_grad()
        pos_ids = None if case["pos_ids"] is None else case["pos_ids"][trows]
        loss_fn = ContrastiveLoss(gather=True, local_loss=case["local_loss"])
        loss = loss_fn(img, txt, log_scale.exp(), pos_ids=pos_ids, text_image_index=tii)
        loss.backward()
        results.append(
            {
                "loss": loss.detach(),
                "proj_img": p_img.grad,
                "proj_txt": p_txt.grad,
                "log_scale": log_scale.grad,
                "img": img.grad,
                "txt": txt.grad,
            }
        )
    torch.save(results, out_file)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # Skip interpreter finalisation: gloo's C++ worker threads can still be alive while Python tears down, and that
    # aborts the process now and then ("terminate called without an active exception", SIGABRT) after all the work
    # is done and saved. An exception in main() still exits non-zero through the normal path above.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
