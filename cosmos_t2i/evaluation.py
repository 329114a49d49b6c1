"""What evaluate_text2image.py compares and how it makes the images: candidates, prompts, reference images.

A candidate is the base model, or the base model with a fine-tuned transformer (ours, full or EMA, or NVIDIA's
.pt) and/or LoRAs at a scale. Every candidate samples the same prompts with the same seeds, so image (prompt, seed)
of one candidate starts from the same noise as that of any other: differences come from the weights alone.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from . import checkpoint as ckpt
from .checkpoint_paths import Checkpoint, NoEMAError, resolve_checkpoint, resolve_lora
from .models import DTYPES, Model
from .user_errors import BadValue, MissingInput

SUBJECT = "{subject}"
# DreamBooth's 25 prompts for objects (github.com/google/dreambooth, prompts_and_classes.txt), with "{0} {1}"
# (identifier and class noun) as one subject phrase.
SUBJECT_TEMPLATES = [
    "a {subject} in the jungle",
    "a {subject} in the snow",
    "a {subject} on the beach",
    "a {subject} on a cobblestone street",
    "a {subject} on top of pink fabric",
    "a {subject} on top of a wooden floor",
    "a {subject} with a city in the background",
    "a {subject} with a mountain in the background",
    "a {subject} with a blue house in the background",
    "a {subject} on top of a purple rug in a forest",
    "a {subject} with a wheat field in the background",
    "a {subject} with a tree and autumn leaves in the background",
    "a {subject} with the Eiffel Tower in the background",
    "a {subject} floating on top of water",
    "a {subject} floating in an ocean of milk",
    "a {subject} on top of green grass with sunflowers around it",
    "a {subject} on top of a mirror",
    "a {subject} on top of the sidewalk in a crowded street",
    "a {subject} on top of a dirt road",
    "a {subject} on top of a white rug",
    "a red {subject}",
    "a purple {subject}",
    "a shiny {subject}",
    "a wet {subject}",
    "a cube shaped {subject}",
]
# Scenes without the subject, for prior drift: varied content, so a model that paints its subject everywhere shows.
PRIOR_PROMPTS = [
    "a photo of a dog running on the beach",
    "a bowl of fruit on a wooden kitchen table",
    "a city street at night with neon signs",
    "a mountain lake at sunrise",
    "a cat sleeping on a sofa",
    "a forklift in a warehouse",
    "a red sports car parked on a street",
    "a portrait of an old man with a beard",
]


@dataclasses.dataclass(frozen=True)
class Prompt:
    text: str
    subject: bool  # holds the subject (DINO, CLIP-I, CLIP-T), or not (prior drift)


def subject_prompts(subject: str) -> list[Prompt]:
    return [Prompt(t.format(subject=subject), True) for t in SUBJECT_TEMPLATES]


def prior_prompts() -> list[Prompt]:
    return [Prompt(t, False) for t in PRIOR_PROMPTS]


def read_prompts(path: str | Path, subject: str | None) -> list[Prompt]:
    """One prompt a line (blank lines and lines starting with # skipped). A line with {subject} is a subject
    prompt (the phrase filled in), one without is a prior prompt."""
    prompts = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if SUBJECT in line:
            if not subject:
                raise BadValue(f"{path} line {number} has {SUBJECT}: give the phrase with --subject, e.g. "
                                 "--subject 'sks teal robot'.")
            prompts.append(Prompt(line.replace(SUBJECT, subject), True))
        else:
            prompts.append(Prompt(line, False))
    if not any(p.subject for p in prompts):
        raise BadValue(f"{path} has no subject prompt (a line with {SUBJECT}): nothing to measure the subject "
                         "on.")
    return prompts


@dataclasses.dataclass(frozen=True)
class Job:
    """One image every candidate makes: prompt `prompt_index` with `seed`."""

    prompt_index: int
    seed: int

    def file_name(self) -> str:
        return f"p{self.prompt_index:03d}_seed{self.seed}.png"


def jobs_for(prompts: list[Prompt], seeds: list[int]) -> list[Job]:
    return [Job(i, seed) for i in range(len(prompts)) for seed in seeds]


# ----------------------------------------------------------------------------------------------------------------
# Candidates

BASE = "base"


@dataclasses.dataclass(frozen=True)
class Candidate:
    name: str  # unique, a folder name
    dit: Checkpoint | None = None  # a full fine-tune or NVIDIA .pt
    loras: tuple[Checkpoint, ...] = ()
    lora_scale: float | None = None
    iteration: int | None = None  # 0 for the base model
    ema: bool = False

    @property
    def is_base(self) -> bool:
        return self.dit is None and not self.loras

    def describe(self) -> dict:
        return {"name": self.name, "iteration": self.iteration, "ema": self.ema, "lora_scale": self.lora_scale,
                "checkpoint": self.dit.describe() if self.dit else None,
                "loras": [c.describe() for c in self.loras]}


def base_candidate() -> Candidate:
    return Candidate(BASE, iteration=0)


def iteration_of(path: str | Path) -> int | None:
    """N of the nearest iter_N (folder or NVIDIA's iter_N.pt) in the path."""
    for part in reversed(Path(path).resolve().parts):
        match = re.fullmatch(r"iter_(\d+)(\.pt|\.pth)?", part)
        if match:
            return int(match.group(1))
    return None


def _variants(source: str, ema_mode: str, resolve) -> list[Checkpoint]:
    """The checkpoint of `source` without and/or with EMA (`ema_mode`: both, no, only); `both` skips a missing EMA."""
    found = []
    for ema in {"both": (False, True), "no": (False,), "only": (True,)}[ema_mode]:
        try:
            found.append(resolve(source, ema))
        except NoEMAError:
            if ema_mode == "only":
                raise
    return found


def _name(checkpoint: Checkpoint, scale: float | None, scales: list[float]) -> str:
    source = Path(checkpoint.source)
    name = source.parent.name if source.name == ckpt.MODEL else source.name
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name.removesuffix(".safetensors")) or "checkpoint"
    if checkpoint.ema:
        name += "_ema"
    if scale is not None and len(scales) > 1:
        name += f"_x{scale:g}"
    return name


def _candidates(checkpoint: Checkpoint, scales: list[float]) -> list[Candidate]:
    iteration = iteration_of(checkpoint.source)
    if checkpoint.kind != "lora":
        return [Candidate(_name(checkpoint, None, scales), dit=checkpoint, iteration=iteration, ema=checkpoint.ema)]
    return [Candidate(_name(checkpoint, s, scales), loras=(checkpoint,), lora_scale=s, iteration=iteration,
                      ema=checkpoint.ema) for s in scales]


def run_checkpoints(run_dir: str | Path) -> list[Path]:
    """Every complete iteration folder of a training OUTPUT_DIR, in order (half-written ones are named .iter_*)."""
    folder = Path(run_dir) / ckpt.CHECKPOINTS
    return sorted(p for p in folder.glob("iter_*") if p.is_dir()) if folder.is_dir() else []


def collect_candidates(run_dirs: list[str], dit_paths: list[str], loras: list[str], scales: list[float],
                       ema_mode: str) -> list[Candidate]:
    """The base model first, then every checkpoint of each run, each --dit_path and each --lora (each LoRA at
    every scale), with/without EMA per `ema_mode`. Names are made unique with a numbered suffix."""
    checkpoints = []
    for run_dir in run_dirs:
        iterations = run_checkpoints(run_dir)
        if not iterations:
            raise MissingInput(f"--run_dir {run_dir} has no checkpoints ({Path(run_dir) / ckpt.CHECKPOINTS}"
                                    "/iter_*): pass a train_text2image.py --output_dir.")
        for iteration in iterations:
            checkpoints += _variants(str(iteration), ema_mode, resolve_checkpoint)
    for source in dit_paths:
        checkpoints += _variants(source, ema_mode, resolve_checkpoint)
    for source in loras:
        checkpoints += _variants(source, ema_mode, resolve_lora)
    candidates, seen = [base_candidate()], {BASE: 1}
    for checkpoint in checkpoints:
        for candidate in _candidates(checkpoint, scales):
            count = seen.get(candidate.name, 0)
            seen[candidate.name] = count + 1
            if count:
                candidate = dataclasses.replace(candidate, name=f"{candidate.name}_{count + 1}")
            candidates.append(candidate)
    return candidates


def run_config_of(candidates: list[Candidate]) -> dict:
    """trainer/config.json of the first candidate that comes from one of our runs ({} if none)."""
    for candidate in candidates:
        for checkpoint in (candidate.dit, *candidate.loras):
            if checkpoint is not None and checkpoint.run_config:
                return checkpoint.run_config
    return {}


# ----------------------------------------------------------------------------------------------------------------
# Reference images


def spread(count: int, limit: int | None) -> list[int]:
    """`limit` indices spread evenly over range(count) (all with None): frames of one video sit side by side in a
    dataset, and the first few would show one moment of it."""
    if limit is None or limit >= count:
        return list(range(count))
    return sorted({round(i * (count - 1) / max(limit - 1, 1)) for i in range(limit)})


def load_reference_images(folder: str | Path, limit: int | None = None) -> list:
    """The subject's real images: an imagefolder (training's dataset: its metadata lists them) or any folder of
    images sorted by name; at most `limit` of them, spread over the set (all with None)."""
    import tempfile

    from PIL import Image

    from .embedding import load_imagefolder
    from .dataset_format import IMAGE_EXTENSIONS, METADATA_FILE

    folder = Path(folder)
    if not folder.is_dir():
        raise MissingInput(f"Reference folder {folder} does not exist.")
    if (folder / METADATA_FILE).is_file():
        with tempfile.TemporaryDirectory(prefix="cosmos-t2i-references-") as cache:
            dataset = load_imagefolder(folder, cache)
            images = [dataset[i]["image"].convert("RGB") for i in spread(len(dataset), limit)]
    else:
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        images = [Image.open(files[i]).convert("RGB") for i in spread(len(files), limit)]
    if not images:
        raise MissingInput(f"Reference folder {folder} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}).")
    return images


# ----------------------------------------------------------------------------------------------------------------
# Generation


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    model: Model
    width: int
    height: int
    num_steps: int
    guidance: float
    sampler: str
    dtype: str
    batched_cfg: bool
    compiled: bool
    cuda_graph: bool


def candidate_transformer(candidate: Candidate, base_transformer, settings: SamplingSettings):
    """The transformer that samples `candidate`: the base model's own, a checkpoint's, or a fresh copy of the base
    with its LoRAs fused in (so the loaded base stays untouched for the next candidate)."""
    from .pipeline import fine_tuned_transformer

    if candidate.is_base:
        return base_transformer
    return fine_tuned_transformer(settings.model, candidate.dit, candidate.loras,
                                  [candidate.lora_scale] * len(candidate.loras), DTYPES[settings.dtype],
                                  base_transformer.device, fuse=True)


def generate_candidate(pipe, base_transformer, candidate: Candidate, prompts: list[Prompt], jobs: list[Job],
                       folder: Path, settings: SamplingSettings, progress) -> None:
    """Make `jobs` (this process's share) with `candidate`'s weights into `folder`, one PNG per (prompt, seed)."""
    from . import speed
    from .atomic import atomic_output
    from .cuda_graphs import GraphedTransformer
    from .sampling import generate

    pipe.transformer = candidate_transformer(candidate, base_transformer, settings)
    try:
        if settings.compiled:
            speed.compile_transformer_blocks(pipe.transformer, multi_kernel=True)
        denoiser = GraphedTransformer(pipe.transformer) if settings.cuda_graph else None
        for job in jobs:
            image = generate(pipe, prompts[job.prompt_index].text, "", settings.height, settings.width,
                             settings.num_steps, settings.guidance, job.seed, settings.batched_cfg, denoiser,
                             settings.sampler)
            with atomic_output(folder / job.file_name()) as tmp:
                image.save(tmp)
            progress.update(1)
    finally:
        pipe.transformer = base_transformer


# ----------------------------------------------------------------------------------------------------------------
# Scores


def read_images(folder: Path, prompts: list[Prompt], jobs: list[Job]) -> dict[str, list]:
    """This candidate's images, split into subject and prior ones (each list in job order)."""
    from PIL import Image

    split = {"subject": [], "prior": []}
    for job in jobs:
        with Image.open(folder / job.file_name()) as image:
            split["subject" if prompts[job.prompt_index].subject else "prior"].append(image.convert("RGB"))
    return split


def score_candidate(models, images: dict[str, list], prompts: list[Prompt], jobs: list[Job],
                    reference: dict, base_prior: dict | None, drift_metric: str) -> tuple[dict, dict]:
    """(scores, the prior images' embeddings) of one candidate: DINO and CLIP-I against the reference images,
    CLIP-T on the subject prompts, drift of the prior images against the base model's (`base_prior`: the base's
    own prior embeddings; None while scoring the base itself, whose drift is 0 by definition of its reference)."""
    from .fidelity import drift, subject_metrics

    subject_texts = [prompts[j.prompt_index].text for j in jobs if prompts[j.prompt_index].subject]
    scores = subject_metrics(models, images["subject"], subject_texts, reference)
    prior = models.embed(images["prior"]) if images["prior"] else None
    scores["drift"] = None if prior is None else drift(prior[drift_metric], (base_prior or prior)[drift_metric])
    return scores, prior
