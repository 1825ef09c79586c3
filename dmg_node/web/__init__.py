"""A read-only web status page and Prometheus metrics, served next to the DICOM node.

- :mod:`.metrics`: the Prometheus metrics (a private registry) and the collector that reads the
  spool at scrape time. Imported by the SCP and the pipeline, so it imports only prometheus_client.
- :mod:`.render`: a PNG of an RTSTRUCT's contour drawn on a few slices of its series.
- :mod:`.app`: the Starlette app (GET only) built from the spool's read-only queries.
- :mod:`.server`: uvicorn in a daemon thread, started and stopped by :mod:`dmg_node.node`.
"""
