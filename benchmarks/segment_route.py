"""Two ways of sending the same segmentation requests to one endpoint, alternating request by
request, so the machine's drift between server starts (larger than the differences measured
here) stays out of the comparison (docs/performance.md, "The segmentation route"):

- ``--compare route`` (the default): through ``pading.serving.http.SegmentFastPath`` (a plain
  query, ``task=panoptic``) and through FastAPI's route (the same query with a parameter the
  route ignores, ``ignored=1``, which keeps it off the fast path). Both give the same answer
  (tests/test_http_layer.py checks it).
- ``--compare client``: the fast path, sent with the standard library's ``http.client``
  (``stage_overhead.PlainClient``, what the benchmarks' endpoint rows use) and with httpx: the
  client's own share of a request's round trip.

Starts ``python pipelines/serve.py`` on the run's bundle (``--ingress``: ``serve.ingress``;
the default proxy) and sends the run's val images (``--size``: resized to that many pixels a
side, else as they are), one at a time, each way over its own keep-alive connection.

    python benchmarks/segment_route.py --output outputs/demo [--ingress replica] [--size 640] [--compare client]

Prints, per way, the median round trip and the median of the answers' ``X-Process-Time-Ms``
(the route's own time, which both ways measure alike), and a last line of JSON.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import httpx

from pading.run import RunLayout
from pading.serving.launch import free_port


def main() -> None:
    from stage_overhead import (  # this folder is on sys.path
        PlainClient,
        resized_bytes,
        running_endpoint,
        val_image_bytes,
    )

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=Path("outputs/demo"), help="a finished run (full.py --output)")
    parser.add_argument("--ingress", choices=("front", "replica"), default="front", help="serve.ingress")
    parser.add_argument("--size", type=int, default=None, help="resize the images to this many pixels a side")
    parser.add_argument("--compare", choices=("route", "client"), default="route")
    parser.add_argument("--requests", type=int, default=1200, help="requests in all (half each way)")
    parser.add_argument("--warm-up", type=int, default=60, help="requests sent first and not counted")
    args = parser.parse_args()
    images = resized_bytes(val_image_bytes(args.output, 30), args.size)
    log = args.output / "segment_route_serve.log"
    with running_endpoint(RunLayout(args.output).bundle, free_port(), log, [f"serve.ingress={args.ingress}"]) as url:
        plain, httpx_client = PlainClient(url), httpx.Client(timeout=60)

        def by_plain(data: bytes, params: dict) -> float:
            return float(plain.post("/v1/segment", data, params).getheader("X-Process-Time-Ms"))

        def by_httpx(data: bytes, params: dict) -> float:
            response = httpx_client.post(url + "v1/segment", params=params, content=data)
            return float(response.raise_for_status().headers["X-Process-Time-Ms"])

        if args.compare == "route":
            ways = {"fast path": (by_plain, {"task": "panoptic"}),
                    "FastAPI route": (by_plain, {"task": "panoptic", "ignored": "1"})}
        else:
            ways = {"http.client": (by_plain, {"task": "panoptic"}), "httpx": (by_httpx, {"task": "panoptic"})}
        round_trips = {name: [] for name in ways}
        inside = {name: [] for name in ways}
        try:
            for k in range(args.warm_up + args.requests):
                name = list(ways)[k % 2]
                send, params = ways[name]
                started = time.perf_counter()
                route_ms = send(images[(k // 2) % len(images)], params)
                if k >= args.warm_up:
                    round_trips[name].append(1000 * (time.perf_counter() - started))
                    inside[name].append(route_ms)
        finally:
            plain.close()
            httpx_client.close()
    size = f"{args.size} px" if args.size else "the images as they are"
    print(f"serve.ingress={args.ingress}, {size}, {args.requests} requests alternating (medians):")
    result = {}
    for name in ways:
        result[name] = {"round_trip_ms": statistics.median(round_trips[name]),
                        "route_ms": statistics.median(inside[name])}
        print(f"  {name}: round trip {result[name]['round_trip_ms']:.2f} ms, "
              f"the route's own time {result[name]['route_ms']:.2f} ms")
    first, second = list(ways)
    saved = result[second]["round_trip_ms"] - result[first]["round_trip_ms"]
    print(f"  {first} takes {saved:.2f} ms less a request than {second}")
    print(json.dumps({**result, "difference_ms": saved, "compare": args.compare, "ingress": args.ingress,
                      "size": args.size}))


if __name__ == "__main__":
    main()
