"""Helpers shared by the benchmark scripts: the markdown report, the machine description, timing plumbing.

The scripts are run as ``python benchmarks/bench_X.py``, which puts this folder on ``sys.path`` (whatever the
working directory), so they import this module as ``from _common import ...``.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import os
import platform
import statistics
import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

import flatminima


class Report:
    """Prints markdown as it is produced and keeps it for ``--output``."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)

    def table(self, caption: str, headers: list[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> None:
        """``caption``, a blank line, the table (first column left-aligned, the rest right-aligned unless ``align``
        gives the separator line), a blank line."""
        self(caption)
        self()
        self("| " + " | ".join(headers) + " |")
        self(align or "|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|")
        for row in rows:
            self("| " + " | ".join(str(c) for c in row) + " |")
        self()


# ---------------------------------------------------------------------------------------------- machine


def cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def flatminima_version() -> str:
    return flatminima.__version__ if hasattr(flatminima, "__version__") else package_version("flatminima")


def machine(
    report: Report,
    device: torch.device | None = None,
    flatminima_info: str | None = None,
    extra: Sequence[list[str]] = (),
) -> None:
    """The **Machine** table: CPU, platform, versions, threads (``flatminima_info`` replaces flatminima's version),
    the ``device`` if given, ``extra`` rows, the load average."""
    rows = [
        ["CPU", cpu_model()],
        ["logical CPUs", str(os.cpu_count())],
        ["platform", platform.platform()],
        ["python", platform.python_version()],
        ["torch", torch.__version__],
        ["torch threads", str(torch.get_num_threads())],
        ["flatminima", flatminima_info if flatminima_info is not None else flatminima_version()],
    ]
    if device is not None:
        rows.append(["device", torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({cpu_model()})"])
    rows.extend(extra)
    rows.append(["load average (1, 5, 15 min) at start", load_average()])
    report.table("**Machine**", ["item", "value"], rows)


def command_line() -> str:
    """The command that started this run, with the script's path relative to the working directory."""
    return "python " + " ".join([os.path.relpath(sys.argv[0]), *sys.argv[1:]])


def local_timestamp() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def med(values: list[float]) -> float:
    return statistics.median(values)


# ---------------------------------------------------------------------------------------------- shared set-ups


def start_report(title: str, device: torch.device | None = None) -> Report:
    """A report opened with its title and time, the command that ran it and the machine table."""
    report = Report()
    report(f"# {title} ({local_timestamp()})")
    report()
    report(f"`{command_line()}`")
    report()
    machine(report, device)
    return report


def noisy_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The demo's training data: digits normalised, with 40 % symmetric label noise (seed 0)."""
    from flatminima.data import channel_mean_std, load_digits, normalize, to_float
    from flatminima.data.label_noise import symmetric_label_noise

    digits = load_digits(seed=0)
    mean, std = channel_mean_std(digits.train_images)
    images = normalize(to_float(digits.train_images), mean, std)
    return images, symmetric_label_noise(digits.train_labels, 0.4, 10, seed=0)


def noisy_digits_mlp() -> tuple[torch.nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    """bench_trace.py's workload: an MLP 64-32-10 in float64 trained 5 SGD epochs on the noisy digits (eval mode,
    no gradients left), and the first 512 examples in 2 batches of 256."""
    import torch.nn.functional as F
    from torch import nn

    images, labels = noisy_digits()
    images = images.flatten(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        for index in torch.randperm(images.shape[0], generator=gen).split(32):
            opt.zero_grad()
            F.cross_entropy(model(images[index].double()), labels[index]).backward()
            opt.step()
    model.eval()
    for p in model.parameters():
        p.grad = None
    return model, [(images[:256].double(), labels[:256]), (images[256:512].double(), labels[256:512])]


# ---------------------------------------------------------------- peer comparisons in float64 (peer_*.py)


def float64_batches(steps: int) -> list[tuple[Tensor, Tensor]]:
    """``steps`` batches of 32 float64 inputs of width 10 and labels in 0..2 (seeded): the peer comparisons' data."""
    gen = torch.Generator().manual_seed(1)
    return [
        (torch.randn(32, 10, generator=gen, dtype=torch.float64), torch.randint(0, 3, (32,), generator=gen))
        for _ in range(steps)
    ]


def weights(model: nn.Module) -> list[Tensor]:
    """A copy of the model's parameters."""
    return [p.detach().clone() for p in model.parameters()]


def max_diff(a: list[Tensor], b: list[Tensor]) -> float:
    """The largest absolute difference between two lists of tensors."""
    return max((s - t).abs().max().item() for s, t in zip(a, b, strict=True))
