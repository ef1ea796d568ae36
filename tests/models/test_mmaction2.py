"""Import of mmaction2 checkpoints, checked against mmaction2's own facts.

The checkpoints here are built from shared/peer/ (key names and shapes generated from mmaction2's
source) with random values. The reference forward below reads those mmaction2 keys directly and
follows mmaction2 1.x's RGBPoseConv3D.forward and ResNet3d's Bottleneck3d (style "pytorch":
spatial stride in conv2, inflate "3x1x1" in conv1) with the module settings of REFERENCE.md
section 4; it shares no code with mg-ray's model.
"""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mg_ray.cli import main as cli
from mg_ray.import_mmaction2 import import_checkpoint
from mg_ray.model_file import load_model_file, safe_load
from mg_ray.models import load_two_stream_state, merge_stream_checkpoints, small
from mg_ray.models.mmaction2 import CheckpointImportError

torch.set_num_threads(2)
PEER = Path(__file__).resolve().parents[3] / "shared" / "peer"
K = 5


def peer_shapes(name: str) -> dict[str, list[int]]:
    shapes = {}
    for line in (PEER / name).read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape = line.split("\t")
        shapes[key] = [int(v) for v in shape.strip("[]").split(",") if v.strip()]
    return shapes


def fake_checkpoint(kind: str, classes: int = K, seed: int = 0) -> dict[str, torch.Tensor]:
    """An mmaction2 state dict with the peer file's keys and shapes; BN statistics plausible."""
    g = torch.Generator().manual_seed(seed)
    if kind == "rgbpose":
        shapes = peer_shapes("mmaction2_rgbposeconv3d_keys.txt")
        shapes |= {
            "cls_head.fc_rgb.weight": [classes, 2048],
            "cls_head.fc_rgb.bias": [classes],
            "cls_head.fc_pose.weight": [classes, 512],
            "cls_head.fc_pose.bias": [classes],
        }
    else:
        shapes = peer_shapes("mmaction2_posec3d_slowonly_keys.txt")
        shapes |= {"cls_head.fc_cls.weight": [classes, 512], "cls_head.fc_cls.bias": [classes]}
    state = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(100)
        elif key.endswith("running_var"):
            state[key] = 0.5 + torch.rand(shape, generator=g)
        elif key.endswith("bn.weight"):
            state[key] = 0.5 + 0.5 * torch.rand(shape, generator=g)
        elif key.endswith(("running_mean", "bias")):
            state[key] = 0.1 * torch.randn(shape, generator=g)
        else:  # conv / linear weights, scaled to keep activations O(1) through 50 layers
            fan_in = max(1, torch.Size(shape[1:]).numel())
            state[key] = torch.randn(shape, generator=g) * (1.0 / fan_in) ** 0.5
    return state


# ------------------------------------------------------------------ the reference forward


def bn(x, s, p):
    return F.batch_norm(
        x,
        s[f"{p}.running_mean"],
        s[f"{p}.running_var"],
        s[f"{p}.weight"],
        s[f"{p}.bias"],
        training=False,
        eps=1e-5,
    )


def conv_module(x, s, p, stride=(1, 1, 1), relu=True):
    """mmaction2 ConvModule: conv (no bias, padding k//2 per dim) + BN (+ ReLU)."""
    w = s[f"{p}.conv.weight"]
    x = bn(F.conv3d(x, w, stride=stride, padding=tuple(k // 2 for k in w.shape[2:])), s, f"{p}.bn")
    return F.relu(x) if relu else x


def layer(x, s, p, spatial_stride):
    block = 0
    while f"{p}.{block}.conv1.conv.weight" in s:
        b = f"{p}.{block}"
        stride = (1, spatial_stride, spatial_stride) if block == 0 else (1, 1, 1)
        out = conv_module(x, s, f"{b}.conv1")
        out = conv_module(out, s, f"{b}.conv2", stride=stride)
        out = conv_module(out, s, f"{b}.conv3", relu=False)
        identity = (
            conv_module(x, s, f"{b}.downsample", stride=stride, relu=False)
            if f"{b}.downsample.conv.weight" in s
            else x
        )
        x = F.relu(out + identity)
        block += 1
    return x


def stem(x, s, p, stride):
    x = conv_module(x, s, f"{p}.conv1", stride=(1, stride, stride))
    return F.max_pool3d(x, (1, 3, 3), (1, stride, stride), (0, 1, 1))  # maxpool, pose path too


def lateral_pose_to_rgb(x, s, p, r):  # rgb_path.layerN_lateral: Conv3d (7,1,1) stride (r,1,1)
    return F.conv3d(x, s[f"{p}.conv.weight"], stride=(r, 1, 1), padding=(3, 0, 0))


def lateral_rgb_to_pose(x, s, p, r):  # pose_path.layerN_lateral: DeConvModule, output r*T frames
    out = F.conv_transpose3d(
        x, s[f"{p}.conv.weight"], stride=(r, 1, 1), padding=(3, 0, 0), output_padding=(r - 1, 0, 0)
    )
    return F.relu(bn(out, s, f"{p}.bn"))


def mmaction2_rgbpose(s, rgb, pose, r=4):
    """mmaction2 RGBPoseConv3D.forward in eval mode, on mmaction2's keys."""
    R, P = "backbone.rgb_path", "backbone.pose_path"
    x_rgb, x_pose = stem(rgb, s, R, 2), stem(pose, s, P, 1)
    x_rgb = layer(layer(x_rgb, s, f"{R}.layer1", 1), s, f"{R}.layer2", 2)
    x_pose = layer(x_pose, s, f"{P}.layer1", 2)
    to_rgb, to_pose = (
        lateral_pose_to_rgb(x_pose, s, f"{R}.layer2_lateral", r),
        lateral_rgb_to_pose(x_rgb, s, f"{P}.layer1_lateral", r),
    )
    x_rgb, x_pose = torch.cat((x_rgb, to_rgb), 1), torch.cat((x_pose, to_pose), 1)
    x_rgb, x_pose = layer(x_rgb, s, f"{R}.layer3", 2), layer(x_pose, s, f"{P}.layer2", 2)
    to_rgb, to_pose = (
        lateral_pose_to_rgb(x_pose, s, f"{R}.layer3_lateral", r),
        lateral_rgb_to_pose(x_rgb, s, f"{P}.layer2_lateral", r),
    )
    x_rgb, x_pose = torch.cat((x_rgb, to_rgb), 1), torch.cat((x_pose, to_pose), 1)
    return layer(x_rgb, s, f"{R}.layer4", 2), layer(x_pose, s, f"{P}.layer3", 2)


def mmaction2_posec3d(s, pose):
    x = stem(pose, s, "backbone", 1)
    for n in (1, 2, 3):
        x = layer(x, s, f"backbone.layer{n}", 2)
    return x


def head(s, feature, key):
    return F.linear(feature.mean(dim=(2, 3, 4)), s[f"{key}.weight"], s[f"{key}.bias"])


# ------------------------------------------------------------------ tests


@pytest.fixture(scope="module")
def rgbpose(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mmaction2")
    state = fake_checkpoint("rgbpose")
    source = folder / "rgbpose.pth"
    torch.save({"meta": {"mmengine_version": "0.10.4", "epoch": 30}, "state_dict": state}, source)
    out = folder / "imported.pt"
    summary = import_checkpoint(source, out)
    return state, source, out, summary


def test_rgbpose_import_uses_every_tensor_once_and_computes_mmaction2s_backbone(rgbpose):
    state, _, out, summary = rgbpose
    assert summary == {
        "kind": "RGBPoseConv3D",
        "tensors": len(state),
        "num_classes": K,
        "modality": "rgbpose",
    }
    model, content = load_model_file(out)  # the kind of file the training job writes
    assert (
        content["spec"]["kwargs"]["modality"] == "rgbpose"
        and content["spec"]["kwargs"]["fusion"] is True
    )
    ours = model.state_dict()
    imported = {
        tuple(v.flatten()[:4].tolist()) + (v.numel(),) for v in state.values() if v.numel() > 1
    }
    found = {tuple(v.flatten()[:4].tolist()) + (v.numel(),) for v in ours.values() if v.numel() > 1}
    assert imported <= found  # every mmaction2 tensor is somewhere in the model

    g = torch.Generator().manual_seed(1)
    rgb, pose = (
        torch.randn(1, 3, 8, 64, 64, generator=g),
        torch.rand(1, 17, 32, 16, 16, generator=g),
    )
    with torch.no_grad():
        expected_rgb, expected_pose = mmaction2_rgbpose(state, rgb, pose)
        feats = model.forward_features(rgb, pose)  # fusion on, its gates at their zero init
        logits = model.forward_head(feats)
    assert (
        expected_rgb.abs().mean() > 1e-3 and expected_pose.abs().mean() > 1e-3
    )  # not a vanished signal
    torch.testing.assert_close(feats["rgb"], expected_rgb, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(feats["pose"], expected_pose, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        logits["rgb_logits"], head(state, expected_rgb, "cls_head.fc_rgb"), rtol=1e-4, atol=1e-5
    )
    torch.testing.assert_close(
        logits["pose_logits"], head(state, expected_pose, "cls_head.fc_pose"), rtol=1e-4, atol=1e-5
    )


def test_the_fused_stage_starts_from_an_imported_file_named_as_both_streams(rgbpose, tmp_path):
    from types import SimpleNamespace

    from mg_ray.train.loop import load_stream_init

    _, _, out, _ = rgbpose
    _, content = load_model_file(out)
    target, _ = load_model_file(out)
    with torch.no_grad():
        for p in target.parameters():
            p.add_(1.0)
    both = SimpleNamespace(model=SimpleNamespace(rgb_init=str(out), pose_init=str(out)))
    state = load_stream_init(both, target, merge_stream_checkpoints, None)
    for key, value in content["model"].items():
        assert torch.equal(state[key], value), key
    one = SimpleNamespace(model=SimpleNamespace(rgb_init=str(out), pose_init=None))
    with pytest.raises(ValueError, match="is a two-stream model file; name it as both"):
        load_stream_init(one, target, merge_stream_checkpoints, None)
    # a target without fusion: the file's fusion keys are left over, which is allowed
    from mg_ray.models import paper

    plain = paper(K, fusion=False)
    plain.load_state_dict(load_two_stream_state(content["model"], plain))
    with pytest.raises(ValueError, match=r"unexpected keys \[.*\] and \d+ more"):  # another size
        load_two_stream_state(content["model"], small(K))


def test_posec3d_import_is_a_pose_model_that_initialises_the_pose_stream(tmp_path):
    state = fake_checkpoint("pose", seed=2)
    source, out = tmp_path / "posec3d.pth", tmp_path / "pose.pt"
    torch.save({"state_dict": state}, source)
    assert cli(["import-mmaction2", str(source), "--out", str(out)]) == 0
    model, content = load_model_file(out)
    assert model.modality == "pose" and content["spec"]["kwargs"]["modality"] == "pose"
    pose = torch.rand(2, 17, 32, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = mmaction2_posec3d(state, pose)
        feats = model.forward_features(None, pose)
        logits = model.forward_head(feats)["pose_logits"]
    torch.testing.assert_close(feats["pose"], expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        logits, head(state, expected, "cls_head.fc_cls"), rtol=1e-4, atol=1e-5
    )
    # --pose-init accepts it: the merge into the paper's two-stream model takes every pose tensor
    from mg_ray.models import paper

    fused = paper(K)
    merged = merge_stream_checkpoints({}, safe_load(out)["model"], fused)
    fused.load_state_dict(merged)
    assert torch.equal(
        fused.state_dict()["backbone.pose.stem.0.weight"], state["backbone.conv1.conv.weight"]
    )


def _write(tmp_path, state, name="bad.pth"):
    path = tmp_path / name
    torch.save({"state_dict": state}, path)
    return path


def test_missing_extra_misshaped_and_other_class_count_are_named(tmp_path):
    good = fake_checkpoint("pose", seed=4)
    cases = {
        "missing": (
            {k: v for k, v in good.items() if k != "backbone.layer2.1.conv2.conv.weight"},
            r"lacks tensors for \['backbone.pose.stages.1.1.conv2.weight'\]",
        ),
        "extra": (
            {**good, "backbone.extra.weight": torch.zeros(1)},
            r"no place in the model: \['backbone.extra.weight'\]",
        ),
        "shape": (
            {**good, "backbone.layer1.0.conv2.conv.weight": torch.zeros(32, 32, 3, 3, 3)},
            (
                r"backbone.layer1.0.conv2.conv.weight has shape \[32, 32, 3, 3, 3\], "
                r"backbone.pose.stages.0.0.conv2.weight needs \[32, 32, 1, 3, 3\]"
            ),
        ),
        "not mmaction2": (
            {"encoder.weight": torch.zeros(2)},
            "neither an RGBPoseConv3D checkpoint",
        ),
    }
    for name, (state, message) in cases.items():
        with pytest.raises(CheckpointImportError, match=message):
            import_checkpoint(
                _write(tmp_path, state, f"{name.replace(' ', '_')}.pth"), tmp_path / f"{name}.pt"
            )
        assert not (tmp_path / f"{name}.pt").exists(), name
    source = _write(tmp_path, good, "good.pth")
    with pytest.raises(CheckpointImportError, match="head has 5 classes .*--reinit-head"):
        import_checkpoint(source, tmp_path / "k.pt", num_classes=32)
    summary = import_checkpoint(source, tmp_path / "k.pt", num_classes=32, reinit_head=True)
    assert summary["num_classes"] == 32
    model, _ = load_model_file(tmp_path / "k.pt")
    assert tuple(model.heads["pose"].fc.weight.shape) == (32, 512)
    assert torch.equal(
        model.state_dict()["backbone.pose.stem.0.weight"], good["backbone.conv1.conv.weight"]
    )


class Foreign:  # an object weights_only loading must refuse (mmengine's message hub, say)
    pass


def test_unsafe_pickles_existing_outputs_and_cli_errors(tmp_path, capsys):
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"state_dict": fake_checkpoint("pose"), "message_hub": Foreign()}, unsafe)
    with pytest.raises(CheckpointImportError, match="weights-only load refused it"):
        import_checkpoint(unsafe, tmp_path / "out.pt")
    existing = tmp_path / "existing.pt"
    existing.write_bytes(b"mine")
    assert (
        cli(
            [
                "import-mmaction2",
                str(_write(tmp_path, fake_checkpoint("pose"))),
                "--out",
                str(existing),
            ]
        )
        == 2
    )
    assert "exists; choose a new path" in capsys.readouterr().err
    assert existing.read_bytes() == b"mine"
