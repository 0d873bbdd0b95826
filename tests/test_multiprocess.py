"""Several JAX processes on this machine (CPU devices, gloo collectives): 1 process x 8 devices against 2 x 4 and
4 x 2, on the meshes (data), (data, tensor) and (fsdp, tensor). Greedy AR, SD and SSS, sampled SSS and SD with a
feature-draft head, Best-of-N, three DPO steps, and a DPO checkpoint saved by one job and resumed by a job with
another process count on another mesh, must all give what one process gives.

Every scenario of a process count runs in one set of worker processes (tests/mp_worker.py) to pay JAX's start-up
once; a worker that dies stops its job at once (the others are killed) and the test fails with its output."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "mp_worker.py")
MESHES = {"data": {"data": 8}, "data_tensor": {"data": 4, "tensor": 2}, "fsdp_tensor": {"data": 1, "fsdp": 4,
                                                                                       "tensor": 2}}
JOB_TIMEOUT = 420
ON_FOUR = ["ar", "sd", "sss_sampled"]  # 4 processes on 2 cores compile everything 4 times: the core of each law


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_job(nproc: int, spec: dict, tmp_path, tag: str) -> dict:
    """Start nproc workers together; fail fast when one dies; return process 0's results."""
    spec_path = tmp_path / f"spec-{tag}.json"
    spec_path.write_text(json.dumps(spec))
    out = tmp_path / f"result-{tag}.json"
    port = free_port()
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               RSS_JAX_CACHE="off", PYTHONUNBUFFERED="1")
    logs = [open(tmp_path / f"log-{tag}-{i}.txt", "w+") for i in range(nproc)]
    procs = [subprocess.Popen([sys.executable, WORKER, "--nproc", str(nproc), "--pid", str(i), "--port", str(port),
                               "--devices", str(8 // nproc), "--spec", str(spec_path), "--out", str(out)],
                              env=env, stdout=logs[i], stderr=subprocess.STDOUT) for i in range(nproc)]
    deadline = time.time() + JOB_TIMEOUT
    failed = None
    try:
        while any(p.poll() is None for p in procs):
            bad = [i for i, p in enumerate(procs) if p.poll() not in (None, 0)]
            if bad or time.time() > deadline:
                failed = f"worker {bad[0]} exited with {procs[bad[0]].returncode}" if bad else "timed out"
                break
            time.sleep(0.2)
        if failed is None and any(p.returncode != 0 for p in procs):
            failed = "a worker failed"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    text = ""
    for i, f in enumerate(logs):
        f.seek(0)
        text += f"--- worker {i}:\n" + f.read()[-3000:]
        f.close()
    assert failed is None, f"{tag}: {failed}\n{text}"
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def mp_spec(tiny_checkpoints, tmp_path_factory):
    from tests.test_training import pair_records, write_jsonl
    work = tmp_path_factory.mktemp("mp")
    rng = np.random.default_rng(4)
    prompts = [rng.integers(1, 90, size=int(n)).tolist() for n in (3, 5, 4, 6, 2, 7, 3, 5)]
    return {"target": tiny_checkpoints["qwen2_bias"][0], "draft": tiny_checkpoints["llama_gqa_llama3rope"][0],
            "sft": tiny_checkpoints["llama_mha_linear"][0], "prompts": prompts, "new_tokens": 6,
            "pairs": str(write_jsonl(work / "pairs.jsonl", pair_records(n=16))), "batch_size": 8,
            "meshes": MESHES, "work": str(work),
            "prompts_file": str(write_jsonl(work / "prompts.jsonl", [{"prompt_ids": p} for p in prompts]))}


@pytest.fixture(scope="module")
def jobs(mp_spec, tmp_path_factory):
    """The jobs: the reference (1 x 8 on the data mesh: every method, three DPO steps, an uninterrupted 6-step run
    and the first half of a stopped one), 2 x 4 (meshes (data) and (data, tensor); resumes the 1-process checkpoint
    on (data, tensor)), 4 x 2 (mesh (fsdp, tensor); its own stopped run) and a fresh 2 x 4 job that resumes the
    4-process checkpoint on (fsdp, tensor). Compiles dominate on two cores, so each method runs on as few meshes as
    the comparison needs: AR, SD and sampled SSS on every mesh and process count, greedy SSS, SD with a head and
    BoN on (data, tensor) with 2 processes."""
    tmp = tmp_path_factory.mktemp("mp_jobs")
    work = mp_spec["work"]
    all_meshes = list(MESHES)
    required = ["ar", "sd", "sss", "sss_sampled"]
    extra = ["sd_head_sampled", "bon"]
    ref = run_job(1, dict(mp_spec, decode={"data": required + extra}, dpo_meshes=["data"],
                          full={"mesh": "data", "output": os.path.join(work, "full"), "steps": 6},
                          save={"mesh": "data", "output": os.path.join(work, "ckpt1"), "steps": 6,
                                "stop_after": 3},
                          cli={"input": mp_spec["prompts_file"], "output": os.path.join(work, "cli-1x8.jsonl"),
                               "mesh": "data=8"}), tmp, "1x8")
    two = run_job(2, dict(mp_spec, decode={"data": ["ar", "sss_sampled"], "data_tensor": required + extra},
                          dpo_meshes=["data_tensor"],
                          resume={"mesh": "data_tensor", "output": os.path.join(work, "ckpt1"), "steps": 6},
                          cli={"input": mp_spec["prompts_file"], "output": os.path.join(work, "cli-2x4.jsonl"),
                               "mesh": "data=4,tensor=2"}),
                  tmp, "2x4")
    four = run_job(4, dict(mp_spec, decode={"fsdp_tensor": ON_FOUR}, dpo_meshes=["fsdp_tensor"],
                           save={"mesh": "fsdp_tensor", "output": os.path.join(work, "ckpt4"), "steps": 6,
                                 "stop_after": 3}), tmp, "4x2")
    again = run_job(2, dict(mp_spec, resume={"mesh": "fsdp_tensor", "output": os.path.join(work, "ckpt4"),
                                             "steps": 6, "export": True}), tmp, "2x4-resume")
    return {"1x8": ref, "2x4": two, "4x2": four, "resume": again}


def test_processes_and_shards(jobs):
    for tag, nproc in (("1x8", 1), ("2x4", 2), ("4x2", 4)):
        r = jobs[tag]
        assert (r["processes"], r["devices"], r["local_devices"]) == (nproc, 8, 8 // nproc)
        for name, res in r["decode"].items():
            sh = res["shards"]
            # the (layers, embed, heads) weight: spread over several devices, each process holding only its own
            assert sh["devices"] > 1, (tag, name, sh)
            assert sh["local_shards"] == 8 // nproc
            assert sh["fully_addressable"] == (nproc == 1)
            if name != "data":
                assert np.prod(sh["local_shape"]) < np.prod(sh["global_shape"]), (tag, name, sh)


@pytest.mark.parametrize("method", ["ar", "sd", "sss", "sss_sampled", "sd_head_sampled", "bon"])
def test_decoding_equal_across_process_counts(jobs, method):
    ref = jobs["1x8"]["decode"]["data"]
    seen = set()
    for tag in ("2x4", "4x2"):
        for name, res in jobs[tag]["decode"].items():
            if method in res:
                assert res[method] == ref[method], (method, tag, name)
                seen.add(tag)
    assert "2x4" in seen and (method not in ON_FOUR or "4x2" in seen), seen
    assert ref["sd"] == ref["ar"]  # greedy speculative decoding gives greedy decoding's tokens


def test_all_three_meshes_ran_on_several_processes(jobs):
    assert set(jobs["2x4"]["decode"]) | set(jobs["4x2"]["decode"]) == set(MESHES)


def test_dpo_equal_across_process_counts(jobs):
    base = jobs["1x8"]["dpo"]["data"]
    assert len(base["losses"]) == 3 and base["losses"][0] != base["losses"][-1]
    for tag in ("1x8", "2x4", "4x2"):
        for name, res in jobs[tag]["dpo"].items():
            np.testing.assert_allclose(res["losses"], base["losses"], rtol=2e-5, atol=1e-6, err_msg=f"{tag} {name}")
            for k, v in res["params"].items():
                np.testing.assert_allclose(np.asarray(v), np.asarray(base["params"][k]), rtol=1e-4, atol=1e-5,
                                           err_msg=f"{tag} {name} {k}")


def test_checkpoint_resumes_on_another_mesh_and_process_count(jobs):
    full = jobs["1x8"]["full"]
    assert full["steps"] == [1, 2, 3, 4, 5, 6]
    for first, second in ((jobs["1x8"]["save"], jobs["2x4"]["resume"]), (jobs["4x2"]["save"],
                                                                        jobs["resume"]["resume"])):
        assert first["steps"] == [1, 2, 3] and second["steps"] == [4, 5, 6]
        np.testing.assert_allclose(first["losses"] + second["losses"], full["losses"], rtol=2e-5, atol=1e-6)
        for k, v in second["params"].items():
            np.testing.assert_allclose(np.asarray(v), np.asarray(full["params"][k]), rtol=1e-4, atol=1e-5)


def test_command_line_on_two_processes(jobs):
    """`rss-jax generate --mesh ...` (sampled SSS) on 2 processes writes, from process 0, the file one process
    writes."""
    assert len(jobs["1x8"]["cli"]) == 8 and any(len(r) > 1 for r in jobs["1x8"]["cli"])
    assert jobs["2x4"]["cli"] == jobs["1x8"]["cli"]


def test_a_worker_that_dies_fails_the_job_fast(tmp_path):
    """Worker 1 exits at start-up while worker 0 waits for it in a collective: the job fails at once, naming it."""
    t0 = time.time()
    with pytest.raises(AssertionError, match="worker 1 exited with 3"):
        run_job(2, {"crash_pid": 1}, tmp_path, "crash")
    assert time.time() - t0 < 90


def test_model_exported_by_two_processes_loads_anywhere(jobs, mp_spec):
    """The resumed 2-process run exports <output>/final (LM.save from every process, one folder): it loads on one
    device and holds the uninterrupted run's weights."""
    import rss_jax as rj
    final = rj.load(os.path.join(mp_spec["work"], "ckpt4", "final"))
    full = jobs["1x8"]["full"]["params"]
    for k, v in full.items():
        np.testing.assert_allclose(np.asarray(final.params()[k]), np.asarray(v), rtol=1e-4, atol=1e-5)
