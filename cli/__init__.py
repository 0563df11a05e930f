"""The ``venna`` command: the one place that composes the gRPC service, the HTTP shim and the
store into processes (``serve``, ``http``) and runs the store's maintenance (``keys``, ``usage``)."""

from venna.cli.commands import main

__all__ = ["main"]
