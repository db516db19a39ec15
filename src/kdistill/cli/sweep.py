"""``kdistill sweep CONFIG.yaml --grid alpha=0.1,0.5 temperature=2,4,8``: run every point
of a grid (each a full run in ``<out>/<key>=<value>,...``), reusing the teacher and the
scratch student across points (same stage fingerprint: trained once), then write one
comparison table (``sweep.md``, ``sweep.json``) and a plot of accuracy against each swept
value (``sweep_<key>.png``).

Grid keys are dotted config paths; ``alpha``, ``temperature``, ``epochs`` and ``lr`` are
short for the distil stage's (``stages.distil.alpha`` ...). A killed sweep continues where
it stopped when run again (finished points are skipped, an interrupted one resumes).
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

from ..atomic import atomic_write_text
from ..config import load_config
from ..errors import ConfigError
from .run import add_common

ALIASES = {
    "alpha": "stages.distil.alpha",
    "temperature": "stages.distil.temperature",
    "epochs": "stages.distil.epochs",
    "lr": "stages.distil.optimizer.lr",
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="run a grid of configs and compare them", description=__doc__)
    # optional for argparse only: --set and --grid take several words, so CONFIG may come after them
    p.add_argument("config", nargs="?", metavar="CONFIG", help="experiment YAML (required; may also come after --set or --grid)")
    p.add_argument("--grid", nargs="+", action="extend", required=True, metavar="KEY=V1,V2,...",
                   help="values to sweep, e.g. alpha=0.1,0.5 temperature=2,4,8; repeatable")
    p.add_argument("--out", default=None, help="sweep directory (default: <config output_dir>-sweep)")
    add_common(p, key_value=("overrides", "grid"))
    p.set_defaults(run=run)


def parse_grid(items: list[str]) -> dict[str, list]:
    """``["alpha=0.1,0.5"]`` -> ``{"stages.distil.alpha": [0.1, 0.5]}`` (values parsed as YAML)."""
    from ..config import yaml_load

    grid: dict[str, list] = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise ConfigError(f"--grid item {item!r} must look like key=v1,v2 (e.g. temperature=2,4,8)")
        path = ALIASES.get(key.strip(), key.strip())
        if path in grid:
            raise ConfigError(f"--grid names {key!r} twice")
        grid[path] = [yaml_load(v) for v in values.split(",")]
    return grid


def _short(path: str) -> str:
    for alias, full in ALIASES.items():
        if full == path:
            return alias
    return path


def run(args: argparse.Namespace) -> int:
    from ..experiment import run_experiment
    from ..report.compare import compare_runs, compare_table, plot_sweep

    # 1. set up: the grid, validated as configs before anything trains
    if args.config is None:
        raise ConfigError("give the experiment YAML to sweep: kdistill sweep CONFIG.yaml --grid alpha=0.1,0.5")
    grid = parse_grid(args.grid)
    base = load_config(args.config, args.overrides)
    out = Path(args.out) if args.out else Path(str(base.run_dir()) + "-sweep")
    points = []
    for values in itertools.product(*grid.values()):
        params = dict(zip(grid, values))
        label = ",".join(f"{_short(k)}={v}" for k, v in params.items())
        overrides = [*args.overrides, *(f"{k}={json.dumps(v)}" for k, v in params.items())]
        config = load_config(args.config, overrides)
        if config.teacher_store is None:  # still share the teacher within the sweep
            config = config.model_copy(update={"teacher_store": str(out / "stages-store")})
        points.append((label, params, config))
    print(f"sweep: {len(points)} runs into {out}")
    # 2. run every point
    results = []
    for i, (label, params, config) in enumerate(points, 1):
        print(f"\n=== [{i}/{len(points)}] {label}")
        metrics = run_experiment(config, run_dir=out / label, force=args.force, verbose=2 if args.quiet else 1)
        results.append((label, params, metrics))
    # 3. compare: one table, one plot per swept key (rank 0 of a multi-process sweep)
    from .. import distributed

    if not distributed.is_main():
        return 0
    rows = compare_runs([(label, m) for label, _, m in results])
    for row, (_, params, _) in zip(rows, results):
        row["params"] = {_short(k): v for k, v in params.items()}
    table = compare_table(rows)
    atomic_write_text(out / "sweep.md", f"# Sweep of {args.config}\n\n{table}\n")
    atomic_write_text(out / "sweep.json", json.dumps(rows, indent=1, default=str))
    for key in grid:
        plot_sweep(rows, _short(key), out / f"sweep_{_short(key).replace('.', '_')}.png")
    print("\n" + table)
    print(f"\nwritten: {out / 'sweep.md'}, {out / 'sweep.json'}, plots sweep_*.png")
    return 0
