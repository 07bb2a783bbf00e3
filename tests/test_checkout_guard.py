"""The snapshot that ``conftest.no_test_writes_into_the_checkout`` compares: it must see every kind of write to
the repository's files and none of the tooling's."""
from __future__ import annotations

import os
from pathlib import Path

from tests.checkout_support import file_changes, repository_files


def _tree(root: Path) -> None:
    for relative in ["README.md", "recipes/a.yaml", "recipes/b.yaml", "examples/deep/c.yaml"]:
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text("x: 1\n")
    (root / "recipes" / "current.yaml").symlink_to("a.yaml")


def test_every_write_to_a_repository_file_is_reported_and_tooling_is_not(tmp_path: Path) -> None:
    _tree(tmp_path)
    before = repository_files(tmp_path)
    assert set(before) == {"README.md", "recipes/a.yaml", "recipes/b.yaml", "recipes/current.yaml",
                           "examples/deep/c.yaml"}

    (tmp_path / "recipes" / "model.yaml").write_text("new\n")  # created
    (tmp_path / "recipes" / "b.yaml").unlink()  # removed
    stat = os.stat(tmp_path / "README.md")
    (tmp_path / "README.md").write_text("y: 2\n")  # same size: caught by the modification time alone
    os.utime(tmp_path / "README.md", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    (tmp_path / "examples" / "deep" / "c.yaml").write_text("x: 1, y: 2\n")  # another size
    os.utime(tmp_path / "examples" / "deep" / "c.yaml", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    (tmp_path / "recipes" / "current.yaml").unlink()
    (tmp_path / "recipes" / "current.yaml").symlink_to("model.yaml")  # a link re-pointed: its own size changes
    for tooling in [".venv/lib", "kfac_tune/__pycache__", ".pytest_cache/v", ".git/objects", "pkg.egg-info"]:
        (tmp_path / tooling).mkdir(parents=True)
        (tmp_path / tooling / "f").write_text("tooling\n")

    assert file_changes(before, repository_files(tmp_path)) == [
        "changed README.md", "changed examples/deep/c.yaml", "changed recipes/current.yaml",
        "created recipes/model.yaml", "removed recipes/b.yaml"]


def test_an_untouched_tree_has_no_changes(tmp_path: Path) -> None:
    _tree(tmp_path)
    assert file_changes(repository_files(tmp_path), repository_files(tmp_path)) == []
