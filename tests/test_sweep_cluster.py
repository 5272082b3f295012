"""Cluster mode, on one machine: a Ray cluster of several nodes (`ray.cluster_utils.Cluster`, this host) and
an MLflow server with its own artifact store, both started here, as docs/cluster.md runs them on real hosts.

One test, in phases (each needs the one before; starting the server and the cluster once keeps it bounded):
  A  a sweep joins the cluster (--address): its trials run on the worker (the head, the driver's node, offers
     trials no CPU), its report's artifacts reach the server's artifact store; its driver is SIGKILLed mid-sweep
     and the same command resumes it;
  B  a second sweep of the same spec and name, on the same server: a worker node it runs a trial on is lost
     mid-trial (`Cluster.remove_node`) — the trial is retried on another node, nothing is duplicated; then its
     driver is killed and resumed, and its orphan clean-up leaves sweep A's runs alone; each `hqlt status` sees
     its own sweep only;
  C  `hqlt ui` of a server-backed sweep prints the server's links (no local server);
  D  the server stopped: resuming, or `hqlt status`, is one line within seconds.
"""
from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
import pytest
from killing import hqlt, kill_everything, run_until, start, wait_for

SPEC = """
base:
  model: {d_model: 16, n_layers: 1, n_heads: 2, layers: H, mixer: {kv: {name: softmax, window: 4}}}
  task: {name: parity, eval_size: 64, eval_max_len: 64}
  train: {steps: 30, batch_size: 16, eval_every: 10, eval_batch_size: 64, warmup_steps: 2}
  probe: {warmup_steps: 0, steps: 1, seq_len: 32}
space:
  model.mixer.kv.window: {choice: [2, 4, 8]}
  train.lr: {float: [1.0e-3, 1.0e-2], log: true}
sweep:
  name: clustered
  objectives: [{metric: val/acc, mode: max}]
  num_samples: 4
  max_concurrent: MAXC
  resources: {cpu: 1, gpu: 0}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def children(cl, exp_id: str, parent_id: str) -> list:
    return list(cl.search_runs([exp_id], f"tags.`hqlt.role` = 'trial' and tags.`mlflow.parentRunId` = '{parent_id}'"))


def no_duplicate_rows(cl, runs) -> bool:
    for run in runs:
        for key in run.data.metrics:
            steps = [m.step for m in cl.get_metric_history(run.info.run_id, key)]
            if len(steps) != len(set(steps)):
                return False
    return True


@pytest.mark.slow
def test_sweeps_on_a_ray_cluster_with_an_mlflow_server(tmp_path, monkeypatch):
    import mlflow
    from ray.cluster_utils import Cluster

    began = time.time()
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    srv = tmp_path / "server"
    srv.mkdir()
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{srv / 'mlflow.db'}", "--serve-artifacts",
         "--artifacts-destination", str(srv / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"], stdout=subprocess.DEVNULL, stderr=open(srv / "server.log", "w"), start_new_session=True)
    # nodes on this machine's own address: a driver told 127.0.0.1 still looks for its raylet at the address
    # Ray detects for the host, so nodes bound to loopback alone are unreachable for it
    node = {"num_cpus": 1}
    # the head (the driver's node) offers no CPU to trials: each trial must run on another node, whether or not
    # two trials overlap in time (on a loaded machine the driver may start the next one late)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        worker = cluster.add_node(num_cpus=2)   # sweep A's two concurrent trials
        cluster.wait_for_nodes()
        deadline = time.time() + 180
        while not answers(f"{uri}/health"):
            assert server.poll() is None, (srv / "server.log").read_text()[-3000:]
            assert time.time() < deadline, "the MLflow server did not start"
            time.sleep(0.5)
        up = time.time()
        spec2 = tmp_path / "spec2.yaml"
        spec2.write_text(SPEC.replace("MAXC", "2"))
        spec3 = tmp_path / "spec3.yaml"
        spec3.write_text(SPEC.replace("MAXC", "3"))  # max_concurrent is not part of the spec hash
        marker = tmp_path / "fault.json"
        a, b = tmp_path / "a", tmp_path / "b"
        on = ["--address", cluster.address, "--tracking-uri", uri, "--verbose", "0"]
        cl = mlflow.MlflowClient(uri)

        # A: the driver killed after the second trial ended, then resumed
        run_until(["sweep", spec2, "--dir", a, *on], tmp_path, "trial-complete@2", marker)
        done = hqlt("sweep", spec2, "--dir", a, *on, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        exp = cl.get_experiment_by_name("clustered")
        (parent_a,) = [r for r in cl.search_runs([exp.experiment_id], "tags.`hqlt.role` = 'sweep'")]
        runs_a = children(cl, exp.experiment_id, parent_a.info.run_id)
        assert len(runs_a) == 4 and len({r.data.tags["trial_id"] for r in runs_a}) == 4
        assert all(r.data.tags["status"] == "completed" for r in runs_a)
        nodes = {r.data.tags["node"].rsplit(":", 1)[1] for r in runs_a}
        assert nodes == {worker.node_id[:8]}, nodes  # every trial on the worker, none on the driver's node
        assert parent_a.info.artifact_uri.startswith("mlflow-artifacts:")  # the server's store, not a local path
        stored = {p.name for p in (srv / "artifacts").rglob("*") if p.is_file()}
        assert {"pareto.png", "report.json", "spec.yaml"} <= stored
        assert not (a / "artifacts").exists()
        assert no_duplicate_rows(cl, runs_a)

        # B: a node lost mid-trial (its trial retried elsewhere), then the driver killed and resumed
        lost = cluster.add_node(**node, env_vars={"HQLT_FAULT_AT": "trial-report", "HQLT_FAULT_FILE": str(marker)})
        cluster.wait_for_nodes()
        marker.unlink(missing_ok=True)
        proc = start(["sweep", spec3, "--dir", b, *on], tmp_path, HQLT_FAULT_AT="trial-complete@3",
                     HQLT_FAULT_FILE=str(tmp_path / "driver.json"))
        try:
            hit = wait_for(marker, proc, "a trial on the node to be lost", 150)  # its worker waits there
            assert hit["node"].endswith(lost.node_id[:8])
            cluster.remove_node(lost, allow_graceful=False)
            wait_for(tmp_path / "driver.json", proc, "the third trial's end", 150)
        finally:
            kill_everything(proc)
        done = hqlt("sweep", spec3, "--dir", b, *on, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        parents = cl.search_runs([exp.experiment_id], "tags.`hqlt.role` = 'sweep'")
        (parent_b,) = [p for p in parents if p.info.run_id != parent_a.info.run_id]
        assert parent_b.data.tags["hqlt.sweep_id"] != parent_a.data.tags["hqlt.sweep_id"]
        runs_b = children(cl, exp.experiment_id, parent_b.info.run_id)
        assert len(runs_b) == 4 and len({r.data.tags["trial_id"] for r in runs_b}) == 4
        assert all(r.data.tags["status"] == "completed" for r in runs_b)
        (retried,) = [r for r in runs_b if r.data.tags["trial_id"] == hit["trial_id"]]
        assert not retried.data.tags["node"].endswith(lost.node_id[:8])  # finished on a node still there
        assert no_duplicate_rows(cl, runs_b)
        # sweep A untouched by B's resume and its clean-up; each status sees its own sweep
        assert sorted(r.info.run_id for r in children(cl, exp.experiment_id, parent_a.info.run_id)) == \
            sorted(r.info.run_id for r in runs_a)
        for folder in (a, b):
            status = hqlt("status", folder, cwd=tmp_path)
            assert status.returncode == 0 and ": 4 of 4 trials (4 completed)" in status.stdout, status.stdout

        # C: hqlt ui of a server-backed sweep: the server's links, for this sweep's parent run
        ui = hqlt("ui", b, cwd=tmp_path, timeout=120)
        assert ui.returncode == 0, ui.stderr[-2000:]
        assert f"{uri}/#/experiments/{exp.experiment_id}/runs/{parent_b.info.run_id}" in ui.stdout
        assert "starting" not in ui.stdout

        # D: the server down
        kill_everything(server)
        for args in (["sweep", spec2, "--dir", a, *on], ["status", a]):
            t0 = time.time()
            out = hqlt(*args, cwd=tmp_path, timeout=120)
            (line,) = out.stderr.strip().splitlines()
            assert out.returncode == 2 and "does not answer" in line and uri in line, out.stderr
            assert time.time() - t0 < 60
        print(f"cluster test: {time.time() - began:.0f} s ({up - began:.0f} s to start the server and the cluster)")
    finally:
        cluster.shutdown()
        if server.poll() is None:
            kill_everything(server)
