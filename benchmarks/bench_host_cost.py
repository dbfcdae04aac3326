"""SAM's own host cost per step, this checkout against other ones and a peer implementation, in one interleaved run.

The optimiser's work on a step (``first_step`` + ``second_step``, the gradients set once, no forward or backward)
on a network of 58 small tensors (28 ``Linear(8, 8)`` with ``Tanh`` between them, and a ``Linear(8, 3)`` head),
SGD with momentum 0.9 as the base optimiser, one thread: Python on the host, not arithmetic, decides the time, the
cost that dominates a GPU step for small and medium models. Each round runs every source tree, and the peer, in a
fresh process (so each imports its own flatminima), taking turns in alternating order; the table gives the median
and the minimum microseconds per step over the rounds.

The peer is pytorch_optimizer's ``SAM`` on the same network, base optimiser and gradients, timed on
``first_step(zero_grad=False)`` + ``second_step(zero_grad=False)`` (its signature in 4.1.0); ``--peer-site DIR``
names a directory holding the ``pytorch_optimizer`` package (e.g. ``pip install --no-deps --target DIR
pytorch_optimizer``), put on the peer's PYTHONPATH after this checkout's src/. Without it the peer is looked for
in the environment; when it cannot be imported its row is left out and the reason printed. ``--no-peer`` leaves
it out.

Beside the time, each row gives the aten operations dispatched per step, counted over 10 steps with a
``TorchDispatchMode`` after the timing (not during it), and the most frequent of them. On these tensors (64
numbers at most) each aten operation's kernel is tens of nanoseconds while the dispatch around it, and the
Python binding that calls it, is about a microsecond or two: the wall time per step *is* the host time, and the
aten count says how much of it is dispatch that the Python code asked for. A separate "Python time outside aten"
figure is not given because it cannot be measured robustly here: wall time minus the summed self time of aten
events from ``torch.profiler`` came out negative for some rows and larger for ``nonfinite="ignore"`` than for
``"raise"``, since the profiler's own cost per recorded event (about a microsecond, also on the nested events
inside ``_foreach_norm`` and ``stack``) is as large as the operations it times.

It is how a change to ``optim/`` shows what it costs the step, and where the step stands against the peer:

    git worktree add /tmp/before <commit>
    python benchmarks/bench_host_cost.py --against /tmp/before/src --peer-site /tmp/po_site

A second table times whole training steps (forward, backward and ``SAM.step(closure)``) of SGD, SAM, Momentum-SAM,
LookSAM and periodic SAM (both ascending every 5th step) per tree, each against SGD's step in the same tree: SAM's
step should cost about two SGD steps, and a variant with fewer passes should cost about its passes, paying no host
cost for the phases its plan skips.

``--rounds`` (default 7) and ``--steps`` (timed steps per round, default 2000) set the length; ``--train-steps``
(default 300, 0 to leave the second table out) that of the training steps (about 4 minutes in all);
``--nonfinite raise|skip|ignore`` builds our SAM with that policy (default: the tree's own default, ``"raise"``);
``--output FILE`` also writes the report.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from _common import med, start_report

HERE_SRC = Path(__file__).resolve().parents[1] / "src"
PEER = "peer"  # the key of the peer's times, beside the trees' paths
OP_STEPS = 10  # steps under the aten op counter, after the timing

# run in a child process with PYTHONPATH set to one tree's src/ (and the peer's site): prints one JSON line with
# microseconds per step, aten ops per step and the most frequent ops; argv: kind ("ours" or "peer"), steps,
# nonfinite ("" for the tree's default)
CHILD = """
import collections, json, sys, time, torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
torch.set_num_threads(1)
kind, steps, nonfinite = sys.argv[1], int(sys.argv[2]), sys.argv[3]
torch.manual_seed(0)
layers = []
for _ in range(28):
    layers += [nn.Linear(8, 8), nn.Tanh()]
model = nn.Sequential(*layers, nn.Linear(8, 3))
nn.CrossEntropyLoss()(model(torch.randn(16, 8)), torch.randint(0, 3, (16,))).backward()
if kind == "ours":
    import flatminima
    options = {"nonfinite": nonfinite} if nonfinite else {}
    opt = flatminima.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=1e-6, momentum=0.9, **options)
    def step():
        opt.first_step(); opt.second_step()
    where = flatminima.__file__
else:
    import pytorch_optimizer
    opt = pytorch_optimizer.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=1e-6, momentum=0.9)
    def step():
        opt.first_step(zero_grad=False); opt.second_step(zero_grad=False)
    where = pytorch_optimizer.__file__
for _ in range(100):
    step()
start = time.perf_counter()
for _ in range(steps):
    step()
us = (time.perf_counter() - start) / steps * 1e6

class Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "aten":
            self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

with Count() as count:
    for _ in range(OP_STEPS):
        step()
ops = {name: n / OP_STEPS for name, n in count.ops.most_common()}
print(json.dumps({"us": us, "ops": sum(ops.values()), "by_op": ops, "where": where}))
""".replace("OP_STEPS", str(OP_STEPS))

# a whole training step (forward, backward, optimiser) with SAM.step(closure), the SGD step beside it: prints one
# JSON line with microseconds per step; argv: variant, steps
TRAIN_CHILD = """
import json, sys, time, torch
from torch import nn
torch.set_num_threads(1)
import flatminima
from flatminima.optim import EveryKSteps
from flatminima.variants.looksam import LookSAMDescent
from flatminima.variants.momentum_sam import MomentumAscent
variant, steps = sys.argv[1], int(sys.argv[2])
torch.manual_seed(0)
layers = []
for _ in range(28):
    layers += [nn.Linear(8, 8), nn.Tanh()]
model = nn.Sequential(*layers, nn.Linear(8, 3))
x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
loss_fn = nn.CrossEntropyLoss()
def closure():
    loss = loss_fn(model(x), y)
    loss.backward()
    return loss
options = dict(rho=0.05, lr=1e-3, momentum=0.9)
if variant == "sgd":
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    def step():
        opt.zero_grad(); closure(); opt.step()
else:
    extra = {
        "sam": {},
        "momentum-sam": {"perturbation": MomentumAscent()},
        "looksam-k5": {"descent": LookSAMDescent(0.7), "cadence": EveryKSteps(5)},
        "periodic-k5": {"cadence": EveryKSteps(5)},
    }[variant]
    opt = flatminima.SAM(model.parameters(), torch.optim.SGD, **options, **extra)
    def step():
        opt.step(closure)
for _ in range(50):
    step()
start = time.perf_counter()
for _ in range(steps):
    step()
print(json.dumps({"us": (time.perf_counter() - start) / steps * 1e6}))
"""
TRAIN_VARIANTS = ("sgd", "sam", "momentum-sam", "looksam-k5", "periodic-k5")
TRAIN_PASSES = {"sgd": 1.0, "sam": 2.0, "momentum-sam": 1.0, "looksam-k5": 1.2, "periodic-k5": 1.2}

# whether the peer imports, and with first_step / second_step taking zero_grad: prints its version
PEER_CHECK = """
import importlib.metadata, inspect
from pytorch_optimizer import SAM
for name in ("first_step", "second_step"):
    if "zero_grad" not in inspect.signature(getattr(SAM, name)).parameters:
        raise SystemExit(f"pytorch_optimizer.SAM.{name} takes no zero_grad argument")
try:
    print(importlib.metadata.version("pytorch_optimizer"))
except importlib.metadata.PackageNotFoundError:
    print("(version unknown)")
"""


def child_env(pythonpath: list[Path]) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, pythonpath)), "OMP_NUM_THREADS": "1"}


def peer_path(peer_site: Path | None) -> list[Path]:
    return [HERE_SRC] if peer_site is None else [HERE_SRC, peer_site]


def peer_version(peer_site: Path | None) -> tuple[str | None, str]:
    """(version, "") when the peer imports, else (None, the reason)."""
    result = subprocess.run(
        [sys.executable, "-c", PEER_CHECK], env=child_env(peer_path(peer_site)), capture_output=True, text=True
    )
    if result.returncode == 0:
        return result.stdout.strip(), ""
    lines = result.stderr.strip().splitlines()
    where = f"from {peer_site}" if peer_site is not None else "from the environment (no --peer-site given)"
    return None, f"pytorch_optimizer's SAM cannot be used {where}: {lines[-1] if lines else 'no message'}"


def run_child(kind: str, pythonpath: list[Path], steps: int, nonfinite: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", CHILD, kind, str(steps), nonfinite],
        env=child_env(pythonpath),
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise SystemExit(f"the {kind} run on {os.pathsep.join(map(str, pythonpath))} failed:\n{result.stderr}")
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    if kind == "ours" and not Path(measured["where"]).resolve().is_relative_to(pythonpath[0].resolve()):
        raise SystemExit(f"the run meant for {pythonpath[0]} imported flatminima from {measured['where']}")
    return measured


def run_train_child(tree: Path, variant: str, steps: int) -> float:
    result = subprocess.run(
        [sys.executable, "-c", TRAIN_CHILD, variant, str(steps)], env=child_env([tree]), capture_output=True, text=True
    )
    if result.returncode != 0:
        raise SystemExit(f"the training step {variant} on {tree} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])["us"]


def train_section(report, trees: list[Path], rounds: int, steps: int, name) -> None:
    """Whole training steps per variant and tree, interleaved; each variant's time over SGD's in the same tree."""
    times: dict[tuple[Path, str], list[float]] = {(t, v): [] for t in trees for v in TRAIN_VARIANTS}
    for round_index in range(rounds):
        cells = list(times)
        for tree, variant in cells if round_index % 2 == 0 else cells[::-1]:
            times[(tree, variant)].append(run_train_child(tree, variant, steps))
    rows = []
    for variant in TRAIN_VARIANTS:
        row = [variant, f"{TRAIN_PASSES[variant]:g}"]
        for tree in trees:
            row += [
                f"{med(times[(tree, variant)]):.0f}",
                f"{med(times[(tree, variant)]) / med(times[(tree, 'sgd')]):.2f}",
            ]
        rows.append(row)
    header = ["variant", "passes / step"]
    for tree in trees:
        header += [f"{name(tree)}: us / step", f"{name(tree)}: / SGD"]
    report.table(
        f"Whole training steps (forward, backward, optimiser; SAM.step(closure)) on the same network, batch 16, "
        f"1 thread; {rounds} interleaved rounds of {steps} steps. LookSAM and periodic SAM ascend every 5th step",
        header,
        rows,
    )


def top_ops(by_op: dict[str, float], count: int = 6) -> str:
    return ", ".join(f"{name} {n:g}" for name, n in list(by_op.items())[:count])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--against", type=Path, action="append", default=[], help="another checkout's src/ folder")
    parser.add_argument("--peer-site", type=Path, default=None, help="a directory holding pytorch_optimizer")
    parser.add_argument("--no-peer", action="store_true", help="leave the peer out")
    parser.add_argument("--nonfinite", choices=["raise", "skip", "ignore"], default="", help="our SAM's policy")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument(
        "--train-steps", type=int, default=300, help="steps per round of whole training steps (0: none)"
    )
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.steps < 1:
        parser.error("--rounds and --steps must be >= 1")
    trees = [HERE_SRC, *args.against]
    for tree in trees:
        if not (tree / "flatminima" / "__init__.py").is_file():
            parser.error(f"{tree} holds no flatminima package; give a checkout's src/ folder")
    if args.peer_site is not None and not args.peer_site.is_dir():
        parser.error(f"--peer-site {args.peer_site} is not a directory")
    report = start_report("SAM's host cost per step")
    version, reason = (None, "the peer was left out (--no-peer)") if args.no_peer else peer_version(args.peer_site)
    if version is None:
        report(f"No peer row: {reason}.")
        report()
    runners: list[Path | str] = [*trees, *([PEER] if version is not None else [])]
    times: dict[Path | str, list[float]] = {runner: [] for runner in runners}
    ops: dict[Path | str, dict[str, float]] = {}
    for round_index in range(args.rounds):
        order = runners if round_index % 2 == 0 else runners[::-1]
        for runner in order:
            if runner == PEER:
                measured = run_child("peer", peer_path(args.peer_site), args.steps, "")
            else:
                measured = run_child("ours", [runner], args.steps, args.nonfinite)
            times[runner].append(measured["us"])
            ops.setdefault(runner, measured["by_op"])  # the same every round: the code path is deterministic

    def name(runner: Path | str) -> str:
        if runner == PEER:
            return f"pytorch_optimizer {version} SAM (peer)"
        return "this checkout" if runner == HERE_SRC else str(runner)

    base = med(times[HERE_SRC])
    peer = med(times[PEER]) if PEER in times else None
    rows = [
        [
            name(runner),
            f"{med(values):.1f}",
            f"{min(values):.1f}",
            f"{med(values) / base:.3f}",
            "" if peer is None or runner == PEER else f"{peer / med(values):.2f}x",
            f"{sum(ops[runner].values()):.0f}",
        ]
        for runner, values in times.items()
    ]
    policy = f'nonfinite="{args.nonfinite}"' if args.nonfinite else "the default nonfinite policy"
    report.table(
        f"first_step + second_step on 58 tensors, SGD with momentum, 1 thread, our SAM with {policy}; "
        f"{args.rounds} interleaved rounds of {args.steps} steps",
        [
            "source",
            "median us / step",
            "min us / step",
            "relative to this checkout",
            "faster than the peer",
            "aten ops / step",
        ],
        rows,
    )
    if peer is not None:
        report(f"Against pytorch_optimizer {version}'s SAM (medians): ours is {peer / base:.2f}x faster.")
        report()
    report.table(
        f"The most frequent aten ops per step (counted over {OP_STEPS} steps with a TorchDispatchMode)",
        ["source", "aten ops / step", "most frequent"],
        [[name(runner), f"{sum(by_op.values()):.0f}", top_ops(by_op)] for runner, by_op in ops.items()],
        align="|---|---:|---|",
    )
    if args.train_steps > 0:
        train_section(report, trees, args.rounds, args.train_steps, name)
    if args.output is not None:
        args.output.write_text("\n".join(report.lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
