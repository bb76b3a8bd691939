"""A callback the DDP test runs inside each training process (importable through PYTHONPATH=tests)."""

import json
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F


class GlobalBatchProbe(pl.Callback):
    """Before each step, compare the module's contrastive loss (averaged over ranks, as DDP averages gradients)
    with a reference InfoNCE over the concatenated global batch; write what it saw per rank as JSON, with the
    numeric metrics each rank's evaluation computed (``last_metrics``) where a validation ran."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.records: list[dict] = []
        self.val: dict[str, float] = {}

    def on_validation_end(self, trainer, pl_module) -> None:
        self.val = {k: float(v) for k, v in pl_module.last_metrics.items() if isinstance(v, (int, float))}

    @torch.no_grad()
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        out = pl_module.model(batch["images"], batch["ids"])
        ours = pl_module.contrastive(out.image_embeds, out.text_embeds, out.logit_scale)
        mean = ours.clone()
        dist.all_reduce(mean)
        mean /= dist.get_world_size()
        gi = [torch.zeros_like(out.image_embeds) for _ in range(dist.get_world_size())]
        gt = [torch.zeros_like(out.text_embeds) for _ in range(dist.get_world_size())]
        dist.all_gather(gi, out.image_embeds)
        dist.all_gather(gt, out.text_embeds)
        logits = out.logit_scale * torch.cat(gi) @ torch.cat(gt).T
        labels = torch.arange(logits.shape[0])
        ref = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        self.records.append(
            {
                "rank": dist.get_rank(),
                "local": out.image_embeds.shape[0],
                "global": logits.shape[0],
                "mean_loss": mean.item(),
                "reference": ref.item(),
                "local_only": _local(out).item(),
            }
        )

    def on_train_end(self, trainer, pl_module) -> None:
        checksum = sum(p.detach().double().sum().item() for p in pl_module.parameters())
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"rank{dist.get_rank()}.json"
        rec = {"steps": self.records, "checksum": checksum, "global_step": trainer.global_step, "val": self.val}
        path.write_text(json.dumps(rec))


def _local(out):
    logits = out.logit_scale * out.image_embeds @ out.text_embeds.T
    labels = torch.arange(logits.shape[0])
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


class SaveFirstGrads(pl.Callback):
    """Each rank's gradients at the first optimizer step (after DDP's all-reduce), saved as ``rank{r}.pt``."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == 0:
            grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}
            self.out_dir.mkdir(parents=True, exist_ok=True)
            torch.save(grads, self.out_dir / f"rank{dist.get_rank()}.pt")
