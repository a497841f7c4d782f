"""Run by tests/test_distributed.py under ``torchrun --nproc_per_node 2``: ``virtualcell train`` as data-parallel
training on two CPU processes (gloo) whose clocks disagree (rank 1's runs 1.5x fast), under a time budget."""

import hashlib
import json
import sys
from pathlib import Path

import virtualcell.train
from virtualcell import cli
from virtualcell.distributed import Split
from virtualcell.training import loop

data_path, out, minutes = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
split = Split.current(cpu=True)
assert split.world == 2, split
if split.rank == 1:  # a process whose clock runs fast: alone, it would stop steps before the other
    real = loop.Budget.spent
    loop.Budget.spent = lambda self: 1.5 * real(self)
# refusals only the main process can make (its --out) stop both processes from Python too: a caught refusal on the
# main one left the other waiting in its first exchange for ever; a batch smaller than the processes is refused
import virtualcell as vc  # noqa: E402
from virtualcell.errors import OutputError, TrainingError  # noqa: E402

cells = vc.datasets.read_h5ad(data_path)
contract = vc.DataContract(perturbation_key="perturbation", control="control")
mine = out / "users_folder"
if split.main:
    mine.mkdir(exist_ok=True)
    (mine / "notes.md").write_text("my notes")
tiny = virtualcell.train.TrainConfig(top_k=10, hidden_size=16, n_layers=1, n_heads=2, max_steps=1, batch_size=4)
for config, folder, error in ((tiny, mine, OutputError), (tiny.__class__(batch_size=1), out / "b1", TrainingError)):
    try:
        virtualcell.train.train(cells, out=folder, contract=contract, config=config, progress=False)
        raise AssertionError(f"rank {split.rank}: not refused")
    except error:
        pass
trained = []  # the model each process ends with (the command line keeps it to itself)
plain = virtualcell.train.train
virtualcell.train.train = lambda *a, **k: trained.append(plain(*a, **k)) or trained[-1]
rc = cli.main(["train", "--data", data_path, "--perturbation-key", "perturbation", "--control", "control",
               "--out", str(out / "model"), "--max-minutes", minutes, "--max-steps", "100000", "--top-k", "30",
               "--hidden-size", "32", "--layers", "2", "--heads", "2", "--batch-size", "8", "--verdict-fraction", "0",
               "--threads", "1", "--compile", "off"])
assert rc == 0, rc
model = trained[0]
digest = hashlib.sha256()
for name, t in sorted(model.lm.state_dict().items()):
    digest.update(name.encode())
    digest.update(t.detach().cpu().numpy().tobytes())
hist = model.train_config["history"]
(out / f"rank{split.rank}.json").write_text(json.dumps({
    "weights": digest.hexdigest(), "steps": model.train_config["steps"], "last_val": hist[-1]["val_loss"]}))
