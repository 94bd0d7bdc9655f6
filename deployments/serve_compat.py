"""The two patches of private Ray Serve internals, in one place, checked at start-up.

One Serve routing bug, two patches. Serve gives every handle call made inside a request the
parent's internal request id, and its request router indexes pending requests by that id
(``RequestRouter._pending_requests_by_id``): of several concurrent calls of one HTTP request (``n``
> 1, several prompts), all but one are never fulfilled and their routing loops spin in
``choose_replicas`` (100% CPU).

* Ingress side (:func:`own_request_id`): each ``generate.remote`` runs with a fresh
  ``_internal_request_id`` in Serve's ``_serve_request_context`` (a private ``ContextVar`` holding a
  frozen ``_RequestContext``).
* Router side (:func:`index_pending_request`): ``choose_replicas`` points the index entry at the
  request being routed now, in case two calls still share an id.

Both touch private names that a Serve release may rename, which would turn every generation into a
500 (ingress) or silently disable the fix (router). :func:`check_ingress_internals` and
:func:`check_router_internals` run in the ingress's and the router's constructors and raise
:class:`RuntimeError` naming the missing internal and the installed Ray version instead.
Checked against Ray :data:`CHECKED_RAY_VERSIONS`; another version logs a warning at the first check
and runs if the internals are there.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import uuid
from typing import Any, Iterator

import ray

logger = logging.getLogger("ray.serve")
CHECKED_RAY_VERSIONS = ("2.60.0",)  # the Ray releases whose Serve internals these patches were read from
_warned = False


def _missing(what: str) -> RuntimeError:
    return RuntimeError(
        f"eeserve's Ray Serve patch needs the private Serve internal {what}, which Ray {ray.__version__} "
        f"does not have (checked against Ray {', '.join(CHECKED_RAY_VERSIONS)}); see deployments/serve_compat.py")


def _check_version() -> None:
    global _warned
    if ray.__version__ not in CHECKED_RAY_VERSIONS and not _warned:
        _warned = True
        logger.warning("deployments.serve_compat: Ray %s is not one of the checked versions %s; the Serve "
                       "internals it patches are present", ray.__version__, CHECKED_RAY_VERSIONS)


def check_ingress_internals() -> None:
    """Check what :func:`own_request_id` patches: ``ray.serve.context._serve_request_context`` (a
    ContextVar), ``_get_serve_request_context()`` and the dataclass field
    ``_RequestContext._internal_request_id``.

    Raises:
        RuntimeError: one of them is gone (the message names it and the Ray version).
    """
    from ray.serve import context as ctx

    var = getattr(ctx, "_serve_request_context", None)
    if var is None or not all(hasattr(var, m) for m in ("get", "set", "reset")):
        raise _missing("ray.serve.context._serve_request_context (a ContextVar)")
    getter = getattr(ctx, "_get_serve_request_context", None)
    if not callable(getter) or inspect.signature(getter).parameters:
        raise _missing("ray.serve.context._get_serve_request_context() (no arguments)")
    cls = getattr(ctx, "_RequestContext", None)
    if cls is None or not dataclasses.is_dataclass(cls) or \
            "_internal_request_id" not in {f.name for f in dataclasses.fields(cls)}:
        raise _missing("ray.serve.context._RequestContext._internal_request_id (a dataclass field)")
    _check_version()


def check_router_internals(router: Any = None) -> None:
    """Check what :func:`index_pending_request` patches: the index
    ``RequestRouter._pending_requests_by_id`` (a dict on ``router``, when given: it is set by
    Serve's constructor), the lookup that reads it
    (``RequestRouter._get_pending_request_matching_internal_request_id``) and
    ``RequestMetadata.internal_request_id``.

    Raises:
        RuntimeError: one of them is gone (the message names it and the Ray version).
    """
    from ray.serve._private.common import RequestMetadata
    from ray.serve.request_router import RequestRouter

    if not callable(getattr(RequestRouter, "_get_pending_request_matching_internal_request_id", None)):
        raise _missing("RequestRouter._get_pending_request_matching_internal_request_id")
    if not dataclasses.is_dataclass(RequestMetadata) or \
            "internal_request_id" not in {f.name for f in dataclasses.fields(RequestMetadata)}:
        raise _missing("RequestMetadata.internal_request_id")
    if router is not None and not isinstance(getattr(router, "_pending_requests_by_id", None), dict):
        raise _missing("RequestRouter._pending_requests_by_id (a dict set by its constructor)")
    _check_version()


@contextlib.contextmanager
def own_request_id() -> Iterator[None]:
    """Handle calls made inside this block get a fresh internal request id (their own entry in the
    router's index) instead of the enclosing HTTP request's; the context is restored on exit."""
    from ray.serve import context as ctx

    current = ctx._get_serve_request_context()
    token = ctx._serve_request_context.set(dataclasses.replace(current, _internal_request_id=uuid.uuid4().hex))
    try:
        yield
    finally:
        ctx._serve_request_context.reset(token)


def index_pending_request(router: Any, pending_request: Any) -> None:
    """Point ``router``'s pending-request index entry for ``pending_request``'s internal id at it.

    Serve fulfils the pending request it finds under ``internal_request_id`` in
    ``_pending_requests_by_id``; calls sharing that id would leave all but one unfulfilled. A no-op
    for a request already fulfilled."""
    if pending_request is not None and not pending_request.future.done():
        router._pending_requests_by_id[pending_request.metadata.internal_request_id] = pending_request
