"""Seeded synthetic phantoms: smooth blobs with class contrasts, noise and bias, for the demo and tests.

Object sizes are drawn in mm, so the same physical shapes appear at any voxel spacing (with spacing
0.5 x 0.5 x 5 mm an object is ~40 voxels wide along I but only a few along K). Every foreground class
is present in every phantom, objects stay one voxel away from the border, and with ``touching=True``
some objects are placed against an object of another class so that instance boundaries matter.
Channels order the class means differently, so several channels carry complementary information;
a smooth bias field, Gaussian noise and a random per-case scale/offset keep the task from being
solvable by one global threshold and make per-case normalisation matter.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from volseg.errors import VolsegError

# Surface wobble of a blob, relative to its semi-axes: the surface lies at a normalised radius of
# 1 +- _WOBBLE, which keeps blobs convex-ish and their extent predictable for placement.
_WOBBLE = 0.12
# Centre distance of a touching pair, relative to the sum of their radii along the joining line.
# Below 1 - _WOBBLE the two always overlap; the later one is painted over the earlier, which leaves
# a shared face, i.e. 26-connected neighbouring masks.
_TOUCH_OVERLAP = 0.76
_MAX_LAYOUT_TRIES = 80
_MAX_PLACEMENT_TRIES = 60
_MIN_SHAPE_VOX = 8


@dataclass(frozen=True)
class _Blob:
    """Sampled parameters of one object; painting it is deterministic."""

    label: int
    center_mm: np.ndarray  # (3,)
    rotation: np.ndarray  # (3, 3), columns are the blob's own axes in volume coordinates
    semi_axes_mm: np.ndarray  # (3,)
    wave_vectors: np.ndarray  # (3, 3), rows: frequencies in the unit-sphere frame
    wave_phases: np.ndarray  # (3,)

    def support_mm(self, direction: np.ndarray) -> float:
        """How far the blob reaches from its centre along a unit vector (wobble included).

        The support function of the ellipsoid scaled by 1 + _WOBBLE, which contains the blob; two
        blobs whose supports along the line between their centres add up to less than the centre
        distance cannot overlap.
        """
        local = self.rotation.T @ direction
        return float((1.0 + _WOBBLE) * np.sqrt(np.sum((local * self.semi_axes_mm) ** 2)))

    def radius_along_mm(self, direction: np.ndarray) -> float:
        """Radius of the (un-wobbled) ellipsoid along a unit vector."""
        local = self.rotation.T @ direction
        return float(1.0 / np.sqrt(np.sum((local / self.semi_axes_mm) ** 2)))

    def half_box_mm(self) -> np.ndarray:
        """Half-size of the blob's bounding box along I, J, K."""
        return np.array([self.support_mm(axis) for axis in np.eye(3)])


def class_means(n_classes: int, n_channels: int) -> np.ndarray:
    """Mean intensity of each class in each channel, before bias, noise and the per-case scale.

    Within a channel the classes sit on evenly spaced levels in [0.2, 1.0], all distinct; each
    channel rotates the order, so a class that is dark in one channel is bright in another.

    Returns an array of shape (n_channels, n_classes).

    >>> class_means(3, 2)
    array([[0.2, 0.6, 1. ],
           [0.6, 1. , 0.2]], dtype=float32)
    """
    classes = np.arange(n_classes)
    rows = []
    for channel in range(n_channels):
        if (channel // n_classes) % 2 == 0:
            ranks = (classes + channel) % n_classes
        else:  # past n_classes channels, reverse the order so channels keep differing
            ranks = (channel - classes) % n_classes
        rows.append(0.2 + 0.8 * ranks / (n_classes - 1))
    return np.asarray(rows, dtype=np.float32)


def _check_int(name: str, value: object, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise VolsegError(None, f"{name} must be an integer, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in {minimum}..{maximum}"
        raise VolsegError(None, f"{name} must be {bound}, got {value}")
    return int(value)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _check_params(
    shape_vox: Sequence[int],
    spacing_mm: Sequence[float],
    n_classes: int,
    n_channels: int,
    noise: float,
    bias: float,
    n_objects: int | None,
) -> tuple[tuple[int, int, int], np.ndarray]:
    """Validate generator parameters at the boundary; returns the shape and spacing as clean types."""
    try:
        shape = tuple(int(s) for s in shape_vox)
        spacing = np.asarray([float(s) for s in spacing_mm], dtype=np.float64)
    except (TypeError, ValueError):
        raise VolsegError(
            None, f"shape_vox and spacing_mm must be 3 numbers each, got {shape_vox!r}, {spacing_mm!r}"
        ) from None
    if len(shape) != 3 or spacing.shape != (3,):
        raise VolsegError(None, f"shape_vox and spacing_mm need 3 values (I, J, K), got {shape_vox!r}, {spacing_mm!r}")
    if min(shape) < _MIN_SHAPE_VOX:
        raise VolsegError(None, f"shape_vox must be at least {_MIN_SHAPE_VOX} voxels on every axis, got {shape}")
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise VolsegError(None, f"spacing_mm must be positive, got {tuple(spacing.tolist())}")
    _check_int("n_classes", n_classes, 2, 255)
    _check_int("n_channels", n_channels, 1)
    if not _is_real(noise) or not np.isfinite(noise) or noise < 0:
        raise VolsegError(None, f"noise must be a number >= 0, got {noise!r}")
    if not _is_real(bias) or not np.isfinite(bias) or not 0 <= bias < 1:
        raise VolsegError(None, f"bias must be a number in [0, 1), got {bias!r}", hint="it is a relative amplitude")
    if n_objects is not None:
        _check_int("n_objects", n_objects, n_classes - 1)
    return (shape[0], shape[1], shape[2]), spacing


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """Uniformly random 3x3 orthogonal matrix (QR of a Gaussian matrix with the sign fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))


def _random_direction(rng: np.random.Generator) -> np.ndarray:
    v = rng.standard_normal(3)
    return v / np.linalg.norm(v)


def _sample_blob(rng: np.random.Generator, label: int, radius_mm: float) -> _Blob:
    """A blob at the origin; placement moves it afterwards."""
    freqs = rng.uniform(1.5, 3.0, size=3)
    waves = np.stack([_random_direction(rng) * f for f in freqs])
    return _Blob(
        label=label,
        center_mm=np.zeros(3),
        rotation=_random_rotation(rng),
        semi_axes_mm=radius_mm * rng.uniform(0.8, 1.2, size=3),
        wave_vectors=waves,
        wave_phases=rng.uniform(0, 2 * np.pi, size=3),
    )


def _sample_layout(
    rng: np.random.Generator,
    shape_vox: tuple[int, int, int],
    spacing_mm: np.ndarray,
    labels: list[int],
    n_required: int,
    touching: bool,
    size_scale: float,
) -> list[_Blob] | None:
    """Sample blob shapes and positions; None when they do not fit (the caller retries smaller).

    The first `n_required` labels must be placed; later ones are dropped when they do not fit.
    """
    top_mm = (np.asarray(shape_vox) - 1) * spacing_mm
    min_extent_mm = float(np.min(np.asarray(shape_vox) * spacing_mm))
    # Big enough to be several voxels thick along the coarsest axis, small enough for a few to fit;
    # where both cannot hold (a volume only a few coarse voxels thick), fitting wins.
    r_lo = min(max(0.14 * min_extent_mm, 1.5 * float(spacing_mm.max())), 0.3 * min_extent_mm)
    r_hi = min(max(0.24 * min_extent_mm, 1.25 * r_lo), 0.36 * min_extent_mm)
    gap_mm = 1.05 * float(np.linalg.norm(spacing_mm))  # farther than a 26-neighbour step
    blobs: list[_Blob] = []
    for index, label in enumerate(labels):
        blob = _sample_blob(rng, label, size_scale * rng.uniform(r_lo, r_hi))
        half = blob.half_box_mm()
        low, high = half + spacing_mm, top_mm - half - spacing_mm  # one background voxel at the border
        if np.any(high < low):
            if index < n_required:
                return None
            continue
        # The first two placed objects always touch (different classes when there are two);
        # later ones touch an earlier object of another class half of the time, or when they
        # do not fit anywhere else.
        partners = [b for b in blobs if b.label != label] or blobs
        modes = [False]
        if touching and partners:
            modes = [True] if len(blobs) == 1 else ([True, False] if rng.random() < 0.5 else [False, True])
        center = None
        for attach in modes:
            center = _place(rng, blob, blobs, partners if attach else [], low, high, gap_mm)
            if center is not None:
                break
        if center is None:
            if index < n_required:
                return None
            continue
        blobs.append(replace(blob, center_mm=center))
    return blobs


def _place(
    rng: np.random.Generator,
    blob: _Blob,
    placed: list[_Blob],
    partners: list[_Blob],
    low_mm: np.ndarray,
    high_mm: np.ndarray,
    gap_mm: float,
) -> np.ndarray | None:
    """A centre inside [low, high], against one of `partners` (if any), clear of all other blobs."""
    for _ in range(_MAX_PLACEMENT_TRIES):
        if partners:
            partner = partners[rng.integers(len(partners))]
            direction = _random_direction(rng)
            distance = _TOUCH_OVERLAP * (partner.radius_along_mm(direction) + blob.radius_along_mm(direction))
            center = partner.center_mm + distance * direction
            if np.any(center < low_mm) or np.any(center > high_mm):
                continue
        else:
            partner = None
            center = rng.uniform(low_mm, high_mm)
        clear = True
        for other in placed:
            if other is partner:
                continue
            between = center - other.center_mm
            distance = float(np.linalg.norm(between))
            unit = between / max(distance, 1e-12)
            if distance < blob.support_mm(unit) + other.support_mm(unit) + gap_mm:
                clear = False
                break
        if clear:
            return center
    return None


def _paint(blobs: list[_Blob], shape_vox: tuple[int, int, int], spacing_mm: np.ndarray) -> np.ndarray:
    """Instance map (0 = background, i + 1 = blobs[i]); later blobs are painted over earlier ones."""
    instances = np.zeros(shape_vox, dtype=np.int32)
    shape = np.asarray(shape_vox)
    for number, blob in enumerate(blobs, start=1):
        half = blob.half_box_mm()
        lo = np.clip(np.floor((blob.center_mm - half) / spacing_mm).astype(int), 0, shape - 1)
        hi = np.clip(np.ceil((blob.center_mm + half) / spacing_mm).astype(int) + 1, 1, shape)
        axes = [np.arange(lo[a], hi[a]) * spacing_mm[a] - blob.center_mm[a] for a in range(3)]
        offsets = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)  # (i, j, k, 3), mm
        unit = (offsets @ blob.rotation) / blob.semi_axes_mm  # inside the ellipsoid <=> |unit| < 1
        wobble = np.sin(unit @ blob.wave_vectors.T + blob.wave_phases).mean(axis=-1)
        inside = np.linalg.norm(unit, axis=-1) < 1.0 + _WOBBLE * wobble
        region = instances[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        region[inside] = number
    return instances


def _layout_ok(instances: np.ndarray, blobs: list[_Blob], n_classes: int, touching: bool, thick: bool) -> bool:
    """Every class present (at least 3 voxels thick somewhere if `thick`), the first pair really touching."""
    labels = np.asarray([0] + [b.label for b in blobs], dtype=np.uint8)[instances]
    for value in range(1, n_classes):
        mask = labels == value
        if not (ndimage.binary_erosion(mask).any() if thick else mask.sum() >= 4):
            return False
    if touching and len(blobs) >= 2:
        grown = ndimage.binary_dilation(instances == 1, structure=np.ones((3, 3, 3), dtype=bool))
        if not np.any(grown & (instances == 2)):
            return False
    return True


def _bias_field(rng: np.random.Generator, shape_vox: tuple[int, int, int], spacing_mm: np.ndarray) -> np.ndarray:
    """Smooth zero-mean field in [-1, 1]: three plane cosines of under one period across the volume.

    Coordinates are in mm (relative to the largest extent), so the field is as smooth physically
    along a coarse axis as along a fine one.
    """
    extent_mm = float(np.max(np.asarray(shape_vox) * spacing_mm))
    coords = [np.arange(n) * s / extent_mm for n, s in zip(shape_vox, spacing_mm)]
    grid = np.meshgrid(*coords, indexing="ij", sparse=True)
    field = np.zeros(shape_vox, dtype=np.float64)
    for _ in range(3):
        w = rng.uniform(-1.0, 1.0, size=3) * np.pi
        phase = w[0] * grid[0] + w[1] * grid[1] + w[2] * grid[2] + rng.uniform(0, 2 * np.pi)
        field += rng.uniform(0.5, 1.0) * np.cos(phase)
    field -= field.mean()
    return field / max(float(np.abs(field).max()), 1e-12)


def make_phantom(
    shape_vox: Sequence[int] = (48, 48, 48),
    spacing_mm: Sequence[float] = (1.0, 1.0, 1.0),
    n_classes: int = 3,
    n_channels: int = 1,
    *,
    rng: np.random.Generator,
    noise: float = 0.1,
    bias: float = 0.3,
    touching: bool = True,
    n_objects: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one phantom: an image of shape (C, I, J, K) float32 and a label of shape (I, J, K) uint8.

    Labels are 0 (background) .. n_classes - 1, each foreground class present at least once.
    `noise` is the Gaussian noise std relative to the gap between neighbouring class means; `bias` the
    amplitude of the multiplicative bias field (intensity * (1 + bias * field), field in [-1, 1]).
    `n_objects` (at least n_classes - 1) fixes the object count; by default it is n_classes - 1 plus
    up to n_classes - 1 random extras, which are dropped where they do not fit.
    Raises VolsegError for nonsense parameters or when the objects cannot fit into the volume.
    """
    shape, spacing = _check_params(shape_vox, spacing_mm, n_classes, n_channels, noise, bias, n_objects)
    n_fg = n_classes - 1
    # Each class once (random order, so the first touching pair varies), then extra objects of
    # random classes: all of them when n_objects is given, else up to n_fg, kept where they fit.
    n_required = n_fg if n_objects is None else n_objects
    n_extra = int(rng.integers(0, n_fg + 1)) if n_objects is None else n_objects - n_fg
    labels = [int(v) for v in rng.permutation(np.arange(1, n_classes))]
    labels += [int(v) for v in rng.integers(1, n_classes, size=n_extra)]

    for attempt in range(_MAX_LAYOUT_TRIES):
        size_scale = 0.93 ** (attempt // 8)  # shrink slowly when the objects keep not fitting
        blobs = _sample_layout(rng, shape, spacing, labels, n_required, touching, size_scale)
        if blobs is None:
            continue
        instances = _paint(blobs, shape, spacing)
        # Only tiny volumes get through the first half of the tries without 3-voxel-thick objects.
        if _layout_ok(instances, blobs, n_classes, touching, thick=attempt < _MAX_LAYOUT_TRIES // 2):
            break
    else:
        raise VolsegError(
            None,
            f"cannot fit {n_required} objects of {n_fg} classes into {shape} voxels of {tuple(spacing.tolist())} mm",
            hint="use a larger shape_vox or fewer classes/objects",
        )
    label = np.asarray([0] + [b.label for b in blobs], dtype=np.uint8)[instances]

    means = class_means(n_classes, n_channels).astype(np.float64)
    contrast = 0.8 / n_fg  # gap between neighbouring class means
    image = np.empty((n_channels, *shape), dtype=np.float32)
    for channel in range(n_channels):
        signal = means[channel][label] * (1.0 + bias * _bias_field(rng, shape, spacing))
        signal += (noise * contrast) * rng.standard_normal(shape)
        scale = 100.0 * 2.0 ** rng.uniform(-1.0, 1.0)
        offset = rng.uniform(-50.0, 50.0)
        image[channel] = signal * scale + offset
    return image, label


def _dataset_affine(shape_vox: tuple[int, int, int], spacing_mm: np.ndarray) -> np.ndarray:
    """Diagonal voxel -> RAS mm affine with an off-centre, non-zero origin so geometry bugs show."""
    affine = np.diag([*spacing_mm, 1.0])
    affine[:3, 3] = -0.5 * np.asarray(shape_vox) * spacing_mm + np.array([12.5, -7.25, 31.0])
    return affine


def write_dataset(
    out_dir: str | Path,
    n_cases: int = 12,
    shape_vox: Sequence[int] = (48, 48, 48),
    spacing_mm: Sequence[float] = (1.0, 1.0, 1.0),
    n_classes: int = 3,
    n_channels: int = 1,
    seed: int = 0,
    noise: float = 0.1,
    bias: float = 0.3,
    touching: bool = True,
    n_test: int = 0,
) -> Path:
    """Write phantoms in the nnU-Net v2 raw layout and return `out_dir`.

    Case i is drawn from ``np.random.default_rng([seed, i])`` and named ``case_{i:03d}``, so any case can
    be regenerated alone; test cases continue the numbering (i = n_cases .. n_cases + n_test - 1) and go
    to imagesTs/ and labelsTs/. Images are one file per channel (``case_000_0000.nii.gz``).
    """
    from volseg.layout import write_dataset_json  # layers below; lazy so make_phantom needs no file I/O
    from volseg.volumes import write_volume

    shape, spacing = _check_params(shape_vox, spacing_mm, n_classes, n_channels, noise, bias, None)
    _check_int("n_cases", n_cases, 1)
    _check_int("n_test", n_test, 0)
    _check_int("seed", seed, 0)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise VolsegError(out, "exists and is not a directory", hint="choose another out_dir")

    params = {
        "generator": "volseg.synthetic.write_dataset",
        "seed": int(seed),
        "n_cases": int(n_cases),
        "n_test": int(n_test),
        "shape_vox": list(shape),
        "spacing_mm": spacing.tolist(),
        "n_classes": int(n_classes),
        "n_channels": int(n_channels),
        "noise": float(noise),
        "bias": float(bias),
        "touching": bool(touching),
    }
    affine = _dataset_affine(shape, spacing)
    splits = [("imagesTr", "labelsTr", range(n_cases)), ("imagesTs", "labelsTs", range(n_cases, n_cases + n_test))]

    with tqdm(total=n_cases + n_test, desc="synthetic cases", unit="case", disable=n_cases < 20) as bar:
        for images_dir, labels_dir, indices in splits:
            if len(indices) == 0:
                continue
            (out / images_dir).mkdir(parents=True, exist_ok=True)
            (out / labels_dir).mkdir(parents=True, exist_ok=True)
            for index in indices:
                image, label = make_phantom(
                    shape, spacing, n_classes, n_channels, rng=np.random.default_rng([seed, index]),
                    noise=noise, bias=bias, touching=touching,
                )
                name = f"case_{index:03d}"
                for channel in range(n_channels):
                    write_volume(out / images_dir / f"{name}_{channel:04d}.nii.gz", image[channel], affine=affine)
                write_volume(out / labels_dir / f"{name}.nii.gz", label, affine=affine)
                bar.update(1)

    write_dataset_json(out, "volseg-synthetic", [f"ch{c}" for c in range(n_channels)],
                       {"background": 0, **{f"class{v}": v for v in range(1, n_classes)}}, n_cases,
                       "volseg synthetic phantoms: " + json.dumps(params, sort_keys=True), generator_params=params)
    return out


# --------------------------------------------------------------------------------------------------
# many touching objects of one class (nuclei, confluent lesions)


def make_touching_objects(
    shape_vox: Sequence[int] = (64, 64, 64),
    spacing_mm: Sequence[float] = (1.0, 1.0, 1.0),
    *,
    rng: np.random.Generator,
    n_objects: int = 40,
    radius_mm: tuple[float, float] = (4.0, 6.5),
    clump_p: float = 0.85,
    noise: float = 0.15,
    gap_contrast: float = 0.35,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Clumps of touching blobs of one class: image (1, I, J, K), label (I, J, K) and instances (I, J, K).

    Objects are balls of random radius placed mostly against an earlier one (probability
    `clump_p`), their overlaps split between them like cells (each voxel goes to the ball it lies
    deepest in). Where two objects meet, the voxels of the lower-numbered one become background, so
    the label keeps a one-voxel gap and objects are never 26-connected; that gap is what a
    segmentation must keep open to count objects right. In the image the gap is only `gap_contrast`
    darker than the objects (a faint membrane), the image is blurred by about a voxel (partial
    volume) and Gaussian noise of std `noise` (object intensity about 1) is added.

    >>> img, lab, inst = make_touching_objects((24, 24, 24), rng=np.random.default_rng(0), n_objects=6)
    >>> img.shape, lab.dtype, int(inst.max()) <= 6, set(np.unique(lab).tolist()) <= {0, 1}
    ((1, 24, 24, 24), dtype('uint8'), True, True)
    """
    shape = tuple(int(n) for n in shape_vox)
    spacing = np.asarray(spacing_mm, dtype=np.float64)
    if len(shape) != 3 or min(shape) < _MIN_SHAPE_VOX or spacing.shape != (3,) or not np.all(spacing > 0):
        raise VolsegError(None, f"need a 3D shape of at least {_MIN_SHAPE_VOX} voxels per axis and 3 positive "
                                f"spacings, got {shape_vox} and {spacing_mm}")
    _check_int("n_objects", n_objects, 1)
    top = (np.asarray(shape) - 1) * spacing
    centers: list[np.ndarray] = []
    radii: list[float] = []
    for _ in range(n_objects * 30):
        if len(centers) == n_objects:
            break
        r = float(rng.uniform(*radius_mm))
        if centers and rng.random() < clump_p:
            k = int(rng.integers(len(centers)))
            c = centers[k] + 0.8 * (radii[k] + r) * _random_direction(rng)
        else:
            c = rng.uniform(0, top)
        if np.any(c < r * 0.5) or np.any(c > top - r * 0.5):
            continue
        if all(np.linalg.norm(c - o) >= 0.75 * (r + ro) for o, ro in zip(centers, radii)):
            centers.append(c)
            radii.append(r)
    depth = np.full(shape, np.inf, dtype=np.float32)  # normalised radius of the deepest ball so far
    instances = np.zeros(shape, dtype=np.int32)
    for number, (c, r) in enumerate(zip(centers, radii), start=1):
        lo = np.clip(np.floor((c - r) / spacing).astype(int), 0, np.asarray(shape) - 1)
        hi = np.clip(np.ceil((c + r) / spacing).astype(int) + 1, 1, shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        grid = np.meshgrid(*[np.arange(a, b) * s - cc for a, b, s, cc in zip(lo, hi, spacing, c)],
                           indexing="ij", sparse=True)
        q = np.sqrt(sum(g * g for g in grid)) / r
        take = (q < 1.0) & (q < depth[box])
        depth[box][take] = q[take]
        instances[box][take] = number
    # one-voxel gap: an object voxel with a 26-neighbour of a higher-numbered object becomes background
    gap = (instances > 0) & (ndimage.maximum_filter(instances, size=3, mode="constant") > instances)
    instances[gap] = 0
    label = (instances > 0).astype(np.uint8)
    brightness = np.concatenate([[0.0], rng.uniform(0.8, 1.2, size=len(centers))])
    signal = brightness[instances]
    signal[gap] = (1.0 - gap_contrast) * brightness[1:].mean()
    signal = ndimage.gaussian_filter(signal, sigma=0.7 / spacing * spacing.min())
    image = (signal + noise * rng.standard_normal(shape)).astype(np.float32)[None]
    return image, label, instances


def write_touching_dataset(
    out_dir: str | Path,
    n_cases: int = 16,
    n_test: int = 8,
    shape_vox: Sequence[int] = (64, 64, 64),
    spacing_mm: Sequence[float] = (1.0, 1.0, 1.0),
    seed: int = 0,
    **kwargs: float,
) -> Path:
    """Write `make_touching_objects` cases in the nnU-Net layout, with `instancesTr/`/`instancesTs/`.

    The instance maps (one id per object) are what border weights and object-level metrics use;
    case i is drawn from ``np.random.default_rng([seed, i])`` like `write_dataset`.
    """
    from volseg.atomic import write_text_atomic
    from volseg.volumes import write_volume

    out = Path(out_dir)
    spacing = np.asarray(spacing_mm, dtype=np.float64)
    affine = _dataset_affine(tuple(int(n) for n in shape_vox), spacing)
    splits = [("Tr", range(n_cases)), ("Ts", range(n_cases, n_cases + n_test))]
    for suffix, indices in splits:
        for sub in ("images", "labels", "instances"):
            (out / f"{sub}{suffix}").mkdir(parents=True, exist_ok=True)
        for index in indices:
            image, label, instances = make_touching_objects(shape_vox, spacing_mm, rng=np.random.default_rng([seed, index]),
                                                            **kwargs)  # type: ignore[arg-type]
            name = f"case_{index:03d}"
            write_volume(out / f"images{suffix}" / f"{name}_0000.nii.gz", image[0], affine=affine)
            write_volume(out / f"labels{suffix}" / f"{name}.nii.gz", label, affine=affine)
            write_volume(out / f"instances{suffix}" / f"{name}.nii.gz", instances.astype(np.int32), affine=affine)
    dataset = {
        "name": "volseg-touching-objects",
        "channel_names": {"0": "ch0"},
        "labels": {"background": 0, "object": 1},
        "numTraining": int(n_cases),
        "file_ending": ".nii.gz",
        "description": "volseg synthetic touching objects (one-voxel gaps between objects)",
        "generator_params": {"generator": "volseg.synthetic.write_touching_dataset", "seed": seed,
                             "shape_vox": list(shape_vox), "spacing_mm": spacing.tolist(), **kwargs},
    }
    write_text_atomic(out / "dataset.json", json.dumps(dataset, indent=2) + "\n")
    return out
