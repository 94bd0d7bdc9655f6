"""deployments.serve_compat: the private Ray Serve internals it patches are there on the installed Ray,
and a Ray without one fails loudly at start-up (no Ray cluster needed)."""
import asyncio
from types import SimpleNamespace

import pytest
import ray

from deployments import serve_compat

pytestmark = pytest.mark.timeout(60)


def test_checks_pass_on_installed_ray():
    assert ray.__version__ in serve_compat.CHECKED_RAY_VERSIONS
    serve_compat.check_ingress_internals()
    serve_compat.check_router_internals()
    serve_compat.check_router_internals(SimpleNamespace(_pending_requests_by_id={}))


@pytest.mark.parametrize("module,attr", [
    ("ray.serve.context", "_serve_request_context"),
    ("ray.serve.context", "_get_serve_request_context"),
    ("ray.serve.context", "_RequestContext"),
])
def test_ingress_check_names_the_missing_internal(monkeypatch, module, attr):
    monkeypatch.delattr(f"{module}.{attr}")
    with pytest.raises(RuntimeError, match=rf"{attr}.*Ray {ray.__version__}"):
        serve_compat.check_ingress_internals()


def test_router_check_names_the_missing_internal(monkeypatch):
    with pytest.raises(RuntimeError, match=rf"_pending_requests_by_id.*Ray {ray.__version__}"):
        serve_compat.check_router_internals(SimpleNamespace())  # a router whose constructor no longer sets it
    from ray.serve.request_router import RequestRouter

    monkeypatch.delattr(RequestRouter, "_get_pending_request_matching_internal_request_id")
    with pytest.raises(RuntimeError, match="_get_pending_request_matching_internal_request_id"):
        serve_compat.check_router_internals()


def test_router_constructor_runs_the_check(monkeypatch):
    from ray.serve.request_router import RequestRouter

    from deployments.router import PrefixAwareLoadRouter

    def serve_init_without_index(self, *args, **kwargs):  # a Serve release that renamed the index
        pass

    monkeypatch.setattr(RequestRouter, "__init__", serve_init_without_index)
    with pytest.raises(RuntimeError, match="_pending_requests_by_id"):
        PrefixAwareLoadRouter()


def test_own_request_id_gives_each_call_its_id_and_restores_the_context():
    from ray.serve import context as ctx

    async def main():
        token = ctx._serve_request_context.set(ctx._RequestContext(request_id="http", _internal_request_id="parent"))
        try:
            seen = []
            for _ in range(2):
                with serve_compat.own_request_id():
                    c = ctx._get_serve_request_context()
                    seen.append(c._internal_request_id)
                    assert c.request_id == "http"  # everything else kept
            assert ctx._get_serve_request_context()._internal_request_id == "parent"
            return seen
        finally:
            ctx._serve_request_context.reset(token)

    a, b = asyncio.run(main())
    assert a != b and "parent" not in (a, b)


def test_index_pending_request_points_the_index_at_the_request():
    def pending(rid, done=False):
        fut = SimpleNamespace(done=lambda: done)
        return SimpleNamespace(future=fut, metadata=SimpleNamespace(internal_request_id=rid))

    router = SimpleNamespace(_pending_requests_by_id={})
    first, second = pending("shared"), pending("shared")
    serve_compat.index_pending_request(router, first)
    serve_compat.index_pending_request(router, second)
    assert router._pending_requests_by_id["shared"] is second
    serve_compat.index_pending_request(router, pending("shared", done=True))  # fulfilled: left alone
    serve_compat.index_pending_request(router, None)
    assert router._pending_requests_by_id == {"shared": second}
