"""Data parallelism: 4 (forced host) devices and 2 processes give the single-device results.

Every configuration runs in fresh interpreters, since the device count (XLA_FLAGS) and
`jax.distributed` must be set before JAX starts. The subprocesses compute in float64
(JAX_ENABLE_X64), so "the same result" means agreement to float64 rounding of sums taken in a
different order across devices: 1e-9 relative, far below any modelling effect.
"""

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import nfdm_de as nd
from nfdm_de._sharding import COORDINATOR_ENV, NUM_PROCESSES_ENV, PROCESS_ID_ENV

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "scaling_worker.py"
CHUNKS = 4
RTOL = 1e-9
TIMEOUT = 600


def _env(devices: int) -> dict[str, str]:
    env = dict(os.environ)
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + path if path else "")
    env["JAX_ENABLE_X64"] = "1"
    env["JAX_PLATFORMS"] = "cpu"
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    if devices > 1:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    env["XLA_FLAGS"] = " ".join(flags)
    for name in (COORDINATOR_ENV, NUM_PROCESSES_ENV, PROCESS_ID_ENV):
        env.pop(name, None)
    return env


def _losses(run_dir: Path) -> np.ndarray:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == list(range(1, len(records) + 1))
    return np.array([r["loss"] for r in records])


def _max_param_difference(run_a: Path, run_b: Path) -> float:
    a, b = nd.load_run(str(run_a)), nd.load_run(str(run_b))
    assert a.step == b.step
    differences = [
        float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
        for x, y in zip(
            jax.tree.leaves((a.raw_model, a.model)),
            jax.tree.leaves((b.raw_model, b.model)),
            strict=True,
        )
        if hasattr(x, "shape")
    ]
    return max(differences)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The worker (train, sample, nll with --chunks 4) on 1 device and on 4 devices, in
    parallel; {devices: (output directory, summary)}."""
    base = tmp_path_factory.mktemp("scaling")
    started = {}
    for devices in (1, 4):
        out = base / f"devices{devices}"
        out.mkdir()
        started[devices] = (
            out,
            subprocess.Popen(
                [sys.executable, str(WORKER), str(out), str(CHUNKS)],
                cwd=REPO,
                env=_env(devices),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            ),
        )
    results = {}
    for devices, (out, process) in started.items():
        _, stderr = process.communicate(timeout=TIMEOUT)
        assert process.returncode == 0, stderr[-4000:]
        summary = json.loads((out / "summary.json").read_text())
        for command in ("train", "sample", "nll"):
            assert summary[command]["exit_code"] == 0, summary[command]["stderr"]
        results[devices] = (out, summary)
    return results


def test_training_on_4_devices_reproduces_one_device(runs):
    (one, s1), (four, s4) = runs[1], runs[4]
    assert (s1["train"]["json"]["devices"], s1["train"]["json"]["processes"]) == (1, 1)
    assert (s4["train"]["json"]["devices"], s4["train"]["json"]["processes"]) == (4, 1)
    loss1, loss4 = _losses(one / "run"), _losses(four / "run")
    assert len(loss1) == len(loss4) == 20
    # The loss trajectory varies by O(1) from step to step: agreement to 1e-9 relative is the
    # same computation, not a similar one.
    np.testing.assert_allclose(loss4, loss1, rtol=RTOL, atol=0)
    assert np.ptp(loss1) > 1.0
    assert _max_param_difference(one / "run", four / "run") < 1e-9


def test_sample_and_nll_on_4_devices_match_one_device(runs):
    (one, s1), (four, s4) = runs[1], runs[4]
    for command in ("sample", "nll"):
        assert s1[command]["json"]["devices"] == 1 and s4[command]["json"]["devices"] == 4
        assert s1[command]["json"]["chunks"] == s4[command]["json"]["chunks"] == CHUNKS
        # Same chunking, same adaptive step sequences.
        assert s1[command]["json"]["nfe"] == s4[command]["json"]["nfe"]
    samples1, samples4 = np.load(one / "samples.npy"), np.load(four / "samples.npy")
    assert samples1.shape == samples4.shape == (16, 2)
    np.testing.assert_allclose(samples4, samples1, rtol=RTOL, atol=1e-9)
    nll1, nll4 = np.load(one / "nll.npy"), np.load(four / "nll.npy")
    assert nll1.shape == nll4.shape == (12,)
    np.testing.assert_allclose(nll4, nll1, rtol=RTOL, atol=1e-9)


def test_bad_sizes_are_one_line_errors(runs):
    four, s4 = runs[4]
    bad = s4["bad_batch"]
    assert bad["exit_code"] == 1
    lines = bad["stderr"].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), bad["stderr"]
    assert "30 does not divide evenly over 4 devices" in lines[0]
    assert "Traceback" not in bad["stderr"]
    assert not (four / "bad").exists()  # refused before anything was written
    bad = s4["bad_num"]
    assert bad["exit_code"] == 1
    assert "18 does not split into 4" in bad["stderr"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# JAX's SLURM detection puts the coordinator on the step's first node at a port derived from the
# job id: (job id mod 4096) + 61440.
SLURM_PORTS = range(61440, 65536)


def _free_slurm_port() -> int:
    for port in random.sample(SLURM_PORTS, 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.skip("no free port in the range JAX's SLURM detection uses")


def _slurm_env(process_id: int, port: int) -> dict[str, str]:
    """What `srun` sets for one of two tasks of a one-node step on this machine."""
    env = _env(1)
    env.update(
        SLURM_JOB_ID=str(port - SLURM_PORTS.start),
        SLURM_STEP_NODELIST="localhost",
        SLURM_NTASKS="2",
        SLURM_PROCID=str(process_id),
        SLURM_LOCALID=str(process_id),
        SLURM_STEP_NUM_NODES="1",
    )
    return env


@pytest.mark.parametrize("launch", ["flags", "slurm"])
def test_two_processes_resume_and_match_one_process(runs, tmp_path, launch):
    """Two processes under jax.distributed (gloo collectives on CPU) resume the single-device
    run from its step-10 checkpoint and train to step 20 together: the same trajectory and
    parameters as the single-device run that never stopped; only process 0 writes. `flags`
    starts them with --coordinator/--num-processes/--process-id; `slurm` with none of those,
    under the variables `srun` sets, so JAX's cluster detection joins them."""
    one, _ = runs[1]
    run = tmp_path / "run"
    shutil.copytree(one / "run", run)
    (run / "checkpoints" / "step_00000020.eqx").unlink()
    sys.path.insert(0, str(REPO / "tests"))
    from scaling_worker import TRAIN

    port = _free_port() if launch == "flags" else _free_slurm_port()
    logs = [(tmp_path / f"out{i}.txt", tmp_path / f"err{i}.txt") for i in range(2)]
    processes = []
    for i, (out, err) in enumerate(logs):
        with open(out, "w") as stdout, open(err, "w") as stderr:
            command = [sys.executable, "-m", "nfdm_de.cli.main", *TRAIN, "--run-dir", str(run)]
            command += ["--resume", "--json"]
            env = _env(1)
            if launch == "flags":
                command += ["--coordinator", f"127.0.0.1:{port}"]
                command += ["--num-processes", "2", "--process-id", str(i)]
            else:
                env = _slurm_env(i, port)
            processes.append(
                subprocess.Popen(command, cwd=REPO, env=env, stdout=stdout, stderr=stderr)
            )
    # If one process dies, the other would wait for it at the next collective: stop it.
    deadline = time.monotonic() + TIMEOUT
    try:
        while any(p.poll() is None for p in processes) and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0) for p in processes):
                break
            time.sleep(0.2)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait()
    outputs = [(out.read_text(), err.read_text()) for out, err in logs]
    failed = [
        (p.returncode, err) for p, (_, err) in zip(processes, outputs, strict=True) if p.returncode
    ]
    if failed:
        # The process that failed first, not the one stopped because of it.
        text = max(failed, key=lambda f: f[0])[1]
        if "gloo" in text.lower() or "collective" in text.lower():
            pytest.skip(
                "the CPU backend cannot run cross-process collectives here: "
                + text.strip().splitlines()[-1]
            )
        raise AssertionError(text[-4000:])
    summaries = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    for i, summary in enumerate(summaries):
        assert summary["process_id"] == i
        assert (summary["devices"], summary["processes"]) == (2, 2)
        assert (summary["resumed_from"], summary["steps"]) == (10, 20)
    assert summaries[0]["final_loss"] == summaries[1]["final_loss"]
    # Process 0 alone appends metrics (a second writer would duplicate steps 11-20).
    np.testing.assert_allclose(_losses(run), _losses(one / "run"), rtol=RTOL, atol=0)
    assert "resuming" in outputs[0][1] and "resuming" not in outputs[1][1]
    assert _max_param_difference(run, one / "run") < 1e-9


# --- in-process checks of the pieces (one device) ------------------------------------------------


def test_chunks_are_independent_solves(getkey):
    """`num_chunks` adaptive solves equal separate calls on each chunk (the oracle for "each
    device solves its own rows"): a joint solve would give chunk-dependent step sizes."""
    config = nd.ModelConfig(width=16, depth=1, forward_width=16, forward_depth=1)
    model = nd.build_model(config, (2,), getkey())
    x = jax.random.normal(getkey(), (6, 2))
    chunked, stats = nd.log_likelihood(model, x, num_chunks=3, rtol=1e-4, atol=1e-4)
    parts = [nd.log_likelihood(model, x[i : i + 2], rtol=1e-4, atol=1e-4) for i in (0, 2, 4)]
    separate = np.concatenate([np.asarray(e.value) for e, _ in parts])
    np.testing.assert_allclose(np.asarray(chunked.value), separate, rtol=1e-10, atol=1e-10)
    assert stats.nfe == pytest.approx(np.mean([s.nfe for _, s in parts]))
    assert stats.nfe_max == max(s.nfe_max for _, s in parts)
    with pytest.raises(ValueError, match="6 does not split into 4"):
        nd.log_likelihood(model, x, num_chunks=4)
    with pytest.raises(ValueError, match="`num` 5 does not split into 2"):
        nd.sample(model, 5, key=getkey(), num_chunks=2)


def test_distributed_settings_are_checked(monkeypatch):
    for name in (COORDINATOR_ENV, NUM_PROCESSES_ENV, PROCESS_ID_ENV):
        monkeypatch.delenv(name, raising=False)
    assert nd.initialize_distributed() is False  # nothing given: a single process
    with pytest.raises(ValueError, match="missing: process_id"):
        nd.initialize_distributed("127.0.0.1:1234", 2)
    with pytest.raises(ValueError, match=r"process id must be in \[0, 2\); got 2"):
        nd.initialize_distributed("127.0.0.1:1234", 2, 2)
    with pytest.raises(ValueError, match="host:port"):
        nd.initialize_distributed("localhost", 2, 0)
    monkeypatch.setenv(NUM_PROCESSES_ENV, "two")
    with pytest.raises(ValueError, match="NFDM_DE_NUM_PROCESSES must be an integer"):
        nd.initialize_distributed()
    # One process in all is a plain single-process run (nothing to join).
    assert nd.initialize_distributed("127.0.0.1:1234", 1, 0) is False
