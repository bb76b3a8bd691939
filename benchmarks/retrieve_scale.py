"""Retrieval over a large gallery, side by side: ``MMXAttn.retrieve`` (the gallery streamed a batch at a time, no
images x texts score matrix) against the full-matrix way that open_clip's retrieval evaluation takes (every
embedding, then ``logits = image_embeds @ text_embeds.T``, then top-k each way; with ``--gallery-norm`` the two
``log_softmax`` matrices of :func:`mmxattn.metrics.gallery_normalized_scores`).

    python benchmarks/retrieve_scale.py [--preset mmx_tiny] [--images 2000] [--texts 20000] [--k 10] \
        [--gallery-norm] [--batch-size 256] [--repeats 3] [--threads 2] [--quick] [--json]

Both peers get the same model, the same images (random normalised pixels at the preset's image size) and the same
token ids, encode them in batches of ``--batch-size``, and must return the same top-k both ways: checked once before
anything is timed (scores within 1e-4 at every rank, and at least 99% of the indices equal: the rest are near-ties,
two scores a rounding step apart, since a block of the score matrix rounds by its shape). Time: the median of
alternating calls (``_common.time_alternating``). Memory: ``_common.peak_memory``, each peer in a fresh process,
reported as what one call adds on top of the model and its inputs (``added``). Printed: each peer's seconds and
MiB and the ratios ours / peer; with ``--json`` the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(0, os.path.dirname(_HERE))

import torch  # noqa: E402
from _common import fmt_bytes, median, peak_memory, tensor_bytes, time_alternating  # noqa: E402

PEERS = ("mmxattn", "full_matrix")


def make_inputs(preset: str, n_images: int, n_texts: int, seed: int = 0):
    """The model (eval mode), images (N, 3, S, S) and token ids (M, T) every measurement uses."""
    import mmxattn

    torch.manual_seed(seed)
    model = mmxattn.create_model(preset).eval()
    c = model.cfg
    g = torch.Generator().manual_seed(seed)
    s = c.vision.img_size
    images = torch.randn(n_images, 3, s, s, generator=g)
    T = c.text.context_length
    ids = torch.randint(3, c.text.vocab_size, (n_texts, T), generator=g)
    ids[:, 0] = c.text.bos_id
    lengths = torch.randint(3, T - 1, (n_texts,), generator=g)
    for i, n in enumerate(lengths.tolist()):
        ids[i, n] = c.text.eos_id
        ids[i, n + 1 :] = c.text.pad_id
    return model, images, ids


def full_matrix(model, images, ids, k: int, gallery_norm: bool, batch_size: int):
    """The peer: every embedding, the whole score matrix, top-k each way. Returns the same fields as retrieve."""
    with torch.no_grad():
        img = torch.cat([model.encode_image(x) for x in images.split(batch_size)])
        txt = torch.cat([model.encode_text(t) for t in ids.split(batch_size)])
        sim = img @ txt.T  # (N_img, N_txt)
        if gallery_norm:
            from mmxattn.metrics import gallery_normalized_scores

            by_image, by_text = gallery_normalized_scores(img, txt, float(model.get_logit_scale()))
            by_text = by_text.T
        else:
            by_image, by_text = sim, sim.T
        i2t = by_image.topk(min(k, txt.shape[0]), dim=1)
        t2i = by_text.topk(min(k, img.shape[0]), dim=1)
    return i2t.indices, i2t.values, t2i.indices, t2i.values


def ours(model, images, ids, k: int, gallery_norm: bool, batch_size: int):
    r = model.retrieve(images, ids, k=k, gallery_norm=gallery_norm, batch_size=batch_size)
    return r.i2t_indices, r.i2t_scores, r.t2i_indices, r.t2i_scores


def _call(peer: str, model, images, ids, args) -> tuple:
    fn = ours if peer == "mmxattn" else full_matrix
    return fn(model, images, ids, args["k"], args["gallery_norm"], args["batch_size"])


def build(peer: str, args: dict):
    """For ``_common.peak_memory``: one peer's call on freshly made inputs; the model and inputs are resident."""
    model, images, ids = make_inputs(args["preset"], args["images"], args["texts"])

    def step() -> None:
        _call(peer, model, images, ids, args)

    def resident() -> int:
        return tensor_bytes(list(model.parameters()) + list(model.buffers()) + [images, ids])

    return step, resident


def agreement(a: tuple, b: tuple) -> tuple[bool, float]:
    """Whether both peers rank alike: at every rank the scores within 1e-4 (so a differing index is a near-tie,
    two scores one rounding apart: the score matrix's blocks round by shape), and the share of equal indices."""
    close = all(torch.allclose(x, y, rtol=1e-4, atol=1e-4) for x, y in zip(a[1::2], b[1::2]))
    same = sum(int((x == y).sum()) for x, y in zip(a[0::2], b[0::2])) / sum(x.numel() for x in a[0::2])
    return close, same


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="mmx_tiny", help="model preset (random weights); default mmx_tiny")
    p.add_argument("--images", type=int, default=2000, help="gallery images (default 2000)")
    p.add_argument("--texts", type=int, default=20000, help="texts (default 20000)")
    p.add_argument("--k", type=int, default=10, help="top-k each way (default 10)")
    p.add_argument("--gallery-norm", action="store_true", help="rank by the gallery-normalised scores")
    p.add_argument("--batch-size", type=int, default=256, help="images / texts encoded per call (default 256)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (default 3)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory children")
    p.add_argument("--quick", action="store_true", help="tiny sizes (the smoke test): 64 images, 300 texts")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    a = p.parse_args(argv)
    if a.quick:
        a.images, a.texts, a.repeats = 64, 300, 1
    if a.threads:
        torch.set_num_threads(a.threads)
    args = {
        "preset": a.preset,
        "images": a.images,
        "texts": a.texts,
        "k": a.k,
        "gallery_norm": a.gallery_norm,
        "batch_size": a.batch_size,
    }
    model, images, ids = make_inputs(a.preset, a.images, a.texts)
    results = {peer: _call(peer, model, images, ids, args) for peer in PEERS}
    close, same_share = agreement(results["mmxattn"], results["full_matrix"])
    if not close or same_share < 0.99:
        raise SystemExit(
            f"retrieve_scale: the two peers ranked differently (scores close: {close}, equal indices "
            f"{same_share:.4f}); nothing timed"
        )
    del results
    times = time_alternating(
        {peer: functools.partial(_call, peer, model, images, ids, args) for peer in PEERS}, repeats=a.repeats
    )
    report: dict = {**args, "threads": torch.get_num_threads(), "same_results": close, "same_indices": same_share}
    for peer in PEERS:
        report[f"{peer}_s"] = median(times[peer])
    report["time_ratio"] = report["mmxattn_s"] / report["full_matrix_s"]
    if not a.no_memory:
        for peer in PEERS:
            mem = peak_memory(functools.partial(build, peer, args), threads=torch.get_num_threads())
            report[f"{peer}_added_bytes"] = mem["added"]
        report["added_memory_ratio"] = report["mmxattn_added_bytes"] / max(report["full_matrix_added_bytes"], 1)
    matrix = a.images * a.texts * 4
    print(
        f"{a.preset}: {a.images} images x {a.texts} texts, k={a.k}, gallery_norm={a.gallery_norm}, "
        f"batch {a.batch_size}, {report['threads']} threads (one fp32 score matrix: {fmt_bytes(matrix)}); "
        f"same top-k indices: {same_share:.4f}"
    )
    for peer in PEERS:
        line = f"  {peer:12s} {report[f'{peer}_s']:.3f} s"
        if not a.no_memory:
            line += f"   adds {fmt_bytes(report[f'{peer}_added_bytes'])}"
        print(line)
    line = f"  ours / full matrix: time {report['time_ratio']:.2f}x"
    if not a.no_memory:
        line += f", memory added {report['added_memory_ratio']:.2f}x"
    print(line)
    if a.json:
        print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
