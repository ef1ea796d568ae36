"""MicroGestureNet: shapes, frame-count rules, gradients, the fusion-off baseline, the
checkpoint merge, probability fusion and the paper preset's size."""

from pathlib import Path

import pytest
import torch

from mg_ray.models import (
    CrossModalFusion,
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
from mg_ray.models.fusion import project_max
from mg_ray.models.net import StreamHead
from mg_ray.models.rgbpose import RGBToPoseLateral, lateral_kernel, pose_to_rgb_lateral

torch.set_num_threads(2)
K = 6


def inputs(n=2, rgb_frames=8, pose_frames=32, rgb_size=64, pose_channels=17, seed=0):
    g = torch.Generator().manual_seed(seed)
    rgb = torch.randn(n, 3, rgb_frames, rgb_size, rgb_size, generator=g)
    pose = torch.rand(n, pose_channels, pose_frames, rgb_size // 4, rgb_size // 4, generator=g)
    return rgb, pose


def count(model, prefix=""):
    return sum(p.numel() for name, p in model.named_parameters() if name.startswith(prefix))


@pytest.mark.parametrize(
    "rgb_frames,pose_frames", [(8, 32), (4, 16), (8, 16), (16, 32), (4, 32), (8, 8)]
)
def test_small_shapes_for_frame_count_pairs(rgb_frames, pose_frames):
    model = small(K, rgb_frames=rgb_frames, pose_frames=pose_frames)
    out = model(*inputs(rgb_frames=rgb_frames, pose_frames=pose_frames))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "rgb_logits": (2, K),
        "pose_logits": (2, K),
        "rgb_embedding": (2, 64),
        "pose_embedding": (2, 64),
    }
    assert all(torch.isfinite(v).all() for v in out.values())


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
    assert not any(
        ("lateral" in n or "fusion" in n or "to_rgb" in n or "to_pose" in n)
        for n, _ in model.named_parameters()
    )
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
    assert set(plain.state_dict()) == {
        k for k in fused_keys if not k.startswith("backbone.fusion.")
    }
    assert count(fused) - count(plain) == count(fused, "backbone.fusion.") > 0
    # same weights, fusion gates forced to zero (A = 0 -> X'' = X): identical outputs
    plain.load_state_dict(
        {k: v for k, v in fused.state_dict().items() if not k.startswith("backbone.fusion.")}
    )
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
    assert all(
        not layer.weight.any() and not layer.bias.any()
        for module in gated
        for layer in (module.rgb_back, module.pose_back)
    )
    random = small(K, zero_init_residual=False).backbone.fusion
    assert all(
        layer.weight.any() for module in random for layer in (module.rgb_back, module.pose_back)
    )


def test_fuse_probabilities_weighted_mean_of_softmaxes():
    g = torch.Generator().manual_seed(0)
    out = {
        "rgb_logits": torch.randn(3, K, generator=g),
        "pose_logits": torch.randn(3, K, generator=g),
    }
    fused = fuse_probabilities(out, (1.0, 3.0))
    torch.testing.assert_close(
        fused, (out["rgb_logits"].softmax(-1) + 3 * out["pose_logits"].softmax(-1)) / 4
    )
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
    merged = merge_stream_checkpoints(
        {f"module.{k}": v for k, v in rgb_state.items()}, pose_state, fused
    )
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


def test_pose_stem_ends_in_mmaction2s_stride_1_max_pool():
    """mmaction2's RGBPoseConv3D forward applies `pose_path.maxpool` ((1,3,3), stride 1, pad 1)
    after the pose stem's conv; the RGB stem's pool strides 2."""
    backbone = small(K).backbone
    pose_pool, rgb_pool = backbone.pose.stem[-1], backbone.rgb.stem[-1]
    assert isinstance(pose_pool, torch.nn.MaxPool3d) and isinstance(rgb_pool, torch.nn.MaxPool3d)
    assert (pose_pool.kernel_size, pose_pool.stride, pose_pool.padding) == (
        (1, 3, 3),
        (1, 1, 1),
        (0, 1, 1),
    )
    assert (rgb_pool.kernel_size, rgb_pool.stride, rgb_pool.padding) == (
        (1, 3, 3),
        (1, 2, 2),
        (0, 1, 1),
    )
    x = torch.rand(1, 17, 4, 16, 16)
    conv_bn_relu = backbone.pose.stem[:-1].eval()
    expected = torch.nn.functional.max_pool3d(conv_bn_relu(x), (1, 3, 3), (1, 1, 1), (0, 1, 1))
    torch.testing.assert_close(backbone.pose.stem.eval()(x), expected)


def _shipped_frame_pairs():
    from mg_ray.tune.space import Pipeline, load_space

    root = Path(__file__).resolve().parents[2] / "search_spaces"
    pairs = set()
    for path in sorted(root.glob("*.yaml")):
        space = load_space(path)
        spaces = (
            [space.stage_space(name) for name in space.stages]
            if isinstance(space, Pipeline)
            else [space]
        )
        pairs |= {pair for stage in spaces for pair in stage.frame_pairs()}
    return sorted(pairs)


SHIPPED_PAIRS = _shipped_frame_pairs()


def test_shipped_spaces_propose_the_expected_ratios():
    ratios = {pose // rgb for rgb, pose in SHIPPED_PAIRS}
    assert {1, 2, 4, 8} <= ratios  # quick.yaml's 8/8, 8/16, 4/16 and paper.yaml's 8/64
    assert [lateral_kernel(r) for r in (1, 2, 4, 5, 6, 8)] == [
        7,
        7,
        7,
        9,
        11,
        15,
    ]  # mmaction2's 7 while it suffices


@pytest.mark.parametrize("rgb_frames,pose_frames", SHIPPED_PAIRS)
def test_every_proposed_frame_pair_reads_and_writes_every_pose_frame(rgb_frames, pose_frames):
    """One impulse per frame through each temporal link between the pathways: every pose frame
    reaches some RGB step (pose -> RGB lateral, fusion projection) and is written by some RGB
    step (RGB -> pose lateral, fusion back-projection)."""
    r = check_frame_counts(rgb_frames, pose_frames)
    pose_impulses = torch.eye(pose_frames).reshape(pose_frames, 1, pose_frames, 1, 1)
    rgb_impulses = torch.eye(rgb_frames).reshape(rgb_frames, 1, rgb_frames, 1, 1)
    readers = [
        pose_to_rgb_lateral(1, 1, r),
        CrossModalFusion(8, 8, 8, speed_ratio=r, num_heads=1).pose_proj,
    ]
    writers = [
        RGBToPoseLateral(1, 1, r).conv,
        CrossModalFusion(8, 8, 8, speed_ratio=r, num_heads=1).pose_back,
    ]
    with torch.no_grad():
        for conv in readers:
            weight = torch.ones(1, 1, *conv.kernel_size)
            out = torch.nn.functional.conv3d(
                pose_impulses, weight, stride=conv.stride, padding=conv.padding
            )
            assert out.shape[2] == rgb_frames
            unread = [j for j in range(pose_frames) if not out[j].any()]
            assert not unread, (
                f"{type(conv).__name__} k={conv.kernel_size[0]} r={r}: pose frames {unread} never read"
            )
        for conv in writers:
            weight = torch.ones(1, 1, *conv.kernel_size)
            out = torch.nn.functional.conv_transpose3d(
                rgb_impulses,
                weight,
                stride=conv.stride,
                padding=conv.padding,
                output_padding=conv.output_padding,
            )
            assert out.shape[2] == pose_frames
            unwritten = [j for j in range(pose_frames) if not out[:, 0, j].any()]
            assert not unwritten, (
                f"k={conv.kernel_size[0]} r={r}: pose frames {unwritten} never written"
            )
    model = small(K, rgb_frames=rgb_frames, pose_frames=pose_frames)
    out = model(*inputs(rgb_frames=rgb_frames, pose_frames=pose_frames))
    assert tuple(out["pose_logits"].shape) == (2, K)


@pytest.mark.parametrize("r", [1, 4])
def test_project_max_equals_the_naive_form_in_values_and_gradients(r):
    g = torch.Generator().manual_seed(r)
    conv = torch.nn.Conv3d(6, 5, (r, 1, 1), stride=(r, 1, 1))
    x = torch.randn(2, 6, 3 * r, 4, 5, generator=g)
    upstream = torch.randn(2, 3, 5, generator=g)
    x_fast, x_naive = x.clone().requires_grad_(), x.clone().requires_grad_()
    fast = project_max(x_fast, conv)
    (fast * upstream).sum().backward()
    grads_fast = [x_fast.grad] + [p.grad.clone() for p in conv.parameters()]
    conv.zero_grad()
    naive = conv(x_naive).amax(dim=(3, 4)).transpose(1, 2)  # [N, T, K]
    (naive * upstream).sum().backward()
    grads_naive = [x_naive.grad] + [p.grad for p in conv.parameters()]
    torch.testing.assert_close(fast, naive)
    for a, b in zip(grads_fast, grads_naive):
        torch.testing.assert_close(a, b)


def test_each_streams_fusion_gate_depends_on_the_other_streams_input():
    torch.manual_seed(0)
    fusion = CrossModalFusion(
        16, 8, 16, speed_ratio=2, num_heads=2, dropout=0.0
    ).eval()  # gates not zeroed
    rgb, pose = torch.randn(2, 16, 3, 4, 4), torch.randn(2, 8, 6, 4, 4)
    rgb_out, pose_out = fusion(rgb, pose)
    rgb_other, _ = fusion(rgb, pose + torch.randn_like(pose))  # same RGB, other pose
    _, pose_other = fusion(rgb + torch.randn_like(rgb), pose)  # same pose, other RGB
    assert (rgb_out - rgb_other).abs().max() > 1e-3
    assert (pose_out - pose_other).abs().max() > 1e-3
    # and through autograd: d(rgb output)/d(pose input) and d(pose output)/d(rgb input) are not zero
    rgb, pose = rgb.requires_grad_(), pose.requires_grad_()
    a, b = fusion(rgb, pose)
    assert torch.autograd.grad(a.sum(), pose, retain_graph=True)[0].abs().sum() > 0
    assert torch.autograd.grad(b.sum(), rgb)[0].abs().sum() > 0


@pytest.mark.parametrize("pool", ["max", "avg"])
def test_stream_head_pools_the_embedding_as_configured(pool):
    head = StreamHead(8, K, 4, dropout=0.0, embed_pool=pool).eval()
    feature = torch.randn(2, 8, 3, 2, 2)
    logits, embedding = head(feature)
    pooled = feature.amax(dim=(2, 3, 4)) if pool == "max" else feature.mean(dim=(2, 3, 4))
    torch.testing.assert_close(embedding, head.embed(pooled))  # unnormalised: the loss normalises
    torch.testing.assert_close(
        logits, head.fc(feature.mean(dim=(2, 3, 4)))
    )  # the classifier averages
    with pytest.raises(ValueError, match="embed_pool: expected 'max' or 'avg'"):
        StreamHead(8, K, 4, dropout=0.0, embed_pool="sum")
