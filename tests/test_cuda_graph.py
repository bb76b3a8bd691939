"""The registry behind CUDA-graph inference (mmxattn.cuda_graph.cached): one object per model and key, built again
when the parameters move, a bounded number per model, gone with the model. The captures themselves need a GPU
(tests/test_gpu.py)."""

import gc

from torch import nn

from mmxattn import cuda_graph


def test_cached_builds_once_per_key_and_again_when_parameters_move():
    model = nn.Linear(4, 4)
    built = []

    def build(tag):
        built.append(tag)
        return object()

    a = cuda_graph.cached(model, ("x", 1), lambda: build("a"))
    assert cuda_graph.cached(model, ("x", 1), lambda: build("again")) is a
    b = cuda_graph.cached(model, ("x", 2), lambda: build("b"))
    assert b is not a and built == ["a", "b"] and cuda_graph.held_graphs(model) == 2
    model.weight.data = model.weight.data.clone()  # moved parameters: the old capture would read freed memory
    c = cuda_graph.cached(model, ("x", 1), lambda: build("c"))
    assert c is not a and built == ["a", "b", "c"] and cuda_graph.held_graphs(model) == 2


def test_cached_keeps_a_few_per_model_and_goes_with_the_model():
    model = nn.Linear(2, 2)
    made = [cuda_graph.cached(model, (i,), object) for i in range(cuda_graph._PER_MODEL + 3)]
    assert cuda_graph.held_graphs(model) == cuda_graph._PER_MODEL
    assert cuda_graph.cached(model, (3,), object) is made[3]  # among the most recent: still held
    assert cuda_graph.cached(model, (0,), object) is not made[0]  # the least recently used went first
    n = len(cuda_graph._REGISTRY)
    del model
    gc.collect()
    assert len(cuda_graph._REGISTRY) == n - 1


def test_clear_drops_one_model_or_all():
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    for m in (a, b):
        cuda_graph.cached(m, ("k",), object)
    cuda_graph.clear(a)
    assert cuda_graph.held_graphs(a) == 0 and cuda_graph.held_graphs(b) == 1
    cuda_graph.clear()
    assert cuda_graph.held_graphs(b) == 0
