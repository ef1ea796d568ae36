"""Step time of the model: forward + loss + backward, fusion + refinement on vs off.

    python benchmarks/bench_model.py                   # paper preset, batch 2, CPU
    python benchmarks/bench_model.py --repeats 5 --threads 2

Prints parameter counts (backbone without fusion, fusion, heads), the paper preset's median
step time with fusion + refinement on and off (measured interleaved, so load drifts on a shared
machine hit both alike), their ratio (target <= 1.10), the small preset's step time at batch 8,
and, when CUDA is available, the paper preset's bf16 autocast step time on the GPU in the
channels-last-3d layout the training loop uses there, next to the default NCDHW layout.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mg_ray.models import TwoStreamCriterion, paper, small
from mg_ray.train.loop import input_layout


def count(model: torch.nn.Module, prefix: str = "") -> int:
    return sum(p.numel() for name, p in model.named_parameters() if name.startswith(prefix))


def make_step(
    builder,
    *,
    fusion: bool,
    refinement: bool,
    batch: int,
    rgb_size: int,
    num_classes: int,
    device: str,
    amp: bool,
    layout: torch.memory_format = torch.contiguous_format,
    **kwargs,
):
    """A closure running one forward + loss + backward; returns (step, model). `layout`: the
    memory format of weights and inputs (the training loop uses channels_last_3d on CUDA)."""
    model = builder(num_classes, fusion=fusion, **kwargs).to(device, memory_format=layout).train()
    criterion = (
        TwoStreamCriterion(num_classes, model.embed_dim, refinement=refinement).to(device).train()
    )
    rgb = torch.randn(batch, 3, 8, rgb_size, rgb_size, device=device).contiguous(
        memory_format=layout
    )
    pose = torch.rand(batch, 17, 32, rgb_size // 4, rgb_size // 4, device=device).contiguous(
        memory_format=layout
    )
    labels = torch.randint(0, num_classes, (batch,), device=device)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
            outputs = model(rgb, pose)
        outputs = {k: v.float() for k, v in outputs.items()}
        criterion(outputs, labels)["loss"].backward()
        if device == "cuda":
            torch.cuda.synchronize()

    return step, model


def timed(step) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def compare(
    builder,
    *,
    batch: int,
    rgb_size: int,
    repeats: int,
    device: str = "cpu",
    amp: bool = False,
    num_classes: int = 32,
    with_ncdhw: bool = False,
    **kwargs,
) -> dict[str, float]:
    """Median step time with fusion + refinement on and off, interleaved repeats after a warm-up.
    On CUDA both run channels-last-3d, as in training; `with_ncdhw` adds "on_ncdhw", the full
    model in the default NCDHW layout."""
    layout = input_layout(torch.device(device))  # the layout training uses on this device
    common = dict(
        batch=batch, rgb_size=rgb_size, num_classes=num_classes, device=device, amp=amp, **kwargs
    )
    steps = {
        "on": make_step(builder, fusion=True, refinement=True, layout=layout, **common)[0],
        "off": make_step(builder, fusion=False, refinement=False, layout=layout, **common)[0],
    }
    if with_ncdhw:
        steps["on_ncdhw"] = make_step(builder, fusion=True, refinement=True, **common)[0]
    for step in steps.values():  # warm-up: allocator, oneDNN / cuDNN kernel selection
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(repeats):
        order = list(steps) if i % 2 == 0 else list(reversed(steps))
        for name in order:
            times[name].append(timed(steps[name]))
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-paper", action="store_true", help="only the small preset")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} CPU threads")

    fused, plain = paper(32), paper(32, fusion=False)
    fusion_params = count(fused, "backbone.fusion.")
    print(
        f"paper preset parameters: backbone {count(plain, 'backbone.') / 1e6:.3f} M (without fusion), "
        f"fusion {fusion_params / 1e6:.3f} M, heads {count(fused, 'heads.') / 1e6:.3f} M, "
        f"total {count(fused) / 1e6:.3f} M"
    )
    tiny = small(32)
    print(
        f"small preset parameters: total {count(tiny) / 1e6:.3f} M "
        f"(fusion {count(tiny, 'backbone.fusion.') / 1e6:.3f} M)"
    )
    del fused, plain, tiny

    if not args.skip_paper:
        t = compare(paper, batch=args.batch, rgb_size=224, repeats=args.repeats)
        print(
            f"paper, CPU, batch {args.batch}, fwd+bwd median of {args.repeats}: "
            f"fusion+refinement on {t['on']:.3f} s, off {t['off']:.3f} s, ratio {t['on'] / t['off']:.3f} "
            f"(target <= 1.10)"
        )

    t = compare(small, batch=8, rgb_size=64, repeats=max(args.repeats, 10))
    print(
        f"small, CPU, batch 8, rgb 8x64x64 + pose 32x16x16, fwd+bwd median: "
        f"on {t['on'] * 1e3:.1f} ms, off {t['off'] * 1e3:.1f} ms, ratio {t['on'] / t['off']:.3f}"
    )

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for batch in (2, 10):
            t = compare(
                paper,
                batch=batch,
                rgb_size=224,
                repeats=20,
                device="cuda",
                amp=True,
                with_ncdhw=True,
            )
            print(
                f"paper, {name}, bf16 autocast, channels-last-3d, batch {batch}, fwd+bwd median: "
                f"on {t['on'] * 1e3:.1f} ms, off {t['off'] * 1e3:.1f} ms, ratio {t['on'] / t['off']:.3f}; "
                f"NCDHW layout on {t['on_ncdhw'] * 1e3:.1f} ms ({t['on_ncdhw'] / t['on']:.2f}x the channels-last time)"
            )
    else:
        print("no CUDA device: bf16 autocast GPU step skipped")


if __name__ == "__main__":
    main()
