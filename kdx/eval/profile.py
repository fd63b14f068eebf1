"""Cost of a network: parameters, MACs, weight size, CPU latency at batch 1 and throughput at a batch size."""
from __future__ import annotations

import io
import statistics
import time
from typing import Any, Sequence

import torch
from torch import nn


def count_macs(net: nn.Module, input_shape: Sequence[int]) -> int:
    """Multiply-accumulates of one forward pass on one input of shape C x H x W (FLOPs / 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, *input_shape, device=next(net.parameters()).device)
    was_training = net.training
    net.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(x)
    net.train(was_training)
    return int(counter.get_total_flops() // 2)


def weights_size_bytes(net: nn.Module) -> int:
    """Bytes of the network's state dict as torch.save writes it (what a deployed checkpoint weighs)."""
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    return buffer.getbuffer().nbytes


@torch.inference_mode()
def time_forward(net: nn.Module, input_shape: Sequence[int], batch_size: int, runs: int, warmup: int = 3) -> list[float]:
    """Wall-clock seconds of `runs` eval-mode forward passes at `batch_size` (after `warmup` untimed ones)."""
    net.eval()
    x = torch.randn(batch_size, *input_shape)
    for _ in range(warmup):
        net(x)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        net(x)
        times.append(time.perf_counter() - t0)
    return times


def profile_model(net: nn.Module, input_shape: Sequence[int], latency_runs: int = 30, throughput_batch: int = 64,
                  throughput_runs: int = 5, threads: int | None = None) -> dict[str, Any]:
    """params, macs, size_mb, latency_ms (median, batch 1) and images_per_s (batch `throughput_batch`) on the CPU."""
    net = net.cpu().eval()
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        latency = statistics.median(time_forward(net, input_shape, 1, latency_runs))
        batch_times = time_forward(net, input_shape, throughput_batch, throughput_runs, warmup=1)
    finally:
        torch.set_num_threads(previous)
    return {
        "params": sum(p.numel() for p in net.parameters()),
        "macs": count_macs(net, input_shape),
        "size_mb": weights_size_bytes(net) / 2**20,
        "latency_ms": latency * 1000,
        "images_per_s": throughput_batch / statistics.median(batch_times),
    }
