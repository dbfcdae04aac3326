"""``flatminima train | demo | sharpness | reproduce``: the command line.

User errors (bad flags, files or folders, a diverging run) are one line on stderr and exit code 2; ``--debug``
shows their traceback. Ctrl-C stops with a line saying how to resume.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import re
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

from flatminima.output_folder import write_failure
from flatminima.worker_pool import Terminated, terminated_as_exception

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (the error and where to look), not the whole usage."""

    def error(self, message: str) -> NoReturn:
        if os.environ.get("RANK", "0") == "0":
            print(f"{self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def _parser() -> argparse.ArgumentParser:
    from flatminima import __version__
    from flatminima.experiments.label_noise import VARIANTS as DEMO_VARIANTS
    from flatminima.experiments.reproduce import TRAINING_FIELDS
    from flatminima.links import DOCS_URL, docs_page
    from flatminima.train.config import add_arguments

    parser = _Parser(
        prog="flatminima", description="Sharpness-aware training and measurement.", epilog=f"Documentation: {DOCS_URL}"
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a model (every config field is also a flag)")
    add_arguments(train)
    demo = commands.add_parser("demo", help="SGD vs SAM on digits with 40 %% label noise: a table and a figure")
    demo.add_argument("--output", default="runs/demo", help="output folder (default: %(default)s)")
    demo.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds to average over (default: 0)")
    demo.add_argument("--epochs", type=int, default=None, help="epochs per run (default: 60, 3 with --quick)")
    demo.add_argument(
        "--quick",
        action="store_true",
        help="3 epochs per run (seconds): checks that everything runs and writes the table and figure; the "
        "comparison itself needs the full run",
    )
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.add_argument(
        "--variants",
        nargs="+",
        default=["sgd", "sam"],
        help=f"what to compare (default: sgd sam); any of {', '.join(DEMO_VARIANTS)} (see {docs_page('variants')})",
    )
    demo.add_argument("--workers", type=int, default=1, help="trainings run at once, one process each (default: 1)")
    demo.add_argument("--overwrite", action="store_true", help="replace files of the demo's names it did not write")
    sharp = commands.add_parser("sharpness", help="Hessian spectrum, trace, m-sharpness and landscape of a model")
    sharp.add_argument("--checkpoint", required=True, help="model.pt or checkpoint.pt written by flatminima train")
    sharp.add_argument("--data-root", default=None, help="dataset folder, if not the one in the checkpoint's config")
    sharp.add_argument("--examples", type=int, default=512, help="training examples measured on (default: 512)")
    sharp.add_argument("--k", type=int, default=5, help="top eigenvalues (default: 5)")
    sharp.add_argument("--trace-probes", type=int, default=50, help="Hutchinson probes (default: 50)")
    sharp.add_argument("--density-runs", type=int, default=4, help="SLQ runs (default: 4)")
    sharp.add_argument("--m", type=int, default=32, help="m of m-sharpness (default: 32)")
    sharp.add_argument("--rho", type=float, default=0.05, help="radius of m-sharpness (default: 0.05)")
    sharp.add_argument("--output", default=None, help="folder for the figures (default: beside the checkpoint)")
    sharp.add_argument("--overwrite", action="store_true", help="replace files of the names it writes that it did not")
    sharp.add_argument(
        "--device", default="auto", choices=("auto", "cpu", "cuda"), help="where to measure (default: auto)"
    )
    reproduce = commands.add_parser(
        "reproduce", help="reproduce a claim of the papers: a table, results.json, a report"
    )
    reproduce.add_argument("name", nargs="?", help="which reproduction (see --list)")
    reproduce.add_argument("--list", action="store_true", help="list the reproductions and exit")
    reproduce.add_argument(
        "--all",
        action="store_true",
        help="run every reproduction (into --output/NAME) and print the table of every claim with its verdict",
    )
    reproduce.add_argument(
        "--verdicts",
        metavar="FOLDER",
        default=None,
        help="print the table of every claim with its verdict from the reproductions' folders in FOLDER (no runs)",
    )
    reproduce.add_argument(
        "--summary",
        action="store_true",
        help="with --verdicts: one row per reproduction, counting its verdicts (the README's table)",
    )
    reproduce.add_argument(
        "--links",
        metavar="PREFIX",
        default=None,
        help=(
            "with --verdicts: link each reproduction to PREFIX/NAME/report.md, or to PREFIX with {name} filled in "
            "when it holds {name} (the README's: the site's reproductions/{name}/report/)"
        ),
    )
    reproduce.add_argument("--quick", action="store_true", help="a small version of the same run (seconds)")
    reproduce.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default: the reproduction's)")
    reproduce.add_argument("--output", default=None, help="output folder (default: runs/reproduce/NAME)")
    reproduce.add_argument(
        "--overwrite", action="store_true", help="replace files of the names it writes that it did not write"
    )
    paper_scale = reproduce.add_argument_group(
        "training settings",
        "for the training reproductions (label-noise, m-sharpness, hessian-spectrum): replace the digits defaults, "
        "e.g. with the paper's setting (each reproduction's report gives the exact command); a setting a "
        "reproduction does not honour is refused",
    )
    add_arguments(paper_scale, TRAINING_FIELDS)
    variants = commands.add_parser("variants", help="list the optimisers --optimizer accepts (plugins included)")
    variants.add_argument(
        "--markdown", action="store_true", help="print the optimisers and their options as markdown tables (the docs')"
    )
    for sub in (train, demo, sharp, reproduce, variants):
        sub.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    return parser


# What a user can cause (a bad flag, file or folder, a diverging run): reported in one line, exit code 2. Anything
# else is a bug and keeps its traceback; --debug shows the traceback of user errors too.
USER_ERRORS = (ValueError, OSError, FloatingPointError, RuntimeError)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    commands = {"train": _train, "sharpness": _sharpness, "demo": _demo, "reproduce": _reproduce, "variants": _variants}
    command = commands[args.command]
    with terminated_as_exception(), _one_line_warnings(args.command):
        try:
            return command(args)
        except Terminated:  # SIGTERM: the same clean-up as Ctrl-C (workers stopped, temporary files removed)
            if args.debug:
                raise
            _say(f"flatminima {args.command}: terminated (SIGTERM). {_resume_hint(args)}".rstrip())
            return 143
        except KeyboardInterrupt:
            if args.debug:
                raise
            _say(f"flatminima {args.command}: interrupted. {_resume_hint(args)}".rstrip())
            return 130
        except SystemError as error:  # the interpreter or an extension failed inside (seen under ulimit -v)
            if args.debug:
                raise
            _say(
                f"flatminima {args.command}: internal error of Python or an extension ({_one_line(error)[:80]}); under "
                "a memory limit (ulimit -v) a failed allocation can surface so: raise the limit or free memory. "
                "(add --debug for the traceback)"
            )
            return 1
        except (MemoryError, *USER_ERRORS) as error:
            if args.debug:
                raise
            if _out_of_memory(error):  # a resource the user can free or ask less of
                said = re.search(r"can't allocate memory[^.]*", str(error))
                detail = said[0] if said else (_one_line(error)[:100] if str(error) else "an allocation failed")
                _say(
                    f"flatminima {args.command}: out of memory ({detail}); lower --batch-size (or the sizes the "
                    "command takes), raise the memory limit (ulimit -v) or free memory. (add --debug for the traceback)"
                )
                return 2
            message = _one_line(error)
            if isinstance(error, RuntimeError) and any(p in str(error) for p in _THREAD_FAILURES):
                message = (
                    f"the system refused a new thread or process ({message[:80]}): a limit such as ulimit -u, or "
                    "memory; lower --threads (or --workers), or raise the limit"
                )
            if isinstance(error, OSError) and error.errno in _WRITE_ERRORS and not error.filename:
                folder = getattr(args, "output", None) or "."
                message = f"cannot write into {folder}: {write_failure(error, Path(folder))}"
            _say(
                f"flatminima {args.command}: {message}"
                + ("" if message.endswith(".") else ".")
                + " (add --debug for the traceback)"
            )
            return 2


# an error line stays readable whatever the input (a path of 5,000 characters, a value of a megabyte): each very
# long word keeps its two ends; a message still too long (a safety net: the messages quote values short) keeps
# its head (what failed) and its tail (the fix)
_LONGEST_WORD, _LONGEST_MESSAGE = 100, 400


def _one_line(error: BaseException) -> str:
    """The error's message on one line, no word over 100 characters and at most 400 in all."""
    words = str(error).split() or [type(error).__name__]
    words = [w if len(w) <= _LONGEST_WORD else f"{w[:45]}...{w[-50:]}" for w in words]
    message = " ".join(words)
    if len(message) > _LONGEST_MESSAGE:
        message = f"{message[:250]} ... {message[-(_LONGEST_MESSAGE - 255) :]}"
    return message


# a write failed for want of room, and Python names no file: the command's output folder is where it wrote
_WRITE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)

# what Python and torch say when a thread cannot start
_THREAD_FAILURES = ("can't start new thread", "pthread_create")

# what torch and its kernels say when an allocation fails (oneDNN cannot even build its kernel then)
_ALLOCATION_FAILURES = ("can't allocate memory", "out of memory", "bad_alloc", "could not create a primitive")


def _out_of_memory(error: BaseException) -> bool:
    """A MemoryError, or the RuntimeError torch raises for a failed allocation."""
    text = str(error).lower()
    return isinstance(error, MemoryError) or (
        isinstance(error, RuntimeError) and any(phrase in text for phrase in _ALLOCATION_FAILURES)
    )


@contextlib.contextmanager
def _one_line_warnings(command: str) -> Iterator[None]:
    """flatminima's own warnings as one line each (``flatminima train: warning: ...``), as its errors are; other
    libraries' warnings as Python shows them."""
    original = warnings.showwarning

    def show(message: Any, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        if category.__module__.startswith("flatminima"):
            _say(f"flatminima {command}: warning: {message}")
        else:
            original(message, category, *args, **kwargs)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = original


def _say(line: str) -> None:
    """Print a user error once: by the process of rank 0 under torchrun, by the only process otherwise."""
    if os.environ.get("RANK", "0") == "0":
        print(line, file=sys.stderr)


def _resume_hint(args: argparse.Namespace) -> str:
    if args.command == "variants":
        return ""
    if args.command != "train":
        return "Its worker processes and temporary files are gone; run the same command again to start over."
    from flatminima.train.config import TrainConfig

    output = Path(args.output or TrainConfig.output)
    if (output / "checkpoint.pt").is_file():
        return f"The last checkpoint is in {output}; continue with: flatminima train --output {output} --resume"
    return "No epoch had finished, so there is nothing to resume."


def _reproduce(args: argparse.Namespace) -> int:
    from flatminima.experiments.reproduce import TRAINING_FIELDS, available, run_reproduction

    if args.list:
        for name, reproduction in available().items():
            print(f"{name:16s} {reproduction.summary}")
        return 0
    overrides = {name: getattr(args, name) for name in TRAINING_FIELDS if getattr(args, name) is not None}
    if args.verdicts is not None or args.all:
        return _reproduce_every(args, overrides)
    if not args.name:
        raise ValueError(
            "name a reproduction, e.g. flatminima reproduce sam-cycle --quick (flatminima reproduce --list)"
        )
    command = f"flatminima reproduce {args.name}" + " --quick" * args.quick
    if args.seeds:
        command += " --seeds " + " ".join(map(str, args.seeds))
    for name, value in overrides.items():
        flag = "--" + name.replace("_", "-")
        command += f" {flag}" if value is True else f" --no-{flag[2:]}" if value is False else f" {flag} {value}"
    if args.output:
        command += f" --output {args.output}"
    run_reproduction(
        args.name,
        output=args.output,
        quick=args.quick,
        seeds=args.seeds,
        command=command,
        overrides=overrides,
        overwrite=args.overwrite,
    )
    return 0


def _reproduce_every(args: argparse.Namespace, overrides: dict[str, object]) -> int:
    """``--all`` (run every reproduction, then the verdict table) and ``--verdicts FOLDER`` (the table alone)."""
    from pathlib import Path

    from flatminima.experiments.reproduce import available, run_reproduction
    from flatminima.experiments.verdicts import claims_of, collect, verdict_summary, verdict_table
    from flatminima.output_folder import OutputFolder, write_atomically

    reading = args.verdicts is not None
    given = [flag for flag, value in (("a NAME", args.name), ("--seeds", args.seeds)) if value]
    given += ["--" + name.replace("_", "-") for name in overrides]
    if reading:  # --verdicts runs and writes nothing
        flags = (
            ("--all", args.all),
            ("--quick", args.quick),
            ("--output", args.output),
            ("--overwrite", args.overwrite),
        )
    else:  # --all prints the full table of its own runs
        flags = (("--links", args.links is not None), ("--summary", args.summary))
    given += [flag for flag, value in flags if value]
    if given:
        raise ValueError(
            f"{'--verdicts' if reading else '--all'} does not take {', '.join(given)}: it runs (or reads) every "
            "reproduction with its own settings; run one reproduction by name to change its settings"
        )
    if reading:
        shown = verdict_summary if args.summary else verdict_table
        print(shown(collect(args.verdicts), link_base=args.links))
        return 0
    folder = Path(args.output or ("runs/reproduce/all" + ("-quick" if args.quick else "")))
    command = f"flatminima reproduce --all{' --quick' * args.quick} --output {folder}"
    names = list(available())
    with OutputFolder(folder, "reproduce", overwrite=args.overwrite):  # each reproduction holds its own subfolder
        for name in names:
            print(f"\n## {name}\n", flush=True)
            run_reproduction(name, output=folder / name, quick=args.quick, command=command, overwrite=args.overwrite)
        table = verdict_table([row for name in names for row in claims_of(folder / name / "results.json")])
        write_atomically(folder / "verdicts.md", table + "\n")
    print("\n## Every claim and its verdict\n\n" + table, flush=True)
    return 0


def _train(args: argparse.Namespace) -> int:
    from flatminima.train import train
    from flatminima.train.config import config_from_args

    config = config_from_args(args)
    result = train(config)
    final = result.final
    print(
        f"done: {config.optimizer} on {config.dataset}, {final['epoch']} epochs, train loss "
        f"{final['train_loss']:.4f}, test accuracy {100 * final['test_accuracy']:.2f} %; files in {result.output}"
    )
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Every file is written (atomically) and the process group is destroyed; what is left is the interpreter's
        # teardown, in which gloo's threads abort now and then ("terminate called without an active exception",
        # under FSDP2 in about 1 run in 10 on a 2-core CPU, under DDP in 3 of 13), failing a run that has finished.
        # Skip it.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def _variants(args: argparse.Namespace) -> int:
    """Each registered optimiser: name, passes per step, the step that drives it, where it comes from, its summary
    and its options' flags with their defaults."""
    import dataclasses

    from flatminima.optim.registry import optimizer_names, optimizer_spec

    if args.markdown:
        from flatminima.variant_tables import optimizers_table, options_table

        print(optimizers_table() + "\n\n" + options_table())
        return 0
    specs = [optimizer_spec(name) for name in optimizer_names()]
    width = max(len(spec.name) for spec in specs)
    passes = max(len(spec.passes) for spec in specs)
    print(f"{'name':<{width}}  {'passes per step':<{passes}}  kind            from")
    for spec in specs:
        kind = "batch rule" if spec.batch_rule is not None else "SAM family" if spec.sharpness_aware else "plain"
        kind = "trajectory" if spec.trajectory is not None else kind
        print(f"{spec.name:<{width}}  {spec.passes:<{passes}}  {kind:<14}  {spec.module}")
        print(f"{'':<{width}}  {spec.help}")
        if spec.options is not None:
            flags = ", ".join(f"--{f.name.replace('_', '-')} {f.default}" for f in dataclasses.fields(spec.options))
            print(f"{'':<{width}}  options: {flags}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from flatminima.experiments.label_noise import QUICK_EPOCHS, format_table, run_label_noise_demo

    if args.epochs is not None and args.epochs < 1:
        raise ValueError("--epochs must be >= 1")
    if args.workers < 1:
        raise ValueError("--workers must be >= 1")
    finals = run_label_noise_demo(
        args.output,
        tuple(args.seeds),
        args.epochs,
        progress=not args.no_progress,
        variants=tuple(args.variants),
        workers=args.workers,
        quick=args.quick,
        overwrite=args.overwrite,
    )
    names = " vs ".join(name.upper() for name in args.variants)
    print(f"{names} on digits, 40 % symmetric label noise on the training labels (clean test labels):\n")
    print(format_table(finals))
    if args.quick and args.epochs is None:
        print(f"\n--quick: {QUICK_EPOCHS} epochs, a check that the demo runs; the comparison needs the full run")
    print(f"\nfigure and table in {args.output}/")
    return 0


def _sharpness(args: argparse.Namespace) -> int:
    """Rebuild the trained model and its training data from the checkpoint's config, then measure."""
    from flatminima.output_folder import OutputFolder
    from flatminima.train.checkpoint import load_checkpoint

    counts = {"--examples": args.examples, "--k": args.k, "--m": args.m, "--trace-probes": args.trace_probes}
    counts["--density-runs"] = args.density_runs
    for name, value in counts.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if not args.rho >= 0 or args.rho == float("inf"):
        raise ValueError(f"--rho must be a finite number >= 0, got {args.rho}")
    path = Path(args.checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; give the model.pt or checkpoint.pt of a flatminima run.")
    state = load_checkpoint(path)
    if not isinstance(state.get("config"), dict):
        raise ValueError(f"{path} holds no training config; it was not written by flatminima train.")
    output = Path(args.output) if args.output else path.parent / "sharpness"
    with OutputFolder(output, "sharpness", overwrite=args.overwrite):
        return _measure_sharpness(args, path, state, output)


def _measure_sharpness(args: argparse.Namespace, path: Path, state: dict[str, Any], output: Path) -> int:
    """Rebuild the model and data the checkpoint ``state`` (read from ``path``) names, measure, report."""
    import torch

    from flatminima.data.dataset import to_float
    from flatminima.data.transforms import normalize
    from flatminima.sharpness.report import sharpness_report
    from flatminima.train.config import TrainConfig
    from flatminima.train.loop import device_for
    from flatminima.train.prepare import model_for, prepare_data

    config = TrainConfig.from_dict(state["config"])
    if args.data_root:
        config.data_root = args.data_root
    config.device = args.device
    device = device_for(config)
    data = prepare_data(config)
    model = model_for(config, data.dataset)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(
            f"the weights in {path} do not fit the {config.model} its config names ({first}); the checkpoint is "
            "damaged or was edited."
        ) from None
    weights = model.state_dict().items()
    broken = [name for name, tensor in weights if tensor.is_floating_point() and not tensor.isfinite().all()]
    if broken:
        raise ValueError(
            f"the weights in {path} hold inf or NaN ({', '.join(broken[:2])}{' ...' if len(broken) > 2 else ''}): "
            "there is no curvature to measure; measure an earlier checkpoint of the run."
        )
    images = to_float(data.train_images[: args.examples])
    if images.ndim == 4:
        images = normalize(images, data.dataset.mean, data.dataset.std)
    labels = data.train_labels[: args.examples]
    model, images, labels = model.to(device), images.to(device), labels.to(device)
    torch.manual_seed(0)
    report = sharpness_report(
        model,
        (images, labels),
        output,
        k=args.k,
        trace_probes=args.trace_probes,
        density_runs=args.density_runs,
        m=args.m,
        rho=args.rho,
    )
    print(
        f"{config.model} trained with {config.optimizer} on {config.dataset}; {labels.numel()} training examples, "
        f"measured on {device}"
    )
    print(report.table())
    print(f"figures in {output}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
