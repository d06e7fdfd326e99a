"""Entry point for `ray job submit --working-dir . -- python jobs/train.py --config X.yaml`.

Runs inside the cluster as the job's driver: the same validation, progress and summary as
`raysys run`, on the cluster the job was submitted to.
"""

from __future__ import annotations

import argparse
import sys

import ray

from raysys.data.sources import DataError
from raysys.runner import NAMESPACE, run_job
from raysys.spec import load_spec
from raysys.yamlio import ConfigError


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--summary", default=None)
    parser.add_argument("--run-dir", default=None,
                        help="spec.json, events.jsonl, summary.json (default runs/<job>-<time>/)")
    args = parser.parse_args()
    try:
        spec = load_spec(args.config)
        ray.init(address="auto", namespace=NAMESPACE, log_to_driver=False)
        run_job(spec, resume=args.resume, summary_path=args.summary, run_dir=args.run_dir)
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
