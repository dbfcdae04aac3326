"""SAM in PyTorch Lightning's automatic optimisation: ``class Net(SharpnessAwareMixin, L.LightningModule)``.

Return a ``SAM`` from ``configure_optimizers`` (schedulers declared on it, as for any
optimiser) and put ``SharpnessAwareMixin`` before ``LightningModule`` in the bases. The mixin overrides the
hooks ``optimizer_step`` and ``on_train_batch_start`` (and, for checkpoints under ``ModelParallelStrategy``,
``on_save_checkpoint`` and ``on_load_checkpoint``); everything else stays Lightning's:

- each step runs SAM's plan (``SAM.plan``). Its first pass is Lightning's own closure (``training_step``,
  ``zero_grad`` at the start of an accumulation window, the precision plugin's scaled ``backward``): at ``w``, so
  that with ``accumulate_grad_batches=k`` the ascent uses the gradient accumulated over the window's k batches, or
  at ``w + e`` for rules that read no ``g(w)`` (Momentum-SAM, a random direction) when k = 1 (with k > 1 the
  window's earlier batches ran at ``w`` already, so the plan keeps its pass there and replays the window at
  ``w + e``);
- the plan's later pass at ``w + e`` replays every batch of the window through ``strategy.training_step`` and
  ``strategy.backward`` (autocast, loss scaling, DDP's forward and ``no_sync`` as in the first pass), each loss
  divided by k as Lightning divides it; what the replayed ``training_step`` logs is dropped, so the logged loss
  is the first pass's;
- the descent is Lightning's tail of an optimiser step: unscaling by the GradScaler, the descent rule's direction,
  ``on_before_optimizer_step``, ``gradient_clip_val`` (``configure_gradient_clipping``) applied to that direction,
  then ``SAM.second_step`` on the SAM object itself (so LR schedulers see the step) and ``scaler.update()``;
- an optimiser with a batch rule (n-SAM, RW-SAM, Ahn et al.'s SA) is refused at the first step: those rules pick
  examples from ``(inputs, targets)`` tensors, which Lightning's batches need not be;
- ``global_step``, LR schedulers and checkpoints are Lightning's automatic-optimisation bookkeeping, unchanged.

Single-device, DDP and ``ModelParallelStrategy`` (FSDP2) strategies with the standard precision plugins (32, 64,
16/bf16 true and mixed) are accepted. Under ``ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1)``
apply ``fully_shard`` in ``configure_model`` (mesh ``self.device_mesh["data_parallel"]``; every submodule with
parameters, then a root that holds the rest): Lightning builds the optimiser afterwards, so SAM holds the sharded
parameters and takes its norms over all ranks' shards (``flatminima.optim.sharded``), which makes the step SAM's
on the global batch. Its checkpoints (full or distributed) resume exactly: torch's ``set_optimizer_state_dict``
initialises the optimiser state by a ``step()`` without a closure at learning rate 0 on zero gradients, which SAM
hands to its base optimiser (``flatminima.optim.closure``), and SAM's step counter, which torch's optimiser state
dict drops,
is kept in the checkpoint by ``on_save_checkpoint``. The strategy takes precision 32-true, bf16-mixed, bf16-true or
16-true. Tensor parallelism on the ``"tensor_parallel"`` dimension is untested; SAM accepts only parameters sharded
over the same mesh dimensions (``flatminima.optim.sharded.shard_groups``) and refuses others. Lightning's
``FSDPStrategy`` (FSDP1's flat parameters), DeepSpeed and XLA take their own optimiser step and are refused with
an error.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor

from flatminima.optim import scaler as amp
from flatminima.optim.plan import Descend
from flatminima.optim.sam import SAM

try:
    import lightning.pytorch  # noqa: F401  (the extra: pip install flatminima[lightning])
except ImportError:  # pragma: no cover - the standalone package works as well
    try:
        import pytorch_lightning  # noqa: F401
    except ImportError as error:
        raise ImportError(
            "flatminima.integrations.lightning needs PyTorch Lightning: pip install 'flatminima[lightning]'"
        ) from error

__all__ = ["SharpnessAwareMixin"]

# precision plugins and strategies whose optimiser step is the plain one this module reproduces
_PLAIN_PRECISION_STEPS = ("Precision.optimizer_step", "MixedPrecision.optimizer_step")
_STEPS_KEY = "sam_steps"  # SAM's step counters, in a checkpoint saved under ModelParallelStrategy
_PLAIN_STRATEGIES = ("SingleDeviceStrategy", "DDPStrategy", "ModelParallelStrategy")


class SharpnessAwareMixin:
    """Train a ``LightningModule`` with a ``SAM`` optimiser, in automatic optimisation.

    Use it as the first base, before ``LightningModule`` (``lightning.pytorch`` or ``pytorch_lightning``):

        class Net(SharpnessAwareMixin, L.LightningModule):
            def training_step(self, batch, batch_idx):
                x, y = batch
                loss = F.cross_entropy(self.model(x), y)
                self.log("train_loss", loss)  # logged from the pass at w only
                return loss

            def configure_optimizers(self):
                opt = SAM(self.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
                return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 30)}

    ``training_step`` runs once per pass of SAM's plan: at ``w`` (Lightning's closure) and at ``w + e``
    (``sam_second_pass`` is then True and ``self.log`` does nothing), once on a step without the ascent or for a
    rule that reads no ``g(w)``. BatchNorm running statistics are kept from the first pass. With an optimiser that is
    not a SAM the mixin steps as Lightning does. If you override ``optimizer_step``, ``on_train_batch_start``, or
    (under ``ModelParallelStrategy``) ``on_save_checkpoint`` or ``on_load_checkpoint``, call ``super()``.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        mro = cls.__mro__
        for index, base in enumerate(mro):
            if base.__name__ == "LightningModule" and index < mro.index(SharpnessAwareMixin):
                raise TypeError(
                    f"{cls.__name__}: put SharpnessAwareMixin before LightningModule in the bases, "
                    f"e.g. class {cls.__name__}(SharpnessAwareMixin, LightningModule); otherwise "
                    "LightningModule.optimizer_step runs instead of SAM's."
                )

    @property
    def sam_second_pass(self) -> bool:
        """True while ``training_step`` runs at the perturbed weights ``w + e`` (the replay of the window)."""
        return bool(self.__dict__.get("_sam_second_pass", False))

    # ------------------------------------------------------------------ Lightning hooks

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Under ModelParallelStrategy, keep SAM's step counter (torch's ``get_optimizer_state_dict``, which the
        strategy saves the optimiser with, keeps only ``state`` and ``param_groups``)."""
        super().on_save_checkpoint(checkpoint)  # type: ignore[misc]
        if _is_model_parallel(self.trainer.strategy):  # type: ignore[attr-defined]
            checkpoint[_STEPS_KEY] = [sam.steps for sam in _sams(self.trainer)]  # type: ignore[attr-defined]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore SAM's step counter saved by ``on_save_checkpoint``."""
        super().on_load_checkpoint(checkpoint)  # type: ignore[misc]
        steps = checkpoint.get(_STEPS_KEY)
        trainer = getattr(self, "_trainer", None)
        if steps is not None and trainer is not None:
            for sam, count in zip(_sams(trainer), steps, strict=False):
                sam.steps = int(count)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> Any:
        """Keep the batches of the current accumulation window for the second pass (then Lightning's hook)."""
        response = super().on_train_batch_start(batch, batch_idx)  # type: ignore[misc]
        trainer = self.trainer  # type: ignore[attr-defined]
        if not any(isinstance(opt, SAM) for opt in trainer.optimizers):
            return response
        if not self.automatic_optimization:  # type: ignore[attr-defined]
            raise RuntimeError(
                "SharpnessAwareMixin drives SAM through Lightning's automatic optimisation; remove "
                "automatic_optimization = False (accumulate_grad_batches, gradient_clip_val and the precision "
                "plugin are then handled), or drop the mixin and call first_step/second_step on "
                "self.optimizers().optimizer yourself."
            )
        if _takes_dataloader_iter(self.training_step):  # type: ignore[attr-defined]
            raise RuntimeError(
                "SharpnessAwareMixin replays each batch at w + e, which a training_step(dataloader_iter) does not "
                "allow; take (batch, batch_idx) instead."
            )
        window = self.__dict__.get("_sam_window") or []
        if batch_idx % trainer.accumulate_grad_batches == 0 or not window or window[-1][0] != batch_idx - 1:
            window = []  # a new window (Lightning zeroes the gradients here too), or one entered mid-way on resume
        window.append((batch_idx, batch))
        self.__dict__["_sam_window"] = window
        return response

    def optimizer_step(
        self,
        epoch: int,
        batch_idx: int,
        optimizer: Any,
        optimizer_closure: Callable[[], Any] | None = None,
    ) -> None:
        """One SAM step over the accumulation window that ends at ``batch_idx`` (see the module docstring)."""
        inner = getattr(optimizer, "_optimizer", None)  # a LightningOptimizer wraps the SAM object
        sam = inner if isinstance(inner, SAM) else optimizer
        if not isinstance(sam, SAM):
            return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)  # type: ignore[misc]
        if optimizer_closure is None:
            raise RuntimeError("SharpnessAwareMixin.optimizer_step needs Lightning's optimizer_closure.")
        _SamStep(self, sam).run(batch_idx, optimizer_closure)
        return None


class _SamStep:
    """The SAM step of one accumulation window, on Lightning's strategy and precision plugin."""

    def __init__(self, module: Any, sam: SAM) -> None:
        self.module = module
        self.sam = sam
        self.trainer = module.trainer
        self.strategy = self.trainer.strategy
        self.plugin = self.strategy.precision_plugin
        _check_supported(self.strategy, self.plugin)
        scaler = getattr(self.plugin, "scaler", None)
        self.scaler: torch.amp.GradScaler | None = scaler if amp.is_active(scaler) else None

    def run(self, batch_idx: int, closure: Callable[[], Any]) -> None:
        """SAM's plan of the step: its first pass is Lightning's closure, its later ones replay the window."""
        sam, k = self.sam, self.trainer.accumulate_grad_batches
        window = self._window(batch_idx, k)
        self._watch_running_stats()
        # with k > 1 the window's earlier batches ran at w already: the plan then has its pass at w, whatever the rules
        plan = sam.plan(self.scaler, sync_perturbation=True, first_pass=k > 1)  # refuses a batch rule
        phases = iter(plan)
        try:
            next(phases)  # up to the first pass: at w, or at w + e for an ascent that reads no g(w)
            loss = closure()  # Lightning's training_step, zero_grad and (scaled) backward
            if loss is None and (self.scaler is not None or not _has_gradient(sam)):
                sam.restore()
                return  # training_step returned None: no step, as Lightning's AMP plugin does
            for phase in phases:  # the later passes; a declined or skipped ascent goes straight to Descend
                if isinstance(phase, Descend):
                    break
                self._second_pass(window, k)
        except BaseException:
            sam.restore()  # never leave the weights at w + e (nor BatchNorm frozen)
            raise
        if plan.outcome == "skipped":  # non-finite g(w) under nonfinite="skip": no step at all
            sam.second_step()
            return
        self._descend()

    def _window(self, batch_idx: int, k: int) -> list[tuple[int, Any]]:
        """The batches whose gradients Lightning accumulated for this step: the window that ends at ``batch_idx``,
        or its tail when Lightning entered it mid-way (a resume from an epoch-end checkpoint re-enters the epoch at
        the window's second batch, and steps on what it ran)."""
        window = self.module.__dict__.get("_sam_window") or []
        expected = list(range(batch_idx - batch_idx % k, batch_idx + 1))
        indices = [index for index, _ in window]
        if not indices or indices != expected[len(expected) - len(indices) :]:
            raise RuntimeError(
                f"SharpnessAwareMixin expected the batches {expected} of this accumulation window, but kept "
                f"{[index for index, _ in window]}: if you override on_train_batch_start, call "
                "super().on_train_batch_start(batch, batch_idx) (it returns what Lightning's hook returns)."
            )
        self.module.__dict__["_sam_window"] = []
        return window

    def _watch_running_stats(self) -> None:
        """BatchNorm keeps the statistics of the first pass (once per SAM object)."""
        watched = self.module.__dict__.get("_sam_watched")
        if watched is None or watched() is not self.sam:
            self.sam.watch_running_stats(self.module)
            self.module.__dict__["_sam_watched"] = weakref.ref(self.sam)

    def _second_pass(self, window: list[tuple[int, Any]], k: int) -> None:
        """Forward and backward of every batch of the window at ``w + e``, each loss divided by k as Lightning's."""
        module, strategy = self.module, self.strategy
        takes_index = _takes_batch_idx(module.training_step)
        block_sync = getattr(strategy, "block_backward_sync", None)  # DDP: all-reduce on the last batch only
        with _replaying(module), torch.enable_grad():
            for j, (batch_idx, batch) in enumerate(window):
                last = j == len(window) - 1
                with block_sync() if block_sync is not None and not last else nullcontext():
                    args = (batch, batch_idx) if takes_index else (batch,)
                    loss = _loss_of(strategy.training_step(*args))
                    if loss is not None:
                        strategy.backward(loss / k, self.sam)

    def _descend(self) -> None:
        """Lightning's end of an optimiser step, with SAM's descent: restore w, unscale, hooks and clipping of
        g(w + e), then the base step (through the GradScaler, which skips it on inf/NaN) and the scaler update."""
        sam, scaler = self.sam, self.scaler
        sam.restore()  # weights back at w before any user hook sees them (exact: the tensors are swapped back)
        sam.apply_descent_rule(scaler)
        if scaler is not None and not amp.already_unscaled(scaler, sam):
            scaler.unscale_(sam)
        self.plugin._after_closure(self.module, sam)  # on_before_optimizer_step, then gradient_clip_val
        sam.second_step(grad_scaler=scaler)
        if scaler is not None:
            scaler.update()


def _check_supported(strategy: Any, plugin: Any) -> None:
    names = {base.__name__ for base in type(strategy).__mro__}
    if "FSDPStrategy" in names:  # before the precision check: its FSDPPrecision would be named instead
        raise NotImplementedError(
            "SharpnessAwareMixin does not support Lightning's FSDPStrategy: it wraps the model in FSDP1's "
            "FullyShardedDataParallel, whose flat parameters SAM cannot perturb as whole tensors. Use FSDP2 "
            "instead: Trainer(strategy=ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1)) with "
            "fully_shard applied in configure_model (mesh=self.device_mesh['data_parallel']), or the core's "
            "fully_shard with SAM / SharpnessAwareStep (flatminima train --fsdp)."
        )
    step = getattr(type(plugin), "optimizer_step", None)
    if getattr(step, "__qualname__", None) not in _PLAIN_PRECISION_STEPS or not hasattr(plugin, "_after_closure"):
        raise NotImplementedError(
            f"SharpnessAwareMixin does not support the precision plugin {type(plugin).__name__}, which takes its own "
            "optimiser step; use precision 32, 64, '16-mixed', 'bf16-mixed', '16-true' or 'bf16-true'."
        )
    if not names.intersection(_PLAIN_STRATEGIES) or getattr(strategy, "handles_gradient_accumulation", False):
        raise NotImplementedError(
            "SharpnessAwareMixin supports the single-device, DDP and ModelParallelStrategy (FSDP2's fully_shard) "
            f"strategies; got {type(strategy).__name__}, which takes its own optimiser step."
        )
    if getattr(strategy, "_model_averager", None) is not None:
        raise NotImplementedError("SharpnessAwareMixin does not support DDP's post-local-SGD model averaging.")


def _sams(trainer: Any) -> list[SAM]:
    """The SAM objects among the trainer's optimisers (unwrapped from LightningOptimizer)."""
    found = []
    for optimizer in trainer.optimizers:
        optimizer = getattr(optimizer, "_optimizer", optimizer)
        if isinstance(optimizer, SAM):
            found.append(optimizer)
    return found


def _is_model_parallel(strategy: Any) -> bool:
    return any(base.__name__ == "ModelParallelStrategy" for base in type(strategy).__mro__)


def _loss_of(output: Any) -> Tensor | None:
    """The loss in a ``training_step`` output, as Lightning reads it (a tensor, a dict's "loss", or None)."""
    if isinstance(output, Mapping):
        loss = output.get("loss")
        if loss is None:
            raise RuntimeError("training_step returned a dict without a 'loss' key.")
        return loss
    if output is None or isinstance(output, Tensor):
        return output
    raise RuntimeError(f"training_step must return a Tensor, a dict with 'loss', or None; got {type(output)}.")


def _has_gradient(sam: SAM) -> bool:
    return any(p.grad is not None for group in sam.param_groups for p in group["params"])


def _takes_batch_idx(training_step: Callable[..., Any]) -> bool:
    """Lightning's rule (``is_param_in_hook_signature(fn, "batch_idx", min_args=2)``)."""
    spec = inspect.getfullargspec(training_step)
    args = spec.args[1:]  # without self
    return "batch_idx" in args or spec.varargs is not None or len(args) >= 2


def _takes_dataloader_iter(training_step: Callable[..., Any]) -> bool:
    return "dataloader_iter" in inspect.getfullargspec(training_step).args


def _ignore_log(*args: Any, **kwargs: Any) -> None:
    return None


@contextmanager
def _replaying(module: Any) -> Iterator[None]:
    """During the second pass: ``self.log`` does nothing and ``sam_second_pass`` is True."""
    state = module.__dict__
    had_log, own_log = "log" in state, state.get("log")
    fx_name = getattr(module, "_current_fx_name", None)
    state["log"] = _ignore_log
    state["_sam_second_pass"] = True
    module._current_fx_name = "training_step"
    try:
        yield
    finally:
        module._current_fx_name = fx_name
        state["_sam_second_pass"] = False
        if had_log:
            state["log"] = own_log
        else:
            del state["log"]
