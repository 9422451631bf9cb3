"""Parameters the core cannot serve in bounded time or memory are refused at once, clearly.

Library functions raise ``ValueError`` naming the parameters; ``offload-sim``
shows that as one ``Error:`` line (exit code 1), never a traceback. The
pytest-timeout marks catch a refusal that is not immediate (no wall-clock
numbers are asserted).
"""

import warnings

import numpy as np
import pytest
from click.testing import CliRunner

from offload import policies, sequences
from offload.bucket import Bucket
from offload.cli import sim_main
from offload.profile import Profile
from offload.scenario import Scenario

SMALL = ["--synthetic", "2000", "--length", "200", "--streams", "2"]


def run(*args):
    return CliRunner().invoke(sim_main, [str(a) for a in args], catch_exceptions=True)


def failed(res, *needles):
    """A clean failure: exit code 1, one error line on stderr, no traceback."""
    assert res.exit_code == 1, res.output + repr(res.exception)
    assert isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1, res.stderr
    for n in needles:
        assert n in errors[0], errors[0]
    return errors[0]


# ----------------------------------------------------------------------------- Markov arrivals

@pytest.mark.timeout(60)
def test_sim_refuses_rare_markov_arrivals():
    # Used to grow to 5.9 GB and end in a traceback from the MDP's training arrivals.
    msg = failed(run("--arrivals", "markov", "--markov", 2, 4, 1.0, 0.99, "--length", 50,
                     "--streams", 1), "--markov 2 4 1.0 0.99", "mean inter-arrival time",
                 "above the supported 1,000 slots")
    assert "i1=2, i2=4, tprob1=1.0, tprob2=0.99" in msg


@pytest.mark.timeout(60)
def test_sim_refuses_markov_without_arrivals():
    failed(run(*SMALL, "--arrivals", "markov", "--markov", 2, 3, 1.0, 1.0),
           "--markov 2 3 1.0 1.0", "no image can ever arrive")


def test_training_arrivals_refusal_is_a_click_error(monkeypatch):
    # Whatever the MDP's inputs refuse (here a stand-in) is one error line.
    def refuse(self, length=None):
        raise ValueError("no training arrivals for these parameters")

    monkeypatch.setattr(Scenario, "training_arrivals", refuse)
    failed(run(*SMALL, "--arrivals", "markov"), "mdp: no training arrivals")


def test_markov_check_matches_the_generator():
    assert sequences.markov_check(1, 10, 0.1, 0.1) == pytest.approx(
        sequences.markov_mean_interarrival(1, 10, 0.1, 0.1))
    for args in [(2, 4, 1.0, 0.99), (2, 2, 1.0, 1.0), (0, 1, 0.5, 0.5), (1, 1, 0.0, 0.5)]:
        with pytest.raises(ValueError) as checked:
            sequences.markov_check(*args)
        with pytest.raises(ValueError) as generated:
            sequences.markov_arrivals(5, 1, *args, seed=0)
        assert str(checked.value) == str(generated.value)


# ----------------------------------------------------------------------------- bucket size

@pytest.mark.timeout(60)
def test_sim_refuses_a_huge_bucket():
    failed(run(*SMALL, "--depth", 1e7), "--depth", "token states",
           f"above the supported {policies.MAX_DP_STATES:,}")


@pytest.mark.timeout(60)
def test_dp_policies_refuse_huge_buckets():
    rng = np.random.default_rng(0)
    m, r = rng.normal(size=100), rng.normal(size=100)
    M = policies.MAX_DP_STATES + 10
    with pytest.raises(ValueError, match="MDP: bucket .* token states"):
        policies.mdp_thresholds(m, r, Bucket(1, 10, M))
    with pytest.raises(ValueError, match="oracle: bucket .* token states"):
        policies.oracle(r, np.ones(100, np.int64), Bucket(1, 10, M))
    with pytest.raises(ValueError, match="oracle: bucket .* token states"):
        policies.oracle_metric(m, r, np.ones(100, np.int64), Bucket(1, 10, M))
    # The largest bucket still accepted runs.
    M = policies.MAX_DP_STATES
    total, mask = policies.oracle(r[:5], np.ones(5, np.int64), Bucket(1, 10, M))
    assert mask.all() == (r[:5] > 0).all()


def test_mdp_refuses_a_huge_next_state_table():
    rng = np.random.default_rng(1)
    m, r = rng.normal(size=100), rng.normal(size=100)
    ia = np.arange(1, 2001)  # 2,000 distinct inter-arrival times
    with pytest.raises(ValueError, match=r"1,001 x 2,000 next-state table"):
        policies.mdp_thresholds(m, r, Bucket(1, 10, 1001), interarrival=ia)
    theta = policies.mdp_thresholds(m, r, Bucket(1, 10, 500), interarrival=ia)
    assert theta.shape == (491,)


def test_mdp_non_convergence_is_reported():
    # SPEC section 5 stops value iteration after a fixed number of sweeps; a
    # stop before the thresholds settle is reported, not silent.
    rng = np.random.default_rng(2)
    m = rng.normal(size=2000)
    r = np.maximum(m + 0.3 * rng.normal(size=2000), 0)
    with pytest.warns(RuntimeWarning, match=r"stopped after 5 sweep\(s\) without converging: "
                                            r"a threshold still moved by"):
        stopped = policies.mdp_thresholds(m, r, Bucket(1, 10, 40), max_sweeps=5)
    assert stopped.shape == (31,) and np.all(np.isfinite(stopped))
    with pytest.warns(RuntimeWarning, match="one sweep cannot show convergence"):
        policies.mdp_thresholds(m, r, Bucket(1, 10, 40), max_sweeps=1)
    # A negative rtol asks for exactly max_sweeps sweeps: nothing to report.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        policies.mdp_thresholds(m, r, Bucket(1, 10, 40), max_sweeps=5, rtol=-1)
        policies.mdp_thresholds(m[:200], r[:200], Bucket(1, 10, 40))  # converges


def test_sim_shows_an_mdp_warning_as_one_line(monkeypatch):
    real = policies.mdp_thresholds
    monkeypatch.setattr(policies, "mdp_thresholds",
                        lambda *a, **k: real(*a, **{**k, "max_sweeps": 1}))
    res = run(*SMALL, "--policy", "mdp")
    assert res.exit_code == 0, res.output
    assert "mdp: warning: MDP value iteration stopped after 1 sweep(s)" in res.stderr


# ----------------------------------------------------------------------------- profiles

def test_text_file_is_not_a_profile(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("meeting notes\nnot a profile\n")
    with pytest.raises(ValueError, match=r"notes\.txt: not a \.npz profile") as exc:
        Profile.load(notes)
    assert "pickled" not in str(exc.value)
    msg = failed(run("--profile", notes), "notes.txt", "not a .npz profile")
    assert "pickled" not in msg


def test_empty_and_npy_files_are_not_profiles(tmp_path):
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.npz: not a \.npz profile"):
        Profile.load(empty)
    npy = tmp_path / "array.npz"
    with open(npy, "wb") as fh:
        np.save(fh, np.zeros(3))
    with pytest.raises(ValueError, match=r"array\.npz: not a \.npz profile .*\.npy array"):
        Profile.load(npy)
