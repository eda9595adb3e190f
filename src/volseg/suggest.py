"""`volseg suggest-slices`: which unlabelled slices should an annotator label next?

For every case of a sparsely labelled dataset (nnU-Net `ignore` label) the model(s) predict the
volume several times: once as it is and once mirrored along each axis (flipped in, flipped back
out), for each model of an ensemble. The per-voxel uncertainty of these predictions is summed over
each unlabelled slice, and the highest-scoring slices, kept apart from one another, are the ones
to draw next. `apply_suggestions` labels them from dense labels, to simulate an annotator.

Choices, and why:

- Uncertainty is the entropy of the mean prediction ("total" uncertainty), divided by log(C) so
  that 1 means "all classes equally likely". It is large both where the variants disagree and
  where they agree on being unsure (object borders), and with one model and four mirror variants
  it is far less noisy than the disagreement alone. `measure="mutual_information"` (entropy of the
  mean minus mean entropy, BALD) keeps only the disagreement, for ensembles of fold models.
- A slice's score is the uncertainty summed over its unlabelled voxels, not the mean: a sum grows
  with how much uncertain structure the slice cuts through, so slices through the object beat
  slices of empty background, which is what an annotator's time is best spent on.
- A slice counts as labelled when at least half of its own labelled voxels are there — voxels
  labelled in every slice of that axis (the lines where orthogonal labelled planes cross it) do
  not count, otherwise one labelled plane per axis would mark every slice of the other axes as
  labelled.
- With a dataset-wide `budget`, the N best slices over all cases are kept instead of k per case:
  a case the model is already sure of gets none, a case it is unsure of several (up to `top_k`),
  and a round can add fewer slices than one per case.
- Picks are spread over the anatomy the cases share (`select_spread`): every case's uncertainty
  is often highest at the same place (one end of an organ, say) while the model is just as wrong
  elsewhere; labelling that place in every case teaches one model the same thing many times.
  Each labelled slice lowers, by `diversity` (10%), the worth of slices at the same relative
  position of the object in every case, so rounds cover the uncertain parts in turn. On MSD
  hippocampus (16 training cases, one labelled slice each) plain ranking put 13 of 16 second
  slices on the same side of the middle; see docs/benchmarks.md for what the spread changes.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from volseg.atomic import atomic_open, folder_written_atomically, write_text_atomic
from volseg.layout import Case, DatasetInfo, read_case, read_dataset
from volseg.volumes import Volume, label_dtype, read_label, write_volume
from volseg.config import DataConfig
from volseg.errors import VolsegError
from volseg.sparsify import DENSE_LABELS

MEASURES = ("entropy", "mutual_information")
SUGGESTIONS_CSV = "suggestions.csv"
CSV_COLUMNS = ("case", "rank", "axis", "index", "score", "position", "labelled_fraction_before")
OWN_LABELLED_FRACTION = 0.5  # share of a slice's own voxels that makes it "labelled"
DIVERSITY = 0.1  # how much one labelled slice lowers the worth of the same anatomy in every case
DIVERSITY_WIDTH = 0.1  # "the same anatomy": within about this share of the object's extent


# --------------------------------------------------------------------------------------------------
# pure array functions


def entropy(probs: np.ndarray, axis: int = 0) -> np.ndarray:
    """Shannon entropy in nats over the class axis (0 log 0 = 0).

    >>> entropy(np.array([[1.0, 0.5], [0.0, 0.5]])).astype(float).round(4).tolist()
    [0.0, 0.6931]
    """
    p = np.asarray(probs, dtype=np.float32)
    return np.maximum(-(p * np.log(np.clip(p, 1e-12, 1.0))).sum(axis=axis), 0.0)  # no -0.0


def _uncertainty(mean_probs: np.ndarray, mean_entropy: np.ndarray, measure: str) -> np.ndarray:
    """Normalised uncertainty from the mean prediction and the mean of the predictions' entropies."""
    if measure not in MEASURES:
        raise VolsegError(None, f"unknown uncertainty measure {measure!r}", f"use one of {', '.join(MEASURES)}")
    n_classes = mean_probs.shape[0]
    total = entropy(mean_probs)
    value = total if measure == "entropy" else np.maximum(total - mean_entropy, 0.0)
    return (value / np.log(max(n_classes, 2))).astype(np.float32)


def slice_uncertainty(probs_list: Sequence[np.ndarray] | np.ndarray, measure: str = "entropy") -> np.ndarray:
    """Per-voxel uncertainty (I, J, K) in [0, 1] of several (C, I, J, K) predictions of one volume.

    The predictions are mirror variants and/or models of an ensemble. "entropy": entropy of their
    mean (total uncertainty, highest where the mean is 0.5 between two classes);
    "mutual_information": that minus their mean entropy (disagreement only). Both are divided by
    log(C).

    >>> unsure, sure = np.array([[0.5], [0.5]]), np.array([[1.0], [0.0]])
    >>> float(slice_uncertainty([unsure, unsure])[0]), float(slice_uncertainty([sure, sure])[0])
    (1.0, 0.0)
    >>> float(slice_uncertainty([sure, 1 - sure], "mutual_information")[0])  # confident, but disagree
    1.0
    >>> float(slice_uncertainty([unsure, unsure], "mutual_information")[0])  # agree on being unsure
    0.0
    """
    probs = [np.asarray(p, dtype=np.float32) for p in probs_list]
    if not probs:
        raise VolsegError(None, "no predictions to measure the uncertainty of")
    if any(p.shape != probs[0].shape for p in probs):
        raise VolsegError(None, f"predictions differ in shape: {sorted({p.shape for p in probs})}")
    mean = np.mean(probs, axis=0)
    mean_entropy = np.mean([entropy(p) for p in probs], axis=0)
    return _uncertainty(mean, mean_entropy, measure)


def _check_axes(axes: Sequence[int]) -> tuple[int, ...]:
    axes = tuple(sorted(set(int(a) for a in axes)))
    if not axes or any(a not in (0, 1, 2) for a in axes):
        raise VolsegError(None, f"axes must be a non-empty subset of 0, 1, 2; got {axes}")
    return axes


def labelled_slices(labelled_mask: np.ndarray, axis: int) -> np.ndarray:
    """Boolean per slice along `axis`: has an annotator labelled this slice?

    Voxels labelled in every slice of the axis (where labelled planes of the other axes cross it)
    are nobody's own; a slice is labelled when at least half of the remaining voxels are labelled,
    or when it is labelled entirely.

    >>> m = np.zeros((4, 5, 6), bool)
    >>> m[2], m[:, 1], m[:, :, 3] = True, True, True  # one labelled plane per axis
    >>> [np.flatnonzero(labelled_slices(m, a)).tolist() for a in range(3)]
    [[2], [1], [3]]
    """
    mask = np.asarray(labelled_mask, dtype=bool)
    other = tuple(a for a in range(3) if a != axis)
    crossing = mask.all(axis=axis, keepdims=True)
    own = (mask & ~crossing).sum(axis=other)
    free = int((~crossing).sum())  # the same count in every slice
    whole = mask.all(axis=other)
    return whole | (own >= OWN_LABELLED_FRACTION * max(free, 1)) & (own > 0)


def rank_slices(
    uncertainty: np.ndarray,
    labelled_mask: np.ndarray | None = None,
    axes: Sequence[int] = (0, 1, 2),
    top_k: int = 3,
    min_gap: int = 2,
) -> list[tuple[int, int, float]]:
    """The `top_k` best slices to label next, as (axis, index, score), best first.

    A slice's score is the uncertainty summed over its unlabelled voxels; labelled slices are
    never suggested, and suggestions on the same axis are at least `min_gap` slices apart (so the
    top five are not five neighbours). Ties go to the lower axis, then the lower index.

    >>> u = np.zeros((6, 4, 3)); u[1] = 1.0; u[2] = 0.9; u[4] = 0.5
    >>> rank_slices(u, axes=(0,), top_k=3, min_gap=2)
    [(0, 1, 12.0), (0, 4, 6.0)]
    >>> labelled = np.zeros(u.shape, bool); labelled[1] = True
    >>> [(a, i) for a, i, _ in rank_slices(u, labelled, axes=(0,), top_k=2, min_gap=1)]
    [(0, 2), (0, 4)]
    """
    unc = np.asarray(uncertainty, dtype=np.float64)
    if unc.ndim != 3:
        raise VolsegError(None, f"uncertainty must be (I, J, K), got shape {unc.shape}")
    labelled = np.zeros(unc.shape, bool) if labelled_mask is None else np.asarray(labelled_mask, dtype=bool)
    if labelled.shape != unc.shape:
        raise VolsegError(None, f"labelled mask shape {labelled.shape} differs from uncertainty shape {unc.shape}")
    if top_k < 1:
        raise VolsegError(None, f"top_k must be at least 1, got {top_k}")
    if min_gap < 0:
        raise VolsegError(None, f"min_gap must be 0 or more, got {min_gap}")
    unc = np.where(labelled, 0.0, unc)  # a labelled voxel teaches the model nothing new
    cand_axis, cand_index, cand_score = [], [], []
    for axis in _check_axes(axes):
        other = tuple(a for a in range(3) if a != axis)
        scores = unc.sum(axis=other)
        free = np.flatnonzero(~labelled_slices(labelled, axis))
        cand_axis += [axis] * len(free)
        cand_index += free.tolist()
        cand_score += scores[free].tolist()
    order = np.lexsort((cand_index, cand_axis, -np.asarray(cand_score)))
    chosen: list[tuple[int, int, float]] = []
    for c in order:
        axis, index = cand_axis[c], cand_index[c]
        if any(a == axis and abs(i - index) < min_gap for a, i, _ in chosen):
            continue
        chosen.append((axis, index, float(cand_score[c])))
        if len(chosen) == top_k:
            break
    return chosen


def mirror_predictions(
    predict: Callable[[np.ndarray], np.ndarray], image: np.ndarray, axes: Sequence[int] = (0, 1, 2)
) -> Iterator[np.ndarray]:
    """Test-time mirroring: predict a (C, I, J, K) image as it is, then flipped along each spatial axis.

    Each flipped prediction is flipped back, so every yielded (C, I, J, K) array is on the
    image's grid. A generator, so a caller can average without holding every variant at once.

    >>> ramp = np.arange(3.0).reshape(1, 3, 1, 1)
    >>> [p.ravel().tolist() for p in mirror_predictions(lambda x: 2 * x, ramp, axes=(0,))]
    [[0.0, 2.0, 4.0], [0.0, 2.0, 4.0]]
    """
    yield predict(image)
    for axis in _check_axes(axes):
        flipped = np.ascontiguousarray(np.flip(image, axis=1 + axis))
        yield np.ascontiguousarray(np.flip(predict(flipped), axis=1 + axis))


def slices_mask(shape: tuple[int, int, int], slices: Iterable[tuple[int, int]]) -> np.ndarray:
    """Boolean (I, J, K) mask of whole slices given as (axis, index).

    >>> int(slices_mask((4, 5, 6), [(0, 1), (2, 5)]).sum())  # 30 + 20 voxels, 5 of them shared
    45
    """
    mask = np.zeros(shape, dtype=bool)
    for axis, index in slices:
        if axis not in (0, 1, 2) or not 0 <= index < shape[axis]:
            raise VolsegError(None, f"slice {index} on axis {axis} is outside a volume of shape {tuple(shape)}")
        where: list[Any] = [slice(None)] * 3
        where[axis] = index
        mask[tuple(where)] = True
    return mask


def next_even_slices(labelled_mask: np.ndarray, n: int, axes: Sequence[int] = (0, 1, 2)) -> list[tuple[int, int]]:
    """`n` more slices placed evenly among the labelled ones: the baseline active selection must beat.

    Each pick goes to the axis with the fewest labelled slices, at the free slice farthest from
    that axis's labelled slices, the borders counting half (as `sparsify --strategy even` places
    slices at bin centres): from the middle slice it adds exactly the even positions of three
    slices, then fills the largest gaps.

    >>> m = np.zeros((36, 36, 36), bool); m[18] = True
    >>> next_even_slices(m, 4, axes=(0,))  # slice_indices(36, 3, "even") is [6, 18, 30]
    [(0, 6), (0, 30), (0, 12), (0, 24)]
    """
    mask = np.asarray(labelled_mask, dtype=bool)
    taken = {a: set(np.flatnonzero(labelled_slices(mask, a)).tolist()) for a in _check_axes(axes)}
    chosen: list[tuple[int, int]] = []
    while len(chosen) < n:
        open_axes = [a for a in taken if len(taken[a]) < mask.shape[a]]
        if not open_axes:
            break
        axis = min(open_axes, key=lambda a: (len(taken[a]), a))
        size = mask.shape[axis]
        index = np.arange(size)
        distance = np.minimum(2 * index, 2 * (size - index)).astype(float)  # borders as slice_indices places them
        for t in taken[axis]:
            distance = np.minimum(distance, np.abs(index - t))
        distance[list(taken[axis])] = -1
        pick = int(np.argmax(distance))  # first maximum: the lower index on ties
        taken[axis].add(pick)
        chosen.append((axis, pick))
    return chosen


def _free_slices(labelled_mask: np.ndarray, axes: Sequence[int]) -> list[tuple[int, int]]:
    """(axis, index) of every slice without a labelled voxel, in axis then index order."""
    mask = np.asarray(labelled_mask, dtype=bool)
    return [(a, int(i)) for a in axes for i in np.flatnonzero(~labelled_slices(mask, a))]


def random_unlabelled_slices(
    labelled_mask: np.ndarray, n: int, rng: np.random.Generator, axes: Sequence[int] = (0, 1, 2)
) -> list[tuple[int, int]]:
    """`n` unlabelled slices drawn uniformly from all axes' unlabelled slices (a second baseline).

    >>> m = np.zeros((3, 4, 5), bool); m[:, :, 2] = True
    >>> picks = random_unlabelled_slices(m, 4, np.random.default_rng(0), axes=(2,))
    >>> sorted(picks)
    [(2, 0), (2, 1), (2, 3), (2, 4)]
    """
    free = _free_slices(labelled_mask, _check_axes(axes))
    picks = rng.choice(len(free), size=min(n, len(free)), replace=False)
    return [free[int(p)] for p in picks]


def select_spread(
    candidates: Sequence[Mapping[str, Any]],
    prior: Mapping[int, Sequence[float]] | None = None,
    top_k: int = 3,
    budget: int | None = None,
    diversity: float = DIVERSITY,
    width: float = DIVERSITY_WIDTH,
) -> list[dict[str, Any]]:
    """Pick slices over all cases: high uncertainty, spread over the anatomy the cases share.

    One model learns from every case, so a slice through the same anatomy in a second case
    teaches it less than the first did. Each candidate row {case, axis, index, score, position}
    carries its `position` along its axis relative to the case's predicted object (0 and 1 are
    the object's first and last slice), which lines up the cases' anatomy. Every labelled slice
    (the `prior` positions per axis, all cases together) and every pick multiplies the score of
    the candidates at nearby positions on its axis by 1 - diversity * exp(-d^2 / (2 width^2)):
    the greedy pick is always the highest remaining score, so picks alternate between the
    uncertain parts of the anatomy instead of piling onto the one that is slightly more
    uncertain in every case. `diversity` 0 ranks each case on its own scores alone.

    Each case gets at most `top_k` picks, over all cases at most `budget` (None: `top_k` per
    case). Rows come back grouped by case in input order, `rank` 1.. in pick order; ties go to
    the earlier row.

    >>> rows = [{"case": c, "axis": 0, "index": i, "score": s, "position": p}
    ...         for c in "abcd" for i, s, p in ((20, 1.2, 0.75), (10, 1.0, 0.25))]
    >>> sorted({r["index"] for r in select_spread(rows, top_k=1, diversity=0.0)})  # every case: its best
    [20]
    >>> [(r["case"], r["index"]) for r in select_spread(rows, top_k=1, diversity=0.3)]
    [('a', 20), ('b', 10), ('c', 20), ('d', 10)]
    """
    if not 0.0 <= diversity < 1.0:
        raise VolsegError(None, f"diversity must be in [0, 1), got {diversity}")
    if width <= 0:
        raise VolsegError(None, f"the diversity width must be positive, got {width}")
    if top_k < 1:
        raise VolsegError(None, f"top_k must be at least 1, got {top_k}")
    if budget is not None and budget < 1:
        raise VolsegError(None, f"the budget must be at least 1 slice, got {budget}")
    rows = [dict(r) for r in candidates]
    if not rows:
        return []
    score = np.array([float(r["score"]) for r in rows])
    axis = np.array([int(r["axis"]) for r in rows])
    position = np.array([float(r["position"]) for r in rows])
    log_keep = np.zeros(len(rows))  # log of the product of the discounts so far

    def discount(a: int, at: float) -> None:
        if diversity > 0.0:
            near = axis == a
            log_keep[near] += np.log1p(-diversity * np.exp(-0.5 * ((position[near] - at) / width) ** 2))

    for a, positions in (prior or {}).items():
        for at in positions:
            discount(int(a), float(at))
    case_order = {case: i for i, case in enumerate(dict.fromkeys(r["case"] for r in rows))}
    case_of = np.array([case_order[r["case"]] for r in rows])
    limit = len(case_order) * top_k if budget is None else budget
    log_score = np.log(np.maximum(score, 1e-30))  # in logs: many discounts never underflow to a tie at 0
    open_ = np.ones(len(rows), bool)
    taken = np.zeros(len(case_order), int)
    order: list[int] = []
    rank: dict[int, int] = {}  # a pick's place among its case's picks
    while len(order) < limit and open_.any():
        c = int(np.argmax(np.where(open_, log_score + log_keep, -np.inf)))  # first maximum: earlier row on ties
        order.append(c)
        open_[c] = False
        taken[case_of[c]] += 1
        rank[c] = int(taken[case_of[c]])
        if taken[case_of[c]] >= top_k:
            open_ &= case_of != case_of[c]
        discount(int(axis[c]), float(position[c]))
    chosen = sorted(order, key=lambda c: (case_of[c], rank[c]))
    return [{**rows[c], "rank": rank[c]} for c in chosen]


def relative_positions(foreground: np.ndarray, axis: int, indices: Sequence[int] | np.ndarray) -> np.ndarray:
    """Slice `indices` along `axis` as positions relative to the object: 0 at its first slice, 1 at its last.

    Lines up the anatomy of cases of different sizes for `select_spread`. Without any object
    voxel the whole axis is the object.

    >>> fg = np.zeros((11, 2, 2), bool); fg[3:8] = True
    >>> relative_positions(fg, 0, [3, 5, 7, 10]).tolist()
    [0.0, 0.5, 1.0, 1.75]
    """
    fg = np.asarray(foreground, dtype=bool)
    other = tuple(a for a in range(3) if a != axis)
    present = np.flatnonzero(fg.any(axis=other))
    lo, hi = (int(present[0]), int(present[-1])) if present.size else (0, fg.shape[axis] - 1)
    return (np.asarray(indices, dtype=float) - lo) / max(hi - lo, 1)


def even_over_cases(
    masks: Mapping[str, np.ndarray], budget: int, rng: np.random.Generator, axes: Sequence[int] = (0, 1, 2)
) -> list[dict[str, Any]]:
    """The evenly spread baseline for a dataset-wide budget: one `next_even_slices` slice per case, round robin.

    The cases with the fewest labelled slices go first, ties in an order drawn from `rng` (the
    same seed gives the same order every round, so repeated rounds walk through all cases before
    any case gets a second slice). Rows {case, axis, index}.

    >>> m = np.zeros((9, 2, 2), bool); m[4] = True
    >>> rows = even_over_cases({"a": m, "b": m, "c": m}, 2, np.random.default_rng(0), axes=(0,))
    >>> len(rows), len({r["case"] for r in rows}), sorted({r["index"] for r in rows})
    (2, 2, [7])
    """
    if budget < 1:
        raise VolsegError(None, f"the budget must be at least 1 slice, got {budget}")
    axes = _check_axes(axes)
    names = sorted(masks)
    tiebreak = rng.permutation(len(names))
    counts = {n: sum(int(labelled_slices(masks[n], a).sum()) for a in axes) for n in names}
    current = dict(masks)  # a case's mask is copied when it gets its first slice
    rows: list[dict[str, Any]] = []
    full: set[str] = set()  # cases with every slice labelled
    while len(rows) < budget and len(full) < len(names):
        i = min((j for j, n in enumerate(names) if n not in full), key=lambda j: (counts[names[j]], tiebreak[j]))
        name = names[i]
        picks = next_even_slices(current[name], 1, axes)
        if not picks:
            full.add(name)
            continue
        axis, index = picks[0]
        current[name] = np.asarray(current[name], dtype=bool) | slices_mask(current[name].shape, [(axis, index)])
        counts[name] += 1
        rows.append({"case": name, "axis": axis, "index": index})
    return rows


def random_over_cases(
    masks: Mapping[str, np.ndarray], budget: int, rng: np.random.Generator, axes: Sequence[int] = (0, 1, 2)
) -> list[dict[str, Any]]:
    """The random baseline for a dataset-wide budget: `budget` slices drawn uniformly from the
    unlabelled slices of all cases together (so larger cases get more). Rows {case, axis, index}
    in case, axis and index order.

    >>> m = np.zeros((4, 2, 2), bool); m[1] = True
    >>> rows = random_over_cases({"a": m, "b": m}, 10, np.random.default_rng(0), axes=(0,))
    >>> [(r["case"], r["index"]) for r in rows]
    [('a', 0), ('a', 2), ('a', 3), ('b', 0), ('b', 2), ('b', 3)]
    """
    if budget < 1:
        raise VolsegError(None, f"the budget must be at least 1 slice, got {budget}")
    axes = _check_axes(axes)
    free = [(name, a, i) for name in sorted(masks) for a, i in _free_slices(masks[name], axes)]
    picks = sorted(int(p) for p in rng.choice(len(free), size=min(budget, len(free)), replace=False))
    return [{"case": free[p][0], "axis": free[p][1], "index": free[p][2]} for p in picks]


# --------------------------------------------------------------------------------------------------
# datasets and models


def _sparse_dataset(dataset: Path) -> tuple[DatasetInfo, list[Case], int]:
    """Cases of a sparsely labelled dataset and its ignore value, or a one-line error why not."""
    info, cases = read_dataset(dataset)
    if info.ignore_label is None:
        raise VolsegError(
            dataset / "dataset.json",
            "declares no 'ignore' label, so every voxel is labelled and there is nothing unlabelled to suggest",
            "sparsify it first (volseg sparsify) or add an 'ignore' label for the unlabelled voxels",
        )
    missing = [c.case_id for c in cases if c.label is None]
    if missing:
        raise VolsegError(dataset, f"{len(missing)} cases have no label file (first: {missing[0]})")
    return info, cases, info.ignore_label


def _case_uncertainty(
    models: Sequence[Any], cfgs: Sequence[Any], image: Volume, mirror: bool, measure: str, device: Any
) -> tuple[np.ndarray, np.ndarray]:
    """(mean class probabilities (C, I, J, K), uncertainty (I, J, K)) of one image over models x mirrors."""
    from volseg.inference import probabilities_on_input_grid

    total = total_entropy = None
    n = 0
    for model, cfg in zip(models, cfgs):

        def predict(array: np.ndarray, model: Any = model, cfg: Any = cfg) -> np.ndarray:
            return probabilities_on_input_grid(model, cfg, Volume(array, image.affine), device)

        variants = mirror_predictions(predict, image.array) if mirror else iter([predict(image.array)])
        for probs in variants:
            h = entropy(probs)
            total = probs.astype(np.float32) if total is None else total + probs
            total_entropy = h if total_entropy is None else total_entropy + h
            n += 1
    mean = total / n
    return mean, _uncertainty(mean, total_entropy / n, measure)


def suggest_slices(
    model_paths: str | Path | Sequence[str | Path],
    dataset: str | Path,
    top_k: int = 3,
    axes: Sequence[int] = (0, 1, 2),
    mirror: bool = True,
    device: str = "cpu",
    min_gap: int = 2,
    measure: str = "entropy",
    out: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    budget: int | None = None,
    diversity: float = DIVERSITY,
) -> list[dict[str, Any]]:
    """Rank every case's unlabelled slices by the model's uncertainty; rows best first per case.

    Rows: {case, rank (1 = best), axis, index, score, position, labelled_fraction_before}
    (position: along the axis, relative to the predicted object; the fraction: of the case's
    voxels labelled now). With `out`, writes `out/suggestions.csv` and one preview
    `out/<case>.png` per case (each suggested slice with the prediction's contours, beside its
    uncertainty map). Several model paths are an ensemble; `mirror` adds the mirrored variants.

    Each case offers its 3 * top_k + 3 best slices (at least `min_gap` apart) as candidates, and
    `select_spread` picks among all cases' candidates at once: `top_k` per case, or with
    `budget` the `budget` best over the dataset (at most `top_k` per case; only cases that got
    one have a preview), with `diversity` > 0 spreading the picks over the anatomy the cases
    share. Memory stays bounded: the candidates' preview planes wait in a scratch folder under
    `out` until the picks are known.
    """
    from volseg.inference import load_ensemble, resolve_device

    dataset = Path(dataset)
    axes = _check_suggest_options(axes, measure, top_k, min_gap, budget, diversity)
    info, cases, ignore = _sparse_dataset(dataset)
    csv_path = None if out is None else Path(out) / SUGGESTIONS_CSV
    if csv_path is not None and csv_path.exists() and not overwrite:
        raise VolsegError(csv_path, "output already exists", "pass --overwrite to replace it")
    dev = resolve_device(device)
    models, cfgs = load_ensemble(model_paths, dev)
    data = cfgs[0].data
    _check_model_fits(dataset, info, data, ignore)
    iterator: Iterable[Case] = cases
    if progress:
        from tqdm import tqdm

        iterator = tqdm(cases, desc="suggest", unit="case", disable=None)
    n_candidates = 3 * top_k + 3  # per case: enough for the spread to swap a pick for another peak
    candidates: list[dict[str, Any]] = []
    prior: dict[int, list[float]] = {a: [] for a in axes}  # where the cases are labelled already
    with tempfile.TemporaryDirectory(prefix=".suggest-", dir=_made(out)) as scratch:
        for number, case in enumerate(iterator):
            image, labelled = _read_sparse_case(case, info, ignore)
            mean, uncertainty = _case_uncertainty(models, cfgs, image, mirror, measure, dev)
            best = mean.argmax(0)
            foreground = best != 0
            ranked = rank_slices(uncertainty, labelled, axes, n_candidates, min_gap)
            for a in axes:
                prior[a] += relative_positions(foreground, a, np.flatnonzero(labelled_slices(labelled, a))).tolist()
            case_rows = _candidate_rows(case.case_id, number, ranked, foreground, float(labelled.mean()))
            candidates += case_rows
            if out is not None and case_rows:  # the preview planes wait on disk until the picks are known
                seg = np.asarray(data.class_values)[best]
                panels = _panels(image.array[0], seg, uncertainty, labelled, case_rows, image.spacing)
                _save_panels(Path(scratch) / f"{number}.npz", panels)
        rows = select_spread(candidates, prior, top_k, budget, diversity)
        if out is not None:
            _write_previews(rows, Path(scratch), Path(out))
    rows = [{**{k: v for k, v in r.items() if k != "_file"}, "position": round(r["position"], 4)} for r in rows]
    if csv_path is not None:
        write_suggestions_csv(csv_path, rows)
    return rows


def _check_suggest_options(axes: Sequence[int], measure: str, top_k: int, min_gap: int, budget: int | None,
                           diversity: float) -> tuple[int, ...]:
    """`suggest_slices`' options checked before any case is read; the axes as a tuple."""
    axes = _check_axes(axes)
    if measure not in MEASURES:
        raise VolsegError(None, f"unknown uncertainty measure {measure!r}", f"use one of {', '.join(MEASURES)}")
    if top_k < 1:
        raise VolsegError(None, f"--top-k must be at least 1, got {top_k}")
    if min_gap < 0:
        raise VolsegError(None, f"--min-gap must be 0 or more, got {min_gap}")
    if budget is not None and budget < 1:
        raise VolsegError(None, f"--budget must be at least 1 slice, got {budget}")
    if not 0.0 <= diversity < 1.0:
        raise VolsegError(None, f"--diversity must be at least 0 and below 1, got {diversity}")
    return axes


def _check_model_fits(dataset: Path, info: DatasetInfo, data: DataConfig, ignore: int) -> None:
    """Refuse a model whose channels or classes are not the dataset's (its ignore value aside)."""
    where = dataset / "dataset.json"
    if data.channel_names and len(data.channel_names) != len(info.channel_names):
        raise VolsegError(where, f"declares {len(info.channel_names)} channels, the model expects {len(data.channel_names)}")
    declared = tuple(sorted(v for _, v in info.labels if v != ignore))
    if data.class_values != declared:
        raise VolsegError(where, f"declares labels {list(declared)}, the model predicts {list(data.class_values)}",
                          "use a model trained on this task")


def _read_sparse_case(case: Case, info: DatasetInfo, ignore: int) -> tuple[Volume, np.ndarray]:
    """A case's image and its mask of labelled voxels (label not `ignore`); NaN or Inf voxels refused."""
    image, label = read_case(case, declared=[v for _, v in info.labels])
    if np.issubdtype(image.array.dtype, np.floating) and not np.isfinite(image.array).all():
        raise VolsegError(case.images[0], "has NaN or Inf voxels; cannot predict on them")
    return image, label.array[0] != ignore


def _candidate_rows(case_id: str, number: int, ranked: Iterable[tuple[int, int, float]], foreground: np.ndarray,
                    fraction: float) -> list[dict[str, Any]]:
    """A case's ranked slices as suggestion rows; `_file` (the case's number) finds its preview planes."""
    return [{"case": case_id, "axis": axis, "index": index, "score": round(score, 4),
             "labelled_fraction_before": round(fraction, 6),
             "position": float(relative_positions(foreground, axis, [index])[0]), "_file": number}
            for axis, index, score in ranked]  # fmt: skip


def _write_previews(rows: Sequence[Mapping[str, Any]], scratch: Path, out: Path) -> None:
    """`out/<case>.png` for every case with a pick, from the planes its candidates left in `scratch`."""
    for name in dict.fromkeys(r["case"] for r in rows):
        mine = [r for r in rows if r["case"] == name]
        panels = _load_panels(scratch / f"{mine[0]['_file']}.npz", name)
        _plot_panels([panels[(name, r["axis"], r["index"])] for r in mine], mine, out / f"{name}.png")


def _made(folder: str | Path | None) -> str | None:
    """`folder`, created if need be (None stays None: the system's temporary folder)."""
    if folder is None:
        return None
    Path(folder).mkdir(parents=True, exist_ok=True)
    return str(folder)


_PANEL_ARRAYS = ("image", "seg", "uncertainty", "labelled")


def _save_panels(path: Path, panels: Mapping[tuple[str, int, int], Mapping[str, Any]]) -> None:
    """`_panels` planes as one .npz (plain arrays, no pickle), keyed by axis and index."""
    arrays: dict[str, np.ndarray] = {}
    for (_, axis, index), panel in panels.items():
        key = f"{axis}_{index}"
        for name in _PANEL_ARRAYS:
            arrays[f"{key}_{name}"] = np.asarray(panel[name])
        arrays[f"{key}_window"] = np.asarray(panel["window"], dtype=np.float64)
        arrays[f"{key}_values"] = np.asarray(panel["values"], dtype=np.int64)
        arrays[f"{key}_aspect"] = np.asarray(panel["aspect"], dtype=np.float64)
        arrays[f"{key}_axes"] = np.asarray(panel["axes"], dtype=np.int64)
    np.savez(path, **arrays)


def _load_panels(path: Path, case: str) -> dict[tuple[str, int, int], dict[str, Any]]:
    """The planes `_save_panels` wrote, keyed by (case, axis, index) again."""
    out: dict[tuple[str, int, int], dict[str, Any]] = {}
    with np.load(path, allow_pickle=False) as npz:
        keys = {k.rsplit("_", 1)[0] for k in npz.files if k.endswith("_axes")}
        for key in keys:
            axis, index = (int(v) for v in key.split("_"))
            panel: dict[str, Any] = {name: npz[f"{key}_{name}"] for name in _PANEL_ARRAYS}
            panel["window"] = tuple(float(v) for v in npz[f"{key}_window"])
            panel["values"] = tuple(int(v) for v in npz[f"{key}_values"])
            panel["aspect"] = float(npz[f"{key}_aspect"])
            panel["axes"] = tuple(int(v) for v in npz[f"{key}_axes"])
            out[(case, axis, index)] = panel
    return out


def write_suggestions_csv(path: str | Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """The suggestion rows as CSV (one header line, `CSV_COLUMNS`), written atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(CSV_COLUMNS), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())


def read_suggestions_csv(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a `suggestions.csv` with axis, index and rank as integers."""
    path = Path(path)
    if not path.is_file():
        raise VolsegError(path, "file not found")
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = {"case", "axis", "index"} - set(reader.fieldnames or ())
        if missing:
            raise VolsegError(path, f"lacks the column(s) {sorted(missing)}")
        rows = list(reader)
    try:
        return [{**r, "axis": int(r["axis"]), "index": int(r["index"]),
                 **({"rank": int(r["rank"])} if r.get("rank") else {})} for r in rows]  # fmt: skip
    except ValueError:
        raise VolsegError(path, "axis and index must be whole numbers") from None


def _panels(
    image: np.ndarray,
    seg: np.ndarray,
    uncertainty: np.ndarray,
    labelled: np.ndarray,
    rows: Sequence[Mapping[str, Any]],
    spacing: Sequence[float],
) -> dict[tuple[str, int, int], dict[str, Any]]:
    """The 2D planes a preview of each row needs, keyed by (case, axis, index).

    Small enough to keep for many candidates while the rest of the volume is dropped; the grey
    window and the class list come from the whole volume, so every plane of a case looks alike.
    """
    image = np.asarray(image, dtype=np.float32)
    finite = image[np.isfinite(image)]
    window = tuple(np.percentile(finite, [0.5, 99.5])) if finite.size else (0.0, 1.0)
    values = tuple(int(v) for v in np.unique(seg) if v != 0)
    out: dict[tuple[str, int, int], dict[str, Any]] = {}
    for row in rows:
        axis, index = int(row["axis"]), int(row["index"])
        rows_axis, cols_axis = [a for a in range(3) if a != axis]
        where: list[Any] = [slice(None)] * 3
        where[axis] = index
        cut = tuple(where)
        out[(str(row["case"]), axis, index)] = {
            "image": image[cut].copy(), "seg": np.asarray(seg)[cut].copy(), "uncertainty": uncertainty[cut].copy(),
            "labelled": np.asarray(labelled, dtype=bool)[cut].copy(), "window": window, "values": values,
            "aspect": spacing[rows_axis] / spacing[cols_axis], "axes": (rows_axis, cols_axis),
        }  # fmt: skip
    return out


def _plot_panels(panels: Sequence[Mapping[str, Any]], rows: Sequence[Mapping[str, Any]], out_png: str | Path) -> None:
    """Draw `_panels` planes, one figure row per suggestion row, and write the PNG atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.0, 3.6 * len(rows)), layout="constrained")
    FigureCanvasAgg(fig)
    grid = np.atleast_2d(np.asarray(fig.subplots(len(rows), 2), dtype=object))
    for (left, right), row, panel in zip(grid, rows, panels):
        low, high = panel["window"]
        aspect = panel["aspect"]
        rows_axis, cols_axis = panel["axes"]
        left.imshow(panel["image"], cmap="gray", vmin=low, vmax=high, interpolation="nearest", aspect=aspect,
                    origin="lower")
        plane = panel["seg"]
        if min(plane.shape) >= 2:
            for i, value in enumerate(panel["values"]):
                if (plane == value).any():
                    left.contour((plane == value).astype(float), levels=[0.5], colors=[f"C{i % 10}"], linewidths=1.2)
        heat = right.imshow(panel["uncertainty"], cmap="inferno", vmin=0.0, vmax=1.0, interpolation="nearest",
                            aspect=aspect, origin="lower")
        known = panel["labelled"]
        if known.any():
            right.imshow(np.ma.masked_where(~known, known), cmap="Greys", vmin=0, vmax=1, alpha=0.6,
                         interpolation="nearest", aspect=aspect, origin="lower")
        fig.colorbar(heat, ax=right, shrink=0.8, label="uncertainty")
        left.set_title(f"{row['case']}: #{row['rank']} axis {int(row['axis'])}, slice {int(row['index'])}",
                       fontsize=9)
        right.set_title(f"score {float(row['score']):.1f} (grey: labelled)", fontsize=9)
        for ax in (left, right):
            ax.set_xlabel(f"axis {cols_axis}")
            ax.set_ylabel(f"axis {rows_axis}")
    with atomic_open(out_png, "wb") as f:
        fig.savefig(f, format="png", dpi=90)


def apply_suggestions(
    sparse_dataset: str | Path,
    rows: Iterable[Mapping[str, Any]],
    out: str | Path,
    dense_labels: str | Path | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """A copy of a sparse dataset with the suggested slices labelled from dense labels (a simulated annotator).

    `rows` need case, axis and index (e.g. `suggest_slices`' rows or `read_suggestions_csv`).
    Dense labels come from `dense_labels`, by default the `labelsTr_dense/` that `volseg sparsify`
    links in. Images and dense labels are linked like sparsify does; the copy is built in a
    temporary sibling and renamed at the end. dataset.json records the added slices. Returns the
    labelled voxel fraction (overall and per case) and the number of slices added.
    """
    sparse_dataset, out = Path(sparse_dataset), Path(out)
    info, cases, ignore = _sparse_dataset(sparse_dataset)
    dense_dir = Path(dense_labels) if dense_labels is not None else sparse_dataset / DENSE_LABELS
    if not dense_dir.is_dir():
        raise VolsegError(dense_dir, "dense label folder not found", "pass the folder of the dense labels")
    if out.exists():
        if not overwrite:
            raise VolsegError(out, "output already exists", "pass overwrite=True to replace it")
        if out.resolve() == sparse_dataset.resolve():
            raise VolsegError(out, "output is the input dataset")
    by_case: dict[str, list[tuple[int, int]]] = {}
    for row in rows:
        by_case.setdefault(str(row["case"]), []).append((int(row["axis"]), int(row["index"])))
    unknown = sorted(set(by_case) - {c.case_id for c in cases})
    if unknown:
        raise VolsegError(sparse_dataset, f"has no case {unknown[0]!r} named in the suggestions")
    labelled = total = 0
    per_case: dict[str, float] = {}
    with folder_written_atomically(out, ("imagesTr", "labelsTr", DENSE_LABELS)) as tmp:
        for case in cases:
            for path in case.images:
                os.symlink(path.resolve(), tmp / "imagesTr" / path.name)
            name = Path(str(case.label)).name
            dense_path = dense_dir / name
            if not dense_path.is_file():
                raise VolsegError(dense_path, "dense label not found")
            os.symlink(dense_path.resolve(), tmp / DENSE_LABELS / name)
            sparse = read_label(case.label)
            array = sparse.array[0]
            added = by_case.get(case.case_id, [])
            if added:
                dense = read_label(dense_path).array[0]
                if dense.shape != array.shape:
                    raise VolsegError(dense_path, f"shape {dense.shape} differs from the sparse label's {array.shape}")
                fill = slices_mask(array.shape, added) & (array == ignore) & (dense != ignore)
                array = np.where(fill, dense, array)
            keep = array != ignore
            write_volume(tmp / "labelsTr" / name, array.astype(label_dtype(0, ignore)), reference=sparse)
            per_case[case.case_id] = float(keep.mean())
            labelled += int(keep.sum())
            total += keep.size
        raw = json.loads((sparse_dataset / "dataset.json").read_text())
        meta = dict(raw.get("sparsify") or {})
        meta["labelled_fraction"] = labelled / max(total, 1)
        meta["added_slices"] = list(meta.get("added_slices", [])) + [
            {case: [list(s) for s in slices] for case, slices in sorted(by_case.items())}
        ]
        raw["sparsify"] = meta
        (tmp / "dataset.json").write_text(json.dumps(raw, indent=2))
    return {
        "labelled_fraction": labelled / max(total, 1),
        "per_case": per_case,
        "slices_added": sum(len(v) for v in by_case.values()),
    }
