"""Downloads of pretrained weights (torchvision, timm): on a machine that cannot download them, one sentence that
says what to do (pass a local weights file, or pretrained=false) instead of a long network traceback.

When the weights are not in the local cache and the weights' host name does not resolve (no network, no
proxy), it says so at once, instead of after huggingface_hub's minute of retries.
"""
from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar
from urllib.parse import urlparse

from kdx.errors import CheckpointError

T = TypeVar("T")
PROXY_ENV = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
NETWORK_ERROR_NAMES = ("ConnectError", "ConnectionError", "ConnectTimeout", "Timeout", "NetworkError",
                       "LocalEntryNotFoundError", "OfflineModeIsEnabled", "ProxyError", "SSLError", "gaierror")


@dataclass
class WeightsSource:
    """Where a model's pretrained weights come from, and whether a local cache already holds them."""

    url: str | None       # what to download (a file URL, or a Hugging Face repository page)
    filename: str | None  # the file to pass as pretrained=PATH
    cache_dir: Path | None
    cached: bool

    @property
    def host(self) -> str | None:
        return urlparse(self.url).hostname if self.url else None


def torchvision_source(bare: str, weights: str) -> WeightsSource:
    """The download of torchvision model `bare` with `weights` (DEFAULT or a weights name)."""
    import torch
    import torchvision

    try:
        url = torchvision.models.get_model_weights(bare).verify(weights).url
    except Exception:  # an unknown weights name: torchvision itself says so when building
        return WeightsSource(None, None, None, True)
    filename = url.rsplit("/", 1)[-1]
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    return WeightsSource(url, filename, cache, (cache / filename).is_file())


def timm_source(bare: str) -> WeightsSource:
    """The download of timm model `bare`: a Hugging Face repository, else a file URL."""
    try:
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(bare)
    except Exception:
        cfg = None
    if cfg is None:
        return WeightsSource(None, None, None, True)
    if getattr(cfg, "hf_hub_id", None):
        from huggingface_hub import constants

        repo = str(cfg.hf_hub_id).split("@")[0]
        cache = Path(constants.HF_HUB_CACHE)
        cached = (cache / f"models--{repo.replace('/', '--')}" / "snapshots").is_dir()
        return WeightsSource(f"https://huggingface.co/{repo}/resolve/main/model.safetensors", "model.safetensors",
                             cache, cached)
    if getattr(cfg, "url", None):
        import torch

        filename = str(cfg.url).rsplit("/", 1)[-1]
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        return WeightsSource(str(cfg.url), filename, cache, (cache / filename).is_file())
    return WeightsSource(None, None, None, True)


def host_resolves(host: str, timeout_s: float = 5.0) -> bool | None:
    """True/False when the DNS lookup of `host` succeeds/fails within `timeout_s`, None when it takes longer."""
    outcome: dict[str, bool] = {}

    def lookup() -> None:
        try:
            socket.getaddrinfo(host, 443)
            outcome["ok"] = True
        except OSError:
            outcome["ok"] = False

    worker = threading.Thread(target=lookup, daemon=True)
    worker.start()
    worker.join(timeout_s)
    return outcome.get("ok")


def is_download_error(error: BaseException) -> bool:
    """True when `error`, or an error it was raised from, is a failed network access or a missing offline file."""
    seen = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        names = {cls.__name__ for cls in type(current).__mro__}
        if names & set(NETWORK_ERROR_NAMES) or "URLError" in names or isinstance(current, ConnectionError):
            return True
        current = current.__cause__ or current.__context__
    return False


def offline_error(name: str, source: WeightsSource, reason: str) -> CheckpointError:
    """The one-sentence error for weights of `name` that cannot be downloaded."""
    if source.url and source.filename:
        where = (f"copy {source.url} to this machine and pass its path (e.g. teacher.pretrained=/path/to/"
                 f"{source.filename}" + (f", or put it in {source.cache_dir}" if source.cache_dir and
                                         source.cache_dir.name == "checkpoints" else "") + ")")
    else:
        where = "pass a local weights file as pretrained (e.g. teacher.pretrained=/path/to/weights.pth)"
    return CheckpointError(f"pretrained weights for {name} cannot be downloaded ({reason}); {where}, or train it "
                           f"from scratch with pretrained=false (e.g. teacher.pretrained=false)")


def fetch_pretrained(name: str, source: WeightsSource, build: Callable[[], T]) -> T:
    """Run `build` (which downloads the weights of model `name` unless cached); download failures become one sentence."""
    proxied = any(os.environ.get(k) for k in PROXY_ENV)
    if not source.cached and source.host and not proxied and host_resolves(source.host) is False:
        raise offline_error(name, source, f"no network: {source.host} does not resolve")
    try:
        return build()
    except Exception as e:
        if not is_download_error(e):
            raise
        detail = str(e).splitlines()[0] if str(e) else ""
        reason = f"{type(e).__name__}: {detail}"[:160]
        raise offline_error(name, source, reason) from None

