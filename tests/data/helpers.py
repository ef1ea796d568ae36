"""Test helpers for the reader side: a slow loop-by-loop heatmap reference (the peer's
GeneratePoseTarget, one person, frame and joint at a time) and a minimal dataset writer
(tiny H.264 clips via PyAV + annotations.pkl) so these tests do not depend on the generator."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np

EPS = 1e-4


# --------------------------------------------------------------------------------------------
# slow reference heatmaps


def ref_point(arr: np.ndarray, mx: float, my: float, value: float, sigma: float) -> None:
    """Draw one joint into arr [H, W] in place, exactly as the peer does."""
    h, w = arr.shape
    if value < EPS:
        return
    st_x = max(int(mx - 3 * sigma), 0)
    ed_x = min(int(mx + 3 * sigma) + 1, w)
    st_y = max(int(my - 3 * sigma), 0)
    ed_y = min(int(my + 3 * sigma) + 1, h)
    x = np.arange(st_x, ed_x, 1, np.float32)
    y = np.arange(st_y, ed_y, 1, np.float32)
    if not (len(x) and len(y)):
        return
    y = y[:, None]
    patch = np.exp(-((x - mx) ** 2 + (y - my) ** 2) / 2 / sigma**2) * value
    arr[st_y:ed_y, st_x:ed_x] = np.maximum(arr[st_y:ed_y, st_x:ed_x], patch)


def ref_limb(
    arr: np.ndarray, a: np.ndarray, b: np.ndarray, sa: float, sb: float, sigma: float
) -> None:
    h, w = arr.shape
    value = min(sa, sb)
    if value < EPS:
        return
    min_x = max(int(min(a[0], b[0]) - 3 * sigma), 0)
    max_x = min(int(max(a[0], b[0]) + 3 * sigma) + 1, w)
    min_y = max(int(min(a[1], b[1]) - 3 * sigma), 0)
    max_y = min(int(max(a[1], b[1]) + 3 * sigma) + 1, h)
    x = np.arange(min_x, max_x, 1, np.float32)
    y = np.arange(min_y, max_y, 1, np.float32)
    if not (len(x) and len(y)):
        return
    d2_ab = float((a[0] - b[0]) ** 2 + (a[1] - b[1]) ** 2)
    if d2_ab < 1:  # mmaction2's GeneratePoseTarget: a point at the start, with the start's score
        ref_point(arr, a[0], a[1], sa, sigma)
        return
    y = y[:, None]
    d2_a = (x - a[0]) ** 2 + (y - a[1]) ** 2
    d2_b = (x - b[0]) ** 2 + (y - b[1]) ** 2
    coeff = (d2_a - d2_b + d2_ab) / 2.0 / d2_ab
    px = x - (a[0] + coeff * (b[0] - a[0]))
    py = y - (a[1] + coeff * (b[1] - a[1]))
    d2_line = px**2 + py**2
    d2 = np.where(coeff <= 0, d2_a, np.where(coeff >= 1, d2_b, d2_line))
    patch = np.exp(-d2 / 2.0 / sigma**2) * value
    arr[min_y:max_y, min_x:max_x] = np.maximum(arr[min_y:max_y, min_x:max_x], patch)


def ref_heatmaps(keypoint, score, size, sigma, limbs=None) -> np.ndarray:
    """[C, T, H, W] by loops over frames, persons and joints/limbs."""
    m, t, v, _ = keypoint.shape
    c = v if limbs is None else len(limbs)
    out = np.zeros((c, t, *size), np.float32)
    for ti in range(t):
        for mi in range(m):
            if limbs is None:
                for j in range(v):
                    ref_point(
                        out[j, ti],
                        keypoint[mi, ti, j, 0],
                        keypoint[mi, ti, j, 1],
                        score[mi, ti, j],
                        sigma,
                    )
            else:
                for li, (ja, jb) in enumerate(limbs):
                    ref_limb(
                        out[li, ti],
                        keypoint[mi, ti, ja],
                        keypoint[mi, ti, jb],
                        score[mi, ti, ja],
                        score[mi, ti, jb],
                        sigma,
                    )
    return out


# --------------------------------------------------------------------------------------------
# a minimal dataset writer


def write_video(path: Path, frames: np.ndarray, fps: int = 25, gop: int = 8) -> None:
    """frames uint8 [T, H, W, 3] -> H.264 mp4 (even H and W)."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.gop_size = gop
        stream.options = {"preset": "ultrafast"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def person_keypoints(t: int, center=(48.0, 40.0), scale=12.0, rng=None) -> np.ndarray:
    """A plausible COCO-17 upper-body-ish figure, float32 [T, 17, 2], slowly swaying."""
    base = np.array(
        [
            [0, -2],
            [-0.3, -2.2],
            [0.3, -2.2],
            [-0.6, -2],
            [0.6, -2],
            [-1, -1],
            [1, -1],
            [-1.3, 0],
            [1.3, 0],
            [-1, 0.8],
            [1, 0.8],
            [-0.7, 1.2],
            [0.7, 1.2],
            [-0.7, 2],
            [0.7, 2],
            [-0.7, 2.6],
            [0.7, 2.6],
        ],
        np.float32,
    )
    sway = np.sin(np.linspace(0, 2 * np.pi, t, dtype=np.float32))[:, None, None] * np.array(
        [1.0, 0.0], np.float32
    )
    kp = center + scale * base[None] + sway
    if rng is not None:
        kp = kp + rng.normal(0, 0.3, kp.shape)
    return kp.astype(np.float32)


def make_frames(t: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """A moving pattern, uint8 [T, H, W, 3]."""
    y, x = np.mgrid[0:h, 0:w]
    frames = np.empty((t, h, w, 3), np.uint8)
    for i in range(t):
        frames[i, ..., 0] = (x * 3 + i * 4 + seed * 17) % 256
        frames[i, ..., 1] = (y * 3 + i * 2) % 256
        frames[i, ..., 2] = ((x + y) * 2 + seed * 40) % 256
    return frames


def make_entry(
    frame_dir: str, label: int, t: int, h: int, w: int, persons: int = 1, seed: int = 0
) -> dict:
    rng = np.random.default_rng(seed)
    kp = np.stack(
        [
            person_keypoints(t, center=(w / 2 + 10 * p, h / 2), scale=h / 8, rng=rng)
            for p in range(persons)
        ]
    )
    score = rng.uniform(0.5, 1.0, kp.shape[:3]).astype(np.float32)
    return {
        "frame_dir": frame_dir,
        "label": label,
        "img_shape": (h, w),
        "original_shape": (h, w),
        "total_frames": t,
        "keypoint": kp,
        "keypoint_score": score,
        "subject": f"s{seed % 3}",
    }


def write_dataset(
    root: Path,
    num_clips: int = 6,
    num_classes: int = 3,
    t: int = 20,
    h: int = 64,
    w: int = 96,
    write_videos: bool = True,
    entries: list[dict] | None = None,
    split: dict | None = None,
) -> Path:
    """A tiny dataset folder in the agreed format; returns root."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if entries is None:
        entries = [
            make_entry(f"clip{i:03d}", i % num_classes, t, h, w, persons=1 + (i % 2), seed=i)
            for i in range(num_clips)
        ]
    names = [e["frame_dir"] for e in entries]
    if split is None:
        split = {
            "train": names[: max(1, len(names) - 2)],
            "val": names[-2:-1] or names[:1],
            "test": names[-1:],
        }
    with open(root / "annotations.pkl", "wb") as f:
        pickle.dump({"split": split, "annotations": entries}, f)
    (root / "classes.txt").write_text("".join(f"class {i}\n" for i in range(num_classes)))
    (root / "dataset.json").write_text(json.dumps({"layout": "coco17", "fingerprint": "test"}))
    if write_videos:
        for i, e in enumerate(entries):
            eh, ew = e["img_shape"]
            write_video(
                root / "videos" / f"{e['frame_dir']}.mp4",
                make_frames(e["total_frames"], eh, ew, seed=i),
            )
    return root
