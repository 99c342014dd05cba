#!/usr/bin/env python3
"""Init time of a function bootstrap: from process start to its first call for work.

Runs BOOTSTRAP (a built function binary: target/release/deliver, or a cargo lambda bootstrap)
RUNS times with the Lambda runtime API pointed at a stub on a loopback port, and times each
run from just before the process is started to the moment its first
`GET /2018-06-01/runtime/invocation/next` arrives: exec, loading, `Handler::from_env` (AWS
settings from the environment, the clients, the registry) and the runtime's start. The stub
never hands out an event; the process is killed once it asks. The binary is read once before
the runs, so every run finds it in the page cache (Lambda's own download and unpacking of the
code is not in these figures). Prints the size, then the median, lowest and highest time.

usage: scripts/cold-start.py BOOTSTRAP [RUNS]
"""
import http.server
import os
import statistics
import subprocess
import sys
import threading
import time


class Stub(http.server.BaseHTTPRequestHandler):
    asked = threading.Event()
    asked_at = 0

    def do_GET(self):
        if self.path.endswith("/runtime/invocation/next") and not Stub.asked.is_set():
            Stub.asked_at = time.perf_counter_ns()
            Stub.asked.set()
        # No event: the process is killed while it waits.
        time.sleep(5)

    def log_message(self, *args):
        pass


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    bootstrap = sys.argv[1]
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 30
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    queue = "http://127.0.0.1:1/000000000000/dualsync-bench-"
    env = dict(
        os.environ,
        AWS_LAMBDA_RUNTIME_API=f"127.0.0.1:{server.server_address[1]}",
        AWS_LAMBDA_FUNCTION_NAME="bench",
        AWS_LAMBDA_FUNCTION_MEMORY_SIZE="256",
        AWS_LAMBDA_FUNCTION_VERSION="$LATEST",
        AWS_LAMBDA_LOG_STREAM_NAME="bench",
        AWS_LAMBDA_LOG_GROUP_NAME="bench",
        AWS_REGION="us-east-1",
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_EC2_METADATA_DISABLED="true",
        DUALSYNC_TABLE="dualsync-bench-state",
        CAPTURE_QUEUE_URL=queue + "capture",
        SEQUENCE_QUEUE_URL=queue + "sequence",
        DELIVER_QUEUE_URL=queue + "deliver.fifo",
        RECONCILE_QUEUE_URL=queue + "reconcile.fifo",
        RUST_LOG="error",
    )
    with open(bootstrap, "rb") as f:
        size = len(f.read())
    times = []
    for _ in range(runs):
        Stub.asked.clear()
        started = time.perf_counter_ns()
        p = subprocess.Popen([bootstrap], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if not Stub.asked.wait(10):
            p.kill()
            err = p.communicate()[1].decode(errors="replace")
            sys.exit(f"{bootstrap} did not ask for work within 10 s:\n{err}")
        times.append((Stub.asked_at - started) / 1e6)
        p.kill()
        p.wait()
    print(f"{bootstrap}: {size / 1e6:.1f} MB")
    print(
        f"init to first /next over {runs} runs: median {statistics.median(times):.1f} ms, "
        f"lowest {min(times):.1f} ms, highest {max(times):.1f} ms"
    )


if __name__ == "__main__":
    main()
