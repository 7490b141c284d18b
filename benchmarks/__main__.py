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

    # Check both paths before the suite spends ten minutes, so a typo fails at once.
    if arguments.workdir is not None:
        try:
            arguments.workdir.mkdir(parents=True, exist_ok=True)
            (arguments.workdir / ".write-check").touch()
            (arguments.workdir / ".write-check").unlink()
        except OSError as error:
            parser.error(f"--workdir {arguments.workdir}: not a writable folder ({error.strerror})")
    if arguments.output is not None:
        folder = arguments.output.parent.resolve()
        if not folder.is_dir() or not os.access(folder, os.W_OK) or arguments.output.is_dir():
            parser.error(f"--output {arguments.output}: cannot write a file there; give a file path in a "
                         f"writable folder")
    return arguments


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}, "
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
    mnist_root = arguments.mnist_root if (arguments.mnist_root / "MNIST" / "raw").is_dir() else None
    if mnist_root is None:
        print(f"MNIST not found under {arguments.mnist_root}; skipping the MNIST figures", file=sys.stderr)
    settings = (Settings.quick if arguments.quick else Settings)(workdir=workdir.resolve(), mnist_root=mnist_root)

    started = time.perf_counter()
    figures = run_all(settings)
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
