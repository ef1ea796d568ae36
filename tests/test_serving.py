"""The pyfunc is the whole classifier: raw clips (bytes, paths or arrays) in, classes out, through
the training's own test pipeline; bad rows are one-line errors naming the clip and the field."""

from __future__ import annotations

import io
import json
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException

from mg_ray.config import to_dict
from mg_ray.data import build_dataset, load_index
from mg_ray.data.transforms import network_input
from mg_ray.model_file import MODEL_FILE, build_from_spec, model_spec, save_model_file
from mg_ray.models import fuse_probabilities
from mg_ray.tracking.models import save_pyfunc
from mg_ray.train.config import load_config

# off the small preset's defaults, so a setting the pipeline dropped would change the answer
DATA = {
    "rgb_frames": 4,
    "pose_frames": 8,
    "test_clips": 2,
    "crop_padding": 0.5,
    "sigma": 1.2,
    "heatmap": "limbs",
}


def fused_model_file(folder: Path, root: Path, modality: str = "rgbpose") -> tuple[Path, object]:
    """An untrained small fused model's file, with the data settings training would save."""
    cfg = load_config(
        "small",
        {"data.root": str(root), "model.modality": modality}
        | {f"data.{k}": v for k, v in DATA.items()},
    )
    layout = load_index(root).layout
    spec = model_spec(cfg.model, cfg.data, 10, cfg.data.pose_channels(layout))
    torch.manual_seed(0)
    model = build_from_spec(spec)
    path = save_model_file(
        folder / MODEL_FILE,
        spec=spec,
        model_state=model.state_dict(),
        criterion_state={},
        class_names=[f"class{k}" for k in range(10)],
        data={**to_dict(cfg.data), "layout": layout.name},
        metrics={"val_top1": 0.1, "epoch": 0},
    )
    return path, cfg


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_dataset):
    folder = tmp_path_factory.mktemp("served")
    model_file, cfg = fused_model_file(folder, tiny_dataset)
    save_pyfunc(model_file, folder / "model")
    return mlflow.pyfunc.load_model(str(folder / "model")), model_file, cfg


def skeleton_json(ann) -> bytes:
    return json.dumps(
        {
            "keypoint": ann.keypoint.tolist(),
            "keypoint_score": ann.keypoint_score.tolist(),
            "img_shape": list(ann.img_shape),
        }
    ).encode()


def skeleton_npz(ann) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, keypoint=ann.keypoint, keypoint_score=ann.keypoint_score)
    return buffer.getvalue()


def test_bytes_paths_and_arrays_classify_as_the_evaluation_loop_does(served, tiny_dataset):
    model, model_file, cfg = served
    index = load_index(tiny_dataset)
    val = build_dataset(cfg.data, "val", "test")  # the loop's evaluation: 2 clips per video
    net = build_from_spec(torch.load(model_file, weights_only=True)["spec"])
    net.load_state_dict(torch.load(model_file, weights_only=True)["model"])
    net.eval()
    for i in (0, 3):
        ann = index.split("val")[i]
        video = index.video_path(ann.frame_dir)
        item = val[i]
        with torch.no_grad():
            rgb, pose = network_input(item["rgb"]), network_input(item["pose"])
            expected = fuse_probabilities(net(rgb, pose)).mean(0).numpy()
        rows = pd.DataFrame(
            {
                "video": [video.read_bytes(), str(video), f"file://{video}"],
                "skeleton": [
                    skeleton_json(ann),
                    skeleton_npz(ann),
                    {"keypoint": ann.keypoint, "keypoint_score": ann.keypoint_score},
                ],
            }
        )
        out = model.predict(rows)
        assert list(out.columns) == ["label", "class_name", "top5", "probabilities"]
        for _, row in out.iterrows():
            np.testing.assert_allclose(row["probabilities"], expected, rtol=0, atol=1e-6)
            assert row["label"] == int(expected.argmax()) == row["top5"][0]
            assert row["class_name"] == f"class{row['label']}" and len(row["top5"]) == 5


def test_num_clips_is_a_param_and_the_input_example_classifies(served, tiny_dataset):
    model, _, _ = served
    assert model.metadata.get_params_schema().to_dict()[0]["default"] == 2  # the model's own
    ann = load_index(tiny_dataset).split("val")[0]
    video = str(load_index(tiny_dataset).video_path(ann.frame_dir))
    rows = pd.DataFrame({"video": [video], "skeleton": [skeleton_json(ann)]})
    two, one = model.predict(rows), model.predict(rows, params={"num_clips": 1})
    assert not np.allclose(two["probabilities"][0], one["probabilities"][0])
    example = model.input_example
    assert list(example.columns) == ["video", "skeleton", "clip"]
    assert len(model.predict(example)) == 1


def test_models_logged_before_clip_input_still_take_tensors(served):
    _, model_file, _ = served
    from mg_ray.serving.pyfunc import MicroGestureClassifier

    inner = MicroGestureClassifier().load(model_file)
    channels = torch.load(model_file, weights_only=True)["spec"]["kwargs"]["pose_channels"]
    probs = inner.predict(
        None,
        {
            "rgb": np.zeros((2, 3, 4, 64, 64), np.float32),
            "pose": np.zeros((2, channels, 8, 16, 16)),
        },
    )
    assert probs.shape == (2, 10) and np.allclose(probs.sum(1), 1, atol=1e-5)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"video": b"not a video", "clip": "c1"}, "clip 'c1': video: cannot open video"),
        ({"video": b""}, "row 0: video: empty (0 bytes)"),
        ({"video": "/nowhere/x.mp4"}, "row 0: video: /nowhere/x.mp4: no such file"),
        ({"skeleton": None}, "row 0: skeleton: missing"),
        ({"skeleton": b"\x00\x01"}, "row 0: skeleton: not a skeleton file"),
        ({"skeleton": b'{"keypoint": [[[1, 2]]]}'}, "row 0: skeleton: 1 joints per person"),
        (
            {"skeleton": {"keypoint": np.zeros((1, 0, 17, 2))}},
            "row 0: skeleton: keypoint: an empty clip",
        ),
        ({"skeleton": b'{"keypoint": "x"}'}, "row 0: skeleton: keypoint: expected numbers"),
        # MLflow drops columns its signature lacks: a misspelt `vidoe` leaves the video missing
        ({"video": None, "vidoe": b"x"}, "row 0: video: missing"),
    ],
)
def test_a_bad_row_is_one_line_naming_the_clip_and_the_field(served, tiny_dataset, row, message):
    model, _, _ = served
    index = load_index(tiny_dataset)
    ann = index.split("val")[0]
    good = {"video": str(index.video_path(ann.frame_dir)), "skeleton": skeleton_json(ann)}
    with pytest.raises(MlflowException) as err:
        model.predict(pd.DataFrame([{**good, **row}]))
    assert err.value.error_code == "INVALID_PARAMETER_VALUE"
    assert message in err.value.message and "\n" not in err.value.message, err.value.message


def test_a_pose_only_model_needs_no_video_when_the_skeleton_has_its_frame_size(
    tmp_path, tiny_dataset
):
    model_file, _ = fused_model_file(tmp_path, tiny_dataset, modality="pose")
    save_pyfunc(model_file, tmp_path / "model")
    model = mlflow.pyfunc.load_model(str(tmp_path / "model"))
    ann = load_index(tiny_dataset).split("val")[0]
    out = model.predict(pd.DataFrame({"skeleton": [skeleton_json(ann)]}))
    assert len(out) == 1
    no_size = json.dumps({"keypoint": ann.keypoint.tolist()}).encode()
    with pytest.raises(MlflowException, match="row 0: video: missing"):
        model.predict(pd.DataFrame({"skeleton": [no_size]}))


def test_a_frame_store_clip_classifies_as_its_video(served, tiny_dataset, tmp_path):
    """`mg-ray predict --data` on a dataset `mg-ray prepare --store uint8` wrote: the clip is an
    .npy array of the decoded frames (the same size here), read through the same pipeline."""
    from mg_ray.data.prepare import prepare

    model, _, _ = served
    store = prepare(tiny_dataset, tmp_path / "store", store="uint8", log=lambda *_: None)
    ann = load_index(tiny_dataset).split("val")[0]
    skeleton = {"keypoint": ann.keypoint, "keypoint_score": ann.keypoint_score}
    videos = [str(load_index(root).video_path(ann.frame_dir)) for root in (tiny_dataset, store)]
    assert videos[1].endswith(".npy")
    out = model.predict(pd.DataFrame({"video": videos, "skeleton": [skeleton] * 2}))
    # PyAV's and decord's YUV to RGB conversions differ by a grey level here and there
    np.testing.assert_allclose(out["probabilities"][0], out["probabilities"][1], atol=0.02)
