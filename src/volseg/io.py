"""Former home of `volseg.volumes`, `volseg.layout` and `volseg.atomic`, kept for three modules only.

`train.py`, `suggest.py` and `report.py` are being reworked on other branches (issue #26) and still
write `io.<name>`; this re-exports exactly those names until that work moves them onto the new
modules, when this file goes. The import-linter layers put it just below `train`, `suggest` and
`prediction_files`, so no module beneath them can import it.
"""

from volseg.atomic import atomic_open, folder_written_atomically, write_text_atomic
from volseg.layout import Case, DatasetInfo, read_case, read_dataset
from volseg.volumes import Volume, label_dtype, read_label, write_volume

__all__ = [
    "Case",
    "DatasetInfo",
    "Volume",
    "atomic_open",
    "folder_written_atomically",
    "label_dtype",
    "read_case",
    "read_dataset",
    "read_label",
    "write_text_atomic",
    "write_volume",
]
