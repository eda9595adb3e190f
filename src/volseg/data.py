"""Training data: preprocess each case once into a disk cache, then cut random patches from memory maps.

Cached arrays are memory-mapped, so datasets larger than RAM train without loading everything,
and a resumed run skips preprocessing.
"""

from __future__ import annotations

import dataclasses
import json
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cc3d
import numpy as np
import torch

from volseg import augment as aug
from volseg import layout, volumes
from volseg.config import AugmentConfig, DataConfig
from volseg.errors import VolsegError
from volseg.preprocessing import encode_labels, needs_resampling, normalize, resample_image, resample_labels
from volseg.sampling import crop_pad, random_patch_start
from volseg.weights import weight_map

_MAX_FG_VOXELS = 20_000  # per class and case: enough positions to oversample from
# A forced-foreground voxel lies this far (share of the patch) inside an augmented patch's faces: a
# point in the central half stays inside under the default rotation (30 deg) and zoom (up to 1.4x).
FG_INNER = 0.25


@dataclass
class CaseData:
    """One preprocessed training case (arrays may be memory maps)."""

    case_id: str
    image: np.ndarray  # (C, I, J, K) float32, normalised
    label: np.ndarray  # (I, J, K) class indices
    weight: np.ndarray | None  # (I, J, K) uint8, 0 = unlabelled; None when every voxel is labelled
    fg_voxels: dict[int, np.ndarray]  # class index -> (N, 3) labelled voxel positions of that class
    spacing: tuple[float, float, float]
    labelled_voxels: np.ndarray | None = None  # (N, 3) sample of labelled positions; None = all labelled
    loss_weight: np.ndarray | None = None  # (I, J, K) float32 precomputed weight map (volseg.weights); None = `weight`
    # class index -> one array per connected object of indices into fg_voxels[class]; None = not grouped
    fg_objects: dict[int, list[np.ndarray]] | None = None


def with_objects(case: CaseData) -> CaseData:
    """The case with its foreground positions grouped into connected objects (26-connected, per class).

    Why: voxel-uniform foreground sampling centres patches on a 10 cm³ lesion twenty times as often
    as on a 0.5 cm³ one in the same scan; `foreground_sampling="object"` draws the objects evenly.
    """
    objects: dict[int, list[np.ndarray]] = {}
    for c, pos in case.fg_voxels.items():
        if not len(pos):
            objects[c] = []
            continue
        ids = cc3d.connected_components(np.asarray(case.label) == c, connectivity=26, binary_image=True)
        at = ids[pos[:, 0], pos[:, 1], pos[:, 2]]
        order = np.argsort(at, kind="stable")
        _, first = np.unique(at[order], return_index=True)
        objects[c] = np.split(order, first[1:])
    return dataclasses.replace(case, fg_objects=objects)


def _cache_key(data: DataConfig) -> str:
    return json.dumps(
        {"norm": data.channel_methods, "stats": data.intensity_stats, "classes": data.class_values, "ignore": data.ignore_label,
         "spacing": data.spacing, "v": 3}
    )


def preprocess_case(case: layout.Case, data: DataConfig, cache_dir: Path, weight_spec: dict | None = None) -> CaseData:
    """Normalise, encode labels and index foreground voxels of one case; reuse the cache when valid.

    With `weight_spec` (`TrainConfig.weight_map_spec`) the per-voxel loss-weight map is computed
    too and cached beside the arrays under its own key, so changing only its parameters recomputes
    the map and nothing else.
    """
    stem = cache_dir / case.case_id
    key_file = stem.with_name(case.case_id + ".json")
    key = _cache_key(data)
    if not (key_file.exists() and json.loads(key_file.read_text()).get("key") == key):
        if case.label is None:
            raise VolsegError(case.images[0], f"training case {case.case_id} has no label file")
        declared = set(data.class_values) | ({data.ignore_label} if data.ignore_label is not None else set())
        image, label_volume = layout.read_case(case, declared=declared)
        label = label_volume.array[0]  # type: ignore[union-attr]  # a label exists: checked above
        pixels, spacing = image.array, image.spacing
        if data.spacing is not None and needs_resampling(spacing, data.spacing):
            pixels = resample_image(pixels, spacing, data.spacing)
            label = resample_labels(label, pixels.shape[1:])
            spacing = data.spacing
        index, known = encode_labels(label, data.class_values, data.ignore_label)
        rng = np.random.default_rng(0)
        fg = {}
        for c in range(1, len(data.class_values)):
            fg[f"c{c}"] = _positions((index == c) & (known > 0), rng)
        if not known.all():
            # sparse labels: remember where annotation exists so that no patch misses it
            fg["labelled"] = _positions(known > 0, rng)
        cache_dir.mkdir(parents=True, exist_ok=True)
        _save_npy(stem.with_name(case.case_id + "_image.npy"), normalize(pixels, data.channel_methods, data.intensity_stats))
        _save_npy(stem.with_name(case.case_id + "_label.npy"), index)
        _save_npy(stem.with_name(case.case_id + "_weight.npy"), known)
        tmp = stem.with_name(case.case_id + "_fg.tmp.npz")
        np.savez(tmp, **fg)
        tmp.replace(stem.with_name(case.case_id + "_fg.npz"))
        key_file.write_text(json.dumps({"key": key, "spacing": list(spacing), "all_labelled": bool(known.all())}))
    meta = json.loads(key_file.read_text())
    loss_weight = None
    if weight_spec is not None:
        loss_weight = _cached_weight_map(case, data, stem, key, weight_spec, tuple(meta["spacing"]))
    with np.load(stem.with_name(case.case_id + "_fg.npz"), allow_pickle=False) as f:
        fg_voxels = {int(k[1:]): f[k] for k in f.files if k.startswith("c")}
        labelled = f["labelled"] if "labelled" in f.files else None
    return CaseData(
        case_id=case.case_id,
        image=np.load(stem.with_name(case.case_id + "_image.npy"), mmap_mode="r"),
        label=np.load(stem.with_name(case.case_id + "_label.npy"), mmap_mode="r"),
        weight=None if meta["all_labelled"] else np.load(stem.with_name(case.case_id + "_weight.npy"), mmap_mode="r"),
        fg_voxels=fg_voxels,
        spacing=tuple(meta["spacing"]),
        labelled_voxels=labelled,
        loss_weight=loss_weight,
    )


def instance_file(case: layout.Case) -> Path | None:
    """The case's instance-label file, `instancesTr/<case><ending>` beside `labelsTr/`, if there is one.

    Instance ids separate touching objects of one class, which connected components cannot.
    """
    if case.label is None:
        return None
    path = case.label.parent.parent / "instancesTr" / case.label.name
    return path if path.is_file() else None


def _cached_weight_map(case: layout.Case, data: DataConfig, stem: Path, key: str, spec: dict,
                       spacing: tuple[float, ...]) -> np.ndarray:
    """The case's loss-weight map from the cache, computed first when missing or made with other parameters."""
    path = stem.with_name(case.case_id + "_wmap.npy")
    key_file = stem.with_name(case.case_id + "_wmap.json")
    inst_path = instance_file(case)
    wkey = json.dumps({"spec": spec, "data": key, "instances": None if inst_path is None else inst_path.name})
    if not (key_file.exists() and path.exists() and json.loads(key_file.read_text()).get("key") == wkey):
        label = np.load(stem.with_name(case.case_id + "_label.npy"))
        known = np.load(stem.with_name(case.case_id + "_weight.npy"))
        instances = None
        if inst_path is not None and spec["w0"] > 0:
            instances = volumes.read_label(inst_path).array[0]
            if instances.shape != label.shape:  # the case was resampled to the training spacing
                raw_shape = volumes.read_label(case.label).shape  # type: ignore[arg-type]  # instance_file needs a label
                if instances.shape != raw_shape:
                    raise VolsegError(inst_path, f"instance map has shape {instances.shape}, its label {raw_shape}",
                                      "write it on the label's grid")
                instances = resample_labels(instances, label.shape)
        wmap = weight_map(label, data.num_classes, spacing, known=known, instances=instances,
                          w0=spec["w0"], sigma_mm=spec["sigma_mm"], class_balance=spec["class_balance"])
        _save_npy(path, wmap.astype(np.float32))
        key_file.write_text(json.dumps({"key": wkey}))
    return np.load(path, mmap_mode="r")


def _positions(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(N, 3) voxel positions where `mask` holds, a seeded sample of at most _MAX_FG_VOXELS."""
    pos = np.argwhere(mask).astype(np.int32)
    if len(pos) > _MAX_FG_VOXELS:
        pos = pos[rng.choice(len(pos), _MAX_FG_VOXELS, replace=False)]
    return pos


def _save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, np.ascontiguousarray(array))
    tmp.replace(path)


def sample_patch(
    case: CaseData,
    patch: Sequence[int],
    rng: np.random.Generator,
    force_fg: bool,
    mirror: bool,
    region: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One (image, class-index, weight) patch; `force_fg` centres it on a random labelled object voxel.

    The class is drawn first, each as often; with `case.fg_objects` (`with_objects`) and more than
    one object of that class, an object next, each as often; then a voxel of it.

    With sparse labels, patches not forced onto foreground are centred on a random labelled voxel,
    so no patch is wasted on a region without annotation. Padding outside the volume gets weight 0:
    the network is not taught what lies beyond the scan. With `region` (larger than `patch`), the
    region centred on the chosen patch is cut instead, for augmentation to resample from.
    """
    center, inner = None, 0.0
    classes = [c for c, pos in case.fg_voxels.items() if len(pos)]
    if force_fg and classes:
        c = classes[rng.integers(len(classes))]  # each class as often, however small
        pos = case.fg_voxels[c]
        groups = case.fg_objects.get(c, []) if case.fg_objects is not None else []
        if len(groups) > 1:  # one object: no extra draw, so the stream equals voxel sampling's
            members = groups[rng.integers(len(groups))]
            center = pos[members[rng.integers(len(members))]]
        else:
            center = pos[rng.integers(len(pos))]
        inner = FG_INNER  # in the central half: an augmented (rotated, zoomed) patch still holds the object
    elif case.labelled_voxels is not None and len(case.labelled_voxels):
        center = case.labelled_voxels[rng.integers(len(case.labelled_voxels))]
    shape = case.label.shape
    start = random_patch_start(shape, patch, rng, center, inner)
    size = tuple(patch)
    if region is not None:
        start = tuple(s - (r - p) // 2 for s, r, p in zip(start, region, patch))
        size = tuple(region)
    x = crop_pad(case.image, start, size)
    y = crop_pad(case.label, start, size)
    if case.loss_weight is not None:
        w = crop_pad(case.loss_weight, start, size)
    else:
        w = crop_pad(case.weight if case.weight is not None else np.ones(shape, np.uint8), start, size)
    if mirror:
        for axis in range(3):
            if rng.random() < 0.5:
                x, y, w = np.flip(x, axis + 1), np.flip(y, axis), np.flip(w, axis)
    return np.ascontiguousarray(x), np.ascontiguousarray(y), np.ascontiguousarray(w)


def sample_batch(
    cases: Sequence[CaseData],
    patch: Sequence[int],
    batch_size: int,
    rng: np.random.Generator,
    fg_fraction: float,
    mirror: bool,
    augment: AugmentConfig | None = None,
    num_classes: int = 2,
    defer_augment: bool = False,
) -> tuple:
    """A training batch (image, class index, weight); at least round(fg_fraction * batch) patches
    hold labelled foreground.

    With `augment`, parameters are drawn for the whole batch first, a region large enough for them
    is cut around each patch, and one batched resampling produces the patches (`mirror` is then
    the augment config's business). `defer_augment` returns the regions and the parameters as a
    fourth item instead, so the caller can resample on the GPU (`finish_augment`).
    """
    n_fg = max(1, round(fg_fraction * batch_size)) if fg_fraction > 0 else 0
    params = region = None
    if augment is not None:
        params = aug.sample_params(rng, batch_size, augment, cases[0].spacing, patch,
                                    channels=cases[0].image.shape[0])
        region = aug.input_size_for_params(params, patch)
    xs, ys, ws = [], [], []
    for b in range(batch_size):
        case = cases[rng.integers(len(cases))]
        x, y, w = sample_patch(case, patch, rng, force_fg=b >= batch_size - n_fg,
                               mirror=mirror and augment is None, region=region)
        xs.append(x)
        ys.append(y)
        ws.append(w)
    if params is not None:
        regions = (torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys)), torch.from_numpy(np.stack(ws)))
        if defer_augment:
            return (*regions, params)
        return finish_augment(*regions, params, patch, num_classes)
    return (
        torch.from_numpy(np.stack(xs)),
        torch.from_numpy(np.stack(ys).astype(np.int64)),
        torch.from_numpy(np.stack(ws).astype(np.float32)),
    )


def finish_augment(
    image: torch.Tensor, label: torch.Tensor, weight: torch.Tensor, params: aug.AugmentParams,
    patch: Sequence[int], num_classes: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Resample cut regions into augmented patches, on whatever device the tensors are on."""
    x, y, w = aug.apply(image, label, weight, params, tuple(patch), num_classes)
    return x.contiguous(), y.long(), w.float()


class BatchStream:
    """Batches produced by a background thread, so patch cutting overlaps the training step."""

    def __init__(self, cases: Sequence[CaseData], patch: Sequence[int], batch_size: int, rng: np.random.Generator,
                 fg_fraction: float, mirror: bool, prefetch: int = 2, augment: AugmentConfig | None = None,
                 num_classes: int = 2, defer_augment: bool = False) -> None:
        self._args = (cases, patch, batch_size, rng, fg_fraction, mirror, augment, num_classes, defer_augment)
        self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                item = sample_batch(*self._args)
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as exc:  # surface worker errors in the training thread
            self._queue.put(exc)

    def __iter__(self) -> Iterator[tuple]:
        return self

    def __next__(self) -> tuple:
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
