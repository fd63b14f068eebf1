"""DDP inside a sweep or a pipeline: a multi-process job runs in a fresh process tree of its own.

Lightning's `ddp` strategy starts ranks > 0 by re-running the command line; in a Hydra multirun that would
re-run the whole sweep. `run_ddp_worker` therefore starts `python -m kdx.train.ddp_worker RUN_DIR`, which
trains the config saved in RUN_DIR/config.yaml, and Lightning re-runs that worker for the other ranks.

Multi-node: when torchrun or srun started every rank itself (kdx.ranks.cluster_launch), the ranks share one
run folder named by the job (kdx.ranks.launch_stamp), `join_cluster` joins the process group before training,
and rank 0 alone decides what to do with the folder (fresh, resume from which checkpoint, skip, refuse) and
tells the others (`decided_by_rank_zero`): a rank deciding by itself could resume while rank 0 starts over.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, TypeVar

from kdx.errors import ConfigError, KdxError
from kdx.ranks import cluster_launch, cluster_world_size
from kdx.runs import RESUME_CKPT_ENV

T = TypeVar("T")

EXTERNAL_LAUNCH_ENV = ("LOCAL_RANK", "TORCHELASTIC_RUN_ID")


def world_size(trainer_cfg: dict[str, Any]) -> int:
    """Processes a trainer config asks for (devices x nodes); 'auto'/-1 count as many (2)."""
    devices = trainer_cfg.get("devices", 1)
    if isinstance(devices, (list, tuple)):
        n = len(devices)
    elif isinstance(devices, str) and "," in devices:
        n = len([d for d in devices.split(",") if d.strip()])
    else:
        try:
            n = int(devices)
        except (TypeError, ValueError):
            n = 2  # "auto": may be several
        n = 2 if n == -1 else n
    return n * int(trainer_cfg.get("num_nodes", 1) or 1)


def launched_externally() -> bool:
    """True when a cluster (SLURM with one task per device, torchrun) already started one process per rank."""
    if any(k in os.environ for k in EXTERNAL_LAUNCH_ENV):
        return True
    try:
        return int(os.environ.get("SLURM_NTASKS", "1")) > 1
    except ValueError:
        return False


def needs_isolated_ddp(trainer_cfg: dict[str, Any]) -> bool:
    """True when a multirun job asks for DDP that Lightning would launch by re-running the script."""
    strategy = str(trainer_cfg.get("strategy", "auto") or "auto")
    return strategy.startswith("ddp") and "spawn" not in strategy and "notebook" not in strategy \
        and world_size(trainer_cfg) > 1 and not launched_externally()


def run_ddp_worker(run_dir: Path, resume_ckpt: Path | None) -> int:
    """Train the config saved in `run_dir` in a fresh process (`python -m kdx.train.ddp_worker RUN_DIR`);
    its exit code."""
    env = dict(os.environ)
    env[RESUME_CKPT_ENV] = str(resume_ckpt) if resume_ckpt else ""
    for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "RANK"):
        env.pop(key, None)
    return subprocess.call([sys.executable, "-m", "kdx.train.ddp_worker", str(run_dir)], env=env)


# ------------------------------------------------------------- jobs that torchrun or srun started, one process per rank

_MESSAGES: Any = None  # the gloo group kdx's own messages between ranks go through (None: not joined)


def _process_group_backend(trainer_cfg: dict[str, Any]) -> str:
    """The backend Lightning's DDP picks for this trainer config: nccl on CUDA devices, gloo elsewhere."""
    import torch

    accelerator = str(trainer_cfg.get("accelerator", "auto") or "auto").lower()
    cuda = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    return "nccl" if cuda else "gloo"


def check_cluster_fits(trainer_cfg: dict[str, Any]) -> None:
    """Refuse, in one sentence, a trainer config whose process count differs from what the launcher started
    (Lightning would stop later with a traceback, or wait forever for processes that never come)."""
    kind = cluster_launch()
    if kind is None:
        return
    devices, nodes = trainer_cfg.get("devices", 1), trainer_cfg.get("num_nodes", 1) or 1
    strategy = str(trainer_cfg.get("strategy", "auto") or "auto")
    launched = cluster_world_size()
    if kind == "torchrun":
        how = (f"torchrun started {launched} processes (--nnodes x --nproc-per-node)",
               "trainer.devices=<--nproc-per-node> trainer.num_nodes=<--nnodes>")
        per_node, node_count = os.environ.get("LOCAL_WORLD_SIZE"), None
    else:
        how = (f"SLURM started {launched} tasks (SLURM_NTASKS)",
               "trainer.devices=<--ntasks-per-node> trainer.num_nodes=<--nodes>")
        per_node, node_count = os.environ.get("SLURM_NTASKS_PER_NODE"), os.environ.get("SLURM_NNODES")
        if per_node is None:
            raise ConfigError(f"{how[0]} but SLURM_NTASKS_PER_NODE is not set, which Lightning needs to place the "
                              f"ranks; ask SLURM for --ntasks-per-node=N (with --nodes=M) instead of --ntasks")
    if strategy != "auto" and (not strategy.startswith("ddp") or "spawn" in strategy):
        raise ConfigError(f"{how[0]}, which needs trainer.strategy=ddp (the launcher made one process per rank), "
                          f"not {strategy!r}; use trainer=ddp")
    if not (isinstance(devices, int) and isinstance(nodes, int)) or devices < 1:
        return  # 'auto' / a device list: Lightning counts them itself
    if devices * nodes != launched:
        raise ConfigError(f"{how[0]} but trainer.devices x trainer.num_nodes = {devices} x {nodes} = "
                          f"{devices * nodes}; set {how[1]} so that every process is one rank")
    if per_node is not None and per_node.split("(")[0].isdigit() and int(per_node.split("(")[0]) != devices:
        raise ConfigError(f"{how[0]} with {per_node} per node but trainer.devices={devices}; set {how[1]}")
    if node_count is not None and node_count.isdigit() and int(node_count) != nodes:
        raise ConfigError(f"{how[0]} on {node_count} nodes but trainer.num_nodes={nodes}; set {how[1]}")


def join_cluster(trainer_cfg: dict[str, Any]) -> bool:
    """In a job torchrun or srun started as several processes, join the process group now, as Lightning would
    (its cluster environment's address, port, ranks and backend), so that rank 0 can tell every rank what it
    decided about the run folder before any training; Lightning then finds the group ready and uses it.
    False (nothing done) elsewhere."""
    global _MESSAGES
    kind = cluster_launch()
    if kind is None:
        return False
    check_cluster_fits(trainer_cfg)
    import torch.distributed as dist
    from lightning_fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
    from torch.distributed.constants import default_pg_timeout

    if not dist.is_initialized():
        env = TorchElasticEnvironment() if kind == "torchrun" else SLURMEnvironment()
        os.environ["MASTER_ADDR"] = env.main_address
        os.environ["MASTER_PORT"] = str(env.main_port)
        dist.init_process_group(_process_group_backend(trainer_cfg), rank=env.global_rank(),
                                world_size=env.world_size(), timeout=default_pg_timeout)
        _MESSAGES = None
    if _MESSAGES is None:
        _MESSAGES = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    return True


def in_cluster_group() -> bool:
    """True once join_cluster has joined this process to its torchrun/srun job's process group."""
    import torch.distributed as dist

    return _MESSAGES is not None and dist.is_available() and dist.is_initialized()


def decided_by_rank_zero(decide: Callable[[], T] | None) -> T:
    """Rank 0 of a torchrun/srun job calls `decide` and sends what it returns, or the error it raises, to every
    rank; the others (`decide` None) receive it and return it, or raise that same error. So all ranks resume,
    skip or stop together."""
    import torch.distributed as dist

    box: list[Any] = [None]
    if dist.get_rank() == 0:
        if decide is None:
            raise RuntimeError("rank 0 of a cluster job must decide")
        try:
            value = decide()
        except BaseException as e:
            tell_ranks_failed(e)
            raise
        box[0] = ("ok", value)
        dist.broadcast_object_list(box, src=0, group=_MESSAGES)
        return value
    dist.broadcast_object_list(box, src=0, group=_MESSAGES)
    kind, value = box[0]
    if kind == "error":
        raise value
    return value


def tell_ranks_failed(error: BaseException) -> None:
    """On rank 0 of a torchrun/srun job that stops before deciding: send `error` to the ranks waiting in
    decided_by_rank_zero (they raise it too instead of waiting); nothing elsewhere."""
    if not in_cluster_group():
        return
    import pickle

    import torch.distributed as dist

    try:
        pickle.dumps(error)
        sent: BaseException = error
    except Exception:  # an error that does not pickle: its sentence
        sent = KdxError(f"rank 0 stopped: {type(error).__name__}: {error}")
    dist.broadcast_object_list([("error", sent)], src=0, group=_MESSAGES)
