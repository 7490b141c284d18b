"""Run the benchmark suite and print its table: ``python -m benchmarks [--quick] [--output FILE]``."""

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.suite import CHECKOUT, Figure, Settings, run_all
from kdsweep.provenance import cpu_model

DEFAULT_MNIST_ROOT = CHECKOUT.parent / "shared" / "data"


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true",
                        help="shrink every measurement to check that the suite runs; its figures mean little")
    parser.add_argument("--mnist-root", type=Path, default=DEFAULT_MNIST_ROOT,
                        help="folder that contains MNIST/raw; the MNIST figures are skipped when it does not "
                             f"(default: {DEFAULT_MNIST_ROOT})")
    parser.add_argument("--workdir", type=Path,
                        help="folder for the runs, studies and logs (default: a new temporary folder)")
    parser.add_argument("--output", type=Path, help="also write the table as Markdown to this file")
    arguments = parser.parse_args()

    # Check the paths before the suite spends ten minutes, so a typo fails at once.
    if arguments.workdir is not None:
        try:
            arguments.workdir.mkdir(parents=True, exist_ok=True)
            leftovers = any(arguments.workdir.iterdir())
        except OSError as error:
            parser.error(f"--workdir {arguments.workdir}: not a writable folder ({error.strerror})")
        if leftovers:
            # Its studies would continue instead of timing new trials.
            parser.error(f"--workdir {arguments.workdir}: not empty; give a new or empty folder")
    if arguments.output is not None:
        existed = arguments.output.exists()
        try:
            with open(arguments.output, "a"):
                pass
        except OSError as error:
            parser.error(f"--output {arguments.output}: cannot write a file there ({error.strerror})")
        if not existed:
            arguments.output.unlink()
    return arguments


def machine_description() -> str:
    return (f"{cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}, "
            f"{platform.system()}")


def markdown_table(figures: list[Figure]) -> str:
    lines = ["| measure | figure | target | met | detail |", "| --- | --- | --- | --- | --- |"]
    for figure in figures:
        met = {None: "", True: "yes", False: "**no**"}[figure.met]
        lines.append(f"| {figure.measure} | {figure.value:.3g} {figure.unit} | {figure.target or ''} | {met} | "
                     f"{figure.detail} |")
    return "\n".join(lines)


def main() -> int:
    arguments = parse_arguments()
    workdir = arguments.workdir or Path(tempfile.mkdtemp(prefix="kdsweep-benchmarks-"))
    raw = arguments.mnist_root / "MNIST" / "raw"
    has_mnist = all(any(raw.glob(f"{name}*")) for name in ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte"))
    mnist_root = arguments.mnist_root if has_mnist else None
    if mnist_root is None:
        print(f"MNIST not found under {raw}; skipping the MNIST figures", file=sys.stderr)
    settings = (Settings.quick if arguments.quick else Settings)(workdir=workdir.resolve(), mnist_root=mnist_root)

    started = time.perf_counter()
    try:
        figures = run_all(settings)
    except KeyboardInterrupt:
        print(f"Interrupted; the runs so far are in {workdir}", file=sys.stderr)
        return 130
    minutes = (time.perf_counter() - started) / 60

    report = "\n".join([
        f"Measured {datetime.date.today().isoformat()} on {machine_description()}.",
        f"Command: python -m benchmarks{' --quick' if arguments.quick else ''}; suite time {minutes:.1f} min; "
        f"runs kept in {workdir}.",
        "",
        markdown_table(figures),
    ])
    print(report)
    if arguments.output:
        arguments.output.write_text(report + "\n")
    missed = [figure.measure for figure in figures if figure.met is False]
    if missed:
        print(f"\nTargets missed: {'; '.join(missed)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
