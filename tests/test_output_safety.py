"""No command deletes or overwrites a file neurodeploy did not write (issue 18).

Every command with an output directory (or file) is pointed at a directory of a user's
files, some named like ours: it refuses with one line naming the path, or writes only its
own files beside them with --force; in every case the user's files stay byte for byte.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from netgen import random_network

import neurodeploy as nd
from neurodeploy.cli import main
from neurodeploy.fileio import LOCK_FILE, MARKER_FILE, claim_output_dir, owned_names

SWEEP_ARGS = ["--param", "weights.bits=4,8", "--seeds", "1", "--workers", "1", "--quiet"]
FAST = ["--calibration-size", "50", "--samples", "20"]


def command_argv(command: str, out: Path) -> list[str]:
    """The command line of ``command`` writing into ``out`` (each a few seconds at most)."""
    return {
        "convert": ["convert", "digits_mlp", "--calibration-size", "50", "--json"],
        "simulate": ["simulate", "digits_mlp", *FAST, "--json"],
        "run": ["run", "digits_mlp", "--profile", "loihi2", *FAST, "--json"],
        "deploy": ["deploy", "digits_mlp", "--profile", "loihi2", *FAST, "--json"],
        "sweep": ["sweep", "digits_mlp", "--profile", "loihi2", *FAST, *SWEEP_ARGS],
        "finetune": [
            *("finetune", "digits_mlp", "--profile", "loihi2", *FAST),
            *("--epochs", "1", "--eval-seeds", "1", "--quiet"),
        ],
        "fileclass train": [
            *("fileclass", "train", "--quick", "--train-samples", "100"),
            *("--samples", "20", "--quiet"),
        ],
        "export": ["export", "digits_mlp", "--onnx", str(out / "model.onnx")],
        "report": ["report", str(out)],
    }[command] + ([] if command in ("export", "report") else ["--out", str(out)])


# What each command writes; the user's files below include every one of these names.
OUR_FILES = {
    "convert": ["convert.json"],
    "simulate": ["simulate.json"],
    "run": ["run.json"],
    "deploy": ["crosscheck.json", "crosscheck.html"],
    "sweep": [
        "sweep.json",
        "results.jsonl",
        "report.html",
        "accuracy_weights_bits.png",
        "tradeoff.png",
    ],
    "finetune": ["network.yaml", "weights.npz", "finetune.json"],
    "fileclass train": ["fileclass.json", "weights.npz"],
    "export": ["model.onnx"],
    "report": ["report.html", "accuracy_weights_bits.png", "tradeoff.png"],
}
MODEL_COMMANDS = ("finetune", "fileclass train")  # refuse any directory of foreign files
COMMANDS = list(OUR_FILES)


@pytest.fixture(scope="module")
def sweep_files(tmp_path_factory) -> dict[str, bytes]:
    """sweep.json and results.jsonl of a tiny sweep, as a user might copy them around."""
    out = tmp_path_factory.mktemp("sweep")
    assert main(command_argv("sweep", out)) == 0
    return {name: (out / name).read_bytes() for name in ("sweep.json", "results.jsonl")}


def user_directory(path: Path, command: str, sweep_files, named_like_ours: bool) -> Path:
    """A directory of a user's files (with a sub-directory); ``named_like_ours``: also
    files with the names ``command`` writes."""
    path.mkdir()
    (path / "notes.txt").write_text("my notes\n")
    (path / "data.csv").write_bytes(os.urandom(300))
    (path / "sub").mkdir()
    (path / "sub" / "network.yaml").write_text("name: mine\n")
    if command == "report":  # report needs a sweep to report on
        for name, data in sweep_files.items():
            (path / name).write_bytes(data)
    if named_like_ours:
        for name in OUR_FILES[command]:
            (path / name).write_bytes(b"the user's own " + name.encode() + b"\n")
        if command != "report":  # (report reads the sweep's own)
            (path / "results.jsonl").write_text('{"point": 0, "seed": 0, "mine": true}\n')
    return path


def snapshot(path: Path) -> dict[str, bytes | None]:
    """Every entry under ``path``: file bytes, or None for a directory."""
    return {
        str(p.relative_to(path)): None if p.is_dir() else p.read_bytes()
        for p in sorted(path.rglob("*"))
    }


def one_line_naming(err: str, path: Path) -> bool:
    return err.count("\n") == 1 and str(path) in err and "Traceback" not in err


@pytest.mark.parametrize("command", COMMANDS)
def test_foreign_files_named_like_ours_are_refused_and_untouched(
    command, tmp_path, capsys, sweep_files
):
    out = user_directory(tmp_path / "mine", command, sweep_files, named_like_ours=True)
    before = snapshot(out)
    assert main(command_argv(command, out)) == 2
    assert one_line_naming(capsys.readouterr().err, out)
    assert snapshot(out) == before  # byte for byte, and nothing added
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no temporaries beside


@pytest.mark.parametrize("command", COMMANDS)
def test_foreign_files_of_other_names_are_left_alone(command, tmp_path, capsys, sweep_files):
    out = user_directory(tmp_path / "mine", command, sweep_files, named_like_ours=False)
    before = snapshot(out)
    code = main(command_argv(command, out))
    err = capsys.readouterr().err
    after = snapshot(out)
    if command in MODEL_COMMANDS:  # a model goes into a new, empty or model directory only
        assert code == 2 and one_line_naming(err, out) and "--force" in err
        assert after == before
        return
    assert code in (0, 1), err  # deploy exits 1 when the cross-check fails
    assert {k: v for k, v in after.items() if k in before} == before
    assert set(OUR_FILES[command]) <= set(after)
    assert set(after) - set(before) <= {*OUR_FILES[command], "heatmap.png", MARKER_FILE, LOCK_FILE}


@pytest.mark.parametrize("command", COMMANDS)
def test_force_writes_ours_beside_the_users_files_and_removes_nothing(
    command, tmp_path, capsys, sweep_files
):
    out = user_directory(tmp_path / "mine", command, sweep_files, named_like_ours=True)
    before = snapshot(out)
    code = main([*command_argv(command, out), "--force"])
    err = capsys.readouterr().err
    assert code in (0, 1), err
    after = snapshot(out)
    overwritten = set(OUR_FILES[command]) | ({"results.jsonl"} if command == "sweep" else set())
    for name, data in before.items():
        assert name in after  # nothing removed
        if name not in overwritten:
            assert after[name] == data, name
    for name in OUR_FILES[command]:
        assert after[name] != before[name], f"{name} was not written"


@pytest.mark.parametrize("command", ["convert", "deploy", "sweep", "finetune", "export"])
def test_rerunning_into_our_own_output_works(command, tmp_path, capsys):
    out = tmp_path / "out"
    if command == "export":
        out.mkdir()
    for _ in range(2):
        assert main(command_argv(command, out)) in (0, 1), capsys.readouterr().err
    capsys.readouterr()
    assert set(OUR_FILES[command]) <= {p.name for p in out.iterdir()}


def test_an_output_directory_written_before_the_marker_counts_as_ours(tmp_path, capsys):
    out = tmp_path / "out"  # e.g. `make run`'s out/ from an earlier version
    out.mkdir()
    (out / "crosscheck.json").write_text("{}\n")
    (out / "crosscheck.html").write_text("<html></html>\n")
    assert main(command_argv("deploy", out)) in (0, 1)
    assert json.loads((out / "crosscheck.json").read_text())["samples"] == 20
    assert owned_names(out) == {"crosscheck.json", "crosscheck.html"}


@pytest.mark.parametrize("command", ["convert", "run", "deploy", "sweep", "finetune"])
def test_out_that_is_a_file_or_lies_under_one_is_one_line(command, tmp_path, capsys):
    file = tmp_path / "file.txt"
    file.write_text("mine\n")
    for out, says in ((file, "is a file"), (file / "sub", "lies under")):
        assert main(command_argv(command, out)) == 2
        err = capsys.readouterr().err
        assert one_line_naming(err, out) and says in err
    assert file.read_text() == "mine\n" and sorted(tmp_path.iterdir()) == [file]


def test_export_under_a_file_or_onto_a_directory_is_one_line(tmp_path, capsys):
    file = tmp_path / "file.txt"
    file.write_text("mine\n")
    (tmp_path / "d.onnx").mkdir()
    for target, says in ((file / "m.onnx", "lies under"), (tmp_path / "d.onnx", "directory")):
        assert main(["export", "digits_mlp", "--onnx", str(target)]) == 2
        err = capsys.readouterr().err
        assert one_line_naming(err, target) and says in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_unwritable_out_is_one_line(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        assert main(command_argv("convert", locked / "out")) == 2
        assert one_line_naming(capsys.readouterr().err, locked / "out")
    finally:
        locked.chmod(0o700)


def test_a_directory_the_user_may_not_write_is_one_line(tmp_path, capsys, monkeypatch):
    import neurodeploy.fileio as fileio

    locked = tmp_path / "locked"  # (as root no directory is unwritable: ask os.access)
    locked.mkdir()
    monkeypatch.setattr(fileio.os, "access", lambda path, mode: Path(path) != locked)
    assert main(command_argv("deploy", locked)) == 2
    err = capsys.readouterr().err
    assert one_line_naming(err, locked) and "not writable" in err
    assert list(locked.iterdir()) == []


def test_save_model_api_follows_the_same_rules(tmp_path):
    net = random_network(3)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "network.yaml").write_text("mine\n")
    (mine / "notes.txt").write_text("notes\n")
    with pytest.raises(nd.UsageError, match="not write"):
        nd.save_model(net, mine)
    assert (mine / "network.yaml").read_text() == "mine\n"
    nd.save_model(net, mine, force=True)  # the model beside the notes, nothing removed
    assert (mine / "notes.txt").read_text() == "notes\n"
    assert nd.load_model(mine).name == net.name
    empty = tmp_path / "empty"
    empty.mkdir()
    assert nd.load_model(nd.save_model(net, empty)).name == net.name
    with pytest.raises(nd.UsageError, match="is a file"):
        nd.save_model(net, mine / "notes.txt")
    assert (mine / "notes.txt").read_text() == "notes\n"


def test_a_foreign_file_named_like_the_marker_is_never_overwritten(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / MARKER_FILE).write_text("my own dot file\n")
    claim_output_dir(out, ["run.json"])  # no file of ours there: may write beside it
    assert (out / MARKER_FILE).read_text() == "my own dot file\n"
    (out / "run.json").write_text("{}")
    with pytest.raises(nd.UsageError, match="run.json"):  # so nothing here counts as ours
        claim_output_dir(out, ["run.json"])


def test_no_recursive_removal_anywhere_in_the_package():
    package = Path(nd.__file__).parent
    offenders = [p for p in package.rglob("*.py") if "rmtree" in p.read_text()]
    assert offenders == []


# -- one writer per directory (issue 18, item 4) --------------------------------------------
@pytest.fixture
def held_lock(tmp_path):
    """The lock of tmp_path/out, held as another process would (its own open file)."""
    import fcntl

    out = tmp_path / "out"
    out.mkdir()
    with open(out / LOCK_FILE, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        yield out


def test_a_sweep_into_a_directory_another_command_writes_is_refused(held_lock, capsys):
    assert main(command_argv("sweep", held_lock)) == 2
    err = capsys.readouterr().err
    assert one_line_naming(err, held_lock) and "another neurodeploy command" in err
    assert sorted(p.name for p in held_lock.iterdir()) == [LOCK_FILE]


def test_a_deploy_waits_for_the_lock_then_gives_up_and_writes_nothing(
    held_lock, capsys, monkeypatch
):
    import neurodeploy.cli as cli

    monkeypatch.setattr(cli, "DEPLOY_LOCK_WAIT_S", 0.3)
    assert main(command_argv("deploy", held_lock)) == 2
    assert one_line_naming(capsys.readouterr().err, held_lock)
    assert sorted(p.name for p in held_lock.iterdir()) == [LOCK_FILE]


def test_a_deploy_writes_both_reports_or_neither(tmp_path, capsys, monkeypatch):
    import neurodeploy.fileio as fileio

    out = tmp_path / "out"
    assert main(command_argv("deploy", out)) in (0, 1)
    before = snapshot(out)
    real = fileio._write_temporary

    def disk_full_at_the_html(path, data):
        if path.name == "crosscheck.html":
            raise OSError(28, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(fileio, "_write_temporary", disk_full_at_the_html)
    with pytest.raises(OSError, match="No space"):
        main([*command_argv("deploy", out), "--seed", "3"])
    assert snapshot(out) == before  # the old pair, and no temporary left
