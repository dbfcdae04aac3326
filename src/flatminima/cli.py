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
    from flatminima.experiments.label_noise import format_table, run_label_noise_demo

    if args.epochs is not None and args.epochs < 1:
        print("flatminima demo: --epochs must be >= 1", file=sys.stderr)
        return 2
    finals = run_label_noise_demo(args.output, tuple(args.seeds), args.epochs, progress=not args.no_progress)
    print("SGD vs SAM on digits, 40 % symmetric label noise on the training labels (clean test labels):\n")
    print(format_table(finals))
    print(f"\nfigure and table in {args.output}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
