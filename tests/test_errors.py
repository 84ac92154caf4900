"""The command-line wrapper every job runs under (hlbd_ray/errors.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

from .conftest import REPO

# A job whose main thread waits on a worker thread, the shape of a driver stuck in a wait.
STUCK_JOB = textwrap.dedent("""
    import sys, threading, time
    from hlbd_ray.errors import run_cli

    def waiting_for_the_answer(done):
        done.wait(30)

    def main(argv):
        done = threading.Event()
        worker = threading.Thread(target=waiting_for_the_answer, args=(done,))
        worker.start()
        print("ready", flush=True)
        time.sleep(2)
        done.set()
        worker.join()
        print("finished", flush=True)
        return 0

    sys.exit(run_cli(main))
""")


def test_sigquit_prints_every_threads_stack_and_the_job_goes_on():
    proc = subprocess.Popen([sys.executable, "-c", STUCK_JOB], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGQUIT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "finished" in out
    assert "waiting_for_the_answer" in err and "main" in err     # both threads' stacks


# A finished job with an S3 upload that never returns: a server that accepts the
# connection and never answers, and a request timeout longer than the test.
STUCK_UPLOAD_JOB = textwrap.dedent("""
    import socket, sys, tempfile, threading
    import pyarrow.fs
    from hlbd_ray import storage
    from hlbd_ray.errors import run_cli

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    threading.Thread(target=lambda: [server.accept() for _ in range(8)], daemon=True).start()
    s3 = pyarrow.fs.S3FileSystem(endpoint_override=f"127.0.0.1:{server.getsockname()[1]}",
                                 scheme="http", access_key="k", secret_key="s", region="us-east-1",
                                 request_timeout=600, connect_timeout=5)
    source = tempfile.mkdtemp()
    open(source + "/state.json", "w").write("{}")

    def upload():
        pyarrow.fs.copy_files(source, "bucket/run", destination_filesystem=s3)

    def main(argv):
        threading.Thread(target=upload, name="uploader", daemon=True).start()
        print("work done", flush=True)
        return 5

    storage.STUCK_CALLS_GRACE_S = 2.0
    sys.exit(run_cli(main))
""")


def test_a_finished_job_does_not_wait_forever_for_a_stuck_storage_call():
    env = {**os.environ, "AWS_EC2_METADATA_DISABLED": "true"}
    proc = subprocess.run([sys.executable, "-c", STUCK_UPLOAD_JOB], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 5, proc.stderr        # the job's own exit code, not a kill
    assert "work done" in proc.stdout
    assert "not waiting for 1 storage call(s)" in proc.stderr and "uploader in copy_files" in proc.stderr
