"""`mg-ray import-mmaction2 CKPT --out FILE`: an mmaction2 checkpoint as an mg-ray model file.

An RGBPoseConv3D checkpoint becomes a two-stream (`rgbpose`) model file, a PoseConv3D one a
pose-only file, both at the paper preset's widths (mmaction2's). The file is the same kind the
training job writes (`mg_ray.model_file.save_model_file`), so it can start a study's fused
stage (a two-stream file given as both `model.rgb_init` and `model.pose_init`: the whole backbone,
laterals included), initialise one stream (`--pose-init FILE` from a PoseConv3D import), or be
promoted and used to predict. The mapping and its checks are in `mg_ray.models.mmaction2`.

The checkpoint is read with `torch.load(weights_only=True)`: it cannot run code. Files that hold
training state beyond tensors (mmengine's message hub, say) are refused with that reason; such a
checkpoint's `state_dict` can be saved on its own with `torch.save(ckpt["state_dict"], path)`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from mg_ray.config import to_dict
from mg_ray.data.layouts import get_layout
from mg_ray.model_file import build_from_spec, model_spec, save_model_file
from mg_ray.models.mmaction2 import (
    POSEC3D,
    CheckpointImportError,
    checkpoint_kind,
    checkpoint_state,
    head_shape,
    map_mmaction2_state,
)
from mg_ray.train.config import load_config


def import_checkpoint(
    source: str | Path,
    out: str | Path,
    *,
    rgb_frames: int = 8,
    pose_frames: int = 32,
    num_classes: int | None = None,
    reinit_head: bool = False,
    class_names: list[str] | None = None,
    fusion: bool = True,
    layout: str = "coco17",
) -> dict:
    """Write the model file `out` from the mmaction2 checkpoint `source`; returns a summary
    (kind, number of tensors imported, classes). Refuses to overwrite `out`."""
    source, out = Path(source), Path(out)
    if out.exists():
        raise CheckpointImportError(
            f"--out {out}: exists; choose a new path (nothing is overwritten)"
        )
    if not out.parent.is_dir():
        raise CheckpointImportError(f"--out {out}: folder {out.parent} does not exist")
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no such checkpoint")
    try:
        content = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 (UnpicklingError for foreign objects, RuntimeError for corrupt files)
        raise CheckpointImportError(
            f"{source}: the weights-only load refused it ({str(err).splitlines()[0]}); if it holds training "
            f"state beyond tensors, save its 'state_dict' alone and import that"
        ) from None
    state = checkpoint_state(content, str(source))
    kind = checkpoint_kind(state, str(source))
    classes, channels = head_shape(state, kind)
    if num_classes is not None and num_classes != classes and not reinit_head:
        raise CheckpointImportError(
            f"--num-classes {num_classes}: the checkpoint's head has {classes} classes (add --reinit-head to "
            f"start the classifier afresh)"
        )
    num_classes = classes if num_classes is None else num_classes
    if class_names is not None and len(class_names) != num_classes:
        raise CheckpointImportError(
            f"--classes: {len(class_names)} names for {num_classes} classes"
        )
    if len(get_layout(layout).joints) != channels["pose"]:
        raise CheckpointImportError(
            f"--layout {layout}: {len(get_layout(layout).joints)} joints, but the checkpoint's pose stem reads "
            f"{channels['pose']} heatmap channels"
        )

    modality = "pose" if kind == POSEC3D else "rgbpose"
    cfg = load_config(
        "paper",
        {
            "data.rgb_frames": rgb_frames,
            "data.pose_frames": pose_frames,
            "model.modality": modality,
            "model.fusion": fusion,
        },
    )
    spec = model_spec(cfg.model, cfg.data, num_classes, channels["pose"])
    model = build_from_spec(spec)
    merged = map_mmaction2_state(state, model.state_dict(), kind=kind, reinit_head=reinit_head)
    model.load_state_dict(merged)  # strict: the mapping filled every key
    save_model_file(
        out,
        spec=spec,
        model_state=model.state_dict(),
        criterion_state={},
        class_names=class_names or [f"class_{i}" for i in range(num_classes)],
        data={**to_dict(cfg.data), "layout": layout},
        metrics={},
    )
    return {"kind": kind, "tensors": len(state), "num_classes": num_classes, "modality": modality}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="mmaction2 .pth (RGBPoseConv3D or PoseConv3D)")
    parser.add_argument(
        "--out", required=True, help="the mg-ray model file to write (must not exist)"
    )
    parser.add_argument("--rgb-frames", type=int, default=8)
    parser.add_argument("--pose-frames", type=int, default=32)
    parser.add_argument("--num-classes", type=int, help="default: the checkpoint head's")
    parser.add_argument(
        "--reinit-head",
        action="store_true",
        help="start the classifiers afresh (for another class count)",
    )
    parser.add_argument(
        "--classes", help="text file of class names, one a line (default class_0, class_1, ...)"
    )
    parser.add_argument(
        "--no-fusion", action="store_true", help="the plain two-stream model, no cross-modal fusion"
    )
    parser.add_argument(
        "--layout", default="coco17", help="keypoint layout of the heatmaps (default coco17)"
    )


def run(args: argparse.Namespace) -> int:
    names = None
    if args.classes:
        names = [
            line.strip() for line in Path(args.classes).read_text().splitlines() if line.strip()
        ]
    summary = import_checkpoint(
        args.checkpoint,
        args.out,
        rgb_frames=args.rgb_frames,
        pose_frames=args.pose_frames,
        num_classes=args.num_classes,
        reinit_head=args.reinit_head,
        class_names=names,
        fusion=not args.no_fusion,
        layout=args.layout,
    )
    print(
        f"{args.checkpoint}: {summary['kind']}, {summary['tensors']} tensors -> {args.out} "
        f"({summary['modality']}, {summary['num_classes']} classes)"
    )
    return 0
