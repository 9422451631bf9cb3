"""What one offloaded frame costs on the link, for a picture of your own camera.

    python tools/frame_cost.py FRAME.jpg [--rate 0.1] [--slot-ms 200] [--size 236x236 ...]

Encodes the picture as offload-run would (offload.device.payload.Payload:
shrunk to fit each --size, PNG and JPEG at a few qualities) and prints the
bytes per frame and the link rate a device needs at --rate offloads per
slot (tokens per slot, the paper's r) and one frame per --slot-ms.
"""

from __future__ import annotations

import argparse
import sys

import cv2

from offload.device.payload import Payload, parse_size


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("image")
    ap.add_argument("--rate", type=float, default=0.1, help="offloads per slot (r, tokens/slot)")
    ap.add_argument("--slot-ms", type=float, default=200.0, help="one frame per slot, ms")
    ap.add_argument("--size", action="append", default=None,
                    help="WxH to shrink to (repeatable; default: whole, 640x640, 236x236)")
    args = ap.parse_args(argv)
    frame = cv2.imread(args.image, cv2.IMREAD_COLOR)
    if frame is None:
        sys.exit(f"Error: {args.image}: not an image OpenCV can read")
    sizes = [None] + [parse_size(s) for s in (args.size or ["640x640", "236x236"])]
    per_s = args.rate * 1000.0 / args.slot_ms     # offloads per second at the bucket's rate
    print(f"{args.image}: {frame.shape[1]}x{frame.shape[0]}; r = {args.rate:g} at one frame "
          f"per {args.slot_ms:g} ms = {per_s:g} offloads/s")
    print(f"{'send size':>10} {'format':>9} {'bytes/frame':>12} {'Mbit/s at r':>12}")
    for size in sizes:
        for fmt, q in (("png", 90), ("jpeg", 95), ("jpeg", 90), ("jpeg", 75)):
            body, _ = Payload(fmt=fmt, quality=q, size=size).encode(frame)
            name = "whole" if size is None else f"{size[0]}x{size[1]}"
            label = fmt if fmt == "png" else f"jpeg {q}"
            print(f"{name:>10} {label:>9} {len(body):>12} {len(body) * 8 * per_s / 1e6:>12.3f}")


if __name__ == "__main__":
    main()
