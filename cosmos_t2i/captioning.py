"""Caption an imagefolder with a vision-language model (VLM): the `text` column of its metadata.jsonl.

The default captioner is Qwen3-VL-4B-Instruct. Why: transformers supports it natively (Qwen3VLForConditionalGeneration,
AutoModelForImageTextToText), it follows a captioning instruction (length, what to describe, what not to say), and
it gives the most quality per GB among the candidates: ~8.9 GB of bf16 weights, which Qwen's model card puts on a
par with Qwen2.5-VL-7B (~16.6 GB). Qwen3-VL-2B, Qwen2.5-VL-3B and SmolVLM are lighter but score lower in their
published benchmarks; Florence-2 (0.8 GB) has fixed task prompts and no instruction following, so --caption_prompt
could not steer it. The choice rests on those published tables, not on captions compared here (no weights here).
Any chat-template VLM that AutoModelForImageTextToText loads works with --caption_model.

Resume: every batch's raw answers are appended (flushed and fsync'd) to DATASET_DIR/captions_raw.jsonl, each line
naming the file, the model, the prompt and the token budget. A rerun with the same settings skips files that already
have an answer there, so a killed run picks up where it stopped. metadata.jsonl is rewritten once, at the end,
atomically (written aside, then os.replace). The final caption is recomposed from the raw answer, so changing only
--caption_prefix or --caption_max_words re-captions without running the VLM.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
from pathlib import Path

from . import dataset_format as fmt
from .atomic import atomic_output
from .dataset_format import METADATA_FILE

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "Qwen/Qwen3-VL-4B-Instruct"
DEFAULT_PROMPT = (
    "Describe this image in one or two sentences for a text-to-image training caption: the main subject, what it "
    "is doing, the setting and background, the lighting and the camera's viewpoint. Plain descriptive words only; "
    "do not start with 'The image' or 'This image'."
)
RAW_FILE = "captions_raw.jsonl"
# T5 reads 512 tokens; at 2 SentencePiece tokens a word (common English words are 1 or 2; not measured here, no T5
# tokenizer offline) this many words stay inside it.
MAX_WORDS_LIMIT = 250
# Generation budget per word of caption: enough that an answer is cut by --caption_max_words, not by tokens.
TOKENS_PER_WORD = 2

# How VLMs tend to open a description; dropped when a prefix already says what the image is.
_LEAD_IN = re.compile(r"^(in (the|this) (image|photo|picture|frame|scene)\s*,?"
                      r"|(the|this) (image|photo|photograph|picture|frame) (shows|depicts|features|captures|displays"
                      r"|is of)\s*:?)\s*", re.IGNORECASE)
_CONTROL = re.compile(r"[\x00-\x1f\x7f\ufffd]")


class CaptioningError(Exception):
    """A mistake the user can fix (flag, file, model); the script prints it as one `error:` line."""


# ----------------------------------------------------------------------------------------------------------------
# Captions


def compose_caption(prefix: str, raw_answer: str, max_words: int) -> str:
    """prefix + the VLM's answer, cleaned and cut to at most `max_words` words (the prefix not counted)."""
    answer = " ".join(_CONTROL.sub(" ", raw_answer).split()).strip(" \"'")
    if prefix.strip():
        answer = _LEAD_IN.sub("", answer)
        # "An image of sks teal robot, " continues into the answer: "Standing ..." -> "standing ...".
        first = answer.split(" ", 1)[0]
        capitalized = first[:1].isupper() and (first[1:].islower() or len(first) == 1) and first != "I"
        if prefix.rstrip().endswith(",") and capitalized:  # not an acronym (LED) or "I"
            answer = answer[0].lower() + answer[1:]
    words = answer.split()
    if len(words) > max_words:
        answer = " ".join(words[:max_words]).rstrip(",;:-") + "."
    return prefix + answer


def max_new_tokens(max_words: int) -> int:
    return math.ceil(max_words * TOKENS_PER_WORD) + 8


# ----------------------------------------------------------------------------------------------------------------
# The imagefolder's metadata and the side file of raw answers


def read_metadata(dataset_dir: Path) -> list[dict]:
    path = dataset_dir / METADATA_FILE
    if not path.is_file():
        raise CaptioningError(
            f"{path} does not exist: --dataset_dir must be an imagefolder made by prepare_dataset.py "
            f"(`python prepare_dataset.py --input_dataset_dir VIDEOS --output_dataset_dir {dataset_dir}`)."
        )
    try:
        return fmt.read_metadata(dataset_dir)
    except fmt.BadValue as error:
        raise CaptioningError(str(error)) from None


def write_metadata(dataset_dir: Path, rows: list[dict]) -> None:
    with atomic_output(dataset_dir / METADATA_FILE) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())


@dataclasses.dataclass(frozen=True)
class Settings:
    """What a raw answer depends on: an answer from other settings is not reused."""

    model: str
    prompt: str
    max_new_tokens: int

    def matches(self, entry: dict) -> bool:
        return (entry.get("model"), entry.get("prompt"), entry.get("max_new_tokens")) == (
            self.model, self.prompt, self.max_new_tokens)


class RawAnswers:
    """DATASET_DIR/captions_raw.jsonl: one JSON line per answer, appended and fsync'd batch by batch."""

    def __init__(self, path: Path, settings: Settings):
        self.path = path
        self.settings = settings
        self.answers: dict[str, str] = {}  # file_name -> raw answer under these settings (the last one wins)
        if path.is_file():
            self._drop_torn_tail()
            for line in path.read_text(encoding="utf-8").splitlines():
                entry = json.loads(line)
                if settings.matches(entry):
                    self.answers[entry["file_name"]] = entry["raw"]

    def _drop_torn_tail(self) -> None:
        """A kill during a write can leave half a line; cut it so the next append starts a clean line."""
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end != len(data):
            with open(self.path, "r+b") as f:
                f.truncate(end)

    def append(self, answers: dict[str, str], captions: dict[str, str]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            for name, raw in answers.items():
                entry = {"file_name": name, "raw": raw, "caption": captions[name],
                         **dataclasses.asdict(self.settings)}
                f.write(json.dumps(entry, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.answers.update(answers)


# ----------------------------------------------------------------------------------------------------------------
# The VLM


def resolve_model(model: str) -> str:
    """`--caption_model` -> what from_pretrained takes: a hub id, a local folder, or the tiny VLM's folder."""
    if model == "tiny":
        from .tiny_vlm import tiny_vlm_path

        return tiny_vlm_path()
    if Path(model).exists() and not (Path(model) / "config.json").is_file():
        raise CaptioningError(
            f"--caption_model {model} is a folder without config.json; pass a folder saved with save_pretrained, "
            f"a hub id (default {DEFAULT_MODEL}) or tiny."
        )
    return model


def load_vlm(model: str, device, dtype):
    """AutoProcessor + AutoModelForImageTextToText from `model`, or a CaptioningError that says how to fix it."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = resolve_model(model)
    try:
        processor = AutoProcessor.from_pretrained(path)
        # Loaded straight onto the device: a 9 GB model need not pass through CPU memory.
        vlm = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, device_map=str(device))
    except Exception as error:
        raise CaptioningError(_why_not_loaded(model, error)) from error
    if getattr(processor, "chat_template", None) is None:
        raise CaptioningError(
            f"--caption_model {model} has no chat template, so it cannot take --caption_prompt; use an "
            f"instruction-following VLM such as {DEFAULT_MODEL}."
        )
    # Batched generation appends new tokens on the right, so prompts of different lengths are padded on the left.
    processor.tokenizer.padding_side = "left"
    return processor, vlm.eval()


def _why_not_loaded(model: str, error: Exception) -> str:
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    from .hub_errors import find_in_chain, refused_by_hub

    head = f"cannot load the VLM --caption_model {model}"
    if find_in_chain(error, refused_by_hub) is not None:
        return (f"{head}: the Hugging Face Hub refused it (gated or private). Accept its terms at "
                f"https://huggingface.co/{model} with your account, run `hf auth login` or set HF_TOKEN, and re-run.")
    if find_in_chain(error, lambda e: isinstance(e, RepositoryNotFoundError)) is not None:
        return (f"{head}: no such repo on the Hub (or your token cannot see it). Check the id, or pass a local "
                f"folder, tiny, or the default {DEFAULT_MODEL}.")
    missing = find_in_chain(error, lambda e: isinstance(e, ImportError))
    if missing is not None:
        return f"{head}: it needs a package that is not installed ({missing}). pip install it and re-run."
    if find_in_chain(error, lambda e: isinstance(e, LocalEntryNotFoundError)) is not None or (
            "offline" in str(error).lower() or "couldn't connect" in str(error).lower()):
        return (f"{head}: it is not in the local Hugging Face cache and the Hub cannot be reached (offline or "
                f"HF_HUB_OFFLINE=1). Download it first with `hf download {model}`, or pass a local folder.")
    if isinstance(error, (ValueError, KeyError)):
        return (f"{head}: transformers cannot build it as an image-text-to-text model ({error}). Use a VLM that "
                f"AutoModelForImageTextToText supports, e.g. {DEFAULT_MODEL}.")
    return f"{head}: {type(error).__name__}: {error}"


def generate(processor, vlm, images: list, prompt: str, tokens: int) -> list[str]:
    """The VLM's raw answers for `images` (PIL), greedy, one prompt for all."""
    import torch

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[text] * len(images), images=images, padding=True, return_tensors="pt")
    inputs = inputs.to(vlm.device, dtype=vlm.dtype)  # casts only the float tensors (pixels)
    with torch.inference_mode():
        output = vlm.generate(**inputs, max_new_tokens=tokens, do_sample=False)
    return processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


# ----------------------------------------------------------------------------------------------------------------
# The whole dataset


@dataclasses.dataclass
class Report:
    captioned: list[str] = dataclasses.field(default_factory=list)  # by the VLM in this run
    resumed: list[str] = dataclasses.field(default_factory=list)  # answers found in the side file
    kept: list[str] = dataclasses.field(default_factory=list)  # existing captions, not overwritten
    failed: dict[str, str] = dataclasses.field(default_factory=dict)  # file_name -> why

    def summary(self, dataset_dir: str | Path, model: str) -> str:
        dataset_dir = Path(dataset_dir)
        lines = [f"Captioned {len(self.captioned)} images with {model}"
                 + (f", reused {len(self.resumed)} answers from an earlier run" if self.resumed else "")
                 + (f", kept {len(self.kept)} existing captions (--overwrite_captions replaces them)"
                    if self.kept else "") + "."]
        if self.captioned or self.resumed:
            lines.append(f"Wrote the captions to {dataset_dir / METADATA_FILE} and the VLM's raw answers to "
                         f"{dataset_dir / RAW_FILE}.")
        if self.failed:
            lines.append(f"{len(self.failed)} images failed and were left uncaptioned (a rerun retries them):")
            lines += [f"  {name}: {why}" for name, why in sorted(self.failed.items())]
        return "\n".join(lines)


def caption_dataset(dataset_dir: str | Path, *, model: str, prompt: str, prefix: str, max_words: int,
                    overwrite: bool, batch_size: int, device, dtype) -> Report:
    """Caption the imagefolder `dataset_dir` in place; see the module docstring for resume and atomicity."""
    from tqdm.auto import tqdm

    dataset_dir = Path(dataset_dir)
    rows = read_metadata(dataset_dir)
    report = Report()
    pending = []
    for row in rows:
        if row.get(fmt.TEXT_COLUMN) and not overwrite:
            report.kept.append(row["file_name"])
        else:
            pending.append(row["file_name"])
    tokens = max_new_tokens(max_words)
    raw = RawAnswers(dataset_dir / RAW_FILE, Settings(model, prompt, tokens))
    report.resumed = [name for name in pending if name in raw.answers]
    todo = [name for name in pending if name not in raw.answers]

    if todo:
        logger.info("Loading the VLM %s (%s, %s)", model, device, str(dtype).removeprefix("torch."))
        processor, vlm = load_vlm(model, device, dtype)
        with tqdm(total=len(todo), unit="image", desc="Captioning") as bar:
            for start in range(0, len(todo), batch_size):
                batch = todo[start:start + batch_size]
                answers = _caption_batch(processor, vlm, dataset_dir, batch, prompt, tokens, report.failed)
                raw.append(answers, {name: compose_caption(prefix, a, max_words) for name, a in answers.items()})
                report.captioned += list(answers)
                bar.update(len(batch))

    changed = False
    for row in rows:
        name = row["file_name"]
        if name in raw.answers and name not in report.kept:
            caption = compose_caption(prefix, raw.answers[name], max_words)
            changed |= row.get(fmt.TEXT_COLUMN) != caption
            row[fmt.TEXT_COLUMN] = caption
    if changed:
        write_metadata(dataset_dir, rows)
    return report


def _caption_batch(processor, vlm, dataset_dir: Path, names: list[str], prompt: str, tokens: int,
                   failed: dict[str, str]) -> dict[str, str]:
    """Raw answers for the images of `names` that the VLM could caption; the others go into `failed`."""
    import torch
    from PIL import Image

    images = {}
    for name in names:
        try:
            with Image.open(dataset_dir / name) as image:
                images[name] = image.convert("RGB")
        except Exception as error:  # a bad file must not stop the run
            failed[name] = f"cannot read the image ({error})"
    try:
        answers = generate(processor, vlm, list(images.values()), prompt, tokens) if images else []
        pairs = zip(images, answers)
    except Exception:
        # One image can break a whole batch (or the batch not fit in memory): caption them one by one to find it.
        pairs = []
        for name, image in images.items():
            try:
                pairs.append((name, generate(processor, vlm, [image], prompt, tokens)[0]))
            except torch.OutOfMemoryError:
                raise  # not this image's fault: one at a time does not fit, so no image will (caption_dataset.py)
            except Exception as error:
                failed[name] = f"the VLM failed on it ({type(error).__name__}: {error})"
    result = {}
    for name, answer in pairs:
        if answer.strip():
            result[name] = answer
        else:
            failed[name] = "the VLM gave an empty answer"
    return result
