"""Entry point for `ray job submit --working-dir . -- python jobs/train_agent.py [OPTIONS]`.

Trains the RL policy on the cluster the job was submitted to (RAY_ADDRESS is set there, so
training joins that cluster instead of starting its own); OPTIONS are those of
`raysys agent train` (--minutes, --seed, --exclude-trace, --out, --ship, ...).
"""

from __future__ import annotations

import sys

from raysys.agent.cli import main

if __name__ == "__main__":
    sys.exit(main(["agent", "train", *sys.argv[1:]]))
