"""MicroGestureNet: shapes, frame-count rules, gradients, the fusion-off baseline, the
checkpoint merge, probability fusion and the paper preset's size."""

import pytest
import torch

from mg_ray.models import (
    MicroGestureNet,
    TwoStreamCriterion,
    build_model,
    check_frame_counts,
    check_input_sizes,
    fuse_probabilities,
    merge_stream_checkpoints,
    paper,
    small,
)

torch.set_num_threads(2)
K = 6


def inputs(n=2, rgb_frames=8, pose_frames=32, rgb_size=64, pose_channels=17, seed=0):
    g = torch.Generator().manual_seed(seed)
    rgb = torch.randn(n, 3, rgb_frames, rgb_size, rgb_size, generator=g)
    pose = torch.rand(n, pose_channels, pose_frames, rgb_size // 4, rgb_size // 4, generator=g)
    return rgb, pose


def count(model, prefix=""):
    return sum(p.numel() for name, p in model.named_parameters() if name.startswith(prefix))


@pytest.mark.parametrize("rgb_frames,pose_frames", [(8, 32), (4, 16), (8, 16), (16, 32), (4, 32), (8, 8)])
def test_small_shapes_for_frame_count_pairs(rgb_frames, pose_frames):
    model = small(K, rgb_frames=rgb_frames, pose_frames=pose_frames)
    out = model(*inputs(rgb_frames=rgb_frames, pose_frames=pose_frames))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "rgb_logits": (2, K), "pose_logits": (2, K), "rgb_embedding": (2, 64), "pose_embedding": (2, 64),
    }
    assert all(torch.isfinite(v).all() for v in out.values())
    torch.testing.assert_close(out["rgb_embedding"].norm(dim=1), torch.ones(2))


def test_features_keep_frame_counts_and_reach_stride_32():
    feats = small(K).forward_features(*inputs())
    assert tuple(feats["rgb"].shape) == (2, 256, 8, 2, 2)
    assert tuple(feats["pose"].shape) == (2, 64, 32, 2, 2)


@pytest.mark.parametrize("rgb_frames,pose_frames", [(8, 12), (32, 8), (0, 32), (8, 0), (3, 8)])
def test_refused_frame_counts_raise_with_the_rule(rgb_frames, pose_frames):
    with pytest.raises(ValueError, match="positive integer multiple of rgb_frames"):
        check_frame_counts(rgb_frames, pose_frames)
    with pytest.raises(ValueError, match="positive integer multiple"):
        small(K, rgb_frames=rgb_frames, pose_frames=pose_frames)


def test_input_size_rule():
    assert check_frame_counts(8, 32) == 4
    for rgb_size, heatmap in [(224, 56), (64, 16), (128, 32)]:
        check_input_sizes(rgb_size, heatmap)
    for rgb_size, heatmap in [(224, 28), (64, 64), (64, 8)]:
        with pytest.raises(ValueError, match="heatmap_size = rgb_size / 4"):
            check_input_sizes(rgb_size, heatmap)
    with pytest.raises(ValueError, match="heatmaps must be 1/4"):
        small(K)(*inputs()[:1], torch.rand(2, 17, 32, 32, 32))  # wrong heatmap size at forward


@pytest.mark.parametrize("modality", ["rgb", "pose"])
def test_single_stream_variants(modality):
    model = small(K, modality=modality)
    rgb, pose = inputs()
    out = model(rgb if modality == "rgb" else None, pose if modality == "pose" else None)
    assert set(out) == {f"{modality}_logits", f"{modality}_embedding"}
    assert not any(("lateral" in n or "fusion" in n or "to_rgb" in n or "to_pose" in n) for n, _ in model.named_parameters())
    torch.testing.assert_close(fuse_probabilities(out), out[f"{modality}_logits"].softmax(-1))


def test_every_parameter_gets_a_gradient_with_fusion_and_refinement():
    model = small(K, zero_init_residual=False).train()
    criterion = TwoStreamCriterion(K, model.embed_dim).train()
    rgb, pose = inputs(n=4)
    labels = torch.tensor([0, 1, 2, 3])
    losses = criterion(model(rgb, pose), labels)
    losses["loss"].backward()
    assert torch.isfinite(losses["loss"])
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_fusion_off_is_the_plain_two_stream_baseline():
    fused, plain = small(K, fusion=True), small(K, fusion=False)
    fused_keys = set(fused.state_dict())
    assert not any("fusion" in k for k in plain.state_dict())
    assert set(plain.state_dict()) == {k for k in fused_keys if not k.startswith("backbone.fusion.")}
    assert count(fused) - count(plain) == count(fused, "backbone.fusion.") > 0
    # same weights, fusion gates forced to zero (A = 0 -> X'' = X): identical outputs
    plain.load_state_dict({k: v for k, v in fused.state_dict().items() if not k.startswith("backbone.fusion.")})
    with torch.no_grad():
        for module in fused.backbone.fusion:
            for layer in (module.rgb_back, module.pose_back):
                layer.weight.zero_()
                layer.bias.zero_()
    fused.eval(), plain.eval()
    rgb, pose = inputs()
    a, b = fused(rgb, pose), plain(rgb, pose)
    for key in a:
        torch.testing.assert_close(a[key], b[key])


def test_fusion_gates_start_at_zero_unless_asked_otherwise():
    gated = small(K).backbone.fusion
    assert all(not layer.weight.any() and not layer.bias.any()
               for module in gated for layer in (module.rgb_back, module.pose_back))
    random = small(K, zero_init_residual=False).backbone.fusion
    assert all(layer.weight.any() for module in random for layer in (module.rgb_back, module.pose_back))


def test_fuse_probabilities_weighted_mean_of_softmaxes():
    g = torch.Generator().manual_seed(0)
    out = {"rgb_logits": torch.randn(3, K, generator=g), "pose_logits": torch.randn(3, K, generator=g)}
    fused = fuse_probabilities(out, (1.0, 3.0))
    torch.testing.assert_close(fused, (out["rgb_logits"].softmax(-1) + 3 * out["pose_logits"].softmax(-1)) / 4)
    torch.testing.assert_close(fused.sum(-1), torch.ones(3))


def _trained_state(model):
    """Non-trivial weights and BN statistics: perturb, then one train-mode forward."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.train()
    rgb, pose = inputs(seed=5)
    model(rgb if model.modality != "pose" else None, pose if model.modality != "rgb" else None)
    return model.state_dict()


@pytest.mark.parametrize("fusion", [True, False])
def test_merge_round_trip(fusion):
    torch.manual_seed(0)
    rgb_state = _trained_state(small(K, modality="rgb"))
    pose_state = _trained_state(small(K, modality="pose"))
    fused = small(K, fusion=fusion)
    init = {k: v.clone() for k, v in fused.state_dict().items()}
    merged = merge_stream_checkpoints({f"module.{k}": v for k, v in rgb_state.items()}, pose_state, fused)
    fused.load_state_dict(merged)  # strict
    state = fused.state_dict()
    widened = 0
    for source in (rgb_state, pose_state):
        for key, value in source.items():
            if value.shape == state[key].shape:
                assert torch.equal(state[key], value), key
            else:  # first block after a lateral point: own channels copied, lateral ones zero
                widened += 1
                c = value.shape[1]
                assert torch.equal(state[key][:, :c], value), key
                assert not state[key][:, c:].any(), key
    assert widened == 8  # conv1 + downsample of 2 RGB and 2 pose stages
    for key in state:
        if key.startswith(("backbone.fusion.", "backbone.pose_to_rgb.", "backbone.rgb_to_pose.")):
            assert torch.equal(state[key], init[key]), key
    # the merged model starts out computing the two single-stream models: the laterals enter
    # through zeroed weights and the fusion's gates start at zero (A = 0, X'' = X)
    rgb_model, pose_model = small(K, modality="rgb"), small(K, modality="pose")
    rgb_model.load_state_dict(rgb_state), pose_model.load_state_dict(pose_state)
    fused.eval(), rgb_model.eval(), pose_model.eval()
    rgb, pose = inputs()
    out = fused(rgb, pose)
    torch.testing.assert_close(out["rgb_logits"], rgb_model(rgb, None)["rgb_logits"])
    torch.testing.assert_close(out["pose_logits"], pose_model(None, pose)["pose_logits"])


def test_merge_reports_missing_unexpected_and_mismatched_keys():
    fused = small(K)
    pose_state = small(K, modality="pose").state_dict()
    with pytest.raises(ValueError, match="rgb: missing keys .*rgb: unexpected keys"):
        merge_stream_checkpoints(pose_state, {}, fused)
    with pytest.raises(ValueError, match="heads.pose.fc.weight has shape"):
        merge_stream_checkpoints({}, small(K + 1, modality="pose").state_dict(), fused)
    assert merge_stream_checkpoints({}, {}, fused).keys() == fused.state_dict().keys()


def test_build_model_dispatches_by_name():
    assert isinstance(build_model("small", K, modality="pose"), MicroGestureNet)
    with pytest.raises(ValueError, match="unknown model preset"):
        build_model("huge", K)


def test_paper_preset_sizes_and_one_training_step():
    model = paper(32)
    fusion = count(model, "backbone.fusion.")
    # REFERENCE.md: RGBPoseConv3D backbone 35.99 M; fusion about 2 M
    assert count(model, "backbone.") - fusion == 35_994_208
    assert fusion == 1_971_840
    assert count(paper(32, fusion=False), "backbone.") == 35_994_208
    criterion = TwoStreamCriterion(32, model.embed_dim)
    rgb, pose = inputs(n=1, rgb_size=224)
    feats = model.forward_features(rgb, pose)
    assert tuple(feats["rgb"].shape) == (1, 2048, 8, 7, 7)
    assert tuple(feats["pose"].shape) == (1, 512, 32, 7, 7)
    out = model.forward_head(feats)
    criterion(out, torch.tensor([3]))["loss"].backward()
    assert all(torch.isfinite(v).all() for v in out.values())
    assert model.backbone.rgb.stem[0].weight.grad is not None
