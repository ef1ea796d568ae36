"""Pipeline files (`stages`) are validated on load like any search space: errors name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from mg_ray.config import ConfigError
from mg_ray.tune.space import Parameter, Pipeline, SearchSpace, load_space

ROOT = Path(__file__).resolve().parents[2]

GOOD = """\
base: small
fixed: {resources.num_workers: 2}
study: {seed: 0}
stages:
  rgb: {modality: rgb, study: {num_trials: 1}}
  pose: {modality: pose, fixed: {optim.epochs: 3}}
  fused:
    modality: rgbpose
    init: {rgb: rgb, pose: pose}
    study: {num_trials: 3, first_trials: [{optim.lr: 0.01, data.pose_frames: 16}]}
    parameters:
      optim.lr: {type: float, low: 0.001, high: 0.1, log: true}
      data.pose_frames: {type: categorical, choices: [16, 8]}
ensemble: {members: [rgb, pose, fused]}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(text)
    return path


def test_a_pipeline_loads_and_each_stage_is_a_study(tmp_path):
    pipeline = load_space(write(tmp_path, GOOD))
    assert isinstance(pipeline, Pipeline) and list(pipeline.stages) == ["rgb", "pose", "fused"]
    assert pipeline.register_stage == "fused"  # the last stage by default
    fused = pipeline.stage_space("fused", {"rgb": "a" * 32, "pose": "b" * 32})
    assert (
        fused.fixed["model.modality"] == "rgbpose"
        and fused.fixed["model.rgb_init"] == "runs:/" + "a" * 32
    )
    assert (
        fused.fixed["resources.num_workers"] == 2
        and fused.study.num_trials == 3
        and fused.study.seed == 0
    )
    assert pipeline.stage_space("pose").fixed["optim.epochs"] == 3
    # every pose count fits the rgb count: one Optuna parameter, under its own name
    assert fused.optuna_points() == [{"optim.lr": 0.01, "data.pose_frames": 16}]


def test_a_conditional_pose_frame_count_gets_a_name_per_rgb_count():
    import optuna

    space = SearchSpace(
        parameters={
            "data.rgb_frames": Parameter("categorical", choices=[8, 16]),
            "data.pose_frames": Parameter("categorical", choices=[32, 40]),  # 40 does not fit 16
        }
    )
    assert space.pose_frames_name(16) == "data.pose_frames|rgb=16"
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(12):
        trial = study.ask()
        drawn = space.sample(trial)
        assert drawn["data.pose_frames"] % drawn["data.rgb_frames"] == 0, drawn
        study.tell(trial, 0.0)
    names = {n for t in study.trials for n in t.params}
    assert names >= {"data.pose_frames|rgb=8", "data.pose_frames|rgb=16"}, names


def test_the_shipped_spaces_load():
    for name in ("quick", "paper"):
        space = load_space(ROOT / "search_spaces" / f"{name}.yaml")
        assert isinstance(space, (Pipeline, SearchSpace))
    assert isinstance(load_space(ROOT / "search_spaces" / "quick.yaml"), Pipeline)


@pytest.mark.parametrize(
    "change, message",
    [
        (
            ("modality: rgbpose\n", "modality: rgbpose\n    bogus: 1\n"),
            "stages.fused.bogus: unknown key",
        ),
        (
            ("  rgb: {modality: rgb,", "  rgb: {modality: depth,"),
            "stages.rgb.modality: expected one of",
        ),
        (
            ("init: {rgb: rgb, pose: pose}", "init: {rgb: rgb, pose: later}"),
            "stages.fused.init.pose: expected a stage that comes before 'fused' (one of rgb, pose), got 'later'",
        ),
        (
            ("init: {rgb: rgb, pose: pose}", "init: {rgb: pose, pose: pose}"),
            "stages.fused.init.rgb: stage 'pose' trains modality 'pose'; a rgb init needs a 'rgb' stage",
        ),
        (
            ("  pose: {modality: pose,", "  pose: {modality: pose, init: {rgb: rgb},"),
            "stages.pose.init: expected no init",
        ),
        (
            ("init: {rgb: rgb, pose: pose}", "init: {depth: rgb}"),
            "stages.fused.init: expected streams among rgb, pose",
        ),
        (
            ("members: [rgb, pose, fused]", "members: [rgb, nope]"),
            "ensemble.members: expected stage names",
        ),
        (("ensemble:", "register: nope\nensemble:"), "register: expected a stage name"),
        (
            ("optim.lr: 0.01,", "optim.lr: 5.0,"),
            "stages.fused.study.first_trials[0].optim.lr: expected a number in",
        ),
        (
            ("data.pose_frames: 16}]", "data.pose_frames: 12}]"),
            "first_trials[0].data.pose_frames: expected one of",
        ),
        (
            ("optim.lr: {type: float", "loss.gamma: {type: float"),
            "stages.fused.parameters.loss.gamma: loss.gamma: unknown key",
        ),
    ],
)
def test_a_bad_pipeline_is_refused_naming_the_key(tmp_path, change, message):
    old, new = change
    assert old in GOOD
    with pytest.raises(ConfigError) as err:
        load_space(write(tmp_path, GOOD.replace(old, new, 1)))
    assert message in str(err.value) and "pipeline.yaml" in str(err.value)
