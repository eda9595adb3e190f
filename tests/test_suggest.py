"""volseg.suggest: uncertainty, slice ranking, mirror TTA, applying suggestions, and `volseg suggest-slices`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from volseg import layout, volumes
from volseg.cli import main
from volseg.errors import VolsegError
from volseg.preprocessing import slice_indices, sparse_slice_mask
from volseg.sparsify import DENSE_LABELS, sparsify_dataset
from volseg.suggest import (
    CSV_COLUMNS,
    apply_suggestions,
    relative_positions,
    select_spread,
    even_over_cases,
    labelled_slices,
    mirror_predictions,
    next_even_slices,
    random_over_cases,
    random_unlabelled_slices,
    rank_slices,
    read_suggestions_csv,
    slice_uncertainty,
    slices_mask,
)


def run_cli(argv: list[str]) -> int:
    """Exit code of `volseg ARGV` as the console script would report it."""
    try:
        main(argv)
    except SystemExit as exc:
        return 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 1
    return 0


def two_class(p1: np.ndarray) -> np.ndarray:
    """(2, I, J, K) probabilities from the probability of class 1."""
    p1 = np.asarray(p1, dtype=np.float32)
    return np.stack([1 - p1, p1])


def test_uncertainty_peaks_where_the_mean_prediction_is_one_half() -> None:
    p1 = np.linspace(0, 1, 11).reshape(11, 1, 1)
    u = slice_uncertainty([two_class(p1)])[:, 0, 0]
    assert int(np.argmax(u)) == 5 and u[5] == pytest.approx(1.0)
    assert u[0] == pytest.approx(0.0, abs=1e-6) and u[-1] == pytest.approx(0.0, abs=1e-6)
    assert np.all(np.diff(u[:6]) > 0) and np.all(np.diff(u[5:]) < 0)
    # two confident predictions that disagree: mean 0.5, as uncertain as it gets; all of it is disagreement
    a, b = two_class(np.ones((1, 1, 1))), two_class(np.zeros((1, 1, 1)))
    assert slice_uncertainty([a, b]).item() == pytest.approx(1.0)
    assert slice_uncertainty([a, b], "mutual_information").item() == pytest.approx(1.0)
    # three classes equally likely: 1 after normalising by log(3)
    assert slice_uncertainty([np.full((3, 1, 1, 1), 1 / 3)]).item() == pytest.approx(1.0)
    with pytest.raises(VolsegError, match="measure"):
        slice_uncertainty([a], "variance")


def test_labelled_slices_are_never_suggested() -> None:
    rng = np.random.default_rng(0)
    shape = (9, 7, 5)
    uncertainty = rng.random(shape)
    labelled = sparse_slice_mask(shape, slices_per_axis=2)
    ranked = rank_slices(uncertainty * 0 + 1, labelled, top_k=100, min_gap=0)  # flat uncertainty: all ties
    chosen = {(a, i) for a, i, _ in ranked}
    for axis in range(3):
        for index in slice_indices(shape[axis], 2, "even"):
            assert (axis, index) not in chosen
    assert len(ranked) == sum(shape) - 6  # every other slice is a candidate
    # labelled voxels add nothing to a slice's score
    ranked = rank_slices(uncertainty, labelled, top_k=100, min_gap=0)
    for axis, index, score in ranked:
        where = [slice(None)] * 3
        where[axis] = index
        assert score == pytest.approx(np.where(labelled, 0, uncertainty)[tuple(where)].sum())


def test_labelled_slices_ignores_crossing_planes_and_sees_whole_slices() -> None:
    shape = (6, 5, 4)
    mask = sparse_slice_mask(shape, slices_per_axis=1)  # orthogonal planes at 3, 2, 2
    assert [np.flatnonzero(labelled_slices(mask, a)).tolist() for a in range(3)] == [[3], [2], [2]]
    # many planes on axis 2 cover half of every axis-0 slice: still only axis 2's slices count
    dense_axis2 = sparse_slice_mask(shape, slices_per_axis=2, axes=(2,))
    assert labelled_slices(dense_axis2, 0).sum() == 0
    assert labelled_slices(dense_axis2, 2).sum() == 2
    assert labelled_slices(np.ones(shape, bool), 1).all()


def test_min_gap_keeps_suggestions_apart() -> None:
    # a bump of uncertainty around slice 10 of axis 0: without a gap the top 3 are neighbours
    i = np.arange(20, dtype=float)
    uncertainty = np.broadcast_to(np.exp(-((i - 10) ** 2) / 8)[:, None, None], (20, 3, 3)).copy()
    near = [idx for _, idx, _ in rank_slices(uncertainty, axes=(0,), top_k=3, min_gap=0)]
    assert sorted(near) == [9, 10, 11]
    for gap in (2, 3, 5):
        picks = [idx for _, idx, _ in rank_slices(uncertainty, axes=(0,), top_k=3, min_gap=gap)]
        assert picks[0] == 10 and len(picks) == 3
        assert min(abs(a - b) for k, a in enumerate(picks) for b in picks[k + 1 :]) >= gap
    # the gap is per axis: the same index on another axis is fine
    cube = np.zeros((5, 5, 5))
    cube[2, 2, 2] = 1.0
    assert {(a, i) for a, i, _ in rank_slices(cube, top_k=3, min_gap=3)} == {(0, 2), (1, 2), (2, 2)}


def test_axes_on_an_anisotropic_shape() -> None:
    shape = (6, 4, 3)
    uncertainty = np.zeros(shape)
    uncertainty[:, 3, :] = 1.0  # one plane of axis 1: 6 x 3 voxels
    ranked = rank_slices(uncertainty, axes=(0, 1, 2), top_k=1)
    assert ranked == [(1, 3, 18.0)]
    # restricted to other axes, every slice of them cuts that plane in a line of the same length
    assert rank_slices(uncertainty, axes=(0,), top_k=6, min_gap=0) == [(0, i, 3.0) for i in range(6)]
    assert rank_slices(uncertainty, axes=(2,), top_k=3, min_gap=0) == [(2, i, 6.0) for i in range(3)]
    assert all(0 <= i < shape[a] for a, i, _ in rank_slices(np.random.default_rng(1).random(shape), top_k=13))
    with pytest.raises(VolsegError, match="axes"):
        rank_slices(uncertainty, axes=(3,))
    with pytest.raises(VolsegError, match="shape"):
        rank_slices(uncertainty, np.zeros((6, 4, 4), bool))


def test_mirror_tta_of_a_mirror_symmetric_predictor_is_the_plain_prediction() -> None:
    image = np.random.default_rng(2).normal(size=(1, 5, 4, 3)).astype(np.float32)

    def voxelwise(x: np.ndarray) -> np.ndarray:  # depends on each voxel alone: commutes with flips
        return two_class(1 / (1 + np.exp(-3 * x[0])))

    plain = voxelwise(image)
    variants = list(mirror_predictions(voxelwise, image))
    assert len(variants) == 4
    for v in variants:
        np.testing.assert_allclose(v, plain, atol=1e-6)
    np.testing.assert_allclose(slice_uncertainty(variants, "mutual_information"), 0, atol=1e-5)

    def position(x: np.ndarray) -> np.ndarray:  # ignores the image, grows along I: not symmetric
        return two_class(np.broadcast_to(np.linspace(0, 1, x.shape[1])[:, None, None], x.shape[1:]))

    variants = list(mirror_predictions(position, image, axes=(0, 2)))
    np.testing.assert_allclose(variants[2], position(image))  # flipped along K: unchanged
    np.testing.assert_allclose(variants[1], position(image)[:, ::-1])  # flipped back along I: reversed


def test_even_and_random_baselines() -> None:
    mask = sparse_slice_mask((36, 20, 12), slices_per_axis=1)
    picks = next_even_slices(mask, 6)
    assert sorted(a for a, _ in picks) == [0, 0, 1, 1, 2, 2]  # spread over the axes
    for axis, index in picks:
        assert not labelled_slices(mask, axis)[index]
    assert next_even_slices(mask, 2, axes=(0,)) == [(0, 6), (0, 30)]  # sparsify's even positions for 3
    free = sum(mask.shape) - 3
    rng = np.random.default_rng(0)
    drawn = random_unlabelled_slices(mask, 100, rng)
    assert len(drawn) == len(set(drawn)) == free
    assert int(slices_mask((4, 5, 6), [(1, 0), (1, 4)]).sum()) == 2 * 4 * 6


def test_even_baseline_over_cases_is_a_round_robin() -> None:
    mask = sparse_slice_mask((36, 8, 8), slices_per_axis=1)
    masks = {name: mask for name in "abcde"}
    first = even_over_cases(masks, 3, np.random.default_rng(0), axes=(0,))
    assert len({r["case"] for r in first}) == 3  # three different cases, each at its next even slice
    assert {(r["axis"], r["index"]) for r in first} == {(0, 6)}
    assert first == even_over_cases(masks, 3, np.random.default_rng(0), axes=(0,))  # seeded
    # the next round goes to the two cases left out before anyone gets a second slice
    labelled = {n: m | slices_mask(m.shape, [(r["axis"], r["index"]) for r in first if r["case"] == n])
                for n, m in masks.items()}  # fmt: skip
    second = even_over_cases(labelled, 4, np.random.default_rng(0), axes=(0,))
    assert {r["case"] for r in second[:2]} == set("abcde") - {r["case"] for r in first}
    assert [r["index"] for r in second[2:]] == [30, 30]
    # a budget larger than the free slices stops when every slice is labelled
    tiny = {"x": np.zeros((3, 2, 2), bool)}
    assert len(even_over_cases(tiny, 10, np.random.default_rng(0), axes=(0,))) == 3


def test_random_baseline_over_cases_draws_only_free_slices() -> None:
    big, small = np.zeros((30, 4, 4), bool), np.zeros((6, 4, 4), bool)
    big[10], small[2] = True, True
    masks = {"big": big, "small": small}
    rows = random_over_cases(masks, 12, np.random.default_rng(3), axes=(0,))
    assert len(rows) == 12 and len({(r["case"], r["index"]) for r in rows}) == 12  # no slice twice
    assert all(not masks[r["case"]][r["index"]].any() for r in rows)  # never a labelled slice
    assert rows == random_over_cases(masks, 12, np.random.default_rng(3), axes=(0,))  # seeded
    # uniform over slices, not over cases: the 29 free slices of "big" draw most of 2,000 budgets
    counts = [sum(r["case"] == "big" for r in random_over_cases(masks, 1, np.random.default_rng(k), axes=(0,)))
              for k in range(2000)]  # fmt: skip
    assert 0.80 < np.mean(counts) < 0.92  # 29 / 34 = 0.85
    assert len(random_over_cases(masks, 100, np.random.default_rng(0), axes=(0,))) == 29 + 5  # capped
    with pytest.raises(VolsegError, match="at least 1"):
        random_over_cases(masks, 0, np.random.default_rng(0))


@pytest.fixture(scope="module")
def sparse_dataset(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("suggest") / "sparse"
    sparsify_dataset(tiny_dataset, out, slices_per_axis=1, progress=False)
    return out


def test_apply_suggestions_labels_the_slices_from_the_dense_labels(sparse_dataset: Path, tmp_path: Path) -> None:
    info, cases = layout.read_dataset(sparse_dataset)
    case = cases[0]
    rows = [{"case": case.case_id, "axis": 2, "index": 1}, {"case": case.case_id, "axis": 0, "index": 0}]
    out = tmp_path / "round1"
    result = apply_suggestions(sparse_dataset, rows, out)
    assert result["slices_added"] == 2
    before = volumes.read_label(case.label).array[0]
    after = volumes.read_label(out / "labelsTr" / case.label.name).array[0]
    dense = volumes.read_label(sparse_dataset / DENSE_LABELS / case.label.name).array[0]
    added = slices_mask(before.shape, [(2, 1), (0, 0)])
    np.testing.assert_array_equal(after[added], dense[added])
    np.testing.assert_array_equal(after[~added], before[~added])
    assert labelled_slices(after != info.ignore_label, 2)[1]
    # the other cases are unchanged, and the copy is a dataset volseg accepts
    other = cases[1].label.name
    np.testing.assert_array_equal(volumes.read_label(out / "labelsTr" / other).array, volumes.read_label(cases[1].label).array)
    assert layout.check_dataset(out) == []
    meta = json.loads((out / "dataset.json").read_text())["sparsify"]
    assert meta["added_slices"] == [{case.case_id: [[2, 1], [0, 0]]}]
    assert meta["labelled_fraction"] == pytest.approx(result["labelled_fraction"])
    with pytest.raises(VolsegError, match="exists"):
        apply_suggestions(sparse_dataset, rows, out)
    with pytest.raises(VolsegError, match="no case"):
        apply_suggestions(sparse_dataset, [{"case": "nope", "axis": 0, "index": 0}], tmp_path / "x")
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_cli_suggest_slices_end_to_end(
    sparse_dataset: Path, trained_run: tuple[Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run_dir, _ = trained_run
    out = tmp_path / "suggest"
    # --diversity 0: each case's picks then follow its own scores (with spreading, a pick discounted by
    # another case's pick at the same anatomy may come second despite a higher raw score)
    argv = ["suggest-slices", str(sparse_dataset), "-m", str(run_dir), "-o", str(out), "--top-k", "2",
            "--min-gap", "2", "--diversity", "0", "--device", "cpu", "--quiet"]  # fmt: skip
    assert run_cli(argv) == 0
    assert "suggested" in capsys.readouterr().out
    with open(out / "suggestions.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames or ()) == CSV_COLUMNS
        rows = list(reader)
    info, cases = layout.read_dataset(sparse_dataset)
    assert {r["case"] for r in rows} == {c.case_id for c in cases}
    for case in cases:
        mine = [r for r in rows if r["case"] == case.case_id]
        assert [int(r["rank"]) for r in mine] == [1, 2]
        assert float(mine[0]["score"]) >= float(mine[1]["score"])
        labelled = volumes.read_label(case.label).array[0] != info.ignore_label
        assert float(mine[0]["labelled_fraction_before"]) == pytest.approx(labelled.mean(), abs=1e-5)
        for r in mine:
            axis, index = int(r["axis"]), int(r["index"])
            assert index not in slice_indices(labelled.shape[axis], 1, "even")  # sparsify's labelled plane
            assert not labelled_slices(labelled, axis)[index]
        if mine[0]["axis"] == mine[1]["axis"]:
            assert abs(int(mine[0]["index"]) - int(mine[1]["index"])) >= 2
        png = out / f"{case.case_id}.png"
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert read_suggestions_csv(out / "suggestions.csv")[0]["axis"] in (0, 1, 2)
    # a second run refuses to replace the CSV
    assert run_cli(argv) == 2
    assert "already exists" in capsys.readouterr().err


def test_cli_budget_keeps_the_best_slices_over_the_dataset(
    sparse_dataset: Path, trained_run: tuple[Path, dict], tmp_path: Path
) -> None:
    run_dir, _ = trained_run
    common = ["suggest-slices", str(sparse_dataset), "-m", str(run_dir), "--top-k", "2", "--device", "cpu", "--quiet",
              "--diversity", "0"]  # fmt: skip
    assert run_cli([*common, "-o", str(tmp_path / "all")]) == 0
    assert run_cli([*common, "-o", str(tmp_path / "budget"), "--budget", "3"]) == 0
    everything = read_suggestions_csv(tmp_path / "all" / "suggestions.csv")
    chosen = read_suggestions_csv(tmp_path / "budget" / "suggestions.csv")
    assert len(chosen) == 3
    best = sorted(float(r["score"]) for r in everything)[-3:]
    assert sorted(float(r["score"]) for r in chosen) == best
    for row in chosen:  # the same slices the per-case ranking found, ranks renumbered within each case
        assert any((r["case"], r["axis"], r["index"]) == (row["case"], row["axis"], row["index"]) for r in everything)
    for case in {r["case"] for r in chosen}:
        assert sorted(r["rank"] for r in chosen if r["case"] == case) == list(range(1, 1 + sum(
            r["case"] == case for r in chosen)))  # fmt: skip
    previews = {p.stem for p in (tmp_path / "budget").glob("*.png")}
    assert previews == {r["case"] for r in chosen}  # previews only for the cases that got a slice
    assert run_cli([*common, "-o", str(tmp_path / "zero"), "--budget", "0"]) == 2


def test_cli_refuses_a_dataset_without_an_ignore_label(
    tiny_dataset: Path, trained_run: tuple[Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run_dir, _ = trained_run
    argv = ["suggest-slices", str(tiny_dataset), "-m", str(run_dir), "-o", str(tmp_path / "s"), "--device", "cpu"]
    assert run_cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "dataset.json" in err and "nothing unlabelled to suggest" in err
    assert not (tmp_path / "s").exists()


def _spread_rows(cases: str, peaks: tuple[tuple[int, float, float], ...]) -> list[dict]:
    return [{"case": c, "axis": 0, "index": i, "score": sc, "position": p} for c in cases for i, sc, p in peaks]


def test_select_spread_without_diversity_is_the_plain_ranking() -> None:
    rows = _spread_rows("abc", ((20, 3.0, 0.8), (10, 2.0, 0.2), (15, 1.0, 0.5)))
    rows[3]["score"], rows[4]["score"] = 5.0, 4.0  # case b's slices 20 and 10 are the best over the dataset
    per_case = select_spread(rows, top_k=2, diversity=0.0)
    assert [(r["case"], r["index"], r["rank"]) for r in per_case] == [
        ("a", 20, 1), ("a", 10, 2), ("b", 20, 1), ("b", 10, 2), ("c", 20, 1), ("c", 10, 2)]  # fmt: skip
    budget = select_spread(rows, top_k=2, budget=3, diversity=0.0)
    # the 3 best of the 2 kept per case over the dataset (a tie at 3.0 goes to the earlier case), in case order
    assert [(r["case"], r["index"]) for r in budget] == [("a", 20), ("b", 20), ("b", 10)]
    assert [r["rank"] for r in budget] == [1, 1, 2]  # ranks renumbered within each case
    assert rows[0].get("rank") is None  # the input rows are untouched


def test_select_spread_alternates_between_equally_uncertain_places() -> None:
    """Every case slightly more unsure at one end: plain ranking labels that end in all of them."""
    rows = _spread_rows("abcdefgh", ((25, 1.1, 0.8), (9, 1.0, 0.2)))
    plain = select_spread(rows, top_k=1, diversity=0.0)
    assert {r["index"] for r in plain} == {25}
    spread = select_spread(rows, top_k=1, diversity=0.1)
    ends = [r["index"] for r in spread]
    assert len(ends) == 8 and sorted(set(ends)) == [9, 25]
    assert 3 <= ends.count(9) <= 5  # about half at each end
    # a clearly more uncertain place still wins everywhere
    sure = select_spread(_spread_rows("abcdefgh", ((25, 3.0, 0.8), (9, 1.0, 0.2))), top_k=1, diversity=0.1)
    assert {r["index"] for r in sure} == {25}


def test_select_spread_counts_the_slices_labelled_already() -> None:
    rows = _spread_rows("ab", ((25, 1.1, 0.8), (9, 1.0, 0.2)))
    prior = {0: [0.8] * 6}  # six cases already labelled near position 0.8
    assert {r["index"] for r in select_spread(rows, prior, top_k=1, diversity=0.1)} == {9}
    assert [r["index"] for r in select_spread(rows[:2], {1: [0.8] * 6}, top_k=1, diversity=0.1)] == [25]  # other axis
    assert select_spread([], prior) == []


def test_select_spread_limits_and_errors() -> None:
    rows = _spread_rows("abcd", ((25, 1.1, 0.8), (9, 1.0, 0.2), (17, 0.5, 0.5)))
    picks = select_spread(rows, top_k=2, budget=5, diversity=0.1)
    assert len(picks) == 5
    assert max(sum(r["case"] == c for r in picks) for c in "abcd") <= 2
    assert len(select_spread(rows, top_k=3)) == 12 and len(select_spread(rows, top_k=9)) == 12  # runs out
    for bad in ({"diversity": 1.0}, {"diversity": -0.1}, {"width": 0.0}, {"top_k": 0}, {"budget": 0}):
        with pytest.raises(VolsegError):
            select_spread(rows, **bad)


def test_relative_positions_line_up_the_object() -> None:
    fg = np.zeros((20, 3, 3), bool)
    fg[5:16, 1, 1] = True
    assert relative_positions(fg, 0, [5, 10, 15]).tolist() == [0.0, 0.5, 1.0]
    assert relative_positions(fg, 1, [1]).tolist() == [0.0]  # a one-slice object: no division by zero
    assert relative_positions(np.zeros((5, 2, 2), bool), 0, [0, 4]).tolist() == [0.0, 1.0]
