"""Loggers: csv, tensorboard and W&B at once; W&B offline without an API key (no prompt), with project, group,
tags, name, the flattened config, every loss term and metric; the comparison table as a W&B table."""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from conftest import compose_train, run_cli
from kdx.train.wandb_logging import flatten, log_comparison_to_wandb, resolve_mode


def wandb_records(offline_run: Path) -> list:
    """The protobuf records of an offline run's .wandb file (a LevelDB-style log of 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = next(offline_run.glob("*.wandb")).read_bytes()
    pos, block, chunks, buf = 7, 32768, [], b""  # 7: ":W&B" ident, magic, version
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += block - pos % block
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            chunks.append(chunk)
        elif kind == 2:
            buf = chunk
        elif kind == 3:
            buf += chunk
        elif kind == 4:
            chunks.append(buf + chunk)
    records = []
    for chunk in chunks:
        record = pb.Record()
        record.ParseFromString(chunk)
        records.append(record)
    return records


def logged(records: list) -> dict:
    """Run info, config keys, history keys and summary keys found in the records."""
    out = {"run": None, "config": set(), "history": set(), "summary": set()}
    for record in records:
        kind = record.WhichOneof("record_type")
        key = lambda item: item.key or "/".join(item.nested_key)  # noqa: E731
        if kind == "run":
            out["run"] = record.run
            out["config"] |= {key(i) for i in record.run.config.update}
        elif kind == "config":
            out["config"] |= {key(i) for i in record.config.update}
        elif kind == "history":
            out["history"] |= {key(i) for i in record.history.item}
        elif kind == "summary":
            out["summary"] |= {key(i) for i in record.summary.update}
    return out


def no_key_env(tmp_path: Path) -> dict:
    """An environment with no W&B API key anywhere and no WANDB_MODE: kdx must pick offline by itself."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env["HOME"] = str(tmp_path)  # no ~/.netrc
    return env


def test_csv_tensorboard_and_wandb_at_once_offline_without_key(tmp_path: Path, synthetic_teacher: Path) -> None:
    run_dir = tmp_path / "run"
    out = run_cli("kdx-train", "experiment=synthetic/kd", f"teacher.ckpt={synthetic_teacher}", "trainer.max_epochs=1",
                  "trainer.log_every_n_steps=1", "trainer.progress_bar=none", "logger=[csv,tensorboard,wandb]",
                  "logger.wandb.project=kdx-tests", "logger.wandb.group=grid-1", "logger.wandb.tags=[kd,synthetic]",
                  "logger.wandb.name=kd-T4", f"hydra.run.dir={run_dir}", cwd=tmp_path, env=no_key_env(tmp_path),
                  timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "train/loss_kd" in (run_dir / "metrics.csv").read_text().splitlines()[0]
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    results = json.loads((run_dir / "results.json").read_text())
    info = results["wandb"]
    assert info["mode"] == "offline" and info["sync"].startswith("wandb sync ")
    offline = Path(info["dir"])
    assert offline.parent == run_dir / "wandb" and offline.name.endswith(info["id"])
    found = logged(wandb_records(offline))
    run = found["run"]
    assert (run.run_id, run.project, run.run_group, run.display_name) == (info["id"], "kdx-tests", "grid-1", "kd-T4")
    assert list(run.tags) == ["kd", "synthetic"]
    assert {"distill.temperature", "distill.alpha", "pair.name", "optim.lr", "seed"} <= found["config"]
    assert {"train/loss_step", "train/loss_epoch", "train/loss_kd", "train/loss_ce", "val/loss", "val/acc1", "test/acc1"} <= found["history"]
    assert {"final/test/acc1", "results/params.network"} <= found["summary"]


def test_wandb_mode_without_key_is_offline(monkeypatch, tmp_path: Path) -> None:
    for key in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_mode() == "offline"
    assert resolve_mode("disabled") == "disabled"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_mode() == "online"
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": {}}) == {"a.b": 1, "a.c.d": [1, 2], "e": {}}


def test_comparison_table_logged_as_wandb_table(tmp_path: Path) -> None:
    cfg = compose_train(["logger=csv_wandb", "run_name=demo"])
    rows = [{"model": "teacher", "params": 77652, "test top-1": 1.0},
            {"model": "student distilled", "params": 4412, "test top-1": 0.99, "agreement": None}]
    info = log_comparison_to_wandb(rows, cfg, tmp_path)
    assert info["mode"] == "offline"
    found = logged(wandb_records(Path(info["dir"])))
    assert "comparison/_type" in found["history"] and found["run"].run_group == "demo"
    table = json.loads(next(Path(info["dir"]).rglob("comparison*.table.json")).read_text())
    assert table["columns"] == ["model", "params", "test top-1", "agreement"]
    assert table["data"][1][:3] == ["student distilled", 4412, 0.99]
    assert log_comparison_to_wandb(rows, compose_train(["logger=csv"]), tmp_path) is None  # no wandb: nothing
