"""Keypoint layouts as data: joint names, limbs (pairs of joint indices) and left/right pairs.

A layout is everything the pipeline needs to know about a skeleton format: how many joints,
which joints a limb heatmap connects, and which joints swap on a horizontal flip. Adding a format
means adding a `KeypointLayout` value here, never code elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KeypointLayout:
    name: str
    joints: tuple[str, ...]
    limbs: tuple[tuple[int, int], ...]
    left: tuple[int, ...]
    right: tuple[int, ...]

    def __post_init__(self) -> None:
        n = len(self.joints)
        for a, b in self.limbs:
            assert 0 <= a < n and 0 <= b < n, f"{self.name}: limb ({a}, {b}) out of range"
        assert len(self.left) == len(self.right), f"{self.name}: left/right lists differ in length"

    @property
    def num_joints(self) -> int:
        return len(self.joints)

    @property
    def num_limbs(self) -> int:
        return len(self.limbs)

    def flip_permutation(self) -> list[int]:
        """perm[j] = the joint that lands on j after a horizontal flip."""
        perm = list(range(self.num_joints))
        for a, b in zip(self.left, self.right):
            perm[a], perm[b] = b, a
        return perm


COCO17 = KeypointLayout(
    name="coco17",
    joints=(
        "nose",
        "left_eye",
        "right_eye",
        "left_ear",
        "right_ear",
        "left_shoulder",
        "right_shoulder",
        "left_elbow",
        "right_elbow",
        "left_wrist",
        "right_wrist",
        "left_hip",
        "right_hip",
        "left_knee",
        "right_knee",
        "left_ankle",
        "right_ankle",
    ),
    limbs=(
        (0, 1),
        (0, 2),
        (1, 3),
        (2, 4),
        (0, 5),
        (5, 7),
        (7, 9),
        (0, 6),
        (6, 8),
        (8, 10),
        (5, 11),
        (11, 13),
        (13, 15),
        (6, 12),
        (12, 14),
        (14, 16),
        (11, 12),
    ),
    left=(1, 3, 5, 7, 9, 11, 13, 15),
    right=(2, 4, 6, 8, 10, 12, 14, 16),
)

_BODY25_JOINTS = (
    "nose",
    "neck",
    "right_shoulder",
    "right_elbow",
    "right_wrist",
    "left_shoulder",
    "left_elbow",
    "left_wrist",
    "mid_hip",
    "right_hip",
    "right_knee",
    "right_ankle",
    "left_hip",
    "left_knee",
    "left_ankle",
    "right_eye",
    "left_eye",
    "right_ear",
    "left_ear",
    "left_big_toe",
    "left_small_toe",
    "left_heel",
    "right_big_toe",
    "right_small_toe",
    "right_heel",
)
_BODY25_LIMBS = (
    (1, 8),
    (1, 2),
    (1, 5),
    (2, 3),
    (3, 4),
    (5, 6),
    (6, 7),
    (8, 9),
    (9, 10),
    (10, 11),
    (8, 12),
    (12, 13),
    (13, 14),
    (1, 0),
    (0, 15),
    (15, 17),
    (0, 16),
    (16, 18),
    (14, 19),
    (19, 20),
    (14, 21),
    (11, 22),
    (22, 23),
    (11, 24),
)
_BODY25_LEFT = (5, 6, 7, 12, 13, 14, 16, 18, 19, 20, 21)
_BODY25_RIGHT = (2, 3, 4, 9, 10, 11, 15, 17, 22, 23, 24)

BODY25 = KeypointLayout(
    name="body25",
    joints=_BODY25_JOINTS,
    limbs=_BODY25_LIMBS,
    left=_BODY25_LEFT,
    right=_BODY25_RIGHT,
)

# OpenPose hand model: 21 points, wrist then four per finger (thumb, index, middle, ring, pinky).
_HAND_JOINTS = ("wrist",) + tuple(
    f"{finger}_{i}" for finger in ("thumb", "index", "middle", "ring", "pinky") for i in range(1, 5)
)
_HAND_LIMBS = tuple(
    (0 if i == 0 else 1 + 4 * f + i - 1, 1 + 4 * f + i) for f in range(5) for i in range(4)
)


def _with_hands() -> KeypointLayout:
    """BODY_25 followed by the left hand (25..45) and the right hand (46..66), as OpenPose writes
    them. Each hand's wrist point is tied to the body's wrist by an extra limb."""
    left0, right0 = 25, 46
    joints = (
        _BODY25_JOINTS
        + tuple(f"left_hand_{j}" for j in _HAND_JOINTS)
        + tuple(f"right_hand_{j}" for j in _HAND_JOINTS)
    )
    limbs = (
        _BODY25_LIMBS
        + tuple((left0 + a, left0 + b) for a, b in _HAND_LIMBS)
        + tuple((right0 + a, right0 + b) for a, b in _HAND_LIMBS)
        + ((7, left0), (4, right0))
    )
    left = _BODY25_LEFT + tuple(range(left0, left0 + 21))
    right = _BODY25_RIGHT + tuple(range(right0, right0 + 21))
    return KeypointLayout("body25_hands", joints, limbs, left, right)


BODY25_HANDS = _with_hands()

# OpenPose's COCO model (18 points: COCO-17 plus a neck, in OpenPose's order).
COCO18 = KeypointLayout(
    name="coco18",
    joints=(
        "nose",
        "neck",
        "right_shoulder",
        "right_elbow",
        "right_wrist",
        "left_shoulder",
        "left_elbow",
        "left_wrist",
        "right_hip",
        "right_knee",
        "right_ankle",
        "left_hip",
        "left_knee",
        "left_ankle",
        "right_eye",
        "left_eye",
        "right_ear",
        "left_ear",
    ),
    limbs=(
        (1, 2),
        (1, 5),
        (2, 3),
        (3, 4),
        (5, 6),
        (6, 7),
        (1, 8),
        (8, 9),
        (9, 10),
        (1, 11),
        (11, 12),
        (12, 13),
        (1, 0),
        (0, 14),
        (14, 16),
        (0, 15),
        (15, 17),
    ),
    left=(5, 6, 7, 11, 12, 13, 15, 17),
    right=(2, 3, 4, 8, 9, 10, 14, 16),
)

# The raw iMiGUE release (`<id>_light_hand.csv`): 35 joints in the organisers' order and names
# (docs/data.md; read by their ST-GCN baseline, mikecheninoulu/SMG).
_IMIGUE35_JOINTS = (
    "Nose",
    "ShoulderCenter",
    "ShoulderLeft",
    "ElbowLeft",
    "HandLeft",
    "ShoulderRight",
    "ElbowRight",
    "HandRight",
    "HipCenter",
    "HipLeft",
    "KneeLeft",
    "AnkleLeft",
    "HipRight",
    "KneeRight",
    "AnkleRight",
    "EyeLeft",
    "EyeRight",
    "EarLeft",
    "EarRight",
    "ToeLeft",
    "SmallToeLeft",
    "HeelLeft",
    "ToeRight",
    "SmallToeRight",
    "HeelRight",
    *(f"RightFinger{i}" for i in range(1, 6)),
    *(f"LeftFinger{i}" for i in range(1, 6)),
)
_IMIGUE_UPPER = {  # the organisers' drawing: centre to nose and shoulders, arms, face, hands to fingers
    "ShoulderCenter": ("Nose", "ShoulderLeft", "ShoulderRight"),
    "ShoulderLeft": ("ElbowLeft",),
    "ElbowLeft": ("HandLeft",),
    "ShoulderRight": ("ElbowRight",),
    "ElbowRight": ("HandRight",),
    "Nose": ("EyeLeft", "EyeRight"),
    "EyeLeft": ("EarLeft",),
    "EyeRight": ("EarRight",),
    "HandRight": tuple(f"RightFinger{i}" for i in range(1, 6)),
    "HandLeft": tuple(f"LeftFinger{i}" for i in range(1, 6)),
}
_IMIGUE_LOWER = {  # BODY_25's legs and feet under the organisers' names (35-joint set only)
    "ShoulderCenter": ("HipCenter",),
    "HipCenter": ("HipLeft", "HipRight"),
    "HipLeft": ("KneeLeft",),
    "KneeLeft": ("AnkleLeft",),
    "AnkleLeft": ("ToeLeft", "HeelLeft"),
    "ToeLeft": ("SmallToeLeft",),
    "HipRight": ("KneeRight",),
    "KneeRight": ("AnkleRight",),
    "AnkleRight": ("ToeRight", "HeelRight"),
    "ToeRight": ("SmallToeRight",),
}


def _named_layout(
    name: str, joints: tuple[str, ...], *edges: dict[str, tuple[str, ...]]
) -> KeypointLayout:
    """A layout from joint names: limbs from parent -> children maps, left/right pairs from the
    names ("Left" <-> "Right")."""
    index = {j: i for i, j in enumerate(joints)}
    limbs = tuple(
        (index[a], index[b])
        for tree in edges
        for a, bs in tree.items()
        for b in bs
        if a in index and b in index
    )
    pairs = [
        (i, index[j.replace("Left", "Right")])
        for i, j in enumerate(joints)
        if "Left" in j and j.replace("Left", "Right") in index
    ]
    return KeypointLayout(
        name, joints, limbs, tuple(a for a, _ in pairs), tuple(b for _, b in pairs)
    )


IMIGUE35 = _named_layout("imigue35", _IMIGUE35_JOINTS, _IMIGUE_UPPER, _IMIGUE_LOWER)

# The 22 of the 35 the organisers' ST-GCN and the MiGA 2023 winners' pyskl pickles use, in that
# order: no hips or legs (the players sit).
IMIGUE22_FROM_35 = (0, 1, 2, 3, 4, 5, 6, 7, 15, 16, 17, 18, *range(25, 35))
IMIGUE22 = _named_layout(
    "imigue22", tuple(_IMIGUE35_JOINTS[i] for i in IMIGUE22_FROM_35), _IMIGUE_UPPER
)

LAYOUTS: dict[str, KeypointLayout] = {
    l.name: l for l in (COCO17, COCO18, IMIGUE22, BODY25, IMIGUE35, BODY25_HANDS)
}


def layout_for_joints(num_joints: int) -> KeypointLayout | None:
    """The layout a joint count identifies, where exactly one has that many joints."""
    found = [l for l in LAYOUTS.values() if l.num_joints == num_joints]
    return found[0] if len(found) == 1 else None


def get_layout(name: str) -> KeypointLayout:
    try:
        return LAYOUTS[name]
    except KeyError:
        raise ValueError(
            f"unknown keypoint layout {name!r}; known layouts: {', '.join(LAYOUTS)}"
        ) from None
