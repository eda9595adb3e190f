"""volseg.inference, bounded memory: the row-ring sliding window equals `sliding_window`, and so does
prediction through it; no float32 volume per class; probabilities and post-processing from the CLI."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from volseg import volumes
from volseg.checkpoint import load_model, save_model
from volseg.cli import main
from volseg.config import Config, DataConfig, ModelConfig, TrainConfig
from volseg.errors import VolsegError
from volseg.inference import predict_volume, resampled_argmax, slab_normalizer, sliding_window, sliding_window_labels
from volseg.prediction_files import clean_segmentation, probabilities_path, write_probabilities
from volseg.preprocessing import normalize, resample_image, resample_probabilities
from volseg.sampling import crop_pad, gaussian_importance, sliding_window_grid


def image_of(shape: tuple[int, ...], seed: int = 0, channels: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(channels, *shape)).astype(np.float32)


class MixingPredictor:
    """Four classes whose logits depend on the voxel, its position in the window and the window's mean.

    Blending then matters (overlapping windows disagree), so only the same windows, weights and
    order of sums give the same result; every class wins somewhere. `crop` keeps a centred output
    of that size, like a valid-padding network.
    """

    def __init__(self, classes: int = 4, crop: tuple[int, int, int] | None = None, scale: float = 1.0) -> None:
        self.classes, self.crop, self.scale = classes, crop, scale

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        ramp = torch.linspace(-1, 1, x.shape[2]).view(1, -1, 1, 1)
        mean = x.mean(dim=(1, 2, 3, 4)).view(-1, 1, 1, 1)
        logits = torch.stack(
            [2 * torch.sin(self.scale * (k + 1) * x[:, 0] + k * ramp) + k * mean for k in range(self.classes)], 1
        )
        if self.crop is not None:
            m = [(p - o) // 2 for p, o in zip(x.shape[2:], self.crop)]
            logits = logits[:, :, m[0] : m[0] + self.crop[0], m[1] : m[1] + self.crop[1], m[2] : m[2] + self.crop[2]]
        return logits


def dense_reference(image, predictor, patch, n_classes, overlap, blend, batch_size, out_patch):
    """The textbook sliding window: full float64 class volumes, zero-padded cuts, weighted mean."""
    out_patch = patch if out_patch is None else out_patch
    margin = [(p - o) // 2 for p, o in zip(patch, out_patch)]
    shape = image.shape[1:]
    padded = tuple(max(s, o) for s, o in zip(shape, out_patch))
    weight = gaussian_importance(out_patch) if blend == "gaussian" else np.ones(out_patch, np.float32)
    acc, norm = np.zeros((n_classes, *padded)), np.zeros(padded)
    starts = sliding_window_grid(padded, out_patch, overlap)
    for b in range(0, len(starts), batch_size):
        batch = starts[b : b + batch_size]
        x = torch.from_numpy(np.stack([crop_pad(image, [s - m for s, m in zip(st, margin)], patch) for st in batch]))
        probs = torch.softmax(predictor(x).double(), dim=1).numpy()
        for st, p in zip(batch, probs):
            region = tuple(slice(s, s + o) for s, o in zip(st, out_patch))
            acc[(slice(None), *region)] += p * weight
            norm[region] += weight
    return (acc / norm)[(slice(None), *(slice(0, s) for s in shape))]


# ------------------------------------------------------------------------------------------------
# sliding_window_labels and sliding_window == the textbook sliding window


@pytest.mark.parametrize(
    ("shape", "patch", "out_patch"),
    [
        ((5, 7, 3), (8, 8, 8), None),  # smaller than the patch everywhere
        ((8, 8, 8), (8, 8, 8), None),  # exactly one patch
        ((23, 9, 11), (8, 8, 8), None),  # larger, odd
        ((31, 6, 13), (12, 4, 6), None),  # anisotropic patch, smaller on one axis
        ((13, 9, 17), (10, 10, 10), (6, 6, 6)),  # valid padding, larger
        ((5, 6, 3), (10, 10, 10), (6, 6, 6)),  # valid padding, smaller
        ((27, 5, 7), (9, 7, 7), (5, 3, 3)),  # valid padding, anisotropic
    ],
)
@pytest.mark.parametrize("blend", ["gaussian", "uniform"])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_labels_and_probabilities_equal_the_textbook_sliding_window(shape, patch, out_patch, blend, batch_size):
    image = image_of(shape, seed=sum(shape))
    predictor = MixingPredictor(crop=out_patch)
    kwargs = dict(overlap=0.5, blend=blend, batch_size=batch_size, out_patch=out_patch)
    expected = dense_reference(image, predictor, patch, 4, **kwargs)
    np.testing.assert_allclose(sliding_window(image, predictor, patch, 4, **kwargs), expected, rtol=0, atol=1e-6)
    probs = np.full((4, *shape), np.nan, np.float32)
    labels = sliding_window_labels(image, predictor, patch, 4, probabilities=probs, **kwargs)
    assert labels.shape == shape and labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, expected.argmax(0))
    np.testing.assert_allclose(probs, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.75])
def test_any_overlap_and_float16_probabilities(overlap):
    image = image_of((29, 10, 9), seed=4)
    expected = sliding_window(image, MixingPredictor(), (6, 6, 6), 4, overlap=overlap)
    probs = np.zeros((4, 29, 10, 9), np.float16)
    labels = sliding_window_labels(image, MixingPredictor(), (6, 6, 6), 4, overlap=overlap, probabilities=probs)
    np.testing.assert_array_equal(labels, expected.argmax(0))
    np.testing.assert_allclose(probs, expected, atol=1e-3)


def test_ensemble_is_averaged_per_window_and_prepare_is_per_member():
    """Two predictors, each on its own input rows, give the mean of the two separate results."""
    raw = image_of((19, 8, 9), seed=5) * 30 + 100
    a, b = MixingPredictor(scale=1.0), MixingPredictor(scale=-0.5)
    norm_a, norm_b = slab_normalizer(raw, "zscore"), slab_normalizer(raw, "none")
    probs = np.empty((4, 19, 8, 9), np.float32)
    labels = sliding_window_labels(raw, [a, b], (8, 8, 8), 4, batch_size=3, prepare=[norm_a, norm_b],
                                   probabilities=probs)
    mean = (sliding_window(norm_a(raw), a, (8, 8, 8), 4) + sliding_window(norm_b(raw), b, (8, 8, 8), 4)) / 2
    np.testing.assert_allclose(probs, mean, atol=1e-6)
    np.testing.assert_array_equal(labels, probs.argmax(0))


def test_each_window_runs_once_in_batches():
    calls: list[int] = []

    def predictor(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        return MixingPredictor()(x)

    sliding_window_labels(image_of((17, 11, 19)), predictor, (8, 8, 8), 4, batch_size=3)
    assert sum(calls) == len(sliding_window_grid((17, 11, 19), (8, 8, 8), 0.5))
    assert all(c == 3 for c in calls[:-1])


@pytest.mark.parametrize("kwargs", [{"blend": "median"}, {"overlap": 1.0}, {"probabilities": np.zeros((2, 4, 4, 4))}])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(VolsegError):
        sliding_window_labels(image_of((4, 4, 4)), MixingPredictor(), (4, 4, 4), 4, **kwargs)


# ------------------------------------------------------------------------------------------------
# normalisation by slabs, resampling one class at a time


@pytest.mark.parametrize(
    ("methods", "stats"),
    [("zscore", ()), ("zscore_nonzero", ()), (("zscore_nonzero", "zscore"), ()), (("ct", "none"), ((-50, 80, 10, 20),) * 2)],
)
def test_slab_normalizer_matches_normalize(methods, stats):
    raw = np.round(image_of((23, 7, 6), seed=2, channels=2) * 40).astype(np.int16)
    raw[:, :5] = 0  # a zero margin for the non-zero masks
    raw[0, 10:12] = 0
    expected = normalize(raw, methods, stats)
    prepare = slab_normalizer(raw, methods, stats)
    got = np.concatenate([prepare(raw[:, a : a + 4]) for a in range(0, 23, 4)], axis=1)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_slab_normalizer_all_zero_image_and_bad_method():
    zeros = np.zeros((1, 4, 4, 4), np.float32)
    assert not slab_normalizer(zeros, "zscore_nonzero")(zeros).any()
    with pytest.raises(VolsegError, match="unknown normalisation"):
        slab_normalizer(zeros, "minmax")


def test_resampled_argmax_equals_argmax_of_resampled_stack():
    probs = np.random.default_rng(3).dirichlet([1, 1, 1, 1], size=(7, 6, 5)).transpose(3, 0, 1, 2).astype(np.float32)
    probs[:, 0, 0, 0] = 0.25  # a tie goes to the lower class, as with argmax
    stacked = resample_probabilities(probs, (13, 4, 9))
    out = np.zeros((4, 13, 4, 9), np.float16)
    np.testing.assert_array_equal(resampled_argmax(probs, (13, 4, 9), out), stacked.argmax(0))
    np.testing.assert_allclose(out, stacked, atol=1e-3)
    np.testing.assert_array_equal(resampled_argmax(probs, (7, 6, 5)), probs.argmax(0))  # no-op resampling


# ------------------------------------------------------------------------------------------------
# predict_volume through the ring: same as the whole-volume path, and no float32 class volume


class FourClassNetwork(torch.nn.Module):
    """Logits from the normalised input at four scales: every class wins somewhere."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.zeros_like(x), 2 * x, -2 * x, x * x - 1.5], dim=1)


def four_class_config(patch=(16, 16, 16), spacing=None) -> Config:
    data = DataConfig(labels=(("background", 0), ("a", 1), ("b", 2), ("c", 4)), spacing=spacing)
    return Config(data=data, model=ModelConfig(num_classes=4, depth=3), train=TrainConfig(patch_size=patch))


def whole_volume_labels(cfg: Config, volume: volumes.Volume) -> np.ndarray:
    """Today's path without resampling: normalise everything, all probabilities, argmax."""
    image = normalize(volume.array, cfg.data.channel_methods, cfg.data.intensity_stats)
    probs = sliding_window(image, FourClassNetwork(), cfg.train.patch_size, 4, overlap=0.5, batch_size=2)
    return np.asarray(cfg.data.class_values)[probs.argmax(0)]


def test_predict_volume_equals_the_whole_volume_path():
    cfg = four_class_config()
    volume = volumes.Volume(image_of((37, 21, 18), seed=8) * 50 + 300, np.diag([0.7, 0.9, 2.5, 1.0]))
    probs = np.zeros((4, 37, 21, 18), np.float32)
    seg = predict_volume(FourClassNetwork(), cfg, volume, probabilities=probs)
    np.testing.assert_array_equal(seg, whole_volume_labels(cfg, volume))
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)


def test_predict_volume_on_another_spacing_equals_resampling_the_stack():
    cfg = four_class_config(spacing=(1.0, 1.0, 2.0))
    volume = volumes.Volume(image_of((26, 15, 11), seed=9), np.diag([0.7, 1.0, 2.6, 1.0]))
    image = normalize(resample_image(volume.array, volume.spacing, cfg.data.spacing), "zscore")
    stack = resample_probabilities(sliding_window(image, FourClassNetwork(), (16, 16, 16), 4), volume.shape)
    expected = np.asarray(cfg.data.class_values)[stack.argmax(0)]
    probs = np.zeros((4, *volume.shape), np.float16)
    np.testing.assert_array_equal(predict_volume(FourClassNetwork(), cfg, volume, probabilities=probs), expected)
    np.testing.assert_allclose(probs, stack, atol=1e-3)


def test_predict_volume_never_holds_a_float32_volume_per_class():
    """numpy allocations are traced; the ring buffer is allocated by numpy too.

    Four float32 classes are 16 bytes per voxel; the labels, their decoded copy and a ring of 16
    of the 400 rows stay well below even one float32 volume (4 bytes per voxel).
    """
    shape = (400, 24, 24)
    cfg = four_class_config()
    volume = volumes.Volume(image_of(shape, seed=1) * 10 + 5, np.eye(4))
    class_volume_bytes = 4 * int(np.prod(shape)) * 4
    model = FourClassNetwork()
    tracemalloc.start()
    try:
        seg = predict_volume(model, cfg, volume)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seg.shape == shape
    assert peak < class_volume_bytes / 4, f"peak {peak / 1e6:.2f} MB vs {class_volume_bytes / 1e6:.2f} MB of classes"


def test_ensemble_of_folds_in_one_pass_equals_summed_volumes():
    cfg_a = four_class_config()
    cfg_b = Config(data=DataConfig(labels=cfg_a.data.labels, normalization="none"), model=cfg_a.model,
                   train=cfg_a.train)  # another normalisation: its own input rows in the same pass
    volume = volumes.Volume(image_of((21, 17, 19), seed=3), np.eye(4))
    seg = predict_volume([FourClassNetwork(), FourClassNetwork()], [cfg_a, cfg_b], volume)
    total = sum(
        sliding_window(normalize(volume.array, c.data.channel_methods), FourClassNetwork(), (16, 16, 16), 4)
        for c in (cfg_a, cfg_b)
    )
    np.testing.assert_array_equal(seg, np.asarray(cfg_a.data.class_values)[total.argmax(0)])


def test_clean_segmentation_needs_background_zero():
    seg = np.ones((3, 3, 3), np.uint8)
    assert clean_segmentation(seg, (1, 1, 1), (1, 2)) is seg  # nothing asked: nothing checked
    with pytest.raises(VolsegError, match="background 0"):
        clean_segmentation(seg, (1, 1, 1), (1, 2), keep_largest=True)


# ------------------------------------------------------------------------------------------------
# through the CLI: --save-probabilities and post-processing


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny UNet3d for labels 0, 1, 2 (architecture is all that matters for geometry)."""
    from volseg.model import UNet3d

    torch.manual_seed(0)
    cfg = Config(data=DataConfig(labels=(("background", 0), ("a", 1), ("b", 2))),
                 model=ModelConfig(num_classes=3, depth=3, base_width=4), train=TrainConfig(patch_size=(16, 16, 16)))
    path = tmp_path_factory.mktemp("model") / "model.safetensors"
    save_model(path, UNet3d(cfg.model), cfg)
    return path


def oblique_affine() -> np.ndarray:
    affine = np.eye(4)
    a = 0.3
    affine[:3, :3] = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]]) @ np.diag([0.7, 0.9, 2.5])
    affine[:3, 3] = (-20.5, 7.25, 33.0)
    return affine


def test_save_probabilities_keeps_the_input_geometry(model_file, tmp_path):
    affine = oblique_affine()
    img = nib.Nifti1Image((image_of((19, 14, 9), seed=6)[0] * 30).astype(np.int16), affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=2)
    src = tmp_path / "case_0000.nii.gz"
    nib.save(img, str(src))
    assert _exit_code(["predict", "-m", str(model_file), "-i", str(src), "-o", str(tmp_path / "out"), "--quiet",
                       "--device", "cpu", "--save-probabilities"]) == 0
    seg_path = tmp_path / "out" / "case.nii.gz"
    prob_path = probabilities_path(seg_path)
    assert prob_path == tmp_path / "out" / "probabilities" / "case.nii.gz"
    before, prob, seg = nib.load(str(src)), nib.load(str(prob_path)), nib.load(str(seg_path))
    assert prob.shape == (19, 14, 9, 3) and prob.get_data_dtype() == np.float32
    np.testing.assert_array_equal(prob.affine, before.affine)
    for form in ("get_qform", "get_sform"):
        m_before, code_before = getattr(before.header, form)(coded=True)
        m_after, code_after = getattr(prob.header, form)(coded=True)
        assert int(code_after) == int(code_before)
        np.testing.assert_array_equal(m_after, m_before)
    np.testing.assert_array_equal(prob.header.get_zooms()[:3], before.header.get_zooms())
    p = np.asarray(prob.dataobj)
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=3e-3)
    # the same probabilities as predict_volume's, up to float16
    model, cfg = load_model(model_file)
    expected = np.zeros((3, 19, 14, 9), np.float32)
    labels = predict_volume(model, cfg, volumes.read_volume(src), probabilities=expected)
    np.testing.assert_allclose(p, np.moveaxis(expected, 0, -1), atol=1e-3)
    np.testing.assert_array_equal(np.asarray(seg.dataobj), labels)
    # without --overwrite an existing probability file is refused too
    seg_path.unlink()
    assert _exit_code(["predict", "-m", str(model_file), "-i", str(src), "-o", str(tmp_path / "out"), "--quiet",
                       "--device", "cpu", "--save-probabilities"]) == 2


def test_write_probabilities_streams_exact_values_with_an_affine_only_reference(tmp_path):
    reference = volumes.Volume(np.zeros((1, 5, 4, 3), np.float32), oblique_affine())  # e.g. read from MHA
    probs = np.random.default_rng(0).random((2, 5, 4, 3)).astype(np.float16)
    write_probabilities(tmp_path / "p.nii.gz", probs, reference)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.nii.gz"]  # no temporary left behind
    img = nib.load(str(tmp_path / "p.nii.gz"))
    assert img.shape == (5, 4, 3, 2)
    np.testing.assert_allclose(img.affine, reference.affine, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(img.dataobj), np.moveaxis(probs, 0, -1).astype(np.float32))
    with pytest.raises(VolsegError, match="do not match"):
        write_probabilities(tmp_path / "q.nii.gz", probs[:, :4], reference)


def _exit_code(argv: list[str]) -> int:
    try:
        main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def predict_with_flags(model_file: Path, tmp_path: Path, flags: list[str]) -> np.ndarray:
    """`volseg predict FLAGS` on a 0.5 x 0.5 x 3 mm image (0.75 mm³ voxels); the written labels."""
    src = tmp_path / "img.nii.gz"
    volumes.write_volume(src, np.zeros((12, 12, 6), np.float32), affine=np.diag([0.5, 0.5, 3.0, 1.0]))
    out = tmp_path / f"seg{len(list(tmp_path.iterdir()))}.nii.gz"
    assert _exit_code(["predict", "-m", str(model_file), "-i", str(src), "-o", str(out), "--quiet",
                       "--device", "cpu", *flags]) == 0
    return volumes.read_label(out).array[0]


@pytest.fixture
def fixed_prediction(monkeypatch):
    """The network's labels replaced by known components: 1, 2 and 8 voxels of class 1, 3 of class 2."""
    seg = np.zeros((12, 12, 6), np.uint8)
    seg[0, 0, 0] = 1  # 1 voxel = 0.75 mm³
    seg[5, 5, 0:2] = 1  # 2 voxels = 1.5 mm³ (anisotropic: 2 voxels along the 3 mm axis)
    seg[8:10, 8:10, 3:5] = 1  # 8 voxels = 6 mm³
    seg[2, 9, 1:4] = 2  # 3 voxels = 2.25 mm³, the largest (and only) of class 2
    import volseg.prediction_files as prediction_files

    monkeypatch.setattr(prediction_files, "predict_volume", lambda *args, **kwargs: seg.copy())
    return seg


@pytest.mark.parametrize(
    ("flags", "kept"),
    [
        ([], {1: 11, 2: 3}),
        (["--min-size-mm3", "1.5"], {1: 10, 2: 3}),  # 1.5 mm³ exactly is kept
        (["--min-size-mm3", "2.3"], {1: 8, 2: 0}),
        (["--min-size-voxels", "3"], {1: 8, 2: 3}),
        (["--keep-largest"], {1: 8, 2: 3}),
        (["--keep-largest", "--min-size-mm3", "2.3"], {1: 8, 2: 0}),
    ],
)
def test_postprocessing_flags(model_file, tmp_path, fixed_prediction, flags, kept):
    seg = predict_with_flags(model_file, tmp_path, flags)
    assert {v: int((seg == v).sum()) for v in (1, 2)} == kept


def test_negative_minimum_size_is_refused(model_file, tmp_path):
    assert _exit_code(["predict", "-m", str(model_file), "-i", str(tmp_path / "x.nii.gz"), "-o", str(tmp_path / "o"),
                       "--min-size-mm3", "-1"]) == 2


# ------------------------------------------------------------------------------------------------
# WindowRunner: compiling when it pays, full batches for the compiled network, mirroring


class CountingNet(torch.nn.Module):
    """Two classes whose logits depend on position along every axis (so flips matter)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.shape[0])
        i, j, k = (torch.linspace(0, 1, n) for n in x.shape[2:])
        ramp = i.view(-1, 1, 1) + 2 * j.view(1, -1, 1) + 3 * k.view(1, 1, -1)
        return torch.cat([x, x * ramp], dim=1)


def fake_compile(record: list):
    """Stands in for torch.compile: records the batch sizes the 'compiled' network sees."""

    def compile(net, **kwargs):
        def compiled(x):
            record.append((x.shape[0], x.is_contiguous(memory_format=torch.channels_last_3d)))
            return net(x)

        return compiled

    return compile


def test_runner_auto_compiles_only_when_the_work_ahead_pays(monkeypatch):
    from volseg import inference

    image = image_of((20, 12, 12), seed=7)
    expected = sliding_window(image, CountingNet(), (8, 8, 8), 2, batch_size=3)
    for threshold, compiles in ((0.0, True), (1e9, False)):
        record: list = []
        monkeypatch.setattr(torch, "compile", fake_compile(record))
        monkeypatch.setattr(inference, "COMPILE_PAYS_S", threshold)
        runner = inference.WindowRunner(CountingNet(), "cpu", 3, compile="auto")
        probs = sliding_window(image, runner, (8, 8, 8), 2, batch_size=3)
        np.testing.assert_allclose(probs, expected, atol=1e-6)
        assert (runner.compiled is not None) == compiles
        if compiles:  # the probe plus every batch after the first; all full (padded), all channels-last
            n_batches = -(-len(sliding_window_grid((20, 12, 12), (8, 8, 8), 0.5)) // 3)
            assert len(record) == 1 + n_batches - 1
            assert all(r == (3, True) for r in record)
        else:
            assert record == []


def test_runner_compile_failure_falls_back_with_a_warning(monkeypatch):
    from volseg import inference

    def broken(net, **kwargs):
        def compiled(x):
            raise RuntimeError("no C++ compiler found\nlong trace")

        return compiled

    monkeypatch.setattr(torch, "compile", broken)
    image = image_of((10, 9, 9), seed=3)
    runner = inference.WindowRunner(CountingNet(), "cpu", 2, compile="on")
    with pytest.warns(RuntimeWarning, match="torch.compile failed .no C.. compiler found.; predicting uncompiled"):
        probs = sliding_window(image, runner, (8, 8, 8), 2)
    assert runner.compiled is None
    np.testing.assert_allclose(probs, sliding_window(image, CountingNet(), (8, 8, 8), 2), atol=1e-6)


def test_runner_refuses_unknown_compile_mode():
    from volseg.inference import WindowRunner

    with pytest.raises(VolsegError, match="unknown compile mode 'fast'"):
        WindowRunner(CountingNet(), "cpu", 2, compile="fast")


def test_mirroring_averages_all_eight_flips():
    from volseg.inference import WindowRunner

    net = CountingNet()
    x = torch.from_numpy(image_of((6, 5, 4), seed=1))[None]
    out = WindowRunner(net, "cpu", 1, compile="off", mirror=True)(x)
    manual = sum(
        torch.flip(net(torch.flip(x, dims)), dims) if dims else net(x)
        for dims in [(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)]
    ) / 8
    torch.testing.assert_close(out, manual)
    assert not torch.allclose(out, net(x))  # the ramp is not symmetric: the flips did change it


@pytest.mark.slow
def test_real_compile_matches_eager_network():
    """inductor with frozen weights and channels-last gives the eager network's probabilities."""
    from volseg.inference import WindowRunner
    from volseg.model import UNet3d

    torch.manual_seed(0)
    net = UNet3d(ModelConfig(in_channels=1, num_classes=3, depth=2, base_width=4, norm="instance")).eval()
    image = image_of((17, 12, 9), seed=5)
    eager = sliding_window(image, net, (8, 8, 8), 3, batch_size=2)
    runner = WindowRunner(net, "cpu", 2, compile="on")
    probs = sliding_window(image, runner, (8, 8, 8), 3, batch_size=2)
    assert runner.compiled is not None and runner.compile_seconds > 0
    np.testing.assert_allclose(probs, eager, atol=1e-4)


def test_predict_tta_and_compile_flags(model_file, tmp_path):
    from volseg.inference import WindowRunner

    src = tmp_path / "img.nii.gz"
    volumes.write_volume(src, image_of((20, 18, 11), seed=9)[0], affine=np.diag([0.8, 0.8, 2.0, 1.0]))
    out = tmp_path / "tta.nii.gz"
    assert _exit_code(["predict", "-m", str(model_file), "-i", str(src), "-o", str(out), "--quiet", "--device", "cpu",
                       "--tta", "--compile", "off"]) == 0
    model, cfg = load_model(model_file, torch.device("cpu"))
    volume = volumes.read_image([src])
    mirrored = predict_volume(model, cfg, volume, runners=[WindowRunner(model, "cpu", 2, "off", mirror=True)])
    plain = predict_volume(model, cfg, volume)
    np.testing.assert_array_equal(volumes.read_label(out).array[0], mirrored)
    assert not np.array_equal(mirrored, plain)  # the flips changed some voxels of this random network
    assert _exit_code(["predict", "-m", str(model_file), "-i", str(src), "-o", str(tmp_path / "x.nii.gz"),
                       "--compile", "fast"]) == 2


def test_skip_empty_runs_only_windows_with_signal_and_calls_the_rest_background():
    image = np.zeros((1, 24, 10, 10), np.float32)
    image[0, 2:6, 3:7, 3:7] = np.random.default_rng(0).normal(size=(4, 4, 4)) + 3  # signal near the start only
    seen: list[int] = []

    def net(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.shape[0])
        return MixingPredictor()(x)

    probs = np.zeros((4, 24, 10, 10), np.float32)
    labels = sliding_window_labels(image, net, (8, 8, 8), 4, batch_size=2, probabilities=probs, skip_empty=True)
    full = dense_reference(image, MixingPredictor(), (8, 8, 8), 4, 0.5, "gaussian", 2, None)
    starts = sliding_window_grid((24, 10, 10), (8, 8, 8), 0.5)
    with_signal = [st for st in starts if st[0] < 6]  # windows reaching rows 2-5
    assert sum(seen) == len(with_signal) < len(starts)
    # rows no run window touches are certain background; rows only run windows touch equal the full pass
    np.testing.assert_array_equal(labels[12:], 0)
    np.testing.assert_allclose(probs[:, 12:], np.eye(4)[0][:, None, None, None] * np.ones((1, 12, 10, 10)))
    np.testing.assert_allclose(probs[:, :4], full[:, :4], atol=1e-6)
    plain = sliding_window_labels(image, MixingPredictor(), (8, 8, 8), 4, batch_size=2)
    np.testing.assert_array_equal(plain, full.argmax(0))


def test_runner_weighs_each_pass_and_splits_batches_larger_than_compiled(monkeypatch, capsys):
    from volseg import inference

    record: list = []
    monkeypatch.setattr(torch, "compile", fake_compile(record))
    monkeypatch.setattr(inference, "COMPILE_PAYS_S", 1e-9)  # any work ahead pays
    runner = inference.WindowRunner(CountingNet(), "cpu", 2, compile="auto", verbose=True)
    small = image_of((8, 8, 8), seed=1)  # one window: nothing ahead, no compiling
    sliding_window(small, runner, (8, 8, 8), 2, batch_size=2)
    assert runner.compiled is None
    large = image_of((20, 12, 12), seed=2)  # a later, larger case: its own first batch is timed
    sliding_window(large, runner, (8, 8, 8), 2, batch_size=2)
    assert runner.compiled is not None
    record.clear()
    x = torch.from_numpy(np.stack([image_of((8, 8, 8), seed=s) for s in range(5)]))  # 5 windows, compiled for 2
    torch.testing.assert_close(runner(x), CountingNet()(x))
    assert [r[0] for r in record] == [2, 2, 2]
    assert "compiling the network" in capsys.readouterr().err
