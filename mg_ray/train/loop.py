"""The per-worker training loop run by Ray Train's `TorchTrainer` (one process per DDP rank).

Read top to bottom: setup (config, data, model, optimiser, resume), then one iteration per epoch
(train, evaluate on the whole validation split across ranks, checkpoint + `ray.train.report`),
and in the last epoch the multi-clip test evaluation of the best weights. Only Ray Train touches
DDP (`prepare_model`, `prepare_data_loader`); everything rank 0 alone does (checkpoint files, the
artifacts for MLflow) sits behind `if rank == 0`.

Workers never talk to MLflow (except to fetch `--rgb-init` / `--pose-init` models): metrics go out
in the reports and artifacts inside the reported checkpoints, and the Train controller logs both
into the run its driver owns (`mg_ray.train.outbox`).
"""

from __future__ import annotations

import random
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Subset

from mg_ray.config import dump_yaml, to_dict
from mg_ray.data import DataConfig, DatasetIndex, build_dataset, index_for
from mg_ray.data.transforms import network_input
from mg_ray.metrics import classification_metrics
from mg_ray.model_file import MODEL_FILE, build_from_spec, model_spec, safe_load, save_model_file
from mg_ray.models import (
    TwoStreamCriterion,
    fuse_probabilities,
    load_two_stream_state,
    merge_stream_checkpoints,
    modality_streams,
)
from mg_ray.train.checkpoint import Best, Resumed, restore_checkpoint, save_checkpoint, unwrap
from mg_ray.train.config import ExperimentConfig
from mg_ray.train.outbox import REPORTED_AGAIN, ArtifactOutbox

STREAMS = ("rgb", "pose")


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """loop_config: {"experiment": ExperimentConfig, "tracking_uri": str, "index": SharedIndex or
    None (the driver's loaded dataset index; None: this worker loads it)}."""
    entered = time.perf_counter()
    cfg: ExperimentConfig = loop_config["experiment"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, int(cfg.resources.cpus_per_worker)))
    amp = autocast_dtype(cfg.optim.amp, device)

    # ---- setup -------------------------------------------------------------------------------
    data = Data.build(cfg, rank, world, device, loop_config.get("index"))
    seed_everything(cfg.optim.seed)  # same initial weights and prototypes on every rank
    spec = model_spec(cfg.model, cfg.data, data.num_classes, data.train_set.pose_channels)
    model, criterion = build_model_and_loss(cfg, spec, device, loop_config["tracking_uri"])
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=cfg.optim.lr,
        momentum=cfg.optim.momentum,
        weight_decay=cfg.optim.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg.optim))
    training = dict(model=model, criterion=criterion, optimizer=optimizer, scheduler=scheduler)
    # rank 0 stages its artifacts; they reach MLflow with each epoch's checkpoint
    outbox = open_outbox(cfg, spec, data.class_names) if rank == 0 else None
    resumed = resume(ray.train.get_checkpoint(), training, rank, kept_checkpoints)
    if resumed.last_metrics is not None:
        # The restored epoch once more, before training goes on: the run may have been killed
        # between that epoch's checkpoint and its logging, and then neither MLflow nor Tune (its
        # scheduler and searcher decide on it) ever got it.
        report_again(resumed.last_metrics, resumed.checkpoint if rank == 0 else None)
    best = resumed.best or Best()
    setup_s = time.perf_counter() - entered  # imports, data index, model, resume: reported once
    training_started_at = time.time()

    # ---- epochs ------------------------------------------------------------------------------
    for epoch in range(resumed.start_epoch, cfg.optim.epochs):
        seed_everything(cfg.optim.seed + 1000 * epoch + rank)  # reproducible across resumes
        data.start_epoch(epoch)
        skipped_before = data.train_set.stats["bad_video"]
        train_stats = train_one_epoch(
            model, criterion, optimizer, data.train_loader, device, amp, cfg.optim.grad_clip
        )
        skipped = all_ranks_sum(data.train_set.stats["bad_video"] - skipped_before, world, device)
        lr = optimizer.param_groups[0]["lr"]  # the lr this epoch trained with
        scheduler.step()
        started = time.perf_counter()
        val = evaluate(model, data.val_loader, device, amp, cfg.model.stream_weights, world)
        val_metrics = classification_metrics(val.stream_probs, val.fused, val.labels, "val")
        improved = val_metrics["val_top1"] > best.val_top1
        if improved:
            best = Best.of(epoch, val_metrics["val_top1"], model, criterion)
        # Key order matters: Tune's progress table shows the first four metrics it sees. The
        # running best comes first: it scores the trial (`tracking.score_name`).
        metrics = {
            "best_val_top1": best.val_top1,
            "val_top1": val_metrics["val_top1"],
            "epochs_completed": epoch
            + 1,  # ASHA's time attribute (Tune's own counter restarts on restore)
            "train_loss": train_stats["train_loss"],
            "epoch": epoch,
            "lr": lr,
            **train_stats,
            "train_skipped_clips": skipped,
            **val_metrics,
            "val_s": time.perf_counter() - started,
            "best_epoch": best.epoch,
        }
        if skipped and rank == 0:
            print(
                f"epoch {epoch}: {skipped} unreadable training clip(s) skipped and replaced (data.skip_bad)"
            )
        if epoch == resumed.start_epoch:
            metrics["worker_setup_s"] = setup_s
            metrics["training_started_at"] = (
                training_started_at  # wall clock (see bench_trial_overhead.py)
            )
        last = epoch == cfg.optim.epochs - 1
        if last and cfg.data.test_split:
            started = time.perf_counter()
            metrics.update(final_test(model, best, cfg, data, device, amp, rank, world, outbox))
            metrics["test_s"] = time.perf_counter() - started

        if rank == 0 and improved:
            outbox.log_classification_report(
                "val",
                val.labels,
                val.fused,
                val.stream_probs,
                data.class_names,
                [data.val_set.clip_name(i) for i in val.indices],
            )
        if rank == 0 and last:
            log_best_model(outbox, best, spec, data.class_names, cfg, data.train_set.layout.name)
        report(
            metrics,
            outbox,
            partial(save_checkpoint, **training, epoch=epoch, best=best, metrics=metrics),
        )

    if outbox is not None:
        outbox.close()


# ---------------------------------------------------------------------------------------------
# setup and reports


@dataclass(frozen=True)
class SharedIndex:
    """A dataset index its driver loaded (and checked) once, in Ray's object store for every
    worker of every trial. `ray.get` hands a worker the keypoint arrays read-only from its node's
    shared memory, instead of each worker parsing the annotation files again and holding a copy
    of its own (`benchmarks/bench_worker_setup.py` measures both)."""

    source: tuple  # `DataConfig.index_source()` of the config it was loaded for
    ref: ray.ObjectRef

    @classmethod
    def put(cls, cfg: DataConfig, index: DatasetIndex) -> SharedIndex:
        return cls(cfg.index_source(), ray.put(index))

    def serves(self, cfg: DataConfig) -> bool:
        """`cfg` reads this index's dataset (a trial may search over another annotation file)."""
        return cfg.index_source() == self.source

    def index_for(self, cfg: DataConfig) -> DatasetIndex | None:
        """The shared index when it `serves` `cfg`, else None."""
        return ray.get(self.ref) if self.serves(cfg) else None


@dataclass
class Data:
    """This rank's index, datasets and loaders: the training shard, and its share of validation."""

    index: DatasetIndex  # also the test split's, in the last epoch
    train_set: Any
    val_set: Any
    train_loader: Any
    val_loader: DataLoader

    @property
    def class_names(self) -> list[str]:
        return list(self.train_set.class_names)

    @property
    def num_classes(self) -> int:
        return len(self.train_set.class_names)

    def start_epoch(self, epoch: int) -> None:
        """A new shuffle of the training shards every epoch (Ray Train's DistributedSampler
        shuffles by its epoch: without this, every epoch would see the same order)."""
        sampler = getattr(self.train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)

    @classmethod
    def build(
        cls,
        cfg: ExperimentConfig,
        rank: int,
        world: int,
        device: torch.device,
        shared: SharedIndex | None = None,
    ) -> Data:
        index = shared.index_for(cfg.data) if shared is not None else None
        if index is None:
            index = index_for(cfg.data)  # loaded once, for every split this worker reads
        decode = "rgb" in modality_streams(cfg.model.modality)  # pose only: no video decoded
        train_set = build_dataset(
            cfg.data, cfg.data.train_split, mode="train", rgb=decode, index=index
        )
        val_set = build_dataset(
            cfg.data, cfg.data.val_split, mode="test", num_clips=1, rgb=decode, index=index
        )
        per_worker_batch = cfg.optim.batch_size // world
        workers = cfg.data.num_workers
        train_loader = ray.train.torch.prepare_data_loader(
            DataLoader(
                train_set,
                batch_size=per_worker_batch,
                shuffle=True,
                drop_last=len(train_set) >= cfg.optim.batch_size,
                num_workers=workers,
                persistent_workers=workers > 0,
                pin_memory=device.type == "cuda",
            )
        )
        # Validation is sharded by hand (rank r takes samples r, r+world, ...) instead of with a
        # DistributedSampler, which pads with duplicates: metrics must count every sample once.
        val_loader = DataLoader(
            Subset(val_set, range(rank, len(val_set), world)),
            batch_size=per_worker_batch,
            num_workers=workers,
            persistent_workers=workers > 0,
        )
        return cls(index, train_set, val_set, train_loader, val_loader)


def resume(checkpoint, training: dict[str, Any], rank: int, older=list) -> Resumed:
    """Ray Train's checkpoint of this run (a restarted worker group, a resumed study) loaded into
    the model, criterion, optimiser and scheduler of `training`; a fresh start without one.

    A checkpoint that cannot be loaded (truncated, corrupt: `restore_checkpoint` reads the whole
    file before it changes anything) is skipped with a warning naming its file; then the other
    checkpoints Ray Train kept (`older()`, newest first) are tried, and without a loadable one
    training starts over. Ray Train itself would reload the bad file on every retry."""
    if checkpoint is None:
        return Resumed()

    def candidates():
        yield checkpoint
        yield from older()  # Ray Train is asked only once the latest has failed to load

    tried = set()
    for candidate in candidates():
        if candidate.path in tried:
            continue
        tried.add(candidate.path)
        try:
            with candidate.as_directory() as folder:
                resumed = replace(restore_checkpoint(folder, **training), checkpoint=candidate)
        except (OSError, ValueError, KeyError, TypeError) as err:
            print(f"[rank {rank}] warning: skipping checkpoint {candidate.path}: {err}")
            continue
        print(f"[rank {rank}] resumed from the checkpoint of epoch {resumed.start_epoch - 1}")
        return resumed
    print(f"[rank {rank}] warning: no loadable checkpoint; training starts over at epoch 0")
    return Resumed()


def kept_checkpoints() -> list:
    """The checkpoints Ray Train kept for this run, newest epoch first."""
    reported = ray.train.get_all_reported_checkpoints()
    ordered = sorted(reported, key=lambda r: r.metrics.get("epoch", -1), reverse=True)
    return [r.checkpoint for r in ordered]


def open_outbox(cfg: ExperimentConfig, spec: dict[str, Any], class_names: list[str]):
    """Rank 0's outbox, with the run's configuration staged each time the run (re)starts: the
    first hand-over may have been lost to a kill, and logging it again writes the same files."""
    outbox = ArtifactOutbox()
    outbox.log_text(dump_yaml(cfg), "config/resolved_config.yaml")
    outbox.log_text(
        dump_yaml({"model_spec": spec, "class_names": class_names}), "config/model_spec.yaml"
    )
    return outbox


def report(metrics: dict[str, Any], outbox, write_checkpoint) -> None:
    """`ray.train.report` of one epoch: a barrier every rank calls. Rank 0 (the one with an
    outbox) writes the checkpoint and hands it the staged artifacts."""
    if outbox is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as folder:
        write_checkpoint(folder)
        outbox.move_into(folder)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def report_again(metrics: dict[str, Any], checkpoint) -> None:
    """The restored epoch's report once more, after a resume; rank 0 (`checkpoint` not None)
    hands the restored checkpoint over again. A kill between a checkpoint and its logging (Ray
    Train persists it first) then loses nothing: MLflow gets the epoch's metrics if the run lacks
    them and its staged artifacts again (`outbox.REPORTED_AGAIN`); Tune gets the result, so
    ASHA decides on it as it would have without the kill (it ignores a result it has in its
    rungs, as Optuna does a step it has); and after the last epoch, whoever waits for the final
    result (Tune) gets it."""
    metrics = {**metrics, REPORTED_AGAIN: 1}
    if checkpoint is None:
        ray.train.report(metrics)
        return
    with checkpoint.as_directory() as restored, tempfile.TemporaryDirectory() as folder:
        # a copy: the stored checkpoint may be deleted once the new one is kept (num_to_keep)
        shutil.copytree(restored, folder, dirs_exist_ok=True)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def build_model_and_loss(
    cfg: ExperimentConfig, spec: dict[str, Any], device: torch.device, tracking_uri: str
) -> tuple[nn.Module, nn.Module]:
    """The model (initialised from single-stream runs when the config names them), wrapped by Ray
    Train for DDP, and the two-stream criterion with its prototypes, on `device`."""
    model = build_from_spec(spec)
    if cfg.model.rgb_init or cfg.model.pose_init:
        model.load_state_dict(load_stream_init(cfg, model, merge_stream_checkpoints, tracking_uri))
    loss = cfg.loss
    criterion = TwoStreamCriterion(
        spec["num_classes"],
        model.embed_dim,
        alpha=loss.alpha,
        tau=loss.tau,
        rho=loss.rho,
        a=loss.calibration,
        features=loss.features,
        probs_grad=loss.probs_grad,
        calibrate=loss.calibrate,
        refinement=cfg.model.refinement,
        stream_weights=tuple(cfg.model.stream_weights),
        streams=modality_streams(cfg.model.modality),
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
    return model, criterion


# ---------------------------------------------------------------------------------------------
# one epoch


def train_one_epoch(
    model, criterion, optimizer, loader, device, amp_dtype, grad_clip
) -> dict[str, float]:
    """One pass over this rank's shard. Returns mean losses, throughput and the fraction of the
    epoch spent waiting for the data loader (time in `next(batch)` over wall time)."""
    model.train()
    criterion.train()
    sums: dict[str, float] = {}
    samples, wait = 0, 0.0
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
    elapsed = time.perf_counter() - start
    stats = {f"train_{k}": v / max(samples, 1) for k, v in sums.items()}
    stats["train_samples_per_s"] = samples / elapsed if elapsed > 0 else 0.0
    stats["train_data_wait_frac"] = wait / elapsed if elapsed > 0 else 0.0
    stats["train_epoch_s"] = elapsed
    return stats


@dataclass
class Predictions:
    indices: np.ndarray  # [N] dataset indices, sorted
    labels: np.ndarray  # [N]
    stream_probs: dict[str, np.ndarray]  # stream -> [N, K] softmax
    fused: np.ndarray  # [N, K]


@torch.no_grad()
def predict(model, loader, device, amp_dtype, stream_weights) -> Predictions:
    """Class probabilities for every sample of `loader` on this process.

    Test-mode items may carry several clips ([B, clips, C, T, H, W]); their probabilities are
    averaged over the clips, as in the multi-clip test protocol.
    """
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
    return Predictions(
        cat(indices), cat(labels), {s: cat(v) for s, v in streams.items()}, cat(fused)
    )


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


def final_test(model, best, cfg, data, device, amp_dtype, rank, world, outbox) -> dict[str, float]:
    """Multi-clip test evaluation of the best weights (then the current weights are restored)."""
    current = {k: v.detach().clone() for k, v in unwrap(model).state_dict().items()}
    if best.model is not None:
        unwrap(model).load_state_dict(best.model)
    test_set = build_dataset(
        cfg.data,
        cfg.data.test_split,
        mode="test",
        num_clips=cfg.data.test_clips,
        rgb="rgb" in modality_streams(cfg.model.modality),
        index=data.index,
    )
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
        outbox.log_classification_report(
            "test", test.labels, test.fused, test.stream_probs, data.class_names, names
        )
    return metrics


# ---------------------------------------------------------------------------------------------
# helpers


def log_best_model(outbox, best: Best, spec, class_names, cfg, layout: str) -> None:
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
        return warm * optim_cfg.gamma**decays

    return factor


def all_ranks_sum(count: int, world: int, device: torch.device) -> int:
    """`count` summed over every rank (a collective: every rank calls it)."""
    if world == 1:
        return int(count)
    total = torch.tensor([count], dtype=torch.int64, device=device)
    dist.all_reduce(total)
    return int(total.item())


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast when asked for, or on CUDA by default (`optim.amp: auto`); None: off."""
    return torch.bfloat16 if amp == "bf16" or (amp == "auto" and device.type == "cuda") else None


def to_device(
    x: torch.Tensor | None, device: torch.device, layout: torch.memory_format
) -> torch.Tensor | None:
    """A batch tensor on `device` in `layout`, uint8 RGB normalised there (`network_input`;
    None, for a stream the model lacks, stays None)."""
    return network_input(x, device, layout)


def input_layout(device: torch.device) -> torch.memory_format:
    """The memory layout of the model's weights and 5-D inputs on `device`.

    On CUDA, channels-last-3d (NDHWC): cuDNN's bf16 convolutions run in that layout, and with
    NCDHW tensors every convolution pays transposes around it (`benchmarks/bench_model.py`
    prints both layouts). On CPU the default layout is kept.
    """
    return torch.channels_last_3d if device.type == "cuda" else torch.contiguous_format


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_stream_init(cfg, model, merge, tracking_uri) -> dict[str, torch.Tensor]:
    """The two-stream initialisation from an RGB-only and a pose-only model file (paper recipe),
    or from one two-stream model file named as both (an imported mmaction2 RGBPoseConv3D)."""
    # Imported here: mlflow is heavy, and a worker needs it only to fetch a runs:/ model.
    from mg_ray.tracking.models import resolve_model_file

    contents = {}
    for stream, location in (("rgb", cfg.model.rgb_init), ("pose", cfg.model.pose_init)):
        if location:
            contents[stream] = safe_load(resolve_model_file(location, tracking_uri))
    whole = [s for s, c in contents.items() if c["spec"]["kwargs"].get("modality") == "rgbpose"]
    if whole:
        if cfg.model.rgb_init != cfg.model.pose_init:
            location = getattr(cfg.model, f"{whole[0]}_init")
            raise ValueError(
                f"model.{whole[0]}_init: {location} is a two-stream model file; name it as both "
                f"model.rgb_init and model.pose_init to start the whole model from it"
            )
        return load_two_stream_state(contents["rgb"]["model"], model)
    return merge(
        contents.get("rgb", {}).get("model", {}), contents.get("pose", {}).get("model", {}), model
    )
