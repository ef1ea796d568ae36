import numpy as np

from mg_ray.metrics import topk_accuracy
from mg_ray.tune.ensemble import search_weights


def test_weights_found_on_validation_beat_each_member():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 200)
    onehot = np.eye(4)[labels]
    # member a is right on the first half, member b on the second half; noise elsewhere
    a = np.where(
        np.arange(200)[:, None] < 100, onehot * 0.9 + 0.025, rng.dirichlet(np.ones(4), 200)
    )
    b = np.where(np.arange(200)[:, None] >= 100, onehot * 0.6 + 0.1, rng.dirichlet(np.ones(4), 200))
    w = search_weights([a, b], labels)
    assert np.isclose(w.sum(), 1.0)
    mixed = topk_accuracy(w[0] * a + w[1] * b, labels, 1)
    assert mixed > max(topk_accuracy(a, labels, 1), topk_accuracy(b, labels, 1))


def test_coordinate_ascent_for_larger_ensembles():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 60)
    members = [rng.dirichlet(np.ones(3), 60) for _ in range(3)] + [np.eye(3)[labels]]
    w = search_weights(members, labels)
    assert np.isclose(w.sum(), 1.0) and w[3] == w.max()
