import numpy as np
import pytest

from mg_ray.data.heatmaps import joint_heatmaps, limb_heatmaps, pose_heatmaps
from mg_ray.data.layouts import BODY25_HANDS, COCO17

from .helpers import ref_heatmaps


def random_pose(seed, m, t, v, h, w, zero_frac=0.2):
    rng = np.random.default_rng(seed)
    # Spread over and a bit beyond the image, so windows get clipped at every border.
    kp = np.stack([rng.uniform(-4, w + 4, (m, t, v)), rng.uniform(-4, h + 4, (m, t, v))], -1)
    score = rng.uniform(0, 1, (m, t, v))
    score[rng.uniform(size=score.shape) < zero_frac] = 0
    score[0, 0, :3] = 5e-5  # below the 1e-4 threshold: skipped
    return kp.astype(np.float32), score.astype(np.float32)


@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("size", [(56, 56), (20, 31)])
def test_joints_match_loop_reference(m, size):
    kp, score = random_pose(m, m, 6, 17, *size)
    kp[0, 1, 0] = (-2.5, -2.5)  # just outside: trunc() still touches row/col 0
    kp[0, 1, 1] = (size[1] - 0.5, size[0] + 1.9)
    kp[0, 1, 2] = (3.0, 4.0)  # integer position
    score[0, 1, :3] = 1.0
    fast = joint_heatmaps(kp, score, size, 0.7)
    ref = ref_heatmaps(kp, score, size, 0.7)
    assert fast.shape == (17, 6, *size) and fast.dtype == np.float32
    np.testing.assert_allclose(fast, ref, atol=1e-5, rtol=0)
    assert fast[0, 1, 0, 0] > 0  # the peer's boundary rule, reproduced


@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("sigma", [0.6, 1.5])
def test_limbs_match_loop_reference(m, sigma):
    kp, score = random_pose(10 + m, m, 5, 17, 56, 56)
    kp[0, 2, 1] = kp[0, 2, 0] + 0.4  # a limb shorter than a pixel: drawn as a point
    kp[0, 2, 3] = kp[0, 2, 1]  # zero-length limb
    fast = limb_heatmaps(kp, score, COCO17.limbs, (56, 56), sigma)
    ref = ref_heatmaps(kp, score, (56, 56), sigma, COCO17.limbs)
    assert fast.shape == (len(COCO17.limbs), 5, 56, 56)
    np.testing.assert_allclose(fast, ref, atol=1e-5, rtol=0)


def test_limbs_of_persons_off_the_image_or_unscored_draw_nothing():
    kp, score = random_pose(7, 3, 4, 17, 30, 30)
    kp[1] -= 60  # person 1 entirely left of / above the image: every window is empty
    score[2] = 0  # person 2 unscored
    fast = limb_heatmaps(kp, score, COCO17.limbs, (30, 30), 0.7)
    np.testing.assert_allclose(
        fast, ref_heatmaps(kp, score, (30, 30), 0.7, COCO17.limbs), atol=1e-5, rtol=0
    )
    np.testing.assert_array_equal(
        fast, limb_heatmaps(kp[:1], score[:1], COCO17.limbs, (30, 30), 0.7)
    )
    assert not limb_heatmaps(kp[1:], score[1:], COCO17.limbs, (30, 30), 0.7).any()


def test_other_layout_limbs():
    kp, score = random_pose(5, 2, 3, BODY25_HANDS.num_joints, 40, 40)
    fast = pose_heatmaps(kp, score, (40, 40), 0.7, BODY25_HANDS.limbs)
    ref = ref_heatmaps(kp, score, (40, 40), 0.7, BODY25_HANDS.limbs)
    np.testing.assert_allclose(fast, ref, atol=1e-5, rtol=0)


def test_peak_is_the_score_and_zero_scores_draw_nothing():
    kp = np.array([[[[10.0, 12.0], [30.0, 30.0]]]], np.float32)  # [1, 1, 2, 2]
    score = np.array([[[0.8, 0.0]]], np.float32)
    heat = joint_heatmaps(kp, score, (56, 56), 0.7)
    assert heat[0, 0, 12, 10] == pytest.approx(0.8)
    assert heat[0].max() == pytest.approx(0.8)
    assert not heat[1].any()


def test_persons_merge_by_maximum():
    kp = np.array([[[[10.0, 10.0]]], [[[10.5, 10.0]]]], np.float32)  # [2, 1, 1, 2]
    score = np.array([[[0.5]], [[0.9]]], np.float32)
    both = joint_heatmaps(kp, score, (24, 24), 0.7)
    each = [joint_heatmaps(kp[i : i + 1], score[i : i + 1], (24, 24), 0.7) for i in range(2)]
    np.testing.assert_array_equal(both, np.maximum(*each))
