"""Whole-volume prediction: normalise, slide overlapping windows, blend, argmax, restore geometry.

`sliding_window` takes any `predictor` callable (windows in, logits out), so other networks can be
run through the same tiling and blending; it returns every class probability and is what training
validation uses. `sliding_window_labels` gives the same argmax in bounded memory (a ring buffer of
window rows, normalised on the fly), which is what `volseg predict` uses on large images.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from volseg import io
from volseg.config import Config
from volseg.errors import VolsegError
from volseg.model import valid_output_size
from volseg.postprocessing import keep_largest_component, remove_small_components
from volseg.preprocessing import (
    apply_zscore,
    ct_normalize,
    decode_labels,
    needs_resampling,
    normalize,
    resample_image,
    resample_probabilities,
)
from volseg.sampling import crop_pad, gaussian_importance, sliding_window_grid

Predictor = Callable[[torch.Tensor], torch.Tensor]
Prepare = Callable[[np.ndarray], np.ndarray]

_CHUNK_VOXELS = 1 << 22  # rows handled at once when gathering statistics or emitting results (16 MiB of float32)
PROBABILITIES_FOLDER = "probabilities"  # `--save-probabilities` writes <output folder>/probabilities/<case>.nii.gz


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
    shared = len(set(names)) == 1 and names[0] in ("zscore", "zscore_nonzero")  # one mask for every channel
    params: list[tuple[str, slice | None, tuple[float, float] | None]] = []
    for c, name in enumerate(names):
        scope = None
        if name == "zscore_nonzero":
            scope = slice(None) if shared else slice(c, c + 1)
        stat = _zscore_stats(image, c, scope) if name in ("zscore", "zscore_nonzero") else None
        params.append((name, scope, stat))

    def prepare(rows: np.ndarray) -> np.ndarray:
        out = np.empty(rows.shape, dtype=np.float32)
        step = max(1, _CHUNK_VOXELS // max(1, 2 * rows.shape[2] * rows.shape[3]))  # float64 temporaries: a few rows
        for a in range(0, rows.shape[1], step):
            part = rows[:, a : a + step]
            for c, (name, scope, stat) in enumerate(params):
                if name == "none":
                    out[c, a : a + step] = part[c]
                elif name == "ct":
                    out[c, a : a + step] = ct_normalize(part[c], *stats[c])
                elif stat is None:  # no voxel to take statistics from: all zeros, as `zscore` returns
                    out[c, a : a + step] = 0
                else:  # the float64 arithmetic of `zscore`: float32 voxels minus a float64 mean
                    mask = None if scope is None else np.any(np.asarray(part[scope], dtype=np.float32) != 0, axis=0)
                    out[c, a : a + step] = apply_zscore(np.asarray(part[c], dtype=np.float32), *stat, mask)
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
    if blend not in ("gaussian", "uniform"):
        raise VolsegError(None, f"unknown blending {blend!r}", "use gaussian or uniform")
    if not 0 <= overlap < 1:
        raise VolsegError(None, f"overlap must be in [0, 1), got {overlap}")
    predictors = list(predictor) if isinstance(predictor, (list, tuple)) else [predictor]
    prepares = list(prepare) if isinstance(prepare, (list, tuple)) else [prepare] * len(predictors)
    if not predictors or len(prepares) != len(predictors):
        raise VolsegError(None, f"{len(predictors)} predictor(s) but {len(prepares)} prepare function(s)")
    patch = tuple(int(p) for p in patch)
    out_patch = patch if out_patch is None else tuple(int(p) for p in out_patch)
    margin = [(p - o) // 2 for p, o in zip(patch, out_patch)]
    shape = tuple(int(s) for s in image.shape[1:])
    if probabilities is not None and tuple(probabilities.shape) != (num_classes, *shape):
        raise VolsegError(None, f"probabilities must have shape {(num_classes, *shape)}, got {probabilities.shape}")
    padded = tuple(max(s, o) for s, o in zip(shape, out_patch))
    weight = gaussian_importance(out_patch) if blend == "gaussian" else np.ones(out_patch, np.float32)
    weight_t = torch.from_numpy(weight).to(device)
    ring = out_patch[0]  # rows [done, done + ring) are the only ones any pending window can still touch
    acc = _zeros((num_classes, ring, *padded[1:]), device)
    norm = _zeros((ring, *padded[1:]), device)
    labels = np.zeros(shape, dtype=np.uint8 if num_classes <= 256 else np.int16)
    starts = sliding_window_grid(padded, out_patch, overlap)
    needs_padding = any(margin) or padded != shape
    kinds = [next(i for i, q in enumerate(prepares) if q is p) for p in prepares]  # shared prepare -> shared rows
    slabs: dict[tuple[int, int], tuple[int, np.ndarray]] = {}  # (prepare, window row) -> (first row, input rows)
    emit_rows = max(1, _CHUNK_VOXELS // max(1, num_classes * shape[1] * shape[2]))

    def tile(kind: int, st: tuple[int, int, int]) -> np.ndarray:
        if (kind, st[0]) not in slabs:
            lo, hi = max(0, st[0] - margin[0]), min(shape[0], st[0] - margin[0] + patch[0])
            rows = image[:, lo:hi] if prepares[kind] is None else prepares[kind](image[:, lo:hi])
            slabs[kind, st[0]] = (lo, np.asarray(rows, dtype=np.float32))
        lo, rows = slabs[kind, st[0]]
        begin = (st[0] - margin[0] - lo, st[1] - margin[1], st[2] - margin[2])
        if needs_padding:  # windows reach outside the image: cut with zero padding
            return crop_pad(rows, begin, patch)
        return rows[(slice(None), *(slice(b, b + p) for b, p in zip(begin, patch)))]

    def emit(first: int, stop: int) -> None:
        """Finish padded rows [first, stop): divide by the summed weights, argmax, clear their slots."""
        for a in range(first, min(stop, shape[0]), emit_rows):
            b = min(a + emit_rows, stop, shape[0])
            for slots, offsets in _ring_pieces(a, b - a, ring):
                block = (acc[:, slots, : shape[1], : shape[2]] / norm[slots, : shape[1], : shape[2]]).cpu().numpy()
                rows = slice(a + offsets.start, a + offsets.stop)
                labels[rows] = block.argmax(0)
                if probabilities is not None:
                    probabilities[:, rows] = block
        for slots, _ in _ring_pieces(first, stop - first, ring):
            acc[:, slots] = 0
            norm[slots] = 0

    background = None
    if skip_empty:
        background = torch.zeros((num_classes, *out_patch), dtype=torch.float32, device=device)
        background[0] = 1

    def has_signal(st: tuple[int, int, int]) -> bool:
        """Any non-zero input voxel in the window (cut to the image)?"""
        region = tuple(slice(max(0, s - m), max(0, s - m + p)) for s, m, p in zip(st, margin, patch))
        return bool(np.any(image[(slice(None), *region)]))

    iterator = range(0, len(starts), batch_size)
    for pred in predictors:  # a WindowRunner decides from this whether compiling pays
        if hasattr(pred, "expect"):
            pred.expect(len(iterator))
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc="windows", leave=False, unit="batch", disable=None)
    done = 0  # padded rows before this one are finished
    for b in iterator:
        batch_starts = starts[b : b + batch_size]
        live = [st for st in batch_starts if not skip_empty or has_signal(st)]
        probs = None
        for kind, pred in zip(kinds, predictors) if live else ():
            x = torch.from_numpy(np.stack([tile(kind, st) for st in live])).to(device)
            p = torch.softmax(pred(x).float(), dim=1)
            probs = p if probs is None else probs + p
        if live and len(predictors) > 1:
            probs /= len(predictors)
        by_start = dict(zip(live, probs)) if live else {}
        for st in batch_starts:
            p = by_start.get(st)
            if p is None:  # skipped: certain background
                p = background
            if st[0] > done:  # windows come in the order of their row start: rows before it are final
                emit(done, st[0])
                done = st[0]
                slabs = {key: value for key, value in slabs.items() if key[1] >= done}
            jk = (slice(st[1], st[1] + out_patch[1]), slice(st[2], st[2] + out_patch[2]))
            for slots, offsets in _ring_pieces(st[0], out_patch[0], ring):
                acc[(slice(None), slots, *jk)] += p[:, offsets] * weight_t[offsets]
                norm[(slots, *jk)] += weight_t[offsets]
    emit(done, padded[0])
    return labels


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
    model: torch.nn.Module, cfg: Config, volume: io.Volume, device: torch.device | str = "cpu",
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
    volume: io.Volume,
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


def clean_segmentation(
    seg: np.ndarray,
    spacing: Sequence[float],
    class_values: Sequence[int],
    min_size_voxels: int = 0,
    min_size_mm3: float = 0.0,
    keep_largest: bool = False,
) -> np.ndarray:
    """Post-process a segmentation in label values: per class, drop small components, keep the largest.

    Components are 26-connected and per label value (`volseg.postprocessing`); removed voxels
    become background 0, so 0 must be one of `class_values`. Sizes in mm³ use `spacing`.

    >>> seg = np.zeros((1, 1, 6), np.uint8); seg[0, 0, :2] = 1; seg[0, 0, 4] = 1
    >>> clean_segmentation(seg, (1.0, 1.0, 2.0), (0, 1), min_size_mm3=3.0)[0, 0].tolist()
    [1, 1, 0, 0, 0, 0]
    """
    if not min_size_voxels and not min_size_mm3 and not keep_largest:
        return seg
    if 0 not in class_values:
        raise VolsegError(None, "post-processing sets removed voxels to background 0, which is not a class of this model")
    foreground = [v for v in class_values if v != 0]
    if min_size_voxels or min_size_mm3:
        seg = remove_small_components(seg, int(min_size_voxels), float(min_size_mm3), spacing, foreground)
    if keep_largest:
        seg = keep_largest_component(seg, foreground)
    return seg


def probabilities_path(target: str | Path) -> Path:
    """Where `--save-probabilities` puts a case's probabilities: a `probabilities/` folder beside it.

    A folder of its own keeps `volseg evaluate` (which scores every `*<ending>` file of the output
    folder) from mistaking them for segmentations.

    >>> probabilities_path("out/case_007.mha").as_posix()
    'out/probabilities/case_007.nii.gz'
    """
    target = Path(target)
    stem = target.name
    for end in _IMAGE_ENDINGS:
        if stem.endswith(end):
            stem = stem[: -len(end)]
            break
    return target.parent / PROBABILITIES_FOLDER / f"{stem}.nii.gz"


def write_probabilities(path: str | Path, probabilities: np.ndarray, reference: io.Volume) -> None:
    """Write (C, I, J, K) class probabilities as a NIfTI of shape (I, J, K, C), with `reference`'s geometry.

    The header is the one `io.write_volume` would give a segmentation of `reference` (same affine,
    qform and sform), with 4 dimensions and float32 voxels: NIfTI-1 has no float16, so a float16
    buffer is widened a few slices at a time while streaming into the gzip file (nibabel would
    convert one whole class at once, and copy it again). Written under a temporary name in the
    same folder and renamed when complete, like every volseg output.
    """
    from nibabel.openers import Opener
    from nibabel.volumeutils import seek_tell

    path = Path(path)
    if not path.name.endswith(".nii.gz"):
        raise VolsegError(path, "probabilities are written as .nii.gz")
    n_classes, *shape = probabilities.shape
    if tuple(shape) != reference.shape:
        raise VolsegError(path, f"probabilities of shape {tuple(shape)} do not match the image's {reference.shape}")
    header = io._nifti_image(np.broadcast_to(np.float32(0), (*shape, n_classes)), reference.affine, reference).header
    header.set_data_dtype(np.float32)
    step = max(1, _CHUNK_VOXELS // (shape[0] * shape[1]))

    def write(target: Path) -> None:
        with Opener(str(target), "wb") as f:
            header.write_to(f)
            seek_tell(f, header.get_data_offset(), write0=True)
            for c in range(n_classes):  # on disk: Fortran order of (I, J, K, C), i.e. C order of (C, K, J, I)
                for k in range(0, shape[2], step):
                    f.write(np.ascontiguousarray(probabilities[c, :, :, k : k + step].T, dtype=np.float32).tobytes())

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise VolsegError(path.parent, f"cannot create the output folder: {exc.strerror or exc}") from None
    io._write_atomically(path, ".nii.gz", write)


def load_ensemble(
    model_paths: str | Path | Sequence[str | Path], device: torch.device
) -> tuple[list[torch.nn.Module], list[Config]]:
    """Load one or several models; an ensemble must agree on channels, labels and file ending."""
    from volseg.checkpoint import load_model

    paths = [model_paths] if isinstance(model_paths, (str, Path)) else list(model_paths)
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


def predict_paths(
    model_path: str | Path | Sequence[str | Path],
    inputs: str | Path,
    output: str | Path,
    device: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
    skip_existing: bool = False,
    save_probabilities: bool = False,
    min_size_voxels: int = 0,
    min_size_mm3: float = 0.0,
    keep_largest: bool = False,
    compile: str = "auto",
    mirror: bool = False,
    skip_empty: bool = False,
) -> list[Path]:
    """`volseg predict`: a file or an nnU-Net-named folder in, `<case><ending>` segmentations out.

    An output that already exists is refused before any work (a good result is never replaced by
    accident) unless `overwrite`; `skip_existing` (`--continue`) keeps it and predicts only the
    missing cases, after removing temporaries a killed run left behind. Several model paths are
    predicted as an ensemble. `save_probabilities` also writes the class probabilities
    (`probabilities_path`, `write_probabilities`) before the segmentation, so an existing
    segmentation means both are complete. `min_size_voxels`, `min_size_mm3` (with the image's
    spacing) and `keep_largest` clean each class of the segmentation (`clean_segmentation`); the
    probabilities stay as the network gave them. `compile` and `mirror` are `WindowRunner`'s
    (compiled once, reused for every case); `skip_empty` is `sliding_window_labels`'. Returns the
    written segmentation paths.
    """
    if overwrite and skip_existing:
        raise VolsegError(None, "--overwrite and --continue exclude each other", "pass one of them")
    if not (min_size_voxels >= 0 and math.isfinite(min_size_mm3) and min_size_mm3 >= 0):
        raise VolsegError(None, f"minimum sizes must be >= 0, got {min_size_voxels} voxels and {min_size_mm3} mm³")
    dev = resolve_device(device)
    models, cfgs = load_ensemble(model_path, dev)
    runners = [WindowRunner(m, dev, c.infer.batch_size, compile, mirror, verbose=progress) for m, c in zip(models, cfgs)]
    cfg = cfgs[0]
    clean = bool(min_size_voxels or min_size_mm3 or keep_largest)
    if clean and 0 not in cfg.data.class_values:
        raise VolsegError(None, "post-processing sets removed voxels to background 0, which is not a class of this model")
    inputs, output = Path(inputs), Path(output)
    ending = cfg.data.file_ending
    is_folder = inputs.is_dir() and not _is_dicom_dir(inputs)
    if is_folder:
        jobs = [(c.images, output / f"{c.case_id}{ending}") for c in io.list_cases(inputs, ending, cfg.model.in_channels)]
    elif inputs.exists():
        if cfg.model.in_channels != 1:
            raise VolsegError(inputs, f"the model needs {cfg.model.in_channels} channels", "pass a folder of <case>_<CCCC> files")
        target = output if _has_image_ending(output) else output / _output_name(inputs, ending)
        jobs = [((inputs,), target)]
    else:
        raise VolsegError(inputs, "input not found")
    _check_output_folder(jobs)
    existing = [target for _, target in jobs if target.exists()]
    if save_probabilities:
        existing += [probabilities_path(target) for _, target in jobs if probabilities_path(target).exists()]
    if existing and not (overwrite or skip_existing):
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise VolsegError(
            existing[0],
            f"output already exists{more}",
            "pass --overwrite to replace or --continue to skip existing outputs",
        )
    if skip_existing:
        for folder in {target.parent for _, target in jobs} | {probabilities_path(t).parent for _, t in jobs}:
            io.remove_stale_temporaries(folder)
        jobs = [(images, target) for images, target in jobs if not target.exists()]
    written: list[Path] = []
    bar = None
    if progress and len(jobs) > 1:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), desc="predict", unit="case", disable=None)

    def load(images: Sequence[Path]) -> io.Volume:
        volume = io.read_image(images)
        _refuse_non_finite(volume, images)
        return volume

    def save(target: Path, seg: np.ndarray, probs: np.ndarray | None, volume: io.Volume) -> None:
        if probs is not None:  # first, so that an existing segmentation means both are complete
            write_probabilities(probabilities_path(target), probs, volume)
        io.write_volume(target, seg, reference=volume)

    def finish(pending: tuple[Future, Path] | None) -> None:
        """Wait for the previous case's files; its error (if any) is raised here."""
        if pending is not None:
            pending[0].result()
            written.append(pending[1])
            if bar:
                bar.update()

    # The next case is read and the previous one written in background threads while the network
    # works on this one (file I/O and gzip release the GIL), so the network never waits on disk.
    reader = ThreadPoolExecutor(1, thread_name_prefix="volseg-read")
    writer = ThreadPoolExecutor(1, thread_name_prefix="volseg-write")
    pending_write: tuple[Future, Path] | None = None
    next_read = reader.submit(load, jobs[0][0]) if jobs else None
    try:
        for n, (images, target) in enumerate(jobs):
            try:
                volume = next_read.result()
                next_read = reader.submit(load, jobs[n + 1][0]) if n + 1 < len(jobs) else None
                probs = None
                if save_probabilities:  # float16: half the memory of float32, ample for probabilities
                    probs = np.empty((cfg.model.num_classes, *volume.shape), dtype=np.float16)
                seg = predict_volume(models, cfgs, volume, dev, probabilities=probs, progress=progress and bar is None,
                                     runners=runners, skip_empty=skip_empty)
                seg = clean_segmentation(seg, volume.spacing, cfg.data.class_values, min_size_voxels, min_size_mm3,
                                         keep_largest)
                finish(pending_write)
                pending_write = (writer.submit(save, target, seg, probs, volume), target)
                del volume, probs, seg
                if n + 1 == len(jobs):
                    finish(pending_write)
                    pending_write = None
            except VolsegError as exc:
                finish(pending_write)  # the case before this one is complete: count it
                pending_write = None
                if not (is_folder and written):
                    raise
                resume = f"{len(written)} case(s) done; fix this one and rerun with --continue"
                raise VolsegError(exc.path, exc.problem, f"{exc.hint}; {resume}" if exc.hint else resume) from None
    finally:
        reader.shutdown(wait=True, cancel_futures=True)
        writer.shutdown(wait=True)  # a case already predicted is still written: no lost work
        if bar:
            bar.close()
    return written


def _check_output_folder(jobs: list[tuple[Sequence[Path], Path]]) -> None:
    """Refuse an output "folder" that is a file before any case is predicted."""
    for _, target in jobs:
        for parent in (target.parent, *target.parent.parents):
            if parent.exists():
                if not parent.is_dir():
                    raise VolsegError(
                        parent, "is a file, but the outputs go into a folder there", "give a folder as -o"
                    )
                break


def _refuse_non_finite(volume: io.Volume, images: Sequence[Path]) -> None:
    """NaN/Inf voxels poison the normalisation and every window that sees them: refuse, do not guess."""
    if not np.issubdtype(volume.array.dtype, np.floating):
        return
    for channel, path in zip(volume.array, images):
        n_bad = int(channel.size - np.count_nonzero(np.isfinite(channel)))
        if n_bad:
            raise VolsegError(
                path,
                f"has {n_bad} NaN or Inf voxels; refusing to predict on them",
                "replace them, e.g. with the image minimum, before predicting",
            )


_IMAGE_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


def _has_image_ending(path: Path) -> bool:
    return path.name.endswith(_IMAGE_ENDINGS)


def _output_name(image: Path, ending: str) -> str:
    """`case_0000.nii.gz` -> `case.nii.gz` (nnU-Net naming); other names keep their stem."""
    name = image.name
    for end in _IMAGE_ENDINGS:
        if name.endswith(end):
            stem = name[: -len(end)]
            if len(stem) > 5 and stem[-5] == "_" and stem[-4:].isdigit():
                stem = stem[:-5]
            return stem + end
    return name + ending


def _is_dicom_dir(path: Path) -> bool:
    return any(p.suffix.lower() == ".dcm" for p in path.iterdir()) if path.is_dir() else False
