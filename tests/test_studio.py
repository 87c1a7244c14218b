"""qfine studio without a browser: run states as another process detects them, incremental metrics,
the launch form's config, and the security rules checked against a real server on a real socket."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from helpers import sums
from qfine import config as C
from qfine.studio import paths, presets, views
from qfine.studio.runs import Metrics, best_metric, listing
from qfine.util import runstate
from qfine.util.errors import QfineError
from qfine.util.lock import hold

ROOT = Path(__file__).resolve().parents[1]


# ---- run states ---------------------------------------------------------------------------------

def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}


def _train_args(tiny_dir, data, out, steps) -> list[str]:
    return [sys.executable, "-m", "qfine", "train", "--model", str(tiny_dir), "--data", str(data), "--output-dir",
            str(out), "--max-steps", str(steps), "--save-steps", "2", "--batch-size", "4", "--lora-r", "4",
            "--report-samples", "0"]


def _steps(run: Path) -> int:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return 0
    return max((json.loads(line).get("step", 0) for line in lines if line.endswith("}")), default=0)


def test_states_of_real_runs_running_killed_stopped_finished(tiny_dir, tmp_path):
    """Real qfine train processes on the tiny model: running while it holds its lock, killed after
    kill -9 (its status.json still says running, nobody holds the lock), stopped after SIGTERM,
    finished after a clean end — each read from the run directory by this other process."""
    data = sums(tmp_path / "d.jsonl", 32)
    runs = tmp_path / "runs"
    killed, stopped = runs / "killed", runs / "stopped"
    procs = {run: subprocess.Popen(_train_args(tiny_dir, data, run, 400), env=_env(), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True) for run in (killed, stopped)}
    try:
        for run, proc in procs.items():
            t0 = time.time()
            while _steps(run) < 2 and time.time() - t0 < 240:
                assert proc.poll() is None, proc.stderr.read()[-2000:]
                time.sleep(0.05)
            assert runstate.state_of(run) == ("running", f"pid {proc.pid}")
        procs[killed].send_signal(signal.SIGKILL)
        procs[stopped].send_signal(signal.SIGTERM)
        assert procs[killed].wait(60) == -signal.SIGKILL
        assert procs[stopped].wait(120) == 143
    finally:
        for proc in procs.values():
            proc.kill()
    state, detail = runstate.state_of(killed)
    assert (state, detail.split()[:2]) == ("killed", ["pid", str(procs[killed].pid)])
    assert runstate.read_status(killed)["state"] == "running"  # the record alone would say running
    state, detail = runstate.state_of(stopped)
    assert state == "stopped" and "stopped by SIGTERM at step" in detail and "--resume" in detail
    done = subprocess.run([*_train_args(tiny_dir, data, stopped, _steps(stopped) + 1), "--resume"], env=_env(),
                          capture_output=True, text=True)
    # --resume with a different max_steps is a config change it names; the run then finishes
    assert done.returncode == 0, done.stderr[-2000:]
    assert runstate.state_of(stopped) == ("finished", "")
    rows = {r["name"]: r for r in listing(runs, Metrics())}
    assert {n: r["state"] for n, r in rows.items()} == {"killed": "killed", "stopped": "finished"}
    assert rows["stopped"]["steps"] == _steps(stopped) and rows["stopped"]["objective"] == "sft"


def test_a_failure_after_setup_is_recorded_and_one_before_keeps_the_old_record(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("output_dir: x\n")
    runstate.write_status(run, "stopped", "stopped by SIGTERM at step 4 of 10")
    assert runstate.state_of(run) == ("stopped", "stopped by SIGTERM at step 4 of 10")
    runstate.write_status(run, "failed", "training stopped: non-finite loss at step 5")
    assert runstate.state_of(run) == ("failed", "training stopped: non-finite loss at step 5")
    runstate.write_status(tmp_path / "never", "failed", "x")  # no folder set up: nothing written
    assert not (tmp_path / "never").exists()


def test_a_lock_held_in_this_process_reads_as_running_and_a_dead_lock_file_does_not(tmp_path):
    run = tmp_path / "run"
    with hold(run, "qfine train"):
        assert runstate.lock_holder(run)["command"] == "qfine train"
        assert runstate.state_of(run)[0] == "running"
        assert [r["name"] for r in listing(tmp_path, Metrics())] == ["run"]  # starting: only its lock exists
    runstate.lock_path(run).write_text('{"pid": 1}')  # left by a killed holder: no one holds it
    assert runstate.lock_holder(run) is None
    assert listing(tmp_path, Metrics()) == []


def test_metrics_are_read_incrementally_and_again_when_the_file_is_replaced(tmp_path):
    path = tmp_path / "metrics.jsonl"
    m = Metrics()
    assert m.rows(path) == ([], 0)
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')  # a line still being written
    rows, v = m.rows(path)
    assert [r["step"] for r in rows] == [1] and v == 0
    with path.open("a") as f:
        f.write('ss": 1.5}\n')
    assert [r["loss"] for r in m.rows(path)[0]] == [2.0, 1.5]
    tmp = tmp_path / "new"
    tmp.write_text('{"step": 1, "loss": 2.0}\n')
    os.replace(tmp, path)  # what --resume does to drop the rows after its checkpoint
    rows, v = m.rows(path)
    assert [r["step"] for r in rows] == [1] and v == 1


def test_the_best_eval_metric_is_the_objectives_own():
    rows = [{"step": 2, "eval_loss": 0.5}, {"step": 4, "eval_loss": 0.4, "eval_rewards/accuracies": 0.75},
            {"step": 6, "eval_loss": 0.45, "eval_rewards/accuracies": 1.0}]
    assert best_metric(rows) == ("eval_rewards/accuracies", 1.0)
    assert best_metric([{"eval_loss": 0.5}, {"eval_loss": 0.4}]) == ("eval_loss", 0.4)
    assert best_metric([{"eval_loss": 0.5, "eval_accuracy": 0.7}, {"eval_accuracy": 0.9}]) == ("eval_accuracy", 0.9)
    assert best_metric([{"loss": 1.0}]) is None


# ---- the form's config --------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_each_preset_is_its_example_file(name):
    example = yaml.safe_load((ROOT / "examples" / f"{name}.yaml").read_text())
    example.pop("output_dir")
    for key in ("path", "eval_path"):
        example.get("data", {}).pop(key, None)
    assert presets.PRESETS[name]["config"] == example


def test_the_form_builds_a_config_and_names_a_bad_field(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "x"}\n')
    cfg = views.build_config({"data.path": "d.jsonl", "lora.r": "8", "train.max_steps": "5",
                              "lora.target_modules": "q_proj,v_proj", "model.source": "default"}, [tmp_path])
    assert (cfg.lora.r, cfg.train.max_steps, cfg.lora.target_modules) == (8, 5, ["q_proj", "v_proj"])
    assert cfg.data.path == str(tmp_path / "d.jsonl")
    with pytest.raises(QfineError, match="lora.r"):
        views.build_config({"data.path": "d.jsonl", "lora.r": "many"}, [tmp_path])
    with pytest.raises(QfineError, match="unknown config field 'lora.rank'"):
        views.build_config({"data.path": "d.jsonl", "lora.rank": 8}, [tmp_path])
    with pytest.raises(paths.Refused):
        views.build_config({"data.path": "../d.jsonl"}, [tmp_path / "sub"])
    with pytest.raises(paths.Refused):
        views.build_config({"data.path": "d.jsonl", "model.source": "/etc"}, [tmp_path])
    assert views.model_source("org/model-7b", [tmp_path]) == "org/model-7b"  # a hub id, read from the cache
    assert C.RunConfig().output_dir == "runs/qfine"  # the form never changed the defaults


# ---- paths --------------------------------------------------------------------------------------

def test_paths_out_of_the_roots_are_refused(tmp_path):
    root, outside = tmp_path / "data", tmp_path / "secret"
    root.mkdir()
    outside.mkdir()
    (outside / "s.jsonl").write_text("{}\n")
    (root / "ok.jsonl").write_text("{}\n")
    (root / "link").symlink_to(outside)
    (root / "link.jsonl").symlink_to(outside / "s.jsonl")
    assert paths.inside(root, "ok.jsonl") == (root / "ok.jsonl").resolve()
    for bad in ("../secret/s.jsonl", "link/s.jsonl", "link.jsonl", str(outside / "s.jsonl"), "a/../../secret",
                ".hidden", "", "x\\..\\y", "ok.jsonl\x00"):
        with pytest.raises(paths.Refused):
            paths.inside(root, bad)
    assert paths.listed([root]) == ["ok.jsonl"]  # the symlinks out are not offered either
    for bad in ("..", ".studio", "a/b", "", "x" * 101):
        with pytest.raises(paths.Refused):
            paths.run_name(bad)


# ---- a real server ------------------------------------------------------------------------------

class Server:
    """The studio's app under uvicorn in a thread, on a free loopback port."""

    def __init__(self, tmp: Path, token: str | None = None, max_upload: int = 1 << 20):
        import uvicorn

        from qfine.cli.studio import _bind
        from qfine.studio.app import Settings, build

        self.data = tmp / "data"
        self.data.mkdir(exist_ok=True)
        self.settings = Settings(runs=tmp / "runs", data=[self.data], token=token, max_upload=max_upload)
        self.sock = _bind("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(build(self.settings), log_level="error"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        t0 = time.time()
        while not self.server.started:
            assert time.time() - t0 < 20
            time.sleep(0.02)

    def request(self, method, path, body=None, headers=None) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()

    def close(self):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture
def server(tmp_path):
    s = Server(tmp_path)
    yield s
    s.close()


def _routes():
    from qfine.studio.app import Settings, build

    app = build(Settings(runs=Path("/nonexistent-studio-runs-for-routes")))
    out = []
    for r in app.routes:
        path = r.path.replace("{name}", "x")
        for method in sorted(getattr(r, "methods", None) or {"GET"}):
            if method != "HEAD":
                out.append((method, path + ("/vendor/uPlot.min.css" if path == "/static" else "")))
    return out


def test_without_the_token_every_route_is_refused(tmp_path):
    routes = _routes()
    assert len(routes) >= 18 and ("POST", "/api/launch") in routes
    s = Server(tmp_path, token="sekrit-token")
    try:
        for method, path in routes:
            status, _ = s.request(method, path, body=b"{}", headers={"content-type": "application/json"})
            assert status == 401, (method, path, status)
            status, _ = s.request(method, path + "?token=wrong", headers={"authorization": "Bearer nope"})
            assert status == 401, (method, path, status)
        assert s.request("GET", "/api/runs", headers={"authorization": "Bearer sekrit-token"})[0] == 200
        assert s.request("GET", "/static/vendor/uPlot.min.css", headers={"cookie": "qfine_token=sekrit-token"})[0] == 200
        status, _ = s.request("GET", "/?token=sekrit-token")
        assert status == 303  # the printed link sets the cookie and drops the token from the address
    finally:
        s.close()


def test_loopback_refuses_a_foreign_host_and_a_simple_cross_site_post(server):
    assert server.request("GET", "/api/runs")[0] == 200
    assert server.request("GET", "/api/runs", headers={"host": "attacker.example:80"})[0] == 403
    status, body = server.request("POST", "/api/launch", body=b"name=x", headers={
        "content-type": "application/x-www-form-urlencoded"})
    assert status == 415 and b"JSON" in body


@pytest.mark.parametrize("path", ["/api/runs/..%2f..%2fetc", "/api/runs/%2e%2e", "/api/runs/.studio",
                                  "/api/runs/..%252f", "/static/..%2f..%2fapp.py", "/static/../app.py"])
def test_traversal_through_the_url_is_refused(server, path):
    status, body = server.request("GET", path)
    assert status in (403, 404), (path, status, body[:200])
    assert b"Settings" not in body and b"root:" not in body


def test_traversal_in_a_json_body_is_refused(server):
    (server.data.parent / "secret.jsonl").write_text('{"text": "secret"}\n')
    (server.data / "link.jsonl").symlink_to(server.data.parent / "secret.jsonl")
    for path in ("../secret.jsonl", "..%2fsecret.jsonl", "link.jsonl", str(server.data.parent / "secret.jsonl")):
        status, body = server.request("POST", "/api/preview", body=json.dumps({"path": path}).encode(),
                                      headers={"content-type": "application/json"})
        assert status in (400, 403), (path, status)
        assert b'"text": "secret"' not in body and b"secret\\n" not in body
        status, _ = server.request("POST", "/api/launch", body=json.dumps(
            {"name": "r", "fields": {"data.path": path}}).encode(), headers={"content-type": "application/json"})
        assert status in (400, 403)
    assert not (server.settings.runs / "r").exists()


def _free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def test_a_2_gb_upload_is_refused_without_filling_the_disk(server):
    headers = {"content-type": "application/octet-stream"}
    # declared: refused before a byte of the body is read
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.putrequest("POST", "/api/upload?name=big.jsonl")
    for k, v in {**headers, "content-length": str(2 * 2**30)}.items():
        conn.putheader(k, v)
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 413 and b"2,147,483,648 bytes refused" in resp.read()
    conn.close()
    # undeclared (chunked): cut off past the cap; the partial file is gone and the client stops early
    sent = [0]
    free = _free_bytes(server.data)

    def body():
        chunk = b"x" * (1 << 20)
        while sent[0] < 2 * 2**30:
            sent[0] += len(chunk)
            yield chunk

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        conn.request("POST", "/api/upload?name=big.jsonl", body=body(), headers=headers, encode_chunked=True)
        resp = conn.getresponse()
        status, text = resp.status, resp.read()
    except (BrokenPipeError, ConnectionResetError):  # the server answered and closed while we were sending
        resp = conn.getresponse()
        status, text = resp.status, resp.read()
    assert status == 413, text
    assert sent[0] < 2 * 2**30  # the 2 GB never went through
    leftover = list((server.data / "uploads").iterdir())
    assert leftover == []
    assert free - _free_bytes(server.data) < 64 * 2**20
    # a small one is stored where the form lists it
    status, text = server.request("POST", "/api/upload?name=small.jsonl", body=b'{"text": "hi"}\n', headers=headers)
    assert status == 200 and json.loads(text) == {"path": "uploads/small.jsonl", "bytes": 15}
    assert json.loads(server.request("GET", "/api/data")[1])["files"] == ["uploads/small.jsonl"]
    for name in ("../x.jsonl", ".hidden.jsonl", "x.sh"):
        assert server.request("POST", f"/api/upload?name={name}", body=b"{}", headers=headers)[0] in (400, 403)


def test_the_api_answers_runs_and_a_run_and_names_a_missing_one(server):
    runs = server.settings.runs
    (runs / "a").mkdir()
    (runs / "a" / "config.yaml").write_text(C.to_yaml(C.RunConfig(output_dir=str(runs / "a"))))
    rows = [{"step": i, "loss": 3.0 - i * 0.1} for i in range(1, 6)] + [{"step": 5, "eval_loss": 2.4},
                                                                      {"step": 3, "eval_loss": 2.2}]
    (runs / "a" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (runs / "a" / "adapter").mkdir()
    listed = json.loads(server.request("GET", "/api/runs")[1])["runs"]
    assert [(r["name"], r["state"], r["steps"], r["best"]) for r in listed] == \
        [("a", "finished", 5, {"metric": "eval_loss", "value": 2.2})]
    assert len(json.loads(server.request("GET", "/api/runs/a/metrics")[1])["rows"]) == 7
    status, body = server.request("GET", "/api/runs/b")
    assert status == 400 and b"no run named b" in body
    status, body = server.request("POST", "/api/runs/a/export", body=b'{"form": "gguf", "quant": "q3_x"}',
                                  headers={"content-type": "application/json"})
    assert status == 400 and b"unknown GGUF type 'q3_x'" in body
