"""One training run of the fused model on a Ray cluster: `python jobs/train.py --help`."""

import sys

from mg_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
