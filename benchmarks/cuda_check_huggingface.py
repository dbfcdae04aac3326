"""GPU check of flatminima.integrations.huggingface: what the CPU tests cannot reach.

Run ``python benchmarks/cuda_check_huggingface.py`` on a machine with one CUDA GPU (under a minute). Each row trains
a small MLP for 6 optimizer steps (2 micro-batches of 64 each, max_grad_norm 1) through ``SAMTrainer`` or
``sam_step`` and through a plain PyTorch loop of the same algorithm (SAM.first_step / second_step,
``torch.autocast``, ``torch.amp.GradScaler``), from the same weights on the same batches, and compares the weights:

- fp16 as Accelerate builds it on a GPU (its GradScaler, init scale 65536): equal to the GradScaler loop and close
  to float32 (a first gradient left scaled would make the ascent 65536 times too long);
- an inf injected in step 2's pass at w and in step 4's pass at w + e: both steps skipped (weights untouched, not
  left perturbed, scale halved, ``optimizer_step_was_skipped`` set), the rest equal to the loop;
- ``sam_step`` in an ``Accelerator(mixed_precision="fp16")`` loop with the same injections;
- bf16 and fp32 on the GPU, against the same loops.

Prints a table; exits 1 if a check fails, 2 if there is no GPU. ``--device cpu`` runs the same checks on a CPU
(fp16 rows through a CPU GradScaler put into the Trainer's Accelerator, float32 compute), to test the script.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
import warnings

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "0")  # one GPU: more would make the Trainer use DataParallel
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import torch
import torch.nn.functional as F
import transformers
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.state import AcceleratorState, GradientState
from torch import Tensor, nn

from flatminima import SAM
from flatminima.integrations.huggingface import SAMTrainer, sam_step, unwrap_sam

RHO, LR, MOMENTUM, BATCH, K, STEPS, WIDTH, CLIP = 0.05, 0.1, 0.9, 64, 2, 6, 256, 1.0
POISONED = {1: "w", 3: "w+e"}  # step index -> the pass whose first micro-batch gets an inf loss


class Net(nn.Module):
    """MLP 32 -> 256 -> 256 -> 10 returning {"loss", "logits"}; can put inf into chosen forward calls."""

    def __init__(self, poison_calls: frozenset[int] = frozenset()) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Linear(32, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, 10)
        )
        self.poison_calls, self.calls = poison_calls, 0

    def forward(self, x: Tensor, labels: Tensor) -> dict[str, Tensor]:
        logits = self.net(x)
        loss = F.cross_entropy(logits, labels)
        self.calls += 1
        if self.calls in self.poison_calls:
            loss = loss * float("inf")
        return {"loss": loss, "logits": logits}


def poison_calls() -> frozenset[int]:
    """Forward-call numbers of the poisoned passes (a step poisoned at w runs only its k passes at w)."""
    calls, call = set(), 0
    for step in range(STEPS):
        if POISONED.get(step) == "w":
            calls.add(call + 1)
            call += K
        else:
            if POISONED.get(step) == "w+e":
                calls.add(call + K + 1)
            call += 2 * K
    return frozenset(calls)


def data() -> list[dict[str, Tensor]]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH * K * STEPS, 32, generator=gen)
    y = torch.randint(0, 10, (BATCH * K * STEPS,), generator=gen)
    return [{"x": x[i], "labels": y[i]} for i in range(len(x))]


def micro_batches(rows: list[dict[str, Tensor]], device: torch.device) -> list[list[tuple[Tensor, Tensor]]]:
    steps = []
    for s in range(STEPS):
        step = []
        for m in range(K):
            chunk = rows[(s * K + m) * BATCH : (s * K + m + 1) * BATCH]
            step.append(
                (torch.stack([r["x"] for r in chunk]).to(device), torch.stack([r["labels"] for r in chunk]).to(device))
            )
        steps.append(step)
    return steps


def new_sam(model: nn.Module, normalize: bool = True) -> SAM:
    return SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=MOMENTUM, normalize=normalize)


def loop(
    device: torch.device, dtype: torch.dtype | None, scaler: bool, skip: tuple[int, ...] = (), normalize: bool = True
) -> nn.Module:
    """The reference: SAM written out with torch.autocast and torch.amp.GradScaler; steps in ``skip`` are dropped
    (and the scale halved, as an overflow does)."""
    model = Net().to(device)
    sam = new_sam(model, normalize)
    grad_scaler = torch.amp.GradScaler(device.type) if scaler else None
    for step, micro in enumerate(micro_batches(data(), device)):
        if step in skip:
            grad_scaler.update(new_scale=grad_scaler.get_scale() / 2)
            continue

        def passes(micro: list[tuple[Tensor, Tensor]] = micro) -> None:
            for x, y in micro:
                with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                    loss = model(x, y)["loss"] / K
                (grad_scaler.scale(loss) if grad_scaler else loss).backward()

        sam.zero_grad()
        passes()
        sam.first_step(zero_grad=True, grad_scaler=grad_scaler)
        passes()
        if grad_scaler:
            grad_scaler.unscale_(sam)
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        sam.second_step(grad_scaler=grad_scaler)
        if grad_scaler:
            grad_scaler.update()
    return model


class _CpuScalerAccelerator(Accelerator):
    def unscale_gradients(self, optimizer=None):  # what Accelerate does under fp16, for the --device cpu run
        for opt in self._optimizers if optimizer is None else [optimizer]:
            while isinstance(opt, AcceleratedOptimizer):
                opt = opt.optimizer
            self.scaler.unscale_(opt)


class InOrder(SAMTrainer):
    def _get_train_sampler(self, *args: object, **kwargs: object) -> torch.utils.data.Sampler:
        return torch.utils.data.SequentialSampler(self.train_dataset)


class CpuScaled(InOrder):
    """For --device cpu: Accelerate allows fp16 on accelerators only, so float32 compute with a CPU GradScaler."""

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        self.accelerator.__class__ = _CpuScalerAccelerator
        self.accelerator.scaler = torch.amp.GradScaler("cpu")


class Record(transformers.TrainerCallback):
    def __init__(self) -> None:
        self.trainer, self.skipped, self.perturbed = None, [], []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.perturbed.append(unwrap_sam(self.trainer.optimizer).is_perturbed)

    def on_step_end(self, args, state, control, **kwargs):
        self.skipped.append(self.trainer.accelerator.optimizer_step_was_skipped)


def reset_accelerate() -> None:
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def trainer_run(
    device: torch.device, precision: str, poison: bool, normalize: bool = True
) -> tuple[nn.Module, Record, float | None]:
    reset_accelerate()
    model = Net(poison_calls() if poison else frozenset())
    args = dict(
        output_dir=tempfile.mkdtemp(), use_cpu=device.type == "cpu", report_to=[], save_strategy="no",
        logging_strategy="no", disable_tqdm=True, per_device_train_batch_size=BATCH, gradient_accumulation_steps=K,
        max_grad_norm=CLIP, lr_scheduler_type="constant", num_train_epochs=1, seed=0,
        fp16=precision == "fp16" and device.type == "cuda", bf16=precision == "bf16",
    )  # fmt: skip
    if "train_sampling_strategy" in {f.name for f in dataclasses.fields(transformers.TrainingArguments)}:
        args["train_sampling_strategy"] = "sequential"
    record = Record()
    sam = new_sam(model, normalize)
    cls = CpuScaled if precision == "fp16" and device.type == "cpu" else InOrder
    trainer = cls(
        model=model, args=transformers.TrainingArguments(**args), train_dataset=data(), callbacks=[record],
        optimizers=(sam, None),
    )  # fmt: skip
    record.trainer = trainer
    trainer.train()
    assert not sam.is_perturbed and not any(record.perturbed), "weights left at w + e"
    scaler = trainer.accelerator.scaler
    return model, record, scaler.get_scale() if scaler is not None else None


def loop_helper_run(device: torch.device) -> tuple[nn.Module, list[bool], float]:
    reset_accelerate()
    if device.type == "cpu":
        accelerator = Accelerator(cpu=True)
        accelerator.scaler = torch.amp.GradScaler("cpu")
    else:
        accelerator = Accelerator(mixed_precision="fp16")
    model = Net(poison_calls())
    model, optimizer = accelerator.prepare(model, new_sam(model))
    skipped = []
    for micro in micro_batches(data(), accelerator.device):
        batches = [{"x": x, "labels": y} for x, y in micro]
        sam_step(accelerator, model, optimizer, lambda m, b: m(**b)["loss"], *batches, max_grad_norm=CLIP)
        skipped.append(optimizer.step_was_skipped)
    assert not unwrap_sam(optimizer).is_perturbed
    return accelerator.unwrap_model(model), skipped, accelerator.scaler.get_scale()


def max_diff(a: nn.Module, b: nn.Module) -> float:
    return max(
        (p.detach().float().cpu() - q.detach().float().cpu()).abs().max().item()
        for p, q in zip(a.parameters(), b.parameters())
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    device = torch.device(parser.parse_args().device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing checked (use --device cpu to test the script)")
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    start = time.perf_counter()
    rows: list[tuple[str, str, str, bool]] = []
    expected_skips = [step in POISONED for step in range(STEPS)]
    fp16 = None if device.type == "cpu" else torch.float16  # the CPU run scales float32 losses

    def row(name: str, check) -> None:
        try:
            diff, limit, extra_ok, note = check()
            rows.append((name + note, f"{diff:.2e}", f"{limit:.0e}", diff <= limit and extra_ok))
        except Exception as error:  # a crash is a failed row, the others still run
            rows.append((f"{name}: {type(error).__name__}: {error}"[:150], "-", "-", False))

    ref32 = loop(device, None, scaler=False)
    usam32 = loop(device, None, scaler=False, normalize=False)

    def trainer_fp16():
        # USAM (e = rho g): a first gradient left scaled would make the ascent 65536 times too long
        model, _, _ = trainer_run(device, "fp16", poison=False, normalize=False)
        ref = loop(device, fp16, scaler=True, normalize=False)
        far = max_diff(model, usam32)
        return max_diff(model, ref), 1e-5, far < 5e-2 and far > 0 if fp16 else True, f" (vs fp32: {far:.1e})"

    def trainer_overflow():
        model, record, scale = trainer_run(device, "fp16", poison=True)
        ref = loop(device, fp16, scaler=True, skip=tuple(POISONED))
        ok = record.skipped == expected_skips and scale == 65536.0 / 4
        return max_diff(model, ref), 1e-5, ok, f" (skipped {record.skipped}, scale {scale:g})"

    def helper_overflow():
        model, skipped, scale = loop_helper_run(device)
        ref = loop(device, fp16, scaler=True, skip=tuple(POISONED))
        return max_diff(model, ref), 1e-5, skipped == expected_skips and scale == 65536.0 / 4, f" (scale {scale:g})"

    def trainer_bf16():
        model, _, _ = trainer_run(device, "bf16", poison=False)
        far = max_diff(model, ref32)
        return max_diff(model, loop(device, torch.bfloat16, scaler=False)), 1e-5, far < 1e-1, f" (vs fp32: {far:.1e})"

    def trainer_fp32():
        model, _, _ = trainer_run(device, "no", poison=False)
        return max_diff(model, ref32), 1e-5, True, ""

    row("SAMTrainer fp16 (GradScaler), USAM, k=2, clipping", trainer_fp16)
    row("SAMTrainer fp16, inf at w (step 2) and at w+e (step 4)", trainer_overflow)
    row("sam_step fp16 Accelerate loop, same infs", helper_overflow)
    row("SAMTrainer bf16 autocast", trainer_bf16)
    row("SAMTrainer fp32", trainer_fp32)

    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    versions = f"transformers {transformers.__version__}, torch {torch.__version__}"
    print(f"\nflatminima.integrations.huggingface on {name}, {versions}\n")
    print("| check | max abs difference to the loop | limit | ok |")
    print("|---|---:|---:|---|")
    for check, diff, limit, ok in rows:
        print(f"| {check} | {diff} | {limit} | {'yes' if ok else 'FAILED'} |")
    failed = [r for r in rows if not r[3]]
    print(f"\n{len(rows) - len(failed)}/{len(rows)} checks passed in {time.perf_counter() - start:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
