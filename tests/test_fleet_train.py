"""``offload-train fleet``: provisioning K cameras for a link (blobs, key lines, report)."""

import json
import os

import pytest
from click.testing import CliRunner

from offload import blob
from offload.bucket import Bucket
from training.cli import main
from training.fleet_command import link_switch_rate

SMALL = ["--synthetic", "3000", "--choice", "iid", "--length", "800", "--streams", "2",
         "--train-length", "500", "--train-streams", "2", "--grid-step", "4"]


def train(*args):
    return CliRunner().invoke(main, ["fleet", *map(str, args)], catch_exceptions=True)


def test_provision_from_a_link_budget(tmp_path):
    out = tmp_path / "fleet"
    # 2 Mbit/s of 50 kB images = 5 images/s for 4 cameras at 10 fps: r_g = 0.125
    r = train("-K", 4, "--link-bps", 2e6, "--image-bytes", 5e4, "--fps", 10, "--out", out, *SMALL)
    assert r.exit_code == 0, r.output
    assert sorted(os.listdir(out)) == ["cam1.blob", "cam2.blob", "cam3.blob", "cam4.blob",
                                       "fleet.json", "keys.sh"]
    rep = json.loads((out / "fleet.json").read_text())
    assert rep["setting"]["switch_rate"] == pytest.approx(0.125)
    assert rep["setting"]["server_rate"] == pytest.approx(0.5)  # K * r_g tokens per slot
    assert rep["slot_ms_per_frame"] == pytest.approx(100.0)
    lines = (out / "keys.sh").read_text().splitlines()
    assert "offload-serve keys switch add uplink --rate 0.5 --depth 8" in lines
    keys = [ln for ln in lines if ln.startswith("offload-serve keys add ")]
    assert len(keys) == 4
    for cam, line in zip(rep["cameras"], keys):
        assert line == (f"offload-serve keys add {cam['name']} --rate {cam['rate']:g} "
                        f"--depth {cam['depth']:g} --switch uplink")
        pol = blob.read_blob(out / cam["blob"])
        assert pol.kind == "thresholds"
        assert pol.bucket == Bucket.from_rate(cam["rate"], cam["depth"])
        assert pol.meta["fleet"]["switch"] == "uplink"
    assert lines[3:] == [ln for ln in r.stdout.splitlines() if ln.startswith("offload-serve")]
    names = [e["strategy"] for e in rep["results"]]
    assert names == ["isolated", "hierarchical", "pooled"]


def test_provision_from_a_switch_bucket(tmp_path):
    out = tmp_path / "f"
    r = train("-K", 2, "--switch-rate", 0.1, "--switch-depth-per-camera", 3, "--out", out,
              "--strategy", "isolated", "--name", "door", "--switch-name", "wan",
              "--keys", "/etc/offload/keys.toml", *SMALL)
    assert r.exit_code == 0, r.output
    lines = (out / "keys.sh").read_text().splitlines()
    assert lines[3] == ("offload-serve keys switch add wan --rate 0.2 --depth 6 "
                        "--keys /etc/offload/keys.toml")
    assert lines[4] == ("offload-serve keys add door1 --rate 0.1 --depth 3 --switch wan "
                        "--keys /etc/offload/keys.toml")


def test_link_switch_rate():
    assert link_switch_rate(1e6, 25_000, 10, 5) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="no bucket is needed"):
        link_switch_rate(1e9, 1e3, 10, 2)
    with pytest.raises(ValueError, match="--fps"):
        link_switch_rate(1e6, 1e3, 0, 2)


@pytest.mark.parametrize("args, message", [
    (["--link-bps", 1e4, "--image-bytes", 5e4, "--fps", 10], "no valid bucket for every camera"),
    (["--link-bps", 1e9, "--image-bytes", 5e4, "--fps", 10], "no bucket is needed"),
    (["--link-bps", 1e6], "go together"),
    (["--switch-rate", 0.1, "--link-bps", 1e6, "--image-bytes", 1, "--fps", 1], "not both"),
    ([], "give the link budget"),
    (["--switch-rate", 0.1, "--switch-depth-per-camera", 0.5], "no valid bucket"),
])
def test_bad_budgets_are_refused(tmp_path, args, message):
    out = tmp_path / "f"
    r = train("-K", 4, "--out", out, *args, *SMALL)
    assert r.exit_code != 0 and message in r.output and "Traceback" not in r.output
    assert not out.exists() and os.listdir(tmp_path) == []


def test_more_cameras_than_the_profile_can_feed(tmp_path):
    r = train("-K", 20, "--switch-rate", 0.1, "--out", tmp_path / "f", "--synthetic", 20)
    assert r.exit_code != 0 and "more than the profile can feed" in r.output
    assert os.listdir(tmp_path) == []


def test_existing_output_is_never_overwritten(tmp_path):
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "keep.txt").write_text("mine")
    r = train("-K", 2, "--switch-rate", 0.1, "--out", tmp_path / "f", *SMALL)
    assert r.exit_code != 0 and "not an empty folder" in r.output
    assert os.listdir(tmp_path / "f") == ["keep.txt"]


TINY_DQN = ["T=5", "layers=1", "width=8", "iterations=4", "steps=2", "batch=32", "validate_every=2",
            "train_streams=1", "train_length=600", "val_streams=1", "val_length=300",
            "test_streams=1", "test_length=300", "int8_tune=0", "threads=1", "calib_states=200"]


def test_bounded_dqn_search_trains_only_at_the_best_buckets(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "f"
    args = ["-K", 2, "--switch-rate", 0.1, "--out", out, "--dqn-top", 1, "--dqn-preset", "paper",
            *SMALL]
    for s in TINY_DQN:
        args += ["--dqn-set", s]
    r = train(*args)
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "fleet.json").read_text())
    cands = rep["dqn_search"]["candidates"]
    assert len(cands) == 1  # one DQN training: the threshold search's best bucket
    hier = next(e for e in rep["results"] if e["strategy"] == "hierarchical")
    assert [cands[0]["rate"], cands[0]["depth"]] == [hier["buckets"][0]["rate"],
                                                     hier["buckets"][0]["depth"]]
    assert "hierarchical-dqn" in [e["strategy"] for e in rep["results"]]
    kind = "dqn" if rep["dqn_search"]["dqn_chosen"] else "thresholds"
    assert blob.read_blob(out / "cam1.blob").kind == kind


def test_dqn_search_needs_a_hierarchical_strategy(tmp_path):
    r = train("-K", 2, "--switch-rate", 0.1, "--out", tmp_path / "f", "--strategy", "isolated",
              "--dqn-top", 1, *SMALL)
    assert r.exit_code != 0 and "--dqn-top" in r.output


def test_provisioned_blobs_run_in_offload_sim_fleet(tmp_path):
    # End to end: offload-train fleet's blobs, run by offload-sim fleet --camera-blob on the
    # same profile and streams, give exactly the hierarchical row both commands report.
    from offload.cli import sim_main

    out = tmp_path / "f"
    r = train("-K", 3, "--switch-rate", 0.1, "--switch-depth-per-camera", 1, "--out", out, *SMALL)
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "fleet.json").read_text())
    hier = next(e for e in rep["results"] if e["strategy"] == "hierarchical")
    j = tmp_path / "sim.json"
    args = ["fleet", "-K", 3, "--switch-rate", 0.1, "--switch-depth-per-camera", 1,
            "--strategy", "isolated", "--json", j, *SMALL]
    for i in (1, 2, 3):
        args += ["--camera-blob", out / f"cam{i}.blob"]
    r = CliRunner().invoke(sim_main, [str(a) for a in args], catch_exceptions=True)
    assert r.exit_code == 0, r.output
    blobs = next(e for e in json.loads(j.read_text())["results"] if e["strategy"] == "blobs")
    for k in ("avg_loss", "reward", "switch_refusals", "share", "buckets"):
        assert blobs[k] == hier[k], k


def test_key_lines_configure_the_server(tmp_path):
    # The keys.sh lines, run through offload-serve's own command line, give the switch and keys.
    import shlex

    from offload.server.cli import main as serve_main

    out, keys = tmp_path / "f", tmp_path / "keys.toml"
    r = train("-K", 2, "--switch-rate", 0.1, "--out", out, "--keys", keys, *SMALL)
    assert r.exit_code == 0, r.output
    for line in (out / "keys.sh").read_text().splitlines():
        if line.startswith("offload-serve "):
            res = CliRunner().invoke(serve_main, shlex.split(line)[1:], catch_exceptions=True)
            assert res.exit_code == 0, res.output
    res = CliRunner().invoke(serve_main, ["keys", "switch", "list", "--keys", str(keys)])
    assert res.output.split() == ["uplink", "rate=0.2", "depth=4", "cam1,cam2"]
