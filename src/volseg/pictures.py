"""Pictures of volumes for people to look at: three orthogonal slices with segmentation contours.

`render_slices` draws an image (or a black background) with one contour colour per label value,
each slice sized by its physical extent so that a 1 x 1 x 5 mm scan keeps its proportions, and
through the objects rather than between them (`object_centre`). `show_volume` is `volseg show`;
`volseg.htmlreport` puts the same pictures of the best, median and worst cases into its report.

This module sits above `report` (it reuses its contours and figures) and below `htmlreport`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from io import BytesIO
from pathlib import Path

import numpy as np

from volseg import atomic, layout, report, volumes
from volseg.errors import VolsegError

PathLike = str | os.PathLike
_AXIS_NAMES = "IJK"
_PANEL_WIDTH_IN = 10.0  # the three slices together; the legend comes on top of that
_MAX_HEIGHT_IN = 8.0
_WINDOW_SAMPLES = 2_000_000  # voxels used for the intensity percentiles of a large volume


# --------------------------------------------------------------------------------------------------
# pure helpers


def object_centre(mask: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> tuple[int, int, int]:
    """Voxel (i, j, k) that three orthogonal slices should go through to show the objects.

    The centre of mass of two separate objects lies between them, where every slice would miss
    both; so the foreground voxel nearest (in mm) to the centre of mass is taken. An empty mask
    gives the volume centre.

    >>> m = np.zeros((9, 5, 5), bool)
    >>> m[0:2, 2, 2] = True; m[6:9, 2, 2] = True
    >>> object_centre(m)
    (6, 2, 2)
    >>> object_centre(np.zeros((4, 5, 6), bool))
    (2, 2, 3)
    """
    coords = np.nonzero(mask)
    if coords[0].size == 0:
        return tuple(int(n) // 2 for n in np.shape(mask))  # type: ignore[return-value]
    points = np.stack(coords, axis=1).astype(np.float64) * np.asarray(spacing, dtype=np.float64)
    nearest = int(np.argmin(np.sum((points - points.mean(axis=0)) ** 2, axis=1)))
    return tuple(int(c[nearest]) for c in coords)  # type: ignore[return-value]


def intensity_window(image: np.ndarray, low_pct: float = 0.5, high_pct: float = 99.5) -> tuple[float, float]:
    """Grey-value range to display: the 0.5-99.5th percentiles of the finite voxels.

    A few very bright or dark voxels (metal, air) would otherwise squash the grey range. Large
    volumes are subsampled with a fixed stride (deterministic, a few million voxels suffice).

    >>> intensity_window(np.arange(1001.0))
    (5.0, 995.0)
    >>> intensity_window(np.full((2, 2), 3.0))
    (3.0, 4.0)
    """
    flat = np.asarray(image).ravel()
    step = max(1, flat.size // _WINDOW_SAMPLES)
    sample = flat[::step].astype(np.float64, copy=False)
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return 0.0, 1.0
    low, high = (float(v) for v in np.percentile(sample, [low_pct, high_pct]))
    if not high > low:
        high = low + 1.0
    return low, high


def _figure_size(shape: Sequence[int], spacing: Sequence[float], legend: bool) -> tuple[float, float, list[float]]:
    """Figure (width, height) in inches and panel width ratios from the slices' extents in mm."""
    extent_mm = [n * s for n, s in zip(shape, spacing)]
    widths, heights = [], []
    for axis in range(3):
        horizontal, vertical = [a for a in range(3) if a != axis]
        widths.append(extent_mm[horizontal])
        heights.append(extent_mm[vertical])
    scale = _PANEL_WIDTH_IN / sum(widths)  # inches per mm
    decoration_in = 1.2  # titles, tick labels, suptitle
    if max(heights) * scale + decoration_in > _MAX_HEIGHT_IN:
        scale = (_MAX_HEIGHT_IN - decoration_in) / max(heights)
    width_in = sum(widths) * scale + 0.9 + (1.9 if legend else 0.0)
    return width_in, max(heights) * scale + decoration_in, widths


# --------------------------------------------------------------------------------------------------
# orthogonal slices


def render_slices(
    image: np.ndarray | None,
    seg: np.ndarray | None = None,
    ref: np.ndarray | None = None,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    centre: Sequence[int] | None = None,
    title: str = "",
    label_names: dict[int, str] | None = None,
    skip_values: Sequence[int] = (),
    names: tuple[str, str] = ("prediction", "reference"),
) -> bytes:
    """PNG of three orthogonal slices through `centre` with label contours, as bytes.

    `image` (I, J, K) float or None (black background); `seg` solid and `ref` dashed contours,
    one colour per label value (the same value has the same colour in every picture). Each
    slice is drawn with its first remaining axis horizontal and the second vertical (origin
    lower left), pixels at their physical aspect, and the figure is sized from the extents in mm.
    The default `centre` is `object_centre` of `ref`, else `seg`, else the volume centre.
    """
    arrays = [a for a in (image, seg, ref) if a is not None]
    if not arrays:
        raise VolsegError(None, "nothing to draw", "give an image or a segmentation")
    shape = tuple(np.shape(arrays[0]))
    if len(shape) != 3:
        raise VolsegError(None, f"volumes must be (I, J, K), got shape {shape}")
    for name, array in (("image", image), ("seg", seg), ("ref", ref)):
        if array is not None and tuple(np.shape(array)) != shape:
            raise VolsegError(None, f"{name} shape {tuple(np.shape(array))} differs from {shape}")
    spacing_mm = tuple(float(s) for s in spacing)
    if len(spacing_mm) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing_mm):
        raise VolsegError(None, f"spacing must be 3 positive numbers (mm), got {tuple(spacing)}")
    skip = {int(v) for v in skip_values}

    def foreground(array: np.ndarray) -> np.ndarray:
        mask = array != 0
        for value in skip:
            mask &= array != value
        return mask

    if centre is None:
        shown = [a for a in (ref, seg) if a is not None and foreground(a).any()]
        centre = object_centre(foreground(shown[0]), spacing_mm) if shown else tuple(n // 2 for n in shape)
    centre = tuple(int(c) for c in centre)
    if len(centre) != 3 or not all(0 <= c < n for c, n in zip(centre, shape)):
        raise VolsegError(None, f"slice position {centre} is outside the volume of shape {shape}")
    values = sorted(set().union(*(report.nonzero_values(np.asarray(a)) for a in (seg, ref) if a is not None)) - skip)
    label_names = label_names or {}

    from matplotlib import colormaps
    from matplotlib.lines import Line2D

    palette = colormaps["tab10"]
    colours = {value: palette((value - 1) % 10) for value in values}
    background = np.zeros(shape, np.float32) if image is None else np.asarray(image, dtype=np.float32)
    low, high = intensity_window(background) if image is not None else (0.0, 1.0)
    width_in, height_in, ratios = _figure_size(shape, spacing_mm, legend=bool(values))
    fig = report._new_figure(width_in, height_in)
    axes = fig.subplots(1, 3, gridspec_kw={"width_ratios": ratios})
    for axis, ax in enumerate(axes):
        horizontal, vertical = [a for a in range(3) if a != axis]
        index = tuple(centre[axis] if a == axis else slice(None) for a in range(3))
        ax.imshow(
            background[index].T, cmap="gray", vmin=low, vmax=high, interpolation="nearest",
            aspect=spacing_mm[vertical] / spacing_mm[horizontal], origin="lower",
        )  # fmt: skip
        for array, style, width in ((seg, "solid", 1.3), (ref, "dashed", 1.8)):  # dashes need more ink
            if array is not None:
                report.draw_contours(ax, np.asarray(array[index]).T, values, colours, style, width)
        ax.set_title(f"{_AXIS_NAMES[axis]} = {centre[axis]}", fontsize="medium")
        ax.set_xlabel(f"{_AXIS_NAMES[horizontal]} ({spacing_mm[horizontal]:g} mm)")
        ax.set_ylabel(f"{_AXIS_NAMES[vertical]} ({spacing_mm[vertical]:g} mm)")
        ax.tick_params(labelsize="small")
    handles = [
        Line2D([], [], color=colours[v], linewidth=2.5, label=f"{v} {label_names[v]}" if v in label_names else str(v))
        for v in values
    ]
    if values and seg is not None and ref is not None:
        handles.append(Line2D([], [], color="grey", linestyle="solid", label=names[0]))
        handles.append(Line2D([], [], color="grey", linestyle="dashed", label=names[1]))
    if handles:
        fig.legend(handles=handles, loc="outside right center", fontsize="small", title="label")
    if title:
        fig.suptitle(title, fontsize="medium")
    buffer = BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _channel_path(image_path: Path, channel: int) -> Path:
    """The file of `channel` for a `<case>_<CCCC>` image (channel 0 is the file itself)."""
    if channel < 0:
        raise VolsegError(None, f"--channel must be >= 0, got {channel}")
    if channel == 0:
        return image_path
    ending = volumes.image_ending(image_path)
    stem = image_path.name[: -len(ending)] if ending else ""
    if not ending or len(stem) < 6 or stem[-5] != "_" or not stem[-4:].isdigit():
        raise VolsegError(
            image_path, f"has one channel; --channel {channel} needs an nnU-Net <case>_<CCCC> file name",
            "pass the channel's own file or --channel 0",
        )  # fmt: skip
    sibling = image_path.with_name(f"{stem[:-4]}{channel:04d}{ending}")
    if not sibling.is_file():
        raise VolsegError(sibling, f"channel {channel} file not found", f"next to {image_path}")
    return sibling


def check_on_grid(volume: volumes.Volume, path: PathLike, image: volumes.Volume, image_path: PathLike) -> None:
    """A one-channel map on the image's voxel grid, or a one-line error naming both files.

    Also what the HTML report checks its overlays with."""
    report.check_same_grid(volume, path, image, image_path, "give a segmentation of this image (resample it first)",
                           ref_is_label=False)


def _dataset_labels(seg_path: Path) -> tuple[dict[int, str], int | None]:
    """Label names and the ignore label from a dataset.json two folders up (labelsTr/x.nii.gz)."""
    root = seg_path.resolve().parent.parent
    if not (root / "dataset.json").is_file():
        return {}, None
    try:
        info = layout.read_dataset_info(root)
    except VolsegError:
        return {}, None  # names are a nicety; `volseg check` reports a broken dataset.json
    return {v: n for n, v in info.labels}, info.ignore_label


def show_volume(
    image_path: PathLike,
    out_png: PathLike,
    seg_path: PathLike | None = None,
    ref_path: PathLike | None = None,
    slice_vox: Sequence[int] | None = None,
    channel: int = 0,
    title: str | None = None,
) -> tuple[int, int, int]:
    """`volseg show`: write a PNG of three orthogonal slices; returns the voxel they go through.

    Slices go through `slice_vox` or the centre of the segmentation's objects (`ref` when given,
    else `seg`), else the volume centre. Segmentations must lie on the image's voxel grid. Label
    names (and the ignore label, not drawn) come from a dataset.json two folders above the
    segmentation, as in the nnU-Net layout.
    """
    image_path, out_png = Path(image_path), Path(out_png)
    if out_png.suffix.lower() != ".png":
        raise VolsegError(out_png, "output must be a .png file")
    source = _channel_path(image_path, int(channel))
    image = volumes.read_volume(source)
    segs: dict[str, np.ndarray | None] = {"seg": None, "ref": None}
    names: dict[int, str] = {}
    skip: list[int] = []
    for key, path in (("seg", seg_path), ("ref", ref_path)):
        if path is None:
            continue
        volume = volumes.read_label(path)
        check_on_grid(volume, path, image, source)
        segs[key] = volume.array[0]
        if not names:
            names, ignore = _dataset_labels(Path(path))
            skip = [] if ignore is None else [ignore]
    if slice_vox is not None:
        slice_vox = tuple(int(v) for v in slice_vox)
        if len(slice_vox) != 3 or not all(0 <= v < n for v, n in zip(slice_vox, image.shape)):
            raise VolsegError(
                None, f"--slice {','.join(map(str, slice_vox))} is outside the volume",
                f"each index must be in 0..n-1 for shape {image.shape}",
            )  # fmt: skip
    centre = slice_vox
    if centre is None:
        shown = [a for a in (segs["ref"], segs["seg"]) if a is not None]
        for array in shown:
            mask = (array != 0) & ~np.isin(array, skip)
            if mask.any():
                centre = object_centre(mask, image.spacing)
                break
        else:
            centre = tuple(n // 2 for n in image.shape)
    if title is None:
        parts = [source.name] + [Path(p).name for p in (seg_path, ref_path) if p is not None]
        title = " | ".join(parts)
    png = render_slices(
        image.array[0], segs["seg"], segs["ref"], image.spacing, centre, title, names, skip,
        names=("segmentation", "reference"),
    )  # fmt: skip
    with atomic.atomic_open(out_png, "wb") as f:
        f.write(png)
    return centre  # type: ignore[return-value]
