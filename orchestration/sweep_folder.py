"""A sweep folder moved after it was made (copied to another host, committed to a repository).

Kept free of torch and Ray: ``hqlt report DIR`` uses it too.
"""
from __future__ import annotations

import json
from pathlib import Path


def relocate_embedded_store(directory: Path, old_path: str) -> None:
    """A sweep folder copied to another path or host: MLflow stored absolute artifact locations in its
    SQLite file, and has no API to change them; rewrite the old folder prefix to the new one."""
    import sqlite3

    old, new = Path(old_path).as_uri(), directory.resolve().as_uri()
    with sqlite3.connect(directory / "mlflow.db") as con:
        con.execute("UPDATE experiments SET artifact_location = replace(artifact_location, ?, ?)", (old, new))
        con.execute("UPDATE runs SET artifact_uri = replace(artifact_uri, ?, ?)", (old, new))


def adopt_moved_folder(directory: Path) -> bool:
    """A sweep folder with its embedded store, opened at another path than it was made at (copied to
    another host, or committed to a repository): point the store's artifact locations here and record the
    new path in sweep.json. True when something was moved."""
    meta_path = directory / "sweep.json"
    meta = json.loads(meta_path.read_text())
    here = str(directory.resolve())
    if meta.get("tracking_uri") or not meta.get("path") or meta["path"] == here:
        return False
    relocate_embedded_store(directory, meta["path"])
    meta["path"] = here
    meta_path.write_text(json.dumps(meta, indent=2))
    return True
