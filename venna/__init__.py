"""Venna: a stateful Responses API gateway over gRPC, with an OpenAI-compatible HTTP shim.

One import namespace laid over the repository's folders (each entry here is a link to one):

* ``venna.responses.v1`` (``protos/``): the contract, generated from the .proto files;
* ``venna.server`` (``server/``): the gRPC services, authentication, validation, routing and the
  engine that builds, runs and stores responses;
* ``venna.backends`` (``backends/``): the models behind it, and the store;
* ``venna.gateway_http`` (``gateway_http/``): the HTTP shim, which reaches the service only
  through the contract;
* ``venna.cli`` (``cli/``): the ``venna`` command, the one place that composes them.
"""

from importlib import metadata

try:
    __version__ = metadata.version("venna")
except metadata.PackageNotFoundError:  # running from a checkout that was never installed
    __version__ = "0+unknown"
