"""A short demo clip of held-out test images for the device: PNG frames, a video, labels.

Layout of ``demo_dir``::

    frames/000000.png ...   the images exactly as profiled (lossless, greyscale or BGR colour)
    clip.avi                the same frames as a video (lossless FFV1 when this
                            OpenCV has it, else MJPG), upscaled by ``scale`` with
                            nearest-neighbour so an area resize gives the
                            profiled pixels back
    labels.csv              frame, file, profile_index, label, class_name,
                            weak_rank, strong_rank, reward
    README.txt              what the files are and how they were made

The folder is built beside the target and swapped in at the end, so a reader
never sees half a clip.
"""

from __future__ import annotations

import csv
import os
import shutil
import tempfile

import numpy as np

__all__ = ["write_demo"]


def _video(path, frames, fps, scale):
    import cv2

    h, w = frames[0].shape[:2]
    size = (w * scale, h * scale)
    for codec in ("FFV1", "MJPG"):
        vw = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*codec), float(fps), size, True)
        if vw.isOpened():
            break
        vw.release()
    else:  # pragma: no cover - depends on the OpenCV build
        return None
    for f in frames:
        big = cv2.resize(f, size, interpolation=cv2.INTER_NEAREST)
        vw.write(big if big.ndim == 3 else cv2.cvtColor(big, cv2.COLOR_GRAY2BGR))
    vw.release()
    return codec


def write_demo(demo_dir, images, labels, candidates, profile, class_names, *, count=200, fps=5.0,
               scale=4, seed=0):
    """Write ``count`` frames chosen (seeded) among profile positions ``candidates``.

    Parameters
    ----------
    images, labels : arrays of the profiled images, in profile order.
    candidates : int array
        Profile positions allowed in the clip (the test split).
    profile : offload.profile.Profile
        For the ranks and rewards written to ``labels.csv``.

    Returns
    -------
    int
        Number of frames written.
    """
    import cv2

    rng = np.random.default_rng(seed)
    pick = rng.permutation(np.asarray(candidates))[:count]
    parent = os.path.dirname(os.path.abspath(demo_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="." + os.path.basename(demo_dir) + ".", dir=parent)
    try:
        os.makedirs(os.path.join(tmp, "frames"))
        rows, frames = [], []
        for i, p in enumerate(pick):
            img = np.asarray(images[p], dtype=np.uint8)
            name = f"frames/{i:06d}.png"
            if not cv2.imwrite(os.path.join(tmp, name), img):
                raise OSError(f"cannot write {name}")
            frames.append(img)
            y = int(labels[p])
            rows.append([i, name, int(p), y, class_names[y], int(profile.weak_rank[p]),
                         int(profile.strong_rank[p]), float(profile.reward[p])])
        with open(os.path.join(tmp, "labels.csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["frame", "file", "profile_index", "label", "class_name", "weak_rank",
                        "strong_rank", "reward"])
            w.writerows(rows)
        codec = _video(os.path.join(tmp, "clip.avi"), frames, fps, scale) if frames else None
        with open(os.path.join(tmp, "README.txt"), "w") as f:
            f.write(
                f"{len(rows)} held-out test images (profile split 2), seeded choice (seed {seed}).\n"
                "frames/: the images exactly as profiled (PNG, as read: greyscale or colour).\n"
                f"clip.avi: the same frames at {fps:g} frames/s, upscaled x{scale} "
                f"(nearest), codec {codec}.\n"
                "labels.csv: frame number, file, row in the profile, true label and class name,\n"
                "rank of the true class for the weak and strong classifiers (1 = best),\n"
                "and the offloading reward weak_loss - strong_loss.\n"
                "Made by `offload-train profile` (see docs/classifiers.md).\n"
            )
        os.chmod(tmp, 0o755)
        if os.path.isdir(demo_dir):
            old = demo_dir.rstrip("/") + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(demo_dir, old)
            os.replace(tmp, demo_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, demo_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return len(rows)
