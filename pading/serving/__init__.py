"""The trained model as a product (the bundle on disk is :mod:`pading.bundle`; ``bundle``
here re-exports it for old imports): the endpoint's logic without HTTP or Ray
(``service``), overlays (``visualize``), and batch segmentation of image collections
(``inputs``: listing and reading the images; ``batch``: the shard worker and the output
formats of pipelines/segment.py), and the endpoint's load generator (``loadtest``)."""
