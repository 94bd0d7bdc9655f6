"""Shared by the tests/test_cluster_*.py modules: each runs its scenario in a subprocess of its own
(``python tests/test_cluster_x.py <out.json> <tiny model dir>``) that starts a private simulated
multi-node Ray cluster (:class:`deployments.sim_cluster.SimCluster`), so it never meets the test
session's local Ray instance; the scenario writes what it saw as JSON, and the test asserts on it.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"replica_num_cpus": 0.05, "num_cpus_per_rank": 0.05, "ingress_num_cpus": 0.05, "num_blocks": 256,
         "max_num_seqs": 16, "routing_stats_period_s": 0.5, "health_check_period_s": 1.0,
         "health_check_timeout_s": 10.0}


def run_scenario(test_file: str, tmp_path, model_dir: str, timeout_s: float, *extra: str) -> dict:
    """Run ``test_file`` as a script (its ``main``) in its own session; returns its JSON result.

    Raises AssertionError with the script's output tail if it fails or runs out of time."""
    out = Path(tmp_path) / "result.json"
    log = Path(tmp_path) / "scenario.log"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "SCENARIO_DEADLINE_S": str(timeout_s - 15)}
    env.pop("RAY_ADDRESS", None)
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, test_file, str(out), model_dir, *extra], stdout=f,
                                stderr=subprocess.STDOUT, env=env, cwd=str(ROOT), start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the scenario's own process group only
            proc.wait()
            rc = "timeout"
    tail = log.read_text()[-6000:]
    assert rc == 0 and out.exists(), f"scenario failed (rc={rc}):\n{tail}"
    result = json.loads(out.read_text())
    print(json.dumps({k: v for k, v in result.items() if k != "requests"}, indent=1))
    return result


def scenario_main(body: Callable[[str, str], dict]) -> None:
    """Entry point of a scenario script: ``body(model_dir, workdir) -> result``, written as JSON.

    A watchdog ends the process (after its cluster) at ``SCENARIO_DEADLINE_S``."""
    out, model_dir = sys.argv[1], sys.argv[2]
    deadline = float(os.environ.get("SCENARIO_DEADLINE_S", "280"))

    def watchdog():
        time.sleep(deadline)
        print(f"scenario deadline ({deadline}s) passed", flush=True)
        cleanup = Scenario.current
        if cleanup is not None:
            try:
                cleanup.sim.shutdown()
            except Exception as e:  # noqa: BLE001
                print("shutdown failed:", repr(e), flush=True)
        os._exit(3)

    threading.Thread(target=watchdog, daemon=True).start()
    result = body(model_dir, os.path.dirname(out))
    with open(out, "w") as f:
        json.dump(result, f, indent=1, default=str)
    os._exit(0)  # Ray's exit hooks already ran in shutdown; do not wait for stray threads


class Scenario:
    """A simulated cluster with Serve on its head node (HTTP proxy on the head only, free port)."""

    current: Optional["Scenario"] = None

    def __init__(self, sim):
        from ray import serve

        from deployments.testing import free_port

        Scenario.current = self
        self.sim = sim
        self.t0 = time.monotonic()
        sim.connect()
        port = free_port()
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        self.base = f"http://127.0.0.1:{port}"
        self.timeline: list[dict] = []
        self.events: list[dict] = []
        self._stop = threading.Event()
        self._sampler: Optional[threading.Thread] = None

    def now(self) -> float:
        return round(time.monotonic() - self.t0, 2)

    def event(self, what: str, **kw) -> None:
        e = {"t": self.now(), "event": what, **kw}
        print(json.dumps(e), flush=True)
        self.events.append(e)

    def deploy(self, args: dict, name: str, timeout_s: float = 150.0) -> str:
        from ray import serve

        from deployments import build_app
        from deployments.testing import wait_healthy

        serve.run(build_app(args), name=name, route_prefix=f"/{name}", blocking=False)
        url = f"{self.base}/{name}"
        wait_healthy(url, timeout_s)
        self.event("healthy", app=name)
        return url

    def replicas(self, app: str) -> dict:
        """LLMServer replica states of ``app`` -> count (RUNNING, STARTING, STOPPING, ...)."""
        from ray import serve

        try:
            dep = serve.status().applications[app].deployments["LLMServer"]
            return {str(k): v for k, v in dep.replica_states.items() if v}
        except Exception:  # noqa: BLE001 - not deployed yet
            return {}

    def sample(self, app: str, period_s: float = 1.0) -> None:
        """Record replicas (of ``self.app``, which may change) and alive nodes every ``period_s`` (in a
        thread) until :meth:`close`."""
        self.app = app

        def loop():
            while not self._stop.is_set():
                try:
                    nodes = self.sim.alive_nodes()
                    self.timeline.append({"t": self.now(), "app": self.app, "replicas": self.replicas(self.app),
                                          "nodes": len(nodes)})
                except Exception as e:  # noqa: BLE001 - a node going away mid-call
                    print("sample failed:", repr(e), flush=True)
                self._stop.wait(period_s)

        self._sampler = threading.Thread(target=loop, daemon=True)
        self._sampler.start()

    def close(self) -> None:
        self._stop.set()
        if self._sampler is not None:
            self._sampler.join(10)
        self.sim.shutdown()
        Scenario.current = None


def compact_timeline(timeline: list[dict]) -> list[dict]:
    """Only the samples where replicas or nodes changed (plus the first and the last)."""
    out = []
    for s in timeline:
        key = (s.get("app"), s["nodes"], tuple(sorted(s["replicas"].items())))
        if not out or key != out[-1]["_key"]:
            out.append({**s, "_key": key})
    if timeline and out[-1]["t"] != timeline[-1]["t"]:
        out.append({**timeline[-1], "_key": None})
    return [{k: v for k, v in s.items() if k != "_key"} for s in out]
