"""Cross-validation folds: disjoint, covering, deterministic; bad folds refused."""

import pytest

from volseg.errors import VolsegError
from volseg.train import split_cases


def test_folds_partition_the_cases() -> None:
    ids = [f"case_{i:03d}" for i in range(23)]
    vals = [split_cases(ids, 0.2, seed=3, fold=k, folds=5)[1] for k in range(5)]
    flat = [c for v in vals for c in v]
    assert sorted(flat) == ids and len(set(flat)) == len(ids)
    assert {len(v) for v in vals} <= {4, 5}
    for k in range(5):
        train, val = split_cases(ids, 0.2, seed=3, fold=k, folds=5)
        assert not set(train) & set(val) and sorted(train + val) == ids
    assert split_cases(ids, 0.2, seed=3, fold=1, folds=5) == split_cases(list(reversed(ids)), 0.2, seed=3, fold=1, folds=5)
    assert split_cases(ids, 0.2, seed=4, fold=1, folds=5) != split_cases(ids, 0.2, seed=3, fold=1, folds=5)


@pytest.mark.parametrize("fold,folds,n", [(5, 5, 10), (-1, 5, 10), (0, 1, 10), (0, 5, 3)])
def test_bad_folds_refused(fold: int, folds: int, n: int) -> None:
    with pytest.raises(VolsegError):
        split_cases([str(i) for i in range(n)], 0.2, 0, fold=fold, folds=folds)
