"""The C2S model: a causal language model plus everything needed to read and write cells.

:class:`C2SModel` wraps any Hugging Face causal LM and its tokenizer with

* the gene vocabulary and rank → expression fit (the sentence codec),
* the perturbations it knows and the prompt format (``compact`` or ``c2s``),
* the data contract and training config it came from,

and saves them all into one ``save_pretrained`` folder (``virtualcell.json`` beside the
model and tokenizer files), so one folder rebuilds everything.

Real checkpoints and the project's small models run the same code::

    m = C2SModel.load("vandijklab/C2S-Scale-Gemma-2-2B", genes=adata.var_names)  # GPU, bf16
    m = C2SModel.load(virtualcell.model.BUNDLED)                                 # CPU, offline
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import target_offsets, token_bias
from .contract import DataContract
from .errors import DataError, ModelError, PerturbationError, a_kind_of, finite_number, preview, whole_at_least
from .generation import Component, GeneConstraint, GenerationConfig, TrieConstraint, generate_grid, stable_key
from .perturbations import CONTROL_WORDS, GENETIC, Combination, Perturbation, parse, parts_of
from .prompts import FORMATS, PerturbationVocab, PromptFormat
from .sentences import CellSentences, RankFit, Vocabulary

__all__ = ["C2SModel", "BUNDLED", "pick_device", "bundled"]

log = logging.getLogger(__name__)

META_FILE = "virtualcell.json"
BUNDLED = str(Path(__file__).resolve().parent / "data" / "model")
KNOWN_HUB_MODELS = (
    "vandijklab/C2S-Scale-Gemma-2-2B",
    "vandijklab/C2S-Scale-Gemma-2-27B",
    "vandijklab/C2S-Pythia-410m-cell-type-prediction",
)


_DEVICES = ("cuda", "mps", "cpu")  # the device types virtualcell runs on


def _mps_built() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_built()


def _mps_available() -> bool:
    return _mps_built() and torch.backends.mps.is_available()


def _wants_auto(device: str | torch.device | None) -> bool:
    """Whether ``device`` asks for the best available device: left out, or ``"auto"`` (as users type it)."""
    return device is None or (isinstance(device, str) and device.strip().lower() == "auto")


def _machine_has(*, mps: bool) -> str:
    cuda = ""
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        cuda = "cuda (cuda:0)" if n == 1 else f"cuda (cuda:0 to cuda:{n - 1})"
    return ", ".join(x for x in (cuda, "mps" if mps else "", "cpu") if x)


def _other_backend(kind: str) -> str:
    """What this torch says about a device type virtualcell does not run on, for the refusal."""
    if kind == "hip":
        return " (ROCm GPUs are 'cuda' in torch: a ROCm build of torch runs them as cuda)"
    if kind == "meta":
        return " ('meta' tensors hold shapes without values: nothing can be computed on them)"
    backend = getattr(torch, kind, None)
    try:
        seen = backend is not None and bool(backend.is_available())
    except Exception:  # noqa: BLE001  (a backend's own check failing only means it is not usable here)
        seen = False
    return (f" (torch sees a device of type {kind!r} here, but virtualcell is not built or tested for it)" if seen
            else "")


def _available_device(device: str | torch.device, *, mps: bool) -> torch.device:
    """``device`` as a torch device, where it is one virtualcell runs on (``cuda``, ``mps``, ``cpu``) and this machine
    has it; otherwise an error that says what it has. Names are read without case or surrounding spaces
    (``"CUDA:1"``)."""
    have = _machine_has(mps=mps)
    try:
        dev = torch.device(device.strip().lower() if isinstance(device, str) else device)
    except (RuntimeError, TypeError):
        raise ModelError(f"Unknown device {device!r}: use cuda (or cuda:N), mps or cpu, or leave it out (or 'auto') "
                         f"for the best available. This machine has: {have}.") from None
    if dev.type not in _DEVICES:
        raise ModelError(f"Device {device!r} is not one virtualcell runs on{_other_backend(dev.type)}: use cuda (or "
                         f"cuda:N), mps or cpu, or leave it out (or 'auto') for the best available. This machine has: "
                         f"{have}.")
    if dev.type == "cuda" and not torch.cuda.is_available():
        cpu_only = torch.version.cuda is None and torch.version.hip is None
        why = "this torch is a CPU-only build" if cpu_only else "torch sees no CUDA GPU here"
        raise ModelError(f"Device {device!r} was asked for, but {why}. This machine has: {have}; leave the device out "
                         "for the best available, or run on a machine with a GPU (and a CUDA build of torch).")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ModelError(f"Device {device!r} was asked for, but this machine has {torch.cuda.device_count()} CUDA "
                         f"GPU(s): cuda:0 to cuda:{torch.cuda.device_count() - 1}.")
    if dev.type == "mps" and not mps:
        why = ("this torch was built without MPS (an MPS build is torch for macOS on Apple silicon)" if not _mps_built()
               else "torch has MPS but it is not available here (it needs macOS 12.3 or later on Apple silicon)")
        raise ModelError(f"Device {device!r} (Apple's Metal) was asked for, but {why}. This machine has: {have}; leave "
                         "the device out for the best available.")
    return dev


def pick_device(device: str | torch.device | None = None, dtype: str | torch.dtype | None = None
                ) -> tuple[torch.device, torch.dtype]:
    """CUDA with bf16 (fp16 where the GPU has no native bf16: a T4, a V100), MPS with fp32, CPU with fp32; both
    overridable. ``device`` left out or ``"auto"`` is the best available; one this machine lacks, or one virtualcell
    does not run on (only ``cuda[:N]``, ``mps``, ``cpu``), is refused, saying what the machine has.

    Under a multi-process launcher (``accelerate launch``, ``torchrun``) each process takes
    the GPU of its ``LOCAL_RANK``, by default or where ``cuda`` is named without an index.
    """
    from .training.kernels import bf16_native

    mps = _mps_available()
    if _wants_auto(device):
        device = "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    dev = _available_device(device, mps=mps)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    if dtype is None:
        if dev.type == "cuda":  # (the chosen GPU's own answer, without emulation: emulated bf16 is slow)
            dt = torch.bfloat16 if bf16_native(dev) else torch.float16
        else:
            dt = torch.float32
    elif isinstance(dtype, str):
        names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
                 "fp32": torch.float32, "float32": torch.float32}
        if dtype not in names:
            raise ModelError(f"Unknown dtype {dtype!r}; use one of {', '.join(names)}.")
        dt = names[dtype]
    elif dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        dt = dtype
    else:  # (torch.int8 was blamed on the weights file, which loads fine)
        raise ModelError(f"dtype {dtype!r} is not one a model runs in: use 'bf16', 'fp16' or 'fp32' (or torch.bfloat16, "
                         "torch.float16, torch.float32).")
    return dev, dt


def _sampled_bytes(flat: torch.Tensor | np.ndarray, n: int = 4096) -> bytes:
    """About ``n`` evenly spaced values of a flat array as float32 bytes (a tensor is sliced before it leaves its
    device): what :meth:`C2SModel.weights_digest` and :meth:`C2SModel.serving_digest` hash of each array."""
    part = flat[:: max(1, len(flat) // n)]
    return (part.float().cpu().numpy() if isinstance(part, torch.Tensor) else np.asarray(part, np.float32)).tobytes()


def verdict_files(folder: str | os.PathLike[str]) -> dict[str, str | None]:
    """The SHA-256 of each file a checkpoint's verdict is served from (the verdict, the training baselines, the
    gene map), ``None`` for one that is absent. :meth:`C2SModel.save` records them in ``virtualcell.json`` and
    :meth:`C2SModel.load` serves none of them where one differs: they and the codec are written apart, so a rewrite
    cut half-way would otherwise pair one run's codec with another's verdict."""
    import hashlib

    from .gene_map import FILE as GENE_MAP_FILE
    from .validation import BASELINES_FILE, VERDICT_FILE

    out: dict[str, str | None] = {}
    for name in (VERDICT_FILE, BASELINES_FILE, GENE_MAP_FILE):
        f = Path(folder) / name
        out[name] = hashlib.sha256(f.read_bytes()).hexdigest() if f.is_file() else None
    return out


@dataclass
class GeneratedCells:
    """Generated sentences for a grid of (cell, perturbation) pairs, as gene ids."""

    cell: np.ndarray  # index into the baseline cells
    perturbation: np.ndarray  # index into the perturbation list
    sentences: CellSentences
    n_invalid: int = 0
    n_duplicate: int = 0


class C2SModel:
    """A causal LM that reads a baseline cell and a perturbation and writes the perturbed cell."""

    def __init__(
        self,
        lm: Any,
        tokenizer: Any,
        *,
        genes: Vocabulary,
        perturbations: PerturbationVocab | None = None,
        prompt_format: str = "compact",
        rank_fit: RankFit | None = None,
        contract: DataContract | None = None,
        top_k: int = 200,
        train_config: dict[str, Any] | None = None,
        source: str = "",
    ) -> None:
        self.lm = lm
        self.tokenizer = tokenizer
        self.genes = genes
        self.perturbations = perturbations or PerturbationVocab()
        self.rank_fit = rank_fit
        self.contract = contract
        self.top_k = int(top_k)
        self.train_config = dict(train_config or {})
        self.source = source
        self.baselines: Any = None  # validation.Baselines: training-data baseline deltas (baselines.npz)
        self.verdict: dict[str, Any] | None = None  # the training run's validation verdict (verdict.json)
        self.gene_map: Any = None  # gene_map.GeneMap: every gene from a decoded sentence, when the verdict chose it
        if prompt_format not in FORMATS:
            raise ModelError(f"Unknown prompt format {prompt_format!r}; use one of {', '.join(FORMATS)}.")
        self.format: PromptFormat = FORMATS[prompt_format](tokenizer, genes.genes, self.perturbations)
        self._constraint: GeneConstraint | TrieConstraint | None = None
        # the folder this model was loaded from or saved to, and its files as they were then (_on_disk): what
        # save_verdict writes its codec beside
        self._written: tuple[str, dict[str, tuple[int, ...]]] | None = None

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(
        cls,
        name_or_path: str | os.PathLike[str] = BUNDLED,
        *,
        genes: Sequence[str] | Vocabulary | None = None,
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> C2SModel:
        """Load a virtualcell checkpoint folder, or any HF causal LM (hub id or folder).

        A folder written by :meth:`save` (or ``virtualcell train``) carries its codec. A
        plain HF checkpoint, such as ``vandijklab/C2S-Scale-Gemma-2-2B``, uses the C2S
        prompt and needs ``genes``: the gene symbols it may write (your data's var_names). ``"bundled"`` (where no
        folder of that name is here) is the model shipped in the package, as the default is. ``device``
        (``"cuda"``, ``"cuda:1"``, ``"mps"``, ``"cpu"``) and ``dtype`` (``"bf16"``, ``torch.float32``...) default
        to the best available: CUDA in bf16 (fp16 where bf16 is unsupported), else MPS or the CPU in fp32
        (:func:`pick_device`).

        A folder virtualcell wrote is checked before anything is served from it, and refused naming the file and
        the fix where its weights are not the model its ``config.json`` describes (missing, extra) or not finite,
        or where a number it stores (rank fit, offsets, token bias, gene map, baselines, the verdict's blend weight
        and settings) is not a finite number in its range. A plain Hugging Face checkpoint loads as transformers
        loads it. A name that is also a hub id (``owner/name``) or ``"bundled"`` loads the local folder of that
        name where there is one, says so (a warning where the name is a known C2S hub model, one in the Hugging
        Face cache, or ``"bundled"``, whose :attr:`source` is then the folder's absolute path).

        A local folder is read under a shared lock (:func:`virtualcell.safeio.reading`): a save into it
        (:meth:`save`, ``virtualcell train``'s end, ``virtualcell verdict``) is waited for, never read half-way, so
        the weights and the codec loaded are one save's. A training that holds the folder for its run does not
        block this: its previous model loads meanwhile.
        """
        from .safeio import reading

        folder = Path(BUNDLED if _shipped(str(name_or_path)) else str(name_or_path))
        with reading(folder) if folder.is_dir() else contextlib.nullcontext():
            return cls._load(name_or_path, genes=genes, device=device, dtype=dtype)

    @classmethod
    def _load(cls, name_or_path: str | os.PathLike[str], *, genes: Sequence[str] | Vocabulary | None,
              device: str | None, dtype: str | torch.dtype | None) -> C2SModel:
        """The body of :meth:`load`, run while a local folder is locked for reading."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        asked = str(name_or_path)
        shipped = _shipped(asked)  # the shipped model, not a folder named so
        if shipped:
            name_or_path = BUNDLED
        path = Path(str(name_or_path))
        dev, dt = pick_device(device, dtype)
        is_local = path.exists()
        if is_local and not path.is_dir():
            raise ModelError(f"{str(path)!r} is a file; a checkpoint is a folder (with config.json and {META_FILE}).")
        meta: dict[str, Any] = {}
        if is_local and (path / META_FILE).exists():
            try:
                meta = json.loads((path / META_FILE).read_text())
                if not isinstance(meta, dict) or "genes" not in meta:
                    raise ValueError("no genes in it")
            except (OSError, ValueError) as err:
                raise ModelError(
                    f"{str(path / META_FILE)!r} is broken ({str(err)[:120]}), so the model's codec cannot be read. "
                    "Copy the checkpoint folder again, or retrain it."
                ) from None
            fault = _meta_fault(meta)
            if fault:
                raise _damaged(str(path / META_FILE), fault)
        elif is_local and genes is None:
            from .safeio import in_use_by

            holder = in_use_by(path)  # a training's first run saves the model at its end, not before
            if holder is not None:
                doing = "being trained now" if holder.endswith(", train") else "in use by a virtualcell run now"
                raise ModelError(f"{str(path)!r} holds no model yet: it is {doing} ({holder}), and a training "
                                 f"writes its model ({META_FILE} and the weights) there when it ends. Wait for that "
                                 "run to finish, then run this again.")
            have = sorted(p.name for p in path.iterdir())[:12]
            raise ModelError(
                f"{str(path)!r} has no {META_FILE} (the sentence codec: genes, rank fit, perturbations, contract); "
                f"it holds {have}. Use a folder written by 'virtualcell train' / C2SModel.save (a save that was cut, "
                "by a full disk or a kill, leaves one without it: run the training command again, which goes on "
                "from its last checkpoint), or, for a plain Hugging Face checkpoint, pass genes=adata.var_names so "
                "it can use the C2S prompt."
            )
        elif not is_local and genes is None:
            name = str(name_or_path)
            raise ModelError(
                f"No such folder: {name!r}. Check the path of the model folder"
                + ("; as a Hugging Face hub id it also needs genes=... (the gene symbols it may write, "
                   "e.g. adata.var_names)." if looks_like_hub_id(name) else ".")
            )
        if is_local and meta:  # a folder virtualcell wrote: name a missing file rather than guess at a truncated one
            # (a fine-tuned text model's tokenizer may be saved in other files; the gene-level one is tokenizer.json)
            needed = ("config.json", "tokenizer.json") if meta.get("prompt_format") == "compact" else ("config.json",)
            gone = [f for f in needed if not (path / f).exists()]
            if gone:
                raise ModelError(f"{str(path)!r} lacks {', '.join(gone)}, which every checkpoint virtualcell writes "
                                 "holds. Copy the whole checkpoint folder again, or retrain it.")
        source = str(name_or_path)
        if is_local and not shipped and (looks_like_hub_id(asked) or asked == "bundled"):  # a name meaning two things
            source = _local_over(asked, path, genes_ignored=genes is not None and bool(meta))
        loading_info = None
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
            if meta:  # (a folder virtualcell wrote holds every weight its config names: checked below)
                lm, loading_info = AutoModelForCausalLM.from_pretrained(str(name_or_path), dtype=dt,
                                                                        output_loading_info=True)
            else:
                lm = AutoModelForCausalLM.from_pretrained(str(name_or_path), dtype=dt)
            lm = eager_if_capped(lm)
        except Exception as err:  # a broken local file fails in the loader's own error types
            if is_local:
                import transformers

                old = int(transformers.__version__.split(".")[0]) < 5
                raise ModelError(
                    f"The model in {str(path)!r} cannot be read ({err.__class__.__name__}: "
                    f"{str(err).splitlines()[0][:160] if str(err) else 'no detail'})"
                    + (f" with transformers {transformers.__version__}, older than virtualcell needs (5.0): pip "
                       "install -U transformers. Or" if old else ";") +
                    " a file of it may be damaged (config.json, tokenizer.json), or a file such as model.safetensors "
                    "may be truncated: copy the checkpoint folder again, or retrain it."
                ) from None
            if not isinstance(err, OSError):
                raise
            raise unreachable(name_or_path, err) from err
        lm.to(dev).eval()
        if meta:
            _check_weights(lm, loading_info, path)
            file = str(path / META_FILE)
            vocab = Vocabulary(tuple(meta["genes"]))
            try:
                rank_fit = RankFit.from_dict(meta["rank_fit"]) if meta.get("rank_fit") else None
            except DataError as err:
                raise ModelError(f"{file!r}: {err}") from None
            try:
                model = cls(
                    lm, tokenizer, genes=vocab,
                    perturbations=PerturbationVocab.from_dict(meta.get("perturbations", {})),
                    prompt_format=meta.get("prompt_format", "compact"),
                    rank_fit=rank_fit,
                    contract=DataContract.from_dict(meta["contract"]) if meta.get("contract") else None,
                    top_k=meta.get("top_k", 200), train_config=meta.get("train_config", {}), source=source,
                )
            except (PerturbationError, DataError) as err:  # (its genes or labels against its own tokenizer)
                raise ModelError(f"{file!r} does not agree with itself or with the tokenizer beside it ({err}): the "
                                 "folder is damaged, or holds files of two runs. Copy the checkpoint folder again, or "
                                 "retrain it.") from None
            try:
                if meta.get("target_offsets") is not None:
                    target_offsets.attach(lm, meta["target_offsets"])
            except ValueError as err:
                raise _damaged(file, str(err)) from None
            if meta.get("token_bias") is not None:
                model._load_token_bias(path, list(meta["token_bias"]))
            written = meta.get("verdict_files")  # (None: a checkpoint saved before the codec recorded them)
            changed = [] if written is None else [f for f, d in verdict_files(path).items()
                                                  if d is not None and d != written.get(f)]
            if changed:
                log.warning("%s: %s changed after its %s was written (a `virtualcell verdict` cut half-way, or an "
                            "edit), so the verdict, its baselines and its gene map are not served: the pure model is, "
                            "at default generation settings. Run `virtualcell verdict --model %s --data TRAINING_DATA` "
                            "to judge it again.", path, " and ".join(changed), META_FILE, path)
                meta.pop("gene_map", None)
                from .validation import BASELINES_FILE, Baselines

                if meta.get("neighbour_offsets") is not None and (path / BASELINES_FILE).exists():
                    # the neighbour offsets' covariance factor, the same in either run (without a verdict no blend is
                    # served; without the factor neither the model nor `virtualcell verdict` could load)
                    model.baselines = Baselines.load(path / BASELINES_FILE, model.genes.genes)
            else:
                model._load_verdict(path)
            as_control = sorted(k for k, v in model.perturbations.labels.items()  # (not those a kind column made so)
                                if v == "control" and k.strip().lower() in CONTROL_WORDS)
            if as_control:  # (a version before they trained as plain labels read 'None' and 'ctrl' so)
                log.warning("%s trained the perturbation label%s %s as the control prompt, with those perturbed cells "
                            "among its controls: its predictions of them are the control's, and its controls carry "
                            "their effect. Retrain it with this virtualcell, which trains them as labels of their own.",
                            path, "s" if len(as_control) > 1 else "", preview(as_control, 5))
            if meta.get("gene_map") is not None:
                from .gene_map import FILE, GeneMap

                model.gene_map = GeneMap.load(Path(path) / FILE, meta["gene_map"], len(vocab))
            if meta.get("neighbour_offsets") is not None:
                try:
                    model.attach_neighbours(meta["neighbour_offsets"])
                except ValueError as err:
                    raise _damaged(file, str(err)) from None
        else:
            vocab = genes if isinstance(genes, Vocabulary) else Vocabulary.from_names(list(genes))  # type: ignore[arg-type]
            if tokenizer.pad_token_id is None:
                tokenizer.pad_token = tokenizer.eos_token
            model = cls(lm, tokenizer, genes=vocab, prompt_format="c2s", source=source)
        if meta:
            model._written = (str(path.resolve()), _on_disk(path))
        return model

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write model, tokenizer and codec (``virtualcell.json``) into one folder."""
        from .safeio import atomic_path, usual_mode, write_text, writing

        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        with writing(p):  # a process loading the folder meanwhile waits, and is waited for (load reads it whole)
            # the codec goes first and comes back last: a save cut half-way (a full disk) leaves a folder load
            # refuses, not the new weights beside the last run's verdict and baselines, which loaded without a word
            (p / META_FILE).unlink(missing_ok=True)
            # the target offsets go into the codec file, so the weights stay a plain Hugging Face checkpoint
            state = token_bias.without(target_offsets.without(self.lm.state_dict()))
            self.lm.save_pretrained(p, safe_serialization=True, state_dict=state)
            for f in p.glob("*.safetensors*"):  # written private (0600); the folder's other files are not
                usual_mode(f)
            table = token_bias.table(self.lm)
            if table is not None:  # beside the weights, which stay a plain Hugging Face checkpoint
                with atomic_path(p / token_bias.FILE) as tmp:
                    np.save(tmp, table)
            self.tokenizer.save_pretrained(p)
            self._save_verdict(p)
            write_text(p / META_FILE, json.dumps(self.meta() | {"verdict_files": verdict_files(p)}, indent=1))
            self._written = (str(p.resolve()), _on_disk(p))

    def save_verdict(self, path: str | os.PathLike[str]) -> None:
        """Write the baselines, the verdict and the codec (``virtualcell.json``, last) into the checkpoint folder
        ``path``, leaving its weights and tokenizer: what :func:`virtualcell.train.rejudge` changes. The codec
        records the digest of each verdict file it was written with (:func:`verdict_files`), so a rewrite cut
        half-way (a full disk, a kill) loads as the pure model, saying so, not one run's codec with another's
        verdict.

        The codec holds the weights' target offsets, and the verdict was judged on the weights loaded: ``path`` must
        be the folder this model was loaded from (or saved to), its weights and codec as they were then. Where a
        training or a save replaced them meanwhile, or ``path`` is another model's folder, nothing is written
        (:class:`~virtualcell.errors.ModelError`), rather than this model's codec and verdict beside other weights.
        """
        from .safeio import write_text, writing

        p = Path(path)
        with writing(p):  # (a process loading the folder meanwhile reads it before or after, never half-way)
            self._check_on_disk(p)
            self._save_verdict(p)
            write_text(p / META_FILE, json.dumps(self.meta() | {"verdict_files": verdict_files(p)}, indent=1))
            self._written = (str(p.resolve()), _on_disk(p))

    def _check_on_disk(self, p: Path) -> None:
        """Refuse to write this model's codec into ``p`` where its weights are not the ones this model was loaded
        from or saved to there (:meth:`save_verdict`). A model that never was in a folder is not checked."""
        if self._written is None:
            return
        where, files = self._written
        if str(p.resolve()) != where:
            raise ModelError(f"{str(p)!r} is not the folder this model was loaded from or saved to ({where!r}): its "
                             "verdict and codec (which holds the weights' target offsets) would go beside other "
                             "weights. Write the whole model there with model.save(path) instead.")
        now = _on_disk(p)
        changed = sorted(f for f in files.keys() | now.keys() if files.get(f) != now.get(f))
        if changed:
            what = ("another verdict or save rewrote its record meanwhile" if changed == [META_FILE] else
                    "a training or a save into it finished meanwhile, or they were rewritten or touched")
            raise ModelError(f"{str(p)!r} changed since this model was loaded from it ({', '.join(changed)}: {what}), "
                             "so the verdict, judged on the model "
                             "loaded before, is not written beside other weights. Run `virtualcell verdict --model "
                             f"{p} --data TRAINING_DATA` again to judge the model it holds now.")

    @property
    def chosen(self) -> dict[str, Any]:
        """The generation settings the training run chose on its validation split (``{}`` without a verdict); the
        coexpression prior's among them where the verdict judged perturbations held out whole."""
        verdict = self.verdict or {}
        return dict(verdict.get("settings") or {}) | dict((verdict.get("unseen") or {}).get("settings") or {})

    def setting(self, name: str) -> Any:
        """The generation setting ``name`` (``"samples"``, ``"guidance"``, ``"temperature"``, ``"coexpression_prior"``)
        the training run chose, or its plain value (:data:`virtualcell.validation.PLAIN`) where it chose none."""
        from .validation import PLAIN

        return self.chosen.get(name, PLAIN[name])

    def _load_token_bias(self, p: Path, tokens: list[str]) -> None:
        """Attach the token-bias table (:mod:`virtualcell.token_bias`) that :meth:`save` wrote beside the weights,
        one row for each of ``tokens`` (as ``virtualcell.json`` lists them)."""
        f = p / token_bias.FILE
        if not f.is_file():
            raise ModelError(f"{str(f)!r} is missing; the checkpoint's virtualcell.json says the model has a "
                             "token-bias table. Copy the checkpoint folder again, or retrain.")
        try:
            values = np.load(f)
        except (OSError, ValueError, EOFError) as err:  # (a file cut short: EOFError)
            raise _damaged(str(f), f"it cannot be read as the model's token-bias table ({type(err).__name__}: "
                                   f"{str(err)[:120] or 'no detail'})") from None
        vocab = self.tokenizer.get_vocab()
        missing = [t for t in tokens if t not in vocab]
        if missing:
            raise ModelError(f"The token-bias table of {str(p)!r} names tokens its tokenizer lacks ({missing[:5]}); "
                             "copy the checkpoint folder again, or retrain.")
        try:
            token_bias.attach(self.lm, [vocab[t] for t in tokens], values)
        except ValueError as err:
            raise ModelError(f"{str(f)!r} is damaged or does not fit this model ({err}). Copy the checkpoint folder "
                             "again, or retrain.") from None

    def _save_verdict(self, p: Path) -> None:
        """The training baselines, validation verdict (:mod:`virtualcell.validation`) and the gene map the verdict
        chose (:mod:`virtualcell.gene_map`), when present."""
        from .gene_map import FILE
        from .safeio import write_text
        from .validation import BASELINES_FILE, VERDICT_FILE

        if self.gene_map is not None:
            self.gene_map.save(p / FILE)
        elif (p / FILE).exists():  # a verdict run again chose no map: virtualcell.json says none, the file goes
            (p / FILE).unlink()
        if self.baselines is not None:
            self.baselines.save(p / BASELINES_FILE)
        elif (p / BASELINES_FILE).exists():  # (a run saved over another's folder served that run's)
            (p / BASELINES_FILE).unlink()
        if self.verdict is not None:  # each file whole or not at all (virtualcell verdict rewrites them in place)
            write_text(p / VERDICT_FILE, json.dumps(self.verdict, indent=1, default=float))
        elif (p / VERDICT_FILE).exists():
            (p / VERDICT_FILE).unlink()

    def _load_verdict(self, p: Path) -> None:
        """Read what :meth:`_save_verdict` wrote; a checkpoint without it serves the pure model."""
        from .validation import BASELINES_FILE, VERDICT_FILE, Baselines

        if (p / BASELINES_FILE).exists():
            self.baselines = Baselines.load(p / BASELINES_FILE, self.genes.genes)
        if (p / VERDICT_FILE).exists():
            try:
                self.verdict = json.loads((p / VERDICT_FILE).read_text())
                fault = _verdict_fault(self.verdict)
                if fault:
                    raise ValueError(fault)
            except (OSError, ValueError) as err:
                raise ModelError(f"{str(p / VERDICT_FILE)!r} is broken ({err}); delete it to serve the pure model, "
                                 "or retrain (or run `virtualcell verdict` on the training data to judge it "
                                 "again).") from None
        # a copy of the folder without them (weights and json only) serves something else, so it is said
        from .training.checkpoint import STATE_FILE

        if (p / STATE_FILE).exists():  # a training checkpoint (out/last): its run had not judged it yet
            return
        run = self.train_config
        lost = []
        if "data_hash" in run and self.baselines is None:
            lost.append(f"{BASELINES_FILE} (the training baselines a blend serves)")
        # (a run that held cells out but made no verdict, its held cells all controls, records no verdict_weight)
        made = "verdict_weight" in run or "verdict_seconds" not in run
        if int(run.get("n_verdict_cells") or 0) > 0 and made and self.verdict is None:
            lost.append(f"{VERDICT_FILE} (the verdict's blend weight and generation settings)")
        if lost:
            log.warning("%s lacks %s, which its training run wrote: it serves the pure model%s. Copy the whole "
                        "folder, or run `virtualcell verdict` on the data it was trained on to make them again.", p,
                        " and ".join(lost), " at default generation settings" if self.verdict is None else "")

    def meta(self) -> dict[str, Any]:
        """What :meth:`save` writes beside the weights (its codec: genes, rank fit, perturbations, contract, the
        training record), as a JSON-able dict."""
        return {
            "virtualcell_checkpoint": 1,
            "prompt_format": self.format.name,
            "genes": list(self.genes.genes),
            "top_k": self.top_k,
            "rank_fit": self.rank_fit.to_dict() if self.rank_fit else None,
            "contract": self.contract.to_dict() if self.contract else None,
            "perturbations": self.perturbations.to_dict(),
            "train_config": self.train_config,
        } | ({"target_offsets": self.target_offsets} if self.target_offsets is not None else {}) \
          | ({"token_bias": self._token_bias_tokens()} if token_bias.of(self.lm) is not None else {}) \
          | ({"neighbour_offsets": self.neighbour_offsets} if self.neighbour_offsets is not None else {}) \
          | ({"gene_map": self.gene_map.record()} if self.gene_map is not None else {})

    def _token_bias_tokens(self) -> list[str]:
        """The tokens of the token-bias table's rows, in order (what ``virtualcell.json`` keeps of it)."""
        _, rows = token_bias.of(self.lm)
        by_id = {i: t for t, i in self.tokenizer.get_vocab().items()}
        ids = torch.nonzero(rows >= 0).flatten()
        order = rows[ids].argsort()
        return [by_id[int(i)] for i in ids[order]]

    def decode(self, sentences: CellSentences) -> np.ndarray:
        """Expression (cells x the model's genes, float32) of sentences in its vocabulary: the rank fit's decode,
        then the gene map where the training run's verdict chose one (every gene, not only those written)."""
        from .sentences import decode

        if self.rank_fit is None:
            raise ModelError(f"{self.source or 'This model'} has no rank fit, so its sentences cannot be turned back "
                             "into expression: model.rank_fit = RankFit.fit(adata, encode(adata, vocab=model.genes)).")
        D = decode(sentences, self.rank_fit)
        return self.gene_map(D) if self.gene_map is not None else D.toarray()

    def card(self) -> dict[str, Any]:
        """What the model is, was trained on, can be asked and how its verdict went, from its own record
        (:func:`virtualcell.card.card`; ``virtualcell info`` prints it, :func:`virtualcell.card.card_text` too)."""
        from .card import card

        return card(self)

    def known_labels(self) -> set[str]:
        """What the model knows as a perturbation's name, in upper case: its training labels and conditions
        (``drugA@10``), the symbols its labels named genes by, and its genes (a knockout is named by its gene)."""
        vocab = self.perturbations
        return {str(x).upper() for x in (*vocab.labels, *vocab.trained(), *vocab.aliases, *self.genes.genes)}

    @property
    def trained_contexts(self) -> dict[str, dict[str, int]] | None:
        """The training cells of each context, ``{context: {"control": n, "perturbed": n}}`` (``"all"`` for a model
        trained without a context column); ``None`` for a checkpoint that did not record them (one trained before they were)."""
        contexts = self.train_config.get("contexts")
        return None if contexts is None else {str(c): dict(n) for c, n in contexts.items()}

    @property
    def perturbed_contexts(self) -> list[str] | None:
        """The contexts of :attr:`trained_contexts` whose perturbed cells the model trained on; ``None`` where they
        were not recorded."""
        trained = self.trained_contexts
        return None if trained is None else [c for c, n in trained.items() if n.get("perturbed", 0) > 0]

    def measured_contexts(self, perturbation: str | Perturbation | Combination) -> tuple[str, ...] | None:
        """The contexts (as :meth:`~virtualcell.contract.DataContract.contexts` names them) whose training cells
        measured this very condition (its typed form, dose and time; a label, ``"TF03"`` or ``"drugA@1"``, is read as
        :meth:`resolve` reads it), sorted; empty for one measured nowhere. A context's cells are served its own measured effect there
        (:meth:`virtualcell.validation.Baselines.delta_for`), and elsewhere the mean over these: a transfer.
        ``None`` where the model cannot tell: no context column, no baselines, a checkpoint from before the
        per-context effects were kept, or the control."""
        if self.baselines is None:
            return None
        if isinstance(perturbation, str):  # (a label read as a typed name was 'measured nowhere': "TF03" is ko:TF03)
            perturbation = self.resolve([perturbation])[0]
        return self.baselines.measured_contexts(perturbation, fitted_on=self._sole_context())

    def measured_pairs(self) -> dict[str, tuple[str, ...]] | None:
        """Every condition the served baselines hold (typed names) and the contexts it was measured in
        (:meth:`measured_contexts`); ``None`` where the model cannot tell. ``virtualcell info`` prints those measured
        in only some of the contexts it saw perturbed."""
        if self.baselines is None:
            return None
        return self.baselines.measured_pairs(fitted_on=self._sole_context())

    def _sole_context(self) -> str | None:
        """The one context a model with a context column trained on (its baselines keep no per-context record
        then), or ``None``."""
        trained = self.trained_contexts
        if self.contract is None or self.contract.context_key is None or trained is None or len(trained) != 1:
            return None
        return next(iter(trained))

    @property
    def device(self) -> torch.device:
        """Where the model's weights are (``cpu``, ``cuda:0``)."""
        return next(self.lm.parameters()).device

    @property
    def n_parameters(self) -> int:
        """The language model's parameter count."""
        return sum(p.numel() for p in self.lm.parameters())

    def prompt_twins(self, perturbations: Sequence[Perturbation | Combination]) -> dict[str, str]:
        """Each of ``perturbations`` that is no trained condition but is written with the very prompt of one,
        mapped to that condition's name: a dose in a trained dose's half-decade bin (``drugA@1.5uM`` reads as the
        trained ``drugA@1uM``), a time in its doubling. The pure model predicts such a pair alike."""
        dosed = [p for p in perturbations
                 if any(x.dose is not None or x.time is not None for x in parts_of(p))]
        if not dosed:
            return {}
        vocab = self.perturbations
        panel = vocab.panel()
        empty = np.zeros(0, dtype=np.int64)

        def own(q: Perturbation | Combination) -> tuple[int, ...]:
            return tuple(self.format.prompt_parts(empty, q)[1])

        trained = {own(q): name for name, q in zip(panel, self.resolve(panel))}
        seen = set(vocab.trained())
        asked = [(p, own(p)) for p, label in zip(dosed, vocab.labels_for(dosed)) if label not in seen]
        return {str(p): trained[tokens] for p, tokens in asked if tokens in trained}

    def weights_digest(self) -> str:
        """A short digest of the weights (up to 4,096 evenly spaced values of every parameter, with its name and
        shape): another training run, or more steps of this one, gives another digest. Cheap for a 2B model, and
        what a resumed screen checks, since a folder path says nothing about what was trained into it."""
        import hashlib

        h = hashlib.blake2b(digest_size=12)
        with torch.no_grad():
            for name, w in self.lm.named_parameters():
                h.update(f"{name}{tuple(w.shape)}".encode())
                h.update(_sampled_bytes(w.detach().reshape(-1)))
        return h.hexdigest()

    def serving_digest(self) -> str:
        """A short digest of what serves the weights' predictions: the verdict's generation settings and blend
        weights, the decode (rank fit, gene map) and the served baselines. ``virtualcell verdict`` rewrites these in
        place without touching the weights; a resumed screen checks this beside :meth:`weights_digest`, or it mixed
        groups generated at guidance 2 with groups at guidance 4."""
        import hashlib

        h = hashlib.blake2b(digest_size=12)
        verdict = self.verdict or {}
        unseen = verdict.get("unseen") or {}
        served = {"settings": verdict.get("settings"), "weight": verdict.get("weight"),
                  "unseen": [unseen.get("weight"), unseen.get("settings")],
                  "rank_fit": self.rank_fit.to_dict() if self.rank_fit else None}
        h.update(json.dumps(served, sort_keys=True, default=str).encode())
        arrays = [] if self.gene_map is None else [self.gene_map.left, self.gene_map.right]
        if self.baselines is not None:
            arrays.append(np.asarray(self.baselines.delta))
            if self.baselines.own_delta is not None:  # (a checkpoint from before it has none: its digest as it was)
                arrays.append(np.asarray(self.baselines.own_delta))
        for a in arrays:
            h.update(str(a.shape).encode())
            h.update(_sampled_bytes(np.asarray(a).reshape(-1)))
        return h.hexdigest()

    def __repr__(self) -> str:
        return (
            f"C2SModel({self.source or 'in memory'}: {self.n_parameters / 1e6:.2f}M parameters, "
            f"{len(self.genes)} genes, format {self.format.name!r}, {len(self.perturbations.labels)} training labels, "
            f"{self._offsets_text()}device {self.device})"
        )

    def _offsets_text(self) -> str:
        """``"target offsets knockout -17.22, "`` (the kinds whose offset moved, and the neighbour offsets'), or ``""``."""
        moved = target_offsets.moved(self.target_offsets)
        near = target_offsets.moved(self.neighbour_offsets)
        table = token_bias.of(self.lm)
        return ((f"target offsets {moved}, " if moved else "") + (f"neighbour offsets {near}, " if near else "")
                + (f"token bias over {table[0].shape[0]} named tokens, " if table is not None else ""))

    # ------------------------------------------------------------------ generation
    def resolve(self, perturbations: Sequence[str | Perturbation | Combination]) -> list[Perturbation | Combination]:
        """Typed perturbations, with plain training labels looked up; checks the model can represent them.
        One perturbation given alone (``"ko:STAT1"``) is a list of one, not its letters."""
        if isinstance(perturbations, str | Perturbation | Combination):
            perturbations = [perturbations]
        out = [self._model_genes(self.perturbations.resolve(p)) for p in perturbations]
        for p in out:
            self.format.check(p)  # raises PerturbationError if it cannot be represented
            self._check_kind_trained(p)
        return out

    def _check_kind_trained(self, p: Perturbation | Combination) -> None:
        """Refuse a genetic perturbation of a kind the model never trained on (``act:STAT1`` of a knockout screen's
        model): its kind token was never learned, and the bundled model read an activation of STAT1 as a loss of
        STAT1, served with the knockouts' mean effect. A text model (format ``c2s``) reads the kind as words, and a
        checkpoint without training labels records no kinds: neither is checked."""
        kinds = self.perturbations.trained_kinds()
        if self.format.name == "c2s" or not kinds:
            return
        for x in parts_of(p):
            if x.kind in GENETIC and x.kind not in kinds:
                genetic = self.perturbations.trained_genetic_kinds()
                can = (f"It can predict {a_kind_of(genetic)} of any of its genes, never trained on or not."
                       if genetic else "It trained on no genetic perturbation, so it predicts none.")
                raise PerturbationError(
                    f"{str(p)!r}: this model never trained on {a_kind_of([x.kind])} (it trained on "
                    f"{', '.join(k + 's' for k in sorted(kinds))}), so it has not learned what {x.kind!r} means and "
                    f"would predict a guess. {can} Train on a screen with {x.kind}s to ask this.")

    def _model_genes(self, p: Perturbation | Combination) -> Perturbation | Combination:
        """``p`` with each genetic target that is one of the model's genes written as the model writes it: matched
        as genes are everywhere (ignoring case and an Ensembl version suffix; ``ko:ENSG...`` without its ``.4``
        named the model's gene and was refused)."""
        from dataclasses import replace

        def one(x: Perturbation) -> Perturbation:
            i = self.genes.find(x.target) if x.kind in GENETIC else -1
            return replace(x, target=self.genes.genes[i]) if i >= 0 and self.genes.genes[i] != x.target else x

        return Combination(tuple(one(x) for x in p.parts)) if isinstance(p, Combination) else one(p)

    def constraint(self) -> GeneConstraint | TrieConstraint:
        if self._constraint is None:
            vocab_size = self.lm.get_output_embeddings().weight.shape[0]
            self._constraint = self.format.constraint(self.genes.genes, vocab_size)
        return self._constraint

    def generate(
        self,
        cells: CellSentences,
        perturbations: Sequence[Perturbation | Combination],
        *,
        config: GenerationConfig | None = None,
        cell_keys: Sequence[int] | None = None,
        perturbation_keys: Sequence[int] | None = None,
    ) -> Iterator[GeneratedCells]:
        """Generate the perturbed sentence of every (cell, perturbation) pair, in chunks.

        ``cells`` must use this model's vocabulary (``encode(adata, vocab=model.genes)``).
        ``cell_keys`` (default 0..n-1) seed each cell's sampling, so a cell's result does
        not depend on the batch or process it lands in; ``perturbation_keys`` (default: a
        stable hash of each perturbation's name) do the same per perturbation, and tell
        repeated samples of one perturbation apart.
        """
        cfg = config or GenerationConfig(max_genes=self.top_k)
        if cells.vocab != self.genes:
            raise ModelError("The cell sentences use another vocabulary: encode them with vocab=model.genes.")
        keys = list(range(len(cells))) if cell_keys is None else [int(k) for k in cell_keys]
        pert_keys = ([stable_key(str(p)) for p in perturbations] if perturbation_keys is None
                     else [int(k) for k in perturbation_keys])
        if len(pert_keys) != len(perturbations):
            raise ModelError("perturbation_keys needs one key per perturbation.")
        constraint = self.constraint() if cfg.constrain else None
        cell_ids = [cells[i][: self.top_k] for i in range(len(cells))]
        prompts = self.format.grid(cell_ids, perturbations, cell_keys=keys, perturbation_keys=pert_keys)
        priors = self.coexpression_priors(perturbations) if cfg.coexpression_prior and prompts.shared else None
        grid = generate_grid(
            self.lm, prompts.prefixes, prompts.suffixes, cell_keys=prompts.prefix_keys,
            suffix_keys=prompts.suffix_keys, constraint=constraint, eos_id=self.format.eos, pad_id=self.format.pad,
            config=cfg, max_new_tokens=self.format.max_new_tokens(cfg.max_genes, self.constraint()),
            guide_suffixes=prompts.guide_suffixes, suffix_targets=self._suffix_targets(prompts.suffixes),
            suffix_bias=priors, components=self._composed(perturbations, prompts, cfg, priors),
        )
        # group the engine's output into chunks of sentences, dropping invalid / repeated genes (only when unconstrained)
        batch: list[tuple[int, int, list[int]]] = []
        for i, j, toks in grid:
            batch.append((*prompts.pair(i, j), toks))
            if len(batch) >= max(cfg.batch_size, len(perturbations)) * 4:
                yield self._chunk(batch)
                batch = []
        if batch:
            yield self._chunk(batch)

    def composes(self, p: Perturbation | Combination, *, compose: bool = False) -> bool:
        """Whether ``p`` is generated composed from its parts (:attr:`GenerationConfig.compose`): with ``compose``,
        a combination not trained as such, on a gene-level model with shared prompts."""
        if not compose or not isinstance(p, Combination) or getattr(self.format, "gene_tokens", None) is None:
            return False
        trained = {str(parse(t)) for t in self.perturbations.typed_forms()}
        return str(p) not in trained

    def _composed(self, perturbations: Sequence[Perturbation | Combination], prompts: Any, cfg: GenerationConfig,
                  priors: Sequence[np.ndarray | None] | None) -> list[list[Component] | None] | None:
        """The engine's components of each combination composed from its parts (:meth:`composes`), ``None`` for
        the others (the engine decodes those as themselves); ``None`` where nothing is composed."""
        if not prompts.shared or not any(self.composes(p, compose=cfg.compose) for p in perturbations):
            return None
        w = cfg.guidance if prompts.guide_suffixes is not None else 1.0
        control = tuple(self.format.suffix(Perturbation("control")))
        out: list[list[Component] | None] = []
        for j, p in enumerate(perturbations):
            if not self.composes(p, compose=cfg.compose):
                out.append(None)
                continue
            parts = list(p.parts)
            part_priors = self.coexpression_priors(parts) if priors is not None else None
            comps = []
            for i, q in enumerate(parts):
                tokens = tuple(self.format.suffix(q))
                named = self._suffix_targets([list(tokens)])  # the targets whose offsets it adds
                comps.append(Component(tokens, w, tuple(named[0]) if named else (),
                                       None if part_priors is None else part_priors[i]))
            if w != 1.0:  # each part guided against the generic condition: K (1 - w) of it
                comps.append(Component(tuple(prompts.guide_suffixes[j]), len(parts) * (1.0 - w)))
            comps.append(Component(control, 1.0 - len(parts)))
            out.append(comps)
        return out

    @property
    def target_offsets(self) -> dict[str, float] | None:
        """The learned logit offsets on a genetic perturbation's own gene, by kind (:mod:`virtualcell.target_offsets`);
        ``None`` for a model trained without them."""
        return target_offsets.values(self.lm)

    @property
    def neighbour_offsets(self) -> dict[str, float] | None:
        """The learned neighbour offsets by kind (:mod:`virtualcell.target_offsets`); ``None`` for a model without."""
        return target_offsets.neighbour_values(self.lm)

    def attach_neighbours(self, offsets: Mapping[str, float] | None = None) -> torch.nn.Parameter:
        """Give the language model neighbour offsets (``offsets`` by kind, or zeros), their correlations read from
        the covariance factor of the training baselines (:attr:`virtualcell.validation.Baselines.response`)."""
        if self.baselines is None or self.baselines.response is None:
            raise ModelError(f"{self.source or 'This model'} has neighbour offsets but its baselines.npz keeps no "
                             "covariance factor to read their correlations from; restore the checkpoint's "
                             "baselines.npz as training wrote it, or retrain.")
        vocab = self.lm.get_output_embeddings().weight.shape[0]
        factor = target_offsets.token_factor(self.baselines.response, self.format.gene_tokens, vocab)
        return target_offsets.attach_neighbours(self.lm, factor, offsets)

    def _suffix_targets(self, suffixes: list[list[int]]) -> list[list[tuple[int, int]]] | None:
        """Each prompt suffix's ``(gene token, kind index)`` pairs (the genes its perturbations name, which
        the target offsets move), or ``None`` where the model has no offsets."""
        if target_offsets.of(self.lm) is None:
            return None
        return [self.format.named_targets(s) for s in suffixes]

    def coexpression_priors(self, perturbations: Sequence[Perturbation | Combination]
                             ) -> list[np.ndarray | None] | None:
        """Each perturbation's coexpression prior on the logits (``GenerationConfig.coexpression_prior``): for every
        genetic part the model never trained on, the served baselines' :meth:`~virtualcell.validation.Baselines.
        coexpression_shift` of its gene (learning from nothing the model did not train on), its own gene's entry
        left to the target offsets; ``None`` for a perturbation without, and for a model whose format has no one
        token per gene or whose baselines keep no covariance."""
        from .validation import _key  # how the baselines name a perturbation: its typed form without dose or time

        gene_tokens = getattr(self.format, "gene_tokens", None)
        if gene_tokens is None or self.baselines is None or self.baselines.response is None:
            return None
        trained = {_key(v) for v in self.perturbations.typed_forms(conditions=False)}
        without = [n for n in self.baselines.names if _key(n) not in trained]
        vocab = self.lm.get_output_embeddings().weight.shape[0]
        out: list[np.ndarray | None] = []
        for p in perturbations:
            total = None
            for part in parts_of(p):
                if part.kind not in GENETIC or _key(part) in trained:
                    continue
                shift = self.baselines.coexpression_shift(part, without)
                if shift is None:
                    continue
                shift = shift.copy()
                shift[int(self.genes.ids([part.target], missing="mark")[0])] = 0.0
                total = shift if total is None else total + shift
            if total is None:
                out.append(None)
                continue
            row = np.zeros(vocab, dtype=np.float32)
            row[np.asarray(gene_tokens)] = total
            out.append(row)
        return out if any(o is not None for o in out) else None

    def _chunk(self, batch: list[tuple[int, int, list[int]]]) -> GeneratedCells:
        sentences, n_invalid, n_dup = self.format.to_sentences([t for _, _, t in batch], self.genes)
        return GeneratedCells(np.array([c for c, _, _ in batch]), np.array([p for _, p, _ in batch]), sentences,
                              n_invalid, n_dup)


def _shipped(name: str) -> bool:
    """Whether ``name`` asks for the model shipped in the package (``"bundled"``, where no folder of that name is
    here)."""
    return name == "bundled" and not Path("bundled").exists()


def _on_disk(folder: Path) -> dict[str, tuple[int, ...]]:
    """The file id, size and modification time of each file of ``folder`` that holds the model's weights or codec
    (not the verdict's, which :meth:`C2SModel.save_verdict` rewrites): another save or training into the folder
    changes them. Cheap for a 2B model: no file is read."""
    names = [META_FILE, "config.json", token_bias.FILE, *(f.name for f in folder.glob("*.safetensors*"))]
    out = {}
    for name in names:
        with contextlib.suppress(OSError):
            st = (folder / name).stat()
            out[name] = (st.st_ino, st.st_size, st.st_mtime_ns)  # (not the change time: chmod, hard links move it)
    return out


def _damaged(file: str, fault: str) -> ModelError:
    """The refusal of a checkpoint file whose content is wrong (``fault``, a sentence), with the fix."""
    return ModelError(f"{file!r} is damaged: {fault.rstrip('.')}. Copy the checkpoint folder again, or retrain it.")


def _meta_fault(meta: dict[str, Any]) -> str:
    """What is wrong with the fields of a checkpoint's ``virtualcell.json`` that :meth:`C2SModel.load` reads as they
    are (``genes``, ``top_k``, ``prompt_format``, the token-bias tokens), or ``""``; the rank fit, the offsets and the
    gene map check their own."""
    genes = meta["genes"]
    if not isinstance(genes, list) or not genes or not all(isinstance(g, str) for g in genes):
        return f"its genes are {str(genes)[:60]!r}, not a list of gene names"
    if len(set(genes)) != len(genes):
        dups = sorted({g for g in genes if genes.count(g) > 1}) if len(genes) < 5000 else ["..."]
        return f"its genes list {preview(dups, 5)} more than once"
    if "top_k" in meta and not whole_at_least(meta["top_k"], 1):
        return f"its top_k is {meta['top_k']!r}, not a whole number of genes of at least 1"
    if not isinstance(meta.get("prompt_format", "compact"), str) or meta.get("prompt_format", "compact") not in FORMATS:
        return f"its prompt_format is {meta.get('prompt_format')!r}, not one of {', '.join(FORMATS)}"
    tokens = meta.get("token_bias")
    if tokens is not None and (not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens)):
        return f"its token_bias is {str(tokens)[:60]!r}, not a list of tokens"
    return ""


def _check_weights(lm: Any, info: Mapping[str, Any] | None, path: Path) -> None:
    """Refuse the weights of a folder virtualcell wrote where they are not the model its ``config.json`` describes
    (``info``: what ``from_pretrained(output_loading_info=True)`` reports) or are not finite numbers. transformers
    left a missing layer at random values (or dropped one its config.json did not have) with a printed report, and
    the model predicted under the folder's name; a NaN weight or config value served the baseline's effect as the
    model's."""
    weights = ", ".join(sorted(f.name for f in path.glob("*.safetensors"))) or "its weights file"
    again = "Copy the whole checkpoint folder again (a copy cut short, or files from two runs), or retrain it."
    info = info or {}
    tied = set(getattr(lm, "_tied_weights_keys", None) or ()) if getattr(lm.config, "tie_word_embeddings", False) \
        else set()  # (an output layer tied to the embeddings is not stored, and may be reported missing)
    missing = sorted(k for k in info.get("missing_keys", ()) if k not in tied)
    unexpected = sorted(info.get("unexpected_keys", ()))
    if missing:
        raise ModelError(f"{str(path)!r}: {weights} lacks {len(missing)} of the weights its config.json describes "
                         f"({preview(missing, 4)}); they would be left at random values, and the model would predict "
                         f"noise. {again}")
    if unexpected:
        raise ModelError(f"{str(path)!r}: {weights} holds {len(unexpected)} weights that its config.json has no place "
                         f"for ({preview(unexpected, 4)}; config.json describes another shape than the weights, e.g. "
                         f"fewer layers), and they would be dropped. {again}")
    with torch.no_grad():
        bad = [n for n, w in lm.named_parameters() if w.is_floating_point() and not bool(torch.isfinite(w).all())]
        if bad:
            raise ModelError(f"{str(path)!r}: {weights} holds weights that are not finite numbers (NaN or inf), in "
                             f"{preview(bad, 4)}; such a model writes no sentence of its own, "
                             f"and what it served would be the baseline's. {again}")
        odd = [f"{k} {v!r}" for k, v in _numbers(lm.config.to_dict()) if not finite_number(v)]
        odd += [f"{n} (from it)" for n, b in lm.named_buffers()
                if b.is_floating_point() and not bool(torch.isfinite(b).all())]
        if odd:
            raise ModelError(f"{str(path / 'config.json')!r} holds values that are not finite numbers ({preview(odd, 4)}"
                             f"): the model would compute NaN. {again}")


def _numbers(d: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    """Every float of a (nested) config dict, with its dotted key."""
    for k, v in d.items():
        if isinstance(v, Mapping):
            yield from _numbers(v, f"{prefix}{k}.")
        elif isinstance(v, float):
            yield f"{prefix}{k}", v


def _verdict_fault(verdict: Any) -> str:
    """What is wrong with what a checkpoint's ``verdict.json`` serves (its blend weights and generation settings), or
    ``""``: the weight was served as it was (2.0 extrapolated past the model; NaN made every prediction NaN)."""
    if not isinstance(verdict, dict):
        return f"it is {type(verdict).__name__}, not the verdict's record"
    unseen = verdict.get("unseen")
    if unseen is not None and not isinstance(unseen, dict):
        return f"its unseen is {str(unseen)[:40]!r}, not a record"
    for where, part in (("weight", verdict), ("unseen weight", unseen or {})):
        w = part.get("weight")
        if w is not None and not (finite_number(w) and 0.0 <= w <= 1.0):
            return f"its {where} is {w!r}, not a blend weight in [0, 1]"
        settings = part.get("settings")
        if settings is None:
            continue
        if not isinstance(settings, dict):
            return f"its {where.replace('weight', 'settings')} are {str(settings)[:40]!r}, not a record"
        if "samples" in settings and not whole_at_least(settings["samples"], 1):
            return f"its samples setting is {settings['samples']!r}, not a whole number of at least 1"
        for key in ("guidance", "temperature"):
            if key in settings and not (finite_number(settings[key]) and settings[key] >= 0):
                return f"its {key} setting is {settings[key]!r}, not a number >= 0"
        if "coexpression_prior" in settings and not isinstance(settings["coexpression_prior"], bool):
            return f"its coexpression_prior setting is {settings['coexpression_prior']!r}, not true or false"
    return ""


def _local_over(name: str, path: Path, *, genes_ignored: bool) -> str:
    """Say that the local folder ``path`` is loaded for ``name``, which is also a hub id (or ``"bundled"``, the
    shipped model), and return what the model records as its source (predictions' and screens' ``model``). Loud (a
    warning) where ``name`` is most likely meant as the other: one of the C2S hub models, one in this machine's Hugging
    Face cache, or ``"bundled"``, whose source is then the absolute path; quiet (info) for the everyday ``runs/model``
    folder, which nobody meant as a hub id and whose source stays the name as given (a screen written with it resumes
    by it)."""
    resolved = str(path.resolve())
    meant_other = name == "bundled" or name in KNOWN_HUB_MODELS or _in_hub_cache(name)
    other = "the model shipped in the package" if name == "bundled" else f"the Hugging Face hub model {name!r}"
    if meant_other:
        log.warning("Loading the local folder %s for %r, not %s%s. To load that, run from another folder or rename "
                    "this one; to load the folder without this warning, give it as ./%s.", resolved, name, other,
                    " (genes= is not used: the folder carries its own genes)" if genes_ignored else "", name)
        return resolved
    log.info("loading the local folder %s for %r (as a hub id it would name a Hugging Face model)%s.", resolved,
             name, "; genes= is not used: the folder carries its own genes" if genes_ignored else "")
    return name  # (an everyday folder keeps the name as given, as every other path does: a screen resumes by it)


def _in_hub_cache(name: str) -> bool:
    """Whether this machine's Hugging Face cache holds the hub model ``name`` (offline: no request is made)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # noqa: BLE001 - not an id the hub accepts, or no huggingface_hub: not in the cache
        return False


def caps_attention(lm: Any) -> bool:
    """Whether ``lm`` caps its attention logits (Gemma-2's ``attn_logit_softcapping``, so C2S-Scale's), which torch's
    sdpa attention cannot: such a model must run eager attention."""
    return bool(getattr(getattr(lm, "config", None), "attn_logit_softcapping", None))


def eager_if_capped(lm: Any) -> Any:
    """``lm`` set to eager attention where it caps its attention logits (:func:`caps_attention`) and was loaded with
    another: transformers 5.0 to 5.20 loaded Gemma-2 with sdpa and dropped the cap without a word."""
    if caps_attention(lm) and getattr(lm.config, "_attn_implementation", "eager") != "eager":
        lm.set_attn_implementation("eager")
    return lm


def looks_like_hub_id(name: str) -> bool:
    """Whether ``name`` reads as a Hugging Face hub id (``owner/model``) rather than a path."""
    return name.count("/") == 1 and not name.startswith((".", "/", "~"))


def unreachable(name_or_path: str | os.PathLike[str], err: BaseException) -> ModelError:
    """The error for a model that could not be loaded by its hub id or path (offline, a wrong id): what to use
    instead. Loading to predict (:meth:`C2SModel.load`) and to fine-tune (``train --base``) say the same."""
    name = str(name_or_path)
    if not Path(name).exists() and not looks_like_hub_id(name):  # a mistyped folder, not the network
        return ModelError(f"No such folder: {name!r}. Check the path of the model folder.")
    return ModelError(
        f"Could not load {name!r} ({err.__class__.__name__}: {str(err).splitlines()[0][:200]}). "
        + (f"There is no folder {name!r} here; as a hub id, this machine may be offline or the id wrong. "
           if not Path(name).exists() else "If it is a hub id, this machine may be offline or the id wrong. ")
        + "Alternatives: a local folder "
        "(on a connected machine: huggingface-cli download <id> --local-dir DIR), the bundled model "
        f"(virtualcell.model.BUNDLED), your own 'virtualcell train' output, or the C2S hub models "
        f"{', '.join(KNOWN_HUB_MODELS)}."
    )


def bundled(*, device: str | None = None) -> C2SModel:
    """The small model shipped inside the package (trained on the embedded default)."""
    if not (Path(BUNDLED) / META_FILE).exists():
        raise ModelError(
            f"The bundled model is missing from {BUNDLED}. Reinstall virtualcell, or rebuild it with "
            "python experiments/train_bundled_model.py."
        )
    return C2SModel.load(BUNDLED, device=device)
