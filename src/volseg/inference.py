"""Whole-volume prediction: normalise, slide overlapping windows, blend, argmax, restore geometry.

`sliding_window` takes any `predictor` callable (windows in, logits out), so other networks can be
run through the same tiling and blending; it returns every class probability and is what training
validation uses. `sliding_window_labels` gives the same argmax in bounded memory (a ring buffer of
window rows, normalised on the fly), which is what `volseg predict` uses on large images.
`predict_volume` runs one model or an ensemble on a `Volume`; files and folders are
`volseg.prediction_files`.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from volseg import volumes
from volseg.config import Config
from volseg.errors import VolsegError
from volseg.model import valid_output_size
from volseg.preprocessing import (
    apply_normalization,
    decode_labels,
    needs_resampling,
    normalize,
    resample_image,
    resample_probabilities,
    zscore_mask_channels,
    zscore_masks,
)
from volseg.sampling import crop_pad, gaussian_importance, sliding_window_grid

Predictor = Callable[[torch.Tensor], torch.Tensor]
Prepare = Callable[[np.ndarray], np.ndarray]

_CHUNK_VOXELS = 1 << 22  # rows handled at once when gathering statistics or emitting results (16 MiB of float32)


def resolve_device(device: str = "auto") -> torch.device:
    """"auto" means the GPU when there is one; asking for CUDA without one is a clear error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise VolsegError(None, f"device {device!r} requested but no CUDA GPU is available", "use --device cpu")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise VolsegError(None, f"unknown device {device!r}", "use auto, cpu or cuda")
    return torch.device(device)


def output_window(cfg: Config, patch: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Output size per window and the margin cut off on each side (non-zero only with valid padding)."""
    out = tuple(valid_output_size(cfg.model, p, axis) for axis, p in enumerate(patch))
    if 0 in out:
        raise VolsegError(None, f"patch size {tuple(patch)} does not fit the network (depth {cfg.model.depth})")
    return out, tuple((p - o) // 2 for p, o in zip(patch, out))


def sliding_window(
    image: np.ndarray, predictor: Predictor, patch: Sequence[int], num_classes: int, **options: Any
) -> np.ndarray:
    """Class probabilities (num_classes, I, J, K) of a normalised (C, I, J, K) image.

    Windows of `patch` voxels overlap by `overlap`; each window's softmax is weighted by a Gaussian
    (or uniformly) and the weighted sum is divided by the summed weights. Volumes smaller than a
    window are zero-padded. With a valid-padding network, `out_patch` is the (smaller, centred)
    output of one `patch`-sized input and the grid tiles the output space. This is
    `sliding_window_labels` keeping every probability (one tiling and blending for both); the
    keyword `options` are its own (overlap, blend, batch_size, device, out_patch, progress, ...).
    """
    probs = np.empty((num_classes, *image.shape[1:]), dtype=np.float32)
    sliding_window_labels(image, predictor, patch, num_classes, probabilities=probs, **options)
    return probs


def _chunk_rows(shape: Sequence[int], per_voxel: int = 1) -> int:
    """Rows of an (I, J, K) volume per chunk: at most `_CHUNK_VOXELS` values and at most 1/8 of the volume."""
    row = int(np.prod(shape[1:])) * per_voxel
    return max(1, min(_CHUNK_VOXELS, int(np.prod(shape)) * per_voxel // 8) // max(row, 1))


def _zscore_stats(image: np.ndarray, c: int, mask_channels: slice | None) -> tuple[float, float] | None:
    """Mean and std (float64) of channel `c` over the voxels `zscore` would use; None if there are none.

    Two passes over chunks of rows, so neither a float64 copy nor a mask of the whole image is made.
    `mask_channels` None means every voxel; a slice means voxels where any of those channels is non-zero.
    """
    rows = _chunk_rows(image.shape[1:], 2)

    def values(a: int) -> np.ndarray:
        x = np.asarray(image[c, a : a + rows], dtype=np.float32)
        if mask_channels is None:
            return x.ravel()
        return x[np.any(np.asarray(image[mask_channels, a : a + rows], dtype=np.float32) != 0, axis=0)]

    total, count = 0.0, 0
    for a in range(0, image.shape[1], rows):
        v = values(a)
        total += float(v.sum(dtype=np.float64))
        count += v.size
    if count == 0:
        return None
    mean = total / count
    squares = 0.0
    for a in range(0, image.shape[1], rows):
        d = values(a).astype(np.float64) - mean
        squares += float(np.multiply(d, d, out=d).sum())
    return mean, math.sqrt(squares / count)


def slab_normalizer(image: np.ndarray, methods: str | Sequence[str], stats: Sequence[Sequence[float]] = ()) -> Prepare:
    """A function normalising any rows `image[:, a:b]` as `normalize(image, methods, stats)[:, a:b]` would.

    Z-score statistics are global, so they are gathered here once, chunk by chunk (float64 sums,
    no copy of the image); the returned function then needs only the rows it is given. This is what
    lets prediction skip the full-size float32 copy that `normalize` makes (and its float64
    temporaries). The statistics agree with `normalize`'s to float64 rounding, the results to
    float32 rounding; "ct" and "none" are voxel-wise and agree exactly.

    >>> image = np.arange(24, dtype=np.float32).reshape(1, 4, 3, 2)
    >>> norm = slab_normalizer(image, "zscore")
    >>> bool(np.allclose(norm(image[:, 1:3]), normalize(image, "zscore")[:, 1:3]))
    True
    """
    normalize(image[:, :1, :1, :1], methods, stats)  # the same validation and errors as the whole image
    names = [methods] * image.shape[0] if isinstance(methods, str) else list(methods)
    mask_channels = zscore_mask_channels(names)
    channel_stats: list[Sequence[float] | None] = []
    for c, name in enumerate(names):
        if name in ("zscore", "zscore_nonzero"):
            channel_stats.append(_zscore_stats(image, c, mask_channels[c]))
        else:
            channel_stats.append(stats[c] if name == "ct" else None)

    def prepare(rows: np.ndarray) -> np.ndarray:
        out = np.empty(rows.shape, dtype=np.float32)
        step = max(1, _CHUNK_VOXELS // max(1, 2 * rows.shape[2] * rows.shape[3]))  # float64 temporaries: a few rows
        for a in range(0, rows.shape[1], step):
            part = rows[:, a : a + step]
            apply_normalization(part, names, channel_stats, zscore_masks(part, mask_channels), out[:, a : a + step])
        return out

    return prepare


def _ring_pieces(start: int, count: int, size: int) -> list[tuple[slice, slice]]:
    """(ring-buffer slots, offsets from `start`) of rows [start, start + count) in a ring of `size` rows.

    >>> _ring_pieces(5, 4, 6)
    [(slice(5, 6, None), slice(0, 1, None)), (slice(0, 3, None), slice(1, 4, None))]
    """
    first = start % size
    n = min(count, size - first)
    pieces = [(slice(first, first + n), slice(0, n))]
    if count > n:
        pieces.append((slice(0, count - n), slice(n, count)))
    return pieces


def _zeros(shape: tuple[int, ...], device: torch.device | str) -> torch.Tensor:
    """Zeros allocated by numpy on the CPU (so tracemalloc sees them), moved to `device` if needed."""
    return torch.from_numpy(np.zeros(shape, dtype=np.float32)).to(device)


@torch.inference_mode()
def sliding_window_labels(
    image: np.ndarray,
    predictor: Predictor | Sequence[Predictor],
    patch: Sequence[int],
    num_classes: int,
    overlap: float = 0.5,
    blend: str = "gaussian",
    batch_size: int = 2,
    device: torch.device | str = "cpu",
    out_patch: Sequence[int] | None = None,
    progress: bool = False,
    prepare: Prepare | Sequence[Prepare | None] | None = None,
    probabilities: np.ndarray | None = None,
    skip_empty: bool = False,
) -> np.ndarray:
    """Class indices (I, J, K) of a (C, I, J, K) image: `sliding_window(...).argmax(0)` in bounded memory.

    The windows (the same grid, batches and blending as `sliding_window`) run in the order of
    their start along I, and the weighted softmax is summed only in a ring buffer of
    `out_patch[0]` rows. As soon as no later window touches a row it is normalised, reduced to its
    argmax (uint8 up to 256 classes) and, when `probabilities` is given (an array or memmap of
    shape (num_classes, I, J, K), any float dtype), written there. So memory is a few slabs of rows,
    never a float32 volume per class, and the results equal `sliding_window`'s voxel for voxel.

    `predictor` may be a list (an ensemble): each window's softmax is averaged over them before
    blending. `prepare` (one function, or one per predictor; None = use the image as is) turns
    rows `image[:, a:b]` into network input, e.g. `slab_normalizer`; it must work voxel by voxel.

    `skip_empty`: a window whose input `image` (before `prepare`) is zero everywhere, e.g. the
    air around a scan that was set to 0 or the padding of a cropped volume, is not run; it counts
    as certain background (class 0) with its usual weight. Saves the network's time outside the
    object; changes the result only where the network would not have said background there.

    >>> two_class = lambda x: torch.cat([torch.zeros_like(x), x], dim=1)
    >>> image = np.array([-1.0, 2.0, -3.0, 4.0, 5.0], np.float32).reshape(1, 5, 1, 1)
    >>> sliding_window_labels(image, two_class, (2, 1, 1), 2).ravel().tolist()
    [0, 1, 0, 1, 1]
    """
    predictors, prepares = _window_callables(predictor, prepare, blend, overlap)
    patch = tuple(int(p) for p in patch)
    out_patch = patch if out_patch is None else tuple(int(p) for p in out_patch)
    shape = tuple(int(s) for s in image.shape[1:])
    if probabilities is not None and tuple(probabilities.shape) != (num_classes, *shape):
        raise VolsegError(None, f"probabilities must have shape {(num_classes, *shape)}, got {probabilities.shape}")
    padded = tuple(max(s, o) for s, o in zip(shape, out_patch))
    weight = gaussian_importance(out_patch) if blend == "gaussian" else np.ones(out_patch, np.float32)
    weight_t = torch.from_numpy(weight).to(device)
    blended = _BlendedRows(num_classes, out_patch, padded, shape, device, probabilities)
    inputs = _WindowInputs(image, prepares, patch, out_patch, padded != shape)
    starts = sliding_window_grid(padded, out_patch, overlap)
    background = None
    if skip_empty:
        background = torch.zeros((num_classes, *out_patch), dtype=torch.float32, device=device)
        background[0] = 1

    iterator = range(0, len(starts), batch_size)
    for pred in predictors:  # a WindowRunner decides from this whether compiling pays
        if hasattr(pred, "expect"):
            pred.expect(len(iterator))
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc="windows", leave=False, unit="batch", disable=None)
    for b in iterator:
        batch_starts = starts[b : b + batch_size]
        live = [st for st in batch_starts if not skip_empty or inputs.has_signal(st)]
        by_start = _window_softmax(live, predictors, inputs, device)
        for st in batch_starts:
            if st[0] > blended.done:  # windows come in the order of their row start: rows before it are final
                blended.finish(st[0])
                inputs.forget_rows_before(st[0])
            blended.add(st, by_start.get(st, background), weight_t)  # skipped: certain background
    blended.finish(padded[0])
    return blended.labels


def _window_callables(
    predictor: Predictor | Sequence[Predictor], prepare: Prepare | Sequence[Prepare | None] | None, blend: str,
    overlap: float,
) -> tuple[list[Predictor], list[Prepare | None]]:
    """The predictors (an ensemble, or one) and one prepare function each, with the blending checked."""
    if blend not in ("gaussian", "uniform"):
        raise VolsegError(None, f"unknown blending {blend!r}", "use gaussian or uniform")
    if not 0 <= overlap < 1:
        raise VolsegError(None, f"overlap must be in [0, 1), got {overlap}")
    predictors = list(predictor) if isinstance(predictor, (list, tuple)) else [predictor]
    prepares = list(prepare) if isinstance(prepare, (list, tuple)) else [prepare] * len(predictors)
    if not predictors or len(prepares) != len(predictors):
        raise VolsegError(None, f"{len(predictors)} predictor(s) but {len(prepares)} prepare function(s)")
    return predictors, prepares


def _window_softmax(
    starts: list[tuple[int, int, int]], predictors: list[Predictor], inputs: _WindowInputs, device: torch.device | str
) -> dict[tuple[int, int, int], torch.Tensor]:
    """Softmax (num_classes, *out_patch) of the windows at `starts`, averaged over the predictors."""
    if not starts:
        return {}
    probs = None
    for kind, pred in zip(inputs.kinds, predictors):
        x = torch.from_numpy(np.stack([inputs.tile(kind, st) for st in starts])).to(device)
        p = torch.softmax(pred(x).float(), dim=1)
        probs = p if probs is None else probs + p
    if len(predictors) > 1:
        probs /= len(predictors)
    return dict(zip(starts, probs))


class _WindowInputs:
    """The network input of each window, cut from input rows prepared once per (prepare function, window row)."""

    def __init__(
        self, image: np.ndarray, prepares: list[Prepare | None], patch: tuple[int, ...], out_patch: tuple[int, ...],
        padded: bool,
    ) -> None:
        self.image, self.prepares, self.patch = image, prepares, patch
        self.margin = [(p - o) // 2 for p, o in zip(patch, out_patch)]
        self.needs_padding = any(self.margin) or padded  # windows reach outside the image: cut with zero padding
        # a prepare function shared by several predictors prepares their rows once
        self.kinds = [next(i for i, q in enumerate(prepares) if q is p) for p in prepares]
        # (prepare, window row) -> (first row, input rows)
        self.slabs: dict[tuple[int, int], tuple[int, np.ndarray]] = {}

    def tile(self, kind: int, st: tuple[int, int, int]) -> np.ndarray:
        patch, margin = self.patch, self.margin
        if (kind, st[0]) not in self.slabs:
            lo, hi = max(0, st[0] - margin[0]), min(self.image.shape[1], st[0] - margin[0] + patch[0])
            rows = self.image[:, lo:hi] if self.prepares[kind] is None else self.prepares[kind](self.image[:, lo:hi])
            self.slabs[kind, st[0]] = (lo, np.asarray(rows, dtype=np.float32))
        lo, rows = self.slabs[kind, st[0]]
        begin = (st[0] - margin[0] - lo, st[1] - margin[1], st[2] - margin[2])
        if self.needs_padding:
            return crop_pad(rows, begin, patch)
        return rows[(slice(None), *(slice(b, b + p) for b, p in zip(begin, patch)))]

    def forget_rows_before(self, row: int) -> None:
        """Drop the prepared rows of windows starting before `row`: no later window uses them."""
        self.slabs = {key: value for key, value in self.slabs.items() if key[1] >= row}

    def has_signal(self, st: tuple[int, int, int]) -> bool:
        """Any non-zero input voxel in the window (cut to the image)?"""
        region = tuple(slice(max(0, s - m), max(0, s - m + p)) for s, m, p in zip(st, self.margin, self.patch))
        return bool(np.any(self.image[(slice(None), *region)]))


class _BlendedRows:
    """The weighted softmax of the windows, summed in a ring buffer of `out_patch[0]` rows.

    Rows [done, done + ring) are the only ones a pending window can still touch; `finish` turns
    the rows before a given one into labels (and probabilities) and frees their slots.
    """

    def __init__(
        self, num_classes: int, out_patch: tuple[int, ...], padded: tuple[int, ...], shape: tuple[int, ...],
        device: torch.device | str, probabilities: np.ndarray | None,
    ) -> None:
        self.out_patch, self.shape, self.probabilities = out_patch, shape, probabilities
        self.ring = out_patch[0]
        self.acc = _zeros((num_classes, self.ring, *padded[1:]), device)
        self.norm = _zeros((self.ring, *padded[1:]), device)
        self.labels = np.zeros(shape, dtype=np.uint8 if num_classes <= 256 else np.int16)
        self.emit_rows = max(1, _CHUNK_VOXELS // max(1, num_classes * shape[1] * shape[2]))
        self.done = 0  # padded rows before this one are finished

    def add(self, st: tuple[int, int, int], p: torch.Tensor, weight_t: torch.Tensor) -> None:
        """Add one window's softmax `p`, weighted, at its output position `st`."""
        jk = (slice(st[1], st[1] + self.out_patch[1]), slice(st[2], st[2] + self.out_patch[2]))
        for slots, offsets in _ring_pieces(st[0], self.out_patch[0], self.ring):
            self.acc[(slice(None), slots, *jk)] += p[:, offsets] * weight_t[offsets]
            self.norm[(slots, *jk)] += weight_t[offsets]

    def finish(self, stop: int) -> None:
        """Finish padded rows [done, stop): divide by the summed weights, argmax, clear their slots."""
        first, shape = self.done, self.shape
        for a in range(first, min(stop, shape[0]), self.emit_rows):
            b = min(a + self.emit_rows, stop, shape[0])
            for slots, offsets in _ring_pieces(a, b - a, self.ring):
                block = self.acc[:, slots, : shape[1], : shape[2]] / self.norm[slots, : shape[1], : shape[2]]
                block = block.cpu().numpy()
                rows = slice(a + offsets.start, a + offsets.stop)
                self.labels[rows] = block.argmax(0)
                if self.probabilities is not None:
                    self.probabilities[:, rows] = block
        for slots, _ in _ring_pieces(first, stop - first, self.ring):
            self.acc[:, slots] = 0
            self.norm[slots] = 0
        self.done = stop


def resampled_argmax(
    probs: np.ndarray, out_shape: Sequence[int], probabilities: np.ndarray | None = None
) -> np.ndarray:
    """Argmax (I, J, K) of (C, ...) class probabilities linearly resampled to `out_shape`.

    Equals `resample_probabilities(probs, out_shape).argmax(0)` (ties go to the lower class), but
    resamples one class at a time and keeps only the best probability so far and the labels, not
    C float32 volumes. `probabilities` (C, *out_shape), any float dtype, receives each class.

    >>> p = np.array([0.9, 0.2, 0.1, 0.8], np.float32).reshape(2, 1, 1, 2)
    >>> resampled_argmax(p, (1, 1, 4)).ravel().tolist()
    [0, 0, 1, 1]
    """
    out_shape = tuple(int(s) for s in out_shape)
    labels = np.zeros(out_shape, dtype=np.uint8 if probs.shape[0] <= 256 else np.int16)
    best = None
    for c in range(probs.shape[0]):
        p = resample_probabilities(probs[c : c + 1], out_shape)[0]
        if probabilities is not None:
            probabilities[c] = p
        if best is None:
            best = np.array(p, dtype=np.float32)  # a copy: `p` may be a view of `probs`
            continue
        better = p > best
        labels[better] = c
        np.maximum(best, p, out=best)
    return labels


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """Reduced precision for CUDA: bf16 where the GPU has it, else fp16 (e.g. T4, V100, whose
    autocast refuses bf16); None (plain fp32) on the CPU, which has no fast half-precision convs."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def make_predictor(model: torch.nn.Module, device: torch.device) -> Predictor:
    """Forward under autocast on CUDA (fp16/bf16 tensor cores); plain fp32 on the CPU."""
    model = model.to(device).eval()
    dtype = autocast_dtype(device)
    if dtype is not None:

        def predict(x: torch.Tensor) -> torch.Tensor:
            with torch.autocast("cuda", dtype=dtype):
                return model(x)

        return predict
    return model


COMPILE_MODES = ("auto", "on", "off")
COMPILE_PAYS_S = 90.0  # "auto" compiles when the uncompiled windows ahead would take at least this long


def mirror_axes_combinations(axes: Sequence[int] = (0, 1, 2)) -> list[tuple[int, ...]]:
    """Every non-empty set of spatial axes to flip (7 for 3 axes), as tensor dims of (B, C, I, J, K).

    >>> mirror_axes_combinations((0, 2))
    [(2,), (4,), (2, 4)]
    """
    dims = [a + 2 for a in axes]
    return [c for n in range(1, len(dims) + 1) for c in itertools.combinations(dims, n)]


class WindowRunner:
    """The network on batches of windows, run the fastest way this machine allows.

    Eager PyTorch first. On the CPU, `torch.compile` (inductor, weights frozen into the graph,
    channels-last) runs the same network 1.5-1.8x faster (benchmarks/inference.py) but takes
    15-50 s to compile the first time (inductor caches on disk, later processes are quicker). So
    with `compile="auto"` the first batch of each pass runs eager and is timed; when the batches
    still ahead (`expect`) would take longer than `COMPILE_PAYS_S` uncompiled, the network is
    compiled once and kept for every later case of the run. "on" compiles at the first batch, "off" never.
    Compiling needs a C++ compiler; if it fails, prediction goes on uncompiled with a warning.
    The compiled network always gets full batches (the last one is zero-padded) so it never
    recompiles for a new shape. `mirror` averages the logits of all 8 flips (test-time augmentation).
    """

    def __init__(
        self, model: torch.nn.Module, device: torch.device | str, batch_size: int, compile: str = "auto",
        mirror: bool = False, verbose: bool = False,
    ) -> None:
        if compile not in COMPILE_MODES:
            raise VolsegError(None, f"unknown compile mode {compile!r}", f"use one of {', '.join(COMPILE_MODES)}")
        self.device = torch.device(device)
        self.eager = make_predictor(model, self.device)
        self.model = model
        self.batch_size = max(1, int(batch_size))
        # inductor needs Triton on a GPU (not part of every install): compile on the CPU only
        self.compile = compile if self.device.type == "cpu" else "off"
        self.mirror = mirror
        self.verbose = verbose  # say so on stderr before the compile pause
        self.compiled: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.batches_left = 0
        self._timed = False
        self.compile_seconds = 0.0

    def expect(self, batches: int) -> None:
        """How many batches the coming pass will ask for (lets "auto" weigh compiling)."""
        self.batches_left = int(batches)
        self._timed = False  # "auto": time this pass's first batch (a small case may precede a large one)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.compiled is None and self.compile == "on":
            self._compile(x)
        if self.compiled is not None:
            out = self._forward(self._run_compiled, x)
        else:
            t = time.perf_counter()
            out = self._forward(self.eager, x)
            spent = time.perf_counter() - t
            if self.compile == "auto" and not self._timed:
                self._timed = True
                if spent * (self.batches_left - 1) >= COMPILE_PAYS_S:
                    self._compile(x)
        self.batches_left -= 1
        return out

    def _forward(self, net: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        out = net(x)
        if self.mirror:
            out = out.float()
            for dims in mirror_axes_combinations():
                out += torch.flip(net(torch.flip(x, dims)), dims).float()
            out /= 1 + len(mirror_axes_combinations())
        return out

    def _run_compiled(self, x: torch.Tensor) -> torch.Tensor:
        """Always `batch_size` windows at a time (zero-padded), the one shape it was compiled for."""
        outs = []
        for part in torch.split(x, self.batch_size):
            n = part.shape[0]
            if n < self.batch_size:
                part = torch.cat([part, part.new_zeros((self.batch_size - n, *part.shape[1:]))])
            outs.append(self.compiled(part.contiguous(memory_format=torch.channels_last_3d))[:n])
        return torch.cat(outs).contiguous()

    def _compile(self, x: torch.Tensor) -> None:
        """Compile a channels-last copy with frozen weights; on any failure stay eager (with a warning)."""
        import copy
        import warnings

        import torch._inductor.config as inductor_config

        self.compile = "done"
        if self.verbose:
            import sys

            print("compiling the network for this CPU (once per run; 15-50 s)", file=sys.stderr, flush=True)
        t = time.perf_counter()
        try:
            net = copy.deepcopy(self.model).eval().to(memory_format=torch.channels_last_3d)
            compiled = torch.compile(net, dynamic=False)
            probe = torch.zeros((self.batch_size, *x.shape[1:]), dtype=x.dtype, device=x.device)
            with inductor_config.patch(freezing=True), torch.inference_mode():
                compiled(probe.contiguous(memory_format=torch.channels_last_3d))
        except Exception as exc:  # no compiler, unsupported op, ...: the eager network still works
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            warnings.warn(f"torch.compile failed ({first}); predicting uncompiled", RuntimeWarning, stacklevel=3)
            return
        self.compiled = compiled
        self.compile_seconds = time.perf_counter() - t


def predict_probabilities(
    model: torch.nn.Module, cfg: Config, image: np.ndarray, device: torch.device | str = "cpu", progress: bool = False,
    predictor: Predictor | None = None,
    skip_empty: bool = False,
) -> np.ndarray:
    """Class probabilities of a raw (C, I, J, K) image, normalised as in training (row by row).

    `predictor` (e.g. a `WindowRunner`) runs the windows instead of the plain model; `skip_empty`
    as in `sliding_window_labels` (judged on the raw image)."""
    if image.shape[0] != cfg.model.in_channels:
        raise VolsegError(None, f"image has {image.shape[0]} channels, the model expects {cfg.model.in_channels}")
    device = torch.device(device)
    probs = np.empty((cfg.model.num_classes, *image.shape[1:]), dtype=np.float32)
    sliding_window_labels(
        image,
        predictor if predictor is not None else make_predictor(model, device),
        device=device,
        progress=progress,
        prepare=slab_normalizer(image, cfg.data.channel_methods, cfg.data.intensity_stats),
        probabilities=probs,
        skip_empty=skip_empty,
        **window_options(cfg),
    )
    return probs


def probabilities_on_input_grid(
    model: torch.nn.Module, cfg: Config, volume: volumes.Volume, device: torch.device | str = "cpu",
    predictor: Predictor | None = None,
    skip_empty: bool = False,
) -> np.ndarray:
    """Class probabilities (C, I, J, K) on the input's own voxel grid.

    An image whose spacing differs from the training spacing is resampled to it, predicted there,
    and the probabilities are resampled back to the input grid.
    """
    image = volume.array
    resample = cfg.data.spacing is not None and needs_resampling(volume.spacing, cfg.data.spacing)
    if resample:
        image = resample_image(image, volume.spacing, cfg.data.spacing)
    probs = predict_probabilities(model, cfg, image, device, predictor=predictor, skip_empty=skip_empty)
    if resample:
        probs = resample_probabilities(probs, volume.shape)
    return probs


def window_options(cfg: Config) -> dict[str, Any]:
    """The model's windows as `sliding_window(_labels)` keywords: patch, classes, overlap, blending, batch."""
    out_patch, _ = output_window(cfg, cfg.train.patch_size)
    return {"patch": cfg.train.patch_size, "num_classes": cfg.model.num_classes, "overlap": cfg.infer.overlap,
            "blend": cfg.infer.blend, "batch_size": cfg.infer.batch_size, "out_patch": out_patch}


def _window_settings(cfg: Config) -> tuple:
    """What must agree for models to share one sliding-window pass (the folds of one plan do)."""
    patch = tuple(cfg.train.patch_size)
    return (patch, output_window(cfg, patch), cfg.infer.overlap, cfg.infer.blend, cfg.model.num_classes,
            cfg.data.spacing)


def predict_volume(
    model: torch.nn.Module | Sequence[torch.nn.Module],
    cfg: Config | Sequence[Config],
    volume: volumes.Volume,
    device: torch.device | str = "cpu",
    probabilities: np.ndarray | None = None,
    progress: bool = False,
    runners: Sequence[WindowRunner] | None = None,
    skip_empty: bool = False,
) -> np.ndarray:
    """Segmentation (I, J, K) in the dataset's label values, on the input's voxel grid.

    Several models (cross-validation folds) are an ensemble: their probabilities are averaged
    before the argmax. Models with the same window settings and training spacing run in one
    `sliding_window_labels` pass (window by window), normalising rows on the fly: on the training
    spacing, memory is the image, the labels and a few slabs of rows. An image at another spacing
    is resampled to it, predicted there into one float32 volume per class, and those are resampled
    back one class at a time (`resampled_argmax`). `probabilities` (num_classes, I, J, K), any float
    dtype, receives the averaged class probabilities on the input grid. `runners` (one
    `WindowRunner` per model, kept across the cases of a run) choose compilation and mirroring;
    by default each model runs eager, as it is. `skip_empty`: see `sliding_window_labels`.
    """
    models = list(model) if isinstance(model, (list, tuple)) else [model]
    cfgs = list(cfg) if isinstance(cfg, (list, tuple)) else [cfg] * len(models)
    if not models or len(cfgs) != len(models):
        raise VolsegError(None, f"{len(models)} model(s) but {len(cfgs)} config(s)")
    for c in cfgs:
        if volume.array.shape[0] != c.model.in_channels:
            raise VolsegError(None, f"image has {volume.array.shape[0]} channels, the model expects {c.model.in_channels}")
    first = cfgs[0]
    if len({_window_settings(c) for c in cfgs}) > 1:  # cannot share windows: whole volumes, as before
        preds = list(runners) if runners is not None else [None] * len(models)
        probs = probabilities_on_input_grid(models[0], first, volume, device, preds[0], skip_empty)
        for m, c, r in zip(models[1:], cfgs[1:], preds[1:]):
            probs += probabilities_on_input_grid(m, c, volume, device, r, skip_empty)
        if probabilities is not None:
            probabilities[...] = probs / len(models)
        return decode_labels(probs.argmax(0), first.data.class_values)
    resample = first.data.spacing is not None and needs_resampling(volume.spacing, first.data.spacing)
    image = resample_image(volume.array, volume.spacing, first.data.spacing) if resample else volume.array
    normalizers: dict[tuple, Prepare] = {}  # folds of one plan share their statistics and input rows
    for c in cfgs:
        key = (c.data.channel_methods, c.data.intensity_stats)
        if key not in normalizers:
            normalizers[key] = slab_normalizer(image, *key)
    grid_probs = np.empty((first.model.num_classes, *image.shape[1:]), np.float32) if resample else probabilities
    index = sliding_window_labels(
        image,
        list(runners) if runners is not None else [make_predictor(m, torch.device(device)) for m in models],
        device=device,
        progress=progress,
        prepare=[normalizers[c.data.channel_methods, c.data.intensity_stats] for c in cfgs],
        probabilities=grid_probs,
        skip_empty=skip_empty,
        **window_options(first),
    )
    if resample:
        del image, index
        index = resampled_argmax(grid_probs, volume.shape, probabilities)
    return decode_labels(index, first.data.class_values)


def load_ensemble(
    model_paths: str | Path | Sequence[str | Path], device: torch.device
) -> tuple[list[torch.nn.Module], list[Config]]:
    """Load one or several models; an ensemble must agree on channels, labels and file ending."""
    from volseg.checkpoint import load_model, model_paths as expand

    given = [model_paths] if isinstance(model_paths, (str, Path)) else list(model_paths)
    paths = [p for g in given for p in expand(g)]  # a run of several members stands for each of them
    if not paths:
        raise VolsegError(None, "no model given", "pass -m RUN_OR_MODEL (repeat -m for an ensemble)")
    models, cfgs = [], []
    for path in paths:
        model, cfg = load_model(path, device)
        if cfgs:
            first = cfgs[0].data
            if (cfg.data.class_values, cfg.data.channel_names, cfg.model.in_channels) != (
                first.class_values, first.channel_names, cfgs[0].model.in_channels
            ):
                raise VolsegError(path, "cannot join the ensemble: its channels or labels differ from the first model's")
        models.append(model)
        cfgs.append(cfg)
    return models, cfgs
