"""The training loop, top to bottom: data, model, SGD + poly LR, validation per epoch, checkpoints.

`train` is the entry point: `set_up` makes a `Run` (config, cases, network, optimiser, clocks) and
`train_loop` reads as the epoch it runs: `train_epoch`, `validate_epoch`, `BestModel` choosing
model_best, `Plateau` for early stopping, `save_checkpoint`, `log_epoch`. Variants are config
values or callables (never subclasses). The loop stops at the first of: the time budget,
`max_epochs`, or `patience` epochs without a better validation loss. Everything needed to resume
is written atomically at the end of each epoch.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from volseg.atomic import write_text_atomic
from volseg.layout import Case, DatasetInfo, read_dataset
from volseg.volumes import read_label
from volseg.checkpoint import (
    MODEL_BEST,
    MODEL_LAST,
    TRAIN_STATE,
    load_train_state,
    member_folder,
    read_model_file,
    save_model,
    save_train_state,
)
from volseg.config import Config, DataConfig, TrainConfig
from volseg.data import BatchStream, CaseData, finish_augment, preprocess_case, with_objects
from volseg.distributed import Dist
from volseg.errors import VolsegError
from volseg.inference import (
    autocast_dtype,
    make_predictor,
    output_window,
    resolve_device,
    sliding_window,
    window_options,
)
from volseg.losses import SIGMOID_LOSSES, LossFn, get_loss
from volseg.model import UNet3d
from volseg.memory import batch_loss
from volseg.planning import FEW_CASES, apply_overrides, data_config_from_dataset, plan_members, plan_run
from volseg.preprocessing import encode_labels

METRICS_CSV = "metrics.csv"
PLAN_JSON = "plan.json"
CONFIG_JSON = "config.json"
SPLIT_JSON = "split.json"
MEMBERS_JSON = "members.json"  # a run folder of several averaged models: its members and budget
EpochCallback = Callable[[Path, dict[str, Any]], None]
# Few cases: below FEW_CASES (planning) the log says how little the validation figure rests on; from
# MIN_CASES_FOR_TWO_VAL cases on, at least MIN_VAL_CASES validate (the rest, four or more, train).
MIN_VAL_CASES = 2
MIN_CASES_FOR_TWO_VAL = 6
# Below FEW_CASES the best model is chosen on the validation Dice smoothed over epochs (the newest
# epoch weighs this much), as nnU-Net chooses its checkpoint_best on an exponential moving average
# of its pseudo-Dice: on two validation cases the raw maximum picks the luckiest epoch, often an
# early, undertrained one (synthetic lesions, 10 min: epoch 3 of 12, a quarter into the
# learning-rate decay).
SELECT_EMA = 0.5
# Below FEW_CASES, too, only an epoch that ends in the last quarter of the learning-rate schedule
# (where poly decay has brought the rate under 0.3 of its start) may be kept as model_best, and
# the run's last epoch always may be: with 2-3 epochs per averaged member the smoothing has nothing
# to smooth, and two validation cases preferred an earlier, high-LR model to the annealed one in 3
# of 40 members on the synthetic lesions (ended at 19%, 46% and 61% of the schedule); each time the
# last model scored better on the held-out cases (runs' mean Dice 0.645 -> 0.777, 0.769 -> 0.798,
# 0.663 -> 0.711). A run of a dozen epochs still chooses among its last three or four. nnU-Net
# predicts with its final checkpoint by default.
SELECT_FROM_PROGRESS = 0.75


def tune_allocator() -> bool:
    """Keep freed training buffers in the heap instead of returning them to the OS.

    glibc hands every buffer over 32 MiB back to the kernel on free, so each step re-faults
    hundreds of thousands of pages (seen as 10-25% system time on a 2-core CPU). Disabling mmap
    allocations and raising the trim threshold keeps them. Linux/glibc only; a no-op elsewhere.
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):
        return False


def split_cases(
    case_ids: list[str], val_fraction: float, seed: int, fold: int | None = None, folds: int = 5
) -> tuple[list[str], list[str]]:
    """Deterministic train/validation split by case (same seed, same split on every machine).

    With `fold`, the cases are dealt into `folds` disjoint folds (seeded permutation) and fold
    `fold` validates: the folds of one seed cover every case exactly once.

    >>> ids = ["a", "b", "c", "d"]
    >>> sorted(split_cases(ids, 0.2, 0, fold=0, folds=2)[1] + split_cases(ids, 0.2, 0, fold=1, folds=2)[1])
    ['a', 'b', 'c', 'd']
    """
    ids = sorted(case_ids)
    if fold is not None:
        if not 0 <= fold < folds or folds < 2:
            raise VolsegError(None, f"fold {fold} of {folds} does not exist", "use 0 <= fold < folds, folds >= 2")
        if len(ids) < folds:
            raise VolsegError(None, f"{len(ids)} cases cannot make {folds} folds")
        perm = np.random.default_rng(seed).permutation(len(ids))
        val = sorted(ids[i] for i in perm[fold::folds])
        return [i for i in ids if i not in set(val)], val
    if len(ids) < 2:
        return ids, ids  # one case: validate on the training case rather than on nothing
    n_val = min(len(ids) - 1, max(1, round(val_fraction * len(ids))))
    if len(ids) >= MIN_CASES_FOR_TWO_VAL:
        n_val = max(n_val, MIN_VAL_CASES)  # 20% of a few cases is one case: a single scan's Dice is noise
    perm = np.random.default_rng(seed).permutation(len(ids))
    val = sorted(ids[i] for i in perm[:n_val])
    return [i for i in ids if i not in set(val)], val


def validation_note(n_val: int, n_cases: int) -> str:
    """What the validation figure rests on, for the log: with few cases it is a rough guide only.

    >>> validation_note(2, 6)
    'validation on 2 of 6 cases: with fewer than 10 cases the validation Dice is a rough guide (one case moves it a lot)'
    """
    text = f"validation on {n_val} of {n_cases} cases"
    if n_cases < FEW_CASES:
        text += f": with fewer than {FEW_CASES} cases the validation Dice is a rough guide (one case moves it a lot)"
    return text


def selection_score(previous: float | None, dice: float, smooth: bool) -> float:
    """The figure the best model is chosen on: the validation Dice, smoothed over epochs when it
    rests on few cases (`SELECT_EMA`), so that one lucky epoch does not win.

    >>> selection_score(None, 0.8, True), selection_score(0.6, 0.8, True), selection_score(0.6, 0.8, False)
    (0.8, 0.7, 0.8)
    """
    if previous is None or not smooth:
        return dice
    return SELECT_EMA * dice + (1 - SELECT_EMA) * previous


@dataclasses.dataclass
class BestModel:
    """Which epoch is model_best: the one with the highest `selection_score` so far among the
    epochs that may be kept (few cases: from `select_from` of the schedule on, and the last).

    `update` is the whole rule, for the training loop and for tests that replay a run's Dice.
    """

    smooth: bool  # few cases: choose on the Dice smoothed over epochs, and not an early epoch
    select_from: float = SELECT_FROM_PROGRESS  # with smooth: the earliest schedule progress kept
    best: float = -math.inf  # the highest selection score so far
    score: float | None = None  # the selection score of the last epoch
    dice: float = -math.inf  # the validation Dice of the chosen epoch

    def update(self, dice: float, progress: float = 1.0, last: bool = False) -> bool:
        """Score one more epoch's validation Dice; True when that epoch becomes model_best.

        `progress` is how far the learning-rate schedule had got at the epoch's end (0..1), `last`
        whether the run stops after it."""
        self.score = selection_score(self.score, dice, self.smooth)
        eligible = last or not self.smooth or progress >= self.select_from
        improved = eligible and self.score > self.best
        if improved:
            self.best, self.dice = self.score, dice
        return improved

    @classmethod
    def replay(cls, epochs: Sequence[tuple[float, float]], smooth: bool, select_from: float = SELECT_FROM_PROGRESS) -> int:
        """The epoch (1-based) the rule keeps for a run's (validation Dice, schedule progress) per
        epoch, its last epoch ending the run: for tests and `benchmarks/model_choice.py`, which
        replay saved runs."""
        keeper, at = cls(smooth, select_from), 0
        for epoch, (dice, progress) in enumerate(epochs, 1):
            if keeper.update(dice, progress, last=epoch == len(epochs)):
                at = epoch
        return at


@dataclasses.dataclass
class Plateau:
    """Early stopping: `patience` epochs in a row without a validation loss `min_delta` below the best.

    >>> plateau = Plateau(patience=2, min_delta=0.0)
    >>> for loss in (0.5, 0.6, 0.4, 0.45, 0.41):
    ...     plateau.update(loss)
    >>> plateau.stale, plateau.stalled
    (2, True)
    """

    patience: int  # 0: never stop early
    min_delta: float
    best_loss: float = math.inf
    stale: int = 0  # epochs since the last improvement

    def update(self, val_loss: float) -> None:
        if val_loss < self.best_loss - self.min_delta:
            self.best_loss, self.stale = val_loss, 0
        else:
            self.stale += 1

    @property
    def stalled(self) -> bool:
        return bool(self.patience) and self.stale >= self.patience


def poly_lr(base_lr: float, progress: float, exponent: float) -> float:
    """Polynomial decay from `base_lr` to 0 as `progress` goes from 0 to 1.

    >>> poly_lr(0.01, 0.0, 0.9), poly_lr(0.01, 1.0, 0.9)
    (0.01, 0.0)
    """
    return base_lr * (1 - min(max(progress, 0.0), 1.0)) ** exponent


def eta_seconds(elapsed_s: float, epochs_done: int, max_epochs: int, budget_s: float) -> float:
    """Time the run has left: the budget's remainder or the remaining epochs at the mean epoch time.

    An upper bound: a plateau stop can end the run sooner, and no one can know when.

    >>> eta_seconds(600.0, 5, 100, 3600.0), eta_seconds(600.0, 5, 8, 3600.0), eta_seconds(600.0, 5, 8, 0.0)
    (3000.0, 360.0, 360.0)
    """
    by_epochs = max(max_epochs - epochs_done, 0) * elapsed_s / max(epochs_done, 1)
    by_budget = max(budget_s - elapsed_s, 0.0) if budget_s > 0 else by_epochs
    return min(by_budget, by_epochs)


def class_frequencies(cases: list[CaseData], num_classes: int) -> np.ndarray:
    """Fraction of labelled voxels in each class over the training cases (unlabelled voxels left out)."""
    counts = np.zeros(num_classes, dtype=np.float64)
    for case in cases:
        rows = max(1, 4_000_000 // max(1, int(np.prod(case.label.shape[1:]))))  # bincount's int64 copy stays small
        for a in range(0, case.label.shape[0], rows):
            label = np.asarray(case.label[a : a + rows])
            if case.weight is not None:
                label = label[np.asarray(case.weight[a : a + rows]) > 0]
            counts += np.bincount(label.ravel(), minlength=num_classes)[:num_classes]
    return counts / max(counts.sum(), 1.0)


@torch.inference_mode()
def validate(
    model: torch.nn.Module,
    cfg: Config,
    cases: list[CaseData],
    device: torch.device,
    dense: dict[str, np.ndarray] | None = None,
    dist: Dist | None = None,
) -> dict[str, float]:
    """Whole-volume sliding-window validation: loss and Dice per class on labelled voxels only.

    `dense` maps case ids to dense class-index labels (a sparsified experiment): then the Dice
    against the dense truth is reported too, as `val_dense_dice`. Under torchrun each rank scores
    its share of `cases` and the sums are combined, so every rank returns the same numbers.
    """
    dist = dist or Dist()
    cases = cases[dist.rank :: dist.world]
    was_training = model.training
    model.eval()
    loss_fn = get_loss(cfg.train.loss)
    n_cls = cfg.model.num_classes
    inter = np.zeros(n_cls)
    total = np.zeros(n_cls)
    dense_inter = np.zeros(n_cls)
    dense_total = np.zeros(n_cls)
    losses = []
    for case in cases:
        probs = sliding_window(np.asarray(case.image), make_predictor(model, device), device=device,
                               **window_options(cfg))
        label = np.asarray(case.label)
        weight = np.ones(label.shape, np.float32) if case.weight is None else np.asarray(case.weight, np.float32)
        p = torch.from_numpy(probs).clamp(1e-7, 1 - 1e-7)[None]
        # losses take logits: log p for a softmax loss, logit(p) for the one-vs-rest sigmoid losses
        logp = (p.log() - torch.log1p(-p)) if cfg.train.loss in SIGMOID_LOSSES else p.log()
        losses.append(float(loss_fn(logp, torch.from_numpy(label.astype(np.int64))[None], torch.from_numpy(weight)[None])))
        pred = probs.argmax(0)
        labelled = weight > 0
        for c in range(1, n_cls):
            p, r = (pred == c) & labelled, (label == c) & labelled
            inter[c] += np.count_nonzero(p & r)
            total[c] += np.count_nonzero(p) + np.count_nonzero(r)
        if dense is not None and case.case_id in dense:
            truth = dense[case.case_id]
            for c in range(1, n_cls):
                p, r = pred == c, truth == c
                dense_inter[c] += np.count_nonzero(p & r)
                dense_total[c] += np.count_nonzero(p) + np.count_nonzero(r)
    model.train(was_training)
    sums = dist.sum_(np.concatenate([[sum(losses), len(losses)], inter, total, dense_inter, dense_total]))
    (loss_sum, n_cases), sums = sums[:2], sums[2:]
    inter, total, dense_inter, dense_total = np.split(sums, 4)
    result = {"val_loss": float(loss_sum / max(n_cases, 1))}
    dices = []
    for c in range(1, n_cls):
        d = 2 * inter[c] / total[c] if total[c] > 0 else 1.0
        result[f"val_dice_{cfg.data.class_values[c]}"] = float(d)
        dices.append(d)
    result["val_dice"] = float(np.mean(dices)) if dices else 1.0
    if dense is not None and dense_total.sum() > 0:
        per = [2 * dense_inter[c] / dense_total[c] if dense_total[c] > 0 else 1.0 for c in range(1, n_cls)]
        result["val_dense_dice"] = float(np.mean(per))
    return result


def _write_metrics(path: Path, rows: list[dict[str, Any]]) -> None:
    """Rewrite the per-epoch CSV atomically (a crash never leaves a truncated table)."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buf.getvalue())


def train(
    dataset: str | Path,
    out_dir: str | Path,
    max_minutes: float | None = None,
    seed: int | None = None,
    device: str = "auto",
    overrides: dict[str, dict[str, Any]] | None = None,
    resume: bool = False,
    progress: bool = True,
    on_epoch: EpochCallback | None = None,
    plan: str | Path | None = None,
    members: int | None = None,
) -> dict[str, Any]:
    """Train a U-Net on an nnU-Net-layout dataset; returns a summary (best Dice, epochs, minutes).

    `overrides` maps config sections to field values, e.g. {"train": {"batch_size": 4}}. `members`
    models share the budget and are averaged at prediction (default: `planning.plan_members`).
    """
    t0 = time.monotonic()
    out = Path(out_dir)
    dist = Dist()
    dev = dist.start(resolve_device(device))
    if dev.type == "cpu":
        tune_allocator()
    try:
        labelled = _read_labelled_cases(dataset)  # the first refusal; read once for every member
        if resume:  # a resumed run keeps its shape: several members only if it started with them
            k = int(json.loads((out / MEMBERS_JSON).read_text())["members"]) if (out / MEMBERS_JSON).exists() else 1
        elif (overrides or {}).get("train", {}).get("fold") is not None and members is None:
            k = 1  # one cross-validation fold asked for: that one model
        else:
            k, why = plan_members(len(labelled[1]), members)
            if progress and dist.main and k > 1:
                from tqdm import tqdm

                tqdm.write(f"plan: {why}")
        if k > 1:
            return _train_members(dataset, labelled, out, dist, dev, t0, k, max_minutes=max_minutes, seed=seed,
                                  overrides=overrides, resume=resume, progress=progress and dist.main,
                                  on_epoch=on_epoch, plan=plan)
        run = set_up(dataset, labelled, out, dist, dev, t0, max_minutes=max_minutes, seed=seed, overrides=overrides,
                     resume=resume, progress=progress and dist.main, plan=plan)
        return train_loop(run, on_epoch)
    finally:
        dist.stop()


def _train_members(
    dataset: str | Path, labelled: tuple[DatasetInfo, list[Case]], out: Path, dist: Dist, dev: torch.device, t0: float, k: int, *,
    max_minutes: float | None, seed: int | None, overrides: dict[str, dict[str, Any]] | None, resume: bool,
    progress: bool, on_epoch: EpochCallback | None, plan: str | Path | None,
) -> dict[str, Any]:
    """`k` runs one after another in OUTPUT/member_<i>, each with 1/k of the budget, seed + i (so its own
    validation split) and one shared preprocessing cache; members after the first reuse the first's
    plan. members.json records which have finished, so `--resume` skips those and resumes the one
    that was cut short. `volseg predict -m OUTPUT` averages the members' probabilities."""
    state_path = out / MEMBERS_JSON
    if resume:
        state = json.loads(state_path.read_text())
        if max_minutes is not None:  # as for one model, a resumed run may be given a new budget
            state["minutes"] = float(max_minutes)
    else:
        _open_run_folder(out, resume=False, dist=dist)  # refuses a folder that holds a model or members
        if max_minutes is None:
            max_minutes = _read_plan(Path(plan)).train.max_minutes if plan is not None else TrainConfig().max_minutes
        base_seed = TrainConfig().seed if seed is None else seed
        state = {"members": k, "minutes": float(max_minutes), "seed": base_seed, "finished": []}
        if dist.main:
            write_text_atomic(state_path, json.dumps(state, indent=2))
    share = state["minutes"] / state["members"]
    summaries: list[dict[str, Any]] = []
    for i in range(state["members"]):
        sub = member_folder(out, i)
        if i in state["finished"]:
            continue
        started = (sub / TRAIN_STATE).exists()
        if progress:
            from tqdm import tqdm

            tqdm.write(f"member {i + 1} of {state['members']}: seed {state['seed'] + i}, {share:g} min"
                       + (" (resumed)" if started else ""))
        member_plan = plan if i == 0 else member_folder(out, 0) / PLAN_JSON
        run = set_up(dataset, labelled, sub, dist, dev, t0 if i == 0 else time.monotonic(), max_minutes=share,
                     seed=state["seed"] + i, overrides=overrides, resume=resume and started, progress=progress,
                     plan=member_plan, cache=out / "preprocessed")
        summaries.append(train_loop(run, on_epoch))
        state["finished"].append(i)
        if dist.main:
            write_text_atomic(state_path, json.dumps(state, indent=2))
    return {
        "best_val_dice": float(np.mean([s["best_val_dice"] for s in summaries])) if summaries else float("nan"),
        "epochs": sum(s["epochs"] for s in summaries),
        "minutes": (time.monotonic() - t0) / 60,
        "stop_reason": summaries[-1]["stop_reason"] if summaries else "finished before",
        "run_dir": str(out),
        "members": state["members"],
    }


def train_loop(run: Run, on_epoch: EpochCallback | None = None) -> dict[str, Any]:
    """The epochs: train, validate, keep the best model, save, log; stop at max_epochs, a plateau or the budget."""
    tc = run.cfg.train
    stop_reason = "max_epochs"
    run.model.train()
    while run.epoch < tc.max_epochs:
        stats = train_epoch(run)
        val = validate_epoch(run)
        run.epoch += 1
        row = epoch_row(run, stats, val)
        run.history.append(row)
        run.plateau.update(val["val_loss"])
        # decided before the model is saved: the run's last epoch may always become model_best
        stop = "plateau" if run.plateau.stalled else "time" if run.out_of_time() else None
        last = stop is not None or run.epoch >= tc.max_epochs
        improved = run.best.update(val["val_dice"], schedule_progress(run, row["seconds"]), last)
        if run.dist.main:
            save_checkpoint(run, val, improved)
        if run.progress:
            log_epoch(run, row, improved)
        if on_epoch and run.dist.main:
            on_epoch(run.out, row)
        if stop is not None:
            stop_reason = stop
            break
    return {
        "best_val_dice": run.best.dice,
        "epochs": run.epoch,
        "minutes": (time.monotonic() - run.t0) / 60,
        "stop_reason": stop_reason,
        "run_dir": str(run.out),
    }


# --------------------------------------------------------------------------------------------------
# the run: what set-up makes and the epoch loop moves on


@dataclasses.dataclass
class Run:
    """One training run: config, cases, network and optimiser as set-up made them, the budget's
    clock, and the counters the epoch loop moves on (what a resume restores)."""

    cfg: Config
    out: Path
    dist: Dist
    dev: torch.device
    progress: bool
    train_cases: list[CaseData]
    val_cases: list[CaseData]
    dense: dict[str, np.ndarray] | None  # dense truth of a sparsified dataset's validation cases
    net: UNet3d
    model: torch.nn.Module  # `net`, or its DistributedDataParallel wrapper under torchrun
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    loss_fn: LossFn
    best: BestModel
    plateau: Plateau
    t0: float  # this command's start
    iters: int  # steps per epoch; 0: as many as fill `epoch_target_s`
    epoch: int = 0
    spent_s: float = 0.0  # what earlier sessions of a resumed run spent
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    val_s: float = 0.0  # the last validation's seconds, the same on every rank

    @property
    def budget_s(self) -> float:
        return self.cfg.train.max_minutes * 60

    @property
    def run_start(self) -> float:
        """The budget's clock starts at the command's start: planning, the timed step and preprocessing
        count; a resumed run carries on from the time its earlier sessions spent."""
        return self.t0 - self.spent_s

    @property
    def epoch_target_s(self) -> float:
        """iters_per_epoch 0: an epoch is about 1/30 of the budget (at least 10 steps, at most 5
        minutes), so the curves get points and plateaus show whatever the machine's speed."""
        return min(self.budget_s / 30, 300.0)

    def over_budget(self, margin_s: float = 0.0) -> bool:
        """Whether another validation (plus `margin_s`) would run past the budget, on this rank's clock."""
        return time.monotonic() - self.run_start + self.val_s * 1.2 + margin_s > self.budget_s

    def out_of_time(self) -> bool:
        """`over_budget` agreed by all ranks (the slowest decides), so all stop after the same epoch."""
        return bool(self.dist.max_(self.over_budget(margin_s=1))[0])


def set_up(
    dataset: str | Path,
    labelled: tuple[DatasetInfo, list[Case]],
    out: Path,
    dist: Dist,
    dev: torch.device,
    t0: float,
    *,
    max_minutes: float | None,
    seed: int | None,
    overrides: dict[str, dict[str, Any]] | None,
    resume: bool,
    progress: bool,
    plan: str | Path | None,
    cache: Path | None = None,
) -> Run:
    """Everything before the first epoch: checks, plan, preprocessing cache, split, network, resume.

    `labelled` is `_read_labelled_cases(dataset)`, read once by `train`. Refusals come before any
    work: a folder that holds a model (or nothing to resume), a plan that does not fit the dataset,
    a patch the network cannot take.
    """
    info, cases = labelled
    _open_run_folder(out, resume, dist)
    if resume:
        _, saved, _ = read_model_file(out / MODEL_LAST)
        cfg = _resume_overrides(saved, overrides or {}, max_minutes)
    else:
        cfg = _new_plan(info, cases, dataset, out, dist, dev, progress, plan, overrides, seed, max_minutes)
    prepared = _preprocess(cases, cfg, cache or out / "preprocessed", dist, progress)
    tc = cfg.train
    output_window(cfg, tc.patch_size)  # refuse a patch the network cannot take before any work
    if dist.main:
        write_text_atomic(out / CONFIG_JSON, cfg.to_json())
    train_cases, val_cases = _split(prepared, cfg, out, dist, progress, dataset)
    dense = _dense_labels(Path(dataset), val_cases, cfg.data)
    prior = None if resume else class_frequencies(train_cases, cfg.model.num_classes)
    net, model, optimizer = _network(cfg, dev, dist, prior)
    amp_dtype = autocast_dtype(dev)
    run = Run(
        cfg=cfg, out=out, dist=dist, dev=dev, progress=progress, train_cases=train_cases, val_cases=val_cases,
        dense=dense, net=net, model=model, optimizer=optimizer,
        # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none
        scaler=torch.amp.GradScaler(dev.type, enabled=amp_dtype == torch.float16), amp_dtype=amp_dtype,
        loss_fn=get_loss(tc.loss), best=BestModel(smooth=len(prepared) < FEW_CASES),
        plateau=Plateau(tc.patience, tc.min_delta), t0=t0, iters=tc.iters_per_epoch,
    )  # fmt: skip
    if resume:
        restore(run)
    return run


def _read_labelled_cases(dataset: str | Path) -> tuple[DatasetInfo, list[Case]]:
    """The dataset's training cases; every one needs a label file."""
    info, cases = read_dataset(dataset)
    missing = [c.case_id for c in cases if c.label is None]
    if missing:
        raise VolsegError(dataset, f"{len(missing)} training cases have no label (first: {missing[0]})")
    return info, cases


def _open_run_folder(out: Path, resume: bool, dist: Dist) -> None:
    """Refuse to overwrite a trained model or to resume from nothing; clear a killed run's temporaries."""
    if resume and not (out / TRAIN_STATE).exists():
        raise VolsegError(out, "nothing to resume: no training state in this folder", "drop --resume to start anew")
    if not resume and ((out / MODEL_LAST).exists() or (out / MEMBERS_JSON).exists()):
        raise VolsegError(out, "already holds a trained model", "use --resume to continue it or choose another -o folder")
    out.mkdir(parents=True, exist_ok=True)
    if dist.main:
        for stale_tmp in out.glob(".*.tmp*"):  # left by a process killed mid-write; the real files are intact
            if stale_tmp.is_file():
                stale_tmp.unlink(missing_ok=True)


def _new_plan(
    info: DatasetInfo, cases: list[Case], dataset: str | Path, out: Path, dist: Dist, dev: torch.device,
    progress: bool, plan: str | Path | None, overrides: dict[str, dict[str, Any]] | None, seed: int | None,
    max_minutes: float | None,
) -> Config:
    """A new run's config, from a `volseg plan` file or planned here for the data, device and budget; kept as plan.json."""
    fingerprint: dict[str, Any] | None = None
    if plan is not None:
        cfg = apply_overrides(_read_plan(Path(plan)), overrides or {}, seed, max_minutes)
    else:
        cfg, fingerprint, reasons = plan_run(info, cases, dev, overrides, seed, max_minutes, autocast_dtype(dev),
                                             agree=lambda s: float(dist.max_([s])[0]) if dist.enabled else s)
        if progress:
            from tqdm import tqdm

            for line in reasons:
                tqdm.write(f"plan: {line}")
    if cfg.model.in_channels != len(info.channel_names) or cfg.data.class_values != data_config_from_dataset(info).class_values:
        raise VolsegError(plan or dataset, "plan does not match the dataset's channels or labels")
    if dist.main:
        write_text_atomic(out / PLAN_JSON, json.dumps({"config": json.loads(cfg.to_json()), "fingerprint": fingerprint}, indent=2))
    return cfg


def _preprocess(cases: list[Case], cfg: Config, cache: Path, dist: Dist, progress: bool) -> dict[str, CaseData]:
    """Every case resampled and normalised once, into the run's cache (rank 0 writes, the others read)."""
    iterator: Iterable[Case] = cases
    if progress:
        from tqdm import tqdm

        iterator = tqdm(cases, desc="preprocess", unit="case", leave=False, disable=None)
    if not dist.main:
        dist.barrier()  # rank 0 fills the cache first; the others then only read it
    prepared = {c.case_id: preprocess_case(c, cfg.data, cache, cfg.train.weight_map_spec) for c in iterator}
    if dist.main:
        dist.barrier()
    return prepared


def _split(
    prepared: dict[str, CaseData], cfg: Config, out: Path, dist: Dist, progress: bool, dataset: str | Path
) -> tuple[list[CaseData], list[CaseData]]:
    """Training and validation cases, the split kept as split.json; training cases without a labelled voxel drop out."""
    tc = cfg.train
    train_ids, val_ids = split_cases(list(prepared), tc.val_fraction, tc.seed, tc.fold, tc.folds)
    note = validation_note(len(val_ids), len(prepared))
    if dist.main:
        write_text_atomic(out / SPLIT_JSON, json.dumps({"train": train_ids, "val": val_ids, "note": note}, indent=1))
    if progress:
        from tqdm import tqdm

        tqdm.write(note + (f" ({', '.join(val_ids)})" if len(val_ids) <= 5 else ""))
    train_cases = [c for c in (prepared[i] for i in train_ids) if c.labelled_voxels is None or len(c.labelled_voxels)]
    if not train_cases:
        raise VolsegError(dataset, "no training case has any labelled voxel")
    if tc.foreground_sampling == "object":
        train_cases = [with_objects(c) for c in train_cases]
    return train_cases, [prepared[i] for i in val_ids]


def _network(
    cfg: Config, dev: torch.device, dist: Dist, prior: np.ndarray | None
) -> tuple[UNet3d, torch.nn.Module, torch.optim.Optimizer]:
    """The seeded U-Net (output bias from the class `prior`; None: a resumed run loads its weights),
    its DistributedDataParallel wrapper under torchrun (else itself), and SGD over its parameters."""
    tc = cfg.train
    torch.manual_seed(tc.seed)
    net = UNet3d(cfg.model)
    if prior is not None:
        net.init_output_bias(prior, tc.loss in SIGMOID_LOSSES)
    net = net.to(dev)
    model: torch.nn.Module = net
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(net, device_ids=[dev.index] if dev.type == "cuda" else None)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=tc.lr, momentum=tc.momentum, nesterov=tc.nesterov, weight_decay=tc.weight_decay
    )
    return net, model, optimizer


# --------------------------------------------------------------------------------------------------
# one epoch


@dataclasses.dataclass(frozen=True)
class EpochStats:
    """What an epoch of steps leaves for its metrics row."""

    lr: float  # of the last step
    loss: float  # mean training loss over the steps
    wait_s: float  # waiting for batches
    seconds: float  # the whole epoch of steps


def train_epoch(run: Run) -> EpochStats:
    """SGD steps on fresh random patches until the epoch is done or the budget is spent.

    Every step first agrees the clock and the stop decision across ranks, so all ranks take the
    same number of steps with the same learning rate.
    """
    tc = run.cfg.train
    stream = BatchStream(run.train_cases, tc.patch_size, tc.batch_size,
                         np.random.default_rng([tc.seed, run.epoch, run.dist.rank]), tc.foreground_fraction,
                         mirror=False, augment=run.cfg.augment if tc.augment else None,
                         num_classes=run.cfg.model.num_classes, defer_augment=run.dev.type == "cuda")
    start = time.monotonic()
    losses: list[float] = []
    wait_s, step, over_budget, epoch_t0, lr = 0.0, 0, False, 0.0, tc.lr
    bar = None
    if run.progress:
        from tqdm import tqdm

        bar = tqdm(total=run.iters or None, desc=f"epoch {run.epoch}", unit="it", leave=False, disable=None)
    try:
        while True:
            # one collective per step keeps the clocks (LR) and the stop decision identical on all ranks
            elapsed, over_budget = run.dist.max_([time.monotonic() - run.run_start, over_budget])
            if step == 0:
                epoch_t0 = elapsed  # from the synced clock, so every rank ends the epoch at the same step
            if step and (over_budget or _epoch_done(run, step, elapsed - epoch_t0)):
                break
            lr = _set_lr(run, elapsed)
            tw = time.monotonic()
            batch = next(stream)
            wait_s += time.monotonic() - tw
            losses.append(train_step(run, batch))
            step += 1
            if bar is not None:
                bar.update()
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", lr=f"{lr:.4f}")
            over_budget = run.over_budget()
    finally:
        stream.close()
        if bar is not None:
            bar.close()
    return EpochStats(lr, float(np.mean(losses)), wait_s, time.monotonic() - start)


def _epoch_done(run: Run, step: int, epoch_s: float) -> bool:
    """The epoch's end: `iters` steps, or with iters 0 at least 10 steps and `epoch_target_s`."""
    if run.iters:
        return step >= run.iters
    # an epoch also lasts at least 4x the last validation, so that whole-volume validation
    # of large cases (512-wide MRI: half a minute) takes at most a fifth of the budget
    return step >= 10 and epoch_s >= max(run.epoch_target_s, 4 * run.val_s)


def schedule_progress(run: Run, elapsed_s: float) -> float:
    """How far the learning-rate schedule is (0..1): whichever runs out first, the epochs or the budget."""
    tc = run.cfg.train
    return max(run.epoch / tc.max_epochs, elapsed_s / run.budget_s if run.budget_s > 0 else 0)


def _set_lr(run: Run, elapsed_s: float) -> float:
    """Poly decay over whichever runs out first, the epochs or the time budget."""
    tc = run.cfg.train
    lr = poly_lr(tc.lr, schedule_progress(run, elapsed_s), tc.poly_exponent)
    for g in run.optimizer.param_groups:
        g["lr"] = lr
    return lr


def train_step(run: Run, batch: tuple[torch.Tensor, ...]) -> float:
    """One optimiser step on a batch (autocast forward, scaled backward, clipped gradients); its loss."""
    tc = run.cfg.train
    x, y, w = (t.to(run.dev, non_blocking=True) for t in batch[:3])
    if len(batch) == 4:  # regions cut on the CPU, resampled here on the GPU
        x, y, w = finish_augment(x, y, w, batch[3], tc.patch_size, run.cfg.model.num_classes)
    loss = batch_loss(run.model, run.net, x, y, w, run.loss_fn, run.amp_dtype)
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.unscale_(run.optimizer)  # clip the true gradients, not the scaled ones
    torch.nn.utils.clip_grad_norm_(run.model.parameters(), 12.0)
    run.scaler.step(run.optimizer)  # skips the step when fp16 gradients overflowed
    run.scaler.update()
    return float(loss.detach())


def validate_epoch(run: Run) -> dict[str, float]:
    """`validate` on the run's validation cases, timing it: the next epoch lasts at least 4x as long."""
    tv = time.monotonic()
    val = validate(run.net, run.cfg, run.val_cases, run.dev, run.dense, run.dist)
    run.val_s = float(run.dist.max_([time.monotonic() - tv])[0])  # the same on every rank: it sets the epoch's end
    return val


def epoch_row(run: Run, stats: EpochStats, val: dict[str, float]) -> dict[str, Any]:
    """The epoch's row of metrics.csv (and of the resume history)."""
    return {
        "epoch": run.epoch,
        "seconds": round(time.monotonic() - run.run_start, 2),
        "lr": stats.lr,
        "train_loss": stats.loss,
        **val,
        "data_wait_fraction": round(stats.wait_s / max(stats.seconds, 1e-9), 4),
    }


def log_epoch(run: Run, row: dict[str, Any], improved: bool) -> None:
    """One line per epoch: losses, Dice per class, the smoothed score, time and ETA."""
    from tqdm import tqdm

    tc = run.cfg.train
    per_class = " ".join(f"{k[9:]}={v:.3f}" for k, v in row.items() if k.startswith("val_dice_"))
    smoothed = f"smoothed {run.best.score:.4f}  " if run.best.smooth else ""
    tqdm.write(
        f"epoch {run.epoch}: train loss {row['train_loss']:.4f}  val loss {row['val_loss']:.4f}  "
        f"val Dice {row['val_dice']:.4f} ({per_class})  {smoothed}"
        f"{'*best* ' if improved else ''}"
        f"[{row['seconds'] / 60:.1f} / {tc.max_minutes:g} min, "
        f"ETA {eta_seconds(row['seconds'], run.epoch, tc.max_epochs, run.budget_s) / 60:.1f} min]"
    )


# --------------------------------------------------------------------------------------------------
# checkpoints and resume


def save_checkpoint(run: Run, val: dict[str, float], improved: bool) -> None:
    """model_best (when this epoch is the best), model_last, the resume state and metrics.csv; rank 0 only."""
    extra = {"epoch": run.epoch, **val}
    if improved:
        save_model(run.out / MODEL_BEST, run.net, run.cfg, extra)
    save_model(run.out / MODEL_LAST, run.net, run.cfg, extra)
    save_train_state(run.out / TRAIN_STATE, run.optimizer, train_state(run), {})
    _write_metrics(run.out / METRICS_CSV, run.history)


def train_state(run: Run) -> dict[str, Any]:
    """The JSON part of train_state.safetensors: counters, history, best-model and plateau state, RNG."""
    return {
        "epoch": run.epoch, "spent_s": time.monotonic() - run.run_start, "best": run.best.best,
        "stale": run.plateau.stale, "best_loss": run.plateau.best_loss, "iters": run.iters, "history": run.history,
        "score": run.best.score, "best_dice": run.best.dice,
        "torch_rng": torch.get_rng_state().tolist(), "world_size": run.dist.world,
    }  # fmt: skip


def restore(run: Run) -> None:
    """Continue from the last finished epoch: weights, optimiser, `train_state`'s counters and RNG."""
    tensors, _, _ = read_model_file(run.out / MODEL_LAST)
    run.net.load_state_dict(tensors)
    state, _ = load_train_state(run.out / TRAIN_STATE, run.optimizer)
    run.epoch, run.spent_s, run.iters, run.history = state["epoch"], state["spent_s"], state["iters"], state["history"]
    run.best.best, run.best.score = state["best"], state.get("score")
    run.best.dice = state.get("best_dice", state["best"])  # older runs kept only "best"
    run.plateau.best_loss, run.plateau.stale = state["best_loss"], state["stale"]
    torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))


def _read_plan(path: Path) -> Config:
    """The config inside a `volseg plan` file (the file may be edited by hand)."""
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise VolsegError(path, "plan file not found") from None
    except json.JSONDecodeError as exc:
        raise VolsegError(path, f"plan is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(raw, dict) or "config" not in raw:
        raise VolsegError(path, "plan has no \"config\" object", "write one with `volseg plan`")
    return Config.from_json(json.dumps(raw["config"]), source=str(path))


def _dense_labels(dataset: Path, cases: list[CaseData], data: DataConfig) -> dict[str, np.ndarray] | None:
    """Dense truth of validation cases when the dataset was made by `volseg sparsify`."""
    folder = dataset / "labelsTr_dense"
    if not folder.is_dir():
        return None
    dense = {}
    for case in cases:
        path = folder / f"{case.case_id}{data.file_ending}"
        if path.exists():
            dense[case.case_id] = encode_labels(read_label(path).array[0], data.class_values)[0]
    return dense


_RESUMABLE = {"max_epochs", "max_minutes", "patience", "min_delta"}


def _resume_overrides(cfg: Config, overrides: dict[str, dict[str, Any]], max_minutes: float | None) -> Config:
    """On resume only the stopping rules may change; data, model and patch settings must stay.

    Repeating the original command line with `--resume` is fine: values equal to the saved ones
    are not changes.
    """
    values: dict[str, Any] = {}
    changed = []
    for name, section in overrides.items():
        current = getattr(cfg, name, None)
        for key, value in section.items():
            if value is None:
                continue
            value = tuple(value) if isinstance(value, list) else value
            if key in _RESUMABLE and name == "train":
                values[key] = value
            elif current is None or not hasattr(current, key) or getattr(current, key) != value:
                changed.append(key)
    if changed:
        raise VolsegError(
            None, f"cannot change {', '.join(sorted(changed))} when resuming",
            "only --max-epochs, --max-minutes and --patience may change; start a new run otherwise",
        )
    if max_minutes is not None:
        values["max_minutes"] = max_minutes
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **values))
