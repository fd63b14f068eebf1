"""Cost of a network: parameters, MACs, weight size, CPU latency at batch 1 and throughput at a batch size.

Timings on a shared machine drift with its load, so models that are compared are timed *interleaved*: in
each round every model runs a short block of passes (about 20 ms; in a rotated order), and a model's figure
is the median over the rounds of the block's time per pass, reported with its interquartile range. Timing one model after the other would
give the later one whatever load the machine had then (a 3x difference for one architecture was seen).
"""
from __future__ import annotations

import io
import statistics
import time
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn


LATENCY_BUDGET_S = 1.0     # rounds beyond the asked minimum while they fit in this time (all models together)
THROUGHPUT_BUDGET_S = 2.0


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


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    """(first quartile, median, third quartile) of `values` (inclusive method; all equal for one value)."""
    values = sorted(values)
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, median, q3


def interleaved_times(runners: Mapping[str, Callable[[], Any]], rounds: int, block_s: float = 0.02,
                      warmup: int = 2, budget_s: float = 0.0, max_rounds: int = 200) -> dict[str, list[float]]:
    """Seconds per call of each runner, one value per round. In every round each runner makes a block of
    calls lasting about `block_s` (at least one call), and the block's mean per call is the round's value;
    the runners take turns in an order rotated by one each round. At least `rounds` rounds, more while they
    fit in about `budget_s` seconds, at most `max_rounds`.

    Blocks, rather than single calls, because on a shared machine a call either runs through or is
    preempted: single calls split into two clusters, and a median over them can land in either.
    """
    names = list(runners)
    per_call: dict[str, float] = {}
    for name in names:
        for _ in range(max(1, warmup)):
            t0 = time.perf_counter()
            runners[name]()
            per_call[name] = time.perf_counter() - t0
    calls = {name: max(1, int(block_s / max(per_call[name], 1e-7))) for name in names}
    per_round = sum(calls[name] * per_call[name] for name in names) or 1e-6
    rounds = int(min(max_rounds, max(rounds, budget_s / per_round))) if budget_s > 0 else max(1, rounds)
    out: dict[str, list[float]] = {name: [] for name in names}
    for r in range(max(1, rounds)):
        shift = r % len(names) if names else 0
        for name in names[shift:] + names[:shift]:
            run, k = runners[name], calls[name]
            t0 = time.perf_counter()
            for _ in range(k):
                run()
            out[name].append((time.perf_counter() - t0) / k)
    return out


def forward_runner(net: nn.Module, input_shape: Sequence[int], batch_size: int) -> Callable[[], Any]:
    """A no-argument callable: one eval-mode, inference-mode forward pass of `net` on a random batch."""
    net.eval()
    x = torch.randn(batch_size, *input_shape)

    def run() -> Any:
        with torch.inference_mode():
            return net(x)

    return run


def static_cost(net: nn.Module, input_shape: Sequence[int]) -> dict[str, Any]:
    """params, macs and size_mb of a network (no timing)."""
    return {"params": sum(p.numel() for p in net.parameters()), "macs": count_macs(net, input_shape),
            "size_mb": weights_size_bytes(net) / 2**20}


def timing_summary(latency_s: Sequence[float], batch_s: Sequence[float], throughput_batch: int) -> dict[str, float]:
    """latency_ms and images_per_s (medians over rounds) with their interquartile ranges (_q1, _q3)."""
    l1, lm, l3 = quartiles(latency_s)
    b1, bm, b3 = quartiles(batch_s)
    return {"latency_ms": lm * 1000, "latency_q1_ms": l1 * 1000, "latency_q3_ms": l3 * 1000,
            "latency_rounds": len(latency_s),
            "images_per_s": throughput_batch / bm, "images_per_s_q1": throughput_batch / b3,
            "images_per_s_q3": throughput_batch / b1}


def time_models(latency: Mapping[str, Callable[[], Any]], batch: Mapping[str, Callable[[], Any]],
                throughput_batch: int, latency_runs: int = 30, throughput_runs: int = 5,
                threads: int | None = None) -> dict[str, dict[str, float]]:
    """Interleaved timings of several models: `latency` runners (batch 1) and `batch` runners (batch
    `throughput_batch`) by model name: at least latency_runs / 3 and throughput_runs rounds (more for fast
    models, see interleaved_times); medians over the rounds with interquartile ranges."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        lat = interleaved_times(latency, rounds=max(3, int(latency_runs) // 3), budget_s=LATENCY_BUDGET_S)
        thr = interleaved_times(batch, rounds=max(3, int(throughput_runs)), warmup=1, budget_s=THROUGHPUT_BUDGET_S)
    finally:
        torch.set_num_threads(previous)
    return {name: timing_summary(lat[name], thr[name], throughput_batch) for name in latency}


def profile_models(nets: Mapping[str, nn.Module], input_shapes: Mapping[str, Sequence[int]],
                   latency_runs: int = 30, throughput_batch: int = 64, throughput_runs: int = 5,
                   threads: int | None = None) -> dict[str, dict[str, Any]]:
    """profile_model for several networks at once, their timings interleaved (see the module docstring)."""
    nets = {name: net.cpu().eval() for name, net in nets.items()}
    out = {name: static_cost(net, input_shapes[name]) for name, net in nets.items()}
    timings = time_models({n: forward_runner(net, input_shapes[n], 1) for n, net in nets.items()},
                          {n: forward_runner(net, input_shapes[n], throughput_batch) for n, net in nets.items()},
                          throughput_batch, latency_runs, throughput_runs, threads)
    for name in nets:
        out[name].update(timings[name])
    return out


def profile_model(net: nn.Module, input_shape: Sequence[int], latency_runs: int = 30, throughput_batch: int = 64,
                  throughput_runs: int = 5, threads: int | None = None) -> dict[str, Any]:
    """params, macs, size_mb, latency_ms (median, batch 1) and images_per_s (batch `throughput_batch`) on the
    CPU, with interquartile ranges; to compare models, time them together with profile_models."""
    return profile_models({"net": net}, {"net": input_shape}, latency_runs, throughput_batch, throughput_runs,
                          threads)["net"]


def onnx_runner(path: str, input_shape: Sequence[int], batch_size: int = 1, threads: int | None = 1
                ) -> Callable[[], Any]:
    """A no-argument callable: one onnxruntime CPU inference of the ONNX file at `path` on a random batch."""
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = options.inter_op_num_threads = int(threads)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: np.random.default_rng(0).standard_normal(
        (batch_size, *input_shape)).astype(np.float32)}
    return lambda: session.run(None, feed)


def torch_vs_onnx_latency(net: nn.Module, onnx_path: str, input_shape: Sequence[int], rounds: int = 10,
                          threads: int | None = 1) -> dict[str, float]:
    """Batch-1 latency of a network in PyTorch and of its ONNX export in onnxruntime, timed in interleaved
    rounds (the same discipline as the comparison's), as medians with interquartile ranges, in ms."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        times = interleaved_times({"torch": forward_runner(net.cpu().eval(), input_shape, 1),
                                   "onnx": onnx_runner(onnx_path, input_shape, 1, threads)},
                                  rounds=max(3, int(rounds)), budget_s=LATENCY_BUDGET_S)
    finally:
        torch.set_num_threads(previous)
    out = {}
    for name, values in times.items():
        q1, median, q3 = quartiles(values)
        out[f"{name}_latency_ms"], out[f"{name}_latency_q1_ms"], out[f"{name}_latency_q3_ms"] = \
            median * 1000, q1 * 1000, q3 * 1000
    return out
