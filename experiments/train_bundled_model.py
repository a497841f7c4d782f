"""Rebuild the bundled default model (virtualcell/data/model) with the project's own command.

    python experiments/train_bundled_model.py [--seed 0] [--threads 1] [--lr LR] [--hidden-size 128 --layers 4]
                                              [--out virtualcell/data/model]

It trains on the embedded default dataset (Papalexi 2021, MIT) with replicate rep_3
held out, so that `virtualcell demo` can compare its ranking with measured effects the
model never saw. The command, config and data hash are recorded in the checkpoint's
virtualcell.json (train_config) and in TRAINING.json beside it.

10,000 optimizer steps (about 35 minutes on one CPU thread): the recipe's 4,000 steps ended with
the validation loss still falling, and 10,000 lowered it and the validation verdict's error
(experiments/results/attempts/recipes/). 20,000 overfit: the validation loss turns up after about
9,000 steps, and the verdict's error was higher (experiments/results/attempts/steps20k/).

The budget is 50 minutes (40 until session 33), so that the 10,000-step cap, not time, ends the run:
the trainer reserves the verdict's time out of the budget from a probe, and since the verdict also
tries temperatures (session 31) it reserves about 7 minutes on a quiet machine and up to 12.5 on a
busy one, which in 40 minutes cut a run beside other work to 7,400 steps (session 33).

Without target offsets (--no-target-offsets; the default elsewhere since session 33): trained with
them at seeds 0 and 1 (session 33, `attempts/target_offsets/bundled/`), the recipe's own validation
verdict had the higher error at both seeds at the settings both scored (1 sample: MSE 0.1205 / 0.1400
against 0.1157 / 0.1345 for the shipped model and its seed-1 twin; 4 samples 0.0957 / 0.1151 against
0.0933 / 0.1096; 8 samples, seed 0: 0.0899 against 0.0880), inside the noise terms but on one side; on this screen the knocked-out genes drop without vanishing, and
the learned knockout offset stayed small (-0.46 / -0.54). The plainer model stays.

Without the token bias (--no-token-bias; the default elsewhere since session 37, virtualcell/token_bias.py): trained
with it at seeds 0 and 1 (session 38, `attempts/token_bias/bundled/`), the recipe's validation verdict had the higher
error at both seeds and every setting both scored (seed 0, 8 samples: MSE 0.0977 against 0.0880; seed 1, 4 samples:
0.1121 against 0.1096), and its validation loss was higher throughout. The table helps at 2,000 steps (verdict 0.1094
against 0.1187) and keeps growing after; a stronger weight decay on it (1) brought the verdict back near, not below,
the shipped model's (0.0901). The plainer model stays.

Each control pair trained once (the default since session 52; `--no-control-copies`): the embedded screen has
fewer control cells than the control share asks for, and until then the training control pairs came again up to
it. The control prompt memorized those copies, and every predicted delta subtracts its error: the deltas of the
model shipped before shared a part the measured ones lack (protocol 4's mean pairwise correlation 0.36). Trained
once (session 52), its verdict error was lower than its twin's with copies (0.0921 against 0.0934), and held out
its deltas correlate 0.21 over sampling seeds 0-2 (`attempts/control_copies/`).

The verdict is offered 8 samples per cell besides 1 and 4 (--verdict-samples 1,4,8): its extra
time does not cost steps (10,000 are reached first), and on this recipe's
validation split the error kept falling (MSE 0.116 / 0.093 / 0.088 with 1 / 4 / 8 samples;
meanshift 0.092), so the verdict chose 8. Until session 33 the shipped weights were trained with
--verdict-samples 1,4 and judged again with 1,4,8 by `virtualcell verdict`; since session 33 they
are this script's output as it stands (TRAINING.json records the command).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def command(out: str, max_minutes: float, max_steps: int, seed: int, threads: int | None = None,
            lr: float | None = None, hidden_size: int = 128, layers: int = 4, pair_draws: int = 1) -> list[str]:
    from virtualcell.train import NEW_MODEL_LR

    return [
        sys.executable, "-m", "virtualcell.cli", "train",
        "--data", "papalexi2021", "--perturbation-key", "perturbation", "--control", "control",
        "--holdout", "bio_rep=rep_3", "--kind", "knockout",
        "--top-k", "100", "--hidden-size", str(hidden_size), "--layers", str(layers), "--heads", "4",
        "--lr", f"{NEW_MODEL_LR if lr is None else lr:g}",
        "--batch-size", "16", "--max-steps", str(max_steps), "--max-minutes", str(max_minutes),
        "--verdict-samples", "1,4,8", "--no-target-offsets", "--no-token-bias", "--pair-draws", str(pair_draws),
        "--seed", str(seed), *(["--threads", str(threads)] if threads else []), "--out", out,
    ]


def main() -> None:
    from virtualcell.safeio import LOCK

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "virtualcell" / "data" / "model"))
    ap.add_argument("--max-minutes", type=float, default=50.0)
    ap.add_argument("--max-steps", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: the trainer measures)")
    ap.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the trainer's)")
    ap.add_argument("--hidden-size", type=int, default=128, help="model width (the recipe's: 128)")
    ap.add_argument("--layers", type=int, default=4, help="transformer layers (the recipe's: 4)")
    ap.add_argument("--pair-draws", type=int, default=1, help="draws of the pairing the epochs cycle through (the recipe's: 1)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cmd = command(tmp, args.max_minutes, args.max_steps, args.seed, args.threads, args.lr, args.hidden_size, args.layers,
                      args.pair_draws)
        t = time.time()
        subprocess.run(cmd, check=True)
        took = time.time() - t
        out = Path(args.out)
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        for f in Path(tmp).iterdir():
            # the model, tokenizer, codec and history; not the resumable trainer state, nor the run's lock file
            if f.is_file() and f.name != LOCK:
                shutil.copy2(f, out / f.name)
    meta = json.loads((out / "virtualcell.json").read_text())
    record = {
        "command": " ".join(["virtualcell", *cmd[3:-2], "--out", "DIR"]),
        "seconds": round(took, 1),
        "machine": f"{platform.machine()} {platform.processor() or ''} python {platform.python_version()}".strip(),
        "data_hash": meta["train_config"]["data_hash"],
        "steps": meta["train_config"].get("steps"),
        "size_bytes": sum(f.stat().st_size for f in out.iterdir()),
    }
    (out / "TRAINING.json").write_text(json.dumps(record, indent=1))
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
