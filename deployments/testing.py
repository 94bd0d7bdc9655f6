"""Helpers to run the eeserve application inside an existing Ray session (tests, benchmarks).

``start_http()`` starts Serve's HTTP proxy on a port the OS reports free (never a fixed one) unless
Serve already runs; ``deploy(args, name)`` runs ``build_app(args)`` under ``/<name>`` and returns its
base URL; ``llm_handle(name)`` is a handle to that application's LLMServer deployment.
"""
from __future__ import annotations

import socket
import time
from typing import Optional

import httpx


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start_http() -> str:
    """Start Serve (if needed) with its HTTP proxy on a free port; returns ``http://host:port``."""
    from ray import serve
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
        client = _get_global_client()
    cfg = client.http_config
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "", None) else cfg.host
    return f"http://{host}:{cfg.port}"


def deploy(args: dict, name: str, timeout_s: float = 300.0) -> str:
    """``serve.run(build_app(args))`` as application ``name`` at ``/<name>``; returns its base URL
    (append ``/v1``) once ``/health`` answers."""
    from ray import serve

    from deployments import build_app

    base = start_http()
    serve.run(build_app(args), name=name, route_prefix=f"/{name}", blocking=False)
    url = f"{base}/{name}"
    wait_healthy(url, timeout_s)
    return url


def wait_healthy(url: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    last: Optional[str] = None
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{url}/health", timeout=30)
            if r.status_code == 200:
                return
            last = f"{r.status_code} {r.text[:200]}"
        except httpx.HTTPError as e:
            last = repr(e)
        time.sleep(0.5)
    raise TimeoutError(f"{url}/health not ready after {timeout_s}s: {last}")


def llm_handle(name: str):
    """DeploymentHandle of the application's LLMServer deployment."""
    from ray import serve

    return serve.get_deployment_handle("LLMServer", app_name=name)
