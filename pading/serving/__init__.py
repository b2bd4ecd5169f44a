"""The trained model as a product: the bundle on disk (``bundle``), the endpoint's logic
without HTTP or Ray (``service``) and overlays (``visualize``)."""
