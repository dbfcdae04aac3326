"""SAM's own host cost per step, this checkout against another one, in one interleaved run.

The optimiser's work on a step (``first_step`` + ``second_step``, the gradients set once, no forward or backward)
on a network of 57 small tensors (28 ``Linear(8, 8)`` and the head), where Python on the host, not arithmetic,
decides the time: the cost that dominates a GPU step for small and medium models. Each round runs every source tree
in a fresh process (so each imports its own flatminima), the trees taking turns in alternating order; the table
gives the median and the minimum microseconds per step over the rounds. It is how a change to ``optim/`` shows that
it costs the step nothing:

    git worktree add /tmp/before <commit>
    python benchmarks/bench_host_cost.py --against /tmp/before/src

``--rounds`` (default 7) and ``--steps`` (timed steps per round, default 2000) set the length (about 1 minute);
``--output FILE`` also writes the report.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from _common import med, start_report

HERE_SRC = Path(__file__).resolve().parents[1] / "src"

# run in a child process with PYTHONPATH set to one tree's src/: prints microseconds per step
CHILD = """
import sys, time, torch
from torch import nn
torch.set_num_threads(1)
import flatminima
torch.manual_seed(0)
layers = []
for _ in range(28):
    layers += [nn.Linear(8, 8), nn.Tanh()]
model = nn.Sequential(*layers, nn.Linear(8, 3))
nn.CrossEntropyLoss()(model(torch.randn(16, 8)), torch.randint(0, 3, (16,))).backward()
opt = flatminima.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=1e-6, momentum=0.9)
steps = int(sys.argv[1])
for _ in range(100):
    opt.first_step(); opt.second_step()
start = time.perf_counter()
for _ in range(steps):
    opt.first_step(); opt.second_step()
print((time.perf_counter() - start) / steps * 1e6)
"""


def time_tree(src: Path, steps: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(steps)], env=env, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise SystemExit(f"the run on {src} failed:\n{result.stderr}")
    return float(result.stdout.strip())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--against", type=Path, action="append", default=[], help="another checkout's src/ folder")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.steps < 1:
        parser.error("--rounds and --steps must be >= 1")
    trees = [HERE_SRC, *args.against]
    for tree in trees:
        if not (tree / "flatminima" / "__init__.py").is_file():
            parser.error(f"{tree} holds no flatminima package; give a checkout's src/ folder")
    report = start_report("SAM's host cost per step")
    times: dict[Path, list[float]] = {tree: [] for tree in trees}
    for round_index in range(args.rounds):
        order = trees if round_index % 2 == 0 else trees[::-1]
        for tree in order:
            times[tree].append(time_tree(tree, args.steps))
    base = med(times[HERE_SRC])
    rows = [
        [
            "this checkout" if tree == HERE_SRC else str(tree),
            f"{med(values):.1f}",
            f"{min(values):.1f}",
            f"{med(values) / base:.3f}",
        ]
        for tree, values in times.items()
    ]
    report.table(
        f"first_step + second_step on 57 tensors, SGD with momentum, 1 thread; {args.rounds} interleaved rounds of "
        f"{args.steps} steps",
        ["source", "median us / step", "min us / step", "relative to this checkout"],
        rows,
    )
    if args.output is not None:
        args.output.write_text("\n".join(report.lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
