"""Ray's token authentication with the Ray CLI, as the README's "Ray CLI and token authentication"
section describes it: a ``ray start --head`` cluster whose token is in ``~/.ray/auth_token`` turns
token auth on by itself, and ``ray status`` then needs ``RAY_AUTH_MODE=token`` (else
``InvalidAuthToken``).

The cluster is private to this test: its own ``HOME`` (token file), ``--temp-dir`` (so no
``ray_current_cluster`` file lands in the default temp dir that the session's ``ray.init()`` reads),
free ports, no dashboard; the subprocesses get a clean environment (a session ``ray.init()`` sets
``RAY_AUTH_MODE=token`` in ``os.environ``). Teardown kills only this cluster's processes (its own
process session, its temp dir or its ports in the command line), never ``ray stop``, which would
stop every Ray instance on the machine.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

RAY = [sys.executable, "-m", "ray.scripts.scripts"]
AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS", "RAY_TMPDIR",
             "RAY_DASHBOARD_ADDRESS")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(home: str, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in AUTH_VARS}
    env.update(HOME=home, RAY_USAGE_STATS_ENABLED="0", **extra)
    return env


def _run(args, env, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run(RAY + args, env=env, capture_output=True, text=True, timeout=timeout)


def _status_ok(address: str, env: dict, deadline_s: float = 60.0) -> subprocess.CompletedProcess:
    """``ray status`` with retries while the freshly started head reports "No cluster status" (its
    autoscaler state arrives a few seconds after ``ray start`` returns)."""
    end = time.monotonic() + deadline_s
    while True:
        r = _run(["status", "--address", address], env)
        if r.returncode != 0 or "Autoscaler status" in r.stdout or time.monotonic() > end:
            return r
        time.sleep(2)


def _kill_cluster(sid: int, markers: list[str]) -> None:
    import psutil

    found = {}
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            if p.pid != os.getpid() and (os.getsid(p.pid) == sid or any(m in cmd for m in markers)):
                found[p.pid] = p
        except (psutil.Error, OSError):
            continue
    for p in list(found.values()):
        try:
            for c in p.children(recursive=True):
                found[c.pid] = c
        except psutil.Error:
            pass
    for p in found.values():
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(list(found.values()), timeout=10)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass


@pytest.fixture
def token_head():
    """(gcs address, env with the token file in HOME, token): a one-node cluster with token auth."""
    root = tempfile.mkdtemp(prefix="eeray-")  # short: Ray's socket paths must stay < 108 chars
    home, temp_dir = os.path.join(root, "home"), os.path.join(root, "ray")
    os.makedirs(home)
    env = _env(home)
    gen = _run(["get-auth-token", "--generate"], env)
    assert gen.returncode == 0, gen.stderr
    token = gen.stdout.strip()
    with open(os.path.join(home, ".ray", "auth_token")) as f:
        assert f.read().strip() == token and len(token) == 64

    port, client_port = _free_port(), _free_port()
    start = subprocess.Popen(
        RAY + ["start", "--head", "--num-cpus", "1", "--port", str(port), "--include-dashboard", "false",
               "--ray-client-server-port", str(client_port), "--temp-dir", temp_dir, "--disable-usage-stats"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    markers = [temp_dir, f"--port={client_port}", f":{port} "]
    try:
        out, _ = start.communicate(timeout=90)
        assert start.returncode == 0, out
        # RAY_AUTH_MODE unset + a token in ~/.ray/auth_token: `ray start --head` turns token auth on
        assert "Token authentication is enabled" in out, out
        yield f"127.0.0.1:{port}", env, token
    finally:
        if start.poll() is None:
            start.kill()
        _kill_cluster(start.pid, markers)
        shutil.rmtree(root, ignore_errors=True)


def test_ray_status_needs_auth_mode_token(token_head):
    address, env, token = token_head
    # the token file alone is not enough for the CLI: it sends no token unless RAY_AUTH_MODE=token
    r = _run(["status", "--address", address], env)
    assert r.returncode != 0 and "InvalidAuthToken" in r.stdout + r.stderr, r.stdout + r.stderr

    r = _status_ok(address, {**env, "RAY_AUTH_MODE": "token"})
    assert r.returncode == 0 and "Autoscaler status" in r.stdout, r.stdout + r.stderr

    # the token from the environment instead of ~/.ray/auth_token (another machine, CI)
    elsewhere = tempfile.mkdtemp(prefix="eeray-home-")
    try:
        r = _status_ok(address, {**env, "HOME": elsewhere, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token})
        assert r.returncode == 0 and "Autoscaler status" in r.stdout, r.stdout + r.stderr
    finally:
        shutil.rmtree(elsewhere, ignore_errors=True)

    r = _run(["status", "--address", address], {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64})
    assert r.returncode != 0 and "InvalidAuthToken" in r.stdout + r.stderr, r.stdout + r.stderr
