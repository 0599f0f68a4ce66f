"""Checkpoints: one directory per saved step, written aside and renamed into place.

    <dir>/step_000500/model.safetensors    weights (tied tensors stored once)
                     /config.json          the model config, enough to rebuild the model
                     /run_config.toml      the whole resolved run config
                     /trainer_state.pt     optimizer, step, RNG and data-loader state
                     /tokenizer.json       the tokenizer, so a checkpoint stands alone
                     /<companion>/         a second model trained beside the first (PPO's value
                                           model): its model.safetensors and optimizer.pt

Sharded checkpoints (`tessera.distributed`) share the directory convention, `config.json` and
the tokenizer, and hold DCP shards (`.metadata`, `*.distcp`) instead of `model.safetensors`;
`load_weights` reads either, so generation and evaluation take any checkpoint.

A directory named step_N is complete by construction: files are written into a hidden
temporary directory, flushed, and the directory is renamed, so a crash mid-write leaves at
most a stray temporary directory and never a damaged checkpoint in place of a good one. A save
that fails (a full disk: one line, exit 2) removes its temporary directory; pruning renames an
old step out of sight before deleting it, so a kill mid-delete never leaves half a step_N.
An int8 checkpoint (`tessera quantize --int8`, marked by quantization.json) holds no
full-precision weights: `load_weights` refuses it in one line rather than fail on missing keys.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_model
from torch.distributed.checkpoint.state_dict import get_model_state_dict

from tessera.core.config import ModelConfig, build_section, to_dict
from tessera.core.model import Transformer
from tessera.core.storage import save_torch, share, written_aside

STEP_DIR = re.compile(r"^step_(\d+)$")
PRUNED = ".pruned"  # suffix of a step directory renamed out of sight for deletion
QUANTIZATION_MANIFEST = "quantization.json"  # marks an int8 checkpoint (tessera.interop.quantize)


def _fsync_tree(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def publish(tmp: Path, final: Path) -> None:
    """Rename the finished `tmp` directory into place, readable as the umask allows; an existing
    `final` is moved aside first and deleted only once the new one stands."""
    share(tmp)
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)


def write_run_files(directory: Path, model_cfg: ModelConfig, run_config: str, attachments: tuple[Path, ...]) -> None:
    """What makes a checkpoint stand alone, whatever holds its weights: model config, run config, tokenizer."""
    (directory / "config.json").write_text(json.dumps(to_dict(model_cfg), indent=2))
    if run_config:
        (directory / "run_config.toml").write_text(run_config)
    for f in attachments:
        shutil.copy(f, directory / Path(f).name)


def save_companion(directory: Path, engine) -> None:
    directory.mkdir()
    save_model(engine.model, str(directory / "model.safetensors"))
    save_torch(engine.optimizer.state_dict(), directory / "optimizer.pt")


def companion_dir(path: Path, name: str) -> Path:
    """`path/name`; FileNotFoundError when the checkpoint was saved without that companion."""
    if not (path / name).is_dir():
        raise FileNotFoundError(f"{path} holds no {name}/: it was not saved by a run that trains one")
    return path / name


def load_companion(directory: Path, engine) -> None:
    load_model(engine.model, str(directory / "model.safetensors"), device=str(next(engine.model.parameters()).device))
    engine.optimizer.load_state_dict(torch.load(directory / "optimizer.pt", weights_only=True))


class Checkpointer:
    """Single-process checkpoints of an engine (its `model` and `optimizer`) and the trainer's state.

    `save(step, engine, state)` / `load(path, engine) -> state` is the interface the trainer uses;
    the sharded and DeepSpeed checkpointers in `tessera.distributed` implement the same one.
    `companions` (name -> engine) are saved into and loaded from the same step directory, so a
    second trained model (PPO's value model) is never out of step with the first.
    """

    def __init__(self, directory: str | Path, keep_last: int = 2, attachments: tuple[Path, ...] = ()):
        """`attachments` are files copied into every checkpoint (the tokenizer), so each is self-contained."""
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.attachments = attachments

    def save(self, step: int, engine, state: dict, run_config: str = "", companions: dict | None = None) -> Path:
        final = self.directory / f"step_{step:06d}"
        tmp = self.directory / f".step_{step:06d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        with written_aside(tmp, final):
            tmp.mkdir(parents=True)
            save_model(engine.model, str(tmp / "model.safetensors"))
            save_torch({**state, "optimizer": engine.optimizer.state_dict()}, tmp / "trainer_state.pt")
            write_run_files(tmp, engine.model.cfg, run_config, self.attachments)
            for name, companion in (companions or {}).items():
                save_companion(tmp / name, companion)
            _fsync_tree(tmp)
            publish(tmp, final)
        self.prune()
        return final

    def wait(self) -> None:
        """Finish any save still in flight (the sharded checkpointer saves asynchronously on request)."""

    def load(self, path: str | Path, engine, companions: dict | None = None) -> dict:
        """Restore weights and optimizer into `engine` (and each companion); return the trainer's state."""
        path = Path(path)
        directories = {name: companion_dir(path, name) for name in companions or {}}
        load_weights(engine.model, path)
        state = load_trainer_state(path)
        engine.optimizer.load_state_dict(state.pop("optimizer"))
        for name, directory in directories.items():
            load_companion(directory, companions[name])
        return state

    def steps(self) -> list[Path]:
        if not self.directory.exists():
            return []
        found = [(int(m.group(1)), p) for p in self.directory.iterdir() if (m := STEP_DIR.match(p.name))]
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def prune(self) -> None:
        """Delete all but the newest `keep_last` steps, each renamed out of sight first (and the
        leftovers of a prune that was killed)."""
        for old in self.steps()[: -self.keep_last]:
            os.replace(old, old.with_name(f".{old.name}{PRUNED}"))
        for doomed in self.directory.glob(f".step_*{PRUNED}"):
            shutil.rmtree(doomed)


def checkpoint_step(ckpt: str | Path) -> int:
    match = STEP_DIR.match(Path(ckpt).name)
    if not match:
        raise ValueError(f"{ckpt} is not named like a checkpoint (step_NNNNNN)")
    return int(match.group(1))


def find_checkpoint(path: str | Path) -> Path:
    """`path` itself if it is a checkpoint, else the newest one in it (a run or checkpoints directory)."""
    path = Path(path)
    if (path / "config.json").exists():
        return path
    for directory in (path / "checkpoints", path):
        latest = Checkpointer(directory).latest()
        if latest is not None:
            return latest
    raise FileNotFoundError(f"{path} is not a checkpoint and holds none")


def read_model_config(ckpt: str | Path) -> ModelConfig:
    path = Path(ckpt) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{ckpt} is not a checkpoint: no config.json")
    return build_section(ModelConfig, json.loads(path.read_text()), "model")


def refuse_int8(ckpt: str | Path, what: str = "this command") -> None:
    """One line (exit 2) for a command that needs full-precision weights and was given an int8 checkpoint."""
    manifest = Path(ckpt) / QUANTIZATION_MANIFEST
    if manifest.exists():
        try:
            source = json.loads(manifest.read_text()).get("source")
        except (ValueError, AttributeError):
            source = None
        raise ValueError(f"{ckpt} is an int8 checkpoint (tessera quantize --int8), which {what} cannot use: "
                         f"give it the full-precision checkpoint{f' it was made from ({source})' if source else ''}")


LM_PREFIX = "lm."  # where an image-conditioned LM's checkpoint (tessera vlm) holds its decoder


def _part_prefix(model: torch.nn.Module, saved: set[str]) -> str:
    """"lm." when `model` is a bare decoder and the checkpoint an image-conditioned LM's (its text
    part is then read: generation, conversion and export work on it), else ""."""
    own = model.state_dict().keys()
    return LM_PREFIX if "norm.weight" in own and "norm.weight" not in saved and f"{LM_PREFIX}norm.weight" in saved else ""


def text_part(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A checkpoint's decoder tensors under the decoder's own names (an image-conditioned LM's `lm.*`)."""
    if "norm.weight" in tensors or f"{LM_PREFIX}norm.weight" not in tensors:
        return tensors
    return {k[len(LM_PREFIX):]: v for k, v in tensors.items() if k.startswith(LM_PREFIX)}


def _refuse_adapters(ckpt: str | Path, model: torch.nn.Module, names: set[str], prefix: str) -> None:
    """ValueError when the checkpoint holds weights of the part read (a LoRA run's adapters) that `model` lacks."""
    own = model.state_dict()
    extra = sorted(k for k in names if k.startswith(prefix) and k[len(prefix):] not in own)
    if extra:
        raise ValueError(f"{ckpt} holds weights this model lacks ({extra[0]}, ...): a LoRA run's checkpoint "
                         "is read through its merged/ export")


def load_weights(model: torch.nn.Module, ckpt: str | Path) -> None:
    """Weights from `model.safetensors`, or gathered from DCP shards into this one process."""
    path = Path(ckpt)
    refuse_int8(path)
    if (path / "model.safetensors").exists():
        with safe_open(str(path / "model.safetensors"), "pt") as f:
            saved = set(f.keys())
        prefix = _part_prefix(model, saved)
        _refuse_adapters(ckpt, model, {k for k in saved if ".lora_" in k}, prefix)
        if not prefix:
            load_model(model, str(path / "model.safetensors"), device=str(next(model.parameters()).device))
            return
        missing, _ = model.load_state_dict(text_part(load_file(str(path / "model.safetensors"))), strict=False)
        if set(missing) - ({"lm_head.weight", "tok_emb.weight"} if model.cfg.tie_embeddings else set()):  # one tensor
            raise ValueError(f"{ckpt}: its text part lacks {sorted(missing)[0]}")
    elif (path / ".metadata").exists():
        saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
        names = {k[len("model."):] for k in saved if k.startswith("model.")}
        prefix = _part_prefix(model, names)
        _refuse_adapters(ckpt, model, names, prefix)
        state = {"model": {prefix + k: v for k, v in get_model_state_dict(model).items()}}
        with warnings.catch_warnings():  # DCP warns whenever it runs without a process group
            warnings.filterwarnings("ignore", "torch.distributed is disabled, unavailable or uninitialized")
            dcp.load(state, checkpoint_id=str(path), no_dist=True)  # reads only the model's keys
        model.load_state_dict({k[len(prefix):]: v for k, v in state["model"].items()})
    else:
        raise FileNotFoundError(f"{ckpt} is not a checkpoint: no model.safetensors or DCP shards")


def load_model_from_checkpoint(ckpt: str | Path, device: str | torch.device = "cpu") -> Transformer:
    """Rebuild the model of a checkpoint and load its weights; never unpickles code."""
    ckpt = find_checkpoint(ckpt)
    model = Transformer(read_model_config(ckpt)).to(device)
    load_weights(model, ckpt)
    return model.eval()


def load_trainer_state(ckpt: str | Path) -> dict:
    return torch.load(Path(ckpt) / "trainer_state.pt", weights_only=True)
