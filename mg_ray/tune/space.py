"""Search spaces: YAML files in `search_spaces/`, validated on load, sampled by Optuna.

A space file names the training config it starts from, the fixed overrides, the study settings
and the searched parameters:

    base: small                       # a train preset (small, paper) or a train-config YAML path
    fixed:                            # dotted config keys -> values, applied to every trial
      optim.epochs: 3
    study:
      num_trials: 4
      metric: val_top1
      mode: max
      ...
    parameters:
      loss.alpha: {type: float, low: 0.02, high: 0.5, log: true}
      optim.lr:   {type: float, low: 0.01, high: 0.2, log: true}
      data.rgb_frames:  {type: categorical, choices: [4, 8]}
      data.pose_frames: {type: categorical, choices: [8, 16, 32]}
      model.fusion: {type: fixed, value: true}

Constraints between parameters: the model can only be built for some (rgb_frames, pose_frames)
pairs (`mg_ray.models.check_frame_counts`). The space samples `data.rgb_frames` first and then
`data.pose_frames` among the choices compatible with it (a define-by-run space, so Optuna never
proposes a pair the model cannot build); a space where some rgb choice has no compatible pose
choice, or where the pair is fixed to an impossible value, is refused on load.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mg_ray.config import (
    ConfigError,
    apply_overrides,
    check,
    fingerprint,
    from_mapping,
    read_yaml,
    to_dict,
)
from mg_ray.models import check_frame_counts
from mg_ray.train.config import ExperimentConfig, load_config

RGB_FRAMES, POSE_FRAMES = "data.rgb_frames", "data.pose_frames"


@dataclass
class Parameter:
    type: Literal["float", "int", "categorical", "fixed"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] | None = None
    value: Any = None

    def describe(self) -> str:
        """The range searched, in one line: `float [0.02, 0.5] log`, `categorical [8, 4]`."""
        if self.type == "categorical":
            return f"categorical {list(self.choices or [])}"
        if self.type == "fixed":
            return f"fixed {self.value!r}"
        step = f" step {self.step:g}" if self.step else ""
        return f"{self.type} [{self.low:g}, {self.high:g}]{' log' if self.log else ''}{step}"

    def validate(self) -> None:
        if self.type in ("float", "int"):
            check(
                self.low is not None and self.high is not None,
                "low",
                "both low and high for a numeric parameter",
                (self.low, self.high),
            )
            check(self.low < self.high, "high", f"a number greater than low={self.low}", self.high)
            check(not self.log or self.low > 0, "low", "a number > 0 with log: true", self.low)
            check(
                self.choices is None and self.value is None,
                "choices",
                "no choices/value for a numeric parameter",
                self.choices,
            )
            if self.type == "int":
                check(
                    float(self.low).is_integer() and float(self.high).is_integer(),
                    "low",
                    "integer bounds for an int parameter",
                    (self.low, self.high),
                )
        elif self.type == "categorical":
            check(bool(self.choices), "choices", "a non-empty list", self.choices)
            check(
                self.low is None and self.high is None,
                "low",
                "no low/high for a categorical",
                self.low,
            )
        else:  # fixed
            check(self.value is not None, "value", "a value for a fixed parameter", self.value)


@dataclass
class AshaSettings:
    grace_period: int = 1  # epochs every trial gets before it can be stopped
    reduction_factor: float = 2

    def validate(self) -> None:
        check(self.grace_period >= 1, "grace_period", "an integer >= 1", self.grace_period)
        check(self.reduction_factor > 1, "reduction_factor", "a number > 1", self.reduction_factor)


@dataclass
class StudySettings:
    num_trials: int = 4
    metric: str = "val_top1"
    mode: Literal["max", "min"] = "max"
    max_concurrent: int | None = None  # None: as many as the cluster's CPUs/GPUs allow
    # Tune's: the seconds each run of the command may take (a resumed study gets them again)
    time_budget_s: float | None = None
    seed: int = 0
    trial_driver_cpus: float = 0.1  # the Tune trial function only waits on its Train run
    # Trials started beyond what the cluster can train at once: their driver and Train
    # controller start up while the others train, and their workers start the moment a running
    # trial's CPUs are freed (`mg_ray.tune.study.max_concurrent_trials`).
    standby_trials: int = 1
    # Tune restarts a trial whose function failed (its node was lost, say) this many times; the
    # restarted trial resumes from its Train run's last checkpoint (Tune's `FailureConfig`).
    # Ray Train restarts a failed worker group on its own (`resources.max_failures`).
    trial_max_failures: int = 1
    # How long the study waits while its cluster is too small for one trial (a node lost and not
    # back) before it stops, resumable (`mg_ray.tune.watch`); null waits for ever.
    placement_timeout_s: float | None = 600
    # The study stops, resumable, when a local store it writes (checkpoints, MLflow, Optuna) has
    # less free space than this, the checkpoints' folder than this plus the largest checkpoint so
    # far (`mg_ray.tune.watch`); 0 turns the watch off.
    min_free_disk_mb: float = 100
    # Trials TPE draws at random before it models the results (Optuna's `n_startup_trials`);
    # null: Optuna's default, 10. A short search needs fewer for TPE to act at all.
    tpe_startup_trials: int | None = None
    # Configurations tried first, before the searcher's own draws (OptunaSearch's
    # `points_to_evaluate`): a known-good setting the search should start from. Each maps
    # searched parameters to values; parameters it leaves out are drawn.
    first_trials: list[dict[str, Any]] = field(default_factory=list)
    asha: AshaSettings = field(default_factory=AshaSettings)
    register_as: str = "mg-ray-fused"  # registered model name for promotion

    def validate(self) -> None:
        check(self.num_trials >= 1, "num_trials", "an integer >= 1", self.num_trials)
        check(
            self.max_concurrent is None or self.max_concurrent >= 1,
            "max_concurrent",
            "an integer >= 1 or null",
            self.max_concurrent,
        )
        check(
            self.time_budget_s is None or self.time_budget_s > 0,
            "time_budget_s",
            "a number of seconds > 0 or null",
            self.time_budget_s,
        )
        check(
            self.trial_driver_cpus >= 0,
            "trial_driver_cpus",
            "a number >= 0",
            self.trial_driver_cpus,
        )
        check(self.standby_trials >= 0, "standby_trials", "an integer >= 0", self.standby_trials)
        check(
            self.placement_timeout_s is None or self.placement_timeout_s > 0,
            "placement_timeout_s",
            "a number of seconds > 0 or null",
            self.placement_timeout_s,
        )
        check(
            self.min_free_disk_mb >= 0,
            "min_free_disk_mb",
            "a number of MB >= 0",
            self.min_free_disk_mb,
        )
        check(
            self.tpe_startup_trials is None or self.tpe_startup_trials >= 1,
            "tpe_startup_trials",
            "null or an integer >= 1",
            self.tpe_startup_trials,
        )
        check(
            self.trial_max_failures >= 0,
            "trial_max_failures",
            "an integer >= 0",
            self.trial_max_failures,
        )


@dataclass
class SearchSpace:
    base: str = "small"
    fixed: dict[str, Any] = field(default_factory=dict)
    study: StudySettings = field(default_factory=StudySettings)
    parameters: dict[str, Parameter] = field(default_factory=dict)
    source: str = "<memory>"

    # ------------------------------------------------------------------ sampling
    def sample(self, trial) -> dict[str, Any]:
        """Optuna define-by-run: draw one configuration (dotted keys -> values)."""
        params: dict[str, Any] = {}
        for name, p in self.parameters.items():
            if name == POSE_FRAMES:
                continue  # drawn after rgb_frames, conditioned on it
            params[name] = _suggest(trial, name, p)
        if POSE_FRAMES in self.parameters:
            p = self.parameters[POSE_FRAMES]
            rgb = params.get(RGB_FRAMES, self.fixed_value(RGB_FRAMES))
            if p.type == "categorical":
                allowed = [c for c in p.choices if _frames_ok(rgb, c)]
                params[POSE_FRAMES] = trial.suggest_categorical(self.pose_frames_name(rgb), allowed)
            else:
                params[POSE_FRAMES] = _suggest(trial, POSE_FRAMES, p)
        return params

    def pose_frames_name(self, rgb_frames: Any) -> str:
        """The name Optuna draws the pose frame count under. Optuna needs a fixed choice list per
        parameter name: when some pose counts do not fit some rgb count, the draw is conditional
        and gets a name of its own for each rgb value (`data.pose_frames|rgb=8`); when every pair
        fits (quick.yaml), it is one parameter, `data.pose_frames`, as in every plot."""
        p = self.parameters.get(POSE_FRAMES)
        rgb = _values(self.parameters.get(RGB_FRAMES), self.fixed_value(RGB_FRAMES))
        pose = list(p.choices or []) if p is not None else []
        if all(_frames_ok(r, c) for r in rgb for c in pose):
            return POSE_FRAMES
        return f"{POSE_FRAMES}|rgb={rgb_frames}"

    def optuna_points(self) -> list[dict[str, Any]]:
        """`study.first_trials` under the parameter names `sample` gives Optuna (a conditional
        pose frame count is drawn under a name of its own for each rgb value)."""
        points = []
        for first in self.study.first_trials:
            point = dict(first)
            if (
                POSE_FRAMES in point
                and self.parameters.get(POSE_FRAMES, Parameter("fixed")).type == "categorical"
            ):
                rgb = point.get(RGB_FRAMES, self.fixed_value(RGB_FRAMES))
                point[self.pose_frames_name(rgb)] = point.pop(POSE_FRAMES)
            points.append(point)
        return points

    def frame_pairs(self) -> list[tuple[int, int]]:
        """Every (rgb_frames, pose_frames) pair `sample` can propose: the searched or fixed
        values, less the pairs `check_frame_counts` refuses (which `sample` never draws)."""
        rgb = _values(self.parameters.get(RGB_FRAMES), self.fixed_value(RGB_FRAMES))
        pose = _values(self.parameters.get(POSE_FRAMES), self.fixed_value(POSE_FRAMES))
        return [(int(r), int(p)) for r in rgb for p in pose if _frames_ok(r, p)]

    def fixed_value(self, key: str) -> Any:
        """The value every trial has for `key` when it is not searched: a fixed parameter, a
        fixed override, else the base config's."""
        p = self.parameters.get(key)
        if p is not None and p.type == "fixed":
            return p.value
        if key in self.fixed:
            return self.fixed[key]
        node: Any = base_config_dict(self)
        for part in key.split("."):
            node = node[part]
        return node


STREAM_MODALITY = {"rgb": "rgb", "pose": "pose"}  # init stream -> the modality its stage must train


@dataclass
class StageSpec:
    """One stage of a pipeline: a study of one modality, optionally initialised from the best
    runs of earlier stages (`init`: stream -> stage name; an `rgbpose` stage only)."""

    modality: Literal["rgb", "pose", "rgbpose"]
    init: dict[str, str] = field(default_factory=dict)
    fixed: dict[str, Any] = field(default_factory=dict)
    study: dict[str, Any] = field(
        default_factory=dict
    )  # overrides of the pipeline's study settings
    parameters: dict[str, Parameter] = field(default_factory=dict)

    def validate(self) -> None:
        unknown = sorted(set(self.init) - set(STREAM_MODALITY))
        check(not unknown, "init", f"streams among {', '.join(STREAM_MODALITY)}", unknown)
        check(
            not self.init or self.modality == "rgbpose",
            "init",
            "no init for a single-stream stage (only an rgbpose stage merges single-stream runs)",
            self.init,
        )


@dataclass
class EnsembleSpec:
    """The pipeline's last step: a score ensemble of the best model of each member stage."""

    members: list[str] = field(default_factory=list)

    def validate(self) -> None:
        check(
            len(self.members) >= 2 and len(set(self.members)) == len(self.members),
            "members",
            "at least two different stage names",
            self.members,
        )


@dataclass
class Pipeline:
    """A search-space file with `stages`: the paper's recipe as one resumable study.

    base: small
    fixed: {...}               # every stage
    study: {...}               # every stage's study settings (a stage's `study` overrides)
    stages:                    # run in this order
      rgb:   {modality: rgb, fixed: {...}}
      pose:  {modality: pose, fixed: {...}}
      fused: {modality: rgbpose, init: {rgb: rgb, pose: pose}, parameters: {...}}
    ensemble: {members: [rgb, pose, fused]}
    register: fused            # whose best trial is registered (default: the last stage)
    """

    base: str = "small"
    fixed: dict[str, Any] = field(default_factory=dict)
    study: dict[str, Any] = field(default_factory=dict)
    stages: dict[str, StageSpec] = field(default_factory=dict)
    ensemble: EnsembleSpec | None = None
    register: str | None = None
    source: str = "<memory>"

    def validate(self) -> None:
        check(bool(self.stages), "stages", "at least one stage", self.stages)
        names = list(self.stages)
        for name, stage in self.stages.items():
            for stream, source in stage.init.items():
                key = f"stages.{name}.init.{stream}"
                if source not in names[: names.index(name)]:
                    raise ConfigError(
                        f"{key}: expected a stage that comes before {name!r} "
                        f"(one of {', '.join(names[: names.index(name)]) or 'none'}), got {source!r}"
                    )
                if self.stages[source].modality != STREAM_MODALITY[stream]:
                    raise ConfigError(
                        f"{key}: stage {source!r} trains modality {self.stages[source].modality!r}; "
                        f"a {stream} init needs a {STREAM_MODALITY[stream]!r} stage"
                    )
        for member in self.ensemble.members if self.ensemble else ():
            check(
                member in self.stages,
                "ensemble.members",
                f"stage names among {', '.join(names)}",
                member,
            )
        check(
            self.register is None or self.register in self.stages,
            "register",
            f"a stage name among {', '.join(names)}",
            self.register,
        )

    @property
    def register_stage(self) -> str:
        return self.register or list(self.stages)[-1]

    def stage_space(self, name: str, init_runs: dict[str, str] | None = None) -> SearchSpace:
        """The study of stage `name` as a `SearchSpace`; `init_runs`: stream -> the MLflow run id
        its weights come from (the best run of the stage its `init` names)."""
        stage = self.stages[name]
        fixed = {**self.fixed, **stage.fixed, "model.modality": stage.modality}
        for stream, run_id in (init_runs or {}).items():
            fixed[f"model.{stream}_init"] = f"runs:/{run_id}"
        study = from_mapping(StudySettings, {**self.study, **stage.study}, "study")
        return SearchSpace(
            base=self.base,
            fixed=fixed,
            study=study,
            parameters=dict(stage.parameters),
            source=f"{self.source}#stages.{name}",
        )


def load_space(path: str | Path) -> SearchSpace | Pipeline:
    """Load and validate a search-space YAML: a single study (`parameters`), or a pipeline of
    stages (`stages`). Errors name the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: search-space file not found")
    data = read_yaml(path.read_text(), str(path))
    try:
        if isinstance(data, dict) and "stages" in data:
            pipeline = from_mapping(Pipeline, {**data, "source": str(path)})
            for name in pipeline.stages:  # each stage as the study it runs, checked like any space
                try:
                    _validate_against_config(
                        pipeline.stage_space(
                            name, {s: "0" * 32 for s in pipeline.stages[name].init}
                        )
                    )
                except ConfigError as err:
                    raise ConfigError(f"stages.{name}.{err}") from None
            return pipeline
        space = from_mapping(SearchSpace, {**data, "source": str(path)})
        _validate_against_config(space)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    return space


def definition_fingerprint(space: SearchSpace | Pipeline) -> str:
    """What a study (or pipeline) was started with: the same name with another fingerprint is
    refused (`mg_ray.tracking.start_or_resume_run`)."""
    return fingerprint(space)


def base_config_dict(space: SearchSpace) -> dict[str, Any]:
    """The base training config as a nested dict, before fixed values and trial parameters."""
    return to_dict(load_config(space.base, {}))


def trial_overrides(space: SearchSpace, params: dict[str, Any]) -> dict[str, Any]:
    """Dotted-key overrides of one trial: fixed values, fixed parameters, sampled parameters."""
    out = dict(space.fixed)
    out.update({n: p.value for n, p in space.parameters.items() if p.type == "fixed"})
    out.update(params)
    return out


# ---------------------------------------------------------------------------------------------


def _suggest(trial, name: str, p: Parameter) -> Any:
    if p.type == "float":
        return trial.suggest_float(name, p.low, p.high, log=p.log, step=p.step)
    if p.type == "int":
        return trial.suggest_int(name, int(p.low), int(p.high), log=p.log, step=int(p.step or 1))
    if p.type == "categorical":
        return trial.suggest_categorical(name, p.choices)
    return p.value


def _frames_ok(rgb_frames: Any, pose_frames: Any) -> bool:
    try:
        check_frame_counts(int(rgb_frames), int(pose_frames))
        return True
    except (ValueError, TypeError):
        return False


def _validate_against_config(space: SearchSpace) -> None:
    """Every searched/fixed key must be a real config key of the right type, and the frame-count
    constraint must leave at least one buildable pair for every rgb choice."""
    try:
        base = base_config_dict(space)
    except ConfigError as err:
        raise ConfigError(f"base: {err}") from None
    for name, p in space.parameters.items():
        # one representative value per parameter, type-checked through the config loader
        probe = (
            p.value if p.type == "fixed" else (p.choices[0] if p.type == "categorical" else p.low)
        )
        if p.type == "int":
            probe = int(probe)
        try:
            from_mapping(ExperimentConfig, apply_overrides(base, {**space.fixed, name: probe}))
        except ConfigError as err:
            raise ConfigError(f"parameters.{name}: {err}") from None
        if p.type == "categorical":
            for choice in p.choices:
                try:
                    from_mapping(
                        ExperimentConfig, apply_overrides(base, {**space.fixed, name: choice})
                    )
                except ConfigError as err:
                    raise ConfigError(f"parameters.{name}: choice {choice!r}: {err}") from None
    try:
        from_mapping(ExperimentConfig, apply_overrides(base, space.fixed))
    except ConfigError as err:
        raise ConfigError(f"fixed: {err}") from None

    for i, first in enumerate(space.study.first_trials):
        for name, value in first.items():
            p = space.parameters.get(name)
            key = f"study.first_trials[{i}].{name}"
            if p is None or p.type == "fixed":
                raise ConfigError(
                    f"{key}: expected one of the searched parameters "
                    f"({', '.join(n for n, q in space.parameters.items() if q.type != 'fixed')})"
                )
            if p.type == "categorical" and value not in p.choices:
                raise ConfigError(f"{key}: expected one of {p.choices}, got {value!r}")
            if p.type in ("float", "int") and not (
                isinstance(value, (int, float)) and p.low <= value <= p.high
            ):
                raise ConfigError(f"{key}: expected a number in [{p.low}, {p.high}], got {value!r}")
        if RGB_FRAMES in first or POSE_FRAMES in first:
            rgb = first.get(RGB_FRAMES, space.fixed.get(RGB_FRAMES, base["data"]["rgb_frames"]))
            pose = first.get(POSE_FRAMES, space.fixed.get(POSE_FRAMES, base["data"]["pose_frames"]))
            if not _frames_ok(rgb, pose):
                raise ConfigError(
                    f"study.first_trials[{i}]: data.rgb_frames={rgb} with data.pose_frames={pose} "
                    f"builds no model (see mg_ray.models.check_frame_counts)"
                )

    rgb_p, pose_p = space.parameters.get(RGB_FRAMES), space.parameters.get(POSE_FRAMES)
    rgb_values = _values(rgb_p, space.fixed.get(RGB_FRAMES, base["data"]["rgb_frames"]))
    pose_values = _values(pose_p, space.fixed.get(POSE_FRAMES, base["data"]["pose_frames"]))
    if pose_p is not None and pose_p.type in ("float", "int"):
        raise ConfigError(
            f"parameters.{POSE_FRAMES}: expected type categorical or fixed (frame counts are "
            f"constrained by the model), got {pose_p.type}"
        )
    if rgb_p is not None and rgb_p.type in ("float", "int"):
        raise ConfigError(
            f"parameters.{RGB_FRAMES}: expected type categorical or fixed, got {rgb_p.type}"
        )
    for rgb in rgb_values:
        if not any(_frames_ok(rgb, pose) for pose in pose_values):
            raise ConfigError(
                f"parameters.{POSE_FRAMES}: no choice in {pose_values} builds a model with "
                f"data.rgb_frames={rgb} (pose_frames must be a multiple of rgb_frames the model "
                f"supports; see mg_ray.models.check_frame_counts): impossible constraint"
            )


def _values(p: Parameter | None, default: Any) -> list[Any]:
    if p is None:
        return [default]
    if p.type == "categorical":
        return list(p.choices)
    if p.type == "fixed":
        return [p.value]
    return [p.low, p.high]
