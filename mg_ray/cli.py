"""The `mg-ray` console script: one subcommand per job.

Each subcommand lives in the module that implements it and exposes `add_arguments(parser)` and
`run(args) -> int`. Modules are imported only when their subcommand runs, so `mg-ray --help` stays
fast and importing the package has no side effects.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("mg_ray.data.synth", "write the synthetic micro-gesture dataset"),
    "prepare": ("mg_ray.prepare_job", "re-encode clips (or a frame store) for cheap random access"),
    "convert-openpose": ("mg_ray.data.openpose", "build a dataset from OpenPose JSON output"),
    "convert-imigue": (
        "mg_ray.convert_job",
        "build a dataset from the organisers' raw iMiGUE release",
    ),
    "check-data": ("mg_ray.data.check", "validate a dataset folder and print its summary"),
    "import-mmaction2": (
        "mg_ray.import_mmaction2",
        "turn an mmaction2 checkpoint into an mg-ray model file",
    ),
    "train": ("mg_ray.train.job", "train one model on a Ray cluster"),
    "tune": ("mg_ray.tune.job", "run a hyperparameter study"),
    "promote": ("mg_ray.tune.promote", "register a run's model and set its aliases"),
    "predict": ("mg_ray.predict", "classify clips with a registered model"),
    "ensemble": ("mg_ray.tune.ensemble", "combine several runs' saved predictions"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="mg-ray", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser.print_help() if not argv or argv[0] in ("-h", "--help") else parser.parse_args(argv)
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    name = argv[0]
    module = importlib.import_module(COMMANDS[name][0])
    cmd = argparse.ArgumentParser(prog=f"mg-ray {name}", description=COMMANDS[name][1])
    module.add_arguments(cmd)
    args = cmd.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except _user_errors() as err:  # evaluated only when something is raised
        print(f"mg-ray {name}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM once Ray is up (cluster.Terminated)
        signum = getattr(err, "signum", signal.SIGINT)
        print(f"mg-ray {name}: interrupted ({signal.Signals(signum).name})", file=sys.stderr)
        return 128 + signum


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that describe bad input (a file, field, value or unreachable service) in full.
    Imported only when an error is raised: several of these modules are heavy (MLflow, Ray)."""
    from mg_ray.cluster import ResourceError
    from mg_ray.config import ConfigError
    from mg_ray.data.annotations import AnnotationError
    from mg_ray.data.dataset import SkeletonError
    from mg_ray.data.imigue import ImigueError
    from mg_ray.data.openpose import ConvertError
    from mg_ray.data.prepare import PrepareError
    from mg_ray.data.video import VideoError
    from mg_ray.data.video_io import DatasetWriteError
    from mg_ray.models.mmaction2 import CheckpointImportError
    from mg_ray.paths import StorageError
    from mg_ray.serving.clips import ClipRequestError
    from mg_ray.tracking.models import ModelNotFoundError
    from mg_ray.tune.lock import StudyLocked
    from mg_ray.tune.results import NoTrialsError

    return (
        ConfigError,
        AnnotationError,
        SkeletonError,
        ImigueError,
        ConvertError,
        PrepareError,
        VideoError,
        DatasetWriteError,
        ResourceError,
        StorageError,
        ClipRequestError,
        ModelNotFoundError,
        CheckpointImportError,
        NoTrialsError,
        StudyLocked,
        FileNotFoundError,
        ConnectionError,
    )


if __name__ == "__main__":
    raise SystemExit(main())
