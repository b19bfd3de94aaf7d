"""Lava processes for TTFS networks (interfaces in process.py, implementations in models.py).

Only Process and ProcessModel modules belong in this folder: Lava imports every
.py file beside a Process when it looks for its models. The deployment that
builds and runs these processes lives in neurodeploy/backends/lava.py.
"""
