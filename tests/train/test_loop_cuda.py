"""The training loop's GPU path: bf16 autocast steps of the paper preset and the loop's own
epoch / evaluation functions on a CUDA device. Skipped where there is no CUDA device (CI has
none); run on a GPU machine with `pytest -m gpu`."""

import pytest
import torch

from mg_ray.metrics import classification_metrics
from mg_ray.models import TwoStreamCriterion, paper, small
from mg_ray.train.loop import evaluate, input_layout, train_one_epoch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
K = 10


def test_paper_preset_bf16_autocast_training_step():
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = paper(32).to(device).train()
    criterion = TwoStreamCriterion(32, model.embed_dim).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0075, momentum=0.9, weight_decay=1e-4)
    rgb = torch.randn(2, 3, 8, 224, 224, device=device)
    pose = torch.rand(2, 17, 32, 56, 56, device=device)
    labels = torch.tensor([3, 17], device=device)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        outputs = model(rgb, pose)
    assert outputs["rgb_logits"].dtype == torch.bfloat16  # autocast really ran the convs in bf16
    losses = criterion({k: v.float() for k, v in outputs.items()}, labels)
    optimizer.zero_grad(set_to_none=True)
    losses["loss"].backward()
    missing = [
        n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
    ]
    assert not missing, f"no finite gradient: {missing[:5]}"
    optimizer.step()
    assert torch.isfinite(losses["loss"])
    prototypes = criterion.refine["rgb"].prototypes
    assert prototypes.dtype == torch.float32 and prototypes.device.type == "cuda"
    assert torch.isfinite(prototypes).all()


class Clips(torch.utils.data.Dataset):
    """Learnable in-memory clips: the class shows as a bright RGB frame index and a hot pose
    channel, so a few epochs of the small preset must beat chance on the GPU as on the CPU."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(n) % K
        self.rgb = torch.randn(n, 3, 8, 64, 64, generator=g) * 0.1
        self.pose = torch.rand(n, 17, 32, 16, 16, generator=g) * 0.1
        for i, y in enumerate(self.labels.tolist()):
            self.rgb[i, :, y % 8] += 1.0 + y / K
            self.pose[i, y] += 1.0

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"rgb": self.rgb[i], "pose": self.pose[i], "label": self.labels[i], "index": i}


def test_loop_epochs_and_evaluation_on_cuda_with_bf16():
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = small(K).to(device, memory_format=input_layout(device))  # as the loop sets it up
    criterion = TwoStreamCriterion(K, model.embed_dim, alpha=0.1).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    train = torch.utils.data.DataLoader(
        Clips(200, seed=0), batch_size=10, shuffle=True, pin_memory=True
    )
    val = torch.utils.data.DataLoader(Clips(50, seed=1), batch_size=10)
    for _ in range(8):
        stats = train_one_epoch(
            model, criterion, optimizer, train, device, torch.bfloat16, grad_clip=40.0
        )
    assert stats["train_samples_per_s"] > 0 and 0 <= stats["train_data_wait_frac"] <= 1
    predictions = evaluate(model, val, device, torch.bfloat16, (1.0, 1.0), world=1)
    metrics = classification_metrics(
        predictions.stream_probs, predictions.fused, predictions.labels, "val"
    )
    assert sorted(predictions.indices.tolist()) == list(range(50))
    assert metrics["val_top1"] >= 3 / K, metrics  # 3x chance


def test_ddp_on_nccl_with_the_loops_channels_last_layout(tmp_path):
    """The loop's GPU setup outside Ray: NCCL process group, channels-last-3d weights wrapped by
    DDP (as `prepare_model` does), two steps. Every gradient has its parameter's layout on every
    dimension of size > 1, so DDP's buckets hold the layout the convolutions produce. (A 1x1x1
    weight's strides are ambiguous: the fusion's projection gets a contiguous-strided gradient
    for a channels-last parameter, the same memory, which DDP reports once as a stride warning;
    the loop silences exactly that.)"""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    device = torch.device("cuda")
    layout = input_layout(device)
    assert layout == torch.channels_last_3d
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = DistributedDataParallel(small(K).to(device, memory_format=layout), device_ids=[0])
        criterion = TwoStreamCriterion(K, model.module.embed_dim).to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        clips = Clips(20, seed=0)
        for _ in range(2):
            rgb = clips.rgb[:10].to(device, memory_format=layout)
            pose = clips.pose[:10].to(device, memory_format=layout)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                outputs = model(rgb, pose)
            labels = clips.labels[:10].to(device)
            loss = criterion({k: v.float() for k, v in outputs.items()}, labels)["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        assert torch.isfinite(loss)

        def strides(t):  # the strides that matter: those of dimensions of size > 1
            return [s for s, n in zip(t.stride(), t.shape) if n > 1]

        differ = [n for n, p in model.module.named_parameters() if strides(p.grad) != strides(p)]
        assert not differ, differ
        conv = model.module.backbone.rgb.stem[0].weight  # the stem conv [C, 3, 1, 7, 7]
        assert conv.is_contiguous(memory_format=layout)
    finally:
        dist.destroy_process_group()
