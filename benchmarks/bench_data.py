"""Data pipeline benchmark: heatmaps (vectorised vs loop reference) and loader throughput.

    python benchmarks/bench_data.py [--clips 2] [--samples 40]

Prints, in one run:
- heatmap time per clip (32 frames, 17 COCO joints, 56 x 56; joints and limbs) for
  `mg_ray.data.heatmaps` and for a loop-by-loop reference (the peer's per-person, per-frame,
  per-joint numpy loop of tests/data/helpers.py), with the speed-up;
- loader throughput in paper-size samples/s for one worker (rgb 8 x 224^2, pose 32 x 56^2,
  train mode) on raw 1280x720 H.264 clips (GOP 250) and on prepared 456x256 clips (GOP 8),
  both written here with PyAV into a temporary folder; the frame stores `mg-ray prepare --store
  jpeg` and `--store uint8` make of the raw clips (456x256 frames, the prepared clips' size),
  with their size on disk per frame and their rate against the prepared clips'; and pose-only
  items (a pose-only model's dataset, `rgb=False`), which decode no video.
Targets: heatmaps >= 20x the reference; >= 30 samples/s per worker on prepared clips (issue 2);
the frame store >= 4x the prepared clips (issue 28).
"""

from __future__ import annotations

import argparse
import pickle
import sys
import tempfile
import time
import timeit
from pathlib import Path

import numpy as np

# The loop-by-loop reference the heatmap tests compare against (the peer's per-person,
# per-frame, per-joint numpy loop): one copy, in the tests.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.data.helpers import ref_heatmaps

# ---- synthetic clips ------------------------------------------------------------------------

BASE = np.array(
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


def person(t, cx, cy, scale, rng):
    sway = np.sin(np.linspace(0, 4 * np.pi, t, dtype=np.float32))[:, None, None] * np.array(
        [scale * 0.3, 0], np.float32
    )
    kp = (
        np.array([cx, cy], np.float32)
        + scale * BASE[None]
        + sway
        + rng.normal(0, scale * 0.02, (t, 17, 2))
    )
    return kp[None].astype(np.float32)


def write_clip(path, t, h, w, gop, seed):
    import av

    y, x = np.mgrid[0:h, 0:w]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.height, stream.width, stream.pix_fmt = h, w, "yuv420p"
        stream.codec_context.gop_size = gop
        stream.options = {"preset": "ultrafast"}
        for i in range(t):
            frame = np.empty((h, w, 3), np.uint8)
            frame[..., 0] = (x * 256 // w + i * 3 + seed * 40) % 256
            frame[..., 1] = (y * 256 // h + i * 2) % 256
            frame[..., 2] = ((x // 32 + y // 32 + i // 5) % 2) * 200
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_bench_dataset(root: Path, clips: int, frames: int, video_hw, gop):
    rng = np.random.default_rng(0)
    (root / "videos").mkdir(parents=True)
    entries = []
    for i in range(clips):
        kp = person(frames, 640 + 40 * i, 380, 110, rng)  # in the raw 1280x720 frame
        entries.append(
            {
                "frame_dir": f"c{i}",
                "label": 0,
                "img_shape": (720, 1280),
                "original_shape": (720, 1280),
                "total_frames": frames,
                "keypoint": kp,
                "keypoint_score": rng.uniform(0.5, 1, kp.shape[:3]).astype(np.float32),
            }
        )
        write_clip(root / "videos" / f"c{i}.mp4", frames, *video_hw, gop, seed=i)
    names = [e["frame_dir"] for e in entries]
    with open(root / "annotations.pkl", "wb") as f:
        pickle.dump(
            {"split": {"train": names, "val": names, "test": names}, "annotations": entries}, f
        )
    (root / "classes.txt").write_text("a\nb\n")
    return root


def loader_rate(root: Path, samples: int, rgb: bool = True) -> float:
    import torch

    from mg_ray.data import DataConfig, build_dataset

    ds = build_dataset(DataConfig(root=root), "train", "train", rgb=rgb)  # paper sizes
    torch.manual_seed(0)
    ds[0]  # warm-up (imports, first reader)
    start = time.perf_counter()
    for k in range(samples):
        item = ds[k % len(ds)]
    elapsed = time.perf_counter() - start
    assert item["pose"].shape == (17, 32, 56, 56) and (
        not rgb or item["rgb"].shape == (3, 8, 224, 224)
    )
    return samples / elapsed


def interleaved(fast, ref, rounds: int = 15) -> tuple[float, float]:
    """Seconds per call of `fast` and `ref`: the best of `rounds` short timings of each, taken
    alternately, so a burst of load on this shared machine hits both sides alike."""
    fast_times, ref_times = [], []
    for _ in range(rounds):
        fast_times.append(timeit.timeit(fast, number=20) / 20)
        ref_times.append(timeit.timeit(ref, number=2) / 2)
    return min(fast_times), min(ref_times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clips", type=int, default=2, help="clips per video kind")
    parser.add_argument("--samples", type=int, default=40, help="samples timed per video kind")
    parser.add_argument("--frames", type=int, default=150, help="frames per clip")
    args = parser.parse_args()

    import torch

    from mg_ray.data.heatmaps import pose_heatmaps
    from mg_ray.data.layouts import COCO17
    from mg_ray.data.prepare import prepare

    torch.set_num_threads(1)  # per-worker figures: one core per loader worker
    rng = np.random.default_rng(0)
    kp = person(
        32, 28, 28, 8, rng
    )  # a person filling the 56 x 56 heatmap, as after the compact crop
    score = rng.uniform(0.3, 1, kp.shape[:3]).astype(np.float32)
    print("heatmaps per clip (32 frames, 17 COCO joints, 56x56, sigma 0.7, 1 person, 1 thread)")
    print(
        f"{'kind':8s} {'vectorised ms':>14s} {'loop ref ms':>12s} {'speed-up':>9s} {'max |diff|':>11s}"
    )
    for name, limbs in (("joints", None), ("limbs", COCO17.limbs)):
        fast, ref = interleaved(
            lambda limbs=limbs: pose_heatmaps(kp, score, (56, 56), 0.7, limbs),
            lambda limbs=limbs: ref_heatmaps(kp, score, (56, 56), 0.7, limbs),
        )
        diff = np.abs(
            pose_heatmaps(kp, score, (56, 56), 0.7, limbs)
            - ref_heatmaps(kp, score, (56, 56), 0.7, limbs)
        ).max()
        print(f"{name:8s} {fast * 1e3:14.3f} {ref * 1e3:12.2f} {ref / fast:8.1f}x {diff:11.1e}")

    print(
        f"\nloader throughput, paper-size train samples (rgb 8x224x224, pose 32x56x56), 1 worker, "
        f"{args.clips} clips x {args.frames} frames"
    )
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        raw = write_bench_dataset(tmp / "raw", args.clips, args.frames, (720, 1280), gop=250)
        prepared = write_bench_dataset(tmp / "prepared", args.clips, args.frames, (256, 456), gop=8)
        stores = {
            store: prepare(raw, tmp / store, short_side=256, store=store, log=lambda *_: None)
            for store in ("jpeg", "uint8")
        }
        print(f"(clips and frame stores written in {time.perf_counter() - t0:.1f} s)")
        frames = args.clips * args.frames
        rates = {}
        for name, root, rgb in (
            ("raw 1280x720 gop 250", raw, True),
            ("prepared 456x256 gop 8", prepared, True),
            ("frame store, JPEG q90", stores["jpeg"], True),
            ("frame store, uint8", stores["uint8"], True),
            ("pose only (no video)", raw, False),
        ):
            rates[name] = rate = loader_rate(root, args.samples, rgb)
            folder = root / ("frames" if root in stores.values() else "videos")
            size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / frames
            print(
                f"{name:24s} {rate:7.1f} samples/s  ({1e3 / rate:6.1f} ms/sample)"
                + (f"  {size / 1024:7.1f} KiB per frame on disk" if rgb else "")
            )
        base = rates["prepared 456x256 gop 8"]
        for name in ("frame store, JPEG q90", "frame store, uint8"):
            print(f"{name} / prepared clips: {rates[name] / base:.1f}x")


if __name__ == "__main__":
    main()
