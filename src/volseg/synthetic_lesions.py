"""Seeded thick-slice brain MRI with tumours: two channels (T1 post-contrast, FLAIR), small targets.

A stand-in for the commonest clinical data volseg meets (thick slices, several sequences, small
lesions, few cases), made so that no single threshold solves it: in T1c the tumour is a bright
ring around a darker necrotic core, but vessels and the dura enhance as brightly; in FLAIR the
tumour is bright, but so are the unlabelled oedema around it and scattered white-matter spots.
Only the two channels together, with context, separate tumour from its look-alikes.

Geometry follows axial clinical scans: 0.5 mm in-plane over a 256 mm field of view (512 pixels by
default), 20-30 slices of 5-7 mm along the last axis, drawn per case. Structures are drawn in mm
on sub-slices and averaged over each slice's thickness (partial volume), labels are the
majority of a voxel's volume. Each channel gets its own smooth bias field, Rician noise and
scanner scale. Case i is drawn from ``np.random.default_rng([seed, i])``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from scipy import ndimage

from volseg.errors import VolsegError

FOV_MM = 256.0
SUB_SLICES = 3  # sub-slices per thick slice for partial volume
LESION_CM3 = (0.5, 10.0)
SLICES = (20, 30)
THICKNESS_MM = (5.0, 7.0)

# (T1c, FLAIR) intensities relative to white matter in T1c, before texture, bias and noise
_BACKGROUND = (0.0, 0.0)
_SCALP = (1.2, 0.7)
_SKULL = (0.15, 0.1)
_DURA = (1.5, 0.6)
_CSF = (0.3, 0.12)
_BRAIN = (0.8, 0.55)
_OEDEMA = (0.72, 1.15)
_RIM = (1.55, 1.1)
_CORE = (0.7, 1.3)
_VESSEL = (1.5, 0.5)
_WMH = (0.8, 1.05)


def _paint(t1: np.ndarray, fl: np.ndarray, mask: np.ndarray, value: tuple[float, float], box: tuple[slice, ...]) -> None:
    t1[box][mask] = value[0]
    fl[box][mask] = value[1]


def _box(center_vox: np.ndarray, half_vox: np.ndarray, shape: tuple[int, ...]) -> tuple[slice, ...]:
    lo = np.maximum(np.floor(center_vox - half_vox).astype(int), 0)
    hi = np.minimum(np.ceil(center_vox + half_vox).astype(int) + 1, shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def _coords(box: tuple[slice, ...], spacing: np.ndarray, center_mm: np.ndarray) -> list[np.ndarray]:
    """Sparse mm offsets from `center_mm` of the voxel centres inside `box`."""
    axes = [(np.arange(sl.start, sl.stop) + 0.5) * sp - c for sl, sp, c in zip(box, spacing, center_mm)]
    return np.meshgrid(*axes, indexing="ij", sparse=True)


def _rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))


def _lesion_distance(rng: np.random.Generator, box: tuple[slice, ...], spacing: np.ndarray, center_mm: np.ndarray,
                     radius_mm: float) -> np.ndarray:
    """Normalised distance (1 on the surface) of an irregular ellipsoid: random axes, a wobbly surface."""
    axes = np.exp(rng.uniform(-0.25, 0.25, 3))
    axes /= np.prod(axes) ** (1 / 3)  # keeps the nominal volume
    rot = _rotation(rng)
    d = _coords(box, spacing, center_mm)
    local = [sum(rot[r, c] * d[r] for r in range(3)) / (radius_mm * axes[c]) for c in range(3)]
    dist = np.sqrt(local[0] ** 2 + local[1] ** 2 + local[2] ** 2)
    wobble = np.zeros_like(dist)
    norm = np.maximum(dist, 1e-6)
    for _ in range(4):
        u = rng.standard_normal(3)
        u /= np.linalg.norm(u)
        cos = (local[0] * u[0] + local[1] * u[1] + local[2] * u[2]) / norm
        wobble += rng.uniform(0.03, 0.08) * np.cos(np.pi * rng.integers(1, 4) * cos + rng.uniform(0, 2 * np.pi))
    return dist * (1 + wobble)


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int, int], spacing: np.ndarray, scale_mm: float) -> np.ndarray:
    """Zero-mean, unit-std smooth random field with structures about `scale_mm` across."""
    coarse = tuple(max(2, int(np.ceil(n * s / scale_mm)) + 1) for n, s in zip(shape, spacing))
    field = ndimage.zoom(rng.standard_normal(coarse).astype(np.float32),
                         [n / c for n, c in zip(shape, coarse)], order=3, mode="nearest", grid_mode=True)
    field = field[: shape[0], : shape[1], : shape[2]]
    return (field - field.mean()) / max(float(field.std()), 1e-6)


def make_lesion_case(rng: np.random.Generator, in_plane: int = 512) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """One case: image (2, I, J, K) float32 (T1c, FLAIR), label (I, J, K) uint8 (1 = tumour), spacing in mm.

    >>> image, label, spacing = make_lesion_case(np.random.default_rng(0), in_plane=64)
    >>> image.shape[:3], label.shape == image.shape[1:], spacing[0], 5.0 <= spacing[2] <= 7.0
    ((2, 64, 64), True, 4.0, True)
    """
    if in_plane < 32:
        raise VolsegError(None, f"in_plane must be at least 32 pixels, got {in_plane}")
    n_slices = int(rng.integers(SLICES[0], SLICES[1] + 1))
    thick = float(np.round(rng.uniform(*THICKNESS_MM), 2))
    pixel = FOV_MM / in_plane
    spacing = (pixel, pixel, thick)
    fine_sp = np.array([pixel, pixel, thick / SUB_SLICES])
    fine = (in_plane, in_plane, n_slices * SUB_SLICES)
    extent = np.array(fine) * fine_sp
    t1 = np.zeros(fine, np.float32)
    fl = np.zeros(fine, np.float32)
    tumour = np.zeros(fine, bool)

    # head: nested ellipsoid shells, centred in-plane near the middle, the slices covering part of it
    semi = np.array([rng.uniform(68, 78), rng.uniform(85, 95), rng.uniform(62, 72)])
    head_c = np.array([extent[0] / 2 + rng.uniform(-8, 8), extent[1] / 2 + rng.uniform(-8, 8),
                       extent[2] / 2 + rng.uniform(-0.15, 0.15) * extent[2]])
    whole = tuple(slice(0, n) for n in fine)
    x = _coords(whole, fine_sp, head_c)
    r = np.sqrt((x[0] / semi[0]) ** 2 + (x[1] / semi[1]) ** 2 + (x[2] / semi[2]) ** 2).astype(np.float32)
    for lo, hi, value in ((0.93, 1.0, _SCALP), (0.88, 0.93, _SKULL), (0.87, 0.88, _DURA), (0.84, 0.87, _CSF),
                          (0.0, 0.84, _BRAIN)):
        _paint(t1, fl, (r >= lo) & (r < hi), value, whole)
    brain = r < 0.84
    # ventricles: two dark ellipsoids beside the midline
    for side in (-1, 1):
        c = head_c + np.array([rng.uniform(-4, 4), side * rng.uniform(8, 12), rng.uniform(-6, 6)])
        v_semi = np.array([rng.uniform(18, 26), rng.uniform(5, 8), rng.uniform(10, 16)])
        box = _box(c / fine_sp, v_semi / fine_sp + 1, fine)
        d = _coords(box, fine_sp, c)
        mask = (d[0] / v_semi[0]) ** 2 + (d[1] / v_semi[1]) ** 2 + (d[2] / v_semi[2]) ** 2 < 1
        _paint(t1, fl, mask, _CSF, box)

    def inside_brain(margin: float) -> np.ndarray:
        while True:
            p = rng.uniform(-1, 1, 3)
            if np.linalg.norm(p) < margin:
                c = head_c + p * semi
                if 0 <= c[2] < extent[2]:
                    return c

    # look-alikes: enhancing vessels (T1c) and white-matter hyperintensities (FLAIR), unlabelled
    for value, count, radius in ((_VESSEL, int(rng.integers(10, 20)), (1.0, 2.5)), (_WMH, int(rng.integers(6, 14)), (2.0, 4.0))):
        for _ in range(count):
            c, rad = inside_brain(0.75), rng.uniform(*radius)
            box = _box(c / fine_sp, rad / fine_sp + 1, fine)
            d = _coords(box, fine_sp, c)
            _paint(t1, fl, (d[0] ** 2 + d[1] ** 2 + d[2] ** 2 < rad**2) & brain[box], value, box)

    # tumours: oedema first, then the enhancing rim, then the necrotic core
    for _ in range(int(rng.integers(1, 4))):
        volume_mm3 = 1000 * float(np.exp(rng.uniform(np.log(LESION_CM3[0]), np.log(LESION_CM3[1]))))
        radius = (3 * volume_mm3 / (4 * np.pi)) ** (1 / 3)
        oedema = rng.uniform(1.4, 2.2)
        c = inside_brain(0.55)
        box = _box(c / fine_sp, oedema * 1.4 * radius / fine_sp + 1, fine)
        dist = _lesion_distance(rng, box, fine_sp, c, radius)
        in_brain = brain[box]
        _paint(t1, fl, (dist < oedema) & (dist >= 1) & in_brain, _OEDEMA, box)
        core = rng.uniform(0.45, 0.7)
        _paint(t1, fl, (dist < 1) & (dist >= core) & in_brain, _RIM, box)
        _paint(t1, fl, (dist < core) & in_brain, _CORE, box)
        tumour[box] |= (dist < 1) & in_brain

    # partial volume over each thick slice, then texture, bias, noise and the scanner's scale
    shape = (in_plane, in_plane, n_slices)
    t1 = t1.reshape(*shape, SUB_SLICES).mean(-1)
    fl = fl.reshape(*shape, SUB_SLICES).mean(-1)
    label = (tumour.reshape(*shape, SUB_SLICES).mean(-1) >= 0.5).astype(np.uint8)
    sp = np.asarray(spacing)
    texture = 1 + 0.08 * _smooth_field(rng, shape, sp, 12.0)  # grey/white-matter-like mottling
    image = np.empty((2, *shape), np.float32)
    for ch, signal in enumerate((t1, fl)):
        bias = 1 + 0.25 * _smooth_field(rng, shape, sp, 150.0)
        clean = signal * texture * np.clip(bias, 0.5, 1.5)
        noise = 0.05
        real = clean + noise * rng.standard_normal(shape, dtype=np.float32)
        imag = noise * rng.standard_normal(shape, dtype=np.float32)
        image[ch] = np.sqrt(real * real + imag * imag) * (400.0 * 2.0 ** rng.uniform(-1, 1))
    return image, label, spacing


def write_lesion_dataset(out_dir: str | Path, n_cases: int = 6, n_test: int = 4, seed: int = 0, in_plane: int = 512) -> Path:
    """Write `make_lesion_case` cases in the nnU-Net v2 layout (test cases to imagesTs/labelsTs)."""
    from tqdm import tqdm

    from volseg.layout import write_dataset_json
    from volseg.volumes import write_volume

    for name, value, low in (("n_cases", n_cases, 1), ("n_test", n_test, 0), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise VolsegError(None, f"{name} must be an integer >= {low}, got {value!r}")
    out = Path(out_dir)
    splits = [("imagesTr", "labelsTr", range(n_cases)), ("imagesTs", "labelsTs", range(n_cases, n_cases + n_test))]
    with tqdm(total=n_cases + n_test, desc="lesion cases", unit="case", disable=None) as bar:
        for images_dir, labels_dir, indices in splits:
            for index in indices:
                image, label, spacing = make_lesion_case(np.random.default_rng([seed, index]), in_plane)
                affine = np.diag([*spacing, 1.0])
                affine[:3, 3] = [-FOV_MM / 2 + 3.5, -FOV_MM / 2 - 11.0, -label.shape[2] * spacing[2] / 2 + 20.0]
                name = f"case_{index:03d}"
                for ch in range(2):
                    write_volume(out / images_dir / f"{name}_{ch:04d}.nii.gz", image[ch], affine=affine)
                write_volume(out / labels_dir / f"{name}.nii.gz", label, affine=affine)
                bar.update(1)
    params = {"generator": "volseg.synthetic_lesions.write_lesion_dataset", "seed": int(seed), "n_cases": int(n_cases),
              "n_test": int(n_test), "in_plane": int(in_plane)}
    write_dataset_json(out, "volseg-synthetic-lesions", ["T1c", "FLAIR"], {"background": 0, "tumour": 1}, n_cases,
                       "volseg synthetic thick-slice brain MRI with tumours: " + json.dumps(params, sort_keys=True),
                       generator_params=params)
    return out
