#!/usr/bin/python3
"""Every PromQL expression of deploy/grafana and deploy/prometheus, evaluated by a real Prometheus
scraping live Switchyard processes on loopback: an embedded cluster (`switchyard serve`) and a
multi-process cluster (coordinator, two expert hosts, router), all under the job names of
deploy/prometheus/prometheus.yml, with its rule files loaded.

Fails when an expression errors, or returns no series. An expression that filters with a comparison
(an alert, an annotation) may legitimately return nothing while all is well: for those the data they
compare must exist, so the comparison is evaluated with `bool` (0/1 per series) and must return
series. At the end one expert host is killed, and the host-down alert's condition must hold.

  prometheus_test.py --binary switchyard --source REPO --workdir DIR --prometheus /usr/bin/prometheus
"""
import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

try:
    import yaml
except ImportError:
    print("FAIL: python3-yaml is missing (deploy/setup.sh installs it)", file=sys.stderr)
    sys.exit(1)

MODEL = "tests/data/hf-tiny/mixtral_e8k2"
GRAFANA_VARS = {"__rate_interval": "1m", "__interval": "15s", "__range": "5m"}  # others: ".*" (All)


def fail(msg):
    print("FAIL: " + msg, file=sys.stderr)
    raise SystemExit(1)


class Proc:
    """A child process whose output goes to a log file; reads lines from the log."""

    def __init__(self, args, log, env=None):
        self.log = log
        self.f = open(log, "w")
        self.p = subprocess.Popen(args, stdout=self.f, stderr=subprocess.STDOUT, env=env)

    def wait_for(self, pattern, timeout=60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            with open(self.log) as f:
                m = re.search(pattern, f.read())
            if m:
                return m.group(1)
            if self.p.poll() is not None:
                break
            time.sleep(0.05)
        with open(self.log) as f:
            fail(f"{self.log}: no line matching {pattern!r}; output:\n{f.read()}")

    def stop(self, sig=signal.SIGTERM):
        if self.p.poll() is None:
            self.p.send_signal(sig)
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self.f.close()


def http(url, body=None, timeout=30):
    req = urllib.request.Request(url, data=body.encode() if body is not None else None)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_ready(port, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if http(f"http://127.0.0.1:{port}/readyz", timeout=2)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    fail(f"the router on port {port} did not become ready")


def with_bool(expr):
    """`expr` with `bool` after every comparison operator outside label matchers and strings."""
    out, i, depth, quote, found = [], 0, 0, None, False
    while i < len(expr):
        c = expr[i]
        if quote:
            out.append(c)
            if c == "\\":
                out.append(expr[i + 1])
                i += 1
            elif c == quote:
                quote = None
        elif c in "\"'`":
            quote = c
            out.append(c)
        elif c == "{":
            depth += 1
            out.append(c)
        elif c == "}":
            depth -= 1
            out.append(c)
        elif depth == 0 and expr[i:i + 2] in ("==", "!=", ">=", "<="):
            out.append(expr[i:i + 2] + " bool")
            found = True
            i += 1
        elif depth == 0 and c in "<>":
            out.append(c + " bool")
            found = True
        else:
            out.append(c)
        i += 1
    return "".join(out), found


def substitute(expr):
    def var(m):
        name = m.group(1) or m.group(2)
        return GRAFANA_VARS.get(name, ".*")
    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)", var, expr)


def expressions(source):
    """(where, PromQL) for every expression of the dashboards and rule files; and the Grafana
    variable queries (label_values(metric, label))."""
    exprs, variables = [], []
    dash_dir = os.path.join(source, "deploy/grafana/dashboards")
    for name in sorted(os.listdir(dash_dir)):
        if not name.endswith(".json"):
            continue
        d = json.load(open(os.path.join(dash_dir, name)))

        def walk(panels):
            for p in panels:
                for t in p.get("targets", []):
                    exprs.append((f"{name}: panel {p['id']} '{p['title']}' {t['refId']}", substitute(t["expr"])))
                walk(p.get("panels", []))
        walk(d["panels"])
        for a in d["annotations"]["list"]:
            if "expr" in a:
                exprs.append((f"{name}: annotation '{a['name']}'", substitute(a["expr"])))
        for v in d["templating"]["list"]:
            if v["type"] == "query":
                variables.append((f"{name}: variable {v['name']}", v["definition"]))
    for rules in ("switchyard.recording.yml", "switchyard.alerts.yml"):
        for g in yaml.safe_load(open(os.path.join(source, "deploy/prometheus", rules)))["groups"]:
            for r in g["rules"]:
                what = r.get("record") or r.get("alert")
                exprs.append((f"{rules}: {what}", r["expr"]))
    return exprs, variables


class Prometheus:
    def __init__(self, port):
        self.base = f"http://127.0.0.1:{port}"

    def query(self, expr):
        status, body = http(self.base + "/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        j = json.loads(body)
        if j.get("status") != "success":
            return None, j.get("error", body)
        return j["data"]["result"], None

    def label_values(self, label, metric):
        _, body = http(self.base + f"/api/v1/label/{label}/values?" + urllib.parse.urlencode({"match[]": metric}))
        return json.loads(body).get("data", [])

    def targets_up(self):
        _, body = http(self.base + "/api/v1/targets")
        return [(t["labels"]["job"], t["scrapeUrl"], t["health"]) for t in json.loads(body)["data"]["activeTargets"]]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", required=True)
    ap.add_argument("--source", required=True)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--prometheus", default="prometheus")
    a = ap.parse_args()
    prom_bin = shutil.which(a.prometheus) if a.prometheus else None
    if not prom_bin:
        fail(f"prometheus not found ('{a.prometheus}'): install the Debian package prometheus (deploy/setup.sh deps)")
    shutil.rmtree(a.workdir, ignore_errors=True)
    os.makedirs(a.workdir)
    w = lambda name: os.path.join(a.workdir, name)
    model = os.path.join(a.source, MODEL)
    env = dict(os.environ, UCX_NET_DEVICES="lo", OMP_WAIT_POLICY="passive")
    procs = []

    def start(args, log):
        p = Proc([a.binary] + args, w(log), env)
        procs.append(p)
        return p

    t0 = time.time()
    try:
        # The embedded cluster, and a multi-process one (2 replicas: it keeps serving when a host dies).
        serve = start(["serve", "--model", model, "--http", "127.0.0.1:0", "--hosts", "2", "--threads", "1"], "serve.log")
        coord = start(["coordinator", "--listen", "127.0.0.1:0", "--model", model, "--hosts", "2", "--replicas", "2",
                       "--metrics", "127.0.0.1:0", "--heartbeat-interval-ms", "200", "--rebalance-interval-ms", "3000"],
                      "coordinator.log")
        cport = coord.wait_for(r"coordinator listening on [^:]+:(\d+)")
        cmetrics = coord.wait_for(r"coordinator metrics on ([\d.]+:\d+)")
        hosts, hmetrics = [], []
        for h in range(2):
            hp = start(["expert-host", "--coordinator", "127.0.0.1:" + cport, "--model", model, "--slots", "64",
                        "--threads", "1", "--name", f"host{h}", "--metrics", "127.0.0.1:0"], f"host{h}.log")
            hmetrics.append(hp.wait_for(r"expert host metrics on ([\d.]+:\d+)"))
            hosts.append(hp)
        router = start(["router", "--coordinator", "127.0.0.1:" + cport, "--model", model, "--http", "127.0.0.1:0",
                        "--threads", "1"], "router.log")
        rport = router.wait_for(r"router serving HTTP on [^:]+:(\d+)")
        sport = serve.wait_for(r"serving .* on http://[^:]+:(\d+)")
        wait_ready(sport)
        wait_ready(rport)

        # Prometheus with the deploy config: its jobs and rule files, our targets, 1 s intervals.
        cfg = yaml.safe_load(open(os.path.join(a.source, "deploy/prometheus/prometheus.yml")))
        cfg["global"].update({"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"})
        cfg["rule_files"] = [os.path.join(a.source, "deploy/prometheus", f) for f in cfg["rule_files"]]
        targets = {"switchyard-router": [f"127.0.0.1:{sport}", f"127.0.0.1:{rport}"],
                   "switchyard-coordinator": [cmetrics], "switchyard-expert-host": hmetrics}
        jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
        if set(jobs) != set(targets):
            fail(f"deploy/prometheus/prometheus.yml has jobs {sorted(jobs)}, expected {sorted(targets)}")
        for name, t in targets.items():
            jobs[name]["static_configs"] = [{"targets": t}]
        yaml.safe_dump(cfg, open(w("prometheus.yml"), "w"))
        pport = free_port()
        prom = Proc([prom_bin, "--config.file=" + w("prometheus.yml"), "--storage.tsdb.path=" + w("tsdb"),
                     "--web.listen-address=127.0.0.1:%d" % pport, "--log.level=warn"], w("prometheus.log"))
        procs.append(prom)
        P = Prometheus(pport)
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                if http(P.base + "/-/ready", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        else:
            fail("prometheus did not become ready; see " + w("prometheus.log"))

        # Traffic on both routers: completions of various lengths, and a few bad requests, for ~8 s.
        stop = threading.Event()
        counts = {"ok": 0, "bad": 0, "other": 0}

        def client(port, seed):
            k = seed
            while not stop.is_set():
                k += 1
                prompt = [(k * 7 + i * 3) % 60 + 1 for i in range(3 + k % 9)]
                st, _ = http(f"http://127.0.0.1:{port}/v1/completions",
                             json.dumps({"prompt": prompt, "max_tokens": 2 + k % 7}))
                counts["ok" if st == 200 else "other"] += 1
                time.sleep(0.01)
                if k % 10 == 0:
                    st, _ = http(f"http://127.0.0.1:{port}/v1/completions", json.dumps({"prompt": "text"}))
                    counts["bad" if st == 400 else "other"] += 1
        clients = [threading.Thread(target=client, args=(p, s)) for p in (sport, rport) for s in (0, 100)]
        for c in clients:
            c.start()
        time.sleep(8)

        down = [t for t in P.targets_up() if t[2] != "up"]
        if down:
            fail(f"targets not up: {down}")

        exprs, variables = expressions(a.source)
        print(f"{len(exprs)} expressions, {len(variables)} variables; traffic so far: {counts}")
        pending = list(exprs)
        results = {}
        deadline = time.time() + 45
        while pending and time.time() < deadline:
            still = []
            for where, expr in pending:
                res, err = P.query(expr)
                if err:
                    fail(f"{where}: Prometheus rejects the expression: {err}\n  {expr}")
                if res:
                    # A query whose every value is NaN (a quantile or ratio over no data) shows nothing.
                    if all(r["value"][1] == "NaN" for r in res):
                        still.append((where, expr))
                        continue
                    results[where] = ("as is", len(res))
                    continue
                flagged, has_cmp = with_bool(expr)
                if has_cmp:
                    res2, err2 = P.query(flagged)
                    if err2:
                        fail(f"{where}: the comparison with bool is rejected: {err2}\n  {flagged}")
                    if res2:
                        results[where] = ("comparison with bool", len(res2))
                        continue
                still.append((where, expr))
            pending = still
            if pending:
                time.sleep(1)
        stop.set()
        for c in clients:
            c.join()
        for where, how in sorted(results.items()):
            print(f"  ok  {where}: {how[1]} series ({how[0]})")
        if pending:
            fail("no series (or only NaN) after 45 s for:\n" + "\n".join(f"  {w_}: {e}" for w_, e in pending))
        for where, definition in variables:
            m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", definition)
            if not m:
                fail(f"{where}: unsupported variable query {definition}")
            values = P.label_values(m.group(2), m.group(1))
            if not values:
                fail(f"{where}: {definition} has no values")
            print(f"  ok  {where}: {definition} -> {values}")
        if counts["other"]:
            fail(f"unexpected HTTP statuses during the traffic: {counts}")

        # A host dies: the host-down alert's condition holds (coordinator), and its target is down.
        hosts[1].stop(signal.SIGKILL)
        deadline = time.time() + 20
        got = None
        while time.time() < deadline:
            res, _ = P.query('switchyard_host_up{job="switchyard-coordinator"} == 0')
            tgt, _ = P.query('up{job="switchyard-expert-host"} == 0')
            if res and tgt:
                got = (res, tgt)
                break
            time.sleep(0.5)
        if not got:
            fail("after killing host1: switchyard_host_up == 0 and up == 0 were not both seen within 20 s")
        print(f"  ok  host1 killed: switchyard_host_up == 0 for {[r['metric']['host'] for r in got[0]]}")
        print(f"PASS: {len(exprs)} expressions and {len(variables)} variables return series "
              f"({counts['ok']} completions, {counts['bad']} bad requests) in {time.time() - t0:.1f} s")
    finally:
        for p in reversed(procs):
            p.stop()


if __name__ == "__main__":
    main()
