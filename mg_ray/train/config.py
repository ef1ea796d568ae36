"""Configuration of one training run: data, model, loss, optimisation, resources, tracking.

A YAML file (see `configs/`) maps onto `ExperimentConfig`; `from_mapping` refuses unknown keys and
wrong types, and each section's `validate()` checks ranges and combinations, naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from mg_ray.config import ConfigError, apply_overrides, check, from_mapping, read_yaml
from mg_ray.data.config import DataConfig


@dataclass
class ModelConfig:
    preset: Literal["small", "paper"] = "small"
    modality: Literal["rgbpose", "rgb", "pose"] = "rgbpose"
    fusion: bool = True
    refinement: bool = True
    embed_dim: int | None = None  # None: the preset's default
    dropout: float | None = None
    # The pooling before the prototype loss's embedding: "max" is the paper's and PCAN's; "avg"
    # shares the classifier's (mmaction2's) average pooling and is the default because the
    # learnability recipe needs it (tests/e2e/test_pipeline.py, one run each: max gave the
    # fused model 0.50 against the pose-only model's 0.57, avg 0.53 against 0.51).
    embed_pool: Literal["max", "avg"] = "avg"
    stream_weights: tuple[float, float] = (1.0, 1.0)
    # Two-stream initialisation from single-stream runs (paper recipe, section 7): each is a
    # `best_model.pt` path, an MLflow `runs:/<run_id>` URI, or None.
    rgb_init: str | None = None
    pose_init: str | None = None

    def validate(self) -> None:
        check(
            self.embed_dim is None or self.embed_dim > 0,
            "embed_dim",
            "a positive integer",
            self.embed_dim,
        )
        check(
            self.dropout is None or 0 <= self.dropout < 1,
            "dropout",
            "a number in [0, 1)",
            self.dropout,
        )
        check(
            all(w >= 0 for w in self.stream_weights) and sum(self.stream_weights) > 0,
            "stream_weights",
            "two non-negative weights, not both 0",
            self.stream_weights,
        )
        if (self.rgb_init or self.pose_init) and self.modality != "rgbpose":
            raise ConfigError(
                f"rgb_init: initialising from single-stream runs needs modality 'rgbpose', "
                f"got modality {self.modality!r}"
            )


@dataclass
class LossConfig:
    """The prototypical refinement loss (`mg_ray.models.prototype`, whose docstring gives each
    variant's source). Defaults: FR-Head's values and variants, except unit features in the
    class means and p's gradient kept (PCAN), which the learnability test was tuned with."""

    alpha: float = 0.1  # weight of the prototypical refinement loss (FR-Head 0.1, PCAN 0.2)
    tau: float = 0.125  # temperature of the cosine scores (FR-Head)
    rho: float = 0.9  # EMA momentum of the prototypes (FR-Head)
    # `a` in the FN/FP calibration terms: a number (FR-Head: 0.125), or "tau" to tie it to tau
    # as the paper's eq. 9 reads; a search space can search it like any other number
    calibration: float | Literal["tau"] = 0.125
    features: Literal["unit", "raw"] = "unit"  # what the class means average (raw: FR-Head)
    probs_grad: Literal["keep", "detach"] = (
        "keep"  # p = softmax(logits): PCAN keeps, FR-Head detaches
    )
    calibrate: Literal["all", "tp"] = (
        "all"  # every sample of class y (FR-Head), or TP anchors (eq. 7-8)
    )

    def validate(self) -> None:
        check(self.alpha >= 0, "alpha", "a number >= 0", self.alpha)
        check(self.tau > 0, "tau", "a number > 0", self.tau)
        check(0 <= self.rho < 1, "rho", "a number in [0, 1)", self.rho)
        check(
            self.calibration == "tau" or self.calibration >= 0,
            "calibration",
            "a number >= 0 or 'tau'",
            self.calibration,
        )


@dataclass
class OptimConfig:
    epochs: int = 30
    batch_size: int = 10  # global batch, split evenly over the workers
    lr: float = 0.0075
    momentum: float = 0.9
    weight_decay: float = 1e-4
    milestones: list[int] = field(default_factory=lambda: [8, 22])
    gamma: float = 0.1
    warmup_epochs: int = 0
    grad_clip: float | None = 40.0
    seed: int = 0
    amp: Literal["auto", "bf16", "off"] = "auto"  # auto: bf16 autocast on GPU, off on CPU

    def validate(self) -> None:
        check(self.epochs >= 1, "epochs", "an integer >= 1", self.epochs)
        check(self.batch_size >= 1, "batch_size", "an integer >= 1", self.batch_size)
        check(self.lr > 0, "lr", "a number > 0", self.lr)
        check(0 <= self.momentum < 1, "momentum", "a number in [0, 1)", self.momentum)
        check(self.weight_decay >= 0, "weight_decay", "a number >= 0", self.weight_decay)
        check(
            list(self.milestones) == sorted(set(self.milestones))
            and all(m > 0 for m in self.milestones),
            "milestones",
            "strictly increasing positive epochs",
            self.milestones,
        )
        check(0 < self.gamma <= 1, "gamma", "a number in (0, 1]", self.gamma)
        check(
            0 <= self.warmup_epochs < self.epochs,
            "warmup_epochs",
            f"an integer in [0, epochs={self.epochs})",
            self.warmup_epochs,
        )
        check(
            self.grad_clip is None or self.grad_clip > 0,
            "grad_clip",
            "a number > 0 or null",
            self.grad_clip,
        )


@dataclass
class ResourcesConfig:
    num_workers: int = 2  # Ray Train workers (DDP ranks)
    cpus_per_worker: float = 1.0  # fractional values are allowed
    use_gpu: bool = False
    # with use_gpu: a GPU's share per worker; 0.5 lets two workers (two trials) share one GPU
    gpus_per_worker: float = 1.0
    max_failures: int = 2  # worker-group restarts from the last checkpoint

    def validate(self) -> None:
        check(self.num_workers >= 1, "num_workers", "an integer >= 1", self.num_workers)
        check(self.cpus_per_worker > 0, "cpus_per_worker", "a number > 0", self.cpus_per_worker)
        check(
            0 < self.gpus_per_worker <= 1,
            "gpus_per_worker",
            "a number in (0, 1] (a GPU's share per worker)",
            self.gpus_per_worker,
        )
        check(self.max_failures >= 0, "max_failures", "an integer >= 0", self.max_failures)


@dataclass
class TrackingConfig:
    # None: MLFLOW_TRACKING_URI when set, else the sqlite store under $MG_RAY_HOME.
    tracking_uri: str | None = None
    experiment: str = "mg-ray"
    run_name: str | None = None
    # MLflow system metrics (CPU, memory, disk, network; GPU where present) of the node that runs
    # the training's driver or the trial, every `system_metrics_interval_s` seconds.
    system_metrics: bool = True
    system_metrics_interval_s: float = 10.0


@dataclass
class ExperimentConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def validate(self) -> None:
        workers = self.resources.num_workers
        if self.optim.batch_size % workers:
            raise ConfigError(
                f"optim.batch_size: expected a multiple of resources.num_workers={workers} "
                f"(the global batch is split evenly over the workers), got {self.optim.batch_size}"
            )


def load_config(source: str, overrides: dict[str, Any]) -> ExperimentConfig:
    """A preset name (packaged YAML: small, paper) or a YAML path, with dotted-key overrides
    applied; errors name the file and the key."""
    path = Path(source)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"{source}: config file not found")
        text, where = path.read_text(), str(path)
    else:
        preset = resources.files("mg_ray.configs") / f"{source}.yaml"
        if not preset.is_file():
            raise ConfigError(
                f"--config: {source!r} is neither a YAML file nor a preset (small, paper)"
            )
        text, where = preset.read_text(), f"preset {source}"
    data = read_yaml(text, where)
    try:
        return from_mapping(ExperimentConfig, apply_overrides(data, overrides))
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
