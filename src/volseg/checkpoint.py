"""Model and training-state files: safetensors tensors + JSON metadata, written atomically, no pickle.

A model file is self-describing (the whole `Config` rides in the safetensors header), so it can be
loaded by anyone without our code paths executing anything. Training state (optimizer buffers, RNG
streams, epoch) uses the same format so that `--resume` never unpickles either.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from volseg.config import Config
from volseg.errors import VolsegError
from volseg.model import UNet3d

MODEL_BEST = "model_best.safetensors"
MEMBER_PREFIX = "member_"  # member_<i>/: one of several models a run trained (`volseg train --members`)
MODEL_LAST = "model_last.safetensors"
TRAIN_STATE = "train_state.safetensors"
_CONFIG_KEY = "volseg_config"
_EXTRA_KEY = "volseg_extra"

_PICKLE_SIGNATURES = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write to a temporary sibling and rename, so a crash never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_model(path: str | Path, model: torch.nn.Module, cfg: Config, extra: dict[str, Any] | None = None) -> None:
    """Save weights + config (+ JSON-able `extra`, e.g. validation scores) as one safetensors file."""
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    meta = {_CONFIG_KEY: cfg.to_json(), _EXTRA_KEY: json.dumps(extra or {})}
    _atomic_save(dict(model.state_dict()), Path(path), meta)


def member_folder(run: Path, i: int) -> Path:
    """Where member `i` of a run that trains several models (`volseg train --members`) lives."""
    return run / f"{MEMBER_PREFIX}{i}"


def member_folders(run: Path) -> list[Path]:
    """The member folders of such a run, in member order (member_10 after member_9)."""
    found = [p for p in run.glob(f"{MEMBER_PREFIX}*") if p.is_dir() and p.name[len(MEMBER_PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(MEMBER_PREFIX):]))


def _own_model(folder: Path) -> Path | None:
    """A run folder's own model file: its best, else its last; None when it holds neither."""
    return next((folder / n for n in (MODEL_BEST, MODEL_LAST) if (folder / n).is_file()), None)


def resolve_model_path(path: str | Path) -> Path:
    """A run folder means its best model (else its last); a file means itself."""
    path = Path(path)
    if path.is_dir():
        own = _own_model(path)
        if own is not None:
            return own
        if member_folders(path):
            raise VolsegError(path, "holds several averaged models (member_*), not one",
                              f"name one of them, e.g. {path / 'member_0'}")
        raise VolsegError(path, "folder holds no model file", f"expected {MODEL_BEST} from `volseg train`")
    if not path.is_file():
        raise VolsegError(path, "model file not found")
    return path


def model_paths(path: str | Path) -> list[Path]:
    """The model files a run folder, member folder or file stands for: a run that trained several
    models (`volseg train --members`) means all of its members, to be averaged."""
    path = Path(path)
    if path.is_dir() and _own_model(path) is None and (members := member_folders(path)):
        return [resolve_model_path(m) for m in members]
    return [resolve_model_path(path)]


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file, refusing pickles before anything could be unpickled."""
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head.startswith(_PICKLE_SIGNATURES):
        raise VolsegError(
            path,
            "is a pickled PyTorch checkpoint; volseg refuses pickles because loading one can run arbitrary code",
            "convert the weights to safetensors in a trusted environment",
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise VolsegError(path, f"is not a readable safetensors file ({exc})") from None
    return tensors, meta


def read_model_file(path: str | Path) -> tuple[dict[str, torch.Tensor], Config, dict[str, Any]]:
    """Weights, config and extra metadata of a model file, without building the network."""
    path = resolve_model_path(path)
    tensors, meta = _read(path)
    if _CONFIG_KEY not in meta:
        raise VolsegError(path, "safetensors file has no volseg config", "was it written by `volseg train`?")
    cfg = Config.from_json(meta[_CONFIG_KEY], source=str(path))
    try:
        extra = json.loads(meta.get(_EXTRA_KEY, "{}"))
    except json.JSONDecodeError:
        extra = {}
    return tensors, cfg, extra


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Config]:
    """The plain `torch.nn.Module` (logits out, eval mode) and its config, from a file or run folder."""
    tensors, cfg, _ = read_model_file(path)
    model = UNet3d(cfg.model)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in tensors.items()}
    if expected != found:
        missing = sorted(set(expected) - set(found))
        unexpected = sorted(set(found) - set(expected))
        wrong = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
        raise VolsegError(
            resolve_model_path(path),
            "weights do not match the architecture in its config "
            f"(missing {len(missing)}, unexpected {len(unexpected)}, wrong shape {len(wrong)})",
        )
    model.load_state_dict(tensors)
    return model.to(device).eval(), cfg


def save_train_state(
    path: str | Path, optimizer: torch.optim.Optimizer, state: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> None:
    """Optimizer buffers + JSON scalars (epoch, RNG states, schedule) for crash-safe resume."""
    opt = optimizer.state_dict()
    flat: dict[str, torch.Tensor] = dict(tensors)
    scalars: dict[str, Any] = {}
    for pid, pstate in opt["state"].items():
        for key, value in pstate.items():
            if isinstance(value, torch.Tensor):
                flat[f"opt.{pid}.{key}"] = value
            else:
                scalars[f"{pid}.{key}"] = value
    meta = {"state": json.dumps(state), "opt_groups": json.dumps(opt["param_groups"]), "opt_scalars": json.dumps(scalars)}
    _atomic_save(flat, Path(path), meta)


def load_train_state(
    path: str | Path, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Restore optimizer buffers in place; return the JSON state and the non-optimizer tensors."""
    path = Path(path)
    tensors, meta = _read(path)
    try:
        state = json.loads(meta["state"])
        groups = json.loads(meta["opt_groups"])
        scalars = json.loads(meta["opt_scalars"])
    except (KeyError, json.JSONDecodeError):
        raise VolsegError(path, "is not a volseg training-state file") from None
    opt_state: dict[int, dict[str, Any]] = {}
    rest = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, pid, name = key.split(".", 2)
            opt_state.setdefault(int(pid), {})[name] = value
        else:
            rest[key] = value
    for key, value in scalars.items():
        pid, name = key.split(".", 1)
        opt_state.setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    return state, rest
