import numpy as np
import pytest
import torch

from mg_ray.data.heatmaps import joint_heatmaps, limb_heatmaps
from mg_ray.data.layouts import COCO17
from mg_ray.data.transforms import (
    compact_box,
    crop_keypoints,
    crop_resize_frames,
    flip_keypoints,
    integer_box,
    random_resized_box,
    whole_frame_box,
)

from .helpers import person_keypoints

torch.set_num_threads(1)
PERM = COCO17.flip_permutation()
# Window edges of the peer's definition are not mirror-symmetric (trunc() puts one extra pixel
# on the low side), so a flipped heatmap can differ by at most the Gaussian's value at 3 sigma.
EDGE = float(np.exp(-4.5)) + 1e-6


def pose(seed=0, m=2, t=4):
    rng = np.random.default_rng(seed)
    kp = np.stack(
        [person_keypoints(t, center=(20 + 10 * i, 28), scale=5, rng=rng) for i in range(m)]
    )
    return kp, rng.uniform(0.2, 1, kp.shape[:3]).astype(np.float32)


def test_flip_twice_is_identity():
    kp, score = pose()
    k1, s1 = flip_keypoints(kp, score, 56, PERM)
    k2, s2 = flip_keypoints(k1, s1, 56, PERM)
    np.testing.assert_allclose(k2, kp, atol=1e-5)
    np.testing.assert_array_equal(s2, score)
    frames = torch.rand(2, 3, 8, 8)
    assert torch.equal(frames.flip(-1).flip(-1), frames)


def test_flipped_joint_heatmap_is_heatmap_of_flipped_keypoints():
    kp, score = pose(1)
    heat = joint_heatmaps(kp, score, (56, 56), 0.7)
    fk, fs = flip_keypoints(kp, score, 56, PERM)
    flipped = joint_heatmaps(fk, fs, (56, 56), 0.7)
    expected = heat[PERM][..., ::-1]  # channel j of the flip is joint PERM[j] mirrored
    assert np.abs(flipped - expected).max() <= EDGE
    core = expected > 0.05  # inside every window: equal up to float rounding
    np.testing.assert_allclose(flipped[core], expected[core], atol=1e-5)


def test_flipped_limb_heatmap_is_heatmap_of_flipped_keypoints():
    kp, score = pose(2)
    heat = limb_heatmaps(kp, score, COCO17.limbs, (56, 56), 0.7)
    fk, fs = flip_keypoints(kp, score, 56, PERM)
    flipped = limb_heatmaps(fk, fs, COCO17.limbs, (56, 56), 0.7)
    limb_of = {frozenset(l): i for i, l in enumerate(COCO17.limbs)}
    limb_perm = [limb_of[frozenset((PERM[a], PERM[b]))] for a, b in COCO17.limbs]
    expected = heat[limb_perm][..., ::-1]
    assert np.abs(flipped - expected).max() <= EDGE
    core = expected > 0.05
    np.testing.assert_allclose(flipped[core], expected[core], atol=1e-5)


def test_compact_box_square_padded_inside_image():
    kp, score = pose(3, m=1)
    kp = kp * 4 + 100  # a person in a 640 x 480 frame
    box = compact_box(kp, score, (480, 640), padding=0.25)
    x0, y0, x1, y1 = box
    assert x1 - x0 == pytest.approx(y1 - y0)
    pts = kp.reshape(-1, 2) + 0.5
    assert (pts[:, 0] >= x0).all() and (pts[:, 0] <= x1).all()
    assert (pts[:, 1] >= y0).all() and (pts[:, 1] <= y1).all()
    tight = (pts.max(0) - pts.min(0)).max()
    assert x1 - x0 == pytest.approx(tight * 1.25, rel=1e-5)
    assert x0 >= 0 and y0 >= 0 and x1 <= 640 and y1 <= 480


def test_compact_box_near_border_shifts_inside_or_pads():
    kp = np.array([[[[2.0, 2.0], [40.0, 60.0]]]], np.float32)
    score = np.ones((1, 1, 2), np.float32)
    x0, y0, _, _ = compact_box(kp, score, (480, 640))
    assert x0 == 0 and y0 == 0  # shifted into the image, no padding needed
    big = compact_box(kp * 10, score, (480, 640))
    assert big[3] - big[1] > 480  # larger than the frame: stays centred, frames get padded


def test_no_person_gives_none():
    kp, score = pose(4)
    assert compact_box(kp, np.zeros_like(score), (100, 100)) is None
    assert whole_frame_box((72, 128)) == (0.0, 0.0, 128.0, 72.0)


def test_random_resized_box_inside_and_area_in_range():
    rng = np.random.default_rng(0)
    box = (10.0, 20.0, 110.0, 120.0)
    for _ in range(100):
        x0, y0, x1, y1 = random_resized_box(box, rng, (0.5, 1.0), (0.75, 4 / 3))
        assert 10 <= x0 < x1 <= 110 + 1e-9 and 20 <= y0 < y1 <= 120 + 1e-9
        assert 0.5 * 1e4 - 1e-6 <= (x1 - x0) * (y1 - y0) <= 1e4 + 1e-6


@pytest.mark.parametrize("seed", range(6))
def test_keypoints_stay_on_the_person(seed):
    """Draw each keypoint as a bright dot, run crop -> random resized crop -> resize -> flip on
    frames and keypoints, and check every transformed keypoint lands on a bright pixel."""
    rng = np.random.default_rng(seed)
    h, w = 120, 160
    kp = person_keypoints(2, center=(70 + 5 * seed, 60), scale=12, rng=rng)[None]
    kp = np.round(kp)  # dots centred on pixels
    score = np.ones(kp.shape[:3], np.float32)
    frames = np.zeros((2, h, w, 3), np.uint8)
    for t in range(2):
        for x, y in kp[0, t].astype(int):
            frames[t, y - 2 : y + 3, x - 2 : x + 3] = 255
    box = random_resized_box(compact_box(kp, score, (h, w)), rng, (0.6, 1.0))
    ibox = integer_box(box)
    size = 64
    flip = bool(seed % 2)
    rgb = crop_resize_frames(frames, ibox, size, flip)  # [T, 3, S, S]
    ckp = crop_keypoints(kp, ibox, (size, size))
    if flip:
        ckp, _ = flip_keypoints(ckp, score, size, PERM)
    for t in range(2):
        for x, y in ckp[0, t]:
            xi, yi = round(float(x)), round(float(y))
            if 0 <= xi < size and 0 <= yi < size:
                assert rgb[t, 0, yi, xi] > 128, (t, x, y)


def test_flip_before_resize_equals_flip_after():
    frames = np.random.default_rng(0).integers(0, 255, (2, 30, 41, 3), dtype=np.uint8)
    a = crop_resize_frames(frames, (3, 2, 40, 29), 16, flip=True)
    b = crop_resize_frames(frames, (3, 2, 40, 29), 16).flip(-1)
    torch.testing.assert_close(a, b)


def test_crop_outside_image_pads_with_zeros():
    frames = np.full((1, 10, 10, 3), 200, np.uint8)
    out = crop_resize_frames(frames, (-5, -5, 15, 15), 20)
    assert out.shape == (1, 3, 20, 20)
    assert out[0, 0, 0, 0] == 0 and out[0, 0, 10, 10] == pytest.approx(200)
