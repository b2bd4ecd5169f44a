"""The trained model as a product (the bundle on disk is :mod:`pading.bundle`; ``bundle``
here re-exports it for old imports).

The endpoint without Ray (docs/serving.md; pipelines/serve.py only wires these into Ray Serve):

- ``service``: the endpoint's logic without HTTP: decoding and checking requests, the
  segmentation answers, run-time classes and named vocabularies, the HTTP status of each error;
- ``vocabularies``: the durable, versioned vocabulary store shared by the replicas;
- ``http``: the FastAPI app and its routes, the JSON errors, the request models, size-limited
  uploads and the answers' headers; the routes reach the replicas through an ``HttpFront``;
- ``replica``: ``Replica``, a model replica: the bundle and its services, per-item error
  isolation, a batch's requests grouped by vocabulary, answers tagged with the replica;
- ``metrics``: ``EndpointMetrics``, the application metrics over any metrics backend;
- ``launch``: the deployments' options and arguments, the command lines, waiting for Ctrl-C;
- ``loadtest``: the load generator of pipelines/loadtest.py.

Overlays (``visualize``), and batch segmentation of image collections (``inputs``: listing
and reading the images; ``batch``: the shard worker and the output formats of
pipelines/segment.py)."""
