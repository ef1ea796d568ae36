"""The main job: a hyperparameter study of the fused model. `python jobs/tune.py --help`."""

import sys

from mg_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
