"""Snapshots of the repository's files, to find what a test run created, changed or removed in the checkout."""
from __future__ import annotations

import os
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[1]
# What the tooling around the tests writes (the environment, the editable install, bytecode, pytest's cache), and
# the git directory: every other file in the checkout belongs to the repository, and no test may touch it.
TOOLING = {".git", ".venv", "venv", "__pycache__", ".pytest_cache"}

Snapshot = dict[str, tuple[int, int]]


def repository_files(root: Path) -> Snapshot:
    """Every file under ``root`` outside ``TOOLING`` (and ``*.egg-info``), as its relative path mapped to its size
    and modification time in nanoseconds; links are recorded, not followed."""
    found: Snapshot = {}
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [d for d in subfolders if d not in TOOLING and not d.endswith(".egg-info")]
        for name in files:
            path = os.path.join(folder, name)
            try:
                info = os.lstat(path)
            except FileNotFoundError:  # removed while the walk ran
                continue
            found[os.path.relpath(path, root)] = (info.st_size, info.st_mtime_ns)
    return found


def file_changes(before: Snapshot, after: Snapshot) -> list[str]:
    """One sorted line per file created, removed or changed (size or modification time) between two snapshots."""
    return sorted([f"created {path}" for path in after.keys() - before.keys()]
                  + [f"removed {path}" for path in before.keys() - after.keys()]
                  + [f"changed {path}" for path in before.keys() & after.keys() if before[path] != after[path]])
