"""The training step with the loader in the loop: clips/s, data-wait fraction and MFU.

    python benchmarks/gpu_step.py --data DIR                      # paper preset, bf16, CUDA
    python benchmarks/gpu_step.py --data DIR --config small --device cpu --steps 3   # CPU smoke

One process, one device: the preset's model and two-stream criterion (fusion and refinement on)
in the training loop's layout (channels-last-3d on CUDA, `mg_ray.train.loop.input_layout`),
bf16 autocast on CUDA, SGD, fed by a DataLoader over the dataset's train split with `--workers`
loader processes (train mode: random sampling, crop, flip). Measures, after `--warmup` steps:

    clips/s      clips trained per second of wall time
    data wait    the fraction of that time spent waiting for the loader's next batch
    MFU          model FLOPs per second (3 x the forward's FLOPs a clip, counted by torch's
                 FlopCounterMode) over the GPU's dense bf16 peak (known GPUs only)

and prints them as one line. `benchmarks/gpu_check.sh` runs it on a lent CUDA machine.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.data import DataLoader

# Dense bf16 tensor-core peaks (vendor data sheets, SXM parts, no sparsity), in FLOP/s.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak, when its name is one we know."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def forward_flops(model: torch.nn.Module, item: dict) -> float:
    """FLOPs of one clip's forward pass (torch's FLOP counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(item["rgb"], item["pose"])
    return float(counter.get_total_flops()) / item["rgb"].shape[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a dataset folder (videos or frame store)")
    parser.add_argument("--config", default="paper", help="preset (paper, small)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", type=int, default=8, help="DataLoader processes")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    from mg_ray.data import build_dataset, load_index
    from mg_ray.data.transforms import network_input
    from mg_ray.model_file import build_from_spec, model_spec
    from mg_ray.models import TwoStreamCriterion
    from mg_ray.train.config import load_config
    from mg_ray.train.loop import input_layout

    device = torch.device(args.device)
    cfg = load_config(args.config, {"data.root": args.data})
    layout = input_layout(device)
    train_set = build_dataset(cfg.data, "train", "train")
    index = load_index(args.data)
    spec = model_spec(cfg.model, cfg.data, index.num_classes, cfg.data.pose_channels(index.layout))
    model = build_from_spec(spec).to(device, memory_format=layout).train()
    criterion = TwoStreamCriterion(spec["num_classes"], model.embed_dim).to(device).train()
    params = list(model.parameters()) + list(criterion.parameters())
    optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    amp = device.type == "cuda"

    def to_device(x: torch.Tensor) -> torch.Tensor:  # uint8 RGB is normalised on the device
        return network_input(x, device, layout)

    flops = forward_flops(model, {k: to_device(train_set[0][k][None]) for k in ("rgb", "pose")})
    loader = DataLoader(
        train_set,
        batch_size=args.batch,
        shuffle=True,
        drop_last=True,
        num_workers=args.workers,
        persistent_workers=args.workers > 0,
        pin_memory=amp,
    )

    def batches():
        while True:
            yield from loader

    it = batches()
    waited = clips = 0.0
    for step in range(args.warmup + args.steps):
        if step == args.warmup:  # the clock starts once the loader and kernels are warm
            if amp:
                torch.cuda.synchronize()
            start, waited, clips = time.perf_counter(), 0.0, 0
        before = time.perf_counter()
        batch = next(it)
        waited += time.perf_counter() - before
        rgb, pose = to_device(batch["rgb"]), to_device(batch["pose"])
        labels = batch["label"].to(device)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            outputs = model(rgb, pose)
        loss = criterion({k: v.float() for k, v in outputs.items()}, labels)["loss"]
        loss.backward()
        optimizer.step()
        if amp:
            torch.cuda.synchronize()  # the step's time includes its kernels
        clips += len(labels)
    elapsed = time.perf_counter() - start
    rate = clips / elapsed
    peak = peak_flops(device)
    mfu = f"{3 * flops * rate / peak:.1%}" if peak else "n/a (unknown peak)"
    name = torch.cuda.get_device_name(device) if amp else "CPU"
    print(
        f"gpu_step: {args.config} preset on {name}, batch {args.batch}, {args.workers} loader "
        f"workers: {rate:.1f} clips/s, data wait {waited / elapsed:.0%}, "
        f"{flops / 1e9:.1f} GFLOPs a clip forward, MFU {mfu}"
    )


if __name__ == "__main__":
    main()
