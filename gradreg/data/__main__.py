"""Dataset tools: ``python -m gradreg.data check CONFIG`` and ``python -m gradreg.data imagenet-classes N``.

``check CONFIG [--data_root DIR] [--stage fit|test] [--read-images [--workers N]]`` lists every dataset of a config,
found where or where to put it, and with ``--read-images`` then reads every image of every set (N loader processes)
and names the unreadable files; exit code 0 if every one was found (and read), 1 if any is missing, invalid or
unreadable (or the config cannot be read, a dataset spec or data setting in it is wrong, or the command line is:
one ``error:`` line). ``imagenet-classes N`` prints the N ID wnids of GReg's ImageNet protocol, one per line in label
order (an ``id_classes_file`` for the ``imagefolder_complement`` outlier pool).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from gradreg.cli import ArgumentParser, require_file, run_user_errors

MAX_LISTED = 20  # unreadable files listed per set


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (mistakes raise :class:`~gradreg.cli.UserError`)."""
    parser = ArgumentParser(prog="python -m gradreg.data", description="Dataset tools of gradreg.")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="list every dataset of a config: found where, or where to put it")
    check.add_argument("config", help="a training config, e.g. configs/cifar10.yaml")
    check.add_argument(
        "--data-root", "--data_root", dest="data_root", default=None, help="override the config's data.data_root"
    )
    check.add_argument("--stage", choices=("fit", "test"), default="fit", help="test: only what evaluation reads")
    check.add_argument(
        "--read-images", action="store_true", help="then read every image, to find empty, truncated or foreign files"
    )
    check.add_argument(
        "--workers", type=int, default=min(8, os.cpu_count() or 1), help="reader processes of --read-images"
    )
    classes = commands.add_parser("imagenet-classes", help="print the N ID wnids of GReg's ImageNet protocol")
    classes.add_argument("num_classes", type=int, help="N, e.g. 10, 20, 50 or 100")
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # argparse reports them at the top level: point at the command's own --help
        commands.choices[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")

    if args.command == "imagenet-classes":
        from gradreg.data.benchmarks import IMAGENET_WNIDS, imagenet_subset_wnids

        if not 0 < args.num_classes < len(IMAGENET_WNIDS):
            parser.error(f"num_classes must be between 1 and {len(IMAGENET_WNIDS) - 1}")
        print("\n".join(imagenet_subset_wnids(args.num_classes)))
        return 0

    from gradreg.data.check import check_datasets, data_section, format_checks, unreadable_images
    from gradreg.data.module import check_data_settings
    from gradreg.report import read_config

    if args.workers < 0:
        check.error(f"--workers must be 0 (read in this process) or more, got {args.workers}")

    path = require_file(args.config, "config file", "pass a training config such as configs/quickstart.yaml")
    config = read_config(path)  # as evaluate.py reads one: YAML errors and misspelled sections or keys are one line
    check_data_settings(data_section(config))  # what train.py's datamodule refuses (a batch size of 'many', ...)
    root = args.data_root if args.data_root is not None else data_section(config).get("data_root", "data")
    checks = check_datasets(config, root, args.stage)  # a mistake in a dataset spec: one line; missing files: a report
    print(format_checks(checks, root))
    if not all(c.found for c in checks):
        return 1
    if not args.read_images:
        return 0
    print(f"reading every image ({args.workers} reader processes):", flush=True)
    bad: set[str] = set()  # a file read by two sets (or two splits of one folder) is one file to replace
    for name, total, failed in unreadable_images(config, root, args.stage, args.workers):
        bad.update(failed)
        status = (
            f"ok          {name}: {total} image{'' if total == 1 else 's'} read"
            if not failed
            else f"UNREADABLE  {name}: {len(failed)} of {total}"
        )
        print(f"  {status}")
        for reason in failed[:MAX_LISTED]:
            print(f"      {reason}")
        if len(failed) > MAX_LISTED:
            print(f"      ... and {len(failed) - MAX_LISTED} more")
    if bad:
        print(f"{len(bad)} unreadable images: replace or delete each file (or re-extract its dataset)")
    return 1 if bad else 0


if __name__ == "__main__":
    run_user_errors(main)()
