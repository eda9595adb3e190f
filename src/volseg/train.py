"""The training loop, top to bottom: data, model, SGD + poly LR, validation per epoch, checkpoints.

One function, `train`, with variants as config values or callables (never subclasses). The loop
stops at the first of: the time budget, `max_epochs`, or `patience` epochs without a better
validation loss. Everything needed to resume is written atomically at the end of each epoch.
"""

from __future__ import annotations

import csv
import dataclasses
import io as _stdio
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from volseg import io
from volseg.checkpoint import MODEL_BEST, MODEL_LAST, TRAIN_STATE, load_train_state, read_model_file, save_model, save_train_state
from volseg.config import Config, DataConfig
from volseg.data import BatchStream, CaseData, finish_augment, preprocess_case
from volseg.errors import VolsegError
from volseg.inference import (
    autocast_dtype,
    make_predictor,
    output_window,
    resolve_device,
    sliding_window,
    window_options,
)
from volseg.losses import SIGMOID_LOSSES, get_loss
from volseg.model import UNet3d
from volseg.memory import batch_loss
from volseg.planning import apply_overrides, data_config_from_dataset, plan_run
from volseg.preprocessing import encode_labels

METRICS_CSV = "metrics.csv"
PLAN_JSON = "plan.json"
CONFIG_JSON = "config.json"
SPLIT_JSON = "split.json"
EpochCallback = Callable[[Path, dict[str, Any]], None]
# Few cases: below FEW_CASES the log says how little the validation figure rests on; from
# MIN_CASES_FOR_TWO_VAL cases on, at least MIN_VAL_CASES validate (the rest, four or more, train).
FEW_CASES = 10
MIN_VAL_CASES = 2
MIN_CASES_FOR_TWO_VAL = 6
# Below FEW_CASES the best model is chosen on the validation Dice smoothed over epochs (the newest
# epoch weighs this much), as nnU-Net chooses its checkpoint_best on an exponential moving average
# of its pseudo-Dice: on two validation cases the raw maximum picks the luckiest epoch, often an
# early, undertrained one (synthetic lesions, 10 min: epoch 3 of 12, a quarter into the
# learning-rate decay).
SELECT_EMA = 0.5


# The tensors handed to gloo collectives, one per length, kept for the whole process. gloo's
# worker thread drops its references to a finished collective a moment after the caller has the
# result, and dropping a reference to a tensor Python also holds takes the GIL. DDP keeps the
# process group and so those threads alive past destroy_process_group; if one is still that moment
# behind when the interpreter shuts down, it dies inside a C++ destructor and the finished run
# aborts (SIGABRT, "terminate called without an active exception"; seen in about 1 torchrun job in
# 15 on a loaded 2-core CPU). `Dist.stop` waits for those references to go first.
_REDUCE_BUFFERS: dict[int, torch.Tensor] = {}


class Dist:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun) and the few collectives used.

    Every rank trains on its own random patches; gradients are averaged by DistributedDataParallel.
    Decisions that must agree (stop now, learning rate, epoch length) go through `max_`, and
    validation sums through `sum_`, so all ranks take the same branch.
    """

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def start(self, device: torch.device) -> torch.device:
        """Join the process group (NCCL on GPUs, gloo on CPUs); one GPU per local rank."""
        if not self.enabled:
            return device
        import torch.distributed as dist

        if device.type == "cuda":
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            # the per-step clock/stop collectives are small CPU tensors: gloo carries them, NCCL
            # (which takes CUDA tensors only) the gradients
            dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")
        return device

    def _reduce(self, values: np.ndarray, op: str) -> np.ndarray:
        if not self.enabled:
            return values
        import torch.distributed as dist

        values = np.asarray(values, dtype=np.float64)
        buf = _REDUCE_BUFFERS.get(values.size)
        if buf is None:  # one per length, made once (this runs every training step)
            buf = _REDUCE_BUFFERS[values.size] = torch.zeros(values.size, dtype=torch.float64)
        buf.copy_(torch.from_numpy(values))
        dist.all_reduce(buf, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return buf.numpy().copy()

    def max_(self, values: Any) -> np.ndarray:
        return self._reduce(np.atleast_1d(np.asarray(values, dtype=np.float64)), "max")

    def sum_(self, values: Any) -> np.ndarray:
        return self._reduce(np.atleast_1d(np.asarray(values, dtype=np.float64)), "sum")

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def stop(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            if dist.is_initialized():
                _wait_released(list(_REDUCE_BUFFERS.values()))
                dist.destroy_process_group()


def _wait_released(tensors: list[torch.Tensor], timeout_s: float = 10.0) -> bool:
    """Wait (GIL released) until only Python holds `tensors`; False if a worker kept one past the timeout."""
    if not hasattr(torch.Tensor, "_use_count"):
        return True
    deadline = time.monotonic() + timeout_s
    alone = torch.zeros(1)._use_count()  # what a tensor held only by Python counts in this torch
    for t in tensors:
        while t._use_count() > alone:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.001)
    return True


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
    buf = _stdio.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    io.write_text_atomic(path, buf.getvalue())


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
) -> dict[str, Any]:
    """Train a U-Net on an nnU-Net-layout dataset; returns a summary (best Dice, epochs, minutes).

    `overrides` maps config sections to field values, e.g. {"train": {"batch_size": 4}}.
    """
    t0 = time.monotonic()
    out = Path(out_dir)
    dist = Dist()
    dev = dist.start(resolve_device(device))
    if dev.type == "cpu":
        tune_allocator()
    progress = progress and dist.main
    try:
        return _train(dataset, out, dist, dev, t0, max_minutes, seed, overrides, resume, progress, on_epoch, plan)
    finally:
        dist.stop()


def _train(
    dataset: str | Path,
    out: Path,
    dist: Dist,
    dev: torch.device,
    t0: float,
    max_minutes: float | None,
    seed: int | None,
    overrides: dict[str, dict[str, Any]] | None,
    resume: bool,
    progress: bool,
    on_epoch: EpochCallback | None,
    plan: str | Path | None,
) -> dict[str, Any]:
    info, cases = io.read_dataset(dataset)
    missing = [c.case_id for c in cases if c.label is None]
    if missing:
        raise VolsegError(dataset, f"{len(missing)} training cases have no label (first: {missing[0]})")
    state_file = out / TRAIN_STATE
    if resume and not state_file.exists():
        raise VolsegError(out, "nothing to resume: no training state in this folder", "drop --resume to start anew")
    if not resume and (out / MODEL_LAST).exists():
        raise VolsegError(out, "already holds a trained model", "use --resume to continue it or choose another -o folder")
    out.mkdir(parents=True, exist_ok=True)
    if dist.main:
        for stale_tmp in out.glob(".*.tmp*"):  # left by a process killed mid-write; the real files are intact
            if stale_tmp.is_file():
                stale_tmp.unlink(missing_ok=True)

    # ---- plan -------------------------------------------------------------------------------
    if resume:
        _, cfg, _ = read_model_file(out / MODEL_LAST)
        cfg = _resume_overrides(cfg, overrides or {}, max_minutes)
    else:
        if plan is not None:
            cfg = apply_overrides(_read_plan(Path(plan)), overrides or {}, seed, max_minutes)
            fingerprint: dict[str, Any] | None = None
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
            io.write_text_atomic(out / PLAN_JSON, json.dumps({"config": json.loads(cfg.to_json()), "fingerprint": fingerprint}, indent=2))
    cache = out / "preprocessed"
    iterator = cases
    if progress:
        from tqdm import tqdm

        iterator = tqdm(cases, desc="preprocess", unit="case", leave=False, disable=None)
    if not dist.main:
        dist.barrier()  # rank 0 fills the cache first; the others then only read it
    prepared = {c.case_id: preprocess_case(c, cfg.data, cache, cfg.train.weight_map_spec) for c in iterator}
    if dist.main:
        dist.barrier()

    tc = cfg.train
    output_window(cfg, tc.patch_size)  # refuse a patch the network cannot take before any work
    train_ids, val_ids = split_cases(list(prepared), tc.val_fraction, tc.seed, tc.fold, tc.folds)
    if dist.main:
        io.write_text_atomic(out / CONFIG_JSON, cfg.to_json())
        io.write_text_atomic(out / SPLIT_JSON, json.dumps(
            {"train": train_ids, "val": val_ids, "note": validation_note(len(val_ids), len(prepared))}, indent=1))
    if progress:
        from tqdm import tqdm

        named = f" ({', '.join(val_ids)})" if len(val_ids) <= 5 else ""
        tqdm.write(validation_note(len(val_ids), len(prepared)) + named)
    train_cases = [c for c in (prepared[i] for i in train_ids) if c.labelled_voxels is None or len(c.labelled_voxels)]
    if not train_cases:
        raise VolsegError(dataset, "no training case has any labelled voxel")
    val_cases = [prepared[i] for i in val_ids]
    dense = _dense_labels(Path(dataset), val_cases, cfg.data)

    # ---- model and optimiser -----------------------------------------------------------------
    torch.manual_seed(tc.seed)
    net = UNet3d(cfg.model)
    if not resume:  # a resumed run loads its weights below
        net.init_output_bias(class_frequencies(train_cases, cfg.model.num_classes), tc.loss in SIGMOID_LOSSES)
    net = net.to(dev)
    model: torch.nn.Module = net
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(net, device_ids=[dev.index] if dev.type == "cuda" else None)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=tc.lr, momentum=tc.momentum, nesterov=tc.nesterov, weight_decay=tc.weight_decay
    )
    loss_fn = get_loss(tc.loss)
    history: list[dict[str, Any]] = []
    epoch, spent_s, best, stale, best_loss = 0, 0.0, -math.inf, 0, math.inf
    score: float | None = None  # the selection score of the last epoch (`selection_score`)
    best_dice = -math.inf  # the validation Dice of the chosen epoch
    smooth = len(prepared) < FEW_CASES
    iters = tc.iters_per_epoch
    if resume:
        tensors, _, _ = read_model_file(out / MODEL_LAST)
        net.load_state_dict(tensors)
        state, _ = load_train_state(state_file, optimizer)
        epoch, spent_s, best, stale = state["epoch"], state["spent_s"], state["best"], state["stale"]
        best_loss, iters, history = state["best_loss"], state["iters"], state["history"]
        score, best_dice = state.get("score"), state.get("best_dice", best)  # older runs kept only "best"
        torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
    budget_s = tc.max_minutes * 60
    # iters_per_epoch 0: an epoch is about 1/30 of the budget (at least 10 steps, at most 5 minutes),
    # so the curves get points and plateaus show whatever the machine's speed
    epoch_target_s = min(budget_s / 30, 300.0)
    # the budget is wall time from the command's start: planning, the timed step and preprocessing count
    run_start = t0 - spent_s

    amp_dtype = autocast_dtype(dev)
    # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none
    scaler = torch.amp.GradScaler(dev.type, enabled=amp_dtype == torch.float16)
    val_s = 0.0
    stop_reason = "max_epochs"
    model.train()
    while epoch < tc.max_epochs:
        stream = BatchStream(train_cases, tc.patch_size, tc.batch_size, np.random.default_rng([tc.seed, epoch, dist.rank]),
                             tc.foreground_fraction, mirror=False, augment=cfg.augment if tc.augment else None,
                             num_classes=cfg.model.num_classes, defer_augment=dev.type == "cuda")
        epoch_start = time.monotonic()
        losses, wait_s = [], 0.0
        step, over_budget = 0, False
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=iters or None, desc=f"epoch {epoch}", unit="it", leave=False, disable=None)
        try:
            while True:
                # one collective per step keeps the clocks (LR) and the stop decision identical on all ranks
                elapsed, over_budget = dist.max_([time.monotonic() - run_start, over_budget])
                if step == 0:
                    epoch_t0 = elapsed  # from the synced clock, so every rank ends the epoch at the same step
                epoch_s = elapsed - epoch_t0
                # an epoch also lasts at least 4x the last validation, so that whole-volume validation
                # of large cases (512-wide MRI: half a minute) takes at most a fifth of the budget
                epoch_done = step >= iters if iters else step >= 10 and epoch_s >= max(epoch_target_s, 4 * val_s)
                if step and (over_budget or epoch_done):
                    break
                frac = max(epoch / tc.max_epochs, elapsed / budget_s if budget_s > 0 else 0)
                lr = poly_lr(tc.lr, frac, tc.poly_exponent)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                tw = time.monotonic()
                batch = next(stream)
                wait_s += time.monotonic() - tw
                x, y, w = (t.to(dev, non_blocking=True) for t in batch[:3])
                if len(batch) == 4:  # regions cut on the CPU, resampled here on the GPU
                    x, y, w = finish_augment(x, y, w, batch[3], tc.patch_size, cfg.model.num_classes)
                loss = batch_loss(model, net, x, y, w, loss_fn, amp_dtype)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
                torch.nn.utils.clip_grad_norm_(model.parameters(), 12.0)
                scaler.step(optimizer)  # skips the step when fp16 gradients overflowed
                scaler.update()
                losses.append(float(loss.detach()))
                step += 1
                if bar is not None:
                    bar.update()
                    bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", lr=f"{lr:.4f}")
                over_budget = time.monotonic() - run_start + val_s * 1.2 > budget_s
        finally:
            stream.close()
            if bar is not None:
                bar.close()
        tv = time.monotonic()
        val = validate(net, cfg, val_cases, dev, dense, dist)
        val_s = float(dist.max_([time.monotonic() - tv])[0])  # the same on every rank: it sets the epoch's end
        epoch += 1
        train_s = tv - epoch_start
        row = {
            "epoch": epoch,
            "seconds": round(time.monotonic() - run_start, 2),
            "lr": lr,
            "train_loss": float(np.mean(losses)),
            **val,
            "data_wait_fraction": round(wait_s / max(train_s, 1e-9), 4),
        }
        history.append(row)
        score = selection_score(score, val["val_dice"], smooth)
        improved = score > best
        if improved:
            best, best_dice = score, val["val_dice"]
            if dist.main:
                save_model(out / MODEL_BEST, net, cfg, {"epoch": epoch, **val})
        if val["val_loss"] < best_loss - tc.min_delta:
            best_loss, stale = val["val_loss"], 0
        else:
            stale += 1
        if dist.main:
            save_model(out / MODEL_LAST, net, cfg, {"epoch": epoch, **val})
            state = {
                "epoch": epoch, "spent_s": time.monotonic() - run_start, "best": best, "stale": stale,
                "best_loss": best_loss, "iters": iters, "history": history, "score": score, "best_dice": best_dice,
                "torch_rng": torch.get_rng_state().tolist(), "world_size": dist.world,
            }
            save_train_state(state_file, optimizer, state, {})
            _write_metrics(out / METRICS_CSV, history)
        if progress:
            from tqdm import tqdm

            per_class = " ".join(f"{k[9:]}={v:.3f}" for k, v in val.items() if k.startswith("val_dice_"))
            tqdm.write(
                f"epoch {epoch}: train loss {row['train_loss']:.4f}  val loss {val['val_loss']:.4f}  "
                f"val Dice {val['val_dice']:.4f} ({per_class})  {f'smoothed {score:.4f}  ' if smooth else ''}"
                f"{'*best* ' if improved else ''}"
                f"[{row['seconds'] / 60:.1f} / {tc.max_minutes:g} min, "
                f"ETA {eta_seconds(row['seconds'], epoch, tc.max_epochs, budget_s) / 60:.1f} min]"
            )
        if on_epoch and dist.main:
            on_epoch(out, row)
        if tc.patience and stale >= tc.patience:
            stop_reason = "plateau"
            break
        if dist.max_(time.monotonic() - run_start + val_s * 1.2 + 1 > budget_s)[0]:
            stop_reason = "time"
            break
    return {
        "best_val_dice": best_dice,
        "epochs": epoch,
        "minutes": (time.monotonic() - t0) / 60,
        "stop_reason": stop_reason,
        "run_dir": str(out),
    }


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
            dense[case.case_id] = encode_labels(io.read_label(path).array[0], data.class_values)[0]
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
