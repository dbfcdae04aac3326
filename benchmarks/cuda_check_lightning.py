"""GPU check of flatminima.integrations.lightning: what the CPU tests cannot reach.

Run ``python benchmarks/cuda_check_lightning.py`` on a machine with one CUDA GPU (under a minute). Each row trains
a small MLP for a few steps with ``SharpnessAwareMixin`` through Lightning (``accelerator="gpu"``) and with the
plain PyTorch loop of the same algorithm (SAM.first_step / second_step, ``torch.autocast``, GradScaler), from the
same weights on the same batches, and compares the weights. Checked:

- ``precision="16-mixed"`` as Lightning builds it on a GPU (its own GradScaler, init scale 65536), with
  ``accumulate_grad_batches=2`` and ``gradient_clip_val``: equal to the GradScaler loop, and close to float32
  (a first gradient left scaled would make the step 65536 times too long);
- an overflow (GradScaler init scale 2**40): the step is skipped, the weights are untouched and not left
  perturbed, the scale backs off, and BatchNorm counts the first pass only;
- ``precision="bf16-mixed"`` and ``"32-true"`` on the GPU, against the same loops.

Prints a table; exits 1 if a check fails, 2 if there is no GPU. ``--device cpu`` runs the same checks on a CPU
(float16 through an explicit ``MixedPrecision(..., "cpu", GradScaler("cpu"))`` plugin), to test the script.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import warnings

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS, before CUDA starts

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins import MixedPrecision
from torch import nn

from flatminima import SAM
from flatminima.integrations.lightning import SharpnessAwareMixin

RHO, LR, MOMENTUM, BATCH, N_BATCHES, WIDTH = 0.05, 0.1, 0.9, 64, 6, 256


def make_model(batch_norm: bool = False) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(32, WIDTH)]
    if batch_norm:
        layers.append(nn.BatchNorm1d(WIDTH))
    layers += [nn.ReLU(), nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, 10)]
    return nn.Sequential(*layers)


def make_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH * N_BATCHES, 32, generator=gen)
    y = torch.randint(0, 10, (BATCH * N_BATCHES,), generator=gen)
    return [(x[i : i + BATCH], y[i : i + BATCH]) for i in range(0, len(x), BATCH)]


class Net(SharpnessAwareMixin, L.LightningModule):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def configure_optimizers(self):
        return SAM(self.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=MOMENTUM)


def lightning_run(model, batches, device, steps, precision=None, plugins=None, **options):
    net = Net(copy.deepcopy(model))
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH, shuffle=False)
    trainer = L.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_steps=steps,
        precision=precision,
        plugins=plugins,
        **options,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(net, data)
    return net.model, trainer


def plain_run(model, batches, device, steps, k=1, clip=None, autocast=None, scaler=None):
    """The same algorithm in a plain loop (Lightning's windows of k batches, losses divided by k)."""
    model = copy.deepcopy(model).to(device)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=MOMENTUM, model=model)
    windows = [batches[i : i + k] for i in range(0, len(batches), k)]

    def backward(window):
        for x, y in window:
            x, y = x.to(device), y.to(device)
            with torch.autocast(device, dtype=autocast or torch.float32, enabled=autocast is not None):
                loss = F.cross_entropy(model(x), y)
            loss = loss / k
            (scaler.scale(loss) if scaler is not None else loss).backward()

    done = 0
    while done < steps:
        for window in windows:
            opt.zero_grad()
            backward(window)
            opt.first_step(zero_grad=True, grad_scaler=scaler)
            backward(window)
            if scaler is not None:
                scaler.unscale_(opt)
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(list(model.parameters()), clip)
            opt.second_step(grad_scaler=scaler)
            if scaler is not None:
                scaler.update()
            done += 1
            if done == steps:
                break
    return model


def max_difference(a: nn.Module, b: nn.Module) -> float:
    pairs = zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    return max((x.double().cpu() - y.double().cpu()).abs().max().item() for x, y in pairs)


def fp16(device: str, init_scale: float | None = None):
    """Lightning's "16-mixed" on a GPU; on a CPU (where Lightning maps it to bf16) the plugin given explicitly."""
    if device == "cuda" and init_scale is None:
        return dict(precision="16-mixed")
    scaler = torch.amp.GradScaler(device, init_scale=init_scale or 2.0**16)
    return dict(plugins=[MixedPrecision("16-mixed", device, scaler=scaler)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    device = parser.parse_args().device
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing checked (use --device cpu to test the script)")
        return 2
    torch.use_deterministic_algorithms(True, warn_only=True)
    model, batches = make_model(), make_batches()
    steps, clip, k = 6, 1.0, 2
    rows: list[tuple[str, str, str, bool]] = []

    def check(name: str, value: float, limit: float, ok: bool | None = None) -> None:
        rows.append((name, f"{value:.3g}", f"{limit:.3g}", value <= limit if ok is None else ok))

    start = time.perf_counter()
    # 16-mixed with accumulation and clipping, against the GradScaler loop and against float32
    got, trainer = lightning_run(
        model, batches, device, steps, accumulate_grad_batches=k, gradient_clip_val=clip, **fp16(device)
    )
    scaler = torch.amp.GradScaler(device)
    want = plain_run(model, batches, device, steps, k=k, clip=clip, autocast=torch.float16, scaler=scaler)
    fp32 = plain_run(model, batches, device, steps, k=k, clip=clip)
    check("16-mixed, k=2, clip: vs GradScaler loop", max_difference(got, want), 1e-4)
    check("16-mixed, k=2, clip: vs float32 loop", max_difference(got, fp32), 5e-2)
    same_scale = trainer.precision_plugin.scaler.get_scale() == scaler.get_scale()
    check("16-mixed: scale equals the loop's", float(not same_scale), 0.0)
    check("16-mixed: global_step", abs(trainer.global_step - steps), 0)

    # overflow at the first step
    bn_model = make_model(batch_norm=True)
    got, trainer = lightning_run(bn_model, batches, device, 1, **fp16(device, init_scale=2.0**40))
    sam = trainer.optimizers[0]
    moved = max((p.detach().cpu() - q).abs().max().item() for p, q in zip(got.parameters(), bn_model.parameters()))
    check("overflow: weights untouched", moved, 0.0)
    scale = trainer.precision_plugin.scaler.get_scale()
    check("overflow: scale backed off to 2**39", abs(scale - 2.0**39), 0.0)
    check("overflow: not left perturbed", float(sam.is_perturbed), 0.0)
    check("overflow: BatchNorm counted 1 pass", abs(int(got[1].num_batches_tracked) - 1), 0)

    # bf16-mixed and 32-true
    got, _ = lightning_run(model, batches, device, steps, precision="bf16-mixed", accumulate_grad_batches=k)
    want = plain_run(model, batches, device, steps, k=k, autocast=torch.bfloat16)
    check("bf16-mixed, k=2: vs autocast loop", max_difference(got, want), 1e-3)
    got, _ = lightning_run(model, batches, device, steps, precision="32-true", gradient_clip_val=clip)
    want = plain_run(model, batches, device, steps, clip=clip)
    check("32-true, clip: vs plain loop", max_difference(got, want), 1e-5)
    elapsed = time.perf_counter() - start

    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"\nflatminima.integrations.lightning on {name}, lightning {L.__version__}, torch {torch.__version__}\n")
    print("| check | max abs difference | limit | ok |")
    print("|---|---:|---:|---|")
    for row in rows:
        print(f"| {row[0]} | {row[1]} | {row[2]} | {'yes' if row[3] else 'FAILED'} |")
    failed = [row[0] for row in rows if not row[3]]
    print(f"\n{len(rows) - len(failed)}/{len(rows)} checks passed in {elapsed:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
