"""GPU paths (bf16 autocast, fused SDPA kernels, generation on the device). Skipped on machines without CUDA;
run on a GPU machine with `pytest -m gpu`."""

import pytest
import torch
from lit_helpers import smoke_args

import mmxattn
from mmxattn import capture_attention, cuda_graph, generation
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


def test_cuda_graph_decoding_matches_eager_and_is_reused():
    """Replaying the captured encoder and decoding step gives the eager tokens (fp32), for greedy and for beam
    search (whose reordering moves rows inside the graph's buffers); a later call with other images reuses the
    graphs; moved parameters are captured again; a capture of the attention maps falls back to the eager path."""
    torch.manual_seed(0)
    model = mmxattn.create_model("mmx_tiny", vocab_size=40, context_length=14).cuda().eval()
    with torch.no_grad():
        model.text.token_embedding.weight.mul_(20)  # sharp logits: no near-ties for kernel order to flip
    images = torch.randn(3, 3, 64, 64, device="cuda")
    for kw in (dict(strategy="greedy"), dict(strategy="beam", num_beams=3)):
        ref = model.generate(images, cuda_graph=False, **kw)
        assert ref.shape[1] > 2
        assert torch.equal(model.generate(images, cuda_graph=True, **kw), ref)
        assert torch.equal(model.generate(images, cuda_graph=False, static_cache=True, **kw), ref)
    # the encoder for 3 images (shared by greedy and beam), the step for batch 3 (greedy) and 9 (3 beams of 3)
    assert cuda_graph.held_graphs(model) == 3
    other = torch.randn(3, 3, 64, 64, device="cuda")
    assert torch.equal(model.generate(other), model.generate(other, cuda_graph=False))  # graph is the default
    assert cuda_graph.held_graphs(model) == 3
    tokens = model.encode_image_tokens(other)
    graphed = generation._encode_images(model, other, graphed=True)
    torch.testing.assert_close(graphed, tokens, atol=1e-5, rtol=1e-5)
    model.to(torch.float64).to(torch.float32)  # parameters moved: the next call captures again, still correct
    assert torch.equal(model.generate(other), model.generate(other, cuda_graph=False))
    with capture_attention(model, "decoder.*cross_attn") as maps:
        model.generate(images, max_new_tokens=4)
        with pytest.raises(ValueError, match="capture_attention"):
            model.generate(images, max_new_tokens=4, cuda_graph=True)
    assert len(maps.calls["decoder.blocks.0.cross_attn"]) >= 4


def test_cuda_graphs_survive_inference_mode_and_follow_in_place_weight_loads():
    """Graphs first built under torch.inference_mode() (Lightning's evaluation) serve later calls outside it (their
    buffers are refilled in place); an in-place weight load keeps the graphs (same addresses) and they compute the
    new weights' result (the encoder graph gathers the relative position bias itself instead of reading a cached
    copy); a CPU generator samples for a CUDA model."""
    import warnings

    torch.manual_seed(0)
    model = mmxattn.create_model("mmx_tiny", vocab_size=40, context_length=14).cuda().eval()
    other = mmxattn.create_model("mmx_tiny", vocab_size=40, context_length=14).cuda().eval()
    with torch.no_grad():
        for m in (model, other):
            m.text.token_embedding.weight.mul_(20)  # sharp logits: no near-ties for kernel order to flip
    images = torch.randn(3, 3, 64, 64, device="cuda")
    with torch.inference_mode():
        first = model.generate(images)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fallback to eager decoding warns
        assert torch.equal(model.generate(images), first)
        held = cuda_graph.held_graphs(model)
        model.load_state_dict(other.state_dict())
        assert torch.equal(model.generate(images), other.generate(images, cuda_graph=False))
        assert cuda_graph.held_graphs(model) == held
        torch.testing.assert_close(
            generation._encode_images(model, images, graphed=True),
            other.encode_image_tokens(images),
            atol=1e-5,
            rtol=1e-5,
        )
    runs = [model.generate(images, strategy="sample", generator=torch.Generator().manual_seed(0)) for _ in range(2)]
    assert runs[0].device.type == "cuda" and torch.equal(runs[0], runs[1])


def test_trained_fixture_captions_on_the_gpu_match_the_cpu():
    """The trained tiny checkpoint captions shapes images on the GPU (CUDA-graph decoding, the default there) as on
    the CPU (growing cache), greedy and beam."""
    from pathlib import Path

    from PIL import Image

    from mmxattn.data.shapes import ShapesDataset

    fixture = Path(__file__).resolve().parent / "fixtures" / "tiny_shapes"
    cpu, gpu = mmxattn.load(fixture), mmxattn.load(fixture, device="cuda")
    ds = ShapesDataset("test", size=48, img_size=cpu.cfg.vision.img_size)
    pil = [Image.fromarray(ds.render(i)) for i in range(len(ds))]
    for kw in (dict(strategy="greedy"), dict(strategy="beam", num_beams=3)):
        want, got = cpu.caption(pil, **kw), gpu.caption(pil, **kw)
        same = sum(a == b for a, b in zip(want, got))
        assert same >= len(pil) - 2, list(zip(want, got))  # two devices' fp32 may split a rare near-tie
        assert len(set(got)) > 5  # real, varied captions


def test_cpu_float_tensors_reach_a_cuda_model():
    """Normalised float pixel tensors made on the CPU (e.g. by a CPU model's preprocess or a torchvision pipeline)
    are moved to a CUDA model's device by the notebook API, as paths and PIL images are."""
    from pathlib import Path

    fixture = Path(__file__).resolve().parent / "fixtures" / "tiny_shapes"
    cpu, gpu = mmxattn.load(fixture), mmxattn.load(fixture, device="cuda")
    x = torch.randn(3, 3, cpu.cfg.vision.img_size, cpu.cfg.vision.img_size)
    assert gpu.preprocess(x).is_cuda and gpu.preprocess([x[0], x[1:]]).is_cuda
    assert len(gpu.caption(x)) == 3
    assert torch.allclose(gpu.similarity(x, ["a red circle"]).cpu(), cpu.similarity(x, ["a red circle"]), atol=1e-4)
    assert gpu.retrieve(x, ["a red circle"], k=2, direction="t2i").t2i_indices.shape == (1, 2)


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


def test_checkpoints_carry_the_gpus_random_state():
    """Drop path and hard-negative draws run on the GPU: a resumed run must continue its CUDA generator."""
    from mmxattn.lit.module import MMXAttnModule

    mod = MMXAttnModule(preset="mmx_tiny").cuda()
    torch.cuda.manual_seed(123)
    torch.rand(3, device="cuda")
    ckpt: dict = {}
    mod.on_save_checkpoint(ckpt)
    expected = torch.rand(5, device="cuda")
    torch.rand(7, device="cuda")  # move the generator on
    mod.on_load_checkpoint({**ckpt, "state_dict": mod.state_dict()})
    assert torch.equal(torch.rand(5, device="cuda"), expected)
