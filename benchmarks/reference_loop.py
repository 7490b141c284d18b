"""The reference that kdsweep's per-trial time is compared with: a minimal hand-written PyTorch loop.

It trains the same fully connected student with the same distillation loss, data tensors, cached
teacher logits, batch size, epochs, optimizer and thread count as a kdsweep trial, validates after
every epoch and tests once, as a trial does. It imports only PyTorch and kdsweep's loss function,
so neither Lightning, MLflow nor Hydra is loaded in its process.

Run by the benchmarks as ``python -m benchmarks.reference_loop SETTINGS.json``; it prints the
seconds of each repetition as JSON.
"""

import json
import math
import sys
import time

import torch
from torch import nn

from kdsweep.losses import distillation_loss


def build_student(input_size: int, hidden_sizes: list[int], num_classes: int) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    width = input_size
    for hidden in hidden_sizes:
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


@torch.no_grad()
def accuracy(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int = 1024) -> float:
    model.eval()
    correct = sum(int((model(x).argmax(dim=-1) == y).sum()) for x, y in zip(inputs.split(batch_size),
                                                                            labels.split(batch_size)))
    return correct / len(labels)


def train_once(settings: dict, tensors: dict[str, torch.Tensor], seed: int, device: torch.device) -> float:
    """Train one student from scratch and return the wall-clock seconds of training and evaluation."""
    torch.manual_seed(seed)
    train_x, train_y, train_logits = tensors["train_x"], tensors["train_y"], tensors["train_logits"]
    model = build_student(math.prod(train_x.shape[1:]), settings["hidden_sizes"], settings["num_classes"]).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings["lr"], weight_decay=settings["weight_decay"])
    generator = torch.Generator(device).manual_seed(seed)

    started = time.perf_counter()
    for _ in range(settings["epochs"]):
        model.train()
        for batch in torch.randperm(len(train_y), generator=generator, device=device).split(settings["batch_size"]):
            loss = distillation_loss(model(train_x[batch]), train_logits[batch], train_y[batch],
                                     temperature=settings["temperature"], alpha=settings["alpha"]).total
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if not torch.isfinite(loss):  # kdsweep checks every step too.
                raise FloatingPointError(f"loss is {loss.item()}")
        accuracy(model, tensors["val_x"], tensors["val_y"])
    accuracy(model, tensors["test_x"], tensors["test_y"])
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def main() -> None:
    settings = json.loads(open(sys.argv[1]).read())
    # kdsweep's default accelerator "auto" trains on a GPU when one is present, and so does this loop.
    # NOTE: the GPU path has not been run yet, because no GPU machine was available.
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tensors = {name: tensor.to(device) for name, tensor in torch.load(settings["tensors"], weights_only=True).items()}
    # The first repetition warms the allocator and kernels up and is left out, as the first trial of
    # a sweep is.
    seconds = [train_once(settings, tensors, seed, device) for seed in range(settings["repeats"] + 1)][1:]
    print(json.dumps({"seconds": seconds, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
