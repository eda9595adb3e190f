"""volseg.cli: help texts, exit codes, one-line errors, and the synth -> train -> predict -> evaluate flow."""

from __future__ import annotations

import csv
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from volseg import layout, synthetic, volumes
from volseg.cli import app, main
from volseg.memory import MIN_STEPS

EVAL_COLUMNS = ["case", "label", "dice", "jaccard", "precision", "recall", "hd", "hd95"]
TINY_TRAIN_FLAGS = [
    "--max-epochs", "2", "--iters-per-epoch", "5", "--patch-size", "16,16,16",
    "--batch-size", "2", "--base-width", "4", "--depth", "3", "--quiet", "--device", "cpu", "--members", "1",
]  # fmt: skip


def run_cli(argv: list[str]) -> int:
    """Exit code of `volseg ARGV` as the console script would report it (`sys.exit(main())`)."""
    try:
        returned = main(argv)
    except SystemExit as exc:
        code = exc.code
        return 0 if code is None else code if isinstance(code, int) else 1
    return 0 if returned is None else int(returned)


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("volseg: error:"), stderr
    assert "Traceback" not in stderr
    return lines[0]


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch):
    """Help is rendered for a wide terminal so no option name is wrapped or cut."""
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setenv("TERMINAL_WIDTH", "200")


def command_options() -> dict[str, list[str]]:
    """Every subcommand with the long names of its options, read from the app itself."""
    import typer

    group = typer.main.get_command(app)
    out = {}
    for name, command in group.commands.items():
        out[name] = [opt for param in command.params for opt in param.opts if opt.startswith("--")]
    return out


# ------------------------------------------------------------------------------------------------
# help


def test_top_level_help_lists_every_command(capsys):
    assert run_cli(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("train", "predict", "evaluate", "check", "synth", "demo", "info"):
        assert name in command_options()
        assert name in out


@pytest.mark.parametrize("command", sorted(command_options()))
def test_help_of_every_command_exits_0_and_lists_its_options(command, capsys):
    assert run_cli([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert "--help" in out
    for option in command_options()[command]:
        assert option in out, f"{command} --help does not list {option}"


def test_train_flags_are_kebab_case_copies_of_config_fields():
    import dataclasses

    from volseg.config import DataConfig, ModelConfig, TrainConfig

    fields = {f.name for cls in (DataConfig, ModelConfig, TrainConfig) for f in dataclasses.fields(cls)}
    for option in command_options()["train"]:
        name = option[2:].replace("-", "_")
        if name not in ("output", "device", "resume", "quiet", "help", "plan", "tensorboard", "members"):
            assert name in fields, option


# ------------------------------------------------------------------------------------------------
# synth and check


def test_synth_then_check_ok(tmp_path, capsys):
    dataset = tmp_path / "ds"
    code = run_cli(["synth", "-o", str(dataset), "--cases", "3", "--test-cases", "1", "--shape", "12,10,8",
                    "--spacing", "1,1,2", "--classes", "3", "--seed", "2"])
    assert code == 0
    assert "wrote 3 training and 1 test cases" in capsys.readouterr().out
    assert len(list((dataset / "imagesTr").glob("*_0000.nii.gz"))) == 3
    assert len(list((dataset / "labelsTs").glob("*.nii.gz"))) == 1
    image = volumes.read_volume(dataset / "imagesTr" / "case_000_0000.nii.gz")
    assert image.shape == (12, 10, 8) and image.spacing == pytest.approx((1.0, 1.0, 2.0))

    assert run_cli(["check", str(dataset)]) == 0
    captured = capsys.readouterr()
    assert "OK" in captured.out and captured.err == ""


def test_synth_refuses_an_existing_folder_without_overwrite(tmp_path, capsys):
    dataset = tmp_path / "ds"
    args = ["synth", "-o", str(dataset), "--cases", "1", "--shape", "8,8,8"]
    assert run_cli(args) == 0
    capsys.readouterr()
    assert run_cli(args) == 2
    assert "--overwrite" in one_error_line(capsys.readouterr().err)
    assert run_cli([*args, "--overwrite"]) == 0


def broken_dataset(root: Path) -> list[str]:
    """A small dataset with three problems; returns a fragment each problem line must contain."""
    synthetic.write_dataset(root, n_cases=3, shape_vox=(10, 9, 8), spacing_mm=(1, 1, 2), n_classes=3)
    (root / "labelsTr" / "case_001.nii.gz").unlink()  # missing label
    label = volumes.read_label(root / "labelsTr" / "case_002.nii.gz")
    array = label.array[0].copy()
    array[0, 0, 0] = 7  # undeclared label value
    volumes.write_volume(root / "labelsTr" / "case_002.nii.gz", array, reference=label)
    volumes.write_volume(root / "labelsTr" / "stray.nii.gz", array, affine=label.affine)  # label without image
    return ["case_001.nii.gz", "[7]", "stray.nii.gz"]


def test_check_broken_dataset_exits_2_and_prints_every_problem(tmp_path, capsys):
    root = tmp_path / "broken"
    fragments = broken_dataset(root)
    problems = layout.check_dataset(root)
    assert len(problems) == 3

    code = run_cli(["check", str(root)])

    err = capsys.readouterr().err
    assert code == 2
    for problem in problems:
        assert problem in err
    for fragment in fragments:
        assert fragment in err
    assert "3 problem(s)" in err
    assert "Traceback" not in err


def test_check_broken_dataset_exit_code_of_the_real_program(tmp_path, src_env):
    """The same through `python -m volseg`, i.e. what a shell or CI job sees."""
    root = tmp_path / "broken"
    broken_dataset(root)
    env = src_env
    result = subprocess.run([sys.executable, "-m", "volseg", "check", str(root)], capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "case_001.nii.gz" in result.stderr and "Traceback" not in result.stderr


# ------------------------------------------------------------------------------------------------
# bad input: exit 2, one line, no traceback


def test_train_missing_dataset(tmp_path, capsys):
    assert run_cli(["train", str(tmp_path / "nope"), "-o", str(tmp_path / "run"), "--quiet"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "nope" in line and "does not exist" in line
    assert not (tmp_path / "run").exists()


def test_train_bad_patch_size_flag(tiny_dataset, tmp_path, capsys):
    assert run_cli(["train", str(tiny_dataset), "-o", str(tmp_path / "run"), "--patch-size", "16,16"]) == 2
    assert "--patch-size" in one_error_line(capsys.readouterr().err)


def test_predict_missing_model_file(tmp_path, capsys):
    image = tmp_path / "img.nii.gz"
    volumes.write_volume(image, np.zeros((4, 5, 6), np.float32))
    assert run_cli(["predict", "-m", str(tmp_path / "missing.safetensors"), "-i", str(image),
                    "-o", str(tmp_path / "out"), "--device", "cpu", "--quiet"]) == 2
    assert "missing.safetensors" in one_error_line(capsys.readouterr().err)


def test_predict_run_folder_without_model(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    assert run_cli(["predict", "-m", str(tmp_path / "run"), "-i", str(tmp_path), "-o", str(tmp_path / "out"),
                    "--device", "cpu"]) == 2
    assert "no model file" in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("how", ["torch_save", "plain_pickle"])
def test_pickle_as_model_is_refused(tmp_path, capsys, how):
    model_path = tmp_path / "model.safetensors"  # the name does not fool the reader
    if how == "torch_save":
        torch.save({"w": torch.zeros(2)}, model_path)
    else:
        model_path.write_bytes(pickle.dumps({"w": [0.0, 1.0]}, protocol=4))
    image = tmp_path / "img.nii.gz"
    volumes.write_volume(image, np.zeros((4, 5, 6), np.float32))
    assert run_cli(["predict", "-m", str(model_path), "-i", str(image), "-o", str(tmp_path / "out"),
                    "--device", "cpu", "--quiet"]) == 2
    assert "pickle" in one_error_line(capsys.readouterr().err)
    assert run_cli(["info", str(model_path)]) == 2
    assert "pickle" in one_error_line(capsys.readouterr().err)


def test_garbage_model_file_is_refused(tmp_path, capsys):
    model_path = tmp_path / "model.safetensors"
    model_path.write_bytes(b"\x00\x01 definitely not safetensors")
    assert run_cli(["info", str(model_path)]) == 2
    assert "safetensors" in one_error_line(capsys.readouterr().err)


def test_predict_cuda_without_gpu(trained_run, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without a CUDA GPU")
    assert run_cli(["predict", "-m", str(trained_run[0]), "-i", str(tmp_path), "-o", str(tmp_path / "o"),
                    "--device", "cuda"]) == 2
    assert "--device cpu" in one_error_line(capsys.readouterr().err)


def test_evaluate_missing_prediction_folder(tmp_path, capsys):
    (tmp_path / "ref").mkdir()
    assert run_cli(["evaluate", str(tmp_path / "pred"), str(tmp_path / "ref"), "-o", str(tmp_path / "m.csv")]) == 2
    one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "DATASET"],  # required -o missing
        ["predict", "-m", "x"],  # required -i and -o missing
        ["synth", "-o", "OUT", "--cases", "many"],  # not an integer
        ["no-such-command"],
    ],
)
def test_usage_errors_exit_2_without_traceback(argv, tmp_path, capsys):
    argv = [a.replace("DATASET", str(tmp_path)).replace("OUT", str(tmp_path / "o")) for a in argv]
    assert run_cli(argv) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    assert captured.err.strip()  # the user is told what is wrong
    assert not (tmp_path / "o").exists()


def test_usage_error_exit_code_of_the_real_program(tmp_path, src_env):
    env = src_env
    result = subprocess.run([sys.executable, "-m", "volseg", "train", str(tmp_path)], capture_output=True,
                            text=True, env=env, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------------------------------------------
# info and evaluate


def test_info_prints_config_and_scores(trained_run, capsys):
    assert run_cli(["info", str(trained_run[0])]) == 0
    out = capsys.readouterr().out
    assert '"base_width": 4' in out and '"parameters"' in out and '"epoch"' in out


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_evaluate_writes_csv_and_summary_with_known_values(tiny_dataset, tmp_path, capsys):
    """Predictions equal to the references except one case with one label wiped: known Dice."""
    pred = tmp_path / "pred"
    pred.mkdir()
    ref = tiny_dataset / "labelsTs"
    names = sorted(p.name for p in ref.glob("*.nii.gz"))
    for i, name in enumerate(names):
        label = volumes.read_label(ref / name)
        array = label.array[0].copy()
        if i == 0:
            array[array == 2] = 0
        volumes.write_volume(pred / name, array, reference=label)
    out_csv = tmp_path / "eval" / "metrics.csv"

    assert run_cli(["evaluate", str(pred), str(ref), "-o", str(out_csv), "--no-plot"]) == 0

    assert str(out_csv) in capsys.readouterr().out
    rows = read_csv(out_csv)
    assert list(rows[0])[:2] == ["case", "label"]
    assert set(EVAL_COLUMNS) <= set(rows[0])
    assert len(rows) == 2 * len(names)  # labels 1 and 2 for each case
    by_key = {(r["case"], int(r["label"])): r for r in rows}
    first = names[0][: -len(".nii.gz")]
    assert float(by_key[(first, 2)]["dice"]) == 0.0
    for (case, label), row in by_key.items():
        if (case, label) != (first, 2):
            assert float(row["dice"]) == 1.0 and float(row["hd95"]) == 0.0
    assert by_key[(first, 1)]["label_name"] == "class1"  # names from the dataset.json next to REF

    summary = json.loads(out_csv.with_suffix(".summary.json").read_text())
    assert isinstance(summary, dict) and summary
    assert not (tmp_path / "eval" / "metrics.png").exists()  # --no-plot


# ------------------------------------------------------------------------------------------------
# end to end


@pytest.mark.slow
def test_end_to_end_synth_train_predict_evaluate(tmp_path, capsys):
    data, run, pred, table = tmp_path / "data", tmp_path / "run", tmp_path / "pred", tmp_path / "metrics.csv"
    assert run_cli(["synth", "-o", str(data), "--cases", "4", "--test-cases", "2", "--shape", "24,24,16",
                    "--spacing", "1,1,2", "--classes", "3"]) == 0
    assert run_cli(["check", str(data)]) == 0
    assert run_cli(["train", str(data), "-o", str(run), "--seed", "0", "--max-minutes", "2", *TINY_TRAIN_FLAGS]) == 0
    out = capsys.readouterr().out
    assert "best validation Dice" in out
    for name in ("model_best.safetensors", "model_last.safetensors", "metrics.csv", "config.json", "split.json",
                 "training_curves.png"):
        assert (run / name).is_file(), name
    assert len(read_csv(run / "metrics.csv")) == 2

    assert run_cli(["predict", "-m", str(run), "-i", str(data / "imagesTs"), "-o", str(pred), "--quiet",
                    "--device", "cpu"]) == 0
    assert "wrote 2 segmentation(s)" in capsys.readouterr().out
    assert sorted(p.name for p in pred.iterdir()) == sorted(p.name for p in (data / "labelsTs").iterdir())
    # --continue: nothing left to do
    assert run_cli(["predict", "-m", str(run), "-i", str(data / "imagesTs"), "-o", str(pred), "--quiet",
                    "--device", "cpu", "--continue"]) == 0
    assert "wrote 0 segmentation(s)" in capsys.readouterr().out

    assert run_cli(["evaluate", str(pred), str(data / "labelsTs"), "-o", str(table)]) == 0
    rows = read_csv(table)
    assert len(rows) == 4  # 2 cases x 2 labels
    assert all(0.0 <= float(r["dice"]) <= 1.0 for r in rows)
    assert table.with_suffix(".summary.json").is_file()
    assert table.with_suffix(".png").is_file()


@pytest.mark.slow
def test_demo_produces_overlay_metrics_and_curves(tmp_path, capsys):
    out = tmp_path / "demo"
    assert run_cli(["demo", "-o", str(out), "--minutes", "0.3", "--device", "cpu"]) == 0
    for name in ("overlay.png", "metrics.csv", "metrics.summary.json", "run/training_curves.png"):
        assert (out / name).is_file(), name
    rows = read_csv(out / "metrics.csv")
    assert rows and all(0.0 <= float(r["dice"]) <= 1.0 for r in rows)
    last = [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")][-1]
    assert 0.0 <= json.loads(last)["mean_dice"] <= 1.0
    # a second demo run into the same folder re-creates it; a foreign folder is refused
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("precious")
    assert run_cli(["demo", "-o", str(foreign), "--minutes", "0.01"]) == 2
    assert (foreign / "keep.txt").read_text() == "precious"


def test_plan_writes_an_editable_plan_that_train_uses(tiny_dataset, tmp_path, capsys):
    plan = tmp_path / "plan.json"
    assert run_cli(["plan", str(tiny_dataset), "-o", str(plan), "--device", "cpu", "--max-minutes", "0.5"]) == 0
    written = json.loads(plan.read_text())
    fp, model = written["fingerprint"], written["config"]["model"]
    # five cases: two models share the half minute, so the plan is fitted to each one's quarter
    assert fp["budget_minutes"] == 0.25 and written["config"]["train"]["max_minutes"] == 0.5
    printed = capsys.readouterr().out
    assert "2 models" in printed
    # a quarter minute holds fewer than MIN_STEPS steps of width 16: width 8 was timed too, and taken
    # only if its steps reach MIN_STEPS
    timed = fp["step_seconds_by_width"]
    assert set(timed) == {"16", "8"}
    assert model["base_width"] == (8 if 0.9 * 15 / timed["8"] >= MIN_STEPS else 16)
    assert f"width {model['base_width']}" in printed
    assert run_cli(["plan", str(tiny_dataset), "-o", str(plan)]) == 2  # no silent overwrite
    # an edited plan is trained as written (no re-planning, no width fitting)
    written["config"]["model"].update(base_width=4, depth=3)
    written["config"]["train"].update(patch_size=[16, 16, 16], iters_per_epoch=2, max_epochs=1)
    plan.write_text(json.dumps(written))
    run = tmp_path / "run"
    assert run_cli(["train", str(tiny_dataset), "-o", str(run), "--plan", str(plan), "--device", "cpu", "--quiet"]) == 0
    for member in ("member_0", "member_1"):  # both members train the plan, each for half of its budget
        used = json.loads((run / member / "plan.json").read_text())
        assert used["config"]["model"]["base_width"] == 4 and used["config"]["train"]["patch_size"] == [16, 16, 16]
        assert used["config"]["train"]["max_minutes"] == 0.25


def test_synth_lesions_kind_writes_a_two_channel_thick_slice_set(tmp_path, capsys):
    out = tmp_path / "les"
    assert run_cli(["synth", "-o", str(out), "--kind", "lesions", "--cases", "1", "--test-cases", "1",
                    "--in-plane", "48"]) == 0
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "T1c", "1": "FLAIR"}
    assert (out / "imagesTs" / "case_001_0001.nii.gz").exists()
    assert run_cli(["synth", "-o", str(tmp_path / "x"), "--kind", "nope"]) == 2
    assert "unknown --kind" in capsys.readouterr().err
