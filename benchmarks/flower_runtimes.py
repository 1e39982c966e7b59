"""The same federation in process, on Flower's simulation and on a localhost Flower deployment: whether the three
give the same numbers, and what each costs per round.

For each algorithm, ``tapl fit`` runs the federation three times, each in a fresh process: ``--runtime inprocess``,
``--runtime flower`` (Flower's simulation), and on a SuperLink with one SuperNode per client, each a process of its
own, launched with ``flwr run`` (:class:`~tapl.runtimes.flower_localhost.LocalDeployment`). With
``--kill-server`` the deployed run is stopped (``flwr stop``) once round 1 is checkpointed, and resumed with
``--ckpt_path last``, as after a killed server.

The federation: the demo's (real backbone and data) cut to 3 clients, one per task set, all of them in each
round. Printed per runtime: the run's wall time, the mean of its rounds' ``seconds`` (from ``metrics.jsonl``), that
mean over the in-process one, and against the in-process run: the largest absolute difference of any final global
tensor and whether ``metrics.jsonl``, ``post_federation.jsonl`` and ``results.json`` are equal.

Example (needs ``pip install -e '.[flower]'``): ``python benchmarks/flower_runtimes.py --algorithms FedAvg TAP``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tapl.run_dir import RunDirectory
from tapl.runtimes.flower_localhost import LocalDeployment

CONFIG = Path(__file__).resolve().parents[1] / "experiments" / "demo.yaml"
THREE_CLIENTS = "[{tasks: [digits], count: 1}, {tasks: [sentiment], count: 1}, {tasks: [digit_qa], count: 1}]"
FEDERATION = [
    *("--data.clients", THREE_CLIENTS),
    *("--federation.rounds", "3", "--federation.clients_per_round", "3", "--federation.local_steps", "5"),
    *("--federation.eval_every", "3", "--federation.finetune_steps", "5", "--federation.progress", "false"),
]


def records(run_dir: Path, name: str) -> list[dict]:
    lines = (run_dir / name).read_text().splitlines()
    logged = [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines if line.strip()]
    return sorted(logged, key=lambda r: r["client"]) if name == "post_federation.jsonl" else logged


def round_seconds(run_dir: Path) -> float:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return statistics.mean(json.loads(line)["seconds"] for line in lines if line.strip())


def max_difference(got: Path, expected: Path) -> float:
    def final(run_dir: Path) -> dict:
        directory = RunDirectory(run_dir)
        return directory.load_checkpoint(directory.resolve_checkpoint("last", prefer_final=True))[0]

    a, b = final(got), final(expected)
    return max((a[c][k] - t).abs().max().item() for c, params in b.items() for k, t in params.items())


def same(got: Path, expected: Path) -> str:
    differ = [n for n in ("metrics.jsonl", "post_federation.jsonl") if records(got, n) != records(expected, n)]
    if json.loads((got / "results.json").read_text()) != json.loads((expected / "results.json").read_text()):
        differ.append("results.json")
    return f"NO ({', '.join(differ)})" if differ else "yes"


def fit(args: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "tapl.cli", "fit", *args], check=True, env=os.environ)
    return time.perf_counter() - started


def deployed(flower: LocalDeployment, args: list[str], run_dir: Path, kill_server: bool) -> float:
    started = time.perf_counter()
    if kill_server:
        run_id = flower.launch(args)
        while not (run_dir / "checkpoints" / "round-000001").is_dir():
            time.sleep(0.5)
        flower.stop_run(run_id)
        print(f"stopped the deployed server after round 1 ({time.perf_counter() - started:.1f} s); resuming")
        args = [*args, "--ckpt_path", "last"]
    outcome = flower.run(args)
    if not outcome.completed:
        raise SystemExit(f"the deployed run ended {outcome.status}: {outcome.details}\n{outcome.output}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--algorithms", nargs="+", default=["FedAvg", "TAP"])
    parser.add_argument("--kill-server", action="store_true", help="stop the deployed server after round 1, resume")
    parser.add_argument("--out", type=Path, help="where the runs go (default: a temporary directory)")
    options = parser.parse_args()
    out = options.out or Path(tempfile.mkdtemp(prefix="tapl-flower-runtimes-"))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rows = []
    with LocalDeployment([0, 1, 2], out / "deployment", {"OMP_NUM_THREADS": "1"}) as flower:
        for algorithm in options.algorithms:
            base = ["--config", str(CONFIG), "--algorithm", algorithm, *FEDERATION]
            runs = {runtime: out / algorithm / runtime for runtime in ("inprocess", "simulation", "deployment")}
            seconds = {
                "inprocess": fit([*base, "--run_dir", str(runs["inprocess"])]),
                "simulation": fit([*base, "--run_dir", str(runs["simulation"]), "--runtime", "flower"]),
                "deployment": deployed(
                    flower, [*base, "--run_dir", str(runs["deployment"])], runs["deployment"], options.kill_server
                ),
            }
            reference = round_seconds(runs["inprocess"])
            for runtime, run_dir in runs.items():
                per_round = round_seconds(run_dir)
                difference = max_difference(run_dir, runs["inprocess"])
                rows.append(
                    f"| {algorithm} | {runtime} | {seconds[runtime]:.1f} | {per_round:.1f} | "
                    f"{per_round / reference:.1f} | {difference:.3g} | {same(run_dir, runs['inprocess'])} |"
                )
    print("\n| algorithm | runtime | run s | round s (mean) | round / in-process | max abs diff | same logs, results |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\nruns in {out}")


if __name__ == "__main__":
    main()
