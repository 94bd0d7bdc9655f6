"""The soak benchmark for 60 seconds (tiny model, two replicas, its own local Ray in a subprocess):
random client disconnects, 10% invalid requests, one replica killed midway. No request may hang or
be cut without an error object, no KV block may stay in use after the load, the killed replica's
requests get error objects, and the other requests succeed."""
import json
import os
import subprocess
import sys

import pytest

from cluster_common import ROOT

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]


def test_soak_60s(tmp_path, tiny_model_dir):
    env = {**os.environ, "EESERVE_BENCH_RESULTS": str(tmp_path)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "bench.soak", "--minutes", "1", "--model", tiny_model_dir,
                           "--replicas", "2", "--num-cpus", "4", "--concurrency", "6", "--max-tokens", "48",
                           "--sample-s", "5", "--timeout", "60", "--out", "soak-60s"],
                          cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=280)
    print(proc.stdout[-3000:])
    out_file = tmp_path / "soak-60s.json"
    assert out_file.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(out_file.read_text())
    s = out["summary"]
    assert s["hung"] == 0 and s["cut"] == 0, out["bad_examples"]
    assert out["kv_blocks_in_use_after"] == 0 and not out["integrity_errors"], out["replicas_after"]
    assert out["killed_replica"] is not None
    assert s["ok"] > 20 and s["by_kind"]["bad"]["error"] == s["by_kind"]["bad"]["total"] > 0, s
    assert s["disconnected"] > 0, s
    # besides the invalid requests, only requests in flight on the killed replica failed (503 error objects)
    errs = {k: v for k, v in out["errors_by_status"].items() if not k.startswith("bad")}
    assert all(k.endswith("engine_unavailable") for k in errs), errs
    assert proc.returncode == 0, proc.stdout[-2000:]
