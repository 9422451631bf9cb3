"""Markdown tables of sweep results (training.tables, ``offload-train table``) on hand-made tables.

Nothing is trained: the results tables are written by hand, one in this
version's layout (belief rows, per-stream rewards, training seconds) and one
as sweeps before the belief policy wrote them.
"""

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from training import figures as F
from training import tables as T
from training.cli import main

W = 0.3  # mean weak loss of the test streams: avg_loss = W - mean reward
BASE = dict(rate=0.1, choice="location-reset", sp=0.1, rprob=0.01, arrivals="periodic", I1=1,
            I2=10, tprob1=0.1, tprob2=0.1, T=97, interarrival=False,
            train_choice="location-reset", seed=0, status="done", error="")


def _row(pid, depth, policy, streams=None, reward=None, **kw):
    reward = float(np.mean(streams)) if streams is not None else reward
    r = {**BASE, "point": pid, "depth": depth, "policy": policy, "mean_reward": reward,
         "avg_loss": W - reward, **kw}
    if streams is not None:
        r["stream_reward"] = list(streams)
    return r


def _results():
    """Two parts: point A (this version's layout, order holds), point B (old layout, fails)."""
    base = np.array([0.10, 0.11, 0.09, 0.10])
    mdp = base + [0.003, 0.002, 0.004, 0.003]
    dqn = mdp + [0.002, 0.001, 0.003, 0.002]
    a = [_row("A", 2.0, "dqn-int8", dqn, **{"share_of_oracle-metric_gain": 0.6,
                                            "share_of_belief_gain": 0.6 / 0.7,
                                            "share_of_ceiling_gain": 0.8}),
         _row("A", 2.0, "mdp", mdp, **{"share_of_oracle-metric_gain": 0.4}),
         _row("A", 2.0, "baseline", base, **{"share_of_oracle-metric_gain": 0.0}),
         _row("A", 2.0, "belief", base + 0.007, **{"share_of_oracle-metric_gain": 0.7}),
         _row("A", 2.0, "ceiling", base + 0.0075, **{"share_of_oracle-metric_gain": 0.75})]
    for r in a:
        r.update(train_seconds=123.4, stopped_by="converged", seconds=200.0)
    # Point B as sweeps wrote it before the belief policy: no belief row or share, no
    # per-stream rewards, no training seconds; the DQN loses to MDP.
    b = [_row("B", 4.0, "dqn-int8", reward=0.101, **{"share_of_oracle-metric_gain": 0.2,
                                                     "share_of_ceiling_gain": 0.4}),
         _row("B", 4.0, "mdp", reward=0.102, **{"share_of_oracle-metric_gain": 0.3}),
         _row("B", 4.0, "baseline", reward=0.100, **{"share_of_oracle-metric_gain": 0.0}),
         _row("B", 4.0, "ceiling", reward=0.105, **{"share_of_oracle-metric_gain": 0.5})]
    for r in b:
        r["seconds"] = 99.0
    failed = {**BASE, "point": "C", "depth": 8.0, "status": "failed", "policy": "",
              "error": "RuntimeError: boom"}
    meta = {"grid": "figX", "title": "Fig. X", "scale": "quick",
            "parts": [{"name": "bucket", "x": "depth", "logx": 0, "axes": ["depth"],
                       "points": ["A", "B", "C"]},
                      {"name": "only A", "x": "depth", "logx": 0, "axes": ["depth"],
                       "points": ["A"]}]}
    return a + b + [failed], meta


def _table(text, heading):
    """``({first cell: {column: cell}}, lines from heading on)`` of the table under ``heading``."""
    lines = text.splitlines()
    i = lines.index(heading)
    end = next((k for k in range(i + 1, len(lines)) if lines[k].startswith("### ")), len(lines))
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[i + 1:end]
             if ln.startswith("|")]
    head, body = cells[0], cells[2:]
    return {r[0]: dict(zip(head, r)) for r in body}, lines[i:end]


def test_paired_margin_is_the_standard_error_of_the_per_stream_differences():
    rows, _ = _results()
    by = {r["policy"]: r for r in rows if r["point"] == "A"}
    margin, se = T.paired_margin(by["mdp"], by["dqn-int8"])
    d = np.array([0.002, 0.001, 0.003, 0.002])
    assert margin == pytest.approx(d.mean())
    assert se == pytest.approx(math.sqrt(np.sum((d - d.mean()) ** 2) / 3) / 2)
    # without per-stream rewards: the margin alone
    old = {r["policy"]: r for r in rows if r["point"] == "B"}
    assert T.paired_margin(old["mdp"], old["dqn-int8"]) == (pytest.approx(-0.001), None)
    assert T.paired_margin(None, old["mdp"]) == (None, None)


def test_markdown_table_per_part_with_belief_shares_and_noise():
    rows, meta = _results()
    text = T.markdown_tables(rows, meta)
    table, lines = _table(text, "### figX: bucket")
    assert "Fig. X (quick scale)." in lines
    a, b = table["2"], table["4"]
    assert list(a)[:5] == ["b", "DQN int8", "MDP", "Baseline", "MDP share"]
    assert (a["DQN int8"], a["MDP"], a["Baseline"]) == ("0.1950", "0.1970", "0.2000")
    assert (a["MDP share"], a["DQN share"], a["belief share"], a["ceiling share"]) == \
        ("40.0%", "60.0%", "70.0%", "75.0%")
    assert a["DQN / belief"] == "85.7%" and a["DQN / ceiling"] == "80.0%"
    assert a["DQN < MDP < Baseline"] == "yes"
    assert a["MDP - DQN"] == "+0.00200 (+4.9 SE)"
    assert a["Baseline - MDP"].startswith("+0.00300 (") and a["Baseline - MDP"].endswith(" SE)")
    assert a["training s"] == "123" and a["stopped by"] == "converged"
    # the older point: what it lacks is "-", margins without an error
    assert b["belief share"] == "-" and b["DQN / belief"] == "-" and b["DQN / ceiling"] == "40.0%"
    assert b["DQN < MDP < Baseline"] == "**no**" and b["MDP - DQN"] == "-0.00100"
    assert b["training s"] == "-" and b["stopped by"] == "-"
    assert "DQN < MDP < Baseline at 1 of 2 points; not at: b 4." in lines
    assert "Failed points (no result): C." in lines
    only_a, _ = _table(text, "### figX: only A")
    assert list(only_a) == ["2"]


def test_dqn_share_of_belief_falls_back_to_the_ratio_of_shares():
    rows, _ = _results()
    a = [dict(r) for r in rows if r["point"] == "A"]
    for r in a:
        r.pop("share_of_belief_gain", None)
    s = T.point_summary(a)
    assert s["dqn_of_belief"] == pytest.approx(0.6 / 0.7) and s["order"] is True


def test_table_command_reads_json_csv_and_folders(tmp_path):
    rows, meta = _results()
    folder = tmp_path / "sweep"
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps({**meta, "rows": rows}))
    runner = CliRunner()
    res = runner.invoke(main, ["table", str(folder)])
    assert res.exit_code == 0, res.output
    assert "### figX: bucket" in res.output and "+0.00200 (+4.9 SE)" in res.output
    out = tmp_path / "t.md"
    res = runner.invoke(main, ["table", str(folder / "results.json"), str(folder), "--out",
                               str(out)])
    assert res.exit_code == 0, res.output
    assert out.read_text().count("### figX: bucket") == 2
    # a CSV (no parts, no per-stream rewards): one table, margins without errors
    cols = sorted({k for r in rows for k in r if k != "stream_reward"})
    lines = [",".join(cols)] + [",".join("" if r.get(c) is None else str(r.get(c))
                                         for c in cols) for r in rows]
    (tmp_path / "r.csv").write_text("\n".join(lines) + "\n")
    crow, cmeta = F.read_results(str(tmp_path / "r.csv"))
    text = T.markdown_tables(crow, cmeta)
    table, _ = _table(text, "### sweep")
    assert table["2"]["MDP - DQN"] == "+0.00200" and table["4"]["DQN < MDP < Baseline"] == "**no**"
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"rows": []}))
    res = runner.invoke(main, ["table", str(empty)])
    assert res.exit_code == 1 and "no finished or failed points" in res.output
