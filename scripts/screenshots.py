#!/usr/bin/env python3
"""Takes the README's dashboard screenshots (docs/dashboard-*.png).

Runs `dualsync demo --serve` at a small size in a temporary data folder, then drives Debian's
headless chromium through chromedriver (WebDriver, plain HTTP: standard library only) to log in
and capture each page. Needs the release binary (cargo build --release) and chromium with
chromium-driver (./scripts/test installs them).

    scripts/screenshots.py [path/to/dualsync]
"""
import base64
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINARY = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "target", "release", "dualsync")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--window-size=1400,900"]
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def until(what, check, patience=600):
    deadline = time.time() + patience
    while True:
        try:
            if check():
                return
        except OSError:
            pass
        if time.time() > deadline:
            sys.exit(f"screenshots: waited {patience} s for {what}")
        time.sleep(0.2)


class Driver:
    def __init__(self, port, profile):
        self.base = f"http://127.0.0.1:{port}"
        caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "binary": "/usr/bin/chromium", "args": FLAGS + [f"--user-data-dir={profile}"]}}}}
        self.session = self.call("POST", "/session", caps)["sessionId"]

    def call(self, method, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as res:
            return json.load(res)["value"]

    def s(self, method, path, body=None):
        return self.call(method, f"/session/{self.session}{path}", body)

    def find(self, css):
        return self.s("POST", "/element", {"using": "css selector", "value": css})[ELEMENT]

    def present(self, css):
        return bool(self.s("POST", "/elements", {"using": "css selector", "value": css}))

    def text(self, css):
        return self.s("GET", f"/element/{self.find(css)}/text") if self.present(css) else ""

    def click(self, css):
        self.s("POST", f"/element/{self.find(css)}/click", {})

    def type(self, css, text):
        self.s("POST", f"/element/{self.find(css)}/value", {"text": text})

    def shot(self, name):
        path = os.path.join(ROOT, "docs", f"dashboard-{name}.png")
        with open(path, "wb") as f:
            f.write(base64.b64decode(self.s("GET", "/screenshot")))
        print("wrote", os.path.relpath(path, ROOT))


def main():
    work = tempfile.mkdtemp(prefix="dualsync-shots-")
    port, driver_port = free_port(), free_port()
    token = "screenshots-token-" + os.urandom(8).hex()
    env = dict(os.environ, DUALSYNC_ADMIN_TOKEN=token)
    demo = subprocess.Popen([BINARY, "--data-dir", work, "demo", "--serve", "--customers", "2000", "--orders", "400",
                             "--admin-addr", f"127.0.0.1:{port}"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    driver = subprocess.Popen(["/usr/bin/chromedriver", f"--port={driver_port}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # The demo serves once its scenario is done.
        for line in demo.stderr:
            if "dashboard on" in line:
                break
        else:
            sys.exit("screenshots: the demo ended before it served the dashboard")
        until("chromedriver", lambda: urllib.request.urlopen(f"http://127.0.0.1:{driver_port}/status").status == 200)
        d = Driver(driver_port, os.path.join(work, "profile"))
        try:
            d.s("POST", "/url", {"url": f"http://127.0.0.1:{port}/dashboard/"})
            until("the login form", lambda: d.present("#token"))
            d.shot("login")
            d.type("#token", token)
            d.click("#login")
            until("the jobs page", lambda: d.text("[data-job-status='sales']") == "active")
            d.shot("jobs")
            d.click("#nav-errors")
            until("the errors page", lambda: d.present("#match-count"))
            if d.present("#errors-table tr[data-error]"):
                d.click("#errors-table tr[data-error]")
                until("an error's details", lambda: d.present("#error-detail section"))
            d.click("#retry-selection")
            until("the retry preview", lambda: d.present("#request-preview"))
            d.shot("errors")
            # Retry the selection, then follow the request to its end.
            d.click("#confirm-request")
            until("the request", lambda: d.present("#request-result"))
            d.click("#nav-requests")
            until("the request to finish", lambda: d.text("[data-settled]") == "final")
            d.shot("requests")
            d.click("#nav-conflicts")
            until("the conflicts page", lambda: d.present("#conflicts-table"))
            d.shot("conflicts")
            d.click("#nav-charts")
            until("the charts page", lambda: d.present("#chart-hours"))
            # The demo's minutes: the shortest window.
            d.click("#chart-hours option[value='0.25']")
            until("the last 15 minutes", lambda: "15 min" in d.text("#view h2"))
            until("the charts", lambda: d.present("#lag-chart"))
            d.shot("charts")
        finally:
            d.s("DELETE", "")
    finally:
        driver.terminate()
        demo.send_signal(2)
        demo.wait(timeout=120)


if __name__ == "__main__":
    main()
