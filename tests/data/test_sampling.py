import numpy as np
import pytest

from mg_ray.data.sampling import sample_frames


@pytest.mark.parametrize("n", [1, 3, 7, 8, 9, 15, 16, 17, 40, 150])
@pytest.mark.parametrize("mode", ["train", "test"])
def test_shape_and_range(n, mode):
    rng = np.random.default_rng(0)
    idx = sample_frames(n, 8, mode, num_clips=3, rng=rng)
    assert idx.shape == (3, 8) and idx.dtype == np.int64
    assert idx.min() >= 0 and idx.max() < n


def test_short_clip_loops_from_start():
    rng = np.random.default_rng(1)
    for clip in sample_frames(5, 8, "train", num_clips=20, rng=rng):
        start = clip[0]
        assert np.array_equal(clip, (start + np.arange(8)) % 5)
    # test mode: clip i of k starts at i when n < k
    idx = sample_frames(5, 8, "test", num_clips=10)
    assert [c[0] for c in idx] == [i % 5 for i in range(10)]


@pytest.mark.parametrize("n", [8, 11, 15])
def test_medium_clip_spreads_with_unit_offsets(n):
    rng = np.random.default_rng(2)
    for clip in sample_frames(n, 8, "train", num_clips=20, rng=rng):
        steps = np.diff(clip)
        assert set(steps.tolist()) <= {1, 2}  # sorted, distinct, spread by +1 offsets
        assert clip[0] in (0, 1) and clip[-1] <= n - 1
        assert (steps == 2).sum() + (clip[0] == 1) <= n - 8


@pytest.mark.parametrize("n", [16, 33, 150])
def test_long_clip_one_index_per_bin(n):
    rng = np.random.default_rng(3)
    edges = np.arange(9) * n // 8
    for clip in sample_frames(n, 8, "train", num_clips=20, rng=rng):
        assert ((clip >= edges[:-1]) & (clip < edges[1:])).all()


def test_test_mode_deterministic_and_clips_differ():
    a = sample_frames(150, 32, "test", num_clips=10)
    b = sample_frames(150, 32, "test", num_clips=10)
    assert np.array_equal(a, b)
    assert len({tuple(c) for c in a}) > 1


def test_train_mode_follows_generator():
    a = sample_frames(150, 8, "train", rng=np.random.default_rng(7))
    b = sample_frames(150, 8, "train", rng=np.random.default_rng(7))
    c = sample_frames(150, 8, "train", rng=np.random.default_rng(8))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    with pytest.raises(ValueError, match="Generator"):
        sample_frames(150, 8, "train")


def test_train_draws_cover_the_bins():
    rng = np.random.default_rng(4)
    seen = np.concatenate([sample_frames(64, 8, "train", rng=rng)[0] for _ in range(200)])
    assert len(np.unique(seen)) == 64  # every frame reachable
