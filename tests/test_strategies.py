"""Fleet strategies (offload.strategies) and ``offload-sim fleet``."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from offload import fleet, strategies
from offload.cli import sim_main
from offload.scenario import Scenario
from offload.synthetic import synthetic_profile


@pytest.fixture(scope="module")
def synthetic_camera():
    return strategies.camera_data(synthetic_profile(6000, seed=3), Scenario(choice="iid"))


def test_grid_is_the_published_one_with_its_skip_rule():
    assert len(strategies.GRID_RATES) == 19 and len(strategies.GRID_DEPTHS) == 37
    assert strategies.GRID_RATES[0] == 0.05 and strategies.GRID_DEPTHS[-1] == 10.0
    pts = strategies.grid_points(strategies.FleetSetting(4, 0.1, 2.0))
    assert (0.1, 2.0) in pts  # the isolated bucket itself is searched
    assert (0.1, 1.75) not in pts and (0.075, 2.0) not in pts and (0.075, 10.0) in pts
    # skipped: r <= 0.1 (3 rates) with b < 2 (4 depths), and r < 0.1 (2) with b <= 2 (5), 8 in both
    assert len(pts) == 19 * 37 - (3 * 4 + 2 * 5 - 2 * 4)
    assert all(not ((r <= 0.1 and b < 2) or (r < 0.1 and b <= 2)) for r, b in pts)


def test_fleet_setting_refuses_budgets_without_a_valid_camera_bucket():
    with pytest.raises(ValueError, match="no valid bucket for every camera"):
        strategies.FleetSetting(4, 0.001, 2.0)
    with pytest.raises(ValueError, match="no valid bucket for every camera"):
        strategies.FleetSetting(4, 0.1, 0.5)
    with pytest.raises(ValueError, match="at least 1"):
        strategies.FleetSetting(0, 0.1, 2.0)
    s = strategies.FleetSetting(4, 0.1, 2.0)
    assert s.switch_depth == 8.0 and s.server_rate == pytest.approx(0.4)
    assert tuple(s.switch) == (1, 10, 80)


def test_ordering_pooled_hierarchical_isolated(synthetic_camera):
    # The published comparison: pooled >= hierarchical >= isolated in reward, on the same streams.
    setting = strategies.FleetSetting(4, 0.1, 1.0)
    res, search = strategies.run_strategies(
        [synthetic_camera] * 4, setting, length=6000, n_seq=6, train_length=2000, train_seq=4,
        names=("isolated", "hierarchical", "pooled"), grid_step=2)
    iso, hier, pool = res["isolated"].reward, res["hierarchical"].reward, res["pooled"].reward
    assert pool >= hier >= iso
    assert hier - iso > 0.002  # the search buys a real margin here, not noise
    best = search["hierarchical"]["best"]
    assert best != (0.1, 1.0) and best in strategies.grid_points(setting, step=2)
    # the search is the argmax of the training rewards; the isolated bucket is one of its points
    pts, rew = search["hierarchical"]["points"], search["hierarchical"]["train_reward"]
    assert rew[pts.index(best)] == rew.max() >= rew[pts.index((0.1, 1.0))]
    assert res["isolated"].switch_refusals == 0 < res["hierarchical"].switch_refusals
    assert res["pooled"].switch_refusals == 0
    assert res["hierarchical"].buckets == [best] * 4


def test_policy_cache_solves_each_bucket_once(synthetic_camera):
    cache = strategies.PolicyCache()
    setting = strategies.FleetSetting(2, 0.1, 2.0)
    train = strategies.fleet_streams([synthetic_camera] * 2, purpose="training", length=500,
                                     n_seq=2)
    pts = [(0.1, 2.0), (0.2, 3.0)]
    strategies.grid_search([synthetic_camera] * 2, setting, train, cache, points=pts)
    strategies.grid_search([synthetic_camera] * 2, setting, train, cache, points=pts)
    assert len(cache) == 2


def test_cameras_sharing_data_get_independent_streams(synthetic_camera):
    a, b = strategies.fleet_streams([synthetic_camera] * 2, purpose="test", length=300, n_seq=2)
    assert a.shape == b.shape == (2, 300)
    assert not np.array_equal(a.metric, b.metric)


def test_heterogeneous_cameras_and_markov_arrivals():
    d1 = strategies.camera_data(synthetic_profile(3000, seed=1), Scenario(choice="iid"), "a")
    d2 = strategies.camera_data(synthetic_profile(3000, seed=2),
                                Scenario(arrivals="markov", markov=(1, 4, 0.2, 0.2)), "b")
    setting = strategies.FleetSetting(2, 0.2, 2.0)
    res, _ = strategies.run_strategies([d1, d2], setting, length=2000, n_seq=3, train_length=800,
                                       train_seq=2, names=("isolated", "pooled"))
    iso = res["isolated"]
    assert iso.images[0] > iso.images[1] > 0  # camera b has gaps between its images
    assert res["pooled"].reward >= iso.reward


# ----------------------------------------------------------------------------- offload-sim fleet


def sim(*args):
    return CliRunner().invoke(sim_main, [str(a) for a in args], catch_exceptions=True)


def test_offload_sim_fleet_table_and_json(tmp_path):
    out = tmp_path / "fleet.json"
    r = sim("fleet", "--cameras", 3, "--switch-rate", 0.1, "--switch-depth-per-camera", 1,
            "--synthetic", 3000, "--choice", "iid", "--length", 1500, "--streams", 2,
            "--train-length", 600, "--train-streams", 2, "--grid-step", 4, "--json", out)
    assert r.exit_code == 0, r.output
    header = r.stdout.splitlines()[0].split()
    assert header[:5] == ["strategy", "avg_loss", "reward", "switch_refusals", "refused_per_send"]
    doc = json.loads(out.read_text())
    names = [e["strategy"] for e in doc["results"]]
    assert names == list(strategies.STRATEGIES)
    for e in doc["results"]:
        assert {"avg_loss", "reward", "switch_refusals", "buckets", "share"} <= set(e)
        assert len(e["buckets"]) == 3 and len(e["share"]) == 3
    iso = doc["results"][0]
    assert iso["buckets"] == [{"rate": 0.1, "depth": 1.0}] * 3
    assert doc["setting"]["server_rate"] == pytest.approx(0.3)
    assert doc["search"]["hierarchical"]["points"] == len(
        strategies.grid_points(strategies.FleetSetting(3, 0.1, 1.0), step=4))


def test_offload_sim_fleet_random_order_and_one_strategy():
    r = sim("fleet", "-K", 2, "--synthetic", 2000, "--length", 500, "--streams", 2,
            "--order", "random", "--strategy", "isolated")
    assert r.exit_code == 0, r.output
    assert [line.split()[0] for line in r.stdout.splitlines()[1:]] == ["isolated"]


@pytest.mark.parametrize("args, message", [
    (["--switch-rate", "0.001"], "no valid bucket for every camera"),
    (["--switch-depth-per-camera", "0.5"], "no valid bucket for every camera"),
    (["--cameras", "300"], "300"),
    (["--cameras", "12", "--synthetic", "20"], "more than the profile can feed"),
    (["--camera-profile", "/nonexistent.npz"], "nonexistent.npz"),
    (["--rate", "0.1"], "No such option"),
])
def test_offload_sim_fleet_refusals(args, message):
    r = sim("fleet", "--length", 100, "--streams", 1, *args)
    assert r.exit_code != 0
    assert message in r.output and "Traceback" not in r.output


def test_offload_sim_without_subcommand_is_unchanged():
    # The single-policy comparison still runs with no subcommand, same table as before.
    r = sim("--synthetic", 2000, "--length", 300, "--streams", 2, "--policy", "baseline")
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines()[0].split()[:4] == ["policy", "avg_loss", "mean_reward",
                                                    "offload_rate"]
    assert r.stdout.splitlines()[1].split()[0] == "baseline"
    helptext = sim("--help").output
    assert "--policy" in helptext and "fleet" in helptext
    assert sim("nonsense").exit_code != 0


def test_fleet_result_row_names_every_camera_bucket(synthetic_camera):
    setting = strategies.FleetSetting(2, 0.1, 2.0)
    st = strategies.fleet_streams([synthetic_camera] * 2, purpose="test", length=400, n_seq=2)
    res = strategies.isolated([synthetic_camera] * 2, setting, st, strategies.PolicyCache())
    row = res.row()
    assert row["buckets"] == [{"rate": 0.1, "depth": 2.0}] * 2
    assert sum(row["share"]) == pytest.approx(1.0)
    assert isinstance(res, fleet.FleetResult)


def test_offload_sim_fleet_heterogeneous_profiles(tmp_path):
    for i in (1, 2):
        synthetic_profile(2000, seed=i).save(tmp_path / f"p{i}.npz")
    out = tmp_path / "h.json"
    r = sim("fleet", "-K", 3, "--camera-profile", tmp_path / "p1.npz", "--camera-profile",
            tmp_path / "p2.npz", "--length", 400, "--streams", 2, "--strategy", "isolated",
            "--strategy", "pooled", "--json", out)
    assert r.exit_code == 0, r.output
    doc = json.loads(out.read_text())
    assert [p.endswith(n) for p, n in zip(doc["profiles"], ["p1.npz", "p2.npz", "p1.npz"])] == [
        True] * 3


def test_grid_search_on_a_local_ray_cluster(synthetic_camera, tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    import tempfile

    # Ray puts the driver's working directory first on its workers' sys.path; from a
    # checkout that would be the source tree, whose offload_native has no compiled core.
    monkeypatch.chdir(tmp_path)
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths
    ctx = ray.init(num_cpus=2, include_dashboard=False, _temp_dir=ray_tmp,
                   log_to_driver=False, configure_logging=False)
    try:
        pts = [(0.1, 2.0), (0.2, 3.0), (0.15, 4.0)]
        local, remote = strategies.PolicyCache(), strategies.PolicyCache()
        local.prefetch(synthetic_camera, pts)
        remote.prefetch(synthetic_camera, pts, ray_address=ctx.address_info["gcs_address"])
        for rb in pts:
            assert np.array_equal(local.mdp(synthetic_camera, *rb)[1],
                                  remote.mdp(synthetic_camera, *rb)[1])
        assert len(remote) == len(pts)
        r = sim("fleet", "-K", 2, "--synthetic", 2000, "--length", 500, "--streams", 2,
                "--train-length", 400, "--train-streams", 2, "--grid-step", 6,
                "--strategy", "hierarchical", "--ray", ctx.address_info["gcs_address"])
        assert r.exit_code == 0, r.output
        assert [line.split()[0] for line in r.stdout.splitlines()[1:]] == ["hierarchical"]
    finally:
        ray.shutdown()


def test_ray_not_installed_is_one_error_line(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    r = sim("fleet", "-K", 2, "--synthetic", 2000, "--length", 500, "--streams", 2,
            "--grid-step", 6, "--strategy", "hierarchical", "--ray", "auto")
    assert r.exit_code != 0
    assert "--ray needs Ray: pip install 'offload[ray]'" in r.output
    assert "Traceback" not in r.output
