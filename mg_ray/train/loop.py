"""The per-worker training loop run by Ray Train's `TorchTrainer` (one process per DDP rank).

Read top to bottom: setup (config, data, model, optimiser, resume), then one iteration per epoch
(train, evaluate on the whole validation split across ranks, checkpoint + `ray.train.report`),
then the final multi-clip test evaluation of the best weights. Only Ray Train touches DDP
(`prepare_model`, `prepare_data_loader`); everything rank 0 alone does (checkpoint files, the
artifacts for MLflow) sits behind `if rank == 0`.

Workers never talk to MLflow (except to fetch `--rgb-init` / `--pose-init` models): metrics go out
in the reports and artifacts inside the reported checkpoints, and the Train controller logs both
into the run its driver owns (see `mg_ray.train.outbox` and `mg_ray.train.trainer`).
"""

from __future__ import annotations

import math
import random
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Subset

from mg_ray.config import dump_yaml, from_mapping
from mg_ray.train.checkpoint import (
    CHECKPOINT_FILE,
    MODEL_FILE,
    build_from_spec,
    model_spec,
    resolve_model_file,
    safe_load,
    save_model_file,
    unwrap,
)
from mg_ray.train.config import ExperimentConfig
from mg_ray.train.metrics import classification_metrics

STREAMS = ("rgb", "pose")


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """loop_config: {"experiment": <ExperimentConfig as dict>, "tracking_uri": str, "run_id": str}."""
    entered = time.perf_counter()
    import ray.train
    import ray.train.torch

    from mg_ray.data import build_dataset
    from mg_ray.models import TwoStreamCriterion, merge_stream_checkpoints, modality_streams

    cfg = from_mapping(ExperimentConfig, loop_config["experiment"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, int(cfg.resources.cpus_per_worker)))
    amp_dtype = torch.bfloat16 if (cfg.optim.amp == "bf16" or (cfg.optim.amp == "auto" and device.type == "cuda")) else None

    # ---- data ------------------------------------------------------------------------------
    streams = modality_streams(cfg.model.modality)
    decode = "rgb" in streams  # a pose-only model: no video is decoded
    train_set = build_dataset(cfg.data, cfg.data.train_split, mode="train", rgb=decode)
    val_set = build_dataset(cfg.data, cfg.data.val_split, mode="test", num_clips=1, rgb=decode)
    class_names = list(train_set.class_names)
    num_classes = len(class_names)
    per_worker_batch = cfg.optim.batch_size // world
    loader_workers = cfg.data.num_workers
    train_loader = ray.train.torch.prepare_data_loader(
        DataLoader(
            train_set,
            batch_size=per_worker_batch,
            shuffle=True,
            drop_last=len(train_set) >= cfg.optim.batch_size,
            num_workers=loader_workers,
            persistent_workers=loader_workers > 0,
            pin_memory=device.type == "cuda",
        )
    )
    # Validation is sharded by hand (rank r takes samples r, r+world, ...) instead of with a
    # DistributedSampler, which pads with duplicates: metrics must count every sample once.
    val_loader = DataLoader(
        Subset(val_set, range(rank, len(val_set), world)),
        batch_size=per_worker_batch,
        num_workers=loader_workers,
        persistent_workers=loader_workers > 0,
    )

    # ---- model, loss, optimiser --------------------------------------------------------------
    seed_everything(cfg.optim.seed)  # same initial weights and prototypes on every rank
    spec = model_spec(cfg.model, cfg.data, num_classes, train_set.pose_channels)
    model = build_from_spec(spec)
    if cfg.model.rgb_init or cfg.model.pose_init:
        model.load_state_dict(load_stream_init(cfg, model, merge_stream_checkpoints, loop_config["tracking_uri"]))
    criterion = TwoStreamCriterion(
        num_classes,
        model.embed_dim,
        alpha=cfg.loss.alpha,
        tau=cfg.loss.tau,
        rho=cfg.loss.rho,
        refinement=cfg.model.refinement,
        stream_weights=tuple(cfg.model.stream_weights),
        streams=streams,
    ).to(device)
    # NDHWC weights on CUDA (before DDP wraps the model, so its gradient buckets take that layout)
    layout = input_layout(device)
    model = ray.train.torch.prepare_model(model.to(memory_format=layout))
    if layout == torch.channels_last_3d:
        # The fusion's 1x1x1 projection weights have ambiguous strides (every spatial size is 1)
        # and get contiguous-strided gradients: the same memory, but DDP's reducer compares
        # strides literally and warns once that this "may impair performance". It does not
        # (tests/train/test_loop_cuda.py checks every gradient's real layout).
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    optimizer = torch.optim.SGD(
        model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum,
        weight_decay=cfg.optim.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg.optim))

    # ---- resume ------------------------------------------------------------------------------
    start_epoch, best, last_metrics = 0, Best(), None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = safe_load(Path(folder) / CHECKPOINT_FILE)
        unwrap(model).load_state_dict(state["model"])
        criterion.load_state_dict(state["prototypes"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch = state["epoch"] + 1
        best = Best.from_state(state["best"])
        last_metrics = state.get("metrics")
        print(f"[rank {rank}] resumed from the checkpoint of epoch {state['epoch']}")

    # Rank 0 stages its artifacts; they reach MLflow with each epoch's checkpoint (see outbox.py).
    outbox = None
    if rank == 0:
        from mg_ray.train.outbox import ArtifactOutbox

        outbox = ArtifactOutbox()
        if start_epoch == 0:
            outbox.log_text(dump_yaml(cfg), "config/resolved_config.yaml")
            outbox.log_text(dump_yaml({"model_spec": spec, "class_names": class_names}), "config/model_spec.yaml")

    # ---- epochs ------------------------------------------------------------------------------
    setup_s = time.perf_counter() - entered  # imports, data index, model, resume: reported once
    training_started_at = time.time()
    for epoch in range(start_epoch, cfg.optim.epochs):
        seed_everything(cfg.optim.seed + 1000 * epoch + rank)  # reproducible across resumes
        sampler = getattr(train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        train_stats = train_one_epoch(
            model, criterion, optimizer, train_loader, device, amp_dtype, cfg.optim.grad_clip
        )
        lr = optimizer.param_groups[0]["lr"]  # the lr this epoch trained with
        scheduler.step()
        started = time.perf_counter()
        val = evaluate(model, val_loader, device, amp_dtype, cfg.model.stream_weights, world)
        val_s = time.perf_counter() - started
        val_metrics = classification_metrics(val.stream_probs, val.fused, val.labels, "val")
        improved = val_metrics["val_top1"] > best.val_top1
        if improved:
            best = Best(
                epoch=epoch,
                val_top1=val_metrics["val_top1"],
                model={k: v.detach().cpu().clone() for k, v in unwrap(model).state_dict().items()},
                prototypes={k: v.detach().cpu().clone() for k, v in criterion.state_dict().items()},
            )
        # Key order matters: Tune's progress table shows the first four metrics it sees.
        metrics = {
            "val_top1": val_metrics["val_top1"],
            "best_val_top1": best.val_top1,
            "epochs_completed": epoch + 1,  # ASHA's time attribute (Tune's own counter restarts on restore)
            "train_loss": train_stats["train_loss"],
            "epoch": epoch,
            "lr": lr,
            **train_stats,
            **val_metrics,
            "val_s": val_s,
            "best_epoch": best.epoch,
        }
        if epoch == start_epoch:
            metrics["worker_setup_s"] = setup_s
            metrics["training_started_at"] = training_started_at  # wall clock (see bench_trial_overhead.py)
        last = epoch == cfg.optim.epochs - 1
        if last and cfg.data.test_split:
            started = time.perf_counter()
            metrics.update(final_test(model, best, cfg, class_names, device, amp_dtype, rank, world, outbox))
            metrics["test_s"] = time.perf_counter() - started

        if rank == 0:  # the metrics travel in the report
            if improved:
                clip_names = [val_set.clip_name(i) for i in val.indices]
                outbox.log_classification_report("val", val.labels, val.fused, val.stream_probs, class_names, clip_names)
            if last:
                log_best_model(outbox, best, spec, class_names, cfg, train_set.layout.name)
            with tempfile.TemporaryDirectory() as folder:
                torch.save(
                    {
                        "model": unwrap(model).state_dict(),
                        "prototypes": criterion.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "epoch": epoch,
                        "best": best.state(),
                        "metrics": {k: float(v) for k, v in metrics.items()},
                    },
                    Path(folder) / CHECKPOINT_FILE,
                )
                outbox.move_into(folder)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
        else:
            ray.train.report(metrics)  # a barrier: every rank reports

    if start_epoch >= cfg.optim.epochs and last_metrics is not None:
        # Resumed after the last epoch (the driver died between the final report and the end of
        # the run): report the final metrics again, so whoever waits for them (Tune) gets them.
        ray.train.report(last_metrics)
    if outbox is not None:
        outbox.close()


# ---------------------------------------------------------------------------------------------
# one epoch


def train_one_epoch(model, criterion, optimizer, loader, device, amp_dtype, grad_clip) -> dict[str, float]:
    """One pass over this rank's shard. Returns mean losses, throughput and the fraction of the
    epoch spent waiting for the data loader (time in `next(batch)` over wall time)."""
    model.train()
    criterion.train()
    sums: dict[str, float] = {}
    samples, steps, wait = 0, 0, 0.0
    layout = input_layout(device)
    start = time.perf_counter()
    batches = iter(loader)
    while True:
        t0 = time.perf_counter()
        try:
            batch = next(batches)
        except StopIteration:
            break
        wait += time.perf_counter() - t0
        rgb, pose = (to_device(batch.get(key), device, layout) for key in STREAMS)
        labels = batch["label"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            outputs = model(rgb, pose)
        outputs = {k: v.float() for k, v in outputs.items()}
        losses = criterion(outputs, labels)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        if grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        for key, value in losses.items():
            sums[key] = sums.get(key, 0.0) + float(value.detach()) * len(labels)
        samples += len(labels)
        steps += 1
    elapsed = time.perf_counter() - start
    stats = {f"train_{k}": v / max(samples, 1) for k, v in sums.items()}
    stats["train_samples_per_s"] = samples / elapsed if elapsed > 0 else 0.0
    stats["train_data_wait_frac"] = wait / elapsed if elapsed > 0 else 0.0
    stats["train_epoch_s"] = elapsed
    return stats


@dataclass
class Predictions:
    indices: np.ndarray                  # [N] dataset indices, sorted
    labels: np.ndarray                   # [N]
    stream_probs: dict[str, np.ndarray]  # stream -> [N, K] softmax
    fused: np.ndarray                    # [N, K]


@torch.no_grad()
def predict(model, loader, device, amp_dtype, stream_weights) -> Predictions:
    """Class probabilities for every sample of `loader` on this process.

    Test-mode items may carry several clips ([B, clips, C, T, H, W]); their probabilities are
    averaged over the clips, as in the multi-clip test protocol.
    """
    from mg_ray.models import fuse_probabilities

    model.eval()
    layout = input_layout(device)
    indices, labels, fused, streams = [], [], [], {}
    for batch in loader:
        rgb, pose = batch.get("rgb"), batch["pose"]  # no "rgb" for a pose-only model
        clips = 1
        if pose.dim() == 6:  # [B, clips, ...] -> [B * clips, ...]
            clips = pose.shape[1]
            rgb, pose = (None if x is None else x.flatten(0, 1) for x in (rgb, pose))
        rgb, pose = (to_device(x, device, layout) for x in (rgb, pose))
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            outputs = model(rgb, pose)
        outputs = {k: v.float() for k, v in outputs.items()}
        probs_fused = fuse_probabilities(outputs, stream_weights)
        fused.append(probs_fused.view(-1, clips, probs_fused.shape[-1]).mean(1).cpu())
        for stream in STREAMS:
            if f"{stream}_logits" in outputs:
                p = outputs[f"{stream}_logits"].softmax(-1)
                streams.setdefault(stream, []).append(p.view(-1, clips, p.shape[-1]).mean(1).cpu())
        labels.append(batch["label"])
        indices.append(batch["index"])
    cat = lambda xs: torch.cat(xs).numpy() if xs else np.zeros((0,))
    return Predictions(cat(indices), cat(labels), {s: cat(v) for s, v in streams.items()}, cat(fused))


def evaluate(model, loader, device, amp_dtype, stream_weights, world: int) -> Predictions:
    """Predictions over the whole split: every rank predicts its shard, then all ranks gather
    every shard so each holds the full, de-duplicated split (and the same metrics)."""
    local = predict(model, loader, device, amp_dtype, stream_weights)
    if world == 1:
        return local
    shards: list[Any] = [None] * world
    dist.all_gather_object(shards, local)
    indices = np.concatenate([s.indices for s in shards])
    order = np.argsort(indices, kind="stable")
    return Predictions(
        indices[order],
        np.concatenate([s.labels for s in shards])[order],
        {k: np.concatenate([s.stream_probs[k] for s in shards])[order] for k in local.stream_probs},
        np.concatenate([s.fused for s in shards])[order],
    )


def final_test(model, best, cfg, class_names, device, amp_dtype, rank, world, outbox) -> dict[str, float]:
    """Multi-clip test evaluation of the best weights (then the current weights are restored)."""
    from mg_ray.data import build_dataset
    from mg_ray.models import modality_streams

    current = {k: v.detach().clone() for k, v in unwrap(model).state_dict().items()}
    if best.model is not None:
        unwrap(model).load_state_dict(best.model)
    test_set = build_dataset(cfg.data, cfg.data.test_split, mode="test", num_clips=cfg.data.test_clips,
                             rgb="rgb" in modality_streams(cfg.model.modality))
    loader = DataLoader(
        Subset(test_set, range(rank, len(test_set), world)),
        batch_size=max(1, cfg.optim.batch_size // world),
        num_workers=cfg.data.num_workers,
    )
    test = evaluate(model, loader, device, amp_dtype, cfg.model.stream_weights, world)
    unwrap(model).load_state_dict(current)
    metrics = classification_metrics(test.stream_probs, test.fused, test.labels, "test")
    if outbox is not None:
        names = [test_set.clip_name(i) for i in test.indices]
        outbox.log_classification_report("test", test.labels, test.fused, test.stream_probs, class_names, names)
    return metrics


# ---------------------------------------------------------------------------------------------
# helpers


@dataclass
class Best:
    """The best validation epoch so far and its weights (kept in memory and in checkpoints)."""

    epoch: int = -1
    val_top1: float = -math.inf
    model: dict[str, torch.Tensor] | None = None
    prototypes: dict[str, torch.Tensor] | None = None

    def state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "val_top1": self.val_top1, "model": self.model, "prototypes": self.prototypes}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Best:
        return cls(**state)


def log_best_model(outbox, best: Best, spec, class_names, cfg, layout: str) -> None:
    from mg_ray.config import to_dict

    with tempfile.TemporaryDirectory() as folder:
        path = save_model_file(
            Path(folder) / MODEL_FILE,
            spec=spec,
            model_state=best.model,
            criterion_state=best.prototypes,
            class_names=class_names,
            data={**to_dict(cfg.data), "layout": layout},  # the layout actually used
            metrics={"val_top1": best.val_top1, "epoch": best.epoch},
        )
        outbox.log_file(path, "best_model")


def lr_factor(optim_cfg):
    """Multiplier of the base lr at epoch e: linear warm-up, then x gamma at each milestone."""

    def factor(epoch: int) -> float:
        warm = min(1.0, (epoch + 1) / optim_cfg.warmup_epochs) if optim_cfg.warmup_epochs else 1.0
        decays = sum(epoch >= m for m in optim_cfg.milestones)
        return warm * optim_cfg.gamma ** decays

    return factor


def to_device(x: torch.Tensor | None, device: torch.device, layout: torch.memory_format) -> torch.Tensor | None:
    """A batch tensor on `device` in `layout` (None, for a stream the model lacks, stays None)."""
    return None if x is None else x.to(device, non_blocking=True, memory_format=layout)


def input_layout(device: torch.device) -> torch.memory_format:
    """The memory layout of the model's weights and 5-D inputs on `device`.

    On CUDA, channels-last-3d (NDHWC): cuDNN's bf16 convolutions run in that layout, and with
    NCDHW tensors every convolution pays transposes around it. The paper preset's training step
    was 1.1x (batch 2) to 1.5x (batch 10) faster on an H100 (`benchmarks/bench_model.py` prints
    both layouts). On CPU the default layout is kept.
    """
    return torch.channels_last_3d if device.type == "cuda" else torch.contiguous_format


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_stream_init(cfg, model, merge, tracking_uri) -> dict[str, torch.Tensor]:
    """The two-stream initialisation from an RGB-only and a pose-only model file (paper recipe)."""
    states = {}
    for stream, location in (("rgb", cfg.model.rgb_init), ("pose", cfg.model.pose_init)):
        if location:
            content = safe_load(resolve_model_file(location, tracking_uri))
            states[stream] = content["model"]
    return merge(states.get("rgb", {}), states.get("pose", {}), model)
