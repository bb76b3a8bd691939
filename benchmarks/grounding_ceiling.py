"""How well ANY model could ground the shapes captions' words under the evaluator's rule, estimated from the generator.

``grounding_acc`` (:class:`mmxattn.evaluation.EvalAccumulator`) looks for a word where the query that PREDICTS it
attends: the query has read the caption up to the word, not the word itself. For the first word of a phrase
("there is a | small red circle") that query cannot know which object the reference caption will name: the
generator picks it at random among the image's objects. So even a model that sees the scene perfectly and points
exactly can be right only as often as the object it bets on is the one (or one of the ones) the phrase names.

This script estimates that Bayes-optimal pointing accuracy on the shapes test split. For every test image it draws
``--samples`` caption sets of its scene from the generator (``make_captions``, the process that wrote the
references), and for every prefix that precedes a grounded word counts how often each object is among the ones the
phrase names. For each grounded word of the image's real references the best bet is the object most often named
after that prefix; the word counts as found with the share of tied best bets that the phrase truly names. A
prefix no sample reproduced (long captions that list several objects) falls back to the bet after the phrase's
own earlier words alone (e.g. "small red", or nothing for a first word), over every drawn phrase of the image.
Each bet is a rule that sees only the prefix and the scene, so none can beat the Bayes rule; the estimate rises
with ``--samples`` towards the ceiling from below: read it as "at least". Perfect localisation is assumed (a hit is the peak inside
the object's box), so the real ceiling of an 8 x 8 attention map is a little lower still.

    python benchmarks/grounding_ceiling.py [--samples 100,400,1600] [--images 1000] [--json]

Prints, per sample count, the estimate over all grounded words and split as ``grounding_acc_first`` /
``grounding_acc_later`` split them (first word of a phrase / later words): compare them with the ``TEST METRICS``
line of a main-job run. The last line with ``--json`` is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(0, os.path.dirname(_HERE))

from mmxattn.data.datamodule import ShapesDataModule  # noqa: E402
from mmxattn.data.shapes import ShapesDataset  # noqa: E402
from mmxattn.data.shapes_captions import make_captions  # noqa: E402
from mmxattn.data.shapes_render import Scene  # noqa: E402


def _phrases(groundings: Sequence[tuple[Sequence[int], int]]) -> dict[tuple[int, ...], set[int]]:
    """(word positions) -> every object the phrase may truthfully name (a caption lists one pair per object)."""
    named: dict[tuple[int, ...], set[int]] = defaultdict(set)
    for positions, obj in groundings:
        named[tuple(positions)].add(int(obj))
    return named


def _keys(words: Sequence[str], positions: Sequence[int], j: int) -> tuple[tuple, tuple]:
    """The two things a bet on the ``j``-th word of a phrase may condition on: the caption's words before it, and
    (the fallback) the phrase's own earlier words."""
    w = positions[j]
    return ("prefix", *words[:w]), ("phrase", *(words[p] for p in positions[:j]))


def prefix_counts(scene: Scene, samples: int, rng: random.Random) -> dict[tuple, Counter]:
    """For ``samples`` caption sets of ``scene``: per key of :func:`_keys`, how often each object was among the
    ones the phrase of a grounded word after it names."""
    stats: dict[tuple, Counter] = defaultdict(Counter)
    for _ in range(samples):
        for cap in make_captions(scene, rng, 5):
            words = cap.text.split()
            for positions, objs in _phrases(cap.groundings).items():
                for j in range(len(positions)):
                    for key in _keys(words, positions, j):
                        stats[key].update(objs)
    return stats


def best_bet_score(
    stats: dict[tuple, Counter], keys: Sequence[tuple], named: set[int], n_objects: int, min_count: int = 1
):
    """(share of the tied best bets that ``named`` holds, whether the first key was used): the bet is made on the
    first of ``keys`` that samples reached at least ``min_count`` times (a uniform guess when none did)."""
    for key in keys:
        counts = stats.get(key)
        if counts and sum(counts.values()) >= min_count:
            top = max(counts.values())
            bets = [k for k, v in counts.items() if v == top]
            return sum(k in named for k in bets) / len(bets), key is keys[0]
    return len(named) / n_objects, False


def grounding_ceiling(
    dataset: ShapesDataset, samples: int, images: int | None = None, seed: int = 0, min_count: int = 1
) -> dict[str, Any]:
    """The estimate described in the module docstring, over the first ``images`` images of ``dataset``."""
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    n_img = len(dataset) if images is None else min(int(images), len(dataset))
    score = {"first": 0.0, "later": 0.0}
    count = {"first": 0, "later": 0}
    unseen = 0
    for i in range(n_img):
        ann = dataset.annotation(i)
        stats = prefix_counts(ann.scene, samples, random.Random(f"grounding-ceiling/{seed}/{i}"))
        for cap in ann.captions:
            words = cap.text.split()
            for positions, named in _phrases(cap.groundings).items():
                for j in range(len(positions)):
                    s, seen = best_bet_score(stats, _keys(words, positions, j), named, ann.scene.n, min_count)
                    place = "first" if j == 0 else "later"
                    score[place] += s
                    count[place] += 1
                    unseen += not seen
    n = count["first"] + count["later"]
    return {
        "samples": samples,
        "n_images": n_img,
        "n_words": n,
        "grounding_ceiling": (score["first"] + score["later"]) / n if n else None,
        "grounding_ceiling_first": score["first"] / count["first"] if count["first"] else None,
        "grounding_ceiling_later": score["later"] / count["later"] if count["later"] else None,
        "unseen_prefixes": unseen,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", default="100,400,1600", help="caption sets drawn per image (comma-separated: a trend)")
    p.add_argument("--images", type=int, default=None, help="first N test images (default: the whole split)")
    p.add_argument("--seed", type=int, default=0, help="seed of the drawn caption sets (not of the data)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    from vs_coca_quality import main_job_data

    # the main job's test split (configs/shapes.yaml's data settings), generated in memory
    data = {k: v for k, v in main_job_data().items() if k not in ("cache_dir", "num_workers")}
    ds = ShapesDataModule(**data, cache_dir=None, num_workers=0).dataset("test")
    rows = []
    for m in (int(x) for x in a.samples.split(",")):
        t = time.perf_counter()
        row = grounding_ceiling(ds, m, a.images, a.seed)
        row["seconds"] = round(time.perf_counter() - t, 1)
        rows.append(row)
        print(
            f"samples {m:5d}: ceiling >= {row['grounding_ceiling']:.3f}  first words {row['grounding_ceiling_first']:.3f}"
            f"  later words {row['grounding_ceiling_later']:.3f}  ({row['n_words']} words of {row['n_images']} images,"
            f" {row['unseen_prefixes']} prefixes never drawn, {row['seconds']} s)",
            flush=True,
        )
    out = {"rows": rows}
    if a.json:
        print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
