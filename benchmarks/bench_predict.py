"""Batch prediction benchmark: one process against Ray Data with 1 and 2 model-holding actors.

    python benchmarks/bench_predict.py [--clips-per-class 5] [--repeats 1]

Writes a synthetic dataset (3 subjects, the test split 10 x clips-per-class clips of 40 frames
at 160x120) and an untrained small fused model (`tests/test_serving.py`'s, data settings off the
defaults, 2 test clips a video) into a temporary folder, then classifies the test split, side by
side in one run:
- `classify` in this process, one clip after another (`mg-ray predict --serial`);
- `batch_classify` on Ray Data over a private local cluster of this machine's CPUs
  (`mg-ray predict --split`) with 1 and 2 actors: actor start (model load) included, the
  cluster's own start not (printed apart; a study's cluster is already up).
Prints clips/s of each, the ratio to the one-process path, for Ray Data also the marginal rate
(the clips beyond a 4-clips-per-actor run over the time beyond it: the rate once the actors
are up, which a real split of thousands of clips approaches), and the largest difference of a
probability between the paths (0 up to float rounding: the same function classifies).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.test_serving import fused_model_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips-per-class", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=1, help="rounds of the three paths")
    args = parser.parse_args()

    import ray

    from mg_ray import predict
    from mg_ray.cluster import init_ray
    from mg_ray.data import synth
    from mg_ray.tracking.models import save_pyfunc

    with tempfile.TemporaryDirectory(prefix="bench-predict-") as folder:
        folder = Path(folder)
        root = synth.generate(
            folder / "data",
            seed=0,
            subjects=3,
            clips_per_class=args.clips_per_class,
            frames=40,
            width=160,
            height=120,
        )
        model_file, _ = fused_model_file(folder, root)
        model_uri = str(folder / "model")
        save_pyfunc(model_file, Path(model_uri))
        tracking_uri = f"sqlite:///{folder / 'mlflow.db'}"
        index, entries = predict.dataset_entries(root, [], "test")
        names = [a.frame_dir for a in entries]
        clips = [
            (index.video_path(a.frame_dir), (a.keypoint, a.keypoint_score, a.img_shape))
            for a in entries
        ]
        print(f"{len(names)} test clips, 2 test clips a video, small fused model, CPU")

        start = time.perf_counter()
        init_ray()
        print(f"local Ray cluster start: {time.perf_counter() - start:.1f} s (not counted)")
        model, inner = predict.load_classifier(model_uri, tracking_uri)
        rates: dict[str, list[float]] = {"one process": [], "Ray Data, 1 actor": []}
        rates["Ray Data, 2 actors"] = []
        marginal: dict[str, list[float]] = {label: [] for label in rates}
        worst = 0.0
        for _ in range(args.repeats):  # the paths interleaved, so drifts of the machine are shared
            start = time.perf_counter()
            serial = predict.classify(model, inner, clips)
            rates["one process"].append(len(clips) / (time.perf_counter() - start))
            for actors in (1, 2):
                label = f"Ray Data, {actors} actor{'s' if actors > 1 else ''}"
                small = 4 * actors  # a run so short that its time is nearly all actor start
                start = time.perf_counter()
                predict.batch_classify(model_uri, tracking_uri, root, names[:small], actors=actors)
                short = time.perf_counter() - start
                start = time.perf_counter()
                batch = predict.batch_classify(model_uri, tracking_uri, root, names, actors=actors)
                whole = time.perf_counter() - start
                rates[label].append(len(clips) / whole)
                marginal[label].append((len(clips) - small) / max(whole - short, 1e-9))
                worst = max(worst, float(np.abs(batch - serial).max()))
        ray.shutdown()
    base = np.median(rates["one process"])
    for label, values in rates.items():
        print(
            f"{label:<20} {np.median(values):6.2f} clips/s (median of {len(values)}; "
            f"min {min(values):.2f}, max {max(values):.2f})  x{np.median(values) / base:.2f}"
            + (f"; marginal {np.median(marginal[label]):.2f} clips/s" if marginal[label] else "")
        )
    print(f"largest |p_batch - p_one_process|: {worst:.2e}")


if __name__ == "__main__":
    main()
