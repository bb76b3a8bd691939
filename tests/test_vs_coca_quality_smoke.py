"""Smoke test of benchmarks/vs_coca_quality.py: at tiny sizes (``--quick``: mmx_tiny and a matched CoCa, 96 shapes
images, ~2 s of training each) the script trains both models, evaluates both, and reports as its last stdout line
a JSON object with both rows, the data set's ceilings, configs, parameter counts and step counts. No timing or
quality is asserted (the CPU is shared, and a few steps learn little): only that every metric is a number in its
range, that both models trained, and that both were configured alike and evaluated on the same set. Ours trains
configs/shapes.yaml's two phases (word-only, then joint): the phase split is read from that config and checked
here without the script."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import vs_coca_quality as vcq  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "vs_coca_quality.py"
RECALL = [f"{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)]
CAPTION = ["cider", "bleu4", "rouge_l"]

pytestmark = pytest.mark.slow  # ~15-30 s on 2 shared cores (two short trainings, Java for the PTB tokenizer)


@pytest.fixture(scope="module")
def report() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--json", "--minutes", "0.03", "--probe-steps", "2"]
        + ["--captions-per-image", "2"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=env,
    )
    assert proc.returncode == 0, f"vs_coca_quality.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    lines = proc.stdout.strip().splitlines()
    assert lines, "vs_coca_quality.py printed nothing"
    return json.loads(lines[-1])


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def test_report_has_every_section(report):
    for key in ("budget_minutes", "ours", "coca", "ceilings", "configs", "params", "steps"):
        assert key in report, f"missing {key}; keys: {sorted(report)}"
    assert report["budget_minutes"] == pytest.approx(0.03)


@pytest.mark.parametrize("name", ["ours", "coca"])
def test_rows_hold_every_metric_in_range(report, name):
    row = report[name]
    for key in [*RECALL, *CAPTION]:
        assert _number(row[key]), f"{name}.{key} = {row.get(key)!r}"
    for key in RECALL:
        assert 0.0 <= row[key] <= 1.0, f"{name}.{key} = {row[key]}"
    for d in ("i2t", "t2i"):  # recall can only grow with K
        assert row[f"{d}_r1"] <= row[f"{d}_r5"] <= row[f"{d}_r10"], d
    assert row["rsum"] == pytest.approx(sum(row[k] for k in RECALL), abs=1e-5)
    assert 0.0 <= row["bleu4"] <= 1.0 and 0.0 <= row["rouge_l"] <= 1.0 and row["cider"] >= 0.0
    assert _number(row["final_loss"]) and row["final_loss"] > 0


def test_both_models_trained_and_were_evaluated_on_the_same_set(report):
    for name in ("ours", "coca"):
        assert isinstance(report["steps"][name], int) and report["steps"][name] >= 1
    assert report["ours"]["n_images"] == report["coca"]["n_images"] == report["ceilings"]["n_images"]
    assert report["ours"]["n_texts"] == report["coca"]["n_texts"] == report["ceilings"]["n_captions"]


def test_ours_trains_on_several_captions_per_image_and_both_get_normalised_recall(report):
    assert report["train"]["ours"]["captions_per_image"] == 2 and report["train"]["coca"]["captions_per_image"] == 1
    assert report["configs"]["data"]["ours_captions_per_image"] == 2
    for name in ("ours", "coca"):
        for key in ("i2t_r1_norm", "i2t_r5_norm", "t2i_r1_norm", "t2i_r5_norm"):
            assert _number(report[name][key]) and 0.0 <= report[name][key] <= 1.0, (name, key)


def test_grounding_is_ours_only(report):
    assert report["coca"]["grounding_acc"] is None and report["coca"]["grounding_acc_gen"] is None
    assert _number(report["ours"]["grounding_acc"]) and 0.0 <= report["ours"]["grounding_acc"] <= 1.0
    # on its own captions: None exactly when no caption of the barely trained model named an object
    n = report["ours"]["grounding_n_gen"]
    assert isinstance(n, int) and (report["ours"]["grounding_acc_gen"] is None) == (n == 0)


def test_both_models_captions_are_checked_against_their_scenes(report):
    for name in ("ours", "coca"):
        row = report[name]
        assert _number(row["caption_fit"]) and 0.0 <= row["caption_fit"] <= row["caption_parsed"] <= 1.0, name


def test_ceilings_are_reported(report):
    c = report["ceilings"]
    for key in ("i2t_r1", "t2i_r1", "t2i_r5"):
        assert _number(c[key]) and 0.0 < c[key] <= 1.0, key
    for key in ("heldout_reference", "constant_caption"):
        assert _number(c[key]["cider"]) and _number(c[key]["bleu4"]), key


def test_peer_is_configured_like_ours(report):
    ours, coca = report["configs"]["ours"], report["configs"]["coca"]
    t, tc, mm = ours["text"], coca["text_cfg"], coca["multimodal_cfg"]
    assert coca["embed_dim"] == ours["embed_dim"]
    assert coca["vision_cfg"]["image_size"] == ours["vision"]["img_size"]
    for k in ("vocab_size", "context_length", "width", "heads"):
        assert tc[k] == t[k] and mm[k] == t[k], k
    assert tc["layers"] == t["layers"] and mm["layers"] == t["decoder_layers"]
    # the same special ids as our tokenizer, so both models read and write the same token ids
    assert coca["special_ids"] == {"bos": t["bos_id"], "eos": t["eos_id"], "pad": t["pad_id"]}
    assert tc["pad_id"] == t["pad_id"]
    p = report["params"]
    assert 0.75 < p["coca"]["vision_trunk"] / p["ours"]["vision_encoder"] < 1.25


def test_ours_trains_the_main_jobs_two_phases(report):
    word = report["configs"]["recipe"]["ours_word_phase"]
    assert word == vcq.main_job_word_phase() and word["word_ratio"] > 0
    assert report["configs"]["ours"]["word_head"] and report["configs"]["ours"]["word_context"]
    # the main job's attention term comes along with its word head
    assert word["attn_word_weight"] > 0
    phases = report["train"]["ours"]["phases"]
    assert [p["name"] for p in phases] == ["word-only", "joint"]
    assert phases[0]["steps"] == phases[0]["planned_steps"] >= 1 and phases[1]["steps"] >= 1
    assert phases[0]["steps"] + phases[1]["steps"] == report["steps"]["ours"]
    assert phases[0]["planned_steps"] == max(1, round(word["word_ratio"] * phases[1]["planned_steps"]))
    assert "phases" not in report["train"]["coca"]


def test_word_phase_is_read_from_the_config(tmp_path):
    cfg = tmp_path / "job.yaml"

    def read(max_epochs: int, word_only_steps: int, word_weight: float = 0.5) -> dict:
        cfg.write_text(
            f"trainer: {{max_epochs: {max_epochs}}}\n"
            f"model: {{word_weight: {word_weight}, word_head_stage: 0, word_only_steps: {word_only_steps},"
            " word_only_schedule: restart}\n"
            "data: {init_args: {train_size: 1000, batch_size: 64}}\n"  # 15 steps an epoch
        )
        vcq._main_job_config.cache_clear()
        try:
            return vcq.main_job_word_phase(str(cfg))
        finally:
            vcq._main_job_config.cache_clear()

    # 10 epochs of 15 steps: 50 word-only, 100 joint
    assert read(10, 50) == {
        "word_weight": 0.5,
        "word_head_stage": 0,
        "word_only_schedule": "restart",
        "word_ratio": 0.5,
    }
    with pytest.raises(ValueError, match="leaves no joint steps"):
        read(5, 100)  # 75 steps in all
    assert "word_ratio" not in read(5, 0)  # a word head without a word-only phase
    assert read(5, 0, word_weight=0.0) == {}


def test_phase_switch_controls_what_the_module_trains():
    from mmxattn.lit.module import MMXAttnModule

    torch.manual_seed(0)
    module = MMXAttnModule(preset="mmx_tiny", word_weight=1.0, word_head_stage=0, context_length=16)
    module.train()
    batch = {"images": torch.randn(2, 3, 64, 64), "ids": torch.randint(3, 60, (2, 16))}
    word, joint = vcq.ours_phases(module, 0.5)
    assert (word.share, joint.share) == (0.5, 1.0)
    word.start()
    _, losses, _ = module.compute_losses(batch)
    assert set(losses) == {"word"}
    joint.start()
    _, losses, _ = module.compute_losses(batch)
    assert {"word", "contrastive", "caption"} <= set(losses)
