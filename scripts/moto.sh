# Sourced by scripts/test: a Python venv with the test tools (moto, cargo-lambda, cfn-lint), and
# moto server on a free loopback port for the end-to-end tests (stopped when the script exits).
VENV="target/ci-venv"
if [ ! -x "$VENV/bin/moto_server" ] || ! cmp -s scripts/requirements-test.txt "$VENV/requirements-test.txt"; then
    echo "scripts/test: installing the test tools (scripts/requirements-test.txt) into $VENV" >&2
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check -r scripts/requirements-test.txt
    cp scripts/requirements-test.txt "$VENV/requirements-test.txt"
fi
MOTO_PORT="$("$VENV/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
"$VENV/bin/moto_server" -H 127.0.0.1 -p "$MOTO_PORT" >target/moto.log 2>&1 &
MOTO_PID=$!
trap 'kill "$MOTO_PID" 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
    if "$VENV/bin/python" -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$MOTO_PORT/moto-api/')" 2>/dev/null; then
        break
    fi
    kill -0 "$MOTO_PID" 2>/dev/null || { echo "moto server did not start; see target/moto.log" >&2; exit 1; }
    sleep 0.2
done
export DUALSYNC_TEST_AWS_ENDPOINT="http://127.0.0.1:$MOTO_PORT"
export DUALSYNC_CARGO_LAMBDA="$PWD/$VENV/bin/cargo-lambda"
export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_REGION=us-east-1
