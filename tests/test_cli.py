"""offload-sim end to end through click's test runner, on small synthetic profiles."""

import csv
import json
import math
import os

import numpy as np
import pytest
from click.testing import CliRunner

from offload import blob
from offload.bucket import scale
from offload.cli import BUILTIN, sim_main
from offload.profile import Profile
from offload.synthetic import synthetic_profile

SMALL = ["--synthetic", "2000", "--length", "500", "--streams", "3"]
COLS = ["policy", "avg_loss", "mean_reward", "offload_rate", "share_of_oracle_gain",
        "share_of_oracle-metric_gain", "feasible"]


def run(*args):
    return CliRunner().invoke(sim_main, [str(a) for a in args], catch_exceptions=True)


def ok(*args):
    res = run(*args)
    assert res.exit_code == 0, res.output + repr(res.exception)
    return res


def table(stdout):
    """The printed table as {policy: {column: text}}."""
    lines = [ln.split() for ln in stdout.strip().splitlines()]
    assert lines[0] == COLS
    return {row[0]: dict(zip(COLS, row)) for row in lines[1:]}


def failed(res, *needles):
    """A clean failure: non-zero exit, the message on stderr, no traceback."""
    assert res.exit_code != 0
    assert isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output
    assert "Error:" in res.stderr
    for n in needles:
        assert n in res.stderr, res.stderr
    return res.stderr


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("sim")
    res = ok(*SMALL, "--json", d / "t.json", "--csv", d / "t.csv", "--write-blob", "mdp",
             d / "mdp.blob", "--write-blob", "baseline", d / "base.blob")
    return res, d


def test_table_has_every_default_policy(default_run):
    res, _ = default_run
    rows = table(res.stdout)
    assert list(rows) == list(BUILTIN)
    assert rows["lower-bound"]["feasible"] == "False"
    assert all(rows[p]["feasible"] == "True" for p in BUILTIN if p != "lower-bound")
    # progress and settings go to stderr, the table alone to stdout
    assert "(N, P, M) = (1, 10, 40)" in res.stderr
    assert "3 streams x 500 images, location-reset, periodic arrivals" in res.stderr


def test_json_and_csv_agree(default_run):
    res, d = default_run
    js = json.loads((d / "t.json").read_text())
    with open(d / "t.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    printed = table(res.stdout)
    assert [r["policy"] for r in js["results"]] == [r["policy"] for r in rows] == list(BUILTIN)
    assert js["bucket"] == {"rate": 0.1, "depth": 4.0, "N": 1, "P": 10, "M": 40}
    assert js["streams"]["count"] == 3 and js["streams"]["length"] == 500
    assert js["streams"]["choice"] == "location-reset" and js["streams"]["arrivals"] == "periodic"
    for j, c in zip(js["results"], rows):
        assert set(c) == set(COLS)
        for col in COLS[1:-1]:
            jv = j[col]
            cv = float(c[col])
            if jv is None:
                assert math.isnan(cv)
            else:
                assert cv == pytest.approx(jv, rel=1e-12, abs=1e-15)
                # the printed table shows the same numbers to 4 decimals
                assert printed[j["policy"]][col] == f"{jv:.4f}"
        assert c["feasible"] == str(j["feasible"])


def test_outputs_get_the_usual_file_mode(default_run):
    _, d = default_run
    umask = os.umask(0)
    os.umask(umask)
    for name in ("t.json", "t.csv"):
        assert (d / name).stat().st_mode & 0o777 == 0o666 & ~umask
    assert not [p for p in d.iterdir() if p.name.startswith(".tmp-")]


def test_json_numbers_are_consistent(default_run):
    _, d = default_run
    res = {r["policy"]: r for r in json.loads((d / "t.json").read_text())["results"]}
    base, orc, orm = res["baseline"], res["oracle"], res["oracle-metric"]
    # avg_loss + mean_reward is the mean weak loss, the same for every policy
    weak = {round(r["avg_loss"] + r["mean_reward"], 12) for r in res.values()}
    assert len(weak) == 1 and 0 < weak.pop() < 1
    for r in res.values():
        assert r["share_of_oracle_gain"] == pytest.approx(
            (r["mean_reward"] - base["mean_reward"]) / (orc["mean_reward"] - base["mean_reward"]))
        assert r["share_of_oracle-metric_gain"] == pytest.approx(
            (r["mean_reward"] - base["mean_reward"]) / (orm["mean_reward"] - base["mean_reward"]))
        if r["feasible"]:
            assert r["mean_reward"] <= orc["mean_reward"] + 1e-12
        assert 0 <= r["offload_rate"] <= 1
    assert base["share_of_oracle_gain"] == 0 and orc["share_of_oracle_gain"] == 1
    assert orm["share_of_oracle-metric_gain"] == 1


def test_written_mdp_blob_reproduces_the_mdp_row(default_run):
    _, d = default_run
    rows = {r["policy"]: r for r in json.loads((d / "t.json").read_text())["results"]}
    pol = blob.read_blob(d / "mdp.blob")
    assert pol.kind == "thresholds" and (pol.N, pol.P, pol.M) == (1, 10, 40)
    assert pol.meta["name"] == "mdp" and pol.meta["rate"] == 0.1
    assert np.all(np.diff(pol.theta) <= 0)  # MDP thresholds fall as tokens pile up
    base = blob.read_blob(d / "base.blob")
    assert np.all(base.theta == base.theta[0])  # Baseline: one threshold for every n
    again = ok(*SMALL, "--policy", "mdp", "--policy", d / "mdp.blob", "--policy", d / "base.blob",
               "--json", d / "again.json")
    got = {r["policy"]: r for r in json.loads((d / "again.json").read_text())["results"]}
    for key in ("mean_reward", "avg_loss", "offload_rate", "share_of_oracle_gain"):
        assert got[str(d / "mdp.blob")][key] == rows["mdp"][key]
        assert got["mdp"][key] == rows["mdp"][key]
        assert got[str(d / "base.blob")][key] == rows["baseline"][key]
    # only the asked-for policies are printed
    assert list(table(again.stdout)) == ["mdp", str(d / "mdp.blob"), str(d / "base.blob")]


def test_saved_profile_gives_the_same_results(tmp_path, default_run):
    _, d = default_run
    synthetic_profile(2000, seed=0).save(tmp_path / "p.npz")
    ok("--profile", tmp_path / "p.npz", "--length", 500, "--streams", 3, "--json",
       tmp_path / "p.json")
    want = json.loads((d / "t.json").read_text())["results"]
    got = json.loads((tmp_path / "p.json").read_text())["results"]
    assert got == want


def test_unfitted_profile_is_fitted_on_load(tmp_path):
    prof = synthetic_profile(2000, seed=1)
    raw = Profile(prof.weak_loss, prof.strong_loss, prof.split, k=prof.k,
                  weak_rank=prof.weak_rank, strong_rank=prof.strong_rank,
                  weak_logits=prof.weak_logits, labels=prof.labels)
    raw.save(tmp_path / "raw.npz")
    prof.save(tmp_path / "fit.npz")
    args = ["--length", 300, "--streams", 2, "--seed", 1, "--policy", "baseline",
            "--policy", "mdp"]
    a = ok("--profile", tmp_path / "raw.npz", *args)
    b = ok("--profile", tmp_path / "fit.npz", *args)
    assert a.stdout == b.stdout


def test_published_layouts_run(tmp_path):
    """--profile takes the MDP and DQN papers' files as they are, told apart by their keys."""
    prof = synthetic_profile(2000, seed=3)
    rng = np.random.default_rng(0)
    folds = rng.integers(0, 3, prof.n)
    np.savez(tmp_path / "mdp.npz", wlogit=prof.weak_logits, gt=prof.labels,
             wrank=prof.weak_rank, srank=prof.strong_rank, split=folds)
    tr, ts = prof.split != 2, prof.split == 2
    np.savez(tmp_path / "dqn.npz", metric_tr=prof.metric[tr], metric_ts=prof.metric[ts],
             wcost_tr=prof.weak_loss[tr], wcost_ts=prof.weak_loss[ts],
             scost_tr=prof.strong_loss[tr], scost_ts=prof.strong_loss[ts])
    for name in ("mdp.npz", "dqn.npz"):
        res = ok("--profile", tmp_path / name, "--length", 300, "--streams", 2)
        assert list(table(res.stdout)) == list(BUILTIN)
    np.savez(tmp_path / "other.npz", logits=np.zeros((3, 2)))
    msg = failed(run("--profile", tmp_path / "other.npz"), "other.npz", "unknown profile layout")
    assert "wlogit" in msg and "metric_tr" in msg and "weak_loss" in msg


def test_ceiling_on_request(tmp_path):
    """--policy ceiling adds the structure-aware ceiling and every row's share of its gain."""
    res = ok(*SMALL, "--choice", "location-reset", "--rprob", 0.02, "--policy", "baseline",
             "--policy", "mdp", "--policy", "ceiling", "--json", tmp_path / "c.json")
    header = res.stdout.splitlines()[0].split()
    assert "share_of_ceiling_gain" in header
    rows = {r["policy"]: r for r in json.loads((tmp_path / "c.json").read_text())["results"]}
    assert list(rows) == ["baseline", "mdp", "ceiling"]
    assert rows["ceiling"]["share_of_ceiling_gain"] == pytest.approx(1.0)
    assert rows["baseline"]["share_of_ceiling_gain"] == 0.0
    assert "share_of_ceiling_gain" not in table_cols(ok(*SMALL, "--policy", "mdp").stdout)


def table_cols(stdout):
    return stdout.splitlines()[0].split()


def test_markov_arrivals_run(tmp_path):
    res = ok(*SMALL, "--arrivals", "markov", "--markov", 1, 4, 0.05, 0.05, "--choice", "iid",
             "--json", tmp_path / "m.json")
    assert "markov arrivals (mean" in res.stderr
    mean = float(res.stderr.split("markov arrivals (mean ")[1].split()[0])
    assert 1 < mean < 4
    js = json.loads((tmp_path / "m.json").read_text())
    assert js["streams"]["arrivals"] == "markov" and js["streams"]["markov"] == [1, 4, 0.05, 0.05]
    assert list(table(res.stdout)) == list(BUILTIN)
    rows = {r["policy"]: r for r in js["results"]}
    for p in ("baseline", "mdp", "oracle-metric"):
        assert rows[p]["mean_reward"] <= rows["oracle"]["mean_reward"] + 1e-12


def test_csv_only_and_iid(tmp_path):
    ok(*SMALL, "--choice", "iid", "--policy", "baseline", "--csv", tmp_path / "t.csv")
    with open(tmp_path / "t.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["policy"] for r in rows] == ["baseline"]
    assert float(rows[0]["share_of_oracle_gain"]) == 0.0
    assert not (tmp_path / "t.json").exists()


# ----------------------------------------------------------------------------- errors

def test_missing_profile(tmp_path):
    failed(run("--profile", tmp_path / "nope.npz"), "nope.npz", "no such file")


def test_corrupt_profile(tmp_path):
    p = tmp_path / "bad.npz"
    p.write_bytes(b"this is not a zip archive at all")
    failed(run("--profile", p, "--length", 10), "bad.npz", "not a readable .npz")


def test_profile_missing_a_key(tmp_path):
    p = tmp_path / "half.npz"
    np.savez(p, weak_loss=np.zeros(5, np.float32))
    failed(run("--profile", p), "half.npz", "missing key")


def test_unknown_policy_name():
    msg = failed(run(*SMALL, "--policy", "mpd"), "'mpd'", "neither one of")
    assert "oracle-metric" in msg


def test_corrupt_policy_blob(tmp_path):
    p = tmp_path / "x.blob"
    p.write_bytes(b"OFLDPLCY" + b"\0" * 40)
    failed(run(*SMALL, "--policy", p), "x.blob")


def test_blob_for_another_bucket(tmp_path):
    p = tmp_path / "r25.blob"
    ok(*SMALL, "--rate", 0.25, "--depth", 2, "--policy", "baseline", "--write-blob", "mdp", p)
    assert (blob.read_blob(p).N, blob.read_blob(p).P, blob.read_blob(p).M) == scale(0.25, 2)
    failed(run(*SMALL, "--policy", p), "policy was made for bucket (N, P, M) = (1, 4, 8)",
           "this run uses (1, 10, 40)")


@pytest.mark.parametrize("rate, depth, needle", [
    (1.5, 4, "rate=1.5 tokens/slot must be in (0, 1)"),
    (0, 4, "rate=0.0"),
    (0.1, 0.5, "depth=0.5 tokens must be >= 1"),
    (0.001, 4, "no valid bucket"),
])
def test_invalid_bucket(rate, depth, needle):
    failed(run(*SMALL, "--rate", rate, "--depth", depth), needle)


@pytest.mark.parametrize("markov, needle", [((0, 10, 0.1, 0.1), "I1=0: slots"),
                                            ((1, 10, 0.0, 0.1), "tprob1=0.0: per-slot"),
                                            ((1, 10, 0.1, 1.5), "tprob2=1.5: per-slot")])
def test_invalid_markov(markov, needle):
    failed(run(*SMALL, "--arrivals", "markov", "--markov", *markov), "--markov", needle)


def test_bad_option_values():
    res = run("--choice", "zipf")
    assert res.exit_code == 2 and "zipf" in res.stderr and "Traceback" not in res.output
    res = run("--streams", 0)
    assert res.exit_code == 2 and "--streams" in res.stderr


def test_no_blob_without_metric_table(tmp_path):
    """A profile with imported metrics only cannot make a device blob: clear error, no file."""
    prof = synthetic_profile(2000, seed=2)
    imported = Profile(prof.weak_loss, prof.strong_loss, prof.split, metric=prof.metric)
    imported.save(tmp_path / "imp.npz")
    out = tmp_path / "never.blob"
    failed(run("--profile", tmp_path / "imp.npz", "--length", 200, "--streams", 2,
               "--policy", "baseline", "--write-blob", "mdp", out), "no entropy->metric table")
    assert not out.exists()
    # the simulation itself works on such a profile
    res = ok("--profile", tmp_path / "imp.npz", "--length", 200, "--streams", 2, "--policy",
             "baseline", "--policy", "mdp")
    assert list(table(res.stdout)) == ["baseline", "mdp"]
