"""What the segmentation route's fast path saves: the same endpoint, the same images, one
request through ``pading.serving.http.SegmentFastPath`` and the next through FastAPI's route.

Starts ``python pipelines/serve.py`` on the run's bundle (``--ingress``: ``serve.ingress``;
the default proxy) and sends the run's val images (``--size``: resized to that many pixels a
side, else as they are), one at a time over one keep-alive connection, alternating: a plain
query (``task=panoptic``), which the fast path answers, and the same query with a parameter
the route ignores (``ignored=1``), which only FastAPI's route answers. Both answers are the
same (tests/test_http_layer.py checks it); alternating request by request on one server
keeps the machine's drift out of the difference, which moves more between server starts
than the difference is (docs/performance.md, "The segmentation route").

    python benchmarks/segment_route.py --output outputs/demo [--ingress replica] [--size 640] [--requests 1200]

Prints, per path, the median round trip and the median of the answers' ``X-Process-Time-Ms``
(the route's own time, which both paths measure alike), and a last line of JSON.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import httpx
from stage_overhead import resized_bytes, running_endpoint, val_image_bytes  # this script's folder is on sys.path

from pading.run import RunLayout
from pading.serving.launch import free_port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=Path("outputs/demo"), help="a finished run (full.py --output)")
    parser.add_argument("--ingress", choices=("front", "replica"), default="front", help="serve.ingress")
    parser.add_argument("--size", type=int, default=None, help="resize the images to this many pixels a side")
    parser.add_argument("--requests", type=int, default=1200, help="requests in all (half on each path)")
    parser.add_argument("--warm-up", type=int, default=60, help="requests sent first and not counted")
    args = parser.parse_args()
    images = resized_bytes(val_image_bytes(args.output, 30), args.size)
    paths = {"fast path": {"task": "panoptic"}, "FastAPI route": {"task": "panoptic", "ignored": "1"}}
    round_trips = {name: [] for name in paths}
    inside = {name: [] for name in paths}
    log = args.output / "segment_route_serve.log"
    with running_endpoint(RunLayout(args.output).bundle, free_port(), log, [f"serve.ingress={args.ingress}"]) as url:
        with httpx.Client(timeout=60) as client:
            for k in range(args.warm_up + args.requests):
                name = list(paths)[k % 2]
                started = time.perf_counter()
                response = client.post(url + "v1/segment", params=paths[name], content=images[(k // 2) % len(images)])
                response.raise_for_status()
                if k >= args.warm_up:
                    round_trips[name].append(1000 * (time.perf_counter() - started))
                    inside[name].append(float(response.headers["X-Process-Time-Ms"]))
    size = f"{args.size} px" if args.size else "the images as they are"
    print(f"serve.ingress={args.ingress}, {size}, {args.requests} requests alternating (medians):")
    result = {}
    for name in paths:
        result[name] = {"round_trip_ms": statistics.median(round_trips[name]),
                        "route_ms": statistics.median(inside[name])}
        print(f"  {name}: round trip {result[name]['round_trip_ms']:.2f} ms, "
              f"the route's own time {result[name]['route_ms']:.2f} ms")
    saved = result["FastAPI route"]["round_trip_ms"] - result["fast path"]["round_trip_ms"]
    print(f"  the fast path saves {saved:.2f} ms a request")
    print(json.dumps({**result, "saved_ms": saved, "ingress": args.ingress, "size": args.size}))


if __name__ == "__main__":
    main()
