#!/usr/bin/env python
"""Which XLA:CPU flags make jaxft's train step faster: each flag set in a fresh process (XLA reads
XLA_FLAGS once), jaxft's step timed against eager torch's in that same process.

    python tools/xla_flag_sweep.py [--arch resnet18] [--strategy full] [--image-size 224] [--batch-size 16]
                                   [--repeats 3] [--flags="SET1;SET2;none"]

Prints one row per flag set: jaxft's and torch's median step, their ratio, the first step's loss
difference (a flag must not change what is computed) and the compile time. jaxft's own defaults
are off in every child (JAXFT_XLA_DEFAULTS=0), so each row runs exactly its flags. The table in
docs/benchmarks.md ("Making the train step faster") came from this script.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from step_args import step_parser  # tools/step_args.py, beside this script

YNN = "--xla_cpu_experimental_ynn_fusion_type"
DEFAULT_SETS = ["", f"{YNN}=reduce", f"{YNN}=reduce,individual_convolution", f"{YNN}=reduce,eltwise",
                f"{YNN}=reduce --xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_custom_call=true",
                f"{YNN}=reduce --xla_cpu_use_xnnpack=true"]

CHILD = """
import json, statistics, sys, time
import numpy as np, torch, torchvision
from jaxft import create_model, to_torch
from jaxft.engine import Engine
from jaxft.freeze import parse_strategy
from jaxft.optim import OptimConfig
from jaxft.parity import freeze_like
from jaxft.pretrained import init_variables
arch, spec, size, batch_size, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(torch.get_num_threads())
model = create_model(arch, num_classes=10)
variables = init_variables(model)
rng = np.random.default_rng(0)
batch = {"image": rng.normal(size=(batch_size, size, size, 3)).astype(np.float32),
         "label": rng.integers(0, 10, batch_size)}
engine = Engine(model, variables, parse_strategy(spec), OptimConfig("adam", lr=1e-4), bn_policy="torch")
net = torchvision.models.get_model(arch, weights=None, num_classes=10)
net.load_state_dict(to_torch(arch, variables))
optimizer = torch.optim.Adam(freeze_like(net, model, engine.labels), lr=1e-4)
net.train()
x = torch.from_numpy(batch["image"]).permute(0, 3, 1, 2).contiguous()
y = torch.from_numpy(batch["label"])
def torch_step():
    loss = torch.nn.functional.cross_entropy(net(x), y)
    optimizer.zero_grad(); loss.backward(); optimizer.step()
    return loss.item()
def jaxft_step():
    metrics = engine.train_step(batch)
    return float(metrics["loss_sum"] / metrics["count"])
start = time.perf_counter(); first = jaxft_step(); compile_s = time.perf_counter() - start
loss_diff = abs(first - torch_step()) / abs(first)
ours, theirs = [], []
for _ in range(repeats):
    start = time.perf_counter(); jaxft_step(); ours.append(time.perf_counter() - start)
    start = time.perf_counter(); torch_step(); theirs.append(time.perf_counter() - start)
print(json.dumps({"jaxft": statistics.median(ours), "torch": statistics.median(theirs),
                  "loss_diff": loss_diff, "compile": compile_s}))
"""


def main() -> None:
    parser = step_parser(__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--flags", default=";".join(set_ or "none" for set_ in DEFAULT_SETS),
                        help="flag sets separated by ';', each an XLA_FLAGS string ('none': no flags); "
                             "write --flags=... since the sets start with --")
    args = parser.parse_args()
    print(f"# {args.arch} {args.strategy}, Adam, batch {args.batch_size} x {args.image_size} px, BN policy torch\n")
    print("| XLA_FLAGS | jaxft step s | torch step s | jaxft/eager | first loss rel diff | jaxft compile s |")
    print("|---|---|---|---|---|---|")
    for flags in ("" if part.strip() == "none" else part.strip() for part in args.flags.split(";")):
        env = {**os.environ, "XLA_FLAGS": flags, "JAXFT_XLA_DEFAULTS": "0"}
        done = subprocess.run([sys.executable, "-c", CHILD, args.arch, args.strategy, str(args.image_size),
                               str(args.batch_size), str(args.repeats)], env=env, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"| `{flags or '(none)'}` | failed: {done.stderr.strip().splitlines()[-1][:80]} | | | | |")
            continue
        row = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"| `{flags or '(none)'}` | {row['jaxft']:.2f} | {row['torch']:.2f} | {row['torch'] / row['jaxft']:.2f} "
              f"| {row['loss_diff']:.1e} | {row['compile']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
