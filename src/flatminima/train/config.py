"""The training configuration: one dataclass, read from YAML, every field also a command-line flag.

The fields every run has, and their help texts, live here once; a variant's own options live in the dataclass it
registers (``register_optimizer(..., options=)``) and join the configuration by name: ``config.looksam_k``, the
flag ``--looksam-k`` and the YAML field ``looksam_k``, validated by the variant's own checks. ``flatminima train
--help`` and the YAML reader are generated from both, and the effective configuration is written beside the
results.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import reprlib
import types
import typing
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flatminima.data.registry import DATASETS
from flatminima.links import docs_page
from flatminima.models import MODEL_NAMES as MODELS
from flatminima.optim import optimizer_names
from flatminima.optim.registry import optimizer_help

__all__ = ["RESUMABLE", "TrainConfig", "add_arguments", "config_fields", "config_from_args", "option_fields"]

#: the largest config file read (a config is a few hundred bytes; a larger file is the wrong one, or an attack)
MAX_CONFIG_BYTES = 64 * 2**10

SCHEDULES = ("cosine", "step", "constant")
RHO_SCHEDULES = ("constant", "linear", "cosine", "step", "lr")


Choices = tuple[str, ...] | Callable[[], tuple[str, ...]]


def _option(default: Any, help: str | Callable[[], str], choices: Choices | None = None) -> Any:
    """A field with its help text and choices; either may be a function, read when asked (the optimiser registry
    grows as variant modules register their names)."""
    return field(default=default, metadata={"help": help, "choices": choices})


def _choices(field_: dataclasses.Field) -> tuple[str, ...] | None:
    choices = field_.metadata.get("choices")
    return choices() if callable(choices) else choices


def _help(field_: dataclasses.Field) -> str:
    text = field_.metadata["help"]
    return text() if callable(text) else text


@dataclass
class _RunFields:
    """The fields every training run has (``TrainConfig`` adds the variants' options)."""

    dataset: str = _option(
        "digits", "digits (embedded), cifar10, cifar100, mnist, fashion_mnist, svhn, signal_noise", tuple(DATASETS)
    )
    data_root: str | None = _option(None, "folder holding the dataset files (not needed for digits, signal_noise)")
    model: str = _option(
        "small_cnn",
        "resnet20/32/56, wrn28_10 (or wrn), wrn16_8 (with _nobn: without BatchNorm), small_cnn (small_cnn_bn: with "
        "BatchNorm), mlp, two_layer_cnn (signal_noise only)",
        MODELS,
    )
    optimizer: str = _option("sam", optimizer_help, optimizer_names)
    base_optimizer: str = _option("sgd", "the optimiser the SAM family (and saf, mesa) wraps", ("sgd", "adamw"))
    rho: float = _option(0.05, "SAM radius")
    rho_schedule: str = _option(
        "constant",
        "constant; linear: rho grows from rho_min over warmup_epochs; cosine: a cosine from rho to rho_min (after "
        "the lr warm-up); step: x0.2 toward rho_min at 30/60/80 % as the lr's step schedule; lr: rho_min + (rho - "
        "rho_min) lr_t / lr, GSAM's rho proportional to the learning rate",
        RHO_SCHEDULES,
    )
    rho_min: float = _option(0.0, "the rho the linear, cosine, step and lr rho schedules start from or decay to")
    p: float = _option(2.0, "the L_p ball of the SAM ascent (2 = SAM, inf = sign)")
    group_size: int | None = _option(None, "m of m-SAM: each group of m examples gets its own perturbation")
    lr: float = _option(0.1, "peak learning rate")
    lr_schedule: str = _option("cosine", "cosine, step (x0.2 at 30/60/80 % of training) or constant", SCHEDULES)
    warmup_epochs: int = _option(0, "linear learning-rate warm-up, in epochs")
    momentum: float = _option(0.9, "SGD momentum")
    weight_decay: float = _option(5e-4, "weight decay")
    weight_decay_in_loss: bool = _option(False, "add wd/2 ||w||^2 to the loss (as the SAM paper's code) instead")
    label_smoothing: float = _option(0.0, "label smoothing of the cross-entropy")
    epochs: int = _option(10, "training epochs")
    batch_size: int = _option(128, "global batch size (split across ranks under torchrun)")
    augment: bool = _option(False, "random crop (padding 4, or 1 for 8x8 images) and horizontal flip")
    cutout: int = _option(0, "cutout square size, 0 for none")
    label_noise: float = _option(0.0, "fraction of training labels corrupted")
    label_noise_kind: str = _option("symmetric", "symmetric or asymmetric", ("symmetric", "asymmetric"))
    validation_fraction: float = _option(0.0, "hold out this fraction of the training set (e.g. to tune rho)")
    validation_labels: str = _option(
        "clean",
        "labels of the held-out split: clean, or noisy (corrupted like the training labels, with --label-noise)",
        ("clean", "noisy"),
    )
    amp: str = _option("none", "mixed precision: none, bf16, fp16 (fp16 uses a GradScaler)", ("none", "bf16", "fp16"))
    track_sharpness: int = _option(
        0, "measure lambda_max every N steps (warm-started power iteration), logged in metrics.jsonl; 0: off"
    )
    track_examples: int = _option(512, "training examples the tracked Hessian is taken over (as trained)")
    track_trace_probes: int = _option(0, "with --track-sharpness: also the trace, with this many Hutchinson probes")
    seed: int = _option(0, "seed of data order, label noise, initialisation and augmentation")
    device: str = _option("auto", "auto, cpu or cuda", ("auto", "cpu", "cuda"))
    threads: int = _option(0, "torch CPU threads, 0 for torch's default")
    output: str = _option("runs/train", "output folder (config, metrics, checkpoints, summary)")
    resume: bool = _option(
        False,
        "continue the run in --output from its last checkpoint, with the config saved there (flags given with "
        "--resume may change only: epochs, to extend a run; data_root, if the data moved; device, threads, "
        "progress, and the track_* fields)",
    )
    overwrite: bool = _option(False, "replace the files of a previous run in --output (other files are never touched)")
    allow_world_size_change: bool = _option(
        False, "resume under a different number of torchrun processes (m-SAM's m = per-rank batch changes)"
    )
    nonfinite: str = _option(
        "raise",
        "an inf/NaN loss or gradient: raise (stop, keeping the last checkpoint) or skip the step",
        ("raise", "skip"),
    )
    progress: bool = _option(True, "show a progress bar")
    fsdp: bool = _option(
        False,
        "under torchrun: shard weights, gradients and optimiser state across the processes with FSDP2's "
        "fully_shard instead of DDP; SAM then perturbs with the global batch's gradient "
        f"({docs_page('compile-fsdp')})",
    )
    variant_options: dict[str, Any] = field(default_factory=dict, metadata={"help": "", "internal": True})

    def validate(self) -> None:
        """Clear errors for nonsense values, naming the field and what it accepts."""
        checks = [
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (math.isfinite(self.lr) and self.lr > 0, "lr must be a finite number > 0"),
            (math.isfinite(self.rho) and self.rho >= 0, "rho must be a finite number >= 0"),
            (self.p >= 1, "p must be >= 1"),
            (self.group_size is None or self.group_size >= 1, "group_size must be >= 1"),
            (
                self.group_size is None or self.group_size <= self.batch_size,
                f"group_size {self.group_size} exceeds batch_size {self.batch_size} (m >= the batch is plain SAM: "
                "drop --group-size, or lower it)",
            ),
            (math.isfinite(self.momentum) and self.momentum >= 0, "momentum must be a finite number >= 0"),
            (self.seed >= 0, "seed must be >= 0"),
            (self.track_sharpness >= 0, "track_sharpness must be >= 0 (0: off)"),
            (self.track_examples >= 1, "track_examples must be >= 1"),
            (self.track_trace_probes >= 0, "track_trace_probes must be >= 0"),
            (self.threads >= 0, "threads must be >= 0 (0: torch's default)"),
            (
                self.device != "cuda" or _cuda_available(),
                "device cuda was asked for but torch sees no CUDA device; use --device cpu (or auto)",
            ),
            (0 <= self.label_noise <= 1, "label_noise must be in [0, 1]"),
            (0 <= self.validation_fraction < 1, "validation_fraction must be in [0, 1)"),
            (0 <= self.label_smoothing < 1, "label_smoothing must be in [0, 1)"),
            (math.isfinite(self.weight_decay) and self.weight_decay >= 0, "weight_decay must be a finite number >= 0"),
            (self.warmup_epochs >= 0, "warmup_epochs must be >= 0"),
            (self.cutout >= 0, "cutout must be >= 0"),
            (
                math.isfinite(self.rho_min) and 0 <= self.rho_min <= self.rho,
                f"rho_min must be a finite number in [0, rho] (rho = {self.rho:g})",
            ),
            (
                self.rho_min == 0 or self.rho_schedule != "constant",
                "rho_min has no effect with rho_schedule constant (use linear, cosine, step or lr)",
            ),
            *self._fsdp_checks(),
        ]
        for field_ in config_fields():
            choices = _choices(field_)
            if choices and getattr(self, field_.name) not in choices:
                checks.append((False, f"{field_.name} must be one of {', '.join(choices)}"))
            check = field_.metadata.get("check")
            if check is not None and not check(getattr(self, field_.name)):
                checks.append((False, f"{field_.name} {field_.metadata['why']}"))
        errors = [message for ok, message in checks if not ok]
        if errors:
            raise ValueError("invalid training config: " + "; ".join(errors) + ".")

    def _fsdp_checks(self) -> list[tuple[bool, str]]:
        """What --fsdp does not combine with (every backward pass reduce-scatters the gradient across ranks)."""
        if not self.fsdp:
            return []
        from flatminima.optim import optimizer_spec

        spec = optimizer_spec(self.optimizer) if self.optimizer in optimizer_names() else None
        batch_rule = spec is not None and spec.batch_rule is not None
        trajectory = spec is not None and spec.trajectory is not None
        return [
            (
                not trajectory,
                f"fsdp does not combine with optimizer {self.optimizer}, whose trajectory loss needs the whole "
                "weights (use DDP: torchrun without --fsdp)",
            ),
            (
                self.group_size is None,
                "fsdp does not combine with group_size: under FSDP every pass's gradient is the global batch's, so "
                "there are no per-group perturbations (drop --group-size or --fsdp)",
            ),
            (
                not batch_rule,
                f"fsdp does not combine with optimizer {self.optimizer}, whose passes see examples chosen per rank "
                "(use sam, asam, usam, sgd or adamw with --fsdp)",
            ),
            (self.amp != "fp16", "fsdp does not combine with amp fp16 (a GradScaler); use --amp bf16 or none"),
            (
                not self.weight_decay_in_loss,
                "fsdp does not combine with weight_decay_in_loss (the penalty would read sharded weights); use the "
                "optimiser's weight decay",
            ),
            (not self.track_sharpness, "fsdp does not combine with track_sharpness (it needs the whole model)"),
        ]

    @classmethod
    def from_yaml(cls, path: str | Path) -> TrainConfig:
        """Read a YAML mapping of field names to values; unknown keys are an error, not silently ignored."""
        import yaml

        path = Path(path)
        if path.is_dir():
            raise ValueError(f"config file {path} is a folder; give the YAML file inside it.")
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist.")
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ValueError(
                f"config file {path} is {size / 2**20:.1f} MiB; a training config is a few hundred bytes of field: "
                f"value (at most {MAX_CONFIG_BYTES // 2**10} KiB): give the right file."
            )
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except UnicodeDecodeError:
            raise ValueError(
                f"config file {path} is not text (binary bytes); give a YAML file of field: value."
            ) from None
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(error, "problem", None) or type(error).__name__
            raise ValueError(f"config file {path} is not valid YAML{where}: {problem}.") from None
        if not isinstance(values, dict):
            raise ValueError(f"config file {path} must hold a mapping of field: value, got {type(values).__name__}.")
        return cls.from_dict(values)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        if not isinstance(values, dict):
            raise ValueError(f"a training config is a mapping of field: value, got {type(values).__name__}.")
        known = {f.name: f for f in config_fields()}
        unknown = [name for name in values if name not in known]
        if unknown:
            names = ", ".join(shown(name) for name in unknown[:3]) + (" ..." if len(unknown) > 3 else "")
            raise ValueError(f"unknown config field(s) {names}; flatminima train --help lists the fields.")
        return cls(**{name: _coerce(known[name], value) for name, value in values.items()})

    def to_dict(self) -> dict[str, Any]:
        """Every field by name, the variants' options among them (the layout of a saved config.yaml)."""
        return {f.name: getattr(self, f.name) for f in config_fields()}


class TrainConfig(_RunFields):
    """Everything a training run needs; see ``flatminima train --help``.

    Besides the fields every run has, it takes each registered variant's options by name (``looksam_k=3``), keeps
    them in ``variant_options`` and reads them as attributes (``config.looksam_k``; the variant's default when not
    given).
    """

    def __init__(self, variant_options: dict[str, Any] | None = None, **values: Any) -> None:
        options = option_fields()
        given = dict(variant_options or {})
        for name in [name for name in values if name in options]:
            given[name] = values.pop(name)
        super().__init__(**values)
        unknown = sorted(set(given) - set(options))
        if unknown:
            raise TypeError(f"TrainConfig got unknown variant option(s) {unknown}")
        self.variant_options = given

    def __getattr__(self, name: str) -> Any:  # only for names that are not fields: the variants' options
        options = self.__dict__.get("variant_options")
        if options is not None and name in options:
            return options[name]
        known = option_fields()
        if name in known:
            return known[name][1].default
        raise AttributeError(f"{type(self).__name__} has no field or variant option {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name != "variant_options" and name not in _RunFields.__dataclass_fields__ and name in option_fields():
            self.variant_options[name] = value
        else:
            super().__setattr__(name, value)

    def variant_options_of(self, spec: Any) -> Any:
        """The options dataclass of the registered variant ``spec`` filled from this config, or None."""
        if spec.options is None:
            return None
        return spec.options(**{f.name: getattr(self, f.name) for f in dataclasses.fields(spec.options)})


def option_fields() -> dict[str, tuple[type, dataclasses.Field]]:
    """The registered variants' option fields, name -> (their dataclass, the field); none may shadow a run field."""
    import flatminima.variants  # noqa: F401  (the built-in variants register their options on import)
    from flatminima.optim.registry import option_fields as registered

    found = registered()
    clash = sorted(set(found) & set(_RunFields.__dataclass_fields__))
    if clash:
        raise ValueError(f"variant option(s) {clash} have the name of a training config field; rename them")
    return found


def config_fields() -> list[dataclasses.Field]:
    """Every field of a training config: those of every run, then the variants' options."""
    run = [f for f in dataclasses.fields(_RunFields) if not f.metadata.get("internal")]
    return run + [option_field for _, option_field in option_fields().values()]


def _base_type(field_: dataclasses.Field) -> type:
    options = option_fields()
    owner = options[field_.name][0] if field_.name in options else _RunFields
    hints = typing.get_type_hints(owner)
    hint = hints[field_.name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return hint


_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 40
_SHORT.maxlist = _SHORT.maxdict = _SHORT.maxtuple = _SHORT.maxset = 4
_SHORT.maxlevel = 2


def shown(value: Any) -> str:
    """``value`` as an error message may quote it: at most about 40 characters, however large or deeply nested
    (a YAML file can hold a megabyte string or a structure of aliases that expands without end)."""
    return _SHORT.repr(value)


def _coerce(field_: dataclasses.Field, value: Any) -> Any:
    """``value`` as the field's type; a wrong type is an error that names the field (no silent truncation)."""
    if value is None:
        return None
    kind = _base_type(field_)
    name = field_.name
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "false", "no"):
            return value.lower() in ("true", "yes")
        raise ValueError(f"config field {name} must be true or false, got {shown(value)}.")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"config field {name} must be an integer, got {shown(value)}.")
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"config field {name} must be a number, got {shown(value)}.")
    if kind is str and isinstance(value, str):
        return value
    raise ValueError(f"config field {name} must be a {kind.__name__}, got {shown(value)}.")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def add_arguments(parser: argparse.ArgumentParser, names: Collection[str] | None = None) -> None:
    """One flag per field (``--batch-size``); defaults are None so that only flags given override the YAML.

    ``names`` limits the flags to those fields (and leaves out ``--config``), for commands that take a few.
    """
    if names is None:
        parser.add_argument("--config", help="YAML file of field: value; flags given here override it")
    for field_ in config_fields():
        if names is not None and field_.name not in names:
            continue
        flag = "--" + field_.name.replace("_", "-")
        kind = _base_type(field_)
        default = f"default: {field_.default}" if names is None else "default: the reproduction's"
        help_text = f"{_help(field_)} ({default})".replace("%", "%%")
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=None, choices=_choices(field_), help=help_text)


# fields that may change between a run and its resumption: they change no maths of the steps already taken
RESUMABLE = frozenset(
    {
        "epochs",
        "data_root",
        "device",
        "threads",
        "progress",
        "resume",
        "output",
        "overwrite",
        "allow_world_size_change",
        "track_sharpness",
        "track_examples",
        "track_trace_probes",
    }
)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The YAML file (if any), overridden by the flags given, then validated.

    With ``--resume`` and no ``--config``, the base is the run's own ``config.yaml`` in ``--output``, so
    ``flatminima train --output runs/x --resume`` needs no other flag.
    """
    values: dict[str, Any] = {}
    if args.config:
        values.update(TrainConfig.from_yaml(args.config).to_dict())
    given = {f.name: getattr(args, f.name) for f in config_fields() if getattr(args, f.name, None) is not None}
    if given.get("resume") and not args.config:
        saved = Path(given.get("output", TrainConfig.output)) / "config.yaml"
        if saved.is_file():
            values.update(TrainConfig.from_yaml(saved).to_dict())
    values.update(given)
    config = TrainConfig.from_dict(values)
    config.validate()
    if not config.resume:  # a resumed run keeps the settings it was started with
        refuse_unused_settings(config, given)
    return config


# the run fields only the SAM family reads (a plain optimiser ignores them)
SAM_FIELDS = ("rho", "rho_schedule", "rho_min", "p", "group_size", "base_optimizer")


def refuse_unused_settings(config: TrainConfig, flags: Collection[str]) -> None:
    """Refuse a flag the chosen optimiser would ignore: SAM's settings under a plain optimiser, a variant's options
    under another optimiser, --momentum under AdamW. One line, naming the flag, the optimiser and the fix.

    Only ``flags`` (the fields given on the command line) are checked: a YAML file, such as the config.yaml a run
    saves with every field, may hold settings another optimiser would read."""
    import dataclasses as dc

    from flatminima.optim.registry import optimizer_spec

    spec = optimizer_spec(config.optimizer)

    def refuse(name: str, reason: str, fix: str) -> None:
        raise ValueError(f"--{name.replace('_', '-')} is {reason}, and {fix}")

    wraps_base = spec.sharpness_aware or spec.trajectory is not None  # saf and mesa wrap --base-optimizer too
    if not spec.sharpness_aware:
        for name in sorted(set(SAM_FIELDS) & set(flags) - ({"base_optimizer"} if wraps_base else set())):
            refuse(
                name,
                "a setting of the SAM family",
                f"--optimizer {config.optimizer} does not read it: drop it, or choose a sharpness-aware --optimizer "
                "(flatminima variants)",
            )
    base = config.base_optimizer if wraps_base else config.optimizer
    if base == "adamw" and "momentum" in flags:
        role = "base optimiser" if wraps_base else "optimiser"
        refuse("momentum", "SGD's", f"AdamW (the {role}) does not read it: drop it, or use SGD")
    if (
        "validation_labels" in flags
        and config.validation_labels == "noisy"
        and not (config.validation_fraction > 0 and config.label_noise > 0)
    ):
        refuse(
            "validation_labels",
            "about the labels of a held-out split under label noise",
            "this run has no validation split or no label noise: add --validation-fraction and --label-noise, "
            "or drop it",
        )
    own = {f.name for f in dc.fields(spec.options)} if spec.options is not None else set()
    for name in sorted(set(option_fields()) & set(flags) - own):
        readers = [
            other
            for other in optimizer_names()
            if (o := optimizer_spec(other).options) is not None and name in {f.name for f in dc.fields(o)}
        ]
        refuse(
            name,
            f"an option of {' and '.join(readers)}",
            f"--optimizer {config.optimizer} does not read it: drop it, or use --optimizer {readers[0]}",
        )
