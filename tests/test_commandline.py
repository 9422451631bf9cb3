"""offload.commandline: the glue every command shares (error lines, torch guard, profile, table)."""

import ast
import errno
import math
import os
import sys

import click
import numpy as np
import pytest
from click.testing import CliRunner

from offload import blob, commandline
from offload.bucket import Bucket
from offload.commandline import (COMMITTED_PROFILE, TORCH_MISSING, check_policy_names,
                                 format_table, require_torch, run_named_policy, select_profile,
                                 user_errors)
from offload.scenario import Scenario, ScenarioError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _refused(exc, **kw):
    """What a command prints when ``exc`` is raised inside ``user_errors(**kw)``."""

    @click.command()
    def cmd():
        with user_errors(**kw):
            raise exc

    return CliRunner().invoke(cmd, [])


@pytest.mark.parametrize("exc, kw, line", [
    (ValueError("--rate 2: rate must be below 1"), {"what": "mdp"},
     "Error: mdp: --rate 2: rate must be below 1"),
    (ScenarioError("rate", "rate=2: not in (0, 1)"), {}, "Error: rate=2: not in (0, 1)"),
    (MemoryError(), {"what": "test streams", "memory_hint": "use fewer streams (--streams)"},
     "Error: test streams: not enough memory; use fewer streams (--streams)"),
    (MemoryError(), {}, "Error: not enough memory"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "/no/such.log"), {},
     "Error: /no/such.log: No such file or directory"),
    (PermissionError(errno.EACCES, "Permission denied"), {}, "Error: I/O: Permission denied"),
    (FileNotFoundError("x.npz: no such file"), {}, "Error: x.npz: no such file"),
    (RuntimeError("no Edge TPU found"), {"refusals": (RuntimeError,)}, "Error: no Edge TPU found"),
])
def test_each_refusal_is_one_error_line(exc, kw, line):
    res = _refused(exc, **kw)
    assert res.exit_code == 1
    assert res.output.splitlines() == [line]  # one line, no traceback


def test_other_errors_are_not_hidden():
    # A bug (here a TypeError) must surface, not be dressed up as the user's fault.
    res = _refused(TypeError("a bug"))
    assert isinstance(res.exception, TypeError)


def test_torch_guard_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
    with pytest.raises(click.ClickException) as info:
        require_torch()
    assert info.value.message == TORCH_MISSING
    assert "pip install torch==2.13.0" in TORCH_MISSING and "offload[training]" in TORCH_MISSING


def test_torch_guard_returns_torch():
    torch = pytest.importorskip("torch")
    assert require_torch() is torch


def test_every_training_command_refuses_without_torch(monkeypatch, tmp_path):
    from training.cli import main

    monkeypatch.setitem(sys.modules, "torch", None)
    for args in (["classifiers"], ["onnx"], ["profile"], ["sweep", "fig5", "--out", str(tmp_path)],
                 ["dqn", "--synthetic", "100"]):
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 1, args
        assert res.output.splitlines() == [f"Error: {TORCH_MISSING}"], args


def test_profile_selection_synthetic_path_and_committed(monkeypatch, tmp_path, capsys):
    prof, label = select_profile(None, synthetic=500, seed=3, announce=True)
    assert (prof.n, label) == (500, "synthetic(500)")
    assert "profile: synthetic (500 images, seed 3)" in capsys.readouterr().err
    path = tmp_path / "p.npz"
    prof.save(path)
    again, label = select_profile(str(path), synthetic=500)  # --profile wins over --synthetic
    assert label == str(path)
    np.testing.assert_array_equal(again.metric, prof.metric)
    monkeypatch.setattr(commandline, "committed_profile", lambda: str(path))
    assert select_profile(None)[1] == COMMITTED_PROFILE
    monkeypatch.setattr(commandline, "committed_profile", lambda: None)
    with pytest.raises(click.ClickException, match="committed artifacts/profile.npz was not found"):
        select_profile(None)
    with pytest.raises(click.ClickException, match="no such file"):
        select_profile(str(tmp_path / "missing.npz"))


def test_table_format():
    rows = [{"policy": "mdp", "avg_loss": 0.123456, "feasible": True},
            {"policy": "a-long-name", "avg_loss": math.nan, "feasible": False}]
    assert format_table(rows, ["policy", "avg_loss", "feasible"]) == [
        "policy       avg_loss  feasible",
        "mdp          0.1235    True    ",
        "a-long-name  n/a       False   ",
    ]


def test_policy_words(tmp_path):
    (tmp_path / "p.bin").write_bytes(b"")
    check_policy_names(["mdp", str(tmp_path / "p.bin")], ("mdp", "baseline"))  # a name, a file
    for word in ("mpd", str(tmp_path)):  # neither a name nor a file (a folder)
        with pytest.raises(click.ClickException,
                           match=r"--policy '.*': neither one of mdp, baseline nor an existing"):
            check_policy_names([word], ("mdp", "baseline"))


def test_blob_for_another_bucket_is_refused(tmp_path):
    sc = Scenario(rate=0.1, depth=4)
    other = Bucket.from_rate(0.2, 2)
    assert other != sc.bucket
    path = tmp_path / "p.bin"
    blob.write_blob(path, blob.Policy("thresholds", *other, 0.0, 1.0, np.array([0.0, 1.0]),
                                      np.array([0.0, 1.0]), theta=np.zeros(other.M - other.P + 1)))
    with pytest.raises(click.ClickException) as info:
        run_named_policy(str(path), None, sc, thresholds={})
    assert f"{path}: policy was made for bucket (N, P, M) = ({other.N}, {other.P}, {other.M})" \
        in info.value.message
    assert "r=0.1, b=4" in info.value.message


def test_nothing_imports_the_sim_command():
    # offload/cli.py is only offload-sim: the entry point is its one user.
    users = []
    for top in ("offload", "training", "firmware", "tools"):
        for folder, _, files in os.walk(os.path.join(ROOT, top)):
            for name in files:
                if not name.endswith(".py"):
                    continue
                path = os.path.join(folder, name)
                with open(path) as f:
                    tree = ast.parse(f.read())
                for node in ast.walk(tree):
                    mods = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                            [node.module] if isinstance(node, ast.ImportFrom) else [])
                    if "offload.cli" in mods or (isinstance(node, ast.ImportFrom)
                                                 and node.module == "offload"
                                                 and any(a.name == "cli" for a in node.names)):
                        users.append(path)
    assert users == []
