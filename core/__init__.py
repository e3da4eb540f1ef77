"""The bottom layer: pieces every other package shares (typed errors, the Host seam, atomic
writes). It imports nothing else of the project, so probes/, reports/ and agent/ can all build
on it without importing each other downwards; tests/test_layers.py enforces the direction."""

__version__ = "0.1.0"
