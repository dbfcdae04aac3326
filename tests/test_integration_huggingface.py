"""flatminima.integrations.huggingface: SAMTrainer and the Accelerate loop against a plain PyTorch SAM loop.

Every Trainer run trains a tiny float64 model (a plain nn.Module returning {"loss", "logits"}, as the Trainer
accepts) on an in-memory dataset read in order, and is compared, weights and all, with a reference loop that
writes SAM's algorithm out by hand (first_step / second_step on the whole step's batch). fp16 needs a CUDA
device in Accelerate; its GradScaler logic is exercised here with a CPU GradScaler injected into the Trainer's
Accelerator (benchmarks/cuda_check_huggingface.py runs real fp16 on a GPU).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
accelerate = pytest.importorskip("accelerate")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.optimizer import AcceleratedOptimizer  # noqa: E402
from accelerate.state import AcceleratorState, GradientState  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from flatminima import SAM, EveryKSteps, OrthogonalEscape, SharpnessAwareStep  # noqa: E402
from flatminima.integrations.huggingface import SAMTrainer, sam_step, unwrap_sam  # noqa: E402

N = 24  # examples: 6 steps of 4, or 3 steps of 2 micro-batches of 4
BATCH = 4
LR = 0.1
RHO = 0.05
TOL = dict(rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------- model, data, reference


class Tiny(nn.Module):
    """6 -> 16 -> 3 classifier in float64 (BatchNorm optional); the loss is the mean cross-entropy."""

    def __init__(self, batch_norm: bool = False, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        torch.manual_seed(0)
        layers: list[nn.Module] = [nn.Linear(6, 16)]
        if batch_norm:
            layers.append(nn.BatchNorm1d(16))
        layers += [nn.Tanh(), nn.Linear(16, 3)]
        self.net = nn.Sequential(*layers).to(dtype)

    def forward(self, x: Tensor, labels: Tensor) -> dict[str, Tensor]:
        logits = self.net(x)
        loss = F.cross_entropy(logits.float() if logits.dtype == torch.bfloat16 else logits, labels)
        return {"loss": loss, "logits": logits}


class TinyItems(Tiny):
    """Accepts loss kwargs, so the Trainer passes num_items_in_batch (the step's count of labels != -100) and the
    loss is the sum over the micro-batch divided by it (the Trainer then does not divide by the accumulation)."""

    def forward(self, x: Tensor, labels: Tensor, **kwargs: object) -> dict[str, Tensor]:
        logits = self.net(x)
        items = kwargs.get("num_items_in_batch")
        assert items is not None, "the Trainer should pass num_items_in_batch to a model accepting **kwargs"
        return {"loss": F.cross_entropy(logits, labels, reduction="sum") / items, "logits": logits}


def dataset(masked: bool = False, dtype: torch.dtype = torch.float64) -> list[dict[str, Tensor]]:
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(N, 6, generator=gen, dtype=torch.float64).to(dtype)
    y = torch.randint(0, 3, (N,), generator=gen)
    if masked:  # uneven counts per micro-batch, so num_items_in_batch differs from k x the micro-batch size
        y[[1, 2, 3, 9, 17]] = -100
    return [{"x": x[i], "labels": y[i]} for i in range(N)]


def step_batches(data: list[dict[str, Tensor]], per_step: int) -> list[tuple[Tensor, Tensor]]:
    """The whole batch of each optimizer step, in the Trainer's (sequential) order."""
    out = []
    for start in range(0, N, per_step):
        rows = data[start : start + per_step]
        out.append((torch.stack([r["x"] for r in rows]), torch.stack([r["labels"] for r in rows])))
    return out


def full_loss(model: Tiny, x: Tensor, y: Tensor) -> Tensor:
    """The loss of the step's whole batch: mean CE over the labels that count (ignore_index=-100)."""
    return F.cross_entropy(model.net(x), y, ignore_index=-100)


def reference(
    model: Tiny,
    sam: SAM,
    batches: list[tuple[Tensor, Tensor]],
    *,
    max_grad_norm: float | None = None,
    scheduler: object | None = None,
    skip: tuple[int, ...] = (),
) -> tuple[list[float], list[float]]:
    """SAM written out: g(w) on the step's batch, first_step, g(w + e), clip, second_step, scheduler step.

    Steps in ``skip`` are skipped whole (what a GradScaler overflow does). Returns the losses at w and the norms
    of g(w + e) before clipping.
    """
    losses, norms = [], []
    for step, (x, y) in enumerate(batches):
        if step in skip:
            continue
        sam.zero_grad()
        loss = full_loss(model, x, y)
        loss.backward()
        sam.first_step(zero_grad=True)
        full_loss(model, x, y).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm or math.inf)))
        sam.second_step(zero_grad=True)
        if scheduler is not None:
            scheduler.step()
        losses.append(float(loss.detach()))
    return losses, norms


def sgd_sam(net: nn.Module, **kwargs: object) -> SAM:
    return SAM(net.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=0.9, **kwargs)


def training_args(tmp_path: Path, **overrides: object) -> transformers.TrainingArguments:
    args = dict(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        per_device_train_batch_size=BATCH,
        num_train_epochs=1,
        max_grad_norm=0.0,
        lr_scheduler_type="constant",
        dataloader_num_workers=0,
        seed=0,
    )
    fields = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
    if "train_sampling_strategy" in fields:
        args["train_sampling_strategy"] = "sequential"
    args.update(overrides)
    return transformers.TrainingArguments(**args)


class InOrder(SAMTrainer):
    """Reads the dataset in order (on transformers without train_sampling_strategy as well)."""

    def _get_train_sampler(self, *args: object, **kwargs: object) -> torch.utils.data.Sampler:
        return torch.utils.data.SequentialSampler(self.train_dataset)


class Watch(transformers.TrainerCallback):
    """Records, around each optimizer step, whether SAM holds w + e and whether the step was skipped."""

    def __init__(self) -> None:
        self.trainer: SAMTrainer | None = None
        self.perturbed: list[bool] = []
        self.skipped: list[bool] = []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.perturbed.append(unwrap_sam(self.trainer.optimizer).is_perturbed)

    def on_step_end(self, args, state, control, **kwargs):
        self.perturbed.append(unwrap_sam(self.trainer.optimizer).is_perturbed)
        self.skipped.append(self.trainer.accelerator.optimizer_step_was_skipped)


def make_trainer(model: nn.Module, data: list, args: transformers.TrainingArguments, cls=InOrder, **kwargs):
    watch = Watch()
    trainer = cls(model=model, args=args, train_dataset=data, callbacks=[watch], **kwargs)
    watch.trainer = trainer
    return trainer, watch


def assert_same_weights(a: nn.Module, b: nn.Module, **tol: float) -> None:
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, msg=lambda m, name=name: f"{name}: {m}", **(tol or TOL))


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Accelerate keeps process-wide singletons (mixed precision, sync flags); each test starts clean."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


# ---------------------------------------------------------------------------- SAMTrainer against the reference


def test_trainer_plain_matches_reference(tmp_path: Path) -> None:
    data = dataset()
    model, ref = Tiny(), Tiny()
    sam = sgd_sam(model)
    trainer, watch = make_trainer(model, data, training_args(tmp_path), optimizers=(sam, None))
    result = trainer.train()
    losses, _ = reference(ref, sgd_sam(ref), step_batches(data, BATCH))

    assert_same_weights(model, ref)
    assert unwrap_sam(trainer.optimizer) is sam and sam.steps == 6 and not sam.is_perturbed
    assert watch.perturbed == [False] * 12  # w restored before the Trainer's clipping, callbacks and step
    assert result.training_loss == pytest.approx(sum(losses) / len(losses), rel=1e-6)  # the loss at w


@pytest.mark.parametrize("model_cls", [Tiny, TinyItems], ids=["mean-loss", "num_items_in_batch"])
def test_trainer_gradient_accumulation(tmp_path: Path, model_cls: type[Tiny]) -> None:
    """k = 2: the ascent from both micro-batches' gradient at w, the descent from both at w + e."""
    data = dataset(masked=model_cls is TinyItems)
    model, ref = model_cls(), model_cls()
    trainer, watch = make_trainer(
        model, data, training_args(tmp_path, gradient_accumulation_steps=2), optimizers=(sgd_sam(model), None)
    )
    trainer.train()
    reference(ref, sgd_sam(ref), step_batches(data, 2 * BATCH))

    assert_same_weights(model, ref)
    assert unwrap_sam(trainer.optimizer).steps == 3 and watch.perturbed == [False] * 6


def test_trainer_clipping_and_own_scheduler(tmp_path: Path) -> None:
    """max_grad_norm clips g(w + e) before the base step; a scheduler built on the SAM object steps each step."""
    data = dataset()
    model, ref = Tiny(), Tiny()
    sam, ref_sam = sgd_sam(model), sgd_sam(ref)
    schedule = torch.optim.lr_scheduler.StepLR(sam, step_size=2, gamma=0.5)
    trainer, _ = make_trainer(model, data, training_args(tmp_path, max_grad_norm=1.2), optimizers=(sam, schedule))
    trainer.train()
    ref_schedule = torch.optim.lr_scheduler.StepLR(ref_sam, step_size=2, gamma=0.5)
    _, norms = reference(ref, ref_sam, step_batches(data, BATCH), max_grad_norm=1.2, scheduler=ref_schedule)

    assert any(n > 1.2 for n in norms) and any(n < 1.2 for n in norms)  # clipping was active, and not always
    assert_same_weights(model, ref)
    assert sam.param_groups[0]["lr"] == ref_sam.param_groups[0]["lr"] == LR * 0.5**3  # halvings: exact


def test_trainer_builds_sam_from_training_arguments(tmp_path: Path) -> None:
    """No optimizer given: the Trainer's AdamW (weight-decay groups) inside SAM, its warmup + linear schedule."""
    data = dataset()
    model, ref = Tiny(), Tiny()
    args = training_args(tmp_path, learning_rate=0.01, weight_decay=0.1, lr_scheduler_type="linear", warmup_steps=2)
    trainer, _ = make_trainer(model, data, args, sam_rho=0.1, sam_kwargs={"p": 2.0})
    trainer.train()

    sam = unwrap_sam(trainer.optimizer)
    assert [g["rho"] for g in sam.param_groups] == [0.1, 0.1]
    cls, kwargs = transformers.Trainer.get_optimizer_cls_and_kwargs(args, ref)
    assert cls is torch.optim.AdamW
    decay = [p for n, p in ref.named_parameters() if n.endswith("weight")]
    no_decay = [p for n, p in ref.named_parameters() if n.endswith("bias")]
    base = cls([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], **kwargs)
    ref_sam = SAM(None, base, rho=0.1)
    schedule = transformers.get_scheduler("linear", ref_sam, num_warmup_steps=2, num_training_steps=6)
    reference(ref, ref_sam, step_batches(data, BATCH), scheduler=schedule)
    assert_same_weights(model, ref)


@pytest.mark.parametrize(
    "options",
    [{"cadence": EveryKSteps(2)}, {"adaptive": True}, {"descent": OrthogonalEscape(epsilon=1.2, eta_prime=0.5)}],
    ids=["every-2nd-step", "asam", "orthogonal-escape"],
)
def test_trainer_rules_match_sharpness_aware_step(tmp_path: Path, options: dict) -> None:
    """Cadence, ASAM and a descent rule that reads g(w) and declines some ascents, with clipping: the Trainer's
    steps equal the core's SharpnessAwareStep (which clips the final direction)."""
    data = dataset()
    model, ref = Tiny(), Tiny()
    sam = sgd_sam(model, **options)
    trainer, _ = make_trainer(model, data, training_args(tmp_path, max_grad_norm=0.8), optimizers=(sam, None))
    trainer.train()
    step = SharpnessAwareStep(ref.net, F.cross_entropy, sgd_sam(ref, **options), max_grad_norm=0.8)
    for x, y in step_batches(data, BATCH):
        step(x, y)

    assert_same_weights(model, ref)
    assert sam.steps == 6 and not sam.is_perturbed


def test_trainer_bert_from_config(tmp_path: Path) -> None:
    """A real PreTrainedModel (BERT from a config, float64, no dropout) fed token ids and an attention mask."""
    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=3,
    )

    def bert() -> nn.Module:
        torch.manual_seed(0)
        return transformers.BertForSequenceClassification(config).double()

    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 50, (12, 8), generator=gen)
    mask = torch.ones_like(ids)
    mask[::3, 5:] = 0
    labels = torch.randint(0, 3, (12,), generator=gen)
    data = [{"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i]} for i in range(12)]
    model, ref = bert(), bert()
    trainer, _ = make_trainer(
        model, data, training_args(tmp_path), optimizers=(SAM(model.parameters(), torch.optim.AdamW, lr=0.01), None)
    )
    trainer.train()
    ref_sam = SAM(ref.parameters(), torch.optim.AdamW, lr=0.01)
    for start in range(0, 12, BATCH):
        batch = {"input_ids": ids[start : start + BATCH], "attention_mask": mask[start : start + BATCH]}
        ref_sam.zero_grad()
        ref(**batch, labels=labels[start : start + BATCH]).loss.backward()
        ref_sam.first_step(zero_grad=True)
        ref(**batch, labels=labels[start : start + BATCH]).loss.backward()
        ref_sam.second_step()
    assert_same_weights(model, ref)


def test_trainer_batchnorm_statistics_from_the_first_pass(tmp_path: Path) -> None:
    data = dataset()
    model, ref = Tiny(batch_norm=True), Tiny(batch_norm=True)
    trainer, _ = make_trainer(model, data, training_args(tmp_path), optimizers=(sgd_sam(model), None))
    trainer.train()
    reference(ref, sgd_sam(ref, model=ref), step_batches(data, BATCH))

    assert_same_weights(model, ref)  # running_mean / running_var included
    assert int(model.net[1].num_batches_tracked) == 6 and model.net[1].track_running_stats


def test_trainer_failure_in_the_second_pass_leaves_w(tmp_path: Path) -> None:
    """An exception at w + e (step 2) propagates with the weights back at w and BatchNorm thawed."""

    class FailsAtPass4(Tiny):
        calls = 0

        def forward(self, x: Tensor, labels: Tensor) -> dict[str, Tensor]:
            FailsAtPass4.calls += 1
            if FailsAtPass4.calls == 4:  # step 2's pass at w + e
                raise RuntimeError("boom at w + e")
            return super().forward(x, labels)

    data = dataset()
    model, ref = FailsAtPass4(batch_norm=True), Tiny(batch_norm=True)
    sam = sgd_sam(model)
    trainer, _ = make_trainer(model, data, training_args(tmp_path), optimizers=(sam, None))
    with pytest.raises(RuntimeError, match="boom at w"):
        trainer.train()
    ref_sam = sgd_sam(ref, model=ref)
    batches = step_batches(data, BATCH)
    reference(ref, ref_sam, batches[:1])
    ref.net(batches[1][0])  # step 2's pass at w updated the BatchNorm statistics too

    assert not sam.is_perturbed and model.net[1].track_running_stats
    assert_same_weights(model, ref)


def test_trainer_bf16_autocast(tmp_path: Path) -> None:
    """bf16 on a CPU: Accelerate autocasts the forward passes; the weights follow a bf16-autocast reference and
    stay near the float32 one."""
    data = dataset(dtype=torch.float32)
    model, ref, ref32 = (Tiny(dtype=torch.float32) for _ in range(3))
    trainer, watch = make_trainer(model, data, training_args(tmp_path, bf16=True), optimizers=(sgd_sam(model), None))
    trainer.train()
    assert trainer.accelerator.mixed_precision == "bf16" and trainer.accelerator.scaler is None

    class Autocast(nn.Module):  # the reference's forward under the same autocast
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: Tensor) -> Tensor:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return self.inner(x).float()

    ref_net = ref.net
    ref.net = Autocast(ref_net)
    reference(ref, sgd_sam(ref), step_batches(data, BATCH))
    ref.net = ref_net
    reference(ref32, sgd_sam(ref32), step_batches(data, BATCH))

    assert watch.perturbed == [False] * 12
    assert_same_weights(model, ref, rtol=1e-4, atol=1e-5)
    assert_same_weights(model, ref32, rtol=0.0, atol=2e-2)


class _CpuScalerAccelerator(Accelerator):
    """Accelerate's fp16 gradient handling on a CPU GradScaler (Accelerate allows fp16 only on accelerators): the
    loss is scaled in backward, clipping unscales the prepared optimizers, AcceleratedOptimizer holds the scaler."""

    def unscale_gradients(self, optimizer=None):  # what Accelerate does under fp16
        optimizers = self._optimizers if optimizer is None else [optimizer]
        for opt in optimizers:
            while isinstance(opt, AcceleratedOptimizer):
                opt = opt.optimizer
            self.scaler.unscale_(opt)


class ScaledInOrder(InOrder):
    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        self.accelerator.__class__ = _CpuScalerAccelerator
        self.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)


def test_trainer_grad_scaler_unscale_clip_and_overflow(tmp_path: Path) -> None:
    """Loss scaling: the first gradient is unscaled before the ascent (USAM's e = rho g would otherwise be 2**10
    times too long; a power-of-two scale is exact in float64, so the run equals the unscaled reference) and before
    clipping; an inf in step 2's pass at w or in step 4's pass at w + e skips that step: weights at w, scale
    halved, the scheduler held."""
    poison = {3, 7}  # forward calls: step 2's at w (so no ascent: one pass), step 4's at w + e

    class Poisoned(Tiny):
        calls = 0

        def forward(self, x: Tensor, labels: Tensor) -> dict[str, Tensor]:
            out = super().forward(x, labels)
            Poisoned.calls += 1
            if Poisoned.calls in poison:
                out["loss"] = out["loss"] * torch.tensor(math.inf, dtype=out["loss"].dtype)
            return out

    data = dataset()
    model, ref = Poisoned(), Tiny()
    sam, ref_sam = sgd_sam(model, normalize=False), sgd_sam(ref, normalize=False)  # USAM: e = rho g, not scale-free
    schedule = torch.optim.lr_scheduler.StepLR(sam, step_size=1, gamma=0.8)
    trainer, watch = make_trainer(
        model, data, training_args(tmp_path, max_grad_norm=1.2), cls=ScaledInOrder, optimizers=(sam, schedule)
    )
    trainer.train()
    scaler = trainer.accelerator.scaler
    ref_schedule = torch.optim.lr_scheduler.StepLR(ref_sam, step_size=1, gamma=0.8)
    reference(ref, ref_sam, step_batches(data, BATCH), max_grad_norm=1.2, skip=(1, 3), scheduler=ref_schedule)

    assert Poisoned.calls == 11  # step 2 ran one pass (no ascent from an inf gradient), the others two
    assert watch.skipped == [False, True, False, True, False, False]
    assert scaler.get_scale() == 2.0**8 and not sam.is_perturbed and watch.perturbed == [False] * 12
    assert_same_weights(model, ref)
    assert sam.param_groups[0]["lr"] == pytest.approx(ref_sam.param_groups[0]["lr"], rel=1e-12)


# ---------------------------------------------------------------------------- the plain Accelerate loop


def _loader(data: list, batch: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(data, batch_size=batch, shuffle=False)


def test_accelerate_loop_as_documented() -> None:
    """The loop of docs/integrations-huggingface.md: two passes with accelerator.backward, first_step and
    second_step on the SAM inside the prepared optimizer."""
    data = dataset()
    accelerator = Accelerator(cpu=True)
    model = Tiny()
    model, optimizer, loader = accelerator.prepare(model, sgd_sam(model), _loader(data, BATCH))
    sam = optimizer.optimizer
    for batch in loader:
        loss = model(**batch)["loss"]
        accelerator.backward(loss)
        sam.first_step(zero_grad=True, grad_scaler=accelerator.scaler)
        accelerator.backward(model(**batch)["loss"])
        sam.second_step(zero_grad=True, grad_scaler=accelerator.scaler)
        if accelerator.scaler is not None:
            accelerator.scaler.update()
    ref = Tiny()
    reference(ref, sgd_sam(ref), step_batches(data, BATCH))
    assert_same_weights(accelerator.unwrap_model(model), ref)


def test_sam_step_helper_accumulation_and_clipping() -> None:
    data = dataset()
    accelerator = Accelerator(cpu=True)
    model = Tiny()
    model, optimizer, loader = accelerator.prepare(model, sgd_sam(model), _loader(data, BATCH))
    batches = list(loader)
    losses = [
        sam_step(accelerator, model, optimizer, lambda m, b: m(**b)["loss"], *batches[i : i + 2], max_grad_norm=0.85)
        for i in range(0, len(batches), 2)
    ]
    ref = Tiny()
    ref_losses, norms = reference(ref, sgd_sam(ref), step_batches(data, 2 * BATCH), max_grad_norm=0.85)

    assert any(n > 0.85 for n in norms) and any(n < 0.85 for n in norms)
    assert_same_weights(accelerator.unwrap_model(model), ref)
    torch.testing.assert_close(torch.stack(losses), torch.tensor(ref_losses, dtype=torch.float64), **TOL)
    assert not optimizer.step_was_skipped and unwrap_sam(optimizer).steps == 3


# ---------------------------------------------------------------------------- refusals


def test_clear_errors(tmp_path: Path) -> None:
    model = Tiny()
    data = dataset()
    args = training_args(tmp_path)
    with pytest.raises(TypeError, match=r"expected a flatminima\.SAM"):
        InOrder(model=model, args=args, train_dataset=data, optimizers=(torch.optim.SGD(model.parameters()), None))
    with pytest.raises(ValueError, match="set these options on your SAM"):
        InOrder(model=model, args=args, train_dataset=data, optimizers=(sgd_sam(model), None), sam_rho=0.1)
    accelerator = Accelerator(cpu=True)
    with pytest.raises(ValueError, match="at least one batch"):
        sam_step(accelerator, model, sgd_sam(model), lambda m, b: m(**b)["loss"])


# ---------------------------------------------------------------------------- DDP: 2 gloo processes


def _ddp_body(rank: int, out_dir: Path) -> None:
    """Each rank: SAMTrainer (k = 2, 2 rows per micro-batch), then sam_step in an Accelerate loop; saves weights.

    Accelerate hands rank r the batches r, r + 2, ... of the sequential sampler, so each optimizer step sees the
    same 8 rows as a single process with micro-batches of 4.
    """
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
    data = dataset()
    model = Tiny()
    args = training_args(out_dir / f"trainer{rank}", per_device_train_batch_size=2, gradient_accumulation_steps=2)
    trainer, _ = make_trainer(model, data, args, optimizers=(sgd_sam(model), None))
    assert trainer.accelerator.distributed_type.value == "MULTI_CPU" and trainer.accelerator.num_processes == 2
    trainer.train()
    assert isinstance(trainer.model_wrapped, nn.parallel.DistributedDataParallel)
    torch.save(model.state_dict(), out_dir / f"trainer{rank}.pt")

    accelerator = Accelerator(cpu=True)
    model = Tiny()
    model, optimizer, loader = accelerator.prepare(model, sgd_sam(model), _loader(data, 2))
    batches = list(loader)  # this rank's 6 batches of 2
    for i in range(0, len(batches), 2):
        sam_step(accelerator, model, optimizer, lambda m, b: m(**b)["loss"], *batches[i : i + 2])
    torch.save(accelerator.unwrap_model(model).state_dict(), out_dir / f"loop{rank}.pt")


@pytest.mark.slow
@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed gloo")
def test_ddp_two_processes(tmp_path: Path) -> None:
    """DDP (gloo, 2 CPU processes): SAMTrainer with accumulation and sam_step give plain SAM on the global batch
    (first pass all-reduced: one perturbation), identical weights on both ranks."""
    from tests._gloo import run_on_gloo

    run_on_gloo(_ddp_body, tmp_path, timeout_s=120)
    ref = Tiny()
    reference(ref, sgd_sam(ref), step_batches(dataset(), 2 * BATCH))
    for kind in ("trainer", "loop"):
        for rank in (0, 1):
            state = torch.load(tmp_path / f"{kind}{rank}.pt", weights_only=True)
            for name, value in ref.state_dict().items():
                torch.testing.assert_close(
                    state[name], value, **TOL, msg=lambda m, k=kind, r=rank: f"{k} rank {r}: {m}"
                )


def test_trainer_checkpoint_resume(tmp_path: Path) -> None:
    """A run resumed from its step-3 checkpoint (SAM's state_dict: momentum and step counter) ends where the
    uninterrupted run does."""
    data = dataset()
    model = Tiny()
    sam = sgd_sam(model, cadence=EveryKSteps(2))
    args = training_args(tmp_path, save_strategy="steps", save_steps=3)
    make_trainer(model, data, args, optimizers=(sam, None))[0].train()

    resumed = Tiny()
    resumed_sam = sgd_sam(resumed, cadence=EveryKSteps(2))
    trainer, _ = make_trainer(resumed, data, args, optimizers=(resumed_sam, None))
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    assert resumed_sam.steps == sam.steps == 6
    assert_same_weights(resumed, model)


def test_sam_step_refuses_the_silent_traps(monkeypatch) -> None:
    """Two traps that trained "fine" for the wrong reason: Accelerate blind to torchrun's processes (CPU-only, no
    cpu=True), and sam_step inside accelerator.accumulate, whose no_sync stops DDP's all-reduce. DDP's no_sync is
    its flag require_backward_grad_sync = False, set here on the model directly (a one-process gloo group in the
    test process hung now and then in CI; tests/test_integration_huggingface_fsdp.py drives FSDP2's no_sync for
    real on 2 processes)."""
    data = dataset()
    accelerator = Accelerator(cpu=True)
    loss_fn = lambda m, b: m(**b)["loss"]  # noqa: E731
    model = Tiny()
    optimizer = sgd_sam(model)
    batch = next(iter(_loader(data, BATCH)))
    before = [p.detach().clone() for p in model.parameters()]
    model.require_backward_grad_sync = False  # what DDP.no_sync() sets, as accelerator.accumulate enters it
    with pytest.raises(RuntimeError, match=r"inside accelerator.accumulate\(...\) \(or no_sync\)"):
        sam_step(accelerator, model, optimizer, loss_fn, batch)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    model.require_backward_grad_sync = True
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match=r"one of 2 \(WORLD_SIZE\), but Accelerate runs as one process"):
        sam_step(accelerator, model, optimizer, loss_fn, batch)
    monkeypatch.setenv("WORLD_SIZE", "1")
    sam_step(accelerator, model, optimizer, loss_fn, batch)  # outside: a step
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
