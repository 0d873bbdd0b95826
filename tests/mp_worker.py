"""One process of a multi-process run for tests/test_multiprocess.py (not collected by pytest).

    python tests/mp_worker.py --nproc P --pid I --port N --devices D --spec spec.json --out result.json

Every process runs the same scenarios on the same meshes (P processes x D CPU devices each, one mesh over all of
them); process 0 writes what they produced. Scenarios (from spec.json):
  decode   greedy AR, SD, SSS and sampled SSS / SD with a feature-draft head, on each mesh
  dpo      three DPO steps on each mesh: losses and the gathered final parameters
  save     a DPO run stopped after `stop_after` steps with a checkpoint (on the first mesh)
  resume   resume that run to its end (on the first mesh of this job)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--nproc", type=int, required=True)
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--devices", type=int, required=True)
    ap.add_argument("--spec", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["JAX_NUM_CPU_DEVICES"] = str(args.devices)
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    import jax
    if args.nproc > 1:
        from rss_jax import sharding
        sharding.initialize(f"localhost:{args.port}", args.nproc, args.pid, initialization_timeout=60,
                            heartbeat_timeout_seconds=20)
    import numpy as np

    import rss_jax as rj
    import training
    from rss_jax import sharding
    from training import TrainConfig

    with open(args.spec) as f:
        spec = json.load(f)
    if spec.get("crash_pid") == args.pid:  # the test of a worker that dies: the others would wait for it forever
        os._exit(3)
    if "crash_pid" in spec:
        sharding.barrier("never reached by the crashed worker")
    assert jax.process_count() == args.nproc and len(jax.devices()) == args.nproc * args.devices
    results = {"processes": args.nproc, "devices": len(jax.devices()),
               "local_devices": len(jax.local_devices()), "decode": {}, "dpo": {}}

    def tolist(out):
        return np.asarray(out.tokens).tolist()

    def gathered_params(lm):
        return {k: np.asarray(v).tolist() for k, v in sharding.to_host(lm.params()).items()
                if k in ("layers.wq", "layers.w_down", "embed_tokens")}

    prompts = spec["prompts"]
    for name, methods in spec.get("decode", {}).items():
        mesh = sharding.make_mesh(**spec["meshes"][name])
        lm = rj.load(spec["target"], mesh=mesh)
        draft = rj.load(spec["draft"], mesh=mesh)
        sft = rj.load(spec["sft"], mesh=mesh)
        wq = lm.state["layers"]["wq"][...]
        # each process holds only its own shards of a large weight; together they span several devices
        res = {"shards": {"devices": len(wq.sharding.device_set), "local_shards": len(wq.addressable_shards),
                          "local_shape": list(wq.addressable_shards[0].data.shape), "global_shape": list(wq.shape),
                          "fully_addressable": bool(wq.is_fully_addressable)}}
        common = dict(max_new_tokens=spec["new_tokens"], eos=[])
        runs = {
            "ar": lambda: rj.generate(lm, prompts, temperature=0.0, **common),
            "sd": lambda: rj.generate(lm, prompts, method="sd", draft=draft, k=3, temperature=0.0, **common),
            "sss": lambda: rj.generate(lm, prompts, method="sss", draft=draft, sft=sft, k=3, temperature=0.0,
                                       **common),
            "sss_sampled": lambda: rj.generate(lm, prompts, method="sss", draft=draft, sft=sft, k=3,
                                               temperature=1.0, seed=7, **common),
            "sd_head_sampled": lambda: rj.generate(
                lm, prompts, method="sd", draft=rj.heads.new_head(rj.load(spec["target"]), seed=5).replicate(mesh),
                k=2, temperature=1.0, seed=3, **common),
            "bon": lambda: rj.best_of_n(lm, prompts[:2], n=4, reward=rj.rewards.CallableReward(
                lambda p, rs: [float(sum(r) % 7) for r in rs]), max_new_tokens=4, seed=2, eos=[]),
        }
        for method in methods:
            t0 = time.perf_counter()
            res[method] = tolist(runs[method]())
            print(f"{name} {method}: {time.perf_counter() - t0:.1f} s", flush=True)
        results["decode"][name] = res

    if "cli" in spec:  # `rss-jax generate` on every process: the same rows decoded, process 0 writes the file
        from rss_jax.cli import main as cli_main
        c = spec["cli"]
        code = cli_main(["generate", "--model", spec["target"], "--method", "sss", "--draft", spec["draft"],
                         "--sft", spec["sft"], "--temperature", "1.0", "--seed", "7", "--max-new-tokens",
                         str(spec["new_tokens"]), "--input", c["input"], "--output", c["output"], "--batch-size",
                         "8", "--mesh", c["mesh"], "--no-progress"])
        assert code == 0, code
        sharding.barrier("cli written")
        results["cli"] = [json.loads(line)["token_ids"] for line in open(c["output"])]
        results["cli_written_by"] = [os.path.exists(c["output"])]

    def dpo(mesh, output, steps, stop_after=None, resume=False, save_every=0, export=False):
        t0 = time.perf_counter()
        res = training.train(TrainConfig(mode="dpo", policy=spec["target"], data=spec["pairs"], output=output,
                                         steps=steps, batch_size=spec["batch_size"], learning_rate=5e-3,
                                         seed=1, mesh=mesh, stop_after=stop_after, resume=resume,
                                         save_every=save_every, progress=False, export=export))
        print(f"dpo {output}: {time.perf_counter() - t0:.1f} s", flush=True)
        return {"losses": [m["loss"] for m in res.metrics], "steps": [m["step"] for m in res.metrics],
                "params": gathered_params(res.lm)}

    for name in spec.get("dpo_meshes", []):
        mesh = sharding.make_mesh(**spec["meshes"][name])
        results["dpo"][name] = dpo(mesh, os.path.join(spec["work"], f"dpo-{args.nproc}-{name}"), 3)
    if "save" in spec:
        s = spec["save"]
        mesh = sharding.make_mesh(**spec["meshes"][s["mesh"]])
        results["save"] = dpo(mesh, s["output"], s["steps"], stop_after=s["stop_after"])
    if "resume" in spec:
        s = spec["resume"]
        mesh = sharding.make_mesh(**spec["meshes"][s["mesh"]])
        results["resume"] = dpo(mesh, s["output"], s["steps"], resume=True, export=s.get("export", False))
    if "full" in spec:
        s = spec["full"]
        mesh = sharding.make_mesh(**spec["meshes"][s["mesh"]])
        results["full"] = dpo(mesh, s["output"], s["steps"])

    if sharding.is_main_process():
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(results, f)
        os.replace(tmp, args.out)
    sharding.barrier("worker done")
    print("WORKER-OK", args.pid, flush=True)


if __name__ == "__main__":
    try:
        main()
    except BaseException:  # exit at once: a normal exit would wait in jax.distributed's shutdown for the others
        import traceback
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
