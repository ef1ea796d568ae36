"""The synthetic micro-gesture dataset: a seated upper-body figure drawn with numpy.

`mg-ray synth --out DIR` (or `generate(out, ...)`) writes a dataset in the mg-ray format (see
`mg_ray.data.video_io`): H.264 clips, COCO-17 keypoints with scores, class names, a cross-subject
split and `dataset.json`. It is the project's embedded default: small, deterministic for a seed,
and built so that a tiny two-stream model learns it in CPU minutes with each stream carrying part
of the signal:

- pose carries WHERE the hands go and WHEN: the target (face, top of head, neck, chest, the other
  forearm, both hands together in the lap) and the timing (one long touch vs two quick taps).
- RGB carries HOW the hand acts, which COCO-17 (no finger joints) cannot see: a rubbing hand is
  drawn smeared and flushed red, a held object is a small vividly coloured bar. The keypoints of
  "touch X" and "rub X" differ only by a ~1 px oscillation that is buried in the keypoint jitter.

So a pose-only model tops out near 7 of 10 classes (three touch/rub/hold pairs look alike), an
RGB-only model has to find small hands at low resolution, and the fused model can do best.
Which hand acts is a per-clip nuisance, never the label: a horizontal flip with left/right joint
swap (a standard augmentation here) turns a right-hand gesture into a left-hand one, so
handedness classes would contradict their own augmented samples.

Variation per subject: body size, position, skin/shirt/hair colours, background, speed, hand
preference. Noise per clip: keypoint jitter, missed detections (coordinates and score 0 for single
joints, whole frames), score drops, occlusion lowering the wrist score near the face.

Pipeline: `plan_clips` (which clip is which subject/class/split) -> `render_clip` (pure: arrays
in, frames + keypoints out) -> `generate` (writes files). Every clip draws its randomness from
its own `SeedSequence`, so the result does not depend on the order or the number of workers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from mg_ray import paths
from mg_ray.data import video_io
from mg_ray.data.layouts import COCO17

# ---------------------------------------------------------------------------------------------
# Classes (data)


@dataclass(frozen=True)
class Gesture:
    """One class. target: where the acting hand goes; manner: what it does there (seen in RGB);
    hands: "one" (either hand, chosen per clip) or "both"; taps: number of separate contacts."""

    name: str
    target: str  # face | head | neck | chest | arm | lap
    manner: str  # touch | rub | hold
    hands: str = "one"
    taps: int = 1


GESTURES: tuple[Gesture, ...] = (
    Gesture("touch face", "face", "touch"),
    Gesture("rub face", "face", "rub"),
    Gesture("touch head", "head", "touch"),
    Gesture("touch neck", "neck", "touch"),
    Gesture("touch chest", "chest", "touch"),
    Gesture("rub chest", "chest", "rub"),
    Gesture("scratch arm", "arm", "rub"),
    Gesture("play things", "lap", "hold", hands="both"),
    Gesture("rub hands", "lap", "rub", hands="both"),
    Gesture("tap face twice", "face", "touch", taps=2),
)

# ---------------------------------------------------------------------------------------------
# Settings


@dataclass
class SynthConfig:
    """Generator settings; all of them are recorded in dataset.json under "generator"."""

    seed: int = 0
    subjects: int = 12  # split 2/3 train, 1/6 val, 1/6 test (at least one subject each)
    clips_per_class: int = 5  # per subject
    frames: int = 48
    width: int = 160
    height: int = 120
    fps: int = 25
    crf: int = 18
    gop: int = 12
    workers: int = 2

    def validate(self) -> None:
        def need(ok: bool, key: str, expected: str, got: object) -> None:
            if not ok:
                raise ValueError(f"synth {key}: expected {expected}, got {got!r}")

        need(
            self.subjects >= 3,
            "subjects",
            "an integer >= 3 (train, val and test need one each)",
            self.subjects,
        )
        need(self.clips_per_class >= 1, "clips_per_class", "an integer >= 1", self.clips_per_class)
        need(16 <= self.frames <= 1000, "frames", "an integer in [16, 1000]", self.frames)
        for key in ("width", "height"):
            value = getattr(self, key)
            need(
                64 <= value <= 1920 and value % 2 == 0, key, "an even integer in [64, 1920]", value
            )
        need(
            self.height <= self.width <= 2 * self.height,
            "width",
            "between height and 2 x height",
            self.width,
        )
        need(1 <= self.fps <= 120, "fps", "an integer in [1, 120]", self.fps)
        need(0 <= self.crf <= 51, "crf", "an integer in [0, 51]", self.crf)
        need(1 <= self.gop <= 300, "gop", "an integer in [1, 300]", self.gop)
        need(1 <= self.workers <= 64, "workers", "an integer in [1, 64]", self.workers)


@dataclass(frozen=True)
class ClipPlan:
    frame_dir: str
    subject: int
    label: int
    repeat: int
    split: str


def split_subjects(num_subjects: int, seed: int) -> dict[str, list[int]]:
    """Disjoint cross-subject split: 1/6 val, 1/6 test (at least one each), the rest train."""
    order = np.random.default_rng(np.random.SeedSequence([seed, 0x5911])).permutation(num_subjects)
    held_out = max(1, round(num_subjects / 6))
    return {
        "train": sorted(int(s) for s in order[2 * held_out :]),
        "val": sorted(int(s) for s in order[:held_out]),
        "test": sorted(int(s) for s in order[held_out : 2 * held_out]),
    }


def subject_name(subject: int) -> str:
    return f"s{subject:02d}"


def plan_clips(cfg: SynthConfig) -> list[ClipPlan]:
    """Every clip of the dataset, named `<subject>_<nnn>` so the name does not give the label."""
    split_of = {
        s: name
        for name, subjects in split_subjects(cfg.subjects, cfg.seed).items()
        for s in subjects
    }
    plans = []
    for subject in range(cfg.subjects):
        pairs = [(label, r) for label in range(len(GESTURES)) for r in range(cfg.clips_per_class)]
        order = np.random.default_rng(
            np.random.SeedSequence([cfg.seed, subject, 0x0D3])
        ).permutation(len(pairs))
        for index, k in enumerate(order):
            label, repeat = pairs[k]
            name = f"{subject_name(subject)}_{index:03d}"
            plans.append(ClipPlan(name, subject, label, repeat, split_of[subject]))
    return plans


# ---------------------------------------------------------------------------------------------
# Per-subject look


@dataclass(frozen=True)
class Look:
    """How one subject looks and moves; lengths in pixels of the output frame."""

    unit: float  # pixels per body unit (frame height / 120 x body size)
    centre_x: float
    shoulder_y: float
    skin: np.ndarray  # float32 [3] in 0..255
    shirt: np.ndarray
    hair: np.ndarray
    background: np.ndarray  # float32 [H, W, 3]: wall, panels and chair, static
    speed: float
    right_handed: float  # probability that a one-hand gesture uses the right hand


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6) % 6
    f = h * 6 - math.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return np.array(rgb, np.float32) * 255


SKIN_TONES = np.array(
    [
        [241, 194, 160],
        [224, 172, 125],
        [198, 134, 95],
        [160, 105, 70],
        [120, 78, 52],
        [250, 212, 185],
    ],
    np.float32,
)


def make_look(seed: int, subject: int, width: int, height: int) -> Look:
    rng = np.random.default_rng(np.random.SeedSequence([seed, subject, 0x100C]))
    unit = height / 120 * rng.uniform(0.85, 1.1)
    skin = SKIN_TONES[rng.integers(len(SKIN_TONES))] * rng.uniform(0.93, 1.05, 3)
    # Muted shirts and walls keep "vivid colour" meaning "held object" (the RGB-only cue).
    wall_v = rng.uniform(0.35, 0.85)
    shirt_v = wall_v + rng.choice([-1, 1]) * rng.uniform(0.25, 0.4)
    shirt_v = float(np.clip(shirt_v, 0.12, 0.95))
    shirt = _hsv(rng.uniform(), rng.uniform(0.1, 0.4), shirt_v)
    hair = _hsv(rng.uniform(0.02, 0.12), rng.uniform(0.2, 0.6), rng.uniform(0.05, 0.45))
    wall = _hsv(rng.uniform(), rng.uniform(0.05, 0.3), wall_v)

    # Wall with a vertical light gradient, a few dull panels, mild static texture, and a chair back.
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    background = (
        wall[None, None, :] * (1.0 + rng.uniform(-0.15, 0.15) * (ys / height - 0.5))[..., None]
    )
    for _ in range(rng.integers(1, 4)):
        x0, y0 = rng.uniform(0, width), rng.uniform(0, height * 0.6)
        pw, ph = rng.uniform(0.1, 0.35) * width, rng.uniform(0.1, 0.3) * height
        inside = (xs >= x0) & (xs < x0 + pw) & (ys >= y0) & (ys < y0 + ph)
        background[inside] = _hsv(rng.uniform(), rng.uniform(0.05, 0.35), rng.uniform(0.2, 0.9))
    background += (
        rng.normal(0, 4, (height // 4 + 1, width // 4 + 1, 3))
        .repeat(4, 0)
        .repeat(4, 1)[:height, :width]
    )
    centre_x = width / 2 + rng.uniform(-0.07, 0.07) * width
    shoulder_y = height * rng.uniform(0.44, 0.5)
    chair = _hsv(rng.uniform(), rng.uniform(0.1, 0.4), rng.uniform(0.1, 0.4))
    chair_mask = (np.abs(xs - centre_x) < 24 * unit) & (ys > shoulder_y - 10 * unit)
    background[chair_mask] = chair
    return Look(
        unit=unit,
        centre_x=centre_x,
        shoulder_y=shoulder_y,
        skin=skin.astype(np.float32),
        shirt=shirt,
        hair=hair,
        background=np.clip(background, 0, 255).astype(np.float32),
        speed=rng.uniform(0.8, 1.25),
        right_handed=rng.uniform(0.3, 0.7),
    )


# ---------------------------------------------------------------------------------------------
# Motion: body anchors and arm trajectories over time (pixel coordinates, arrays [T, 2])

# Body proportions in body units (1 unit = 1 px at 120 px frame height and body size 1).
SHOULDER_HALF = 17.0
NECK = 20.0  # shoulder line to head centre
HEAD_RX, HEAD_RY = 9.0, 10.5
HIP_DROP, HIP_HALF = 42.0, 12.0
UPPER_ARM, FOREARM = 23.0, 21.0
ARM_R, FOREARM_R, HAND_R = 4.5, 3.8, 3.8


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


def contact_envelope(
    t: np.ndarray, onset: float, reach: float, hold: float, taps: int, gap: float
) -> np.ndarray:
    """0 at rest, 1 at the target; `taps` contacts of `hold` each, `gap` apart (time in [0, 1])."""
    env = np.zeros_like(t)
    start = onset
    for _ in range(taps):
        up = _smoothstep((t - start) / reach)
        down = _smoothstep((t - (start + reach + hold)) / reach)
        env = np.maximum(env, up - down)
        start += 2 * reach + hold + gap
    return env


def elbow_position(
    shoulder: np.ndarray, wrist: np.ndarray, side: float, unit: float
) -> tuple[np.ndarray, np.ndarray]:
    """Two-link inverse kinematics. shoulder, wrist: [T, 2]; side: -1 right arm, +1 left arm
    (image x of the person's left grows). Returns (elbow, reachable wrist), both [T, 2]: a wrist out
    of reach is pulled towards the shoulder so the drawn bones keep their lengths. The elbow takes
    the solution pointing outwards and down, as a seated person's does."""
    upper, fore = UPPER_ARM * unit, FOREARM * unit
    delta = wrist - shoulder
    dist = np.linalg.norm(delta, axis=-1, keepdims=True)
    direction = delta / np.maximum(dist, 1e-6)
    dist = np.clip(dist, abs(upper - fore) + 1e-3, upper + fore - 1e-3)
    wrist = shoulder + direction * dist
    along = (upper**2 - fore**2 + dist**2) / (2 * dist)
    across = np.sqrt(np.maximum(upper**2 - along**2, 0.0))
    perp = np.stack([-direction[:, 1], direction[:, 0]], axis=-1)
    base = shoulder + direction * along
    a, b = base + perp * across, base - perp * across
    preferred = np.array([side * 0.6, 1.0])
    pick_a = ((a - shoulder) @ preferred >= (b - shoulder) @ preferred)[:, None]
    return np.where(pick_a, a, b), wrist


@dataclass
class ClipMotion:
    """Everything drawn and annotated for one clip, as arrays over T frames (pixels)."""

    head: np.ndarray  # [T, 2] head centre
    yaw: np.ndarray  # [T] head turn in [-1, 1]
    shoulders: np.ndarray  # [2, 2] right, left (static)
    hips: np.ndarray  # [2, 2] right, left (static)
    elbows: np.ndarray  # [2, T, 2] right, left
    wrists: np.ndarray  # [2, T, 2]
    rubbing: np.ndarray  # [2, T] 0..1, how strongly each hand shows the rubbing cue
    hold: np.ndarray  # [T] 0..1, how visible the held object is
    rub_phase: np.ndarray  # [T]
    contact: np.ndarray  # [2, T] 0..1, hand at its target (for occlusion of the wrist score)


def clip_motion(gesture: Gesture, look: Look, frames: int, rng: np.random.Generator) -> ClipMotion:
    u = look.unit
    t = np.linspace(0.0, 1.0, frames, dtype=np.float64)
    cx = look.centre_x + rng.uniform(-2, 2) * u
    sy = look.shoulder_y + rng.uniform(-2, 2) * u
    shoulders = np.array([[cx - SHOULDER_HALF * u, sy], [cx + SHOULDER_HALF * u, sy]])
    hips = np.array(
        [[cx - HIP_HALF * u, sy + HIP_DROP * u], [cx + HIP_HALF * u, sy + HIP_DROP * u]]
    )

    # Idle motion: the head sways and turns a little, independently of the gesture.
    sway_f, sway_p = rng.uniform(0.5, 1.5), rng.uniform(0, 2 * np.pi)
    head = np.stack(
        [
            cx + 1.5 * u * np.sin(2 * np.pi * sway_f * t + sway_p),
            sy - NECK * u + 0.7 * u * np.sin(2 * np.pi * 0.8 * t + sway_p),
        ],
        axis=-1,
    )
    yaw = 0.3 * np.sin(2 * np.pi * rng.uniform(0.3, 1.0) * t + rng.uniform(0, 2 * np.pi))

    # Rest: hands on the lap, slightly apart; each rest point drifts a little.
    rest = np.stack(
        [np.array([cx + s * 10 * u, sy + 36 * u]) + rng.normal(0, 1.5 * u, 2) for s in (-1, 1)]
    )
    wrists = np.repeat(rest[:, None, :], frames, axis=1)
    wrists += (
        0.8
        * u
        * np.sin(
            2 * np.pi * rng.uniform(0.2, 0.6) * t[None, :, None] + rng.uniform(0, 6, (2, 1, 2))
        )
    )

    # Timing: onset, reach and hold scaled by the subject's and the clip's speed.
    speed = look.speed * rng.uniform(0.85, 1.15)
    taps = gesture.taps
    reach = (0.09 if taps > 1 else 0.14) / speed
    hold = (0.07 if taps > 1 else rng.uniform(0.3, 0.42)) / speed
    gap = 0.08 / speed
    length = taps * (2 * reach + hold) + (taps - 1) * gap
    onset = rng.uniform(0.05, max(0.06, 0.97 - length))
    envelope = contact_envelope(t, onset, reach, hold, taps, gap)  # [T]

    acting = [0, 1] if gesture.hands == "both" else [0 if rng.uniform() < look.right_handed else 1]
    rubbing = np.zeros((2, frames))
    contact = np.zeros((2, frames))
    rub_phase = 2 * np.pi * t * frames / rng.uniform(5, 7) + rng.uniform(0, 2 * np.pi)
    for hand in acting:
        side = -1.0 if hand == 0 else 1.0  # right hand is at image left
        other = 1 - hand
        target = {
            "face": head + np.array([side * 6.0, 3.0]) * u,
            "head": head + np.array([side * 5.0, -13.0]) * u,
            "neck": np.broadcast_to(np.array([cx + side * 3 * u, sy - 7 * u]), (frames, 2)),
            "chest": np.broadcast_to(np.array([cx - side * 4 * u, sy + 12 * u]), (frames, 2)),
            # middle of the other forearm, which stays at rest in the lap
            "arm": np.broadcast_to(np.array([cx - side * 16 * u, sy + 30 * u]), (frames, 2)),
            "lap": np.broadcast_to(np.array([cx + side * 3.5 * u, sy + 31 * u]), (frames, 2)),
        }[gesture.target] + rng.normal(0, 1.2 * u, 2)
        if gesture.manner in ("rub", "hold"):
            # Rubbing/fiddling moves the wrist by about a pixel: below the keypoint jitter, so the
            # keypoints of "touch" and "rub" look alike and the difference lives in the RGB cue.
            wiggle = np.stack([np.sin(rub_phase), 0.5 * np.cos(rub_phase)], -1) * 1.0 * u
            target = target + wiggle
        wrists[hand] = wrists[hand] + envelope[:, None] * (target - wrists[hand])
        contact[hand] = np.clip((envelope - 0.8) / 0.2, 0, 1)
        if gesture.manner == "rub":
            rubbing[hand] = contact[hand]
        if gesture.target == "arm":  # the scratched forearm lies across the lap
            wrists[other] = np.broadcast_to(
                np.array([cx - side * 6 * u, sy + 36 * u]), (frames, 2)
            ).copy()
    hold_vis = contact.max(0) if gesture.manner == "hold" else np.zeros(frames)

    elbows = np.empty_like(wrists)
    for hand, side in ((0, -1.0), (1, 1.0)):
        shoulder = np.broadcast_to(shoulders[hand], (frames, 2))
        elbows[hand], wrists[hand] = elbow_position(shoulder, wrists[hand], side, u)
    return ClipMotion(
        head, yaw, shoulders, hips, elbows, wrists, rubbing, hold_vis, rub_phase, contact
    )


# ---------------------------------------------------------------------------------------------
# Keypoints: COCO-17 from the motion, plus detector-like noise


def clip_keypoints(
    motion: ClipMotion, look: Look, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Returns keypoint float32 [1, T, 17, 2] and keypoint_score float32 [1, T, 17]."""
    u = look.unit
    frames = motion.head.shape[0]
    kp = np.zeros((frames, COCO17.num_joints, 2))
    head, yaw = motion.head, motion.yaw[:, None]
    kp[:, 0] = head + np.concatenate([yaw * 3 * u, np.full_like(yaw, 2 * u)], 1)  # nose
    for j, s in ((1, 1), (2, -1)):  # left eye at image right
        kp[:, j] = head + np.concatenate([(s * 3.5 + yaw * 3) * u, np.full_like(yaw, -1.5 * u)], 1)
    for j, s in ((3, 1), (4, -1)):
        kp[:, j] = head + np.concatenate([(s * 8.5 + yaw) * u, np.zeros_like(yaw)], 1)
    kp[:, 5], kp[:, 6] = motion.shoulders[1], motion.shoulders[0]
    kp[:, 7], kp[:, 8] = motion.elbows[1], motion.elbows[0]
    kp[:, 9], kp[:, 10] = motion.wrists[1], motion.wrists[0]
    kp[:, 11], kp[:, 12] = motion.hips[1], motion.hips[0]

    score = np.zeros((frames, COCO17.num_joints))
    score[:, :13] = rng.uniform(0.75, 0.97, 13) + rng.normal(0, 0.04, (frames, 13))
    score[:, 11:13] -= 0.3  # hips hidden behind the desk edge: weak detections
    # Knees and ankles are under the desk: never detected (coordinates and score 0).
    kp[:, 0:13] += rng.normal(0, 0.8 * u, (frames, 13, 2))
    # A hand in front of the face is harder to detect.
    score[:, 9] -= 0.35 * motion.contact[1] * (kp[:, 9, 1] < motion.head[:, 1] + 8 * u)
    score[:, 10] -= 0.35 * motion.contact[0] * (kp[:, 10, 1] < motion.head[:, 1] + 8 * u)
    # Occasional score drops over a whole frame, missed joints, and missed frames.
    drops = rng.uniform(size=frames) < 0.04
    score[drops] *= rng.uniform(0.2, 0.5, (int(drops.sum()), 1))
    missed = rng.uniform(size=(frames, COCO17.num_joints)) < 0.02
    missed[rng.uniform(size=frames) < 0.01] = True
    score = np.clip(score, 0.0, 1.0)
    score[missed] = 0.0
    kp[score == 0.0] = 0.0
    return kp[None].astype(np.float32), score[None].astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Drawing: soft-edged shapes blended into a float32 image [H, W, 3] in place


def _patch(img: np.ndarray, x0: float, y0: float, x1: float, y1: float):
    h, w = img.shape[:2]
    xa, ya = max(math.floor(x0), 0), max(math.floor(y0), 0)
    xb, yb = min(math.ceil(x1) + 1, w), min(math.ceil(y1) + 1, h)
    if xa >= xb or ya >= yb:
        return None
    ys = np.arange(ya, yb, dtype=np.float32)[:, None]
    xs = np.arange(xa, xb, dtype=np.float32)[None, :]
    return (slice(ya, yb), slice(xa, xb)), xs, ys


def _blend(img: np.ndarray, where, coverage: np.ndarray, colour: np.ndarray) -> None:
    region = img[where]
    region += coverage[..., None] * (colour - region)


def draw_capsule(img, p, q, radius, colour, alpha=1.0) -> None:
    """Segment p-q thickened to `radius` (limbs, pens); p == q gives a disc."""
    (px, py), (qx, qy) = p, q
    got = _patch(
        img,
        min(px, qx) - radius - 1,
        min(py, qy) - radius - 1,
        max(px, qx) + radius + 1,
        max(py, qy) + radius + 1,
    )
    if got is None:
        return
    where, xs, ys = got
    dx, dy = qx - px, qy - py
    length2 = dx * dx + dy * dy
    s = np.clip(((xs - px) * dx + (ys - py) * dy) / length2, 0, 1) if length2 > 1e-9 else 0.0
    dist = np.hypot(xs - (px + s * dx), ys - (py + s * dy))
    _blend(img, where, alpha * np.clip(radius - dist + 0.5, 0, 1), colour)


def draw_ellipse(img, centre, rx, ry, colour, alpha=1.0) -> None:
    cx, cy = centre
    got = _patch(img, cx - rx - 1, cy - ry - 1, cx + rx + 1, cy + ry + 1)
    if got is None:
        return
    where, xs, ys = got
    rho = np.hypot((xs - cx) / rx, (ys - cy) / ry)
    _blend(img, where, alpha * np.clip((1 - rho) * min(rx, ry) + 0.5, 0, 1), colour)


def draw_quad(img, corners: np.ndarray, colour) -> None:
    """Convex quadrilateral, corners [4, 2] in clockwise order on screen (y down)."""
    got = _patch(img, *corners.min(0), *corners.max(0))
    if got is None:
        return
    where, xs, ys = got
    inside = np.full(np.broadcast(xs, ys).shape, np.inf, np.float32)
    for a, b in zip(corners, np.roll(corners, -1, axis=0)):
        edge = b - a
        normal = np.array([edge[1], -edge[0]]) / max(np.hypot(*edge), 1e-9)  # points inwards
        inside = np.minimum(inside, (xs - a[0]) * -normal[0] + (ys - a[1]) * -normal[1])
    _blend(img, where, np.clip(inside + 0.5, 0, 1), colour)


RUB_TINT = np.array([215.0, 45.0, 70.0], np.float32)
OBJECT_COLOURS = np.array([[255, 215, 0], [0, 170, 255], [20, 230, 90], [255, 40, 210]], np.float32)


def render_frames(motion: ClipMotion, look: Look, rng: np.random.Generator) -> np.ndarray:
    """Draw the figure over the subject's background. Returns uint8 [T, H, W, 3]."""
    u = look.unit
    frames = motion.head.shape[0]
    # Static part: background, torso and neck (drawn once per clip).
    base = look.background * rng.uniform(0.93, 1.07)
    (rs, ls), (rh, lh) = motion.shoulders, motion.hips
    torso = np.array(
        [rs + [-2 * u, -3 * u], ls + [2 * u, -3 * u], lh + [3 * u, 0], rh + [-3 * u, 0]]
    )
    draw_quad(base, torso, look.shirt)
    neck_top = motion.head[0] + [0, 6 * u]
    draw_capsule(base, neck_top, (rs + ls) / 2 - [0, 3 * u], 4.2 * u, look.skin * 0.92)
    object_colour = OBJECT_COLOURS[rng.integers(len(OBJECT_COLOURS))]
    shade = np.array([0.85, 0.85, 0.85], np.float32)

    out = np.empty((frames,) + base.shape, np.uint8)
    for f in range(frames):
        img = base.copy()
        head = motion.head[f]
        draw_ellipse(img, head + [0, -2.5 * u], HEAD_RX * u * 1.08, HEAD_RY * u * 0.9, look.hair)
        draw_ellipse(
            img,
            head + [motion.yaw[f] * 1.5 * u, 1.0 * u],
            HEAD_RX * u * 0.92,
            HEAD_RY * u * 0.88,
            look.skin,
        )
        for s in (-1, 1):
            draw_ellipse(
                img,
                head + [(s * 3.5 + motion.yaw[f] * 3) * u, -1.5 * u],
                1.1 * u,
                1.1 * u,
                look.hair * 0.5,
            )
        # The arm that is further from rest is drawn last so it passes in front.
        order = np.argsort(
            [np.abs(motion.wrists[h, f] - motion.wrists[h, 0]).sum() for h in (0, 1)]
        )
        for hand in order:
            shoulder, elbow, wrist = (
                motion.shoulders[hand],
                motion.elbows[hand, f],
                motion.wrists[hand, f],
            )
            draw_capsule(img, shoulder, elbow, ARM_R * u, look.shirt * shade)
            draw_capsule(img, elbow, wrist, FOREARM_R * u, look.shirt)
            direction = (wrist - elbow) / max(np.hypot(*(wrist - elbow)), 1e-6)
            hand_centre = wrist + direction * 3.0 * u
            rub = motion.rubbing[hand, f]
            if rub > 0:
                # Rubbing: the hand shows smeared (a bar swinging with the rub) and flushed red.
                angle = (
                    math.atan2(direction[1], direction[0])
                    + np.pi / 2
                    + 0.7 * math.sin(motion.rub_phase[f])
                )
                half = 3.2 * u * np.array([math.cos(angle), math.sin(angle)])
                colour = look.skin + rub * (RUB_TINT - look.skin) * 0.9
                draw_capsule(img, hand_centre - half, hand_centre + half, HAND_R * u * 1.25, colour)
            else:
                draw_ellipse(img, hand_centre, HAND_R * u, HAND_R * u, look.skin)
        if motion.hold[f] > 0:
            # A small vivid object (pen, phone) held between the hands and turned while fiddling.
            centre = (motion.wrists[0, f] + motion.wrists[1, f]) / 2 + [0, 2.5 * u]
            angle = 0.4 + 0.5 * math.sin(motion.rub_phase[f] * 0.5)
            half = 6.0 * u * np.array([math.cos(angle), math.sin(angle)])
            draw_capsule(
                img, centre - half, centre + half, 2.4 * u, object_colour, alpha=motion.hold[f]
            )
        np.clip(img, 0, 255, out=img)
        out[f] = img.astype(np.uint8)  # truncation, deterministic across platforms
    return out


# ---------------------------------------------------------------------------------------------
# One clip, pure: settings in, arrays out


def render_clip(
    cfg: SynthConfig, plan: ClipPlan, look: Look | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Returns (frames uint8 [T, H, W, 3], keypoint float32 [1, T, 17, 2], score float32 [1, T, 17])."""
    look = look or make_look(cfg.seed, plan.subject, cfg.width, cfg.height)
    rng = np.random.default_rng(
        np.random.SeedSequence([cfg.seed, plan.subject, plan.label, plan.repeat, 0xC11])
    )
    motion = clip_motion(GESTURES[plan.label], look, cfg.frames, rng)
    keypoint, score = clip_keypoints(motion, look, rng)
    frames = render_frames(motion, look, rng)
    return frames, keypoint, score


def _write_clip(cfg: SynthConfig, plans: list[ClipPlan], videos: Path) -> list[dict]:
    """Render and encode a batch of clips (one subject) in a worker; returns their annotations."""
    look = make_look(cfg.seed, plans[0].subject, cfg.width, cfg.height)
    annotations = []
    for plan in plans:
        frames, keypoint, score = render_clip(cfg, plan, look)
        video_io.write_video(
            videos / f"{plan.frame_dir}.mp4", frames, fps=cfg.fps, crf=cfg.crf, gop=cfg.gop
        )
        annotations.append(
            {
                "frame_dir": plan.frame_dir,
                "label": plan.label,
                "img_shape": (cfg.height, cfg.width),
                "original_shape": (cfg.height, cfg.width),
                "total_frames": cfg.frames,
                "keypoint": keypoint,
                "keypoint_score": score,
                "subject": subject_name(plan.subject),
            }
        )
    return annotations


# ---------------------------------------------------------------------------------------------
# Writing the dataset


def generate(out: Path | None = None, force: bool = False, **settings) -> Path:
    """Write the synthetic dataset to `out` (default: mg_ray.paths.synthetic_dataset()).

    `settings` are `SynthConfig` fields. Refuses an existing non-empty folder unless `force`, and
    even then only replaces a folder that is an mg-ray dataset. Returns the dataset folder.
    """
    cfg = SynthConfig(**settings)
    cfg.validate()
    out = Path(out).expanduser() if out is not None else paths.synthetic_dataset()
    plans = plan_clips(cfg)
    by_subject = [[p for p in plans if p.subject == s] for s in range(cfg.subjects)]
    with video_io.staged_output(out, force) as stage:
        videos = stage / video_io.VIDEOS
        videos.mkdir()
        if cfg.workers > 1:
            with ProcessPoolExecutor(max_workers=min(cfg.workers, cfg.subjects)) as pool:
                results = list(
                    pool.map(_write_clip, [cfg] * cfg.subjects, by_subject, [videos] * cfg.subjects)
                )
        else:
            results = [_write_clip(cfg, group, videos) for group in by_subject]
        annotations = [a for group in results for a in group]
        split = {
            name: [p.frame_dir for p in plans if p.split == name]
            for name in ("train", "val", "test")
        }
        video_io.write_annotations(stage, split, annotations)
        video_io.write_classes(stage, [g.name for g in GESTURES])
        video_io.write_metadata(
            stage,
            name="mg-ray-synth",
            layout=COCO17.name,
            num_classes=len(GESTURES),
            # `workers` changes nothing in the output, so it is not part of the recipe
            generator={
                "module": __name__,
                **{k: v for k, v in asdict(cfg).items() if k != "workers"},
            },
            subjects={
                name: [subject_name(s) for s in subs]
                for name, subs in split_subjects(cfg.subjects, cfg.seed).items()
            },
        )
    return out.absolute()


# ---------------------------------------------------------------------------------------------
# Command line


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected WIDTHxHEIGHT such as 160x120, got {text!r}"
        ) from None
    return w, h


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = SynthConfig()
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"dataset folder (default: {paths.synthetic_dataset()})",
    )
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument(
        "--subjects", type=int, default=d.subjects, help="number of subjects (>= 3)"
    )
    parser.add_argument(
        "--clips-per-class", type=int, default=d.clips_per_class, help="per subject"
    )
    parser.add_argument("--frames", type=int, default=d.frames, help="frames per clip")
    parser.add_argument(
        "--size", type=_size, default=(d.width, d.height), help="WIDTHxHEIGHT, even numbers"
    )
    parser.add_argument(
        "--workers", type=int, default=min(d.workers, os.cpu_count() or 1), help="processes"
    )
    parser.add_argument(
        "--force", action="store_true", help="replace an existing mg-ray dataset at --out"
    )


def run(args: argparse.Namespace) -> int:
    settings = {
        "seed": args.seed,
        "subjects": args.subjects,
        "clips_per_class": args.clips_per_class,
        "frames": args.frames,
        "width": args.size[0],
        "height": args.size[1],
        "workers": args.workers,
    }
    start = time.perf_counter()
    try:
        out = generate(args.out, force=args.force, **settings)
    except (ValueError, video_io.DatasetWriteError) as err:
        print(f"mg-ray synth: error: {err}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    meta = json.loads((out / video_io.METADATA).read_text())
    cfg = SynthConfig(**{k: v for k, v in meta["generator"].items() if k != "module"}, workers=1)
    plans = plan_clips(cfg)
    counts = {name: sum(p.split == name for p in plans) for name in ("train", "val", "test")}
    print(f"synthetic dataset written to {out}")
    print(f"  classes ({len(GESTURES)}): {', '.join(g.name for g in GESTURES)}")
    print(
        "  clips: "
        + ", ".join(
            f"{name} {n} ({len(meta['subjects'][name])} subjects)" for name, n in counts.items()
        )
    )
    print(
        f"  {cfg.frames} frames per clip at {cfg.width}x{cfg.height}, {cfg.fps} fps, seed {cfg.seed}"
    )
    print(f"  fingerprint {meta['fingerprint'][:16]}, generated in {seconds:.1f} s")
    return 0
