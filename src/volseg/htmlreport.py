"""One self-contained HTML report of a training run, for people to look at.

`build_report` puts a run's model card, curves, validation table, per-case scores and best /
median / worst overlays (`volseg.pictures`) into ONE HTML file: images are inlined as base64
`data:` URIs, CSS is inline and there is no script, so the file opens offline, can be mailed or
archived, and never fetches anything.

This module sits above `pictures` and `report` (it reuses their pictures, evaluation and plots)
and below `cli`. torch is only imported when the report predicts cases itself (`dataset=`).
"""

from __future__ import annotations

import base64
import csv
import datetime
import html
import json
import math
import os
import platform
import struct
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from volseg import atomic, layout, report, volumes
from volseg.pictures import check_on_grid, render_slices
from volseg.config import Config
from volseg.errors import VolsegError

PathLike = str | os.PathLike
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) in pixels from a PNG's header; not a PNG raises VolsegError.

    >>> png_size(PNG_SIGNATURE + struct.pack(">I4sII", 13, b"IHDR", 640, 480) + bytes(5))
    (640, 480)
    """
    if len(data) < 24 or not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
        raise VolsegError(None, "not a PNG image")
    width, height = struct.unpack(">II", data[16:24])
    return int(width), int(height)


# --------------------------------------------------------------------------------------------------
# run folder


def _read_run(run_dir: Path) -> tuple[Config, dict[str, Any], list[dict[str, str]], list[str], dict[str, list]]:
    """(config, plan fingerprint, metrics rows, metrics columns, split) of a training run folder."""
    if not run_dir.is_dir():
        raise VolsegError(run_dir, "is not a run folder", "give the -o folder of `volseg train`")
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        from volseg.checkpoint import member_folders

        members = member_folders(run_dir)
        if members:
            raise VolsegError(run_dir, "holds several averaged models (member_*), each a run of its own",
                              f"report on one of them, e.g. {members[0]}")
        raise VolsegError(run_dir, "has no config.json", "give the -o folder of `volseg train`")
    try:
        cfg = Config.from_json(config_path.read_text(encoding="utf-8"), source=str(config_path))
    except OSError as exc:
        raise VolsegError(config_path, f"cannot read ({exc.strerror or exc})") from None
    fingerprint = _read_json(run_dir / "plan.json").get("fingerprint", {})
    split = _read_json(run_dir / "split.json")
    metrics_csv = run_dir / "metrics.csv"
    if not metrics_csv.is_file():
        raise VolsegError(run_dir, "has no metrics.csv", "has the run finished its first epoch?")
    try:
        with open(metrics_csv, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            columns = list(reader.fieldnames or [])
    except OSError as exc:
        raise VolsegError(metrics_csv, f"cannot read ({exc.strerror or exc})") from None
    if not rows:
        raise VolsegError(metrics_csv, "has no epochs yet")
    return cfg, fingerprint if isinstance(fingerprint, dict) else {}, rows, columns, split


def _read_json(path: Path) -> dict:
    """A JSON object file, or {} when the file is absent (plan.json and split.json are optional)."""
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise VolsegError(path, f"cannot read JSON ({exc})") from None
    return value if isinstance(value, dict) else {}


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _best_epoch_index(rows: list[dict[str, str]], run_dir: Path | None = None) -> int | None:
    """Index of the epoch model_best keeps (its file records the epoch: below 10 cases the choice is
    not the raw maximum), else of the best mean validation Dice; None without validation rows."""
    epoch = _model_epoch(run_dir / "model_best.safetensors") if run_dir is not None else None
    if epoch is not None:
        found = [i for i, r in enumerate(rows) if _number(r.get("epoch")) == epoch]
        if found:
            return found[-1]
    dice = [_number(r.get("val_dice")) for r in rows]
    finite = [i for i, d in enumerate(dice) if math.isfinite(d)]
    return max(finite, key=lambda i: dice[i]) if finite else None


def _safetensors_header(model_path: Path) -> dict[str, Any] | None:
    """The JSON header of a safetensors file (tensor shapes, metadata), read without torch; None if unreadable."""
    try:
        with open(model_path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            return json.loads(f.read(length))
    except (OSError, struct.error, ValueError):
        return None


def _model_epoch(model_path: Path) -> int | None:
    """The epoch a model file was saved at (`volseg_extra` in its header), or None."""
    header = _safetensors_header(model_path) or {}
    try:
        return int(json.loads(header["__metadata__"]["volseg_extra"])["epoch"])
    except (ValueError, KeyError, TypeError):
        return None


def _parameter_count(model_path: Path) -> int | None:
    """Parameters in a safetensors file, read from its JSON header (no torch needed)."""
    header = _safetensors_header(model_path)
    if header is None:
        return None
    return sum(int(np.prod(v["shape"])) for k, v in header.items() if k != "__metadata__")


def _versions() -> list[tuple[str, str]]:
    """Versions of what produced the report (from package metadata: torch is not imported)."""
    from importlib import metadata

    import volseg

    out = [("volseg", volseg.__version__)]
    for name in ("torch", "numpy", "matplotlib"):
        try:
            out.append((name, metadata.version(name)))
        except metadata.PackageNotFoundError:
            out.append((name, "not installed"))
    out.append(("python", platform.python_version()))
    out.append(("platform", platform.platform()))
    return out


# --------------------------------------------------------------------------------------------------
# HTML pieces


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any, digits: int = 4) -> str:
    """A table cell: fixed decimals, or 3 significant digits for very large or small numbers."""
    number = _number(value)
    if not math.isfinite(number):
        return "-" if value in (None, "") else str(value)
    if abs(number) >= 1e5 or 0 < abs(number) < 10 ** -digits:
        return f"{number:.3g}"
    return f"{number:.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], numeric_from: int = 1) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = "".join(
            f'<td class="num">{_e(c)}</td>' if i >= numeric_from else f"<td>{_e(c)}</td>" for i, c in enumerate(row)
        )
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _card(items: Sequence[tuple[str, Any]]) -> str:
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in items)
    return f'<table class="card">{rows}</table>'


def _img(png: bytes, alt: str) -> str:
    """An <img> with the PNG inlined as a base64 data: URI (the report must open offline)."""
    if not png.startswith(PNG_SIGNATURE):
        raise VolsegError(None, f"figure {alt!r} is not a PNG")
    width, height = png_size(png)
    data = base64.b64encode(png).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" width="{width}" height="{height}" alt="{_e(alt)}">'


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{_e(anchor)}">\n<h2>{_e(title)}</h2>\n{body}\n</section>'


def _note(text: str) -> str:
    return f'<p class="note">{_e(text)}</p>'


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1200px; padding: 0 1em; color: #1d1d1f; line-height: 1.4; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
.sub { color: #666; margin-top: 0; }
table { border-collapse: collapse; margin: 0.6em 0 1.2em; font-size: 0.92em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
thead th { background: #f3f3f5; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.card th { background: #f7f7f9; font-weight: 600; white-space: nowrap; }
img { max-width: 100%; height: auto; display: block; margin: 0.5em 0; }
figure { margin: 1em 0 2em; } figcaption { color: #444; font-size: 0.95em; }
.note { background: #fff8e1; border-left: 4px solid #f2b600; padding: 0.5em 0.8em; }
code { background: #f3f3f5; padding: 0 0.2em; }
.figs { display: flex; flex-wrap: wrap; gap: 0 2em; align-items: flex-start; }
"""


# --------------------------------------------------------------------------------------------------
# report sections


def _model_card(run_dir: Path, cfg: Config, fingerprint: dict, rows: list[dict[str, str]], split: dict,
                best: int | None) -> str:
    data, model, t = cfg.data, cfg.model, cfg.train
    labels = ", ".join(f"{v} {n}" for n, v in data.labels)
    if data.ignore_label is not None:
        labels += f" (ignore = {data.ignore_label})"
    channels = ", ".join(f"{i} {n} ({m})" for i, (n, m) in enumerate(zip(data.channel_names, data.channel_methods)))
    items: list[tuple[str, Any]] = [
        ("channels (normalisation)", channels),
        ("labels", labels),
        ("target spacing (mm)", "none (native)" if data.spacing is None else " x ".join(f"{s:g}" for s in data.spacing)),
    ]
    if fingerprint:
        if "n_cases" in fingerprint:
            items.append(("dataset cases", fingerprint["n_cases"]))
        if "shape_median" in fingerprint:
            items.append(("median shape (vox)", " x ".join(f"{s:g}" for s in fingerprint["shape_median"])))
        if "spacing_median" in fingerprint:
            items.append(("median spacing (mm)", " x ".join(f"{s:g}" for s in fingerprint["spacing_median"])))
    if split:
        fold = f"fold {t.fold} of {t.folds}" if t.fold is not None else f"{t.val_fraction:.0%} held out"
        items.append(("split", f"{len(split.get('train', []))} training / {len(split.get('val', []))} validation cases ({fold})"))
    n_params = None
    for name in ("model_best.safetensors", "model_last.safetensors"):
        if (run_dir / name).is_file():
            n_params = _parameter_count(run_dir / name)
            break
    items += [
        ("network", f"3D U-Net, depth {model.depth}, base width {model.base_width} (max {model.max_width}), "
                    f"{model.norm} norm, {model.padding} padding"
                    + (f", poolings {[list(p) for p in model.pool_sizes]}" if model.pool_sizes else "")),
        ("inputs / outputs", f"{model.in_channels} channel(s) in, {model.num_classes} classes out"),
    ]  # fmt: skip
    if n_params is not None:
        items.append(("parameters", f"{n_params:,}"))
    loss = t.loss
    if t.class_balance:
        loss += ", class balance"
    if t.border_w0:
        loss += f", border w0 {t.border_w0:g}, sigma {t.border_sigma_mm:g} mm"
    items += [
        ("patch (vox) / batch", f"{' x '.join(map(str, t.patch_size))} / {t.batch_size}"),
        ("loss", loss),
        ("optimiser", f"SGD lr {t.lr:g}, momentum {t.momentum:g}{' (Nesterov)' if t.nesterov else ''}, "
                      f"poly decay {t.poly_exponent:g}, weight decay {t.weight_decay:g}"),
        ("augmentation", "on" if t.augment else "off"),
        ("seed", t.seed),
    ]  # fmt: skip
    seconds = [_number(r.get("seconds")) for r in rows]
    seconds = [s for s in seconds if math.isfinite(s)]
    items.append(("epochs", f"{len(rows)} (budget: {t.max_epochs or 'no'} epochs, {t.max_minutes:g} min)"))
    if seconds:
        items.append(("training time", f"{max(seconds) / 60:.2f} min ({max(seconds) / len(rows):.1f} s per epoch)"))
    if best is not None:
        items.append(("best epoch (model_best; mean val Dice)", f"{rows[best].get('epoch', best + 1)} ({_fmt(rows[best]['val_dice'])})"))
    waits = [_number(r.get("data_wait_fraction")) for r in rows]
    waits = [w for w in waits if math.isfinite(w)]
    if waits:
        items.append(("time waiting for data", f"{100 * float(np.mean(waits)):.1f}% of step time"))
    versions = "; ".join(f"{k} {v}" for k, v in _versions())
    items.append(("versions", versions))
    return _card(items)


def _validation_table(cfg: Config, rows: list[dict[str, str]], columns: list[str], best: int | None) -> str:
    """Last and best epoch (`best`: model_best's row): losses and validation Dice per class (names from the config)."""
    names = {str(v): n for n, v in cfg.data.labels}
    wanted = [c for c in columns if c == "train_loss" or c.startswith("val_")]
    last = len(rows) - 1
    picks = [(f"last epoch ({rows[last].get('epoch', last + 1)})", last)]
    if best is not None and best != last:
        picks.append((f"best epoch ({rows[best].get('epoch', best + 1)})", best))
    elif best == last:
        picks[0] = (f"last = best epoch ({rows[last].get('epoch', last + 1)})", last)
    table_rows = []
    for column in wanted:
        label = column
        for prefix in ("val_dense_dice_", "val_dice_"):
            if column.startswith(prefix) and column[len(prefix):] in names:
                label = f"{column} ({names[column[len(prefix):]]})"
                break
        if column == "val_dice":
            label = "val_dice (mean of classes)"
        table_rows.append([label] + [_fmt(rows[i].get(column)) for _, i in picks])
    return _table(["metric"] + [p for p, _ in picks], table_rows)


def _case_means(rows: list[dict]) -> list[tuple[str, float]]:
    """(case, mean Dice over its labels), sorted from best to worst."""
    by_case: dict[str, list[float]] = {}
    for row in rows:
        dice = _number(row.get("dice"))
        if math.isfinite(dice):
            by_case.setdefault(str(row["case"]), []).append(dice)
        else:
            by_case.setdefault(str(row["case"]), [])
    means = [(case, float(np.mean(v)) if v else math.nan) for case, v in by_case.items()]
    return sorted(means, key=lambda cm: (-cm[1] if math.isfinite(cm[1]) else math.inf, cm[0]))


def pick_cases(case_means: Sequence[tuple[str, float]]) -> list[tuple[str, str, float]]:
    """(role, case, mean Dice) for the best, median and worst case; fewer if cases are few.

    `case_means` is sorted best first; the median is the middle one (the better of two middles).

    >>> pick_cases([("a", 0.9), ("b", 0.8), ("c", 0.5), ("d", 0.1)])
    [('best', 'a', 0.9), ('median', 'b', 0.8), ('worst', 'd', 0.1)]
    >>> pick_cases([("a", 0.9)])
    [('best', 'a', 0.9)]
    """
    if not case_means:
        return []
    n = len(case_means)
    picks: list[tuple[str, str, float]] = []
    for role, index in (("best", 0), ("median", (n - 1) // 2), ("worst", n - 1)):
        case, mean = case_means[index]
        if all(case != c for _, c, _ in picks):
            picks.append((role, case, mean))
    return picks


def _metric_plot(rows: list[dict], metric: str) -> bytes | None:
    """report.plot_metric_boxes into memory; None when no label has a finite value."""
    if not any(math.isfinite(_number(r.get(metric))) for r in rows):
        return None
    finite = [r for r in rows if math.isfinite(_number(r.get(metric)))]
    with tempfile.TemporaryDirectory(prefix="volseg-report-") as tmp:
        path = Path(tmp) / f"{metric}.png"
        report.plot_metric_boxes(finite, path, metric)
        return path.read_bytes()


def _cases_section(rows: list[dict], source: str) -> str:
    summary = report.summarize(rows)
    metric_names = [m for m in ("dice", "hd95", "assd", "nsd") if m in summary["all"]]
    summary_rows = []
    for value, entry in summary["per_label"].items():
        cells = [f"{value} {entry['label_name']}", entry["n_cases"]]
        for m in metric_names:
            stats = entry.get(m)
            cells.append("-" if stats is None else f"{_fmt(stats['mean'])} ± {_fmt(stats['std'])}")
        summary_rows.append(cells)
    summary_rows.append(["all (mean of labels)", ""] + [_fmt(summary["all"][m]) for m in metric_names])
    header = ["label", "cases"] + [f"{m} (mm)" if m in ("hd95", "assd") else m for m in metric_names]
    parts = [f"<p>{_e(source)}</p>", _table(header, summary_rows, numeric_from=1)]
    plots = [(m, _metric_plot(rows, m)) for m in ("dice", "hd95")]
    figures = [f"<figure>{_img(png, f'{m} per label over cases')}</figure>" for m, png in plots if png is not None]
    parts.append(f'<div class="figs">{"".join(figures)}</div>')
    labels = sorted({(int(r["label"]), str(r.get("label_name", r["label"]))) for r in rows})
    by_key = {(str(r["case"]), int(r["label"])): r for r in rows}
    case_rows = []
    for case, mean in _case_means(rows):
        cells: list[Any] = [case, _fmt(mean)]
        cells += [_fmt(by_key.get((case, v), {}).get("dice")) for v, _ in labels]
        cells += [_fmt(by_key.get((case, v), {}).get("hd95"), 3) for v, _ in labels]
        case_rows.append(cells)
    header = ["case", "mean Dice"] + [f"Dice {v} {n}" for v, n in labels] + [f"HD95 {v} (mm)" for v, _ in labels]
    parts.append("<h3>Per case (best first)</h3>")
    parts.append(_table(header, case_rows))
    return "\n".join(parts)


def _find_image(case: str, ending: str, folders: Sequence[Path]) -> Path | None:
    """Channel 0 of a case (`<case>_0000<ending>`) in the first folder that has it."""
    for folder in folders:
        path = folder / f"{case}_0000{ending}"
        if path.is_file():
            return path
    return None


def _overlay_figures(
    picks: list[tuple[str, str, float]], scored: dict[str, Any], image_paths: dict[str, Path | None]
) -> str:
    """Orthogonal slices of each picked case: prediction solid, reference dashed, on its image."""
    ending, skip = scored["ending"], [] if scored["ignore"] is None else [scored["ignore"]]
    parts = []
    for role, case, mean in picks:
        ref_path = scored["ref_dir"] / f"{case}{ending}"
        pred = volumes.read_label(scored["pred_dir"] / f"{case}{ending}")
        ref = volumes.read_label(ref_path)
        image_path = image_paths.get(case)
        image = None
        if image_path is not None:
            volume = volumes.read_volume(image_path)
            check_on_grid(ref, ref_path, volume, image_path)
            image = volume.array[0]
        png = render_slices(
            image, pred.array[0], ref.array[0], ref.spacing, None,
            f"{role}: {case} (mean Dice {_fmt(mean, 3)})", scored["label_names"], skip,
        )  # fmt: skip
        caption = f"{role} case {case}, mean Dice {_fmt(mean, 3)}: prediction solid, reference dashed"
        if image is None:
            caption += " (no image found, black background)"
        parts.append(f"<figure>{_img(png, f'{role} case {case}')}<figcaption>{_e(caption)}</figcaption></figure>")
    return "\n".join(parts)


def _predict_validation(
    run_dir: Path, dataset: Path, split: dict, cfg: Config, pred_dir: Path, device: str, progress: bool
) -> tuple[layout.DatasetInfo, list[layout.Case], str]:
    """Predict the run's validation cases of `dataset` into `pred_dir` with the run's best model."""
    val_ids = [str(c) for c in split.get("val", [])]
    if not val_ids:
        raise VolsegError(run_dir / "split.json", "lists no validation cases", "predict and pass --predictions/--labels instead")
    info, cases = layout.read_dataset(dataset)
    by_id = {c.case_id: c for c in cases}
    missing = [c for c in val_ids if c not in by_id]
    if missing:
        raise VolsegError(
            dataset, f"lacks {len(missing)} validation case(s) of the run, e.g. {missing[0]}",
            "pass the dataset the run was trained on",
        )  # fmt: skip
    if len(info.channel_names) != cfg.model.in_channels:
        raise VolsegError(dataset, f"has {len(info.channel_names)} channels, the model expects {cfg.model.in_channels}")
    from volseg.checkpoint import resolve_model_path
    from volseg.inference import load_ensemble, predict_volume, resolve_device

    dev = resolve_device(device)
    model_path = resolve_model_path(run_dir)
    models, cfgs = load_ensemble(model_path, dev)
    chosen = [by_id[c] for c in val_ids]
    iterator: Any = chosen
    if progress and len(chosen) > 1:
        from tqdm import tqdm

        iterator = tqdm(chosen, desc="predict", unit="case", disable=None)
    for case in iterator:
        image, _ = layout.read_case(case)
        seg = predict_volume(models, cfgs, image, dev)
        volumes.write_volume(pred_dir / f"{case.case_id}{info.file_ending}", seg, reference=image)
    return info, chosen, f"{model_path.name} on {dev.type}"


def _score_dataset(
    run_dir: Path, dataset: Path, split: dict, cfg: Config, tmp: Path, device: str, progress: bool
) -> dict[str, Any]:
    """Per-case rows of the run's validation cases, predicted now into `tmp` and scored against labelsTr."""
    pred_dir = tmp / "predictions"
    info, cases, model_text = _predict_validation(run_dir, dataset, split, cfg, pred_dir, device, progress)
    wanted = {v: n for n, v in info.labels if v != 0 and v != info.ignore_label}
    ref_dir = dataset / "labelsTr"
    rows = report.evaluate_folders(pred_dir, ref_dir, wanted or None, info.file_ending, ignore_label=info.ignore_label)
    images = {c.case_id: c.images[0] for c in cases}
    return {
        "rows": rows, "pred_dir": pred_dir, "ref_dir": ref_dir, "ending": info.file_ending,
        "ignore": info.ignore_label, "label_names": {v: n for n, v in info.labels},
        "find_image": images.get, "looked": f"cases of {dataset}",
        "source": f"The run's {len(cases)} validation case(s) (split.json) of {dataset}, predicted by this report "
                  f"with {model_text}, scored against labelsTr.",
    }  # fmt: skip


def _score_predictions(cfg: Config, pred_dir: Path, ref_dir: Path, images: Path | None) -> dict[str, Any]:
    """Per-case rows of existing predictions, scored as `volseg evaluate` does."""
    ending, ignore = cfg.data.file_ending, cfg.data.ignore_label
    wanted, label_names = cfg.data.foreground_labels, {v: n for n, v in cfg.data.labels}
    if (ref_dir.parent / "dataset.json").is_file():  # as `volseg evaluate`: names and ending from there
        info = layout.read_dataset_info(ref_dir.parent)
        ending, ignore = info.file_ending, info.ignore_label
        wanted = {v: n for n, v in info.labels if v != 0 and v != info.ignore_label}
        label_names = {v: n for n, v in info.labels}
    if images is not None and not images.is_dir():
        raise VolsegError(images, "is not a folder", "--images takes the folder of <case>_0000 images")
    folders = [images] if images is not None else [ref_dir.parent / "imagesTs", ref_dir.parent / "imagesTr"]
    rows = report.evaluate_folders(pred_dir, ref_dir, wanted or None, ending, ignore_label=ignore)
    return {
        "rows": rows, "pred_dir": pred_dir, "ref_dir": ref_dir, "ending": ending, "ignore": ignore,
        "label_names": label_names, "find_image": lambda case: _find_image(case, ending, folders),
        "looked": f"looked for <case>_0000{ending} in {', '.join(str(f) for f in folders)}",
        "source": f"Predictions in {pred_dir} scored against {ref_dir}.",
    }  # fmt: skip


def build_report(
    run_dir: PathLike,
    out_html: PathLike,
    dataset: PathLike | None = None,
    predictions: PathLike | None = None,
    labels: PathLike | None = None,
    images: PathLike | None = None,
    device: str = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """`volseg report`: write one self-contained HTML report of a training run.

    Always: model card (config.json, plan.json, metrics.csv, versions), training curves and the
    last/best epoch's validation metrics. Per-case scores, box plots and best / median / worst
    overlays come from `predictions` scored against `labels` (images from `images`, else
    imagesTs/imagesTr next to `labels`), or from predicting the run's validation cases
    (split.json) of `dataset` with the run's best model. Returns {"path", "cases", "sections"}.
    """
    run_dir, out_html = Path(run_dir), Path(out_html)
    if dataset is not None and (predictions is not None or labels is not None):
        raise VolsegError(None, "give either --dataset or --predictions with --labels, not both")
    if (predictions is None) != (labels is None):
        raise VolsegError(None, "--predictions and --labels go together", "pass both folders")
    cfg, fingerprint, metric_rows, columns, split = _read_run(run_dir)
    notes: list[str] = []
    sections = []
    best = _best_epoch_index(metric_rows, run_dir)  # read once from model_best's header
    sections.append(_section("model-card", "Model card", _model_card(run_dir, cfg, fingerprint, metric_rows, split, best)))
    with tempfile.TemporaryDirectory(prefix="volseg-report-") as tmp:
        curves = Path(tmp) / "curves.png"
        report.plot_training_curves(run_dir / "metrics.csv", curves)
        sections.append(_section("curves", "Training curves", _img(curves.read_bytes(), "training curves")))
    sections.append(_section("validation", "Validation during training", _validation_table(cfg, metric_rows, columns, best)))

    n_cases = 0
    with tempfile.TemporaryDirectory(prefix="volseg-report-") as tmp:
        if dataset is not None:
            scored = _score_dataset(run_dir, Path(dataset), split, cfg, Path(tmp), device, progress)
        elif predictions is not None and labels is not None:
            scored = _score_predictions(cfg, Path(predictions), Path(labels), None if images is None else Path(images))
        else:
            scored = None
            notes.append(
                "No per-case results: this report shows the model card, curves and validation table only. "
                "Pass --dataset DATASET (to predict the run's validation cases) or --predictions PRED --labels REF "
                "for per-case scores, box plots and overlays."
            )
        if scored is not None:
            rows = scored["rows"]
            n_cases = len({r["case"] for r in rows})
            sections.append(_section("cases", "Per-case results", _cases_section(rows, scored["source"])))
            picks = pick_cases(_case_means(rows))
            image_paths = {case: scored["find_image"](case) for _, case, _ in picks}
            absent = [case for case, path in image_paths.items() if path is None]
            if absent:
                notes.append(f"No image found for {', '.join(absent)} ({scored['looked']}); "
                             "their overlays have a black background.")  # fmt: skip
            body = _overlay_figures(picks, scored, image_paths)
            sections.append(_section("overlays", "Best, median and worst case", body))

    title = f"volseg report: {run_dir.resolve().name}"
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    document = "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{_e(title)}</title>",
            f"<style>{_CSS}</style>",
            "</head>",
            "<body>",
            f"<h1>{_e(title)}</h1>",
            f'<p class="sub">run folder <code>{_e(run_dir.resolve())}</code>, written {_e(stamp)}</p>',
            *[_note(n) for n in notes],
            *sections,
            "</body>",
            "</html>",
            "",
        ]
    )
    atomic.write_text_atomic(out_html, document)
    ids = [s.split('"')[1] for s in sections]
    return {"path": out_html, "cases": n_cases, "sections": ids}
