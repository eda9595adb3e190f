"""Training augmentation in one resampling pass: sample parameters with an `rng`, then apply them.

Rotation, scaling, mirroring and a smooth elastic displacement are composed into ONE coordinate
grid per sample, so image channels are interpolated once (linear) and labels once (nearest, or
one-hot linear + argmax) instead of once per transform. The grid is built by a single batched
matrix product: the elastic field is a cubic B-spline on a coarse control grid in mm, which is
separable, and the affine part is linear in the voxel index, so both fit one tensor contraction
and the grid comes out in the layout `grid_sample` wants without another pass.

The caller cuts an input region larger than the patch, centred on it, so that rotated and
zoomed-out corners hold real data: `input_size_for` (the worst case of a config) or, after
sampling, `input_size_for_params` (what these parameters read, usually much less). `apply`
returns the centred `out_size` patch. Samples for which no spatial transform was drawn are cut,
not interpolated, so they come back bit-identical.

Everything runs on the device of the tensors (the model's GPU, or CPU in a data worker) and is
vectorised over the batch; `sample_params` is numpy only, so parameters can be logged and replayed.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from volseg.config import AugmentConfig
from volseg.errors import VolsegError

_EPS = 1e-7
CHANNEL_P = 0.5  # blur and low resolution: each channel of a drawn sample takes part with this probability (nnU-Net's)
_BLUR_TRUNCATE = 3.0  # Gaussian kernel radius in sigmas


@dataclass(frozen=True, eq=False)
class AugmentParams:
    """Drawn parameters of one batch (first axis = sample); identity values where nothing was drawn.

    Plain numpy arrays, so a batch's augmentation can be logged (`to_dict`) and replayed exactly.
    `elastic_mm` holds B-spline control displacements in mm, last axis = displacement along
    axes 0, 1, 2; its grid shape follows the patch size and the control spacing.
    """

    spacing_mm: tuple[float, float, float]
    angles_rad: np.ndarray  # (B, 3) about axes 0, 1, 2
    zoom: np.ndarray  # (B, 3)
    mirror: np.ndarray  # (B, 3) bool
    elastic_mm: np.ndarray  # (B, N0, N1, N2, 3)
    noise_std: np.ndarray  # (B,)
    noise_seed: np.ndarray  # (B,) int64
    brightness: np.ndarray  # (B,), or (B, C): a factor per channel
    contrast: np.ndarray  # (B,) or (B, C)
    gamma: np.ndarray  # (B,) or (B, C)
    label_mode: str = "nearest"
    # drawn since 2026-12-07; None (older logs, hand-made params) changes nothing
    blur_sigma: np.ndarray | None = None  # (B, C, 3) in voxels along axes 0, 1, 2; 0 = no blur
    lowres_scale: np.ndarray | None = None  # (B, C, 3) along axes 0, 1, 2; 1 = untouched
    gamma_inverted: np.ndarray | None = None  # (B,) or (B, C), like gamma, applied to the negated image

    @property
    def batch(self) -> int:
        return len(self.zoom)

    @property
    def spatial(self) -> np.ndarray:
        """(B,) True where the sample needs resampling (rotation, zoom or elastic displacement)."""
        return (
            (self.angles_rad != 0).any(1)
            | (self.zoom != 1).any(1)
            | (self.elastic_mm.reshape(self.batch, -1) != 0).any(1)
        )

    def subset(self, index: Sequence[int] | np.ndarray) -> AugmentParams:
        """The parameters of some samples only, e.g. to replay one sample of a logged batch."""
        index = np.asarray(index, dtype=np.int64)
        picked = {f.name: getattr(self, f.name)[index] for f in fields(self)
                  if isinstance(getattr(self, f.name), np.ndarray)}
        return AugmentParams(spacing_mm=self.spacing_mm, label_mode=self.label_mode, **picked)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (nested lists)."""
        return {f.name: (v.tolist() if isinstance(v := getattr(self, f.name), np.ndarray) else v)
                for f in fields(self)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> AugmentParams:
        """Inverse of `to_dict`."""
        kinds = {"mirror": bool, "noise_seed": np.int64}
        out = {}
        for f in fields(cls):
            v = values.get(f.name)
            if v is None and f.default is None:
                continue
            if f.name == "spacing_mm":
                v = tuple(float(s) for s in v)
            elif f.name != "label_mode":
                v = np.asarray(v, dtype=kinds.get(f.name, np.float64))
            out[f.name] = v
        return cls(**out)


# --------------------------------------------------------------------------------------------------
# geometry helpers (numpy)


def is_anisotropic(spacing_mm: Sequence[float], ratio: float = 3.0) -> bool:
    """True when the thickest voxel axis is more than `ratio` times the thinnest.

    >>> is_anisotropic((1.0, 0.8, 5.0)), is_anisotropic((1.0, 1.0, 2.0))
    (True, False)
    """
    return max(spacing_mm) / min(spacing_mm) > ratio


def rotation_matrix(angles_rad: Sequence[float]) -> np.ndarray:
    """R0(a0) @ R1(a1) @ R2(a2), Ra rotating the plane of the two other axes (lower index first).

    >>> np.round(rotation_matrix((np.pi / 2, 0, 0)), 6).tolist()
    [[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]]
    """
    r = np.eye(3)
    for axis, angle in enumerate(angles_rad):
        p, q = [a for a in range(3) if a != axis]
        m = np.eye(3)
        m[p, p] = m[q, q] = math.cos(angle)
        m[p, q], m[q, p] = -math.sin(angle), math.sin(angle)
        r = r @ m
    return r


def voxel_matrix(angles_rad: Sequence[float], zoom: Sequence[float], mirror: Sequence[bool],
                 spacing_mm: Sequence[float]) -> np.ndarray:
    """3x3 map from output voxel offsets to input voxel offsets (rotation in mm, so spacing-aware).

    Output offsets are mirrored, shrunk by the zoom, rotated in mm and turned back into input voxels.

    >>> voxel_matrix((0, 0, 0), (2, 2, 2), (True, False, False), (1, 1, 3)).tolist()
    [[-0.5, 0.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, 0.5]]
    """
    s = np.asarray(spacing_mm, dtype=np.float64)
    flip = np.where(np.asarray(mirror, dtype=bool), -1.0, 1.0)
    m = rotation_matrix(angles_rad) / np.asarray(zoom, dtype=np.float64)
    return m * s[None, :] / s[:, None] * flip[None, :] + 0.0  # (+ 0.0 turns -0.0 into 0.0)


def _bspline3(t: np.ndarray) -> np.ndarray:
    """Cubic B-spline kernel: smooth (C2), non-negative, sums to one over integer shifts."""
    a = np.abs(t)
    return np.where(a < 1, 2 / 3 - a**2 + a**3 / 2, np.where(a < 2, (2 - a) ** 3 / 6, 0.0))


def control_points(size_vox: int, spacing_mm: float, control_spacing_mm: float) -> int:
    """Number of B-spline control points along one axis (intervals + 3 for the spline's support).

    >>> control_points(96, 1.0, 24.0), control_points(12, 5.0, 24.0), control_points(1, 1.0, 24.0)
    (7, 6, 4)
    """
    intervals = max(1, math.ceil((size_vox - 1) * spacing_mm / control_spacing_mm))
    return intervals + 3


def _bspline_matrix(size_vox: int, nodes: int) -> np.ndarray:
    """(size_vox, nodes) weights that evaluate the B-spline at every voxel from its control points."""
    intervals = nodes - 3
    step = max(size_vox - 1, 1) / intervals
    u = np.arange(size_vox, dtype=np.float64)[:, None] / step
    return _bspline3(u - (np.arange(nodes)[None, :] - 1))


def _rotation_reach(rotation_deg: Sequence[float], half_mm: np.ndarray) -> np.ndarray:
    """Upper bound, per axis, of |(R h)_a| over the box corners h and all rotations within the ranges.

    The maximum is taken over a dense grid of angles, plus the most it can grow between grid
    points (each angle moves R h by at most |h| per radian), and never exceeds |h|.
    """
    steps = [np.linspace(-math.radians(d), math.radians(d), 25 if d > 0 else 1) for d in rotation_deg]
    half_step = sum(float(s[1] - s[0]) / 2 for s in steps if len(s) > 1)
    r = np.eye(3)[None]
    for axis, angles in enumerate(steps):
        p, q = [a for a in range(3) if a != axis]
        m = np.tile(np.eye(3), (len(angles), 1, 1))
        m[:, p, p] = m[:, q, q] = np.cos(angles)
        m[:, p, q], m[:, q, p] = -np.sin(angles), np.sin(angles)
        r = (r[:, None] @ m[None]).reshape(-1, 3, 3)
    turning = [a for a, d in enumerate(rotation_deg) if d > 0]
    # about one axis only, that axis's extent is left alone and does not count in the bound
    norm = float(np.linalg.norm(np.delete(half_mm, turning) if len(turning) == 1 else half_mm))
    # a component moves unless the only rotation is about that very axis
    moves = np.array([any(t != a for t in turning) for a in range(3)])
    reach = (np.abs(r) @ half_mm).max(0) + norm * half_step * moves
    return np.where(moves, np.minimum(reach, norm), half_mm)


def input_size_for(out_size: Sequence[int], cfg: AugmentConfig, spacing_mm: Sequence[float]) -> tuple[int, int, int]:
    """How large a region to cut around the patch so that no drawn transform samples outside it.

    A bound over every parameter `cfg` can draw (rotation, zoom, elastic displacement), rounded
    up to keep the patch centred. Cut the region with its centre where the patch's centre would be.

    >>> input_size_for((40, 56, 40), AugmentConfig(), (1.0, 1.0, 1.0))
    (124, 126, 126)
    >>> input_size_for((40, 56, 40), AugmentConfig(rotation_p=0, zoom_p=0, elastic_p=0), (1.0, 1.0, 1.0))
    (40, 56, 40)
    >>> input_size_for((20, 64, 64), AugmentConfig(), (4.0, 1.0, 1.0))
    (20, 140, 140)
    """
    out = np.asarray(out_size, dtype=np.float64)
    s = np.asarray(spacing_mm, dtype=np.float64)
    plane = _allowed_axes(cfg, spacing_mm)
    rotation_deg = [cfg.rotation_deg[a] if (cfg.rotation_p > 0 and a in plane.rotation) else 0.0 for a in range(3)]
    min_zoom = np.ones(3)
    if cfg.zoom_p > 0:
        min_zoom[list(plane.zoom)] = min(cfg.zoom_range[0], 1.0)
    half_mm = (out - 1) / 2 * s / min_zoom
    reach_vox = _rotation_reach(rotation_deg, half_mm) / s
    if cfg.elastic_p > 0:
        reach_vox[list(plane.elastic)] += cfg.elastic_magnitude_mm[1] / s[list(plane.elastic)]
    margin = np.maximum(0, np.ceil(reach_vox - (out - 1) / 2 - 1e-9))
    return tuple(int(v) for v in out + 2 * margin)


@dataclass(frozen=True)
class _Axes:
    rotation: tuple[int, ...]  # axes rotations may happen about
    zoom: tuple[int, ...]  # axes that may be zoomed
    elastic: tuple[int, ...]  # displacement components that may be non-zero


def _allowed_axes(cfg: AugmentConfig, spacing_mm: Sequence[float]) -> _Axes:
    if is_anisotropic(spacing_mm, cfg.anisotropy_ratio):
        thick = int(np.argmax(spacing_mm))
        plane = tuple(a for a in range(3) if a != thick)
        return _Axes(rotation=(thick,), zoom=plane, elastic=plane)
    return _Axes(rotation=(0, 1, 2), zoom=(0, 1, 2), elastic=(0, 1, 2))


# --------------------------------------------------------------------------------------------------
# sampling


def sample_params(rng: np.random.Generator, batch: int, cfg: AugmentConfig, spacing_mm: Sequence[float],
                  patch_vox: Sequence[int], channels: int = 1) -> AugmentParams:
    """Draw one batch's parameters; each transform is drawn per sample with its own probability.

    Every transform always consumes the same amount of randomness, so changing one probability
    does not change what the others draw. The exceptions are inverted gamma, blur and low
    resolution: they are off by default and draw nothing while their probability is 0, so a run
    without them draws exactly what it drew before they existed. Brightness, contrast and gamma factors are drawn per
    channel (shape (B, C) when `channels` > 1), as nnU-Net does (`synchronize_channels=False`):
    sequences of one scan vary in contrast independently (a lesion faint on T1c but bright on
    FLAIR), and one factor for all channels would teach the network a fixed ratio between them.
    One channel draws exactly what it drew before.

    >>> p = sample_params(np.random.default_rng(0), 4, AugmentConfig(), (1.0, 1.0, 1.0), (32, 32, 32))
    >>> p.angles_rad.shape, p.elastic_mm.shape, p.mirror.dtype
    ((4, 3), (4, 5, 5, 5, 3), dtype('bool'))
    """
    if len(spacing_mm) != 3 or min(spacing_mm) <= 0:
        raise VolsegError(None, f"spacing must be three positive numbers, got {tuple(spacing_mm)}")
    if len(patch_vox) != 3 or min(patch_vox) < 1:
        raise VolsegError(None, f"patch size must be three positive integers, got {tuple(patch_vox)}")
    axes = _allowed_axes(cfg, spacing_mm)

    def drawn(p: float) -> np.ndarray:
        return rng.random(batch) < p

    def uniform(lo_hi: Sequence[float], shape: tuple[int, ...]) -> np.ndarray:
        return rng.uniform(lo_hi[0], lo_hi[1], size=shape)

    # rotation
    on = drawn(cfg.rotation_p)
    limit = np.radians([cfg.rotation_deg[a] if a in axes.rotation else 0.0 for a in range(3)])
    angles = rng.uniform(-1.0, 1.0, size=(batch, 3)) * limit * on[:, None]
    # zoom, isotropic or per axis, in-plane only for anisotropic voxels
    on = drawn(cfg.zoom_p)
    z = uniform(cfg.zoom_range, (batch, 3))
    if not cfg.zoom_per_axis:
        z[:] = z[:, :1]
    zoom = np.ones((batch, 3))
    zoom[:, list(axes.zoom)] = z[:, list(axes.zoom)]
    zoom[~on] = 1.0
    # elastic control displacements
    on = drawn(cfg.elastic_p)
    nodes = tuple(control_points(n, s, cfg.elastic_spacing_mm) for n, s in zip(patch_vox, spacing_mm))
    magnitude = uniform(cfg.elastic_magnitude_mm, (batch,)) * on
    elastic = rng.uniform(-1.0, 1.0, size=(batch, *nodes, 3)) * magnitude[:, None, None, None, None]
    elastic[..., [a for a in range(3) if a not in axes.elastic]] = 0.0
    # mirroring
    mirror = rng.random((batch, 3)) < cfg.mirror_p
    mirror[:, [a for a in range(3) if a not in cfg.mirror_axes]] = False
    # intensity
    on = drawn(cfg.noise_p)
    noise_std = uniform(cfg.noise_std, (batch,)) * on
    noise_seed = rng.integers(0, 2**62, size=batch, dtype=np.int64)
    per_channel = (batch,) if channels == 1 else (batch, channels)

    def drawn_per_channel(p: float) -> np.ndarray:
        on = drawn(p)  # per sample, as nnU-Net's apply_probability; then every channel gets a factor
        return on if channels == 1 else on[:, None]  # broadcasts over the channels

    on = drawn_per_channel(cfg.brightness_p)
    brightness = np.where(on, uniform(cfg.brightness_range, per_channel), 1.0)
    on = drawn_per_channel(cfg.contrast_p)
    contrast = np.where(on, uniform(cfg.contrast_range, per_channel), 1.0)

    def gammas(p: float) -> np.ndarray:
        on = drawn_per_channel(p)
        # as nnU-Net: half of the drawn gammas below one, half above, whatever the range's asymmetry
        g_lo, g_hi = cfg.gamma_range
        below = rng.random(per_channel) < 0.5
        u = rng.random(per_channel)
        low_part = g_lo + u * (min(g_hi, 1.0) - g_lo)
        high_part = max(g_lo, 1.0) + u * (g_hi - max(g_lo, 1.0))
        return np.where(on, np.where(below & (g_lo < 1), low_part, high_part), 1.0)

    gamma = gammas(cfg.gamma_p)
    # Drawn after everything above, and only when switched on (they are off by default), so that
    # runs without them draw exactly the random numbers they drew before these transforms existed.
    gamma_inverted = blur_sigma = lowres_scale = None
    if cfg.gamma_invert_p > 0:
        gamma_inverted = gammas(cfg.gamma_invert_p)
    in_plane = np.zeros(3, dtype=bool)
    in_plane[list(axes.zoom)] = True  # every axis for isotropic voxels, the fine ones otherwise
    if cfg.blur_p > 0:
        on = drawn(cfg.blur_p)[:, None] & (rng.random((batch, channels)) < CHANNEL_P)
        sigma = uniform(cfg.blur_sigma, (batch, channels, 3))
        blur_sigma = np.where(on[..., None] & in_plane, sigma, 0.0)
    if cfg.lowres_p > 0:
        on = drawn(cfg.lowres_p)[:, None] & (rng.random((batch, channels)) < CHANNEL_P)
        scale = uniform(cfg.lowres_scale, (batch, channels))  # one factor for all the axes it touches
        lowres_scale = np.where(on[..., None] & in_plane, scale[..., None], 1.0)
    return AugmentParams(
        spacing_mm=tuple(float(s) for s in spacing_mm),
        angles_rad=angles + 0.0,  # turn -0.0 into 0.0 so "not drawn" compares equal to identity
        zoom=zoom,
        mirror=mirror,
        elastic_mm=elastic + 0.0,
        noise_std=noise_std,
        noise_seed=noise_seed,
        brightness=brightness,
        contrast=contrast,
        gamma=gamma,
        label_mode=cfg.label_mode,
        blur_sigma=blur_sigma,
        lowres_scale=lowres_scale,
        gamma_inverted=gamma_inverted,
    )


def identity_params(batch: int, spacing_mm: Sequence[float], patch_vox: Sequence[int],
                    elastic_spacing_mm: float = 24.0) -> AugmentParams:
    """Parameters that change nothing: `apply` then returns the centre crop. A base for hand-made params."""
    nodes = tuple(control_points(n, s, elastic_spacing_mm) for n, s in zip(patch_vox, spacing_mm))
    return AugmentParams(
        spacing_mm=tuple(float(s) for s in spacing_mm),
        angles_rad=np.zeros((batch, 3)),
        zoom=np.ones((batch, 3)),
        mirror=np.zeros((batch, 3), dtype=bool),
        elastic_mm=np.zeros((batch, *nodes, 3)),
        noise_std=np.zeros(batch),
        noise_seed=np.zeros(batch, dtype=np.int64),
        brightness=np.ones(batch),
        contrast=np.ones(batch),
        gamma=np.ones(batch),
    )


# --------------------------------------------------------------------------------------------------
# applying

_SCRATCH = threading.local()


def _scratch(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """A per-thread reusable CPU buffer for a large temporary, or None on other devices.

    A fresh allocation of tens of MB is mapped from the OS and page-faults on first touch, which
    cost as much as the copy into it; these buffers are kept (`release_scratch` frees them).
    CUDA's caching allocator already reuses memory.
    """
    if device.type != "cpu":
        return None
    numel = math.prod(shape)
    store = _SCRATCH.__dict__
    buf = store.get((name, dtype))
    if buf is None or buf.numel() < numel:
        store[(name, dtype)] = buf = torch.empty(numel, dtype=dtype)
    return buf[:numel].view(shape)


def _buffer(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    buf = _scratch(name, shape, dtype, device)
    return torch.empty(shape, dtype=dtype, device=device) if buf is None else buf


def release_scratch() -> None:
    """Free this thread's reusable buffers (a few hundred MB at most for large batches of 96^3 patches)."""
    _SCRATCH.__dict__.clear()


def _centre_vox(in_size: Sequence[int], out_size: Sequence[int]) -> np.ndarray:
    """Input voxel coordinate of the output patch's centre: the centre of the centred crop."""
    out = np.asarray(out_size, dtype=np.int64)
    return (np.asarray(in_size, dtype=np.int64) - out) // 2 + (out - 1) / 2


def sampling_grid(params: AugmentParams, in_size: Sequence[int], out_size: Sequence[int],
                  centre_vox: Sequence[float] | None = None, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32, scratch: bool = False) -> torch.Tensor:
    """Normalised `grid_sample` coordinates (align_corners=True) of every output voxel: (B, *out_size, 3).

    Output voxel o samples input voxel centre + M (o - c_out) + d(o) / spacing, where `centre_vox`
    defaults to the centre of the centred crop, M is `voxel_matrix` and d the elastic field (mm).
    One contraction builds it: grid[b, i] = sum_p W0[i, p] X[b, p], where W0's first columns are the
    B-spline weights along axis 0 and its last two are (i, 1), and X holds the elastic field already
    contracted along axes 1 and 2 plus the affine terms. Trilinear upsampling and separate adds of
    the affine part would each be a full pass over the grid. The last axis is ordered (2, 1, 0),
    as `grid_sample` expects. With `scratch`, the result lives in this thread's reusable buffer
    (valid until the next call).
    """
    b = params.batch
    n0, n1, n2 = params.elastic_mm.shape[1:4]
    o = [int(v) for v in out_size]
    s = np.asarray(params.spacing_mm, dtype=np.float64)
    scale = 2.0 / np.maximum(np.asarray(in_size, dtype=np.float64) - 1, 1)  # voxel -> normalised, per axis
    c_out = (np.asarray(o, dtype=np.float64) - 1) / 2
    c_in = _centre_vox(in_size, o) if centre_vox is None else np.asarray(centre_vox, dtype=np.float64)
    mats = np.stack([voxel_matrix(params.angles_rad[i], params.zoom[i], params.mirror[i], s) for i in range(b)])
    mats = mats * scale[None, :, None]  # (B, a, b): normalised input coordinate a per output voxel b
    base = c_in * scale - 1 - mats @ c_out  # (B, 3)
    rev = [2, 1, 0]  # grid_sample's coordinate order

    # the small factors in numpy (float64): only the final product touches every output voxel
    w0, w1, w2 = (_bspline_matrix(size, n) for size, n in zip(o, (n0, n1, n2)))
    elastic = (params.elastic_mm * (scale / s))[..., rev]  # (B, n0, n1, n2, 3), normalised units
    x = w2 @ elastic.reshape(b * n0 * n1, n2, 3)  # (B n0 n1, K, 3)
    x = w1 @ x.reshape(b * n0, n1, o[2] * 3)  # (B n0, J, K 3)
    x = x.reshape(b, n0, o[1], o[2], 3)
    m = mats[:, rev, :]  # (B, c, b)
    j, k = np.arange(o[1], dtype=np.float64), np.arange(o[2], dtype=np.float64)
    const = (base[:, None, None, rev] + j[None, :, None, None] * m[:, None, None, :, 1]
             + k[None, None, :, None] * m[:, None, None, :, 2])  # (B, J, K, 3)
    slope = np.broadcast_to(m[:, None, None, :, 0], const.shape)
    rows = np.concatenate([x, slope[:, None], const[:, None]], axis=1).reshape(b, n0 + 2, -1)
    cols = np.concatenate([w0, np.arange(o[0])[:, None], np.ones((o[0], 1))], axis=1)  # (I, n0 + 2)
    np_dtype = np.float64 if dtype == torch.float64 else np.float32
    rows_t = torch.from_numpy(rows.astype(np_dtype)).to(device=device, dtype=dtype)
    cols_t = torch.from_numpy(cols.astype(np_dtype)).to(device=device, dtype=dtype)
    grid = _scratch("grid", (b, *o, 3), dtype, torch.device(device)) if scratch else None
    if grid is None:
        return torch.matmul(cols_t, rows_t).view(b, *o, 3)
    torch.matmul(cols_t, rows_t, out=grid.view(b, o[0], -1))
    return grid


def _reach_vox(params: AugmentParams, out_size: Sequence[int]) -> np.ndarray:
    """(B, 3) how far, in input voxels along each axis, each sample reads from the patch centre."""
    s = np.asarray(params.spacing_mm, dtype=np.float64)
    c_out = (np.asarray(out_size, dtype=np.float64) - 1) / 2
    reach = np.zeros((params.batch, 3))
    for n in range(params.batch):
        m = voxel_matrix(params.angles_rad[n], params.zoom[n], params.mirror[n], s)
        # the B-spline field never exceeds its largest control displacement
        reach[n] = np.abs(m) @ c_out + np.abs(params.elastic_mm[n]).reshape(-1, 3).max(0, initial=0.0) / s
    return reach


def input_size_for_params(params: AugmentParams, out_size: Sequence[int]) -> tuple[int, int, int]:
    """The smallest centred region from which `apply` reads every voxel these drawn parameters need.

    Usually far smaller than the worst case of `input_size_for`: cut this after `sample_params` to
    copy less. Samples without a spatial transform need only the patch.

    >>> p = identity_params(2, (1.0, 1.0, 1.0), (20, 30, 40))
    >>> input_size_for_params(p, (20, 30, 40))
    (20, 30, 40)
    >>> from dataclasses import replace
    >>> input_size_for_params(replace(p, zoom=np.array([[1.0] * 3, [0.5] * 3])), (20, 30, 40))
    (40, 60, 80)
    """
    out = np.asarray(out_size, dtype=np.float64)
    moving = params.spatial
    if not moving.any():
        return tuple(int(v) for v in out)
    reach = _reach_vox(params.subset(np.flatnonzero(moving)), out_size).max(0)
    margin = np.maximum(0, np.ceil(reach - (out - 1) / 2 - 1e-6))
    return tuple(int(v) for v in out + 2 * margin)


def _reach_boxes(params: AugmentParams, in_size: Sequence[int], out_size: Sequence[int]
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(B, 3) first and last input voxel (inclusive, clipped to the region) each sample reads.

    Only these boxes are converted and interpolated from, however large a worst-case region was
    cut: drawn transforms are usually far from the worst case.
    """
    reach = _reach_vox(params, out_size)
    c_in = _centre_vox(in_size, out_size)
    top = np.asarray(in_size) - 1
    lo = np.clip(np.floor(c_in - reach) - 1, 0, top).astype(np.int64)  # one voxel more for rounding
    hi = np.clip(np.ceil(c_in + reach) + 1, 0, top).astype(np.int64)
    return lo, np.maximum(hi, lo)


def apply(
    image: torch.Tensor,
    label: torch.Tensor,
    weight: torch.Tensor | None,
    params: AugmentParams,
    out_size: Sequence[int],
    num_classes: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Augment a batch: image (B, C, I, J, K) float, label (B, I, J, K) class indices, weight (B, I, J, K).

    Returns the centred `out_size` patch of each: image (B, C, *out_size), label (B, *out_size) long,
    weight (B, *out_size) float. The weight is 0 wherever the grid samples outside the input region
    (and keeps the input's zeros for unlabelled voxels); with `weight=None` every input voxel counts
    as labelled. Samples without a spatial transform are cut (and flipped), never interpolated.
    Labels may be any integer dtype (uint8, as cached, is cheapest to convert); weight any dtype.
    Runs on the tensors' device; on CPU, large temporaries are kept per thread (`release_scratch`).
    """
    if image.dim() != 5:
        raise VolsegError(None, f"augment expects an image batch (B, C, I, J, K), got shape {tuple(image.shape)}")
    b, c = image.shape[:2]
    in_size = tuple(int(v) for v in image.shape[2:])
    out = tuple(int(v) for v in out_size)
    if tuple(label.shape) != (b, *in_size) or (weight is not None and weight.shape != label.shape):
        raise VolsegError(None, f"augment expects label and weight of shape {(b, *in_size)}, got "
                                f"{tuple(label.shape)} and {None if weight is None else tuple(weight.shape)}")
    if label.is_floating_point() or label.is_complex() or label.dtype == torch.bool:
        raise VolsegError(None, f"augment expects integer class indices as labels, got {label.dtype}")
    if label.device != image.device or (weight is not None and weight.device != image.device):
        raise VolsegError(None, "augment expects image, label and weight on one device")
    if params.batch != b:
        raise VolsegError(None, f"augment parameters are for {params.batch} samples but the batch has {b}")
    if len(out) != 3 or any(o > i for o, i in zip(out, in_size)):
        raise VolsegError(None, f"augment output {out} does not fit in the input region {in_size}",
                          "cut the region with input_size_for(out_size, cfg, spacing)")
    device, dtype = image.device, image.dtype
    wdtype = weight.dtype if weight is not None and weight.is_floating_point() else torch.float32
    spatial = params.spatial
    moved, plain = np.flatnonzero(spatial), np.flatnonzero(~spatial)
    if len(moved) == b:
        out_image, out_label, out_weight = _resample_batch(image, label, weight, params, out, num_classes)
        out_weight = out_weight.to(wdtype)
    else:
        out_image = torch.empty((b, c, *out), dtype=dtype, device=device)
        out_label = torch.empty((b, *out), dtype=torch.long, device=device)
        out_weight = torch.empty((b, *out), dtype=wdtype, device=device)
        start = [(i - o) // 2 for i, o in zip(in_size, out)]
        box = tuple(slice(st, st + o) for st, o in zip(start, out))
        for n in plain:
            flip = [a for a in range(3) if params.mirror[n, a]]
            out_image[n] = torch.flip(image[n][(slice(None), *box)], [a + 1 for a in flip])
            out_label[n] = torch.flip(label[n][box], flip)
            if weight is None:
                out_weight[n] = 1
            else:
                out_weight[n] = torch.flip(weight[n][box], flip)
        if len(moved):
            idx = torch.as_tensor(moved, device=device)
            res = _resample_batch(image.index_select(0, idx), label.index_select(0, idx),
                                  None if weight is None else weight.index_select(0, idx),
                                  params.subset(moved), out, num_classes)
            out_image.index_copy_(0, idx, res[0])
            out_label.index_copy_(0, idx, res[1])
            out_weight.index_copy_(0, idx, res[2].to(wdtype))
    _intensity(out_image, params)
    return out_image, out_label, out_weight


def _resample_batch(image: torch.Tensor, label: torch.Tensor, weight: torch.Tensor | None,
                    params: AugmentParams, out: tuple[int, ...], num_classes: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Resample every sample of the batch through its grid, reading only the box the grids reach."""
    in_size = image.shape[2:]
    lo_n, hi_n = _reach_boxes(params, in_size, out)
    lo, hi = lo_n.min(0), hi_n.max(0)
    box = tuple(slice(int(a), int(z) + 1) for a, z in zip(lo, hi))
    grid_dtype = torch.float64 if image.device.type == "cuda" else torch.float32  # no TF32 in the grid's matmul
    grid = sampling_grid(params, hi - lo + 1, out, _centre_vox(in_size, out) - lo, image.device, grid_dtype,
                         scratch=grid_dtype == image.dtype)
    return _resample(image[(slice(None), slice(None), *box)], label[(slice(None), *box)],
                     None if weight is None else weight[(slice(None), *box)], grid.to(image.dtype),
                     num_classes, params.label_mode)


def _grid_sample(volume: torch.Tensor, grid: torch.Tensor, mode: str) -> torch.Tensor:
    """`grid_sample` with zero padding; a single sample on CPU is split into slabs so all threads work.

    PyTorch's 3D CPU kernel parallelises over the batch only; the input is broadcast (stride 0,
    no copy) to every slab. Returns (B, C, *out) or, when split, (slabs, C, out0 / slabs, out1, out2):
    `_merge_slabs` joins those after any elementwise step, so no extra copy is needed.
    """
    b = grid.shape[0]
    slabs = torch.get_num_threads() if (volume.device.type == "cpu" and b == 1) else 1
    while slabs > 1 and grid.shape[1] % slabs:
        slabs -= 1
    if slabs > 1:
        o = grid.shape[1:4]
        grid = grid.view(slabs, o[0] // slabs, o[1], o[2], 3)
        volume = volume.expand(slabs, *volume.shape[1:])
    return F.grid_sample(volume, grid, mode=mode, padding_mode="zeros", align_corners=True)


def _merge_slabs(x: torch.Tensor, b: int) -> torch.Tensor:
    """(slabs, C, s0, s1, s2) -> (1, C, slabs * s0, s1, s2); (B, C, ...) unchanged when not split."""
    if x.shape[0] == b:
        return x
    return x.transpose(0, 1).reshape(1, x.shape[1], x.shape[0] * x.shape[2], *x.shape[3:])


def _resample(image: torch.Tensor, label: torch.Tensor, weight: torch.Tensor | None, grid: torch.Tensor,
              num_classes: int, label_mode: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Interpolate image channels once (linear) and labels + weight without inventing label values.

    Labels go through `grid_sample` as floats. Each step is one whole-batch operation: on a busy
    CPU every parallel operation can wait for a descheduled thread, so their number matters.
    """
    b = image.shape[0]
    dtype, device = image.dtype, image.device
    image_out = _merge_slabs(_grid_sample(image, grid, "bilinear"), b)
    if label_mode == "nearest":
        if weight is None:
            # label + 1 in one channel: zero padding marks the samples that fall outside the region
            buf = _buffer("labels", (b, 1, *label.shape[1:]), dtype, device)
            buf[:, 0].copy_(label)
            buf.add_(1)  # (torch.add from an integer tensor into a float one takes a slow path)
            v = _merge_slabs(_grid_sample(buf, grid, "nearest"), b)[:, 0]
            return image_out, v.long().sub_(1).clamp_(min=0), v.clamp_(max=1)
        # label and weight share one nearest lookup; zero padding gives weight 0 outside the region
        buf = _buffer("labels", (b, 2, *label.shape[1:]), dtype, device)
        buf[:, 0].copy_(label)
        buf[:, 1].copy_(weight)
        lw = _grid_sample(buf, grid, "nearest")
        return image_out, _merge_slabs(lw[:, :1].long(), b)[:, 0], _merge_slabs(lw[:, 1:], b)[:, 0]
    # one-hot of labelled voxels only, so unlabelled voxels cast no vote; the weight is interpolated too
    buf = _buffer("labels", (b, num_classes + (weight is not None), *label.shape[1:]), dtype, device)
    known = weight > 0 if weight is not None else None
    for k in range(num_classes):
        if known is None:
            torch.eq(label, k, out=buf[:, k])
        else:
            torch.logical_and(label == k, known, out=buf[:, k])
    if weight is not None:
        buf[:, -1].copy_(weight)
    res = _merge_slabs(_grid_sample(buf, grid, "bilinear"), b)
    inside = (grid.abs() <= 1 + 1e-6).all(-1).to(dtype)  # linear weights need all corners inside the region
    weight_out = inside if weight is None else res[:, -1] * inside
    return image_out, res[:, :num_classes].argmax(1), weight_out


def _changed(values: np.ndarray, channels: int) -> list[tuple[int, list[tuple[slice | int, float]]]]:
    """(sample, [(channels, factor), ...]) for every sample with a factor other than 1.

    A sample whose channels share one factor gets one whole-sample entry (one in-place call, as
    with one factor per sample); otherwise one entry per channel.
    """
    out = []
    for n in range(len(values)):
        per_channel = np.broadcast_to(np.asarray(values[n], dtype=np.float64), (channels,))
        if np.all(per_channel == 1):
            continue
        if np.all(per_channel == per_channel[0]):
            out.append((n, [(slice(None), float(per_channel[0]))]))
        else:
            out.append((n, [(c, float(f)) for c, f in enumerate(per_channel)]))
    return out


def _gaussian_kernel(sigma: float, radius: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Normalised 1D Gaussian taps at -radius..radius."""
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return (k / k.sum()).to(dtype=dtype, device=device)


def _blur(x: torch.Tensor, sigma: np.ndarray) -> None:
    """Separable Gaussian blur of one channel (I, J, K) in place; `sigma` per axis in voxels, 0 = none.

    Mirrored ("reflect") borders, as nnU-Net's, so the patch's edge does not darken; the kernel's
    radius (`_BLUR_TRUNCATE` sigmas) is cut to what reflection allows on a thin axis.
    """
    for axis in range(3):
        if sigma[axis] <= 0:
            continue
        radius = min(max(1, math.ceil(_BLUR_TRUNCATE * float(sigma[axis]))), x.shape[axis] - 1)
        if radius < 1:
            continue
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = 2 * radius + 1
        pad = [0] * 6
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius  # F.pad lists the last axis first
        padded = F.pad(x[None, None], pad, mode="reflect")
        kernel = _gaussian_kernel(float(sigma[axis]), radius, x.dtype, x.device)
        x.copy_(F.conv3d(padded, kernel.view(shape))[0, 0])


def _low_resolution(x: torch.Tensor, scale: np.ndarray) -> None:
    """Simulate a coarser scan of one channel (I, J, K) in place: nearest down by `scale` (per axis), linear back up."""
    size = tuple(int(n) for n in x.shape)
    small = tuple(max(1, round(n * float(f))) for n, f in zip(size, scale))
    if small == size:
        return
    down = F.interpolate(x[None, None], size=small, mode="nearest-exact")
    x.copy_(F.interpolate(down, size=size, mode="trilinear", align_corners=False)[0, 0])


def _gamma(image: torch.Tensor, values: np.ndarray, invert: bool) -> None:
    """Gamma on the intensities rescaled to [0, 1], mean and standard deviation kept (nnU-Net's).

    With `invert` the image is negated first and back after, so the curve lifts dark structures.
    """
    spatial_dims = (1, 2, 3)
    for n, factors in _changed(values, image.shape[1]):
        x = image[n]
        if invert:
            x.neg_()
        mean, std = x.mean(spatial_dims, keepdim=True), x.std(spatial_dims, keepdim=True)
        lo = x.amin(spatial_dims, keepdim=True)
        span = x.amax(spatial_dims, keepdim=True) - lo + _EPS
        x.sub_(lo).div_(span)
        for channels, factor in factors:
            x[channels].pow_(factor)
        x.mul_(span).add_(lo)
        # keep mean and standard deviation, as nnU-Net does
        new_mean, new_std = x.mean(spatial_dims, keepdim=True), x.std(spatial_dims, keepdim=True)
        x.sub_(new_mean).mul_(std / (new_std + _EPS)).add_(mean)
        if invert:
            x.neg_()


def _intensity(image: torch.Tensor, params: AugmentParams) -> None:
    """Noise, blur, brightness, contrast, low resolution, inverted gamma, gamma (nnU-Net's order).

    In place, on the drawn samples and channels only.
    """
    device = image.device
    noisy = np.flatnonzero(params.noise_std > 0)
    if len(noisy):
        # one generator per sample (replayable alone), one in-place update for the batch
        noise = torch.empty((len(noisy), *image.shape[1:]), dtype=image.dtype, device=device)
        for slot, n in enumerate(noisy):
            gen = torch.Generator(device=device)
            gen.manual_seed(int(params.noise_seed[n]))
            torch.randn(image.shape[1:], generator=gen, device=device, dtype=image.dtype, out=noise[slot])
        std = torch.as_tensor(params.noise_std[noisy], dtype=image.dtype, device=device).view(-1, 1, 1, 1, 1)
        if len(noisy) == len(image):
            image.addcmul_(noise, std)
        else:
            idx = torch.as_tensor(noisy, device=device)
            image.index_copy_(0, idx, torch.addcmul(image.index_select(0, idx), noise, std))
    if params.blur_sigma is not None:
        for n, c in zip(*np.nonzero((params.blur_sigma > 0).any(-1))):
            _blur(image[n, c], params.blur_sigma[n, c])
    for n, factors in _changed(params.brightness, image.shape[1]):
        for channels, factor in factors:
            image[n, channels].mul_(factor)
    spatial_dims = (1, 2, 3)
    for n, factors in _changed(params.contrast, image.shape[1]):
        x = image[n]
        lo, hi = x.amin(spatial_dims, keepdim=True), x.amax(spatial_dims, keepdim=True)
        mean = x.mean(spatial_dims, keepdim=True)
        x.sub_(mean)
        for channels, factor in factors:
            x[channels].mul_(factor)
        x.add_(mean)
        torch.maximum(x, lo, out=x)
        torch.minimum(x, hi, out=x)
    if params.lowres_scale is not None:
        for n, c in zip(*np.nonzero((params.lowres_scale < 1).any(-1))):
            _low_resolution(image[n, c], params.lowres_scale[n, c])
    if params.gamma_inverted is not None:
        _gamma(image, params.gamma_inverted, invert=True)
    _gamma(image, params.gamma, invert=False)
