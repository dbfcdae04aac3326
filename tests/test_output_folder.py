"""One output-folder policy for every command: the user's files are refused before any work (unless --overwrite),
a folder in use by another command is refused with the holder's PID, and what a command wrote is recorded."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from flatminima.cli import main
from flatminima.output_folder import LOCK_NAME, MANIFEST_NAME, FolderInUseError, FolderLock, OutputFolder

FAST = ["--epochs", "1", "--batch-size", "64", "--threads", "1", "--no-progress", "--optimizer", "sgd", "--lr", "0.05"]


def _run(capsys, argv: list[str]) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


def _one_line(code: int, err: str, expected: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert expected in err, err


def test_a_command_records_what_it_wrote_and_may_replace_it(tmp_path: Path) -> None:
    folder = tmp_path / "out"
    with OutputFolder(folder, "reproduce") as claimed:
        assert (folder / LOCK_NAME).read_text().strip() == str(os.getpid())
        (claimed.path / "report.md").write_text("first\n")
        (claimed.path / "figures").mkdir()
    assert (folder / MANIFEST_NAME).read_text().splitlines() == ["figures", "report.md"]
    with OutputFolder(folder, "reproduce"):  # its own files: no --overwrite needed
        (folder / "report.md").write_text("second\n")
    assert OutputFolder(folder, "reproduce").foreign_files() == []


def test_a_command_killed_outright_still_owns_what_it_wrote(tmp_path: Path) -> None:
    """SIGKILL leaves no manifest entry: the lock file's time says when the command began, and what was written
    since is its own. A file the user adds after a command ended cleanly is still the user's."""
    folder = tmp_path / "out"
    killed = OutputFolder(folder, "reproduce")
    killed.claim()
    (folder / "report.md").write_text("half of a run\n")
    os.close(killed._lock._handle)  # the process dies: the kernel drops the flock, nothing else runs
    with OutputFolder(folder, "reproduce"):  # no --overwrite needed
        (folder / "report.md").write_text("a whole run\n")
    assert (folder / MANIFEST_NAME).read_text().splitlines() == ["report.md"]
    (folder / "notes.txt").write_text("mine\n")
    with pytest.raises(FileExistsError, match=r"\(notes.txt\)"):
        OutputFolder(folder, "reproduce").claim()


def test_a_refused_command_leaves_nothing_in_the_folder(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.tex").write_text("x")
    with pytest.raises(FileExistsError):
        OutputFolder(folder, "demo").claim()
    assert sorted(p.name for p in folder.iterdir()) == ["thesis.tex"]
    _one_line(*_run(capsys, ["train", *FAST, "--output", str(folder)]), "not a flatminima run (thesis.tex)")
    assert sorted(p.name for p in folder.iterdir()) == ["thesis.tex"]


def test_the_user_s_files_are_refused_unless_overwrite(tmp_path: Path) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "report.md").write_text("my report\n")
    (folder / "notes.txt").write_text("mine\n")
    with pytest.raises(FileExistsError, match=r"flatminima reproduce did not write \(notes.txt, report.md\)"):
        OutputFolder(folder, "reproduce").claim()
    assert (folder / "report.md").read_text() == "my report\n"
    assert not (folder / MANIFEST_NAME).exists()
    with OutputFolder(folder, "reproduce", overwrite=True):
        (folder / "report.md").write_text("replaced\n")
    assert (folder / MANIFEST_NAME).read_text().splitlines() == ["report.md"]  # notes.txt stays the user's
    with pytest.raises(FileExistsError, match=r"\(notes.txt\)"):
        OutputFolder(folder, "reproduce").claim()


def test_a_file_or_an_unwritable_place_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        OutputFolder(tmp_path / "file", "demo").claim()
    with pytest.raises(OSError, match="cannot create --output"):
        OutputFolder(tmp_path / "file" / "under", "demo").claim()


def test_a_held_folder_is_refused_with_the_holder_s_pid(tmp_path: Path) -> None:
    folder = tmp_path / "out"
    held = rf"in use by another flatminima command \(PID {os.getpid()}\)"
    with OutputFolder(folder, "sharpness"), pytest.raises(FolderInUseError, match=held):
        OutputFolder(folder, "sharpness").claim()
    with OutputFolder(folder, "sharpness"):  # released: free again
        pass


def test_a_second_train_into_a_held_folder_exits_2_naming_the_holder(tmp_path: Path) -> None:
    """The holder is this test process; the second run is a separate process, as a user's second shell is."""
    folder = tmp_path / "run"
    folder.mkdir()
    lock = FolderLock(folder)
    lock.acquire()
    try:
        command = [sys.executable, "-m", "flatminima", "train", *FAST, "--output", str(folder)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    finally:
        lock.release()
    _one_line(done.returncode, done.stderr, f"is in use by another flatminima command (PID {os.getpid()})")
    assert sorted(p.name for p in folder.iterdir()) == [LOCK_NAME]  # nothing written by the refused run


def test_train_in_process_is_refused_while_the_folder_is_held(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "run"
    folder.mkdir()
    lock = FolderLock(folder)
    lock.acquire()
    try:
        _one_line(*_run(capsys, ["train", *FAST, "--output", str(folder)]), "in use by another flatminima command")
    finally:
        lock.release()
    assert main(["train", *FAST, "--output", str(folder)]) == 0  # and free once released


def test_sharpness_refuses_the_user_s_files_before_measuring(tmp_path: Path, capsys) -> None:
    assert main(["train", *FAST, "--output", str(tmp_path / "run")]) == 0
    out = tmp_path / "measured"
    out.mkdir()
    (out / "spectral_density.png").write_bytes(b"my figure")
    argv = ["sharpness", "--checkpoint", str(tmp_path / "run" / "model.pt"), "--examples", "64", "--output", str(out)]
    _one_line(*_run(capsys, argv), "holds files that flatminima sharpness did not write (spectral_density.png)")
    assert (out / "spectral_density.png").read_bytes() == b"my figure"


def test_demo_refuses_a_user_file_in_a_run_folder_before_training(tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo"
    (out / "sam-seed0").mkdir(parents=True)
    (out / "sam-seed0" / "thesis.tex").write_text("mine")
    (out / MANIFEST_NAME).write_text("sam-seed0\n")  # an earlier demo made the folder; the user added a file
    argv = ["demo", "--quick", "--no-progress", "--output", str(out)]
    _one_line(*_run(capsys, argv), "sam-seed0 holds files that are not a flatminima run (thesis.tex)")
    assert not (out / "sgd-seed0").exists()  # refused before the SGD run trained
    (out / "results.md").write_text("my results")
    (out / "sam-seed0" / "thesis.tex").unlink()
    _one_line(*_run(capsys, argv), "flatminima demo did not write (results.md)")
    assert (out / "results.md").read_text() == "my results"


def test_reproduce_refuses_the_user_s_report_and_replaces_its_own(tmp_path: Path, capsys) -> None:
    out = tmp_path / "cycle"
    out.mkdir()
    (out / "report.md").write_text("my report\n")
    argv = ["reproduce", "sam-cycle", "--quick", "--output", str(out)]
    _one_line(*_run(capsys, argv), "holds files that flatminima reproduce did not write (report.md)")
    assert (out / "report.md").read_text() == "my report\n" and not (out / "results.json").exists()
    assert main([*argv, "--overwrite"]) == 0
    assert (out / "report.md").read_text().startswith("# ")
    inode = (out / "results.json").stat().st_ino
    assert main(argv) == 0  # its own files now: replaced without --overwrite
    assert (out / "results.json").stat().st_ino != inode  # written anew (a new file renamed over the old one)
    assert {"report.md", "results.json"} <= set((out / MANIFEST_NAME).read_text().splitlines())
