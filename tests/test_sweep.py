"""Evaluation sweeps (training.sweep, ``offload-train sweep``), their figures and traces.

Every sweep here runs at the ``smoke`` scale (a few seconds per point) on a
small synthetic profile saved to a temporary folder.
"""

import csv
import json
import os
import tempfile

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("torch")
pytest.importorskip("matplotlib")

from offload import blob  # noqa: E402
from offload.synthetic import synthetic_profile  # noqa: E402
from training import dqn  # noqa: E402
from training import figures as F  # noqa: E402
from training import grid as G  # noqa: E402
from training import sweep as S  # noqa: E402
from training.cli import main  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"
TWO_DEPTHS = """
title = "two depths"
[base]
rate = 0.1
choice = "location-reset"
sp = 0.1
rprob = 0.01
T = 9
[axes]
depth = [2, 4]
"""


def _cli(args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)


def _rows(out):
    with open(os.path.join(out, "results.csv"), newline="") as f:
        return list(csv.DictReader(f))


def _one_error_line(res):
    assert res.exit_code == 1, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    lines = [ln for ln in res.output.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1 and "Traceback" not in res.output, res.output
    return lines[0]


@pytest.fixture(scope="module")
def prof():
    return synthetic_profile(4000, seed=3)


@pytest.fixture(scope="module")
def profile_file(prof, tmp_path_factory):
    path = tmp_path_factory.mktemp("prof") / "p.npz"
    prof.save(str(path))
    return str(path)


def _grid_file(folder, text=TWO_DEPTHS, name="g.toml"):
    path = os.path.join(folder, name)
    with open(path, "w") as f:
        f.write(text)
    return path


@pytest.fixture(scope="module")
def two_point_sweep(profile_file, tmp_path_factory):
    """A two-point grid run end to end in two local worker processes."""
    folder = str(tmp_path_factory.mktemp("sweep"))
    out = os.path.join(folder, "out")
    res = _cli(["sweep", _grid_file(folder), "--out", out, "--scale", "smoke", "--profile",
                profile_file, "--workers", "2", "--quiet"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    return out, res


# --------------------------------------------------------------------------- end to end


def test_two_point_grid_end_to_end(two_point_sweep):
    out, res = two_point_sweep
    assert "2 of 2 points finished" in res.output and "2 process(es)" in res.output
    rows = _rows(out)
    assert len(rows) == 2 * len(S.POLICIES)
    assert {r["status"] for r in rows} == {"done"}
    assert sorted({r["depth"] for r in rows}) == ["2.0", "4.0"]
    assert [r["policy"] for r in rows[:len(S.POLICIES)]] == list(S.POLICIES)
    assert "belief" in S.POLICIES and "share_of_belief_gain" in S.TABLE_COLUMNS
    for r in rows:
        assert r["rate"] == "0.1" and r["T"] == "9" and r["choice"] == "location-reset"
        assert float(r["avg_loss"]) > 0 and float(r["seconds"]) > 0
        assert 0 < float(r["train_seconds"]) < float(r["seconds"]) and r["stopped_by"]
        assert r["share_of_belief_gain"] != "" and "stream_reward" not in r
    ceiling = [r for r in rows if r["policy"] == "ceiling"]
    assert all(float(r["share_of_ceiling_gain"]) == 1.0 for r in ceiling)
    belief = [r for r in rows if r["policy"] == "belief"]
    assert len(belief) == 2 and all(float(r["share_of_belief_gain"]) == 1.0 for r in belief)
    assert all(float(r["share_of_belief_gain"]) == 0.0 for r in rows if r["policy"] == "baseline")
    doc = json.loads(open(os.path.join(out, "results.json")).read())
    assert doc["points"] == {"total": 2, "done": 2, "failed": 0}
    assert doc["scale"] == "smoke" and len(doc["rows"]) == 2 * len(S.POLICIES)
    # results.json's rows carry each policy's reward on each test stream (paired errors)
    assert all(len(r["stream_reward"]) == 2 for r in doc["rows"])
    assert doc["parts"][0]["x"] == "depth" and len(doc["parts"][0]["points"]) == 2
    for pid in {r["point"] for r in rows}:
        assert pid.startswith("r0.1-b") and "T9" in pid
        rec = json.loads(open(os.path.join(out, "points", pid + ".json")).read())
        assert rec["status"] == "done" and rec["point"]["id"] == pid
        pol = blob.read_blob(os.path.join(out, "points", pid + ".bin"))
        assert pol.kind == "dqn" and pol.T == 9 and pol.meta["point"] == pid
    # no temporary files left behind by the atomic writes
    assert not [n for n in os.listdir(os.path.join(out, "points")) if n.startswith(".")]


def test_rerun_skips_finished_points(two_point_sweep, profile_file, monkeypatch):
    out, _ = two_point_sweep
    monkeypatch.setattr(dqn, "train_policy",
                        lambda *a, **kw: pytest.fail("a finished point was retrained"))
    grid = os.path.join(os.path.dirname(out), "g.toml")
    res = _cli(["sweep", grid, "--out", out, "--scale", "smoke", "--profile", profile_file,
                "--workers", "1", "--quiet"])
    assert res.exit_code == 0, res.output
    assert "2 already finished, 0 to run" in res.output


def test_resume_after_an_interruption(profile_file, tmp_path, monkeypatch):
    grid = _grid_file(str(tmp_path), TWO_DEPTHS.replace("[2, 4]", "[2, 3, 4]"))
    out = str(tmp_path / "out")
    real, calls = dqn.train_policy, []

    def ctrl_c_on_the_second_point(*args, **kw):
        calls.append(args[1].depth)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(dqn, "train_policy", ctrl_c_on_the_second_point)
    res = _cli(["sweep", grid, "--out", out, "--scale", "smoke", "--profile", profile_file,
                "--workers", "1", "--quiet"])
    assert res.exit_code == 130, res.output
    assert "interrupted" in res.output and "1 of 3 points finished" in res.output
    first = [r for r in _rows(out)]
    assert len({r["point"] for r in first}) == 1 and first[0]["depth"] == "2.0"
    pid = first[0]["point"]
    stamp = os.stat(os.path.join(out, "points", pid + ".json")).st_mtime_ns

    calls.clear()
    monkeypatch.setattr(dqn, "train_policy",
                        lambda *a, **kw: (calls.append(a[1].depth), real(*a, **kw))[1])
    res = _cli(["sweep", grid, "--out", out, "--scale", "smoke", "--profile", profile_file,
                "--workers", "1", "--quiet"])
    assert res.exit_code == 0, res.output
    assert sorted(calls) == [3.0, 4.0]  # the finished point was not recomputed
    assert os.stat(os.path.join(out, "points", pid + ".json")).st_mtime_ns == stamp
    rows = _rows(out)
    assert len(rows) == 3 * len(S.POLICIES) and {r["status"] for r in rows} == {"done"}
    assert sorted({r["depth"] for r in rows}) == ["2.0", "3.0", "4.0"]


def test_failing_point_is_recorded_and_the_sweep_goes_on(profile_file, tmp_path, monkeypatch):
    grid = _grid_file(str(tmp_path))
    out = str(tmp_path / "out")
    real = dqn.train_policy

    def fail_at_depth_4(data, scenario, config, prof, **kw):
        if scenario.depth == 4:
            raise RuntimeError("simulated trainer failure")
        return real(data, scenario, config, prof, **kw)

    monkeypatch.setattr(dqn, "train_policy", fail_at_depth_4)
    res = _cli(["sweep", grid, "--out", out, "--scale", "smoke", "--profile", profile_file,
                "--workers", "1", "--quiet"])
    line = _one_error_line(res)
    assert "1 point(s) failed" in line
    rows = _rows(out)
    failed = [r for r in rows if r["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["depth"] == "4.0"
    assert "RuntimeError: simulated trainer failure" in failed[0]["error"]
    assert len([r for r in rows if r["status"] == "done"]) == len(S.POLICIES)
    rec = json.loads(open(os.path.join(out, "points", failed[0]["point"] + ".json")).read())
    assert rec["status"] == "failed" and "simulated" in rec["error"]
    # the next run retries the failed point only
    monkeypatch.setattr(dqn, "train_policy", real)
    res = _cli(["sweep", grid, "--out", out, "--scale", "smoke", "--profile", profile_file,
                "--workers", "1", "--quiet"])
    assert res.exit_code == 0, res.output
    assert "1 already finished, 1 to run" in res.output
    assert {r["status"] for r in _rows(out)} == {"done"}


# --------------------------------------------------------------------------- grids


def test_ready_made_grids_follow_the_paper():
    for name in S.GRIDS:
        for scale in ("smoke", "quick", "paper"):
            pts = S.points(S.ready_grid(name, scale))
            assert pts and len({p.id for p in pts}) == len(pts)
            for p in pts:
                S.scale_config(scale, p)
    fig6 = S.points(S.ready_grid("fig6", "paper"))
    assert {p.params["rate"] for p in fig6} == {0.05, 0.1, 0.25}
    assert sorted({p.params["depth"] for p in fig6})[::len(G.DEPTHS_PAPER) - 1] == [1.0, 20.0]
    assert {(p.params["sp"], p.params["rprob"], p.params["choice"]) for p in fig6} == {
        (0.1, 0.1, "location-reset")}
    fig8 = S.points(S.ready_grid("fig8", "paper"))
    assert {round(p.params["tprob1"] / p.params["tprob2"], 9) for p in fig8} == {2.0, 4.0}
    assert all(p.params["interarrival"] and p.params["choice"] == "iid" for p in fig8)
    fig12 = S.points(S.ready_grid("fig12", "paper"))
    assert [p.params["T"] for p in fig12] == [2, 4, 8, 16, 32, 64, 128]
    fig11 = S.points(S.ready_grid("fig11", "quick"))
    assert {(p.params["train_choice"], p.params["interarrival"]) for p in fig11} == {
        ("location-reset", True), ("iid", True), ("location-reset", False), ("iid", False)}
    assert S.scale_config("paper", fig12[0]).iterations == 4000
    assert S.scale_config("quick", fig12[0]).time_limit == 240


def test_toml_grid_parts_and_derived_settings(tmp_path):
    path = _grid_file(str(tmp_path), """
title = "arrivals"
[base]
choice = "iid"
arrivals = "markov"
I1 = 1
layers = 3
[[part]]
name = "slow"
x = "tprob1"
logx = true
base = {I2 = 3, tprob_ratio = 2}
axes = {tprob1 = [0.001, 0.01]}
[[part]]
name = "slower"
base = {I2 = 6, tprob_ratio = 4}
axes = {tprob1 = [0.001, 0.01], width = [16, 32]}
""")
    g = S.load_toml(path)
    assert [p.name for p in g.parts] == ["slow", "slower"] and g.parts[0].logx == 10
    assert g.parts[1].x == "width"  # the longest axis, the last one on a tie
    pts = S.points(g, seed=5)
    assert len(pts) == 6
    assert pts[0].params["tprob2"] == pytest.approx(0.0005) and pts[0].params["seed"] == 5
    assert all(p.config["layers"] == 3 for p in pts) and pts[-1].config["width"] == 32
    assert S.scale_config("smoke", pts[-1]).layers == 3
    assert S.points(g, seed=5)[0].id == pts[0].id  # stable


@pytest.mark.parametrize("text, match", [
    ("[base]\nrate = 0.1\nbogus = 1\n[axes]\ndepth = [2]\n", "unknown setting 'bogus'"),
    ("colour = 1\n[axes]\ndepth = [2]\n", "unknown key.*colour"),
    ("[axes]\ndepth = [2]\nwidht = [3]\n", "unknown setting 'widht'"),
    ("[base]\nrate = \"fast\"\n", "rate = 'fast' is a str"),
    ("[base]\nrate = 1.5\n", "rate = 1.5: must be token rate"),
    ("[base]\nT = true\n", "T = True"),
    ("[axes]\ndepth = 4\n", "depth must be a non-empty list"),
    ("[axes]\ndepth = []\n", "depth must be a non-empty list"),
    ("[axes]\ndepth = [2, 2]\n", "lists a value twice"),
    ("[base]\ndepth = 4\n[axes]\ndepth = [2]\n", "both fixed in base and swept"),
    ("[axes]\ndepth = [2]\n[plot]\nx = \"rate\"\n", "x = 'rate' is not one of its axes"),
    ("[axes]\ndepth = [2]\n[[part]]\naxes = {rate = [0.1]}\n", "either \\[axes\\]"),
    ("[base]\narrivals = \"markov\"\ntprob1 = 0.9\ntprob_ratio = 0.5\n", "outside \\(0, 1\\]"),
    ("[base]\narrivals = \"markov\"\nI1 = 1000\nI2 = 1000\ntprob1 = 1.0\ntprob2 = 1.0\n"
     "[axes]\nrate = [0.1]\n", "rate = 0.1: no image can ever arrive"),
    ("[base]\ndepth = 0.5\n", "depth = 0.5"),
    ("[axes]\nlr = [-1.0]\n", "lr=-1.0"),
    ("[base\nrate = 1\n", "not valid TOML"),
])
def test_toml_errors_name_the_problem(tmp_path, text, match):
    path = _grid_file(str(tmp_path), text)
    with pytest.raises(S.GridError, match=match):
        g = S.load_toml(path)
        for p in S.points(g):
            S.scale_config("smoke", p)
    # the command says the same in one line, before any work
    res = _cli(["sweep", path, "--out", str(tmp_path / "o"), "--scale", "smoke"])
    assert "g.toml" in _one_error_line(res)
    assert not (tmp_path / "o").exists()


def test_unknown_grid_and_missing_file(tmp_path):
    line = _one_error_line(_cli(["sweep", "fig99", "--out", str(tmp_path / "o")]))
    assert "fig99" in line and "fig5" in line
    line = _one_error_line(_cli(["sweep", str(tmp_path / "none.toml"), "--out",
                                 str(tmp_path / "o")]))
    assert "no such grid file" in line


def test_another_profile_in_the_same_folder_is_refused(two_point_sweep, tmp_path, prof):
    out, _ = two_point_sweep
    other = tmp_path / "other.npz"
    synthetic_profile(3000, seed=9).save(str(other))
    grid = os.path.join(os.path.dirname(out), "g.toml")
    line = _one_error_line(_cli(["sweep", grid, "--out", out, "--scale", "smoke", "--profile",
                                 other, "--quiet"]))
    assert "another profile" in line


# --------------------------------------------------------------------------- profiles


def _mdp_layout(prof, path):
    np.savez(path, wlogit=prof.weak_logits, gt=prof.labels, wrank=prof.weak_rank,
             srank=prof.strong_rank, split=prof.split)


def _dqn_layout(prof, path):
    tr, ts = prof.split != 2, prof.split == 2  # the layout has training and test only
    np.savez(path, metric_tr=prof.metric[tr], metric_ts=prof.metric[ts],
             wcost_tr=prof.weak_loss[tr], wcost_ts=prof.weak_loss[ts],
             scost_tr=prof.strong_loss[tr], scost_ts=prof.strong_loss[ts])


@pytest.mark.parametrize("layout", ["mdp", "dqn"])
def test_published_profile_layouts_through_profile(prof, tmp_path, layout):
    path = tmp_path / f"{layout}_layout.npz"
    (_mdp_layout if layout == "mdp" else _dqn_layout)(prof, path)
    grid = _grid_file(str(tmp_path), TWO_DEPTHS.replace("[2, 4]", "[4]"))
    out = tmp_path / "out"
    res = _cli(["sweep", grid, "--out", out, "--scale", "smoke", "--profile", path,
                "--workers", "1", "--quiet"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    rows = _rows(out)
    assert len(rows) == len(S.POLICIES) and {r["status"] for r in rows} == {"done"}
    rec = json.loads(open(os.path.join(out, "points", rows[0]["point"] + ".json")).read())
    assert rec["profile"]["source"].startswith(f"{layout}:")
    if layout == "dqn":  # no validation split in this layout: a share of training is held out
        assert "held out" in rec["profile"]["validation_from"]
    meta = json.loads(open(os.path.join(out, "sweep.json")).read())
    assert meta["profile"] == str(path)


# --------------------------------------------------------------------------- Ray


def test_ray_path_on_a_local_cluster(profile_file, tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    # Ray puts the driver's working directory first on its workers' sys.path; from a
    # checkout that would be the source tree, whose offload_native has no compiled core.
    monkeypatch.chdir(tmp_path)
    # A short folder: Ray's socket paths must stay under the OS limit.
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    ctx = ray.init(num_cpus=2, include_dashboard=False, _temp_dir=ray_tmp,
                   log_to_driver=False, configure_logging=False)
    try:
        grid = _grid_file(str(tmp_path))
        out = tmp_path / "out"
        res = _cli(["sweep", grid, "--out", out, "--scale", "smoke", "--profile", profile_file,
                    "--ray", ctx.address_info["gcs_address"], "--quiet"])
        assert res.exit_code == 0, res.output + repr(res.exception)
        assert "on Ray at" in res.output
        rows = _rows(out)
        assert len(rows) == 2 * len(S.POLICIES) and {r["status"] for r in rows} == {"done"}
    finally:
        ray.shutdown()


def test_ray_not_installed_is_one_error_line(profile_file, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    grid = _grid_file(str(tmp_path))
    line = _one_error_line(_cli(["sweep", grid, "--out", tmp_path / "out", "--scale", "smoke",
                                 "--profile", profile_file, "--ray", "auto", "--quiet"]))
    assert "pip install 'offload[ray]'" in line


# --------------------------------------------------------------------------- figures


def _fake_rows():
    """A two-part table like fig5's, without training anything."""
    rows, parts = [], [{"name": "spread", "x": "sp", "logx": 0, "points": []},
                       {"name": "reset probability", "x": "rprob", "logx": 10, "points": []}]
    base = dict(rate=0.1, depth=4.0, choice="location-reset", arrivals="periodic", I1=1, I2=10,
                tprob1=0.1, tprob2=0.1, T=97, interarrival=False, train_choice="location-reset",
                seed=0, status="done")
    grid = [(0, sp, rp) for rp in (0.1, 0.01) for sp in (0.1, 0.5, 1.0)]
    grid += [(1, sp, rp) for sp in (0.1, 0.2) for rp in (0.001, 0.01, 0.1, 1.0)]
    for part, sp, rp in grid:
        pid = f"sp{sp}-rp{rp}"
        parts[part]["points"].append(pid)
        if any(r["point"] == pid for r in rows):  # a point two parts share: one set of rows
            continue
        for i, pol in enumerate(S.POLICIES):
            rows.append({**base, "point": pid, "sp": sp, "rprob": rp, "policy": pol,
                         "avg_loss": 0.2 + 0.01 * i + 0.001 * sp})
    rows.append({**base, "point": "bad", "status": "failed", "policy": "", "avg_loss": None})
    return rows, {"grid": "fig5", "title": "Fig. 5", "parts": parts}


def test_results_figures_one_line_per_policy_and_a_panel_per_facet():
    rows, meta = _fake_rows()
    figs = F.results_figures(rows, meta)
    assert [n for n, _ in figs] == ["spread", "reset-probability"]
    spread, reset = figs[0][1], figs[1][1]
    assert len(spread.axes) == 2 and len(reset.axes) == 2  # rprob 0.1, 0.01 / sp 0.1, 0.2
    labels = [ln.get_label() for ln in spread.axes[0].get_lines()]
    assert labels == ["DQN", "MDP", "Baseline", "Lower bound", "Oracle (metric)",
                      "Belief (history + generator model)", "Ceiling (knows hidden state)"]
    assert list(spread.axes[0].get_lines()[0].get_xdata()) == [0.1, 0.5, 1.0]
    assert reset.axes[0].get_xscale() == "log"
    with_oracle = F.results_figures(rows, meta, oracle=True)[0][1]
    assert "Oracle (true rewards)" in [ln.get_label() for ln in with_oracle.axes[0].get_lines()]
    # a CSV table has no parts: the setting with most values is x, the others facets
    csv_figs = F.results_figures(rows, {})
    assert len(csv_figs) == 1 and csv_figs[0][1].axes[0].get_xlabel() == "sub-sequence spread sp"
    # a setting derived from x and the facets (tprob2 = tprob1 / ratio) adds no panels
    derived = [{**r, "tprob1": r["rprob"], "tprob2": r["rprob"] / (2 if r["sp"] < 0.3 else 4)}
               for r in rows if r["status"] == "done"]
    assert len(F.facet_keys(derived, "tprob1", ["sp", "tprob1", "tprob2"])) == 1


def test_results_figures_of_a_table_without_the_belief_policy(tmp_path):
    """Sweeps written before the belief policy: no belief rows, no share or training columns."""
    rows, meta = _fake_rows()
    old = [{k: v for k, v in r.items() if k not in ("share_of_belief_gain", "train_seconds",
                                                     "stopped_by", "stream_reward")}
           for r in rows if r.get("policy") != "belief"]
    labels = [ln.get_label() for ln in F.results_figures(old, meta)[0][1].axes[0].get_lines()]
    assert "Belief (history + generator model)" not in labels
    assert labels[-1] == "Ceiling (knows hidden state)"
    # result columns that differ between points (training time, what stopped it) are no facets
    timed = [{**r, "train_seconds": 100.0 + i, "stopped_by": f"reason {i % 3}",
              "stream_reward": [0.1, 0.2]} for i, r in enumerate(rows)]
    meta_cols = {**meta, "columns": list(timed[0])}
    assert [len(f.axes) for _, f in F.results_figures(timed, meta_cols)] == [2, 2]
    assert (len(F.results_figures(timed, {})[0][1].axes)
            == len(F.results_figures(rows, {})[0][1].axes))
    # and through the command, from an old results.json
    path = tmp_path / "old" / "results.json"
    path.parent.mkdir()
    path.write_text(json.dumps({**meta, "rows": old}))
    res = _cli(["plot", path.parent, "--out", tmp_path / "figs"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert len(list((tmp_path / "figs").iterdir())) == 2
    res = _cli(["table", path])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "### fig5: spread" in res.output and "| - |" in res.output


def test_table_command_on_a_sweep(two_point_sweep):
    out, _ = two_point_sweep
    res = _cli(["table", out])
    assert res.exit_code == 0, res.output + repr(res.exception)
    lines = res.output.splitlines()
    head = [c.strip() for c in next(ln for ln in lines if ln.startswith("| b |")).split("|")]
    body = [[c.strip() for c in ln.split("|")] for ln in lines
            if ln.startswith("| 2 |") or ln.startswith("| 4 |")]
    assert len(body) == 2
    for cells in body:
        row = dict(zip(head, cells))
        assert row["belief share"].endswith("%") and row["DQN / belief"].endswith("%")
        assert row["MDP - DQN"].endswith(" SE)") and row["training s"] != "-"


def test_plot_command_writes_pngs(two_point_sweep, tmp_path):
    out, _ = two_point_sweep
    for src in (out, os.path.join(out, "results.csv")):
        res = _cli(["plot", src, "--out", tmp_path / "figs"])
        assert res.exit_code == 0, res.output + repr(res.exception)
        pngs = sorted((tmp_path / "figs").iterdir())
        assert pngs and all(p.read_bytes()[:8] == PNG for p in pngs)
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    assert "not a sweep results table" in _one_error_line(_cli(["plot", bad, "--out",
                                                                tmp_path / "f2"]))


def test_trace_of_a_sweep_policy_against_mdp(two_point_sweep, profile_file, tmp_path):
    out, _ = two_point_sweep
    pid = [r["point"] for r in _rows(out) if r["depth"] == "4.0"][0]
    png = tmp_path / "trace.png"
    res = _cli(["trace", "--profile", profile_file, "--rprob", "0.01", "--length", "1500",
                "--window", "200", "--policy", f"DQN={out}/points/{pid}.bin", "--policy", "mdp",
                "--out", png])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert png.read_bytes()[:8] == PNG
    res = _cli(["trace", "--profile", profile_file, "--depth", "2", "--policy",
                f"{out}/points/{pid}.bin", "--policy", "mdp", "--out", tmp_path / "x.png"])
    assert "made for bucket" in _one_error_line(res)


def test_trace_defaults_mdp_against_baseline(tmp_path):
    out = tmp_path / "trace.png"
    res = _cli(["trace", "--synthetic", "2000", "--length", "1500", "--window", "120",
                "--arrivals", "markov", "--markov", "1", "3", "0.01", "0.005", "--out", out])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert out.read_bytes()[:8] == PNG
    assert "wrote" in res.output
    res = _cli(["trace", "--synthetic", "2000", "--length", "100", "--window", "120", "--out",
                tmp_path / "x.png"])
    assert "longer than --length" in _one_error_line(res)
    assert not (tmp_path / "x.png").exists()
    res = _cli(["trace", "--synthetic", "2000", "--policy", "mdp", "--out", tmp_path / "y.png"])
    assert "give two policies" in _one_error_line(res)


def test_trace_window_choice():
    a = np.zeros(100, np.uint8)
    b = np.zeros(100, np.uint8)
    a[60:70] = 1  # a offloads 10 more inside 55..74
    b[10:13] = 1
    assert F.busiest_window(a, b, 20) in range(50, 61)
    assert F.busiest_window(b, a, 20) in range(50, 61)  # the sign does not matter
