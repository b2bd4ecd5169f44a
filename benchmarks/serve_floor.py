"""Ray Serve's own floor: what an endpoint of this project's shape costs when it does no work.

Deploys two no-op applications on a fresh local Ray and sends them the same requests the
endpoint gets in ``benchmarks/stage_overhead.py`` (the run's val images, as they are and
resized), one at a time over one keep-alive connection:

- ``two deployments``: the endpoint's shape (pipelines/serve.py). A FastAPI ingress with no
  CPUs reserved reads the body and passes it through a handle to a second deployment with
  ``serve.num_cpus`` CPUs, which answers a small JSON object (about the size of a 64 px
  image's segments).
- ``one deployment``: a FastAPI ingress that reads the body and answers the same object
  itself: the least any Ray Serve HTTP endpoint costs.

Whatever the endpoint takes above the first is the project's own per-request cost (its
routes, the model replica's handling, the forward pass); the second bounds what merging the
front into the model replica could save (docs/performance.md, "Serve's own floor").

    python benchmarks/serve_floor.py --output outputs/demo [--sizes demo,640] [--requests 30] [--proxy haproxy]

Prints a line per application and size, and a last line of JSON:
``{"<size>": {"two deployments": ms, "one deployment": ms}}`` (median ms per request).
"""

import argparse
import json
import os
from pathlib import Path

from fastapi import FastAPI, Request
from ray import serve

#: The answer of the no-op model: about the size of a 64 px image's JSON segments.
ANSWER = {"panoptic": [{"id": 1, "category_id": 1, "score": 0.5, "rle": "x" * 700}]}


two_app, one_app = FastAPI(), FastAPI()


@serve.deployment(name="NoOpModel")
class NoOpModel:
    async def segment(self, data: bytes) -> dict:
        return {**ANSWER, "bytes": len(data)}


@serve.deployment(name="NoOpFront", ray_actor_options={"num_cpus": 0})
@serve.ingress(two_app)
class NoOpFront:
    def __init__(self, model):
        self.model = model

    @two_app.post("/v1/segment")
    async def segment(self, request: Request) -> dict:
        return await self.model.segment.remote(await request.body())


@serve.deployment(name="NoOpIngress", ray_actor_options={"num_cpus": 0})
@serve.ingress(one_app)
class NoOpIngress:
    @one_app.post("/v1/segment")
    async def segment(self, request: Request) -> dict:
        return {**ANSWER, "bytes": len(await request.body())}


def floor(payloads: dict[str, list[bytes]], port: int, num_cpus: float,
          proxy: str = "ray") -> dict[str, dict[str, float]]:
    """{size label: {application: median ms}} for the request bodies of each size label, behind
    ``proxy`` (``serve.proxy``: this script's Ray starts with the environment the endpoint's
    Serve would get, :func:`pading.serving.launch.proxy_env`)."""
    import ray
    from stage_overhead import PlainClient, median_call_ms  # this script's folder is on sys.path

    from pading.config import ServeConfig
    from pading.serving.launch import proxy_env

    os.environ.update(proxy_env(ServeConfig(proxy=proxy), nodes=1))  # before Ray starts: all its processes get it
    ray.init(include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        model = NoOpModel.options(ray_actor_options={"num_cpus": num_cpus})
        serve.run(NoOpFront.bind(model.bind()), name="floor-two", route_prefix="/two")
        serve.run(NoOpIngress.bind(), name="floor-one", route_prefix="/one")
        results: dict[str, dict[str, float]] = {}
        with PlainClient(f"http://127.0.0.1:{port}/") as client:  # the client of stage_overhead's endpoint rows
            for label, images in payloads.items():
                results[label] = {}
                for name, prefix in (("two deployments", "two"), ("one deployment", "one")):
                    path = f"/{prefix}/v1/segment"
                    results[label][name] = median_call_ms(lambda data, path=path: client.post(path, data), images)
                    print(f"serve floor, {label}: {name} {results[label][name]:.2f} ms", flush=True)
        serve.shutdown()
    finally:
        ray.shutdown()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, required=True, help="a finished run (its val images are the bodies)")
    parser.add_argument("--sizes", default="demo", help="'demo' (the val images as they are) or a long side in px")
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--port", type=int, default=8766)
    parser.add_argument("--num-cpus", type=float, default=1.0, help="the no-op model's CPUs (serve.num_cpus)")
    parser.add_argument("--proxy", default="ray", choices=["ray", "haproxy"], help="serve.proxy")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from stage_overhead import resized_bytes, val_image_bytes  # this script's folder is on sys.path

    originals = val_image_bytes(args.output.resolve(), args.requests)
    payloads = {size: resized_bytes(originals, None if size == "demo" else int(size)) for size in args.sizes.split(",")}
    print(json.dumps(floor(payloads, args.port, args.num_cpus, args.proxy)))


if __name__ == "__main__":
    main()
