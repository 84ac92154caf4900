"""The dashboard lines: how to get in when the cluster asks for a token, nothing when not."""

from __future__ import annotations

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from hlbd_ray.cluster import auth_mode, dashboard_lines


def dashboard_answering(mode: str) -> ThreadingHTTPServer:
    """A stand-in for the dashboard's public /api/authentication_mode endpoint."""
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            body = json.dumps({"authentication_mode": mode}).encode()
            self.send_response(200 if self.path == "/api/authentication_mode" else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.mark.parametrize("mode", ["token", "disabled"])
def test_the_dashboard_says_how_to_get_in_only_when_it_asks_for_a_token(mode):
    server = dashboard_answering(mode)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        lines = dashboard_lines(url, auth_mode(url))
    finally:
        server.shutdown()
        server.server_close()
    assert lines[0] == f"Ray dashboard: {url}"
    if mode == "token":
        (hint,) = lines[1:]
        # The exact command, from this venv.
        assert f"`{Path(sys.executable).with_name('ray')} get-auth-token`" in hint
        assert Path(sys.executable).with_name("ray").is_file()
    else:
        assert lines[1:] == []


def test_a_dashboard_that_does_not_answer_falls_back_on_ray_auth_mode(monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    server = dashboard_answering("token")
    url = f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()   # nothing listens there any more
    assert auth_mode(url, timeout_s=1) == "disabled"
    monkeypatch.delenv("RAY_AUTH_MODE")
    assert auth_mode(url, timeout_s=1) == "token"    # Ray's default for a local cluster


def _address_seen_by_ray_code() -> tuple[str | None, str]:
    """What a Ray worker's own code (Train's placement-group cleaner, say) resolves as
    "the cluster" when it passes no address."""
    import os

    from ray._private.services import canonicalize_bootstrap_address_or_die

    return os.environ.get("RAY_ADDRESS"), canonicalize_bootstrap_address_or_die(None)


@pytest.mark.slow
def test_ray_code_in_workers_finds_its_own_cluster_beside_another_one(tmp_path):
    import os
    import signal
    import subprocess
    import tempfile

    import ray

    from hlbd_ray.cluster import start_ray
    from hlbd_ray.config import ClusterConfig

    # Another Ray on the same machine: unpinned, the lookup refuses ("multiple active
    # Ray instances") and Train's cleaner dies with it.
    ray_cli = str(Path(sys.executable).with_name("ray"))
    other = subprocess.Popen([ray_cli, "start", "--head", "--port=0", "--num-cpus=0", "--include-dashboard=false",
                              f"--temp-dir={tempfile.mkdtemp(prefix='rother-')}", "--block"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        start_ray(ClusterConfig(num_cpus=1))
        try:
            mine = ray.get_runtime_context().gcs_address
            env_address, resolved = ray.get(ray.remote(num_cpus=0)(_address_seen_by_ray_code).remote(), timeout=120)
            assert env_address == mine and resolved == mine
        finally:
            ray.shutdown()
    finally:
        os.killpg(other.pid, signal.SIGTERM)
        other.wait(timeout=60)
