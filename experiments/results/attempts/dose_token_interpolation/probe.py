"""Session 46 probe: a protocol-6 checkpoint whose untrained shared dose-bin token (<dose:0>, the held-out dose 1)
reads as the mean of its trained neighbours (<dose:-0.5>, <dose:0.5>: linear in log10 dose), in the input embedding
and, with --with-bias, in the token-bias row too. Then score it with protocol 6's --model.

    python probe.py SRC/protocol6 DST/protocol6 [--with-bias]
    python experiments/protocol_6_dose_interpolation.py --seed S --threads 2 --model DST/protocol6 --out OUT/seedS
"""
import json
import shutil
import sys
from pathlib import Path

import numpy as np
from safetensors.torch import load_file, save_file

src, dst = Path(sys.argv[1]), Path(sys.argv[2])
if dst.exists():
    shutil.rmtree(dst)
shutil.copytree(src, dst, ignore=shutil.ignore_patterns("last"))
sd = load_file(dst / "model.safetensors")
vocab = json.load(open(dst / "tokenizer.json"))["model"]["vocab"]
E = sd["model.embed_tokens.weight"]
E[vocab["<dose:0>"]] = (E[vocab["<dose:-0.5>"]] + E[vocab["<dose:0.5>"]]) / 2
save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
if "--with-bias" in sys.argv:
    names = json.load(open(dst / "virtualcell.json"))["token_bias"]
    T = np.load(dst / "token_bias.npy")
    row = {n: i for i, n in enumerate(names)}
    T[row["<dose:0>"]] = (T[row["<dose:-0.5>"]] + T[row["<dose:0.5>"]]) / 2
    np.save(dst / "token_bias.npy", T)
