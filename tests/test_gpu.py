"""GPU paths (bf16 autocast, fused SDPA kernels, generation on the device). Skipped on machines without CUDA;
run on a GPU machine with `pytest -m gpu`."""

import pytest
import torch
from lit_helpers import smoke_args

import mmxattn
from mmxattn.attention import Attention, eager_attention
from mmxattn.lit.cli import main as cli_main

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_kernels_match_eager_on_gpu(dtype):
    torch.manual_seed(0)
    attn = Attention(128, 4).cuda().to(dtype).eval()
    x = torch.randn(4, 64, 128, device="cuda", dtype=dtype)
    fused = attn(x, is_causal=True)
    with eager_attention():
        eager = attn(x, is_causal=True)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(fused, eager, atol=tol, rtol=tol)


def test_bf16_autocast_training_step_and_generation():
    torch.manual_seed(0)
    model = mmxattn.create_model("mmx_tiny").cuda()
    images = torch.randn(4, 3, 64, 64, device="cuda")
    ids = torch.randint(3, 64, (4, 16), device="cuda")
    ids[:, 0] = 1
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(images, ids)
    loss = out.logits.float().logsumexp(-1).mean() + (out.image_embeds * out.text_embeds).sum()
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.eval()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        a = model.generate(images, max_new_tokens=8, use_cache=True)
        b = model.generate(images, max_new_tokens=8, use_cache=False)
    assert a.device.type == "cuda" and a.shape[0] == 4
    assert (a == b).float().mean() > 0.9  # bf16 rounding may flip a near-tie, not whole captions


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_lightning_fit_with_bf16_on_one_gpu(strategy, tmp_path, monkeypatch):
    """The shapes config trains on one GPU with bf16-mixed under Lightning's DDP and FSDP strategies (Lightning's
    FSDP needs a GPU, so this is the only place it runs), and ends with finite weights."""
    monkeypatch.chdir(tmp_path)
    # TensorBoard rather than the default wandb logger: one dependency less on GPU machines (CPU tests cover both)
    args = smoke_args("shapes.yaml", tmp_path, fast_dev_run=2, overlays=("shapes_tensorboard.yaml",)) + [
        "--trainer.accelerator=gpu",
        "--trainer.devices=1",
        f"--trainer.strategy={strategy}",
        "--trainer.precision=bf16-mixed",
    ]
    cli = cli_main(args)
    assert cli.trainer.state.finished and cli.trainer.global_step == 2
    assert all(torch.isfinite(p).all() for p in cli.model.parameters())
