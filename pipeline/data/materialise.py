"""One preprocessed copy of a search's splits, shared by all its trials.

`adatt tune` reads and preprocesses the logs once (`materialise`): every split's rows,
hashed, normalised and packed as the train workers read them (`pipeline.data.feed`), written
as Parquet under the search's storage, beside Tune's state. The trials then plan and stream
those files (`SplitRows.packed`): no trial reads or hashes the raw logs again, in any epoch.
A marker written last (`_SUCCESS.json`, holding the files and their rows) makes the copy
complete; a resumed search finds it and reuses it.
"""

from __future__ import annotations

import json

from pipeline.data.files import InputFiles, exists, join, read_text, resolve_files, write_text
from pipeline.data.plan import SplitRows
from pipeline.data.preprocess import Preprocessor

MARKER = "_SUCCESS.json"


def materialise(
    preprocessor: Preprocessor, counts: SplitRows, folder: str, task_cpus: float
) -> SplitRows:
    """Every split of the files `counts` describes, preprocessed and packed once into
    `folder` (a local path or URI): the new files and their rows of each split. A complete
    copy already there (its marker) is reused as it is.

    Args:
        preprocessor: the search's preprocessing (fitted once on the driver).
        counts: the raw files and their rows of each split.
        folder: where the copy goes (under the search's storage).
        task_cpus: CPUs each read-and-preprocess task reserves.
    """
    from pipeline.data.collate import Layout
    from pipeline.data.feed import read_units
    from pipeline.data.plan import Range

    marker = join(folder, MARKER)
    if exists(marker):
        return SplitRows.from_dict(json.loads(read_text(marker)))
    layout = Layout.of(preprocessor.empty())
    units: list[tuple[str, int]] = []
    rows: dict[str, list[int]] = {split: [] for split in counts.rows}
    for split, per_unit in counts.rows.items():
        ranges = [
            Range(path, group, 0, n, n)
            for (path, group), n in zip(counts.units, per_unit, strict=True)
            if n
        ]
        if not ranges:
            continue
        out = join(folder, split)
        read_units([(split, ranges)], preprocessor, layout, task_cpus).write_parquet(out)
        for footer in InputFiles.read(resolve_files(out)).footers:
            for group in range(footer.metadata.num_row_groups):
                size = footer.metadata.row_group(group).num_rows
                if size:
                    units.append((footer.file, group))
                    for name in rows:
                        rows[name].append(size if name == split else 0)
    copied = SplitRows(units, rows, packed=True)
    write_text(marker, json.dumps(copied.to_dict()))
    return copied
