"""Frozen dataclasses for everything a run needs; serialised as JSON into the model file.

One `Config` travels from training into the model file so that prediction preprocesses exactly as
training did (channels, labels, normalisation, spacing, patch size) without guessing.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from typing import Any

from volseg.errors import VolsegError

FORMAT_VERSION = 1
LABEL_MODES = ("nearest", "linear")


@dataclass(frozen=True)
class DataConfig:
    """What the network sees: channels, label values and how intensities are normalised."""

    channel_names: tuple[str, ...] = ("image",)
    labels: tuple[tuple[str, int], ...] = (("background", 0), ("foreground", 1))
    ignore_label: int | None = None
    file_ending: str = ".nii.gz"
    normalization: str = "zscore"  # "zscore" | "zscore_nonzero" | "ct" | "none"
    channel_normalization: tuple[str, ...] = ()  # per channel; empty = `normalization` for every channel
    intensity_stats: tuple[tuple[float, float, float, float], ...] = ()  # per channel (lo, hi, mean, std) for "ct"
    spacing: tuple[float, float, float] | None = None  # training (target) spacing in mm; None = never resample

    @property
    def channel_methods(self) -> tuple[str, ...]:
        """The normalisation of each input channel."""
        return self.channel_normalization or (self.normalization,) * len(self.channel_names)

    @property
    def num_classes(self) -> int:
        """Output channels: every declared label except `ignore`."""
        return len(self.class_values)

    @property
    def class_values(self) -> tuple[int, ...]:
        """Label values the network predicts, sorted; index i of the output is value i's logit."""
        return tuple(sorted(v for n, v in self.labels if v != self.ignore_label))

    @property
    def foreground_labels(self) -> dict[int, str]:
        """Non-background, non-ignore labels by value, for metrics tables."""
        return {v: n for n, v in self.labels if v != 0 and v != self.ignore_label}


@dataclass(frozen=True)
class ModelConfig:
    """3D U-Net shape: depth counts resolution levels (depth 4 = three poolings)."""

    in_channels: int = 1
    num_classes: int = 2
    base_width: int = 16
    max_width: int = 256
    depth: int = 4
    norm: str = "instance"  # "instance" | "batch" | "none"
    padding: str = "same"  # "same" keeps sizes; "valid" is the original 3D U-Net (output smaller)
    # extra 1x1x1 heads on the coarser decoder levels, trained on downsampled labels (nnU-Net's deep
    # supervision); prediction reads the full-resolution head only
    deep_supervision: bool = False
    # Per level, (I, J, K): convolution kernels (`depth` entries) and the pooling after each level but
    # the last (`depth - 1` entries, also the up-convolutions' kernel and stride). Empty means the 3D
    # U-Net's 3x3x3 kernels and 2x2x2 pooling at every level; thick-slice data gets 1x3x3 kernels and
    # 2x2x1 pooling where its coarse axis is still much coarser (`volseg.planning.plan_network`).
    kernel_sizes: tuple[tuple[int, int, int], ...] = ()
    pool_sizes: tuple[tuple[int, int, int], ...] = ()

    def __post_init__(self) -> None:
        for name, n, allowed in (("kernel_sizes", self.depth, (1, 3, 5, 7)), ("pool_sizes", self.depth - 1, (1, 2, 3, 4))):
            value = getattr(self, name)
            if value and (len(value) != n or any(len(v) != 3 or any(k not in allowed for k in v) for v in value)):
                raise VolsegError(None, f"model {name} must hold {n} (I, J, K) triples of {allowed} for depth "
                                        f"{self.depth}, got {value}")


FOREGROUND_SAMPLING = ("voxel", "object")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation schedule; poly decay runs on whichever is further along: epochs or minutes."""

    patch_size: tuple[int, int, int] = (64, 64, 64)
    batch_size: int = 2
    iters_per_epoch: int = 0  # 0 = auto: about 1/30 of the time budget per epoch (10..250 steps)
    max_epochs: int = 1000
    max_minutes: float = 60.0
    lr: float = 0.01
    momentum: float = 0.99
    nesterov: bool = True
    weight_decay: float = 3e-5
    poly_exponent: float = 0.9
    loss: str = "dice_ce"  # "dice_ce" | "ce" | "dice" | "bce" | "bce_dice"
    # Per-voxel loss weights, precomputed once per case (volseg.weights): class balance from label
    # frequencies and the U-Net border term w0 * exp(-(d1 + d2)^2 / (2 sigma^2)) on the background
    # between touching objects (border_w0 = 0: off). Unlabelled voxels keep weight 0 either way.
    class_balance: bool = False
    border_w0: float = 0.0
    border_sigma_mm: float = 5.0
    foreground_fraction: float = 0.33
    # Which foreground voxel a forced-foreground patch is centred on, once its class is drawn:
    # "voxel" = any voxel of the class (large objects dominate), "object" = first one of the
    # class's connected objects in the case, each as often, then a voxel of it (small lesions
    # beside large ones are seen as often as the large ones).
    foreground_sampling: str = "voxel"
    augment: bool = True  # the `augment` section's transforms; False: patches as cut, no mirroring
    val_fraction: float = 0.2
    fold: int | None = None  # cross-validation: validate on fold `fold` of `folds` (None: val_fraction split)
    folds: int = 5
    patience: int = 0  # epochs without val-loss improvement before stopping; 0 = never stop early
    min_delta: float = 1e-4
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.border_w0 >= 0 or not self.border_sigma_mm > 0:
            raise VolsegError(None, f"border_w0 must be >= 0 and border_sigma_mm > 0, got {self.border_w0} and "
                                    f"{self.border_sigma_mm}")
        if self.foreground_sampling not in FOREGROUND_SAMPLING:
            raise VolsegError(None, f"foreground_sampling must be one of {', '.join(FOREGROUND_SAMPLING)}, "
                                    f"got {self.foreground_sampling!r}")

    @property
    def weight_map_spec(self) -> dict[str, Any] | None:
        """What the precomputed loss-weight map depends on; None when no map is needed."""
        if not self.class_balance and self.border_w0 == 0:
            return None
        return {"class_balance": self.class_balance, "w0": self.border_w0, "sigma_mm": self.border_sigma_mm}


@dataclass(frozen=True)
class AugmentConfig:
    """Per-transform probabilities (per sample) and ranges; defaults follow nnU-Net's.

    `zoom` is the magnification of the content: 2 shows objects twice as large (a smaller field of
    view), 0.7 shrinks them. `elastic_magnitude_mm` bounds the control-point displacements (drawn
    uniformly in +-magnitude, the magnitude itself uniformly in the range); `elastic_spacing_mm` is
    the distance between control points: larger means smoother. When max/min spacing exceeds
    `anisotropy_ratio`, rotation is about the thick axis only, and zoom and elastic displacement
    stay in-plane. `label_mode` "nearest" copies the nearest label; "linear" interpolates one-hot
    labels and takes the argmax (smoother borders, one extra channel per class).

    Blur (`blur_sigma` in voxels, per axis) and low-resolution simulation (down by `lowres_scale`
    with nearest, back up with linear interpolation) are drawn per sample, then each channel takes
    part with probability 1/2, as nnU-Net's; for anisotropic voxels both stay in-plane.
    `gamma_invert_p` applies a second gamma to the negated image (dark structures brighten). These
    three are off by default (see below); nnU-Net uses blur_p 0.2, lowres_p 0.25, gamma_invert_p
    0.1 and gamma_p 0.3.
    """

    rotation_p: float = 0.2
    rotation_deg: tuple[float, float, float] = (30.0, 30.0, 30.0)  # max |angle| about axis 0, 1, 2
    zoom_p: float = 0.2
    zoom_range: tuple[float, float] = (0.7, 1.4)
    zoom_per_axis: bool = False
    elastic_p: float = 0.2
    elastic_magnitude_mm: tuple[float, float] = (0.0, 6.0)
    elastic_spacing_mm: float = 24.0
    noise_p: float = 0.1
    noise_std: tuple[float, float] = (0.0, 0.3)
    brightness_p: float = 0.15
    brightness_range: tuple[float, float] = (0.75, 1.25)
    contrast_p: float = 0.15
    contrast_range: tuple[float, float] = (0.75, 1.25)
    gamma_p: float = 0.15
    gamma_range: tuple[float, float] = (0.7, 1.5)
    # nnU-Net's further intensity transforms, off by default: with nnU-Net's probabilities (gamma_p
    # 0.3, gamma_invert_p 0.1, blur_p 0.2, lowres_p 0.25) the thick-slice lesion benchmark lost
    # 0.04 Dice over three paired runs (docs/benchmarks.md)
    gamma_invert_p: float = 0.0
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.5, 1.0)  # voxels
    lowres_p: float = 0.0
    lowres_scale: tuple[float, float] = (0.5, 1.0)
    mirror_p: float = 0.5  # per axis
    mirror_axes: tuple[int, ...] = (0, 1, 2)
    anisotropy_ratio: float = 3.0
    label_mode: str = "nearest"  # "nearest" | "linear"

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.endswith("_p") and not 0.0 <= value <= 1.0:
                raise VolsegError(None, f"augment {f.name} must be a probability in [0, 1], got {value}")
        for name in ("zoom_range", "elastic_magnitude_mm", "noise_std", "brightness_range", "contrast_range",
                     "gamma_range", "blur_sigma", "lowres_scale"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise VolsegError(None, f"augment {name} must be (low, high) with 0 <= low <= high, got {(lo, hi)}")
        if self.zoom_range[0] <= 0 or self.gamma_range[0] <= 0:
            raise VolsegError(None, "augment zoom_range and gamma_range must be positive")
        if not 0 < self.lowres_scale[0] <= self.lowres_scale[1] <= 1:
            raise VolsegError(None, f"augment lowres_scale must be within (0, 1], got {self.lowres_scale}")
        if len(self.rotation_deg) != 3 or any(not 0 <= a <= 180 for a in self.rotation_deg):
            raise VolsegError(None, f"augment rotation_deg needs three angles in [0, 180], got {self.rotation_deg}")
        if self.elastic_spacing_mm <= 0:
            raise VolsegError(None, f"augment elastic_spacing_mm must be positive, got {self.elastic_spacing_mm}")
        if any(a not in (0, 1, 2) for a in self.mirror_axes):
            raise VolsegError(None, f"augment mirror_axes must be among 0, 1, 2, got {self.mirror_axes}")
        if self.label_mode not in LABEL_MODES:
            raise VolsegError(None, f"augment label_mode {self.label_mode!r} is not one of {LABEL_MODES}")


@dataclass(frozen=True)
class InferConfig:
    """Sliding-window settings."""

    overlap: float = 0.5
    blend: str = "gaussian"  # "gaussian" | "uniform"
    batch_size: int = 2


@dataclass(frozen=True)
class Config:
    """Everything a model file needs to be used again."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str, source: str | None = None) -> Config:
        """Parse a config written by `to_json`; refuse other versions with a clear message."""
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise VolsegError(source, f"config is not valid JSON ({exc.msg} at line {exc.lineno})") from None
        if not isinstance(raw, dict):
            raise VolsegError(source, "config must be a JSON object")
        version = raw.get("version")
        if version != FORMAT_VERSION:
            raise VolsegError(
                source,
                f"config format version {version!r} is not supported (this volseg reads version {FORMAT_VERSION})",
                "re-train or use the volseg release that wrote it",
            )
        try:
            return cls(
                data=_build(DataConfig, raw.get("data", {})),
                model=_build(ModelConfig, raw.get("model", {})),
                train=_build(TrainConfig, raw.get("train", {})),
                infer=_build(InferConfig, raw.get("infer", {})),
                augment=_build(AugmentConfig, raw.get("augment", {})),
                version=version,
            )
        except (TypeError, ValueError) as exc:
            raise VolsegError(source, f"config has wrong fields or types: {exc}") from None


# Fields that format version 1 files may still carry but that no longer mean anything: skipped on
# reading (mirroring moved into the `augment` section), so older model files keep loading.
_RETIRED: dict[str, tuple[str, ...]] = {"TrainConfig": ("mirror",)}


def _build(cls: type, values: dict[str, Any]) -> Any:
    """Build a dataclass from JSON, turning lists back into tuples and rejecting unknown keys."""
    if not isinstance(values, dict):
        raise TypeError(f"{cls.__name__} must be an object")
    values = {k: v for k, v in values.items() if k not in _RETIRED.get(cls.__name__, ())}
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(names)
    if unknown:
        raise TypeError(f"unknown {cls.__name__} fields {sorted(unknown)}")
    defaults = cls()
    out = {}
    for key, value in values.items():
        value = _tuplify(value)
        _check_type(f"{cls.__name__}.{key}", value, getattr(defaults, key))
        out[key] = value
    return cls(**out)


def _check_type(name: str, value: Any, default: Any) -> None:
    """Reject values whose JSON type differs from the field's default (a string depth, say)."""
    if value is None:
        if default is None or name.endswith(("ignore_label", ".fold")):
            return
        raise TypeError(f"{name} must not be null")
    if name.endswith(("ignore_label", ".fold")):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif isinstance(default, str):
        ok = isinstance(value, str)
    elif isinstance(default, tuple):
        ok = isinstance(value, tuple)
    else:
        ok = True
    if not ok:
        raise TypeError(f"{name} has the wrong type ({type(value).__name__}: {value!r})")


def _tuplify(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tuplify(v) for v in value)
    return value
