"""What a `--dit_path` / `--lora` argument points at, and whether it fits the model it is used with.

Accepted: a training OUTPUT_DIR or its `checkpoints/` (the iteration `latest_checkpoint.txt` names), an iteration
folder `iter_N/`, its `model/` (a diffusers transformer folder after a full fine-tune, or
`pytorch_lora_weights.safetensors` after `--lora`), a LoRA `.safetensors` file, a Hub id of a LoRA repo, or NVIDIA's
own `iter_N.pt` / `model.pt`. `--load_ema` picks `model/ema/` (ours) or the `net_ema.` weights (NVIDIA's).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from . import checkpoint as ckpt
from .local_paths import is_hub_id, missing_path_message
from .lora import WEIGHT_NAME as LORA_WEIGHT_NAME
from .user_errors import BadValue, MissingInput


class NoEMAError(BadValue):
    """--load_ema on a checkpoint saved without EMA weights."""


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    kind: str  # "full" (diffusers transformer folder), "lora" (diffusers LoRA file) or "nvidia" (.pt)
    path: Path
    ema: bool
    source: str  # as the user gave it, for messages and the sidecar JSON
    run_config: dict | None = None  # trainer/config.json of our run, when the path is inside one

    @property
    def trained_from(self) -> str | None:
        """The --model of the run that saved it, when it is ours and records it."""
        return (self.run_config or {}).get("model")

    def describe(self) -> dict:
        return {"source": self.source, "kind": self.kind, "path": str(self.path), "ema": self.ema}


def resolve_checkpoint(source: str, load_ema: bool = False) -> Checkpoint:
    path = Path(source).expanduser()
    if not path.exists():
        raise MissingInput(missing_path_message("Checkpoint", source))
    if path.is_file():
        if path.suffix in (".pt", ".pth"):
            return Checkpoint("nvidia", path, load_ema, source)
        if path.suffix == ".safetensors":
            if load_ema:
                raise NoEMAError(f"--load_ema: {source} is a single LoRA file, with no EMA weights beside it. "
                                 "Pass its iteration folder (iter_N/) or drop --load_ema.")
            return Checkpoint("lora", path, False, source, _run_config_above(path))
        raise BadValue(f"Checkpoint {source}: expected a folder, a LoRA .safetensors file or an NVIDIA .pt file.")

    path = _follow_latest(path)
    if (path / ckpt.MODEL).is_dir():  # an iteration folder
        path = path / ckpt.MODEL
    run_config = _run_config_above(path)
    if any(path.glob("*.distcp")):
        raise BadValue(f"{source} is a distributed (DCP) checkpoint: convert it to a single .pt first (NVIDIA's "
                         "scripts/convert_distcp.py).")
    if load_ema:
        if not (path / ckpt.EMA).is_dir():
            raise NoEMAError(f"--load_ema: {source} has no EMA weights ({path / ckpt.EMA} does not exist); the run "
                             "was trained without EMA. Drop --load_ema.")
        path = path / ckpt.EMA
    if (path / LORA_WEIGHT_NAME).is_file():
        return Checkpoint("lora", path / LORA_WEIGHT_NAME, load_ema, source, run_config)
    if (path / "config.json").is_file():
        return Checkpoint("full", path, load_ema, source, run_config)
    found = ", ".join(sorted(p.name for p in path.iterdir())[:10]) or "nothing"
    raise MissingInput(
        f"{path} holds neither a diffusers transformer (config.json + weights) nor {LORA_WEIGHT_NAME} (found: "
        f"{found}). Pass an iteration folder iter_N/, its model/, or an NVIDIA .pt file."
    )


def _run_config_above(path: Path) -> dict | None:
    """trainer/config.json of the run whose iter_N/model/ (or model/ema/, or a file in either) `path` is."""
    for folder in list(path.parents)[:3] if path.is_file() else [path, *list(path.parents)[:2]]:
        if folder.name == ckpt.MODEL and (folder.parent / ckpt.TRAINER / ckpt.CONFIG).is_file():
            return ckpt.read_config(folder.parent)
    return None


def trained_from(checkpoints: list[Checkpoint]) -> str | None:
    """The --model of the first of `checkpoints` that comes from one of our runs recording it."""
    return next((c.trained_from for c in checkpoints if c is not None and c.trained_from), None)


def _follow_latest(path: Path) -> Path:
    """OUTPUT_DIR or OUTPUT_DIR/checkpoints -> the iteration folder that latest_checkpoint.txt names."""
    output_dir = path.parent if path.name == ckpt.CHECKPOINTS else path
    return ckpt.latest_checkpoint(output_dir) or path


def loras_to_apply(dit: Checkpoint | None, lora_sources: list[str], load_ema: bool = False) -> list[Checkpoint]:
    """The LoRAs of a command line: a LoRA given as --dit_path first, then every --lora (`load_ema`: each one's EMA
    adapter, model/ema/; one without is refused rather than silently used without)."""
    return ([dit] if dit is not None and dit.kind == "lora" else []) + [resolve_lora(s, load_ema)
                                                                          for s in lora_sources]


def resolve_lora(source: str, load_ema: bool = False) -> Checkpoint:
    """A LoRA: a local checkpoint as above (`load_ema`: its model/ema/), or a Hub repo id holding
    pytorch_lora_weights.safetensors."""
    if Path(source).expanduser().exists():
        checkpoint = resolve_checkpoint(source, load_ema)
        if checkpoint.kind != "lora":
            kind = {"full": "full fine-tune", "nvidia": "NVIDIA .pt"}[checkpoint.kind]
            raise BadValue(f"{source} is a {kind} checkpoint, not a LoRA: pass it as --dit_path.")
        return checkpoint
    if is_hub_id(source):
        from huggingface_hub import hf_hub_download

        from .hub_errors import explain_hub_errors

        if load_ema:
            raise NoEMAError(f"--load_ema: the Hub LoRA {source} is a single file with no EMA weights.")
        with explain_hub_errors(source):
            return Checkpoint("lora", Path(hf_hub_download(source, LORA_WEIGHT_NAME)), False, source)
    raise MissingInput(missing_path_message("LoRA", source)[:-1] + " (a local path: it was not looked up on the "
                       "Hub, whose ids are owner/name).")
