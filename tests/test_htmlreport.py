"""volseg.pictures and volseg.htmlreport: `volseg show` pictures and the self-contained HTML report, checked in a browser too."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from volseg import htmlreport, pictures
from volseg.cli import app, main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SECTIONS = ("model-card", "curves", "validation", "cases", "overlays")


def run_cli(argv: list[str]) -> int:
    """Exit code of `volseg ARGV` as the console script reports it (VolsegError -> 2)."""
    try:
        main(argv)
    except SystemExit as exc:
        return 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 1
    return 0


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("volseg: error:") and "Traceback" not in stderr, stderr
    return lines[0]


def save(path: Path, array: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> Path:
    affine = np.diag([*spacing, 1.0])
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def ball_volume(shape=(20, 18, 10)) -> tuple[np.ndarray, np.ndarray]:
    """An image with two bright balls and their labels 1 and 2, on an odd grid."""
    grid = np.indices(shape, dtype=np.float32)
    seg = np.zeros(shape, np.uint8)
    seg[np.sum((grid - np.array([6, 9, 5])[:, None, None, None]) ** 2, axis=0) < 12] = 1
    seg[np.sum((grid - np.array([14, 9, 5])[:, None, None, None]) ** 2, axis=0) < 8] = 2
    rng = np.random.default_rng(0)
    image = (seg * 50 + rng.normal(0, 5, shape)).astype(np.float32)
    return image, seg


# ------------------------------------------------------------------------------------------------
# parsing helper


class _Collector(HTMLParser):
    """Every tag with its attributes, and the text, of an HTML document."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def parse(path: Path) -> _Collector:
    collector = _Collector()
    collector.feed(path.read_text(encoding="utf-8"))
    collector.close()
    return collector


def check_self_contained(path: Path) -> _Collector:
    """Every image an inlined, valid PNG; nothing loaded from elsewhere; no script."""
    doc = parse(path)
    raw = path.read_text(encoding="utf-8")
    assert not re.search(r"https?://", raw, re.IGNORECASE)
    images = [attrs for tag, attrs in doc.tags if tag == "img"]
    assert images
    for attrs in images:
        src = attrs["src"] or ""
        assert src.startswith("data:image/png;base64,"), src[:60]
        png = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert png.startswith(PNG_SIGNATURE)
        width, height = htmlreport.png_size(png)
        assert 100 < width < 4000 and 100 < height < 4000
        assert (attrs["width"], attrs["height"]) == (str(width), str(height))
        assert attrs.get("alt")
    tags = {tag for tag, _ in doc.tags}
    assert not tags & {"script", "link", "iframe", "object", "embed"}
    for tag, attrs in doc.tags:
        if tag != "img":
            assert not {"src", "href"} & set(attrs), (tag, attrs)
    return doc


@pytest.fixture(scope="module")
def dataset_report(tmp_path_factory, trained_run, tiny_dataset) -> Path:
    """`volseg report RUN --dataset DATASET`: the run's validation cases predicted and scored."""
    out = tmp_path_factory.mktemp("report") / "report.html"
    code = run_cli(["report", str(trained_run[0]), "-o", str(out), "--dataset", str(tiny_dataset),
                    "--device", "cpu", "--quiet"])  # fmt: skip
    assert code == 0
    return out


# ------------------------------------------------------------------------------------------------
# report


def test_report_with_dataset_is_self_contained_with_every_section(dataset_report, trained_run):
    doc = check_self_contained(dataset_report)
    ids = [attrs.get("id") for tag, attrs in doc.tags if tag == "section"]
    assert ids == list(SECTIONS)
    text = " ".join(doc.text)
    for expected in ("Model card", "3D U-Net, depth 3, base width 4", "dice_ce", "augmentation", "epochs",
                     "best epoch", "volseg 0.", "torch", "numpy", "python", "val_dice_1 (class1)",
                     "case_002", "best case"):  # fmt: skip
        assert expected in text, expected
    n_val = len(json.loads((trained_run[0] / "split.json").read_text())["val"])
    images = [attrs for tag, attrs in doc.tags if tag == "img"]
    assert len(images) == 1 + 2 + min(n_val, 3)  # curves, Dice + HD95 boxes, overlays
    assert "No per-case results" not in text


def test_report_without_cases_says_so(tmp_path, trained_run):
    out = tmp_path / "plain.html"
    result = htmlreport.build_report(trained_run[0], out, progress=False)
    assert result["sections"] == ["model-card", "curves", "validation"] and result["cases"] == 0
    doc = check_self_contained(out)
    assert "No per-case results" in " ".join(doc.text)
    assert len([t for t, _ in doc.tags if t == "img"]) == 1


def test_report_from_predictions_escapes_names_and_finds_images(tmp_path, trained_run, tiny_dataset):
    """Case names with HTML characters are escaped; images come from imagesTs next to the labels."""
    root = tmp_path / "Data"
    labels, images, preds = root / "labelsTs", root / "imagesTs", tmp_path / "pred"
    for folder in (labels, images, preds):
        folder.mkdir(parents=True)
    sources = sorted((tiny_dataset / "labelsTs").iterdir())
    names = ['a<b>&"x', "plain"]
    for name, source in zip(names, sources):
        shutil.copy(source, labels / f"{name}.nii.gz")
        case = source.name[: -len(".nii.gz")]
        shutil.copy(tiny_dataset / "imagesTs" / f"{case}_0000.nii.gz", images / f"{name}_0000.nii.gz")
    shutil.copy(labels / f"{names[0]}.nii.gz", preds / f"{names[0]}.nii.gz")  # perfect: Dice 1
    ref = nib.load(str(labels / "plain.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros(ref.shape, np.uint8), ref.affine), str(preds / "plain.nii.gz"))  # Dice 0
    out = tmp_path / "r.html"
    result = htmlreport.build_report(trained_run[0], out, predictions=preds, labels=labels, progress=False)
    assert result["cases"] == 2 and result["sections"] == list(SECTIONS)
    raw = out.read_text(encoding="utf-8")
    assert names[0] not in raw and "a&lt;b&gt;&amp;&quot;x" in raw
    doc = check_self_contained(out)
    text = " ".join(doc.text)
    assert f"best case {names[0]}, mean Dice 1.000" in text and "worst case plain, mean Dice 0.000" in text
    assert "No image found" not in text
    (tmp_path / "empty").mkdir()
    htmlreport.build_report(trained_run[0], out, predictions=preds, labels=labels, images=tmp_path / "empty")
    doc = check_self_contained(out)
    assert "No image found for" in " ".join(doc.text) and "black background" in " ".join(doc.text)


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--predictions", "P"], "--predictions and --labels go together"),
        (["--dataset", "D", "--labels", "L", "--predictions", "P"], "either --dataset or --predictions"),
    ],
)
def test_report_bad_arguments_are_one_line(extra, needle, trained_run, tmp_path, capsys):
    assert run_cli(["report", str(trained_run[0]), "-o", str(tmp_path / "r.html"), *extra]) == 2
    assert needle in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "r.html").exists()


def test_report_of_a_folder_that_is_no_run(tmp_path, capsys):
    assert run_cli(["report", str(tmp_path), "-o", str(tmp_path / "r.html")]) == 2
    assert "has no config.json" in one_error_line(capsys.readouterr().err)


def test_report_of_a_folder_of_several_models_names_a_member(tmp_path, capsys):
    (tmp_path / "member_0").mkdir()
    assert run_cli(["report", str(tmp_path), "-o", str(tmp_path / "r.html")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "several averaged models" in line and "member_0" in line


# ------------------------------------------------------------------------------------------------
# show


def test_show_writes_png_with_physical_aspect(tmp_path):
    from typer.testing import CliRunner

    image, seg = ball_volume()
    sizes = {}
    for name, spacing in (("iso", (1.0, 1.0, 1.0)), ("thick", (1.0, 1.0, 5.0))):
        folder = tmp_path / name
        folder.mkdir()
        save(folder / "img.nii.gz", image, spacing)
        save(folder / "seg.nii.gz", seg, spacing)
        out = folder / "out.png"
        result = CliRunner().invoke(app, ["show", str(folder / "img.nii.gz"), str(folder / "seg.nii.gz"), "-o", str(out)])
        assert result.exit_code == 0, result.output
        assert "slices through voxel" in result.output
        png = out.read_bytes()
        assert png.startswith(PNG_SIGNATURE)
        sizes[name] = htmlreport.png_size(png)
        width, height = sizes[name]
        assert 500 <= width <= 2000 and 150 <= height <= 1000, sizes[name]
    aspect = {name: h / w for name, (w, h) in sizes.items()}
    assert aspect["thick"] > 1.5 * aspect["iso"], sizes  # 5 mm slices are drawn 5 times taller


def test_show_centre_is_inside_an_object_and_slice_option(tmp_path):
    from typer.testing import CliRunner

    image, seg = ball_volume()
    save(tmp_path / "img.nii.gz", image)
    save(tmp_path / "seg.nii.gz", seg)
    ref = seg.copy()
    ref[ref == 2] = 0
    save(tmp_path / "ref.nii.gz", ref)
    centre = pictures.show_volume(tmp_path / "img.nii.gz", tmp_path / "a.png", tmp_path / "seg.nii.gz")
    assert seg[centre] != 0  # not the empty middle between the two balls
    centre = pictures.show_volume(
        tmp_path / "img.nii.gz", tmp_path / "b.png", tmp_path / "seg.nii.gz", ref_path=tmp_path / "ref.nii.gz"
    )
    assert ref[centre] == 1  # the reference decides where to look
    result = CliRunner().invoke(app, ["show", str(tmp_path / "img.nii.gz"), "-o", str(tmp_path / "c.png"),
                                      "--slice", "1,2,3"])  # fmt: skip
    assert result.exit_code == 0 and "voxel 1,2,3" in result.output
    assert htmlreport.png_size((tmp_path / "c.png").read_bytes())[0] > 100


def test_show_channel_picks_the_sibling_file(tmp_path, capsys):
    image, _ = ball_volume()
    save(tmp_path / "case_0000.nii.gz", image)
    save(tmp_path / "case_0001.nii.gz", -image)
    assert run_cli(["show", str(tmp_path / "case_0000.nii.gz"), "--channel", "1", "-o", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").is_file()
    assert run_cli(["show", str(tmp_path / "case_0000.nii.gz"), "--channel", "2", "-o", str(tmp_path / "d.png")]) == 2
    assert "case_0002.nii.gz: channel 2 file not found" in one_error_line(capsys.readouterr().err)


def test_show_errors_are_one_line_exit_2(tmp_path, capsys):
    image, seg = ball_volume()
    img = save(tmp_path / "img.nii.gz", image)
    small = save(tmp_path / "small.nii.gz", seg[:-1])
    shifted = save(tmp_path / "shifted.nii.gz", seg, spacing=(1.0, 1.0, 2.0))
    out = str(tmp_path / "o.png")

    assert run_cli(["show", str(tmp_path / "missing.nii.gz"), "-o", out]) == 2
    assert "missing.nii.gz: file does not exist" in one_error_line(capsys.readouterr().err)
    for bad, detail in ((small, "shape (19, 18, 10) vs (20, 18, 10)"), (shifted, "affines differ")):
        assert run_cli(["show", str(img), str(bad), "-o", out]) == 2
        line = one_error_line(capsys.readouterr().err)
        assert str(bad) in line and str(img) in line and detail in line, line
    assert run_cli(["show", str(img), "--slice", "0,0,10", "-o", out]) == 2
    assert "--slice 0,0,10 is outside the volume" in one_error_line(capsys.readouterr().err)
    assert run_cli(["show", str(img), "-o", str(tmp_path / "o.jpg")]) == 2
    assert "must be a .png" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "o.png").exists()


# ------------------------------------------------------------------------------------------------
# a real browser


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


# Put first in <head>: records failed loads and errors, then writes a summary into the DOM on load.
PROBE_SCRIPT = """<script>
(function () {
  var errors = [];
  window.addEventListener("error", function (ev) {
    var t = ev.target;
    errors.push(t && t.tagName ? "failed to load <" + t.tagName + ">" : "error: " + ev.message);
  }, true);
  var original = console.error;
  console.error = function () {
    errors.push("console.error: " + Array.prototype.join.call(arguments, " "));
    original.apply(console, arguments);
  };
  window.addEventListener("load", function () {
    var images = Array.prototype.slice.call(document.images);
    var broken = images.filter(function (im) { return !im.complete || im.naturalWidth === 0; }).length;
    var out = document.createElement("pre");
    out.id = "volseg-probe";
    out.textContent = JSON.stringify({images: images.length, broken: broken, errors: errors});
    document.body.appendChild(out);
    console.log("VOLSEG_PROBE");
  });
})();
</script>"""
CONSOLE_LINE = re.compile(r'CONSOLE[^\]]*\]\s*"(?P<message>.*)", source: (?P<source>\S*)')


@pytest.mark.slow
def test_report_renders_in_headless_chromium(dataset_report, tmp_path):
    """Every image decodes in a real browser, the page logs nothing, and a screenshot shows it."""
    chromium = find_chromium()
    if chromium is None:
        message = "chromium not found (apt-get install chromium); the report's browser check needs it"
        if os.environ.get("CI"):
            pytest.fail(message + " and CI is set")
        pytest.skip(message)
    page = tmp_path / "page.html"
    raw = dataset_report.read_text(encoding="utf-8")
    page.write_text(raw.replace("<head>", "<head>\n" + PROBE_SCRIPT, 1), encoding="utf-8")
    shot = tmp_path / "shot.png"
    url = page.resolve().as_uri()
    result = subprocess.run(
        [chromium, "--headless=new", "--disable-gpu", "--no-sandbox", "--no-first-run", "--mute-audio",
         f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
         "--window-size=1280,2400", f"--screenshot={shot}", "--dump-dom", url],
        capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=120,
    )  # fmt: skip
    found = re.search(r'<pre id="volseg-probe">(.*?)</pre>', result.stdout, re.DOTALL)
    assert found, f"no probe in the dumped DOM (rc {result.returncode}):\n{result.stderr[-3000:]}"
    import html

    probe = json.loads(html.unescape(found.group(1)))
    n_images = len(re.findall(r"<img ", raw))
    assert probe == {"images": n_images, "broken": 0, "errors": []}, probe
    # chromium's own noise (dbus, GPU, sandbox) is ignored: only console lines of this page count
    page_lines = [m for m in CONSOLE_LINE.finditer(result.stderr) if m.group("source").startswith(url)]
    assert [m.group("message") for m in page_lines if m.group("message") == "VOLSEG_PROBE"], (
        "the page's console output did not reach stderr, so console errors could not be seen:\n"
        + result.stderr[-3000:]
    )
    others = [m.group(0) for m in page_lines if m.group("message") != "VOLSEG_PROBE"]
    assert not others, others
    screenshot = shot.read_bytes()
    assert screenshot.startswith(PNG_SIGNATURE)
    from PIL import Image

    with Image.open(shot) as picture:
        low, high = picture.convert("L").getextrema()
        assert picture.size[0] >= 1000 and high - low > 100, (picture.size, low, high)


def test_best_epoch_is_the_one_model_best_keeps_not_the_raw_maximum(tmp_path):
    # below 10 cases model_best is chosen on smoothed Dice in the schedule's last quarter, so the report
    # reads the epoch from the model file; without one it falls back to the raw maximum
    import torch
    from safetensors.torch import save_file

    from volseg.htmlreport import _best_epoch_index

    rows = [{"epoch": "1", "val_dice": "0.6"}, {"epoch": "2", "val_dice": "0.5"}, {"epoch": "3", "val_dice": "0.55"}]
    assert _best_epoch_index(rows, tmp_path) == 0
    save_file({"w": torch.zeros(1)}, str(tmp_path / "model_best.safetensors"),
              metadata={"volseg_extra": json.dumps({"epoch": 3, "val_dice": 0.55})})
    assert _best_epoch_index(rows, tmp_path) == 2
