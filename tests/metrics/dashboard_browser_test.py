#!/usr/bin/python3
"""The router's /dashboard in headless Chromium while the embedded cluster serves traffic: the
page loads with every other host unreachable (it is self-contained), polls /dashboard/data, and
draws a heatmap with load in it and the replica grid; the screenshot is kept in the work directory.

  dashboard_browser_test.py --binary switchyard --source REPO --workdir DIR --chromium /usr/bin/chromium
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

MODEL = "tests/data/hf-tiny/qwen3moe_e16k4"


def fail(msg):
    print("FAIL: " + msg, file=sys.stderr)
    raise SystemExit(1)


def http(url, body=None, timeout=30):
    req = urllib.request.Request(url, data=body.encode() if body is not None else None)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", required=True)
    ap.add_argument("--source", required=True)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--chromium", default="chromium")
    a = ap.parse_args()
    chromium = shutil.which(a.chromium) if a.chromium else None
    if not chromium:
        fail(f"chromium not found ('{a.chromium}'): install the Debian package chromium (deploy/setup.sh deps)")
    shutil.rmtree(a.workdir, ignore_errors=True)
    os.makedirs(a.workdir)
    log = open(os.path.join(a.workdir, "serve.log"), "w")
    serve = subprocess.Popen([a.binary, "serve", "--model", os.path.join(a.source, MODEL), "--http", "127.0.0.1:0",
                              "--hosts", "3", "--replicas", "2", "--threads", "1"], stdout=log, stderr=subprocess.STDOUT)
    stop = threading.Event()
    try:
        port = None
        deadline = time.time() + 60
        while time.time() < deadline and port is None:
            m = re.search(r"serving .* on http://[^:]+:(\d+)", open(log.name).read())
            port = m.group(1) if m else None
            if serve.poll() is not None:
                fail("switchyard serve exited:\n" + open(log.name).read())
            time.sleep(0.05)
        if port is None:
            fail("switchyard serve did not start:\n" + open(log.name).read())
        base = f"http://127.0.0.1:{port}"
        done = {"n": 0}

        def client(seed):
            k = seed
            while not stop.is_set():
                k += 1
                prompt = [(k * 5 + i) % 60 + 1 for i in range(4 + k % 6)]
                st, _ = http(base + "/v1/completions", json.dumps({"prompt": prompt, "max_tokens": 6}))
                if st == 200:
                    done["n"] += 1
        clients = [threading.Thread(target=client, args=(s,)) for s in (0, 50)]
        for c in clients:
            c.start()
        time.sleep(2)

        # Everything but the router resolves nowhere: a request elsewhere would fail the page.
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--no-first-run", "--user-data-dir=" + os.path.join(a.workdir, "profile"),
                 "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
                 "--virtual-time-budget=7000"]
        t0 = time.time()
        dom = subprocess.run([chromium] + flags + ["--dump-dom", base + "/dashboard"], capture_output=True, text=True,
                             timeout=120)
        if dom.returncode != 0:
            fail(f"chromium --dump-dom exited {dom.returncode}:\n{dom.stderr[-2000:]}")
        shot = os.path.join(a.workdir, "dashboard.png")
        sc = subprocess.run([chromium] + flags + ["--window-size=1280,1100", "--screenshot=" + shot, base + "/dashboard"],
                            capture_output=True, text=True, timeout=120)
        if sc.returncode != 0 or not os.path.exists(shot):
            fail(f"chromium --screenshot failed ({sc.returncode}):\n{sc.stderr[-2000:]}")
        stop.set()
        for c in clients:
            c.join()

        m = re.search(r'<div id="state"([^>]*)>', dom.stdout)
        if not m:
            fail("no #state element in the page:\n" + dom.stdout[:2000])
        attrs = dict(re.findall(r'data-([a-z-]+)="([^"]*)"', m.group(1)))
        data = json.loads(http(base + "/dashboard/data")[1])
        layers, experts = len(data["layers"]), data["experts"]
        print(f"page state {attrs}; model {layers} MoE layers x {experts} experts; {done['n']} completions; "
              f"chromium {time.time() - t0:.1f} s; screenshot {shot} ({os.path.getsize(shot)} bytes)")
        err = re.search(r'<div id="err">([^<]*)</div>', dom.stdout)
        if not err or err.group(1).strip():
            fail("the page could not fetch /dashboard/data: " + (err.group(1) if err else "no #err element"))
        if int(attrs.get("polls", 0)) < 1:
            fail("the page never polled /dashboard/data")
        if int(attrs.get("heat-cells", 0)) < 1 or int(attrs.get("heat-tokens", 0)) < 1:
            fail(f"the heatmap has no load in it: {attrs}")
        if int(attrs.get("replica-cells", 0)) != layers * experts:
            fail(f"the replica grid has {attrs.get('replica-cells')} cells with replicas, expected {layers * experts}")
        for needle in ("time to first token", "Hottest experts"):
            if needle not in dom.stdout:
                fail(f"'{needle}' is not on the page")
        if os.path.getsize(shot) < 10000:
            fail(f"the screenshot is suspiciously small ({os.path.getsize(shot)} bytes)")
        print("PASS")
    finally:
        stop.set()
        if serve.poll() is None:
            serve.terminate()
            try:
                serve.wait(10)
            except subprocess.TimeoutExpired:
                serve.kill()
        log.close()


if __name__ == "__main__":
    main()
