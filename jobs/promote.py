"""Register a run's best model and set its aliases by hand. `python jobs/promote.py --help`."""

import sys

from mg_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["promote", *sys.argv[1:]]))
