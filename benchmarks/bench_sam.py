"""Benchmark flatminima's SAM: step cost, optimiser overhead, extra memory and m-SAM, in one run.

Run ``python benchmarks/bench_sam.py`` (about 2.5 minutes on 2 idle CPU cores) or ``--quick`` (a smoke run, about
30 s). On a machine shared with other jobs the timings of multi-threaded ops degrade badly (an op waits for a
descheduled thread): the run then takes several times longer, and ``--threads 1`` gives steadier numbers.
Every section prints a markdown table; ``--output FILE`` also writes the whole report to ``FILE``.

(a) SAM step time over SGD step time on ResNet-20 (batch 128, random CIFAR-sized data).
(b) The optimiser's own cost (first_step + second_step, no forward/backward) on ResNet-56's parameters, against
    a reference SAM written the way most SAM code is (a Python loop over the parameters).
(c) Extra memory of SAM over SGD, as a multiple of the parameter memory.
(d) m-SAM through ``SharpnessAwareStep(group_size=m)`` against plain SAM, and a vectorised m-SAM candidate
    (torch.func: ``vmap`` over the groups) against the loop, on models without BatchNorm.

Timings are medians of interleaved blocks (the cases take turns, in alternating order), so that drift of a shared
machine hits all cases alike; the minimum is reported as well.
"""

from __future__ import annotations

import argparse
import copy
import gc
import inspect
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from _common import Report, command_line, load_average, local_timestamp, machine, med, sync
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

import flatminima
from flatminima import running_stats
from flatminima.models import MLP, SmallCNN, resnet20, resnet56

BASE = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)  # the SGD settings every case shares
RHO = 0.05
MIB = 1024.0**2

Measure = Callable[[], float | tuple[float, ...]]


# ---------------------------------------------------------------------------------------------- plumbing


@dataclass
class Plan:
    """Iteration counts: warm-up per case, then ``blocks`` rounds of ``per_block`` timed calls per case."""

    batch: int = 128
    a: tuple[int, int, int] = (3, 12, 2)  # (warmup, blocks, per_block): full training steps, ResNet-20
    b: tuple[int, int, int] = (20, 10, 20)  # optimiser calls only, ResNet-56
    d: tuple[int, int, int] = (1, 4, 2)  # m-SAM on ResNet-20
    v: tuple[int, int, int] = (2, 5, 3)  # vectorised m-SAM candidate, small models
    equal_steps: int = 3  # steps compared for equality (ours vs reference, loop vs vmap)


QUICK = Plan(a=(1, 2, 1), b=(3, 2, 5), d=(1, 1, 1), v=(1, 1, 1), equal_steps=2)


_SECTION_START: list[tuple[float, str]] = []


def start_section(message: str) -> None:
    progress(message)
    _SECTION_START[:] = [(time.perf_counter(), load_average())]


def section_note() -> str:
    """Wall time of the section so far and the load average at its start and now (a shared machine drifts)."""
    if not _SECTION_START:
        return ""
    start, load = _SECTION_START[0]
    took = time.perf_counter() - start
    return f"(Section time {took:.0f} s; load average {load} at its start, {load_average()} at its end.)"


def progress(message: str) -> None:
    print(f"[bench_sam] {message}", file=sys.stderr, flush=True)


def timed(fn: Callable[[], Any], device: torch.device) -> Measure:
    def run() -> float:
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        return time.perf_counter() - start

    return run


def interleaved(cases: dict[str, Measure], warmup: int, blocks: int, per_block: int) -> dict[str, list[tuple]]:
    """Warm every case up, then time them in alternating blocks (A B C, C B A, ...); returns per-call samples."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[tuple]] = {name: [] for name in cases}
    names = list(cases)
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for block in range(blocks):
            for name in names if block % 2 == 0 else names[::-1]:
                for _ in range(per_block):
                    out = cases[name]()
                    samples[name].append(out if isinstance(out, tuple) else (out,))
    finally:
        if gc_was_enabled:
            gc.enable()
    return samples


def totals(samples: list[tuple]) -> list[float]:
    return [sum(s) for s in samples]


def paired_ratio(samples: dict[str, list[float]], name: str, base: str, per_block: int) -> float:
    """Median over blocks of (median of ``name`` in the block / median of ``base`` in the same block).

    Blocks of the two cases run back to back, so slow drift of the machine's speed cancels in each ratio.
    """
    ratios = []
    for start in range(0, len(samples[name]), per_block):
        ratios.append(med(samples[name][start : start + per_block]) / med(samples[base][start : start + per_block]))
    return med(ratios)


def iqr(values: list[float]) -> tuple[float, float]:
    if len(values) < 4:
        return min(values), max(values)
    q = statistics.quantiles(values, n=4)
    return q[0], q[2]


def ms(seconds: float) -> str:
    value = seconds * 1e3
    return f"{value:.3f}" if value < 1 else f"{value:.2f}" if value < 100 else f"{value:.1f}"


def mib(nbytes: float) -> str:
    return f"{nbytes / MIB:.3f}"


def random_batch(batch: int, device: torch.device, shape: tuple[int, ...] = (3, 32, 32)) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *shape, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    return x.to(device), y.to(device)


def seeded(builder: Callable[[], nn.Module], device: torch.device, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return builder().to(device).train()


def param_bytes(params: list[Tensor]) -> int:
    return sum(p.numel() * p.element_size() for p in params)


# ---------------------------------------------------------------------------------------------- reference


class PerParamSAM(torch.optim.Optimizer):
    """Reference SAM in the style most SAM code uses: one small tensor operation per parameter, in Python.

    The maths is flatminima.SAM's default (p = 2): ``e = rho g / ||g||`` with ``||g||`` the L2 norm over all
    gradients. ``first_step`` takes the norm of each gradient, stacks them for the global norm, then for each
    parameter clones ``w`` into the state and adds ``e = g * scale``. ``second_step`` points each parameter's
    ``.data`` back at the clone and lets the base optimiser step. No finiteness check.
    """

    def __init__(self, params: Any, base_optimizer: type[torch.optim.Optimizer], rho: float = RHO, **kwargs: Any):
        super().__init__(params, dict(rho=rho, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups

    def _gradient_norm(self) -> Tensor:
        device = self.param_groups[0]["params"][0].device
        norms = [
            p.grad.norm(p=2).to(device) for group in self.param_groups for p in group["params"] if p.grad is not None
        ]
        return torch.stack(norms).norm(p=2)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        total = self._gradient_norm()
        for group in self.param_groups:
            factor = group["rho"] / (total + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["old_p"] = p.data.clone()
                e = p.grad * factor.to(p)
                p.add_(e)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if "old_p" in self.state[p]:
                    p.data = self.state[p]["old_p"]
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    def extra_bytes(self) -> int:
        """Bytes the saved copies hold beyond the parameters (a copy that *is* the parameter's storage is free)."""
        total = 0
        for group in self.param_groups:
            for p in group["params"]:
                old = self.state[p].get("old_p")
                if old is not None and old.untyped_storage().data_ptr() != p.untyped_storage().data_ptr():
                    total += old.numel() * old.element_size()
        return total


def flatminima_sam(params: Any, model: nn.Module | None = None, **options: Any) -> flatminima.SAM:
    """flatminima.SAM around SGD with the shared settings; ``options`` go to SAM or, if SGD's, to SGD."""
    return flatminima.SAM(params, torch.optim.SGD, rho=RHO, model=model, **{**BASE, **options})


def reference_sam(params: Any, **overrides: Any) -> PerParamSAM:
    return PerParamSAM(params, torch.optim.SGD, rho=RHO, **{**BASE, **overrides})


def sam_extra_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of tensor storage the optimiser holds between steps beyond the parameters, gradients and momentum.

    Walks the optimiser object's attributes (lists, dicts, helper objects, the reference's per-parameter state)
    and sums the storages that are not those of a parameter, a gradient or the base optimiser's state, so the
    count follows the implementation rather than the name of one buffer.
    """
    excluded: set[int] = set()
    for group in opt.param_groups:
        for p in group["params"]:
            excluded.add(p.untyped_storage().data_ptr())
            if p.grad is not None:
                excluded.add(p.grad.untyped_storage().data_ptr())
    base = getattr(opt, "base_optimizer", opt)
    for state in base.state.values():
        excluded.update(v.untyped_storage().data_ptr() for v in state.values() if isinstance(v, Tensor))
    held: dict[int, int] = {}

    def visit(obj: Any, depth: int) -> None:
        if isinstance(obj, Tensor):
            storage = obj.untyped_storage()
            if storage.data_ptr() not in excluded:
                held[storage.data_ptr()] = storage.nbytes()
        elif depth > 5 or isinstance(obj, nn.Module | torch.optim.Optimizer | str | bytes | int | float):
            return
        elif isinstance(obj, dict):
            for value in obj.values():
                visit(value, depth + 1)
        elif isinstance(obj, list | tuple | set):
            for value in obj:
                visit(value, depth + 1)
        elif hasattr(obj, "__dict__"):
            for value in vars(obj).values():
                visit(value, depth + 1)

    for name, value in vars(opt).items():
        if name not in ("param_groups", "base_optimizer", "defaults"):
            visit(value, 0)
    return sum(held.values())


FLATTEN_SUPPORTED = "flatten" in inspect.signature(flatminima.SAM).parameters


def ours_variants(with_ignore: bool = True) -> list[tuple[str, dict[str, Any]]]:
    """The flatminima.SAM configurations benchmarked: label and constructor options."""
    variants = [('flatminima.SAM, nonfinite="raise" (default)', {"nonfinite": "raise"})]
    if with_ignore:
        variants.append(('flatminima.SAM, nonfinite="ignore"', {"nonfinite": "ignore"}))
    if FLATTEN_SUPPORTED:
        variants.append(("flatminima.SAM, flatten=True", {"flatten": True}))
        if with_ignore:
            variants.append(
                ('flatminima.SAM, flatten=True, nonfinite="ignore"', {"flatten": True, "nonfinite": "ignore"})
            )
    return variants


# ---------------------------------------------------------------------------------------------- memory


def cpu_peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak of (bytes allocated - bytes freed) on the CPU while ``fn`` runs, from the profiler's memory events.

    Every allocation and free through PyTorch's CPU allocator is a ``[memory]`` event with a signed size; the
    running sum in time order is the memory live above what existed before ``fn``.
    """
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    events.sort(key=lambda item: item[0])  # stable: ties keep their recorded order
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def peak_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak memory allocated above the level at the start of ``fn``."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - start
    return cpu_peak_bytes(fn)


def check_cpu_peak_method() -> None:
    """The profiler method must see a known pattern exactly: 1 MiB + 2 MiB live together, then 2.5 MiB."""

    def pattern() -> None:
        a = torch.empty(1 << 18)  # 1 MiB of float32
        b = torch.empty(1 << 19)  # 2 MiB
        del a
        c = torch.empty(1 << 17)  # 0.5 MiB
        del b, c

    measured = cpu_peak_bytes(pattern)
    assert abs(measured - 3 * MIB) <= 4096, f"profiler peak method is off: {measured} bytes for 3 MiB"


# ---------------------------------------------------------------------------------------------- (a)


def sam_training_step(model: nn.Module, opt: Any, x: Tensor, y: Tensor) -> Callable[[], None]:
    """The davda54 pattern: forward-backward, first_step, forward-backward at w + e, second_step."""
    layers = running_stats.norm_layers(model) if isinstance(opt, PerParamSAM) else []

    def step() -> None:
        F.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        with running_stats.frozen(layers):  # flatminima.SAM does this itself when given the model
            F.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)

    return step


CONTROL = "control: 2 x (zero_grad + forward + backward) + SGD step"
RANDOM_ASCENT = "flatminima.SAM, RandomDirection ascent (needs no g(w): one pass), step(closure)"


def random_ascent_step(x: Tensor, y: Tensor, device: torch.device) -> Callable[[], None]:
    """A rule added on the seams: e drawn at random, so SAM skips the first forward-backward."""
    model = seeded(resnet20, device)
    rule = flatminima.RandomDirection(torch.Generator(device).manual_seed(0))
    opt = flatminima.SAM(model.parameters(), torch.optim.SGD, rho=RHO, perturbation=rule, model=model, **BASE)

    def step() -> None:
        opt.step(lambda: F.cross_entropy(model(x), y).backward())

    return step


def sgd_case(x: Tensor, y: Tensor, device: torch.device) -> tuple[nn.Module, torch.optim.Optimizer, Callable[[], None]]:
    """ResNet-20 with plain SGD, and its training step on (x, y): the baseline of sections (a) and (c2)."""
    model = seeded(resnet20, device)
    sgd = torch.optim.SGD(model.parameters(), **BASE)

    def sgd_step() -> None:
        sgd.zero_grad()
        F.cross_entropy(model(x), y).backward()
        sgd.step()

    return model, sgd, sgd_step


def section_a(plan: Plan, device: torch.device, report: Report) -> None:
    start_section("(a) SAM step / SGD step on ResNet-20")
    x, y = random_batch(plan.batch, device)
    _, _, sgd_step = sgd_case(x, y, device)

    control_model = seeded(resnet20, device)
    control = torch.optim.SGD(control_model.parameters(), **BASE)

    def two_passes() -> None:  # the floor: SAM's work without SAM (two forward-backward passes, one SGD step)
        control.zero_grad()
        F.cross_entropy(control_model(x), y).backward()
        control.zero_grad()
        F.cross_entropy(control_model(x), y).backward()
        control.step()

    cases: dict[str, Measure] = {"SGD": timed(sgd_step, device), CONTROL: timed(two_passes, device)}
    makers: list[tuple[str, Callable[[nn.Module], Any]]] = [
        (label, lambda m, options=options: flatminima_sam(m.parameters(), model=m, **options))
        for label, options in ours_variants(with_ignore=device.type == "cuda" or not FLATTEN_SUPPORTED)
    ]
    if device.type == "cpu" and FLATTEN_SUPPORTED:  # on a CPU "ignore" only drops a cheap check: one row for it
        makers.insert(
            1, ('flatminima.SAM, nonfinite="ignore"', lambda m: flatminima_sam(m.parameters(), m, nonfinite="ignore"))
        )
    makers.append(("per-parameter reference SAM", lambda m: reference_sam(m.parameters())))
    for label, make in makers:
        model = seeded(resnet20, device)
        cases[label] = timed(sam_training_step(model, make(model), x, y), device)
    cases[RANDOM_ASCENT] = timed(random_ascent_step(x, y, device), device)
    warmup, blocks, per_block = plan.a
    samples = {name: totals(s) for name, s in interleaved(cases, warmup, blocks, per_block).items()}
    sgd_med, sgd_min = med(samples["SGD"]), min(samples["SGD"])
    rows = []
    for name, values in samples.items():
        low, high = iqr(values)
        rows.append(
            [
                name,
                ms(med(values)),
                f"{ms(low)}-{ms(high)}",
                ms(min(values)),
                f"{med(values) / sgd_med:.2f}",
                f"{paired_ratio(samples, name, 'SGD', per_block):.2f}",
                f"{min(values) / sgd_min:.2f}",
            ]
        )
    n = blocks * per_block
    report.table(
        f"**(a) Training step time, ResNet-20, batch {plan.batch} of 3x32x32 (random, fixed seed), cross entropy, "
        f"SGD(lr 0.1, momentum 0.9, wd 5e-4).** SGD step = zero_grad + forward + backward + step; SAM step = "
        f"forward + backward + first_step(zero_grad=True) + forward + backward + second_step(zero_grad=True), "
        f"rho {RHO}; flatminima.SAM is given model= (BatchNorm statistics from the first pass), the reference "
        f"freezes them the same way. {warmup} warm-up steps per case, then {n} timed steps per case in {blocks} "
        f"interleaved blocks of {per_block}. The floor of the ratio is 2.0 (two forward-backward passes); the "
        f"control row does SAM's two passes with no SAM at all, so SAM's own overhead is its excess over the control. "
        f"Ratios: of the medians; median over blocks of the ratio between adjacent blocks (robust to drift); of "
        f"the minima. On a shared machine whose load changes during the run, read the paired column. {section_note()}",
        ["case", "median ms", "IQR ms", "min ms", "ratio to SGD (medians)", "ratio (paired blocks)", "ratio (mins)"],
        rows,
    )


# ---------------------------------------------------------------------------------------------- (b)


def optimiser_only(opt: Any, params: list[Tensor], grads: tuple[list[Tensor], list[Tensor]], device) -> Measure:
    """Time first_step and second_step alone; the fixed gradients are put back outside the timing.

    A gradient the optimiser kept (flat buffers keep them as views, zeroed) is overwritten in place, as the next
    backward pass would accumulate into it; otherwise a fresh copy is assigned, as autograd would create one.
    """
    first, second = grads

    def load(values: list[Tensor]) -> None:
        with torch.no_grad():
            for p, g in zip(params, values):
                if p.grad is None:
                    p.grad = g.clone()
                else:
                    p.grad.copy_(g)

    def run() -> tuple[float, float]:
        load(first)
        sync(device)
        t0 = time.perf_counter()
        opt.first_step(zero_grad=True)
        sync(device)
        t1 = time.perf_counter()
        load(second)
        sync(device)
        t2 = time.perf_counter()
        opt.second_step(zero_grad=True)
        sync(device)
        t3 = time.perf_counter()
        return t1 - t0, t3 - t2

    return run


def fixed_grads(params: list[Tensor], seed: int) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(p.shape, generator=gen) * 1e-2).to(p.device) for p in params]


def resnet56_case(device: torch.device, options: dict[str, Any] | None, sgd: dict[str, Any] | None = None):
    """ResNet-56's parameters (fixed seed) and an optimiser: flatminima.SAM with ``options``, or the reference.

    ``sgd`` holds extra options of the base SGD (``foreach``, ``fused``).
    """
    params = list(seeded(resnet56, device, seed=1).parameters())
    if options is None:
        return params, reference_sam(params, **(sgd or {}))
    return params, flatminima_sam(params, **(sgd or {}), **options)


def check_same_maths(device: torch.device, steps: int) -> float:
    """Every flatminima.SAM variant and the reference give the same weights and momentum after a few steps."""
    ref_params, ref = resnet56_case(device, None)
    runs = []
    for _, options in ours_variants():
        runs.append(resnet56_case(device, options))
    for step in range(steps):
        first, second = fixed_grads(ref_params, 10 + step), fixed_grads(ref_params, 20 + step)
        for params, opt in [(ref_params, ref), *runs]:
            optimiser_only(opt, params, (first, second), device)()
    worst = 0.0
    for (label, _), (params, opt) in zip(ours_variants(), runs):
        diff = max((a - b).abs().max().item() for a, b in zip(params, ref_params))
        mom = max(
            (opt.state[a]["momentum_buffer"] - ref.base_optimizer.state[b]["momentum_buffer"]).abs().max().item()
            for a, b in zip(params, ref_params)
        )
        assert diff < 1e-6 and mom < 1e-6, f"{label} and the reference disagree: |dw| {diff}, |dmomentum| {mom}"
        worst = max(worst, diff, mom)
    return worst


SGD_ALONE = "(torch.optim.SGD.step alone, part of both)"


def base_step_only(device: torch.device, sgd_options: dict[str, Any]) -> Measure:
    """The base optimiser's step by itself, the share of second_step that SAM cannot change."""
    params = list(seeded(resnet56, device, seed=1).parameters())
    sgd = torch.optim.SGD(params, **sgd_options, **BASE)
    grads = fixed_grads(params, 2)

    def run() -> float:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        sync(device)
        start = time.perf_counter()
        sgd.step()
        sync(device)
        return time.perf_counter() - start

    return run


def section_b(plan: Plan, device: torch.device, report: Report) -> None:
    start_section("(b) optimiser-only cost on ResNet-56 parameters")
    agreement = check_same_maths(device, plan.equal_steps)
    warmup, blocks, per_block = plan.b
    rows = []
    modes: list[tuple[str, dict[str, Any]]] = [
        ("default (" + ("for-loop" if device.type == "cpu" else "foreach") + f" on {device.type.upper()})", {}),
        ("foreach=True", {"foreach": True}),
        ("fused=True", {"fused": True}),
    ]
    for sgd_label, sgd_options in modes:
        cases: dict[str, Measure] = {}
        for label, options in [*ours_variants(), ("per-parameter reference", None)]:
            params, opt = resnet56_case(device, options, sgd_options)
            grads = (fixed_grads(params, 1), fixed_grads(params, 2))
            cases[label] = optimiser_only(opt, params, grads, device)
        cases[SGD_ALONE] = base_step_only(device, sgd_options)
        samples = interleaved(cases, warmup, blocks, per_block)
        ref_total = med(totals(samples["per-parameter reference"]))
        ref_min = min(totals(samples["per-parameter reference"]))
        by_total = {name: totals(values) for name, values in samples.items()}
        for name, values in samples.items():
            total = totals(values)
            if name == SGD_ALONE:
                rows.append([name, sgd_label, "-", "-", ms(med(total)), ms(min(total)), "-", "-", "-"])
                continue
            rows.append(
                [
                    name,
                    sgd_label,
                    ms(med([v[0] for v in values])),
                    ms(med([v[1] for v in values])),
                    ms(med(total)),
                    ms(min(total)),
                    f"{ref_total / med(total):.2f}x",
                    f"{1 / paired_ratio(by_total, name, 'per-parameter reference', per_block):.2f}x",
                    f"{ref_min / min(total):.2f}x",
                ]
            )
    params = list(resnet56().parameters())
    n = blocks * per_block
    report.table(
        f"**(b) Optimiser cost alone: first_step + second_step on ResNet-56's {len(params)} parameter tensors "
        f"({sum(p.numel() for p in params):,} weights), no forward/backward.** Fixed random gradients are "
        f"put back before each call outside the timed region (copied into the gradient tensors the optimiser kept, "
        f"else assigned as fresh copies); only the two calls are timed. Base optimiser torch.optim.SGD(lr 0.1, "
        f"momentum 0.9, wd 5e-4) for both, with its implementation left at the default, then foreach=True, then "
        f"fused=True. {warmup} warm-up calls, then {n} timed calls per case in {blocks} interleaved blocks. "
        f"The first_step and second_step columns are the medians of each part (they need "
        f"not add up to the median total). Speedup = reference time / this time. The last row of each third "
        f"times the base optimiser's step alone (same gradients, no SAM), which both implementations contain. "
        f"Before timing, every flatminima.SAM variant was checked to give the reference's weights and momentum "
        f"after {plan.equal_steps} steps (max |diff| {agreement:.1e}). {section_note()}",
        [
            "optimiser",
            "base SGD",
            "first_step ms",
            "second_step ms",
            "total median ms",
            "total min ms",
            "speedup (medians)",
            "speedup (paired blocks)",
            "speedup (mins)",
        ],
        rows,
    )


# ---------------------------------------------------------------------------------------------- (c)


def section_c(plan: Plan, device: torch.device, report: Report) -> None:
    start_section("(c) extra memory")
    if device.type == "cpu":
        check_cpu_peak_method()
        method = (
            "CPU: peak = max over time of the running sum of the sizes of every allocation (+) and free (-) "
            "through PyTorch's CPU allocator while the measured code runs, from torch.profiler's memory events "
            "(profile_memory=True); the method is checked on a known pattern (1 + 2 MiB live -> 3 MiB) before use. "
            "Allocations outside PyTorch's allocator (e.g. oneDNN scratch space) are not seen, nor are frees of "
            "blocks allocated before the measurement (the profiler warns about them): here these are only the "
            "reference's old parameter storages, freed in second_step after the peak."
        )
    else:
        method = "CUDA: peak = torch.cuda.max_memory_allocated() - memory_allocated() at the start (after a reset)."

    # c1: the optimiser calls alone, ResNet-56, gradients held by the benchmark so that no free of theirs counts
    rows = []
    for label, options in [*ours_variants(), ("per-parameter reference", None)]:
        params, opt = resnet56_case(device, options)
        first, second = fixed_grads(params, 1), fixed_grads(params, 2)

        def load(values: list[Tensor], params: list[Tensor] = params) -> None:
            for p, g in zip(params, values):  # no allocation: assign a held tensor, or copy into a kept gradient
                if p.grad is None:
                    p.grad = g
                else:
                    p.grad.copy_(g)

        def calls(params=params, opt=opt, first=first, second=second, load=load) -> None:
            with torch.no_grad():
                load(first)
            opt.first_step(zero_grad=True)
            with torch.no_grad():
                load(second)
            opt.second_step(zero_grad=True)

        for _ in range(2):  # warm-up: buffers, momentum and saved copies exist before the measurement
            calls()
        transient = peak_bytes(calls, device)
        persistent = sam_extra_bytes(opt)
        pbytes = param_bytes(params)
        rows.append(
            [
                label,
                mib(pbytes),
                mib(persistent),
                mib(transient),
                f"{persistent / pbytes:.3f}",
                f"{transient / pbytes:.3f}",
                f"{(persistent + transient) / pbytes:.3f}",
            ]
        )
    report.table(
        "**(c1) Extra memory of the optimiser calls, ResNet-56 parameters (first_step + second_step with fixed "
        "gradients, after 2 warm-up calls).** *Persistent* = bytes SAM keeps between steps beyond the "
        "parameters, gradients and the base optimiser's momentum: the storages of every tensor reachable from "
        "the optimiser object that is not one of those (e.g. a saved copy of w; the reference's "
        "`state[p]['old_p']` is the parameter itself after second_step, so it counts 0; with flatten=True the "
        "flat weight and gradient buffers *are* the parameters and gradients, and the gradients stay allocated "
        "between steps, zeroed, as with zero_grad(set_to_none=False)). *Transient* = peak allocated above the "
        "start during the two calls. "
        f"{method} {section_note()}",
        [
            "optimiser",
            "param MiB",
            "persistent MiB",
            "transient peak MiB",
            "persistent / params",
            "transient / params",
            "extra / params (sum)",
        ],
        rows,
    )

    # c2: whole training steps, ResNet-20, batch 128: SAM's extra over SGD
    x, y = random_batch(plan.batch, device)
    cases: dict[str, tuple[nn.Module, Any, Callable[[], None]]] = {}
    cases["SGD"] = sgd_case(x, y, device)
    makers: list[tuple[str, Callable[[nn.Module], Any]]] = [
        (label, lambda m, options=options: flatminima_sam(m.parameters(), model=m, **options))
        for label, options in ours_variants(with_ignore=False)
    ]
    makers.append(("per-parameter reference SAM", lambda m: reference_sam(m.parameters())))
    for label, make in makers:
        model = seeded(resnet20, device)
        opt = make(model)
        cases[label] = (model, opt, sam_training_step(model, opt, x, y))
    peaks: dict[str, int] = {}
    extras: dict[str, int] = {}
    for label, (_, opt, step) in cases.items():
        for _ in range(2):
            step()
        opt.zero_grad(set_to_none=True)  # every case starts its measured step without gradients
        peaks[label] = peak_bytes(step, device)
        extras[label] = 0 if label == "SGD" else sam_extra_bytes(opt)
    pbytes = param_bytes(list(cases["SGD"][0].parameters()))
    rows = []
    for label in cases:
        extra = extras[label] + peaks[label] - peaks["SGD"]
        rows.append([label, mib(pbytes), mib(peaks[label]), mib(extras[label]), mib(extra), f"{extra / pbytes:.3f}"])
    report.table(
        f"**(c2) Extra memory of a whole SAM training step over an SGD step, ResNet-20, batch {plan.batch}.** "
        "Each case takes 2 warm-up steps, its gradients are freed, then one step is measured. *Step peak* = peak "
        "allocated above the start of the step (activations, gradients, optimiser temporaries). *Extra over "
        "SGD* = persistent SAM buffers (as in c1) + step peak - SGD's step peak. "
        f"{method} {section_note()}",
        ["case", "param MiB", "step peak MiB", "persistent MiB", "extra over SGD MiB", "extra / params"],
        rows,
    )


# ---------------------------------------------------------------------------------------------- (d)


class VmapMSAM:
    """Candidate: m-SAM with every group at once through torch.func (groups of equal size, no BatchNorm).

    Gradients of each group's mean loss at w come from one ``vmap(grad(...))`` over the groups; each group's
    ``e_k = rho g_k / ||g_k||``; a second ``vmap(grad(...))`` over (w + e_k, group k) gives the perturbed
    gradients, whose mean over the groups becomes ``.grad`` for the base optimiser. Holds K copies of the
    weights, the first gradients and the second gradients at once (K = batch / m).
    """

    def __init__(self, model: nn.Module, base: torch.optim.Optimizer, rho: float, group_size: int) -> None:
        self.names = [name for name, _ in model.named_parameters()]
        self.params = [p for _, p in model.named_parameters()]
        self.base, self.rho, self.group_size = base, rho, group_size

        def group_loss(params: tuple[Tensor, ...], x: Tensor, y: Tensor) -> Tensor:
            return F.cross_entropy(functional_call(model, dict(zip(self.names, params)), (x,)), y)

        self._ascent = vmap(grad(group_loss), in_dims=(None, 0, 0))
        self._descent = vmap(grad(group_loss), in_dims=(0, 0, 0))

    def __call__(self, x: Tensor, y: Tensor) -> None:
        batch = x.shape[0]
        if batch % self.group_size:
            raise ValueError(f"the candidate needs equal groups: batch {batch} is not a multiple of m")
        k = batch // self.group_size
        xg = x.reshape(k, self.group_size, *x.shape[1:])
        yg = y.reshape(k, self.group_size, *y.shape[1:])
        with torch.no_grad():
            weights = tuple(p.detach() for p in self.params)
        first = self._ascent(weights, xg, yg)
        with torch.no_grad():
            norms = torch.stack([torch.linalg.vector_norm(g.flatten(1), dim=1) for g in first])  # (tensors, K)
            norm = torch.linalg.vector_norm(norms, dim=0)
            scale = torch.where(norm > 0, self.rho / norm, torch.zeros_like(norm))
            perturbed = tuple(w.unsqueeze(0) + g * scale.view(k, *[1] * w.dim()) for w, g in zip(weights, first))
        second = self._descent(perturbed, xg, yg)
        for p, g in zip(self.params, second):
            p.grad = g.mean(0)
        self.base.step()


def msam_loop(model: nn.Module, group_size: int | None) -> flatminima.SharpnessAwareStep:
    opt = flatminima_sam(model.parameters())
    return flatminima.SharpnessAwareStep(model, F.cross_entropy, opt, group_size=group_size)


def vmap_agreement(
    builder: Callable[[], nn.Module], m: int, x: Tensor, y: Tensor, device: torch.device, dtype: torch.dtype, steps: int
) -> float:
    """Max |w_loop - w_vmap| after ``steps`` steps from the same weights on the same batch."""
    loop_model = seeded(builder, device).to(dtype)
    vmap_model = copy.deepcopy(loop_model)
    loop = msam_loop(loop_model, m)
    candidate = VmapMSAM(vmap_model, torch.optim.SGD(vmap_model.parameters(), **BASE), RHO, m)
    x = x.to(dtype)
    for _ in range(steps):
        loop(x, y)
        candidate(x, y)
    return max((a - b).abs().max().item() for a, b in zip(loop_model.parameters(), vmap_model.parameters()))


def section_d(plan: Plan, device: torch.device, report: Report) -> None:
    start_section("(d) m-SAM on ResNet-20")
    batch = plan.batch
    x, y = random_batch(batch, device)
    sizes = {"B (plain SAM)": None, "B/4": batch // 4, "B/16": batch // 16}
    cases: dict[str, Measure] = {}
    for label, m in sizes.items():
        stepper = msam_loop(seeded(resnet20, device), m)
        cases[label] = timed(lambda stepper=stepper: stepper(x, y), device)
    warmup, blocks, per_block = plan.d
    samples = {name: totals(s) for name, s in interleaved(cases, warmup, blocks, per_block).items()}
    sam_med, sam_min = med(samples["B (plain SAM)"]), min(samples["B (plain SAM)"])
    rows = []
    for label, m in sizes.items():
        values = samples[label]
        size = batch if m is None else m
        rows.append(
            [
                f"m = {label}",
                str(size),
                str(-(-batch // size)),
                ms(med(values)),
                ms(min(values)),
                f"{med(values) / sam_med:.2f}",
                f"{paired_ratio(samples, label, 'B (plain SAM)', per_block):.2f}",
                f"{min(values) / sam_min:.2f}",
            ]
        )
    report.table(
        f"**(d1) m-SAM through SharpnessAwareStep(group_size=m), ResNet-20, batch {batch}.** flatminima.SAM "
        f"(nonfinite='raise') around SGD(lr 0.1, momentum 0.9, wd 5e-4); one call = one m-SAM step (the whole "
        f"batch, two forward-backward passes per group). {warmup} warm-up steps, then {blocks * per_block} timed "
        f"steps per case in {blocks} interleaved blocks of {per_block}. {section_note()}",
        [
            "group size",
            "m",
            "groups",
            "median ms",
            "min ms",
            "ratio to SAM (medians)",
            "ratio (paired blocks)",
            "ratio (mins)",
        ],
        rows,
    )

    start_section("(d) vectorised m-SAM candidate (torch.func) vs the loop")
    models: dict[str, Callable[[], nn.Module]] = {
        "MLP 3072-512-512-10": lambda: MLP(3 * 32 * 32, hidden=(512, 512)),
        "SmallCNN width 16, no BN": lambda: SmallCNN(in_channels=3, width=16, image_size=32),
    }
    rows = []
    warmup, blocks, per_block = plan.v
    for model_name, builder in models.items():
        cases = {}
        sam_stepper = msam_loop(seeded(builder, device), None)
        cases["SAM"] = timed(lambda s=sam_stepper: s(x, y), device)
        agreement: dict[int, float] = {}
        for m in (batch // 4, batch // 16):
            # equality first: the loop and the candidate from the same weights on the same batch
            agreement[m] = vmap_agreement(builder, m, x, y, device, torch.float32, 1)
            assert agreement[m] < 1e-5, f"vmap candidate and loop disagree on {model_name}, m={m}: {agreement[m]}"
            exact = vmap_agreement(builder, m, x, y, device, torch.float64, plan.equal_steps)
            assert exact < 1e-10, f"vmap candidate and loop disagree in float64 on {model_name}, m={m}: {exact}"
            loop = msam_loop(seeded(builder, device), m)
            vmap_model = seeded(builder, device)
            candidate = VmapMSAM(vmap_model, torch.optim.SGD(vmap_model.parameters(), **BASE), RHO, m)
            cases[f"loop m={m}"] = timed(lambda s=loop: s(x, y), device)
            cases[f"vmap m={m}"] = timed(lambda s=candidate: s(x, y), device)
        samples = {name: totals(s) for name, s in interleaved(cases, warmup, blocks, per_block).items()}
        sam_med = med(samples["SAM"])
        for m in (batch // 4, batch // 16):
            loop_t, vmap_t = samples[f"loop m={m}"], samples[f"vmap m={m}"]
            winner = "vmap" if med(vmap_t) < med(loop_t) else "loop"
            rows.append(
                [
                    model_name,
                    str(m),
                    str(batch // m),
                    ms(sam_med),
                    ms(med(loop_t)),
                    ms(med(vmap_t)),
                    f"{med(loop_t) / sam_med:.2f}",
                    f"{med(vmap_t) / sam_med:.2f}",
                    f"{paired_ratio(samples, f'loop m={m}', f'vmap m={m}', per_block):.2f}x",
                    f"{agreement[m]:.1e}",
                    winner,
                ]
            )
    report.table(
        f"**(d2) Vectorised m-SAM candidate (torch.func.functional_call + vmap over groups + grad) against "
        f"SharpnessAwareStep(group_size=m), batch {batch}, models without BatchNorm.** Same SGD base; SAM = "
        f"SharpnessAwareStep without groups on the same model. Before timing, the candidate's weights were asserted "
        f"equal to the loop's after one step from the same weights (float32: max |diff| < 1e-5, column 'max "
        f"abs(dw)') and after {plan.equal_steps} steps in float64 (max |diff| < 1e-10, so the maths, momentum "
        f"included, is the same; float32 differences come from the batched convolution's rounding). {warmup} "
        f"warm-up steps, then {blocks * per_block} timed steps per case in {blocks} interleaved "
        f"blocks. Medians in ms. vmap speedup = loop time / vmap time, median over adjacent blocks; 'faster' "
        f"compares the medians. The candidate holds K = B/m copies of the weights and of two gradients at once. "
        f"{section_note()}",
        [
            "model",
            "m",
            "groups K",
            "SAM ms",
            "loop ms",
            "vmap ms",
            "loop / SAM",
            "vmap / SAM",
            "vmap speedup",
            "max abs(dw)",
            "faster",
        ],
        rows,
    )


# ---------------------------------------------------------------------------------------------- main


def source_revision() -> str:
    """The git commit of the checkout flatminima is imported from, marked if its src/ has local changes."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(flatminima.__file__)))
    try:
        rev = subprocess.run(
            ["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", root, "status", "--porcelain", "--", "."], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"{rev}{' + local changes' if dirty else ''}"


@dataclass
class Args:
    quick: bool
    device: str
    threads: int | None
    output: str | None
    sections: str


def parse_args(argv: list[str] | None = None) -> Args:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run with few iterations (under a minute)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--output", default=None, help="also write the markdown report to this file")
    parser.add_argument("--sections", default="abcd", help="which sections to run (default: abcd)")
    return Args(**vars(parser.parse_args(argv)))


@dataclass
class Clock:
    start: float

    def elapsed(self) -> str:
        return f"{time.perf_counter() - self.start:.0f} s"


def sections(args: Args) -> Iterator[Callable[[Plan, torch.device, Report], None]]:
    table = {"a": section_a, "b": section_b, "c": section_c, "d": section_d}
    for key in args.sections:
        if key not in table:
            raise SystemExit(f"unknown section {key!r}; choose from {''.join(table)}")
        yield table[key]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available")
    plan = QUICK if args.quick else Plan()
    report = Report()
    clock = Clock(time.perf_counter())
    report(f"# SAM benchmark: `{command_line()}` ({local_timestamp()})")
    report()
    machine(report, device, f"{flatminima.__version__} (git {source_revision()})")
    for section in sections(args):
        section(plan, device, report)
    report(f"Total wall time {clock.elapsed()}; load average (1, 5, 15 min) at the end: {load_average()}.")
    if args.output:
        with open(args.output, "w") as f:
            f.write("\n".join(report.lines) + "\n")
        progress(f"wrote {args.output}")


if __name__ == "__main__":
    main()
