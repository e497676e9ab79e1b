#!/usr/bin/env python
"""CPU cost of the demo's four attacks (configs/tiny_digits.toml stage flags) on one model: the pre-trained victim."""
import json, sys, time
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
import torch
torch.set_num_threads(1)
import attack_loss, attack_pfami, attack_clid, attack_secmi
WORK = sys.argv[1] if len(sys.argv) > 1 else "runs/c32f8"  # a bench_perturbation.py --work_dir
V = f"{WORK}/victim"
common = ["--pretrained_model_name_or_path", f"{V}/pipeline", "--member_dataset", f"{V}/members",
          "--nonmember_dataset", f"{V}/nonmembers", "--batch_size", "500", "--overwrite",
          "--latents_cache_dir", f"{WORK}/latents_cache"]
runs = {"sima": (attack_loss, ["--method", "sima", "--attack_timesteps", "0", "50", "100"]),
        "pfami": (attack_pfami, ["--attack_timesteps", "100", "300", "--crop_strengths", "0.95", "0.85"]),
        "clid": (attack_clid, ["--attack_timesteps", "450", "--weak_caption", "0.5", "null"]),
        "secmi": (attack_secmi, ["--t_sec", "100", "--k", "50"])}
out = {}
for name, (module, extra) in runs.items():
    for rep in ("cold", "cached"):
        wall, cpu = time.time(), time.process_time()
        module.main(module.parse_args(common + extra + ["--output_dir", f"{WORK}/attack_cost/{name}"]))
        out[f"{name}_{rep}"] = {"wall_s": round(time.time() - wall, 1), "cpu_s": round(time.process_time() - cpu, 1)}
        print(name, rep, out[f"{name}_{rep}"], flush=True)
        if name != "sima":
            break
json.dump(out, open(f"{WORK}/attack_cost.json", "w"), indent=1)
