"""flatminima.integrations.lightning: SAM in Lightning's automatic optimisation, checked against a plain PyTorch
loop of the same algorithm (same initial weights, same batches, SAM.first_step / second_step), in float64 to
1e-10 where Lightning allows it, and against the GradScaler / autocast protocol of the plain loop for AMP."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

L = pytest.importorskip("lightning")

from lightning.pytorch.plugins import MixedPrecision  # noqa: E402

from flatminima import SAM, EveryKSteps  # noqa: E402
from flatminima.integrations.lightning import SharpnessAwareMixin  # noqa: E402
from tests.conftest import make_mlp  # noqa: E402

RHO, LR, MOMENTUM = 0.1, 0.2, 0.9
BATCH, N_BATCHES = 8, 5


def make_model(batch_norm: bool = False, dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Module:
    return make_mlp(seed=seed, dtype=dtype, batch_norm=batch_norm)  # conftest's MLP, in float64 by default


def make_batches(dtype: torch.dtype = torch.float64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH * N_BATCHES, 6, generator=gen, dtype=dtype)
    y = torch.randint(0, 3, (BATCH * N_BATCHES,), generator=gen)
    return [(x[i : i + BATCH], y[i : i + BATCH]) for i in range(0, len(x), BATCH)]


def loader(batches, batch_size: int = BATCH):
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def step_lr(opt):
    return torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)


class Net(SharpnessAwareMixin, L.LightningModule):
    def __init__(self, model: nn.Module, scheduler=None, cadence=None) -> None:
        super().__init__()
        self.model = model
        self.scheduler = scheduler
        self.cadence = cadence
        self.perturbed_in_hook = False

    def on_before_optimizer_step(self, optimizer):
        self.perturbed_in_hook |= optimizer.is_perturbed  # user hooks see the weights w

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.model(x), y)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        opt = SAM(self.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=MOMENTUM, cadence=self.cadence)
        if self.scheduler is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.scheduler(opt), "interval": "step"}}


def trainer(max_steps: int = -1, **kwargs) -> L.Trainer:
    options = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_steps=max_steps,
        precision="64-true",
    )
    options.update(kwargs)
    return L.Trainer(**options)


def reference(
    model, batches, steps, *, k=1, clip=None, scheduler=None, cadence=None, autocast=None, scaler=None, rule=None
):
    """The plain PyTorch loop of the same algorithm: Lightning's windows of k batches (the last of an epoch may
    be shorter), each loss divided by k, SAM's two passes, clipping of g(w + e), then the scheduler."""
    opt = SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=MOMENTUM, cadence=cadence, model=model,
              perturbation=rule)  # fmt: skip
    sched = scheduler(opt) if scheduler is not None else None
    windows = [batches[i : i + k] for i in range(0, len(batches), k)]
    last_loss = None

    def backward(window):
        nonlocal last_loss
        for x, y in window:
            if autocast is None:
                loss = F.cross_entropy(model(x), y)
            else:
                with torch.autocast("cpu", dtype=autocast, cache_enabled=False):
                    loss = F.cross_entropy(model(x), y)
            last_loss = loss.detach()
            loss = loss / k
            (scaler.scale(loss) if scaler is not None else loss).backward()

    done = 0
    while done < steps:
        for window in windows:
            opt.zero_grad()
            backward(window)
            at_w = last_loss
            if opt.ascent_due:
                opt.first_step(zero_grad=True, grad_scaler=scaler)
                backward(window)
            if scaler is not None:
                scaler.unscale_(opt)
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(list(model.parameters()), clip)
            opt.second_step(grad_scaler=scaler)
            if scaler is not None:
                scaler.update()
            if sched is not None:
                sched.step()
            done += 1
            if done == steps:
                break
    return opt, at_w


def max_difference(a: nn.Module, b: nn.Module) -> float:
    pairs = zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    return max((x.double() - y.double()).abs().max().item() for x, y in pairs)


def fit(net, batches, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = trainer(**kwargs)
        run.fit(net, loader(batches))
    return run, [str(w.message) for w in caught]


@pytest.mark.parametrize(
    "case",
    [
        dict(),
        dict(accumulate_grad_batches=2),  # 5 batches an epoch: windows (0, 1), (2, 3), (4)
        dict(gradient_clip_val=0.05),
        dict(scheduler=step_lr),
        dict(cadence=EveryKSteps(2)),
        dict(batch_norm=True, accumulate_grad_batches=2),
    ],
    ids=["plain", "accumulate2", "clip", "scheduler", "cadence", "batchnorm"],
)
def test_matches_plain_pytorch_sam(case):
    steps = 6
    batch_norm = case.pop("batch_norm", False)
    scheduler, cadence = case.pop("scheduler", None), case.pop("cadence", None)
    k = case.get("accumulate_grad_batches", 1)
    model, batches = make_model(batch_norm), make_batches()
    net = Net(copy.deepcopy(model), scheduler=scheduler, cadence=copy.deepcopy(cadence))
    run, messages = fit(net, batches, max_steps=steps, **case)
    opt, loss_at_w = reference(
        model, batches, steps, k=k, clip=case.get("gradient_clip_val"), scheduler=scheduler, cadence=cadence
    )

    assert max_difference(net.model, model) <= 1e-10  # weights, and BatchNorm's running statistics
    assert run.global_step == steps and run.optimizers[0].steps == steps == opt.steps
    assert torch.allclose(run.callback_metrics["loss"], loss_at_w, rtol=0, atol=1e-12)  # logged at w
    assert not run.optimizers[0].is_perturbed and not net.perturbed_in_hook
    assert not any("lr_scheduler.step()" in m for m in messages), messages
    if scheduler is not None:
        # exact by construction: three halvings of LR, each exact in binary floating point
        assert run.optimizers[0].param_groups[0]["lr"] == opt.param_groups[0]["lr"] == LR * 0.5**3
    if batch_norm:
        bn = net.model[1]
        assert bn.track_running_stats and int(bn.num_batches_tracked) == 2 * N_BATCHES  # first passes only


def test_checkpoint_resume_equals_uninterrupted_run(tmp_path):
    """Two epochs straight vs one epoch, a checkpoint, and a resume with ckpt_path into a differently
    initialised module: bit for bit the same weights, BatchNorm statistics, momentum, LR and SAM step count."""
    options = dict(accumulate_grad_batches=2, gradient_clip_val=0.5)
    batches = make_batches()
    straight = Net(make_model(batch_norm=True), scheduler=step_lr)
    run, _ = fit(straight, batches, max_epochs=2, **options)

    first = Net(make_model(batch_norm=True), scheduler=step_lr)
    fit(first, batches, max_epochs=1, enable_checkpointing=True, default_root_dir=tmp_path, **options)
    path = next(tmp_path.rglob("*.ckpt"))
    resumed = Net(make_model(batch_norm=True, seed=7), scheduler=step_lr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = trainer(max_epochs=2, **options)
        again.fit(resumed, loader(batches), ckpt_path=path)

    assert again.global_step == run.global_step == 6
    # same code path: the resume replays the same ops in the same order, from the checkpointed values
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    sam_a, sam_b = run.optimizers[0], again.optimizers[0]
    assert sam_a.steps == sam_b.steps == 6 and sam_a.param_groups[0]["lr"] == sam_b.param_groups[0]["lr"]
    for p, q in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(sam_a.state[p]["momentum_buffer"], sam_b.state[q]["momentum_buffer"])


class Resumable:
    """The batches in order, as an iterable Lightning can checkpoint (state_dict / load_state_dict), so that a
    run resumed mid-epoch sees the batches the uninterrupted run saw."""

    def __init__(self, batches) -> None:
        self.batches, self.start, self.next = batches, 0, 0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        start, self.start = self.start, 0
        for i in range(start, len(self.batches)):
            self.next = i + 1
            yield self.batches[i]

    def state_dict(self) -> dict:
        return {"next": self.next}

    def load_state_dict(self, state: dict) -> None:
        self.start = state["next"] % len(self.batches)


def test_mid_epoch_checkpoint_resume_equals_uninterrupted_run(tmp_path):
    """A ModelCheckpoint every 2 steps, mid-epoch (k=2: after batch 3 of 5), then ckpt_path: exact."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    batches = make_batches()
    straight = Net(make_model(batch_norm=True), scheduler=step_lr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(max_epochs=2, accumulate_grad_batches=2).fit(straight, Resumable(batches))
        saving = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2)
        first = Net(make_model(batch_norm=True), scheduler=step_lr)
        options = dict(enable_checkpointing=True, callbacks=[saving], accumulate_grad_batches=2)
        trainer(max_steps=2, **options).fit(first, Resumable(batches))
        resumed = Net(make_model(batch_norm=True, seed=7), scheduler=step_lr)
        again = trainer(max_epochs=2, **options)
        again.fit(resumed, Resumable(batches), ckpt_path=tmp_path / "epoch=0-step=2.ckpt")
    assert again.global_step == 6
    # same code path: the resume replays the same ops in the same order, from the checkpointed values
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_resume_from_an_epoch_end_checkpoint_that_reenters_the_epoch_mid_window(tmp_path):
    """max_steps ending an epoch of 5 batches (k=2), an epoch-end checkpoint, then a resume: Lightning re-enters
    the epoch at batch 5, the second batch of a window whose first it never runs again, and steps on that one. The
    mixin replays exactly the batches Lightning ran (it raised "expected the batches [4, 5]" before)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    class Counting(Net):
        def training_step(self, batch, batch_idx):
            key = "at w + e" if self.sam_second_pass else "at w"
            self.calls.setdefault(key, []).append(batch_idx)
            return super().training_step(batch, batch_idx)

    batches = make_batches()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        saving = ModelCheckpoint(dirpath=tmp_path, every_n_epochs=1)
        first = Net(make_model())
        trainer(max_steps=3, enable_checkpointing=True, callbacks=[saving], accumulate_grad_batches=2).fit(
            first, loader(batches)
        )
        resumed = Counting(make_model(seed=7))
        resumed.calls = {}
        again = trainer(max_steps=7, accumulate_grad_batches=2)
        again.fit(resumed, loader(batches), ckpt_path=tmp_path / "epoch=0-step=3.ckpt")
    assert again.global_step == 7
    assert resumed.calls["at w"][0] == 5  # re-entered mid-window
    assert resumed.calls["at w + e"] == resumed.calls["at w"]  # every step replayed what it ran, no more
    assert all(torch.isfinite(p).all() for p in resumed.parameters())


def test_bf16_mixed_follows_the_autocast_loop():
    steps = 4
    model, batches = make_model(dtype=torch.float32), make_batches(torch.float32)
    net = Net(copy.deepcopy(model))
    start = copy.deepcopy(model)
    run, _ = fit(net, batches, max_steps=steps, precision="bf16-mixed")
    reference(model, batches, steps, autocast=torch.bfloat16)
    assert run.global_step == steps
    assert max_difference(net.model, model) <= 1e-3
    assert max_difference(net.model, start) > 1e-2  # it trained


def fp16_plugin(init_scale: float) -> MixedPrecision:
    """Lightning maps precision="16-mixed" to bf16 on a CPU; the plugin itself runs float16 autocast and a
    GradScaler there (torch >= 2.3), which is the path a GPU takes with "16-mixed"."""
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=init_scale))


def test_fp16_grad_scaler_follows_the_scaler_loop():
    """The first gradient is unscaled before the ascent, the second before clipping and the step: the result
    is the plain GradScaler loop's, and close to float32 (a gradient left scaled by 65536 would not be)."""
    steps = 4
    model, batches = make_model(dtype=torch.float32), make_batches(torch.float32)
    net, fp32 = Net(copy.deepcopy(model)), copy.deepcopy(model)
    run, _ = fit(net, batches, max_steps=steps, precision=None, plugins=[fp16_plugin(2.0**16)], gradient_clip_val=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    reference(model, batches, steps, clip=0.5, autocast=torch.float16, scaler=scaler)
    reference(fp32, batches, steps, clip=0.5)
    assert run.global_step == steps
    assert max_difference(net.model, model) <= 1e-6
    assert max_difference(net.model, fp32) <= 1e-2
    assert run.precision_plugin.scaler.get_scale() == scaler.get_scale()  # powers of two: the same skip decisions


def test_fp16_overflow_skips_the_step_unperturbed():
    model, batches = make_model(batch_norm=True, dtype=torch.float32), make_batches(torch.float32)
    net = Net(copy.deepcopy(model))
    run, _ = fit(net, batches, max_steps=1, precision=None, plugins=[fp16_plugin(2.0**40)])
    sam = run.optimizers[0]
    assert run.global_step == 1 and not sam.is_perturbed
    assert run.precision_plugin.scaler.get_scale() == 2.0**39  # backed off once
    for p, q in zip(net.model.parameters(), model.parameters(), strict=True):
        assert torch.equal(p, q)  # weights untouched
    assert all(not state for state in sam.state.values())  # no momentum buffer written
    assert net.model[1].track_running_stats  # BatchNorm thawed


class RankData(Net):
    """Under DDP each rank takes its share of every batch of the plain loop (rank r: rows r*4 to r*4 + 3)."""

    def train_dataloader(self):
        rank, share = self.global_rank, BATCH // self.trainer.world_size
        return loader(
            [(x[rank * share : (rank + 1) * share], y[rank * share : (rank + 1) * share]) for x, y in make_batches()],
            batch_size=share,
        )


@pytest.mark.slow
@pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()), reason="needs gloo"
)
def test_ddp_two_processes_match_the_global_batch_loop():
    """Two gloo processes, accumulate_grad_batches=2 and clipping: the all-reduced ascent and descent are the
    plain loop's on the global batch (DDP's no_sync on the replay's first batch, the all-reduce on its last)."""
    model = make_model()
    net = RankData(copy.deepcopy(model))
    options = dict(strategy="ddp_spawn", devices=2, use_distributed_sampler=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(max_steps=3, accumulate_grad_batches=2, gradient_clip_val=0.5, **options).fit(net)
    reference(model, make_batches(), 3, k=2, clip=0.5)
    assert max_difference(net.model, model) <= 1e-10


def test_a_failing_second_pass_leaves_the_weights_at_w():
    class Failing(Net):
        def training_step(self, batch, batch_idx):
            if self.sam_second_pass:
                raise ValueError("boom at w + e")
            return super().training_step(batch, batch_idx)

    model = make_model(batch_norm=True)
    net = Failing(copy.deepcopy(model))
    with pytest.raises(ValueError, match="boom"):
        fit(net, make_batches(), max_steps=1)
    assert not net.trainer.optimizers[0].is_perturbed and not net.sam_second_pass
    for p, q in zip(net.model.parameters(), model.parameters(), strict=True):
        assert torch.equal(p, q)
    assert net.model[1].track_running_stats and "log" not in vars(net)


def test_a_one_pass_rule_with_accumulation_keeps_the_pass_at_w():
    """Momentum-SAM reads no g(w), but with accumulate_grad_batches=2 Lightning has run the window's first batch at
    w already: the plan keeps its pass at w and replays the window at w + e, as the plain loop with two passes."""
    from flatminima.variants.momentum_sam import MomentumAscent

    class OnePass(Net):
        def configure_optimizers(self):
            return SAM(self.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=MOMENTUM,
                       perturbation=MomentumAscent())  # fmt: skip

    model = make_model()
    net = OnePass(copy.deepcopy(model))
    fit(net, make_batches(), max_steps=3, accumulate_grad_batches=2)
    expected = copy.deepcopy(model)
    reference(expected, make_batches(), 3, k=2, rule=MomentumAscent())
    # the same maths in float64 through two drivers: the passes' losses summed in the same order, so a few ulp
    assert max_difference(net.model, expected) < 1e-12
    assert net.trainer.optimizers[0].last_plan.passes == 2


def test_mixin_must_come_before_lightning_module():
    with pytest.raises(TypeError, match="before LightningModule"):

        class Wrong(L.LightningModule, SharpnessAwareMixin):
            pass


def test_manual_optimisation_is_refused():
    class Manual(Net):
        def __init__(self, model):
            super().__init__(model)
            self.automatic_optimization = False

    with pytest.raises(RuntimeError, match="automatic optimisation"):
        fit(Manual(make_model()), make_batches(), max_steps=1)


def test_on_train_batch_start_without_super_is_reported():
    class Forgetful(Net):
        def on_train_batch_start(self, batch, batch_idx):
            return None

    with pytest.raises(RuntimeError, match="super"):
        fit(Forgetful(make_model()), make_batches(), max_steps=1)


def test_precision_plugin_with_its_own_step_is_refused():
    class Custom(MixedPrecision):
        def optimizer_step(self, optimizer, model, closure, **kwargs):
            return super().optimizer_step(optimizer, model, closure, **kwargs)

    plugin = Custom("bf16-mixed", "cpu")
    with pytest.raises(NotImplementedError, match="precision plugin"):
        fit(
            Net(make_model(dtype=torch.float32)),
            make_batches(torch.float32),
            max_steps=1,
            precision=None,
            plugins=[plugin],
        )


def test_standalone_pytorch_lightning_package():
    pl = pytest.importorskip("pytorch_lightning")

    class PlNet(SharpnessAwareMixin, pl.LightningModule):
        training_step = Net.training_step
        configure_optimizers = Net.configure_optimizers

        def __init__(self, model):
            super().__init__()
            self.model, self.scheduler, self.cadence = model, None, None

    model, batches = make_model(), make_batches()
    net = PlNet(copy.deepcopy(model))
    options = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pl.Trainer(max_steps=3, precision="64-true", enable_model_summary=False, **options).fit(net, loader(batches))
    reference(model, batches, 3)
    assert max_difference(net.model, model) <= 1e-10
