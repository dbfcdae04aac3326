"""``flatminima train | demo``: the command line."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    from flatminima.train.config import add_arguments

    parser = argparse.ArgumentParser(prog="flatminima", description="Sharpness-aware training and measurement.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a model (every config field is also a flag)")
    add_arguments(train)
    demo = commands.add_parser("demo", help="SGD vs SAM on digits with 40 %% label noise: a table and a figure")
    demo.add_argument("--output", default="runs/demo", help="output folder (default: %(default)s)")
    demo.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds to average over (default: 0)")
    demo.add_argument("--epochs", type=int, default=None, help="epochs per run (default: 60)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.add_argument(
        "--variants",
        nargs="+",
        default=["sgd", "sam"],
        help="what to compare (default: sgd sam); any of sgd, sam, msam-4, msam-16, nsam, rwsam, rwsam-0.1, "
        "rwsam-1, ahn-rs, ahn-sa (docs/variants.md)",
    )
    demo.add_argument("--workers", type=int, default=1, help="trainings run at once, one process each (default: 1)")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "train":
        from flatminima.train import train
        from flatminima.train.config import config_from_args

        try:
            config = config_from_args(args)
        except (ValueError, FileNotFoundError) as error:
            print(f"flatminima train: {error}", file=sys.stderr)
            return 2
        result = train(config)
        final = result.final
        print(
            f"done: {config.optimizer} on {config.dataset}, {final['epoch']} epochs, train loss "
            f"{final['train_loss']:.4f}, test accuracy {100 * final['test_accuracy']:.2f} %; files in {result.output}"
        )
        return 0
    if args.command == "sharpness":
        return _sharpness(args)
    from flatminima.experiments.label_noise import format_table, run_label_noise_demo

    if args.epochs is not None and args.epochs < 1:
        print("flatminima demo: --epochs must be >= 1", file=sys.stderr)
        return 2
    if args.workers < 1:
        print("flatminima demo: --workers must be >= 1", file=sys.stderr)
        return 2
    try:
        finals = run_label_noise_demo(
            args.output,
            tuple(args.seeds),
            args.epochs,
            progress=not args.no_progress,
            variants=tuple(args.variants),
            workers=args.workers,
        )
    except ValueError as error:
        print(f"flatminima demo: {error}", file=sys.stderr)
        return 2
    names = " vs ".join(name.upper() for name in args.variants)
    print(f"{names} on digits, 40 % symmetric label noise on the training labels (clean test labels):\n")
    print(format_table(finals))
    print(f"\nfigure and table in {args.output}/")
    return 0


def _sharpness(args: argparse.Namespace) -> int:
    """Rebuild the trained model and its training data from the checkpoint's config, then measure."""
    from pathlib import Path

    from flatminima.sharpness.report import sharpness_report
    from flatminima.train.checkpoint import load_checkpoint
    from flatminima.train.config import TrainConfig
    from flatminima.train.prepare import model_for, prepare_data

    try:
        state = load_checkpoint(args.checkpoint)
        if "config" not in state:
            raise ValueError(f"{args.checkpoint} holds no training config; it was not written by flatminima train.")
        config = TrainConfig.from_dict(state["config"])
        if args.data_root:
            config.data_root = args.data_root
        data = prepare_data(config)
        if args.examples < 1:
            raise ValueError("--examples must be >= 1")
    except (FileNotFoundError, RuntimeError, ValueError) as error:
        print(f"flatminima sharpness: {error}", file=sys.stderr)
        return 2
    import torch

    from flatminima.data.dataset import to_float
    from flatminima.data.transforms import normalize

    model = model_for(config, data.dataset)
    model.load_state_dict(state["model"])
    images = to_float(data.train_images[: args.examples])
    if images.ndim == 4:
        images = normalize(images, data.dataset.mean, data.dataset.std)
    labels = data.train_labels[: args.examples]
    output = Path(args.output) if args.output else Path(args.checkpoint).parent / "sharpness"
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
    print(f"{config.model} trained with {config.optimizer} on {config.dataset}; {labels.numel()} training examples")
    print(report.table())
    print(f"figures in {output}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
