"""The main job: a hyperparameter study of the fused model. `python jobs/tune.py --help`."""

import sys
from pathlib import Path

# `ray job submit --working-dir .` runs this from an uploaded copy of the repository: import the
# package from that copy (the code the job was submitted with), installed or not.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mg_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
