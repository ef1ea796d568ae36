"""`mg-ray train` / `python jobs/train.py`: one training run on a Ray cluster.

    mg-ray train                                   # small preset, synthetic data, 2 CPU workers
    mg-ray train --stage rgb --name rgb-1          # the paper recipe's single-stream stages...
    mg-ray train --stage pose --name pose-1
    mg-ray train --stage fused --rgb-init runs:/<rgb run id> --pose-init runs:/<pose run id>
    mg-ray train --config paper --gpu --workers 4  # the paper's sizes on a GPU cluster

Every check that can fail (config, dataset, tracking server, cluster resources) runs before any
worker starts.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import yaml

from mg_ray import paths
from mg_ray.cluster import check_local_resources, check_resources, init_ray
from mg_ray.config import ConfigError
from mg_ray.data.check import ensure_dataset
from mg_ray.train.config import load_config

STAGE_MODALITY = {"rgb": "rgb", "pose": "pose", "fused": "rgbpose"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        default="small",
        help="a YAML file, or a packaged preset name: small (default), paper",
    )
    parser.add_argument(
        "--stage",
        choices=sorted(STAGE_MODALITY),
        default="fused",
        help="rgb-only, pose-only or the fused two-stream model (default)",
    )
    parser.add_argument("--rgb-init", help="fused stage: RGB-only model (path or runs:/<id>)")
    parser.add_argument("--pose-init", help="fused stage: pose-only model (path or runs:/<id>)")
    parser.add_argument("--data", help="dataset folder (default: the synthetic dataset)")
    parser.add_argument("--workers", type=int, help="Ray Train workers (DDP ranks)")
    parser.add_argument("--cpus-per-worker", type=float)
    device = parser.add_mutually_exclusive_group()
    device.add_argument(
        "--gpu", action="store_true", help="one GPU per worker, NCCL, bf16 autocast"
    )
    device.add_argument("--cpu", action="store_true", help="CPU workers with gloo")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config key, e.g. --set loss.alpha=0.2 (repeatable)",
    )
    parser.add_argument("--name", help="Train run name (default: train-<stage>-<time>)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the Train run called --name from its last checkpoint",
    )
    parser.add_argument("--storage-path", help=f"Ray storage (default: {paths.ray_storage()})")
    parser.add_argument("--experiment", help="MLflow experiment (default: mg-ray)")
    parser.add_argument(
        "--address", help="Ray cluster address (default: RAY_ADDRESS or a local cluster)"
    )


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {"model.modality": STAGE_MODALITY[args.stage]}
    for flag, key in (
        ("data", "data.root"),
        ("workers", "resources.num_workers"),
        ("cpus_per_worker", "resources.cpus_per_worker"),
        ("epochs", "optim.epochs"),
        ("batch_size", "optim.batch_size"),
        ("lr", "optim.lr"),
        ("rgb_init", "model.rgb_init"),
        ("pose_init", "model.pose_init"),
        ("experiment", "tracking.experiment"),
    ):
        value = getattr(args, flag)
        if value is not None:
            overrides[key] = value
    if args.gpu or args.cpu:
        overrides["resources.use_gpu"] = bool(args.gpu)
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set loss.alpha=0.2")
        overrides[key] = yaml.safe_load(value)
    return overrides


def run(args: argparse.Namespace) -> int:
    # Imported here: Ray Train, torch and MLflow are heavy, and `--help` answers without them.
    from mg_ray import tracking
    from mg_ray.train.trainer import train, train_run_exists

    cfg = load_config(args.config, overrides_from_args(args))
    name = args.name or f"train-{args.stage}-{time.strftime('%Y%m%d-%H%M%S')}"
    storage = paths.ensure_writable(
        Path(args.storage_path or paths.ray_storage()).expanduser().resolve(),
        "Ray storage (--storage-path)",
    )
    if train_run_exists(storage, name) and not args.resume:
        raise SystemExit(
            f"error: a Train run called {name!r} already exists in {storage}. Pass --resume to continue "
            f"it from its last checkpoint, or choose another --name (nothing was overwritten)."
        )
    if args.resume and not train_run_exists(storage, name):
        raise SystemExit(f"error: --resume: no Train run called {name!r} in {storage}")
    index = ensure_dataset(cfg.data, rgb=cfg.model.modality != "pose")
    tracking.check_store(tracking.resolve_tracking_uri(cfg.tracking.tracking_uri))
    res = cfg.resources
    request = dict(
        num_workers=res.num_workers,
        cpus_per_worker=res.cpus_per_worker,
        use_gpu=res.use_gpu,
        gpus_per_worker=res.gpus_per_worker,
        what=f"train run {name!r}",
    )
    check_local_resources(args.address, **request)  # before a local Ray starts
    init_ray(args.address)
    check_resources(**request)

    outcome = train(
        cfg, name=name, storage_path=storage, tags={"mg_ray.stage": args.stage}, index=index
    )
    m = outcome.metrics
    print(
        f"train {name}: FINISHED | mlflow run {outcome.run_id} | best val_top1 "
        f"{m.get('best_val_top1', float('nan')):.3f} (epoch {m.get('best_epoch')}) | "
        f"test_top1 {m.get('test_top1', float('nan')):.3f} | best checkpoint {outcome.checkpoint_path}"
    )
    return 0
