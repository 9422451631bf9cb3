"""The JSON report of a training run: settings, training, validation, int8 tuning, test.

``report`` gathers what a reader needs to judge a run into one JSON-safe dict
(``clean``: NaN as ``null``, numpy scalars as Python ones).
"""

from __future__ import annotations

import math
from dataclasses import asdict

import numpy as np
import torch

from .convergence import time_to_quality
from .split import profile_fingerprint

__all__ = ["report", "clean"]


def clean(v):
    """JSON-safe values (NaN -> None, numpy scalars -> Python)."""
    if isinstance(v, dict):
        return {k: clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [clean(x) for x in v]
    if isinstance(v, (np.floating, float)):
        return None if not math.isfinite(float(v)) else float(v)
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.bool_):
        return bool(v)
    return v


def report(trainer, prof, rows, extra, *, scenario, int8_tuning, seconds, profile_path=None,
           preset=None, files=None):
    """Everything a reader needs to judge a run: settings, training, validation, test.

    ``rows, extra``: ``evaluate``'s test results (``None`` when the run was
    interrupted before its test); ``scenario``: the one tested on;
    ``int8_tuning``: ``tune_int8``'s record (``None`` without tuning);
    ``seconds``: the whole run's wall time; ``files``: paths written
    (``policy``, ``curve_png``, ``checkpoint``).
    """
    files = files or {}
    its = np.asarray(trainer.iter_seconds) if trainer.iter_seconds else np.zeros(1)
    return clean({
        "command": "offload-train dqn",
        "preset": preset,
        "profile": {"path": profile_path, "source": prof.source,
                    "fingerprint": profile_fingerprint(prof),
                    "images": {"train": int(len(trainer.data.train)),
                               "validation": int(len(trainer.data.val)),
                               "test": int(len(trainer.data.test))},
                    "validation_from": trainer.data.val_source},
        "scenario": scenario.to_dict(),
        "config": asdict(trainer.cfg),
        "interarrival_scale_slots": trainer.replay.ia_scale,
        "torch": {"version": torch.__version__, "device": str(trainer.device),
                  "threads": torch.get_num_threads()},
        "training": {
            "stopped_by": trainer.stopped_by, "iterations": trainer.iteration,
            "seconds": trainer.train_seconds, "data_seconds": trainer.data_seconds,
            "seconds_per_iteration": {"mean": float(its.mean()), "median": float(np.median(its))},
            "tuples": trainer.iteration * trainer.cfg.steps * trainer.cfg.batch,
            "best_iteration": trainer.best_iteration,
            "best_validation_reward": trainer.best_val,
            "validation_rewards": trainer.cfg.val_reward,  # "true" or "expected" (metric)
            "validation_mdp_reward": trainer.val_mdp,
            "validation_baseline_reward": trainer.val_base,
            "curve": trainer.curve,
            # When validation first reached 99% of the final best gain over Baseline.
            "time_to_quality": time_to_quality(trainer.curve, 0.99),
        },
        # Quantisation-aware tuning (int8.tune_int8); None when it did not run.
        "int8_tuning": int8_tuning,
        "test": rows,
        # No test report (extra None) when training was interrupted.
        "int8": ({k: v for k, v in extra.items() if k not in ("ceiling", "belief")}
                 if extra else None),
        "ceiling": extra.get("ceiling") if extra else None,
        # The belief policy's location bins (the ceiling's), arrival states, time.
        "belief": extra.get("belief") if extra else None,
        "files": {k: files.get(k) for k in ("policy", "curve_png", "checkpoint")},
        "total_seconds": seconds,
    })
