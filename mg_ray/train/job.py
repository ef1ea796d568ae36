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
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from mg_ray import paths
from mg_ray.config import ConfigError, apply_overrides, from_mapping
from mg_ray.train.config import ExperimentConfig

STAGE_MODALITY = {"rgb": "rgb", "pose": "pose", "fused": "rgbpose"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="small",
                        help="a YAML file, or a packaged preset name: small (default), paper")
    parser.add_argument("--stage", choices=sorted(STAGE_MODALITY), default="fused",
                        help="rgb-only, pose-only or the fused two-stream model (default)")
    parser.add_argument("--rgb-init", help="fused stage: RGB-only model (path or runs:/<id>)")
    parser.add_argument("--pose-init", help="fused stage: pose-only model (path or runs:/<id>)")
    parser.add_argument("--data", help="dataset folder (default: the synthetic dataset)")
    parser.add_argument("--workers", type=int, help="Ray Train workers (DDP ranks)")
    parser.add_argument("--cpus-per-worker", type=float)
    device = parser.add_mutually_exclusive_group()
    device.add_argument("--gpu", action="store_true", help="one GPU per worker, NCCL, bf16 autocast")
    device.add_argument("--cpu", action="store_true", help="CPU workers with gloo")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config key, e.g. --set loss.alpha=0.2 (repeatable)")
    parser.add_argument("--name", help="Train run name (default: train-<stage>-<time>)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the Train run called --name from its last checkpoint")
    parser.add_argument("--storage-path", help=f"Ray storage (default: {paths.ray_storage()})")
    parser.add_argument("--experiment", help="MLflow experiment (default: mg-ray)")
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or a local cluster)")


def load_config(source: str, overrides: dict[str, Any]) -> ExperimentConfig:
    """A preset name (packaged YAML) or a YAML path, with dotted-key overrides applied."""
    path = Path(source)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"{source}: config file not found")
        text, where = path.read_text(), str(path)
    else:
        preset = resources.files("mg_ray.configs") / f"{source}.yaml"
        if not preset.is_file():
            raise ConfigError(f"--config: {source!r} is neither a YAML file nor a preset (small, paper)")
        text, where = preset.read_text(), f"preset {source}"
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: not valid YAML: {err}") from None
    try:
        return from_mapping(ExperimentConfig, apply_overrides(data, overrides))
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {"model.modality": STAGE_MODALITY[args.stage]}
    for flag, key in (("data", "data.root"), ("workers", "resources.num_workers"),
                      ("cpus_per_worker", "resources.cpus_per_worker"), ("epochs", "optim.epochs"),
                      ("batch_size", "optim.batch_size"), ("lr", "optim.lr"),
                      ("rgb_init", "model.rgb_init"), ("pose_init", "model.pose_init"),
                      ("experiment", "tracking.experiment")):
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


def ensure_dataset(cfg: ExperimentConfig) -> None:
    """The embedded default: generate the synthetic dataset on first use. Any other dataset path
    must exist and load cleanly (annotations validated) before workers start."""
    from mg_ray.data import load_index

    root = Path(cfg.data.root).expanduser()
    if not root.exists() and root.resolve() == paths.synthetic_dataset().resolve():
        from mg_ray.data.synth import generate

        print(f"synthetic dataset not found; generating it in {root}")
        generate(root)
    if not root.exists():
        raise FileNotFoundError(f"data.root: dataset folder {root} does not exist")
    load_index(root, layout=cfg.data.layout)  # raises naming the file/clip/field on bad input


def run(args: argparse.Namespace) -> int:
    from mg_ray.train.trainer import check_resources, fit, init_ray, train_run_exists

    cfg = load_config(args.config, overrides_from_args(args))
    ensure_dataset(cfg)
    name = args.name or f"train-{args.stage}-{time.strftime('%Y%m%d-%H%M%S')}"
    storage = Path(args.storage_path or paths.ray_storage()).expanduser()
    if train_run_exists(storage, name) and not args.resume:
        raise SystemExit(
            f"error: a Train run called {name!r} already exists in {storage}. Pass --resume to continue "
            f"it from its last checkpoint, or choose another --name (nothing was overwritten)."
        )
    if args.resume and not train_run_exists(storage, name):
        raise SystemExit(f"error: --resume: no Train run called {name!r} in {storage}")
    init_ray(args.address)
    res = cfg.resources
    check_resources(res.num_workers, res.cpus_per_worker, res.use_gpu, what=f"train run {name!r}")
    outcome = fit(cfg, name=name, storage_path=storage, tags={"mg_ray.stage": args.stage})
    m = outcome.metrics
    print(
        f"train {name}: {outcome.status} | mlflow run {outcome.run_id} | best val_top1 "
        f"{m.get('best_val_top1', float('nan')):.3f} (epoch {m.get('best_epoch')}) | "
        f"test_top1 {m.get('test_top1', float('nan')):.3f} | best checkpoint {outcome.checkpoint_path}"
    )
    return 0 if outcome.status == "FINISHED" else 1
