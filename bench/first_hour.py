"""A newcomer's first hour: `scgrn demo` from a fresh SCGRN_HOME, an immediate rerun, and the test suite.

    .venv/bin/python bench/first_hour.py                 # demo + rerun (a few minutes)
    .venv/bin/python bench/first_hour.py --tests         # + `make test` (about 10 more minutes on 2 cores)
    .venv/bin/python bench/first_hour.py --configs       # the demo model: time to the held-out gate per configuration

Prints the wall time per asset of the first run (the demo's own summary), then

    RESULT name=first_hour demo_s=… model_s=… gate_margin=… steps=… rerun_s=… tests_s=… goal_demo_s=300 goal_rerun_s=20

``model_s`` is the training time of ``geneformer_model`` (its ``training_report.json``), ``gate_margin`` the nats by
which its held-out masked-LM loss cleared the position-only entropy (the gate asks for 0.25), ``steps`` where it
stopped. ``--configs`` trains the demo model (on the demo's tokens, from the first run) with several architectures
and batch settings and prints, per configuration, the seconds and steps to the gate; the ratio printed is the
default configuration's time against the slowest one measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCGRN = ROOT / ".venv" / "bin" / "scgrn"

CONFIGS = {
    "default (4 layers, 128 wide, batch 16, 256 tokens, length-bucketed)": {},
    "no length bucketing": {"length_bucketing": False},
    "2 layers": {"n_layers": 2},
    "128 tokens per cell": {"max_train_length": 128},
    "batch 32": {"batch_size": 32},
    "learning rate 3e-3": {"learning_rate": 3e-3},
}


def run_demo(home: Path) -> float:
    started = time.perf_counter()
    subprocess.run([str(SCGRN), "demo"], check=True, env={**os.environ, "SCGRN_HOME": str(home)})
    return time.perf_counter() - started


def training_report(home: Path) -> dict:
    return json.loads((home / "assets" / "geneformer_model" / "training_report.json").read_text())


def run_tests() -> float:
    started = time.perf_counter()
    subprocess.run(["make", "test"], check=True, cwd=ROOT)
    return time.perf_counter() - started


def time_configs(home: Path, max_steps: int) -> None:
    sys.path.insert(0, str(ROOT))
    from scgrn_assets.lib.network.model import SmallGeneformerConfig, train_small_geneformer, training_report as report_of
    from scgrn_assets.lib.network.dictionaries import load_geneformer_dictionaries
    from scgrn_assets.lib.network.tokens import TokenizedCells

    folder = home / "assets" / "tokenized_cells"
    cells = TokenizedCells.load_npz(folder / "cells.npz")
    dictionaries = load_geneformer_dictionaries(folder)
    dictionaries.convention = cells.convention
    rows = []
    for name, overrides in CONFIGS.items():
        config = SmallGeneformerConfig(**{"max_steps": max_steps, **overrides})
        trained = train_small_geneformer(cells, dictionaries, config, device="cpu")
        report = report_of(trained, config.min_loss_margin)
        rows.append((name, report))
        print(f"{name}: {report['seconds']:.1f} s, {report['n_steps']} steps, cleared at "
              f"{report['cleared_at_step']}, margin {report['margin']:.3f}", flush=True)
    print("\n| configuration | seconds | steps | cleared at step | held-out margin (nats) |")
    print("| --- | --- | --- | --- | --- |")
    for name, report in rows:
        print(f"| {name} | {report['seconds']:.0f} | {report['n_steps']} | {report['cleared_at_step']} | "
              f"{report['margin']:.3f} |")
    default_seconds = rows[0][1]["seconds"]
    slowest = max(report["seconds"] for _, report in rows)
    print(f"RESULT name=first_hour_configs ratio={slowest / default_seconds:.2f} default_s={default_seconds:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tests", action="store_true", help="also time `make test`")
    parser.add_argument("--configs", action="store_true", help="time the demo model's configurations to the gate")
    parser.add_argument("--max-steps", type=int, default=2000, help="--configs: ceiling per configuration")
    parser.add_argument("--keep", help="SCGRN_HOME to use and keep (default: a temporary folder, removed)")
    args = parser.parse_args()
    home = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="scgrn-first-hour-"))
    try:
        demo_s = run_demo(home)
        report = training_report(home)
        rerun_s = run_demo(home)
        if args.configs:
            time_configs(home, args.max_steps)
        tests_s = run_tests() if args.tests else float("nan")
        print(f"RESULT name=first_hour demo_s={demo_s:.1f} model_s={report['seconds']:.1f} "
              f"gate_margin={report['margin']:.3f} steps={report['n_steps']} rerun_s={rerun_s:.1f} "
              f"tests_s={tests_s:.1f} goal_demo_s=300 goal_rerun_s=20 goal_tests_s=600")
    finally:
        if not args.keep:
            shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
