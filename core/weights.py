"""Where pretrained weights come from: a local weights folder, or timm's hub cache.

GPU machines in labs and competitions are often offline, so the search never depends on the
network at run time: ``--weights DIR`` (or ``$MASK_SEARCH_WEIGHTS``) is a folder of files named
by timm model name (``DIR/resnet34.safetensors``; ``.pth`` also accepted) as timm's hub gives
them (ImageNet heads; ``create_model`` replaces the head), filled once on a machine with internet
by ``python -m search.weights``. Without a folder, timm's own hub cache is used when it holds the
weights. What is missing is found in one pass over every backbone, so the user sees the whole
list and both fixes in one line, within seconds (one short connect per hub host at most).
"""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlparse

from core.config import ConfigError

WEIGHTS_ENV = "MASK_SEARCH_WEIGHTS"
#: File endings looked for, in order: what ``search.weights`` writes first.
SUFFIXES = (".safetensors", ".pth")


def weights_dir(given: str | Path | None) -> Path | None:
    """The weights folder: ``given``, else ``$MASK_SEARCH_WEIGHTS``, else None (the hub cache)."""
    value = given or os.environ.get(WEIGHTS_ENV)
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        raise ConfigError(f"weights folder {str(path)!r} does not exist (--weights / "
                          f"${WEIGHTS_ENV}: a folder of <timm model name>.safetensors files)")
    return path.resolve()


def development_weights_dir() -> Path:
    """The benches' weights folder: ``$MASK_SEARCH_WEIGHTS``, else ``shared/weights`` beside
    the checkout (the repo's parent), where the development machines keep pretrained files."""
    env = os.environ.get(WEIGHTS_ENV)
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "weights"


def weights_file(folder: Path, backbone: str) -> Path | None:
    """``folder/<backbone>.safetensors`` (or ``.pth``) when it exists."""
    return next((folder / f"{backbone}{s}" for s in SUFFIXES
                 if (folder / f"{backbone}{s}").is_file()), None)


def fingerprint(folder: Path, backbones: Iterable[str]) -> dict[str, dict]:
    """File name -> size and SHA-256 of each backbone's weights file in ``folder``: what a study
    stores (not the path, which differs per machine) so a worker with other weights is refused."""
    out: dict[str, dict] = {}
    for backbone in sorted(set(backbones)):
        path = weights_file(folder, backbone)
        if path is None:
            continue
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
        out[path.name] = {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}
    return out


def _hub_source(backbone: str) -> tuple[bool, str | None]:
    """(weights already in timm's hub cache, host they would come from otherwise).

    Mirrors timm's order (Hugging Face Hub first, else the URL into torch's hub cache) closely
    enough to answer "can this run without a network?"; unknown layouts answer (True, None) so
    that timm itself decides.
    """
    import huggingface_hub
    import timm
    import torch
    from huggingface_hub import constants

    pcfg = timm.models.get_pretrained_cfg(backbone)
    if pcfg is None:
        return True, None
    if pcfg.hf_hub_id:
        repo = pcfg.hf_hub_id.split("@")[0]
        names = [pcfg.hf_hub_filename] if pcfg.hf_hub_filename else [
            "model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"]
        if any(isinstance(huggingface_hub.try_to_load_from_cache(repo, n), str) for n in names):
            return True, None
        return False, urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    if pcfg.url:
        cached = Path(torch.hub.get_dir(), "checkpoints", Path(urlparse(pcfg.url).path).name)
        return cached.is_file(), urlparse(pcfg.url).hostname or None
    return True, None


def _reachable(host: str, timeout: float = 2.0) -> bool:
    """One TCP connect to ``host:443``: seconds instead of the hub client's minute of retries."""
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def missing_weights(backbones: Iterable[str], folder: Path | None) -> tuple[list[str], str]:
    """The backbones whose pretrained weights cannot be had, and why (for the message).

    With a folder, only the folder counts: nothing touches the network. Without one, a backbone
    counts as available when timm's hub cache holds it or its host answers one connect.
    """
    backbones = sorted(set(backbones))
    if folder is not None:
        return [b for b in backbones if weights_file(folder, b) is None], f"not in {folder}"
    from huggingface_hub import constants

    uncached = {b: host for b in backbones for cached, host in [_hub_source(b)]
                if not cached and host}
    if not uncached:
        return [], ""
    if constants.HF_HUB_OFFLINE:
        return sorted(uncached), "HF_HUB_OFFLINE is set and they are not in the hub cache"
    down = {h for h in set(uncached.values()) if not _reachable(h)}
    missing = sorted(b for b, h in uncached.items() if h in down)
    return missing, f"not in the hub cache, and {', '.join(sorted(down))} cannot be reached"


def check_weights(backbones: Iterable[str], folder: Path | None, study: str = "NAME") -> None:
    """Raise one ``ConfigError`` naming every backbone without weights and both fixes."""
    missing, why = missing_weights(backbones, folder)
    if missing:
        raise ConfigError(
            f"pretrained weights missing for {', '.join(missing)} ({why}). Fix: on a machine "
            f"with internet run `python -m search.weights --study {study} --out DIR`, copy DIR "
            f"here and pass --weights DIR (or set ${WEIGHTS_ENV}); or fill the Hugging Face "
            "cache (HF_HOME) there and copy it; or pin backbones you have with --fix backbone=X")
