"""The folder coap-client keeps state in: owner-only, made so when it is the default."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from coaplayers.clientstate import StateFolderError, owner_only_folder


def test_a_missing_folder_is_created_owner_only(tmp_path: Path) -> None:
    folder = owner_only_folder(tmp_path / "a" / "b", "state")
    assert (os.stat(folder).st_mode & 0o777) == 0o700


def test_a_named_folder_others_can_reach_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "shared"
    folder.mkdir(mode=0o755)
    os.chmod(folder, 0o755)
    with pytest.raises(StateFolderError, match="not owner-only"):
        owner_only_folder(folder, "state")
    assert (os.stat(folder).st_mode & 0o777) == 0o755  # left as the user made it


def test_the_default_folder_made_by_mkdir_p_is_tightened(tmp_path: Path) -> None:
    # What `mkdir -p` of a folder below it leaves under the usual umask.
    root = tmp_path / "coaplayers"
    (root / "oscore").mkdir(parents=True)
    os.chmod(root, 0o755)
    assert owner_only_folder(root, "state", tighten=True) == root
    assert (os.stat(root).st_mode & 0o777) == 0o700
