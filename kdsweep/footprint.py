"""The deployment footprint of a trained model: parameters, size on disk, inference latency and throughput.

Each teacher and student run logs these metrics, so the MLflow UI compares a student with its
teacher. Latency and throughput are timed with ``torch.utils.benchmark.Timer`` on the device that
trained the model. The Timer warms up before each timed block of forward passes and synchronises
the accelerator around it. The metrics are the median over :data:`TIMED_BLOCKS` blocks that
together last about ``inference.min_run_time`` seconds, or longer when one forward pass takes
longer than a block.
"""

import io
import logging
import statistics
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from kdsweep.models import count_parameters

PARAMETER_COUNT_METRIC = "model/parameters"
SIZE_METRIC = "model/size_bytes"
# Median milliseconds of one forward pass of a single image.
LATENCY_METRIC = "inference/latency_ms"
# Median milliseconds of one forward pass of a batch of inference.batch_size images.
BATCH_LATENCY_METRIC = "inference/batch_latency_ms"
# Images per second in batches of inference.batch_size.
THROUGHPUT_METRIC = "inference/throughput"
INFERENCE_PREFIX = "inference/"
TIMED_BLOCKS = 10


@dataclass(frozen=True)
class InferenceTiming:
    """Settings of the inference timing: the device, the large batch and the time budget."""

    device: torch.device
    # The large batch of the throughput figure. Latency is always timed on a batch of one image.
    batch_size: int
    # Seconds of timed blocks per batch size, after the warm-up.
    min_run_time: float


def size_bytes(model: nn.Module) -> int:
    """Return the bytes that ``torch.save`` writes for the model's state dict."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def median_forward_seconds(model: nn.Module, inputs: torch.Tensor, min_run_time: float) -> float:
    """Return the median seconds of one forward pass of ``inputs``, on the device of ``inputs``."""
    # torch.utils.benchmark imports torch.utils.cpp_extension, which logs a warning about CUDA_HOME
    # on a machine without CUDA. Timing compiles nothing, so that warning is silenced, and the
    # import waits until a run measures, so that other kdsweep commands do not print it.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils import benchmark

    timer = benchmark.Timer(
        stmt="model(inputs)",
        globals={"model": model, "inputs": inputs},
        # The Timer defaults to one thread, but inference in a run uses as many as training does.
        num_threads=torch.get_num_threads(),
    )
    with torch.inference_mode():
        first = timer.timeit(number=1)  # Timer.timeit runs the statement twice untimed first.
        per_block = max(1, round(min_run_time / TIMED_BLOCKS / first.mean))
        return statistics.median(timer.timeit(number=per_block).mean for _ in range(TIMED_BLOCKS))


def measure(model: nn.Module, input_shape: Sequence[int], timing: InferenceTiming) -> dict[str, float]:
    """Return the footprint metrics of ``model`` in eval mode, timed on random inputs of ``input_shape``.

    The model is left in eval mode on ``timing.device``.
    """
    model = model.eval().to(timing.device)
    single = torch.rand(1, *input_shape, device=timing.device)
    batch = torch.rand(timing.batch_size, *input_shape, device=timing.device)
    latency = median_forward_seconds(model, single, timing.min_run_time)
    batch_latency = median_forward_seconds(model, batch, timing.min_run_time)
    return {
        PARAMETER_COUNT_METRIC: float(count_parameters(model)),
        SIZE_METRIC: float(size_bytes(model)),
        LATENCY_METRIC: latency * 1e3,
        BATCH_LATENCY_METRIC: batch_latency * 1e3,
        THROUGHPUT_METRIC: timing.batch_size / batch_latency,
    }
