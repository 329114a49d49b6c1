"""Prior preservation (DreamBooth, Ruiz et al. 2022): train on the subject and on images of its class together, so
the model keeps drawing the class ("a robot") as it did and does not turn every robot into the subject.

    --class_prompt "An image of a robot." --class_data_dir DIR --num_class_images N --prior_loss_weight 1.0

The class images (as diffusers' DreamBooth examples do):
- DIR's images count; when it holds fewer than N, the base model (the one being fine-tuned, before any training)
  samples the rest with our sampler (sampling.generate: NVIDIA's 35 steps, guidance 4, zero negative prompt) as
  `class_NNNNN.png`, image k from seed k, at the model's resolutions, spread over the instance dataset's
  aspect-ratio buckets in its proportions (each of them at least once: a batch holds one bucket, and its class
  half must come from the same one). Several processes split the missing images.
- Each image is written under a temporary name and renamed when complete (atomic.py): an interrupted generation
  leaves whole images, the next run makes only the missing ones and removes the dead run's temporary files.
- DIR becomes a dataset in our format (dataset_format.py): metadata.jsonl captions every image with the class
  prompt, and DIR/embedded/ is built by the very code of embed_captions.py (embedding.build_embedded), latents
  cached, in the instance dataset's T5 dtype. Its info records the prompt and the images it was built from, so
  a rerun or a resume reuses it and a changed folder or prompt is embedded again.

Training: every micro-step concatenates the instance batch (train_batch_size images of one bucket) with as many
class images of the same bucket, in one transformer call, and the loss is instance loss + prior_loss_weight x
class loss (each the mean over its own samples, as in diffusers' train_dreambooth). The instance half draws its
noise from the trainer's generator exactly as without prior preservation; the class half from a second stream of
(seed, global batch). The class images of a batch are a pure function of (seed, global batch): endless shuffled
epochs of each bucket's class images, the global batch g taking the slots g x B ... g x B + B - 1 of its bucket's
stream. So the data order stays deterministic on any number of processes and resumes exactly from the saved
position, with no state beyond the trainer's.
"""

from __future__ import annotations

import json
import logging
import re
import time
import zlib
from collections import Counter
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace

import torch

from . import dataset_format as fmt
from .objective import noised, per_sample_loss
from .training_data import BucketBatchSampler, EmbeddedImages, collate, derived_seed, global_batch
from .user_errors import BadValue

logger = logging.getLogger(__name__)

DEFAULT_NUM_CLASS_IMAGES = 100  # diffusers' DreamBooth default
DEFAULT_PRIOR_LOSS_WEIGHT = 1.0
# NVIDIA's inference defaults: the class images are what the base model draws for the prompt when a user runs it.
CLASS_IMAGE_STEPS, CLASS_IMAGE_GUIDANCE = 35, 4.0
GENERATED = re.compile(r"class_(\d{5,})\.png")
MANIFEST_KEY = "prior_preservation"  # in DIR/embedded/cosmos_t2i.json: what the embedded class set was built from
EMBED_BATCH_SIZE = 8
CLASS_DIR_FLAG = "--class_data_dir"
_CLASS_NOISE_STREAM = 1  # the class half's noise: SeedSequence([seed, global batch, 1]); the trainer's is [seed, batch]


# ----------------------------------------------------------------------------------------------------------------
# Flags


def add_arguments(parser) -> None:
    group = parser.add_argument_group("prior preservation (DreamBooth): keep the class as the base model draws it")
    group.add_argument("--class_prompt", default=None, help="The class without the subject, e.g. \"An image of a "
                       "robot.\": every class image is captioned with it. Turns prior preservation on; needs "
                       "--class_data_dir.")
    group.add_argument("--class_data_dir", default=None, help="Folder of class images (any you put there count). "
                       "When it holds fewer than --num_class_images, the base model generates the rest into it, "
                       "once; it becomes a dataset like --dataset_dir (metadata.jsonl, embedded/ with cached "
                       "latents), reused by reruns and resumes. Several machines: a folder all of them see.")
    group.add_argument("--num_class_images", type=int, default=None, help=f"At least this many class images "
                       f"(default {DEFAULT_NUM_CLASS_IMAGES}); all of the folder's are used.")
    group.add_argument("--prior_loss_weight", type=float, default=None, help=f"Loss = instance loss + this x class "
                       f"loss (default {DEFAULT_PRIOR_LOSS_WEIGHT}). Each micro-step trains train_batch_size "
                       "instance and as many class images: twice the samples per step.")


def check_args(args) -> None:
    """Refuse inconsistent prior-preservation flags (one `error:` line each) and fill the defaults when it is on.

    Off, the two numbers stay None: a run config without prior preservation equals one saved before it existed,
    so those runs still resume."""
    if args.class_prompt is None:
        given = [f"--{name}" for name in ("class_data_dir", "num_class_images", "prior_loss_weight")
                 if getattr(args, name) is not None]
        if given:
            raise BadValue(f"{' and '.join(given)} configure prior preservation, which --class_prompt turns on: add "
                           "--class_prompt \"An image of a <class>.\", or drop them.")
        return
    if not args.class_prompt.strip():
        raise BadValue("--class_prompt is empty: give the class without the subject, e.g. \"An image of a robot.\".")
    if args.class_data_dir is None:
        raise BadValue("--class_prompt needs --class_data_dir: the folder the class images are read from and "
                       "generated into, e.g. --class_data_dir datasets/robot_class.")
    if args.synthetic_data:
        raise BadValue("--class_prompt trains on class images beside the dataset's: drop it with --synthetic_data.")
    if args.dataset_dir and Path(args.class_data_dir).resolve() == Path(args.dataset_dir).resolve():
        raise BadValue(f"--class_data_dir {args.class_data_dir} is the --dataset_dir: the class images need a folder "
                       "of their own, e.g. --class_data_dir datasets/robot_class.")
    if Path(args.class_data_dir).exists() and not Path(args.class_data_dir).is_dir():
        raise BadValue(f"--class_data_dir {args.class_data_dir} is a file: pass a folder (it is created if missing).")
    args.num_class_images = DEFAULT_NUM_CLASS_IMAGES if args.num_class_images is None else args.num_class_images
    args.prior_loss_weight = DEFAULT_PRIOR_LOSS_WEIGHT if args.prior_loss_weight is None else args.prior_loss_weight
    if args.num_class_images < 1:
        raise BadValue(f"--num_class_images {args.num_class_images}: expected at least 1 (default "
                       f"{DEFAULT_NUM_CLASS_IMAGES}).")
    if not args.prior_loss_weight > 0:
        raise BadValue(f"--prior_loss_weight {args.prior_loss_weight}: expected a weight > 0 (default "
                       f"{DEFAULT_PRIOR_LOSS_WEIGHT}); to train without prior preservation, drop --class_prompt.")


# ----------------------------------------------------------------------------------------------------------------
# The class images


def plan_buckets(count: int, instance_buckets: list[str]) -> list[str]:
    """The bucket of each of `count` generated class images: the instance buckets in their proportions (largest
    remainder, ties by name), then each at least once where `count` allows (taken from the largest share)."""
    counts = Counter(instance_buckets)
    keys = sorted(counts)
    if count <= 0 or not keys:
        return []
    exact = {k: count * counts[k] / len(instance_buckets) for k in keys}
    share = {k: int(exact[k]) for k in keys}
    for k in sorted(keys, key=lambda k: (-(exact[k] - int(exact[k])), k))[:count - sum(share.values())]:
        share[k] += 1
    for k in keys:
        largest = max(keys, key=lambda key: (share[key], -keys.index(key)))
        if share[k] == 0 and share[largest] > 1:
            share[k], share[largest] = 1, share[largest] - 1
    return [k for k in keys for _ in range(share[k])]


def class_image_name(index: int) -> str:
    return f"class_{index:05d}.png"


def folder_images(folder: Path) -> list[Path]:
    """The class folder's images (top level, not hidden), by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                  and p.suffix.lower() in fmt.IMAGE_EXTENSIONS)


def _bucket_of(path: Path, resolutions: dict) -> str:
    from PIL import Image

    from .buckets import nearest_bucket

    with Image.open(path) as image:  # the header only
        return nearest_bucket(*image.size, resolutions)


def missing_class_images(folder: Path, num_class_images: int, instance_buckets: list[str],
                         resolutions: dict) -> list[tuple[int, str]]:
    """(index, bucket) of every generated class image the folder still lacks. The user's own images (any other
    name) count towards `num_class_images`; the buckets of the instance set must all get class images."""
    images = folder_images(folder) if folder.is_dir() else []
    own = [p for p in images if not GENERATED.fullmatch(p.name)]
    planned = plan_buckets(num_class_images - len(own), instance_buckets)
    covered = {_bucket_of(p, resolutions) for p in own} | set(planned)
    uncovered = sorted(set(instance_buckets) - covered)
    if uncovered:
        raise BadValue(
            f"The instance images have the aspect ratios {', '.join(uncovered)}, which no class image in "
            f"{folder} has or will have, and a batch's class images come from its own bucket: raise "
            f"--num_class_images to at least {len(own) + len(set(instance_buckets))}, or add class images of those "
            "aspect ratios.")
    present = {p.name for p in images}
    return [(k, bucket) for k, bucket in enumerate(planned) if class_image_name(k) not in present]


def generate_class_images(model, jobs: list[tuple[int, str]], class_prompt: str, folder: Path, device,
                          random_init: bool = False) -> None:
    """Sample `jobs` ((index, bucket)) with the base model into `folder`, each PNG renamed into place when whole.

    `random_init`: the transformer is the architecture with random weights (seeded), as the run that trains it."""
    from .atomic import atomic_output
    from .memory import free_memory
    from .models import device_and_dtype, load_base_transformer, random_transformer
    from .pipeline import load_pipeline
    from .sampling import generate

    _, dtype = device_and_dtype(None)  # bf16 on a GPU, fp32 on a CPU, as inference
    if random_init:
        torch.manual_seed(0)
        transformer = random_transformer(model.transformer_config, dtype, device)
    else:
        transformer = load_base_transformer(model, dtype)
    # Training images, like validation's: sampled without the guardrail, as NVIDIA's training samples.
    pipe = load_pipeline(model, device, dtype, transformer=transformer, disable_guardrail=True)
    pipe.set_progress_bar_config(disable=True)
    try:
        for index, bucket in jobs:
            width, height = model.resolutions[bucket]
            image = generate(pipe, class_prompt, "", height, width, CLASS_IMAGE_STEPS, CLASS_IMAGE_GUIDANCE,
                             seed=index)
            with atomic_output(folder / class_image_name(index)) as tmp:
                image.save(tmp)
    finally:
        del pipe, transformer
        free_memory(device)


def write_metadata(folder: Path, images: list[Path], class_prompt: str) -> None:
    """metadata.jsonl captioning every image with the class prompt (rewritten only when it changes)."""
    from .atomic import write_text_atomic

    text = "".join(json.dumps({"file_name": p.name, "text": class_prompt}, ensure_ascii=False) + "\n"
                   for p in images)
    path = folder / fmt.METADATA_FILE
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        write_text_atomic(path, text)


def embed_class_images(model, model_name: str, folder: Path, class_prompt: str, t5_dtype: str | None) -> None:
    """DIR/embedded/ for the class images, unless the one there was built from the same images, prompt and model."""
    from . import embedding
    from .atomic import staged_folder
    from .run_folder import require_writable

    images = folder_images(folder)
    manifest = {"class_prompt": class_prompt, "model_path": model.path,
                "images": [[p.name, p.stat().st_size] for p in images]}
    try:
        if fmt.read_info(folder).get(MANIFEST_KEY) == manifest:
            return
    except (FileNotFoundError, ValueError):
        pass
    require_writable(folder, CLASS_DIR_FLAG)
    write_metadata(folder, images, class_prompt)  # what build_embedded reads; the manifest above stands for it
    logger.info("Embedding %d class images of %s", len(images), folder)
    options = SimpleNamespace(model=model_name, batch_size=EMBED_BATCH_SIZE, cache_latents=True, dtype=t5_dtype,
                              caption_column=fmt.TEXT_COLUMN, from_nvidia_dir=None)
    with staged_folder(folder / fmt.EMBEDDED_SUBDIR, what="the class images' embedded dataset") as staging:
        info = embedding.build_embedded(options, model, folder, staging)
        embedding.write_info(staging, {**info, MANIFEST_KEY: manifest})


def _t5_dtype(instance_info: dict) -> str | None:
    """The instance set's T5 dtype, so both halves of a batch are embedded alike (None: the default)."""
    from .models import DTYPES

    dtype = instance_info.get("dtype")
    return dtype if dtype in DTYPES else None


def prepare_class_data(args, model, instance: EmbeddedImages, accelerator) -> EmbeddedImages:
    """The class images as training items: generated where missing (split over the processes), embedded once by
    the main process, read by all."""
    from .atomic import remove_stale_temp_files
    from .run_folder import require_writable

    folder = Path(args.class_data_dir)
    if accelerator.is_main_process:
        if not folder.is_dir():
            require_writable(folder, CLASS_DIR_FLAG)
        remove_stale_temp_files(folder)
    accelerator.wait_for_everyone()
    missing = missing_class_images(folder, args.num_class_images, instance.buckets, model.resolutions)
    if missing and accelerator.is_main_process:  # before the base model is loaded to sample them
        require_writable(folder, CLASS_DIR_FLAG)
    accelerator.wait_for_everyone()  # every process listed the folder before any writes to it
    if missing:
        mine = missing[accelerator.process_index::accelerator.num_processes]
        logger.info("Generating %d class images for %r into %s with the base model (%d on process %d); others "
                    "already there are reused.", len(missing), args.class_prompt, folder, len(mine),
                    accelerator.process_index)
        if mine:
            start = time.perf_counter()
            generate_class_images(model, mine, args.class_prompt, folder, accelerator.device, args.random_init)
            seconds = time.perf_counter() - start
            logger.info("Process %d generated %d class images in %.1f s (%.2f s each, loading included).",
                        accelerator.process_index, len(mine), seconds, seconds / len(mine))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        embed_class_images(model, args.model, folder, args.class_prompt, _t5_dtype(instance.info))
    accelerator.wait_for_everyone()
    classes = EmbeddedImages(folder, model.resolutions)
    if classes.embedding_dim != instance.embedding_dim:
        raise BadValue(f"{folder} holds {classes.embedding_dim}-dimensional T5 embeddings, {args.dataset_dir} "
                       f"{instance.embedding_dim}-dimensional ones: delete {folder / fmt.EMBEDDED_SUBDIR} to embed "
                       "the class images again with this model.")
    return classes


# ----------------------------------------------------------------------------------------------------------------
# Batches


class PriorBatchSampler(BucketBatchSampler):
    """BucketBatchSampler's instance batches, each followed by as many class images of its bucket. Class indices
    are offset by the number of instance images (MixedImages' layout)."""

    def __init__(self, buckets: list[str], class_buckets: list[str], batch_size: int, seed: int,
                 num_replicas: int = 1, rank: int = 0, start: int = 0):
        super().__init__(buckets, batch_size, seed, num_replicas, rank, start)
        self.buckets = buckets
        self.class_members: dict[str, list[int]] = {}
        for index, key in enumerate(class_buckets):
            self.class_members.setdefault(key, []).append(len(buckets) + index)
        lacking = sorted(set(buckets) - self.class_members.keys())
        if lacking:
            raise BadValue(f"No class image has the aspect ratio {', '.join(lacking)} of some instance images.")

    def class_batch(self, batch_index: int, bucket: str) -> list[int]:
        """The class images of global batch `batch_index` (a batch of `bucket`)."""
        members = self.class_members[bucket]
        slots = range(batch_index * self.batch_size, (batch_index + 1) * self.batch_size)
        return [members[self._order(bucket, slot // len(members))[slot % len(members)]] for slot in slots]

    @lru_cache(maxsize=64)
    def _order(self, bucket: str, epoch: int) -> list[int]:
        seed = derived_seed(self.seed, zlib.crc32(bucket.encode()), epoch, _CLASS_NOISE_STREAM)
        generator = torch.Generator().manual_seed(seed)
        return torch.randperm(len(self.class_members[bucket]), generator=generator).tolist()

    def __iter__(self):
        for position, batch in enumerate(super().__iter__(), start=self.start):
            batch_index = global_batch(position, self.num_replicas, self.rank)
            yield list(batch) + self.class_batch(batch_index, self.buckets[batch[0]])


class MixedImages(torch.utils.data.Dataset):
    """The instance items, then the class items (indices from len(instance) on)."""

    def __init__(self, instance, classes):
        self.instance, self.classes = instance, classes

    def __len__(self) -> int:
        return len(self.instance) + len(self.classes)

    def __getitem__(self, index: int) -> dict:
        n = len(self.instance)
        return self.instance[index] if index < n else self.classes[index - n]


def collate_mixed(items: list[dict]) -> dict:
    """The instance half as `collate` makes a batch, the class half (cached latents) under "class"."""
    half = len(items) // 2
    return {**collate(items[:half]), "class": collate(items[half:])}


def prior_preservation_loss(transformer, x0, text_embeds, generator, class_x0, class_embeds, class_generator,
                            weight: float, text_dropout: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """instance loss + weight x class loss over one transformer call on the concatenated batch, and the two halves
    apart (detached, for the log: the class loss rising while the instance loss falls is drift). Each half draws its
    noise from its own generator (the instance half exactly as diffusion_loss would)."""
    instance = noised(x0, text_embeds, generator, text_dropout)
    classes = noised(class_x0, class_embeds, class_generator, text_dropout)
    losses = per_sample_loss(transformer, *(torch.cat([a, b.to(a.dtype)]) for a, b in zip(instance, classes)))
    n = x0.shape[0]
    instance_loss, class_loss = losses[:n].mean(), losses[n:].mean()
    return instance_loss + weight * class_loss, {"loss_instance": instance_loss.detach(),
                                                 "loss_class": class_loss.detach()}


class PriorPreservation:
    """What the trainer holds when --class_prompt is given: the class data, its batches and its loss."""

    def __init__(self, classes: EmbeddedImages, weight: float, seed: int):
        self.classes, self.weight, self.seed = classes, weight, seed

    def dataloader(self, instance, batch_size: int, num_replicas: int, rank: int, start: int, num_workers: int):
        sampler = PriorBatchSampler(instance.buckets, self.classes.buckets, batch_size, self.seed, num_replicas, rank,
                                    start)
        return torch.utils.data.DataLoader(
            MixedImages(instance, self.classes), batch_sampler=sampler, collate_fn=collate_mixed,
            num_workers=num_workers, pin_memory=torch.cuda.is_available(), persistent_workers=num_workers > 0)

    def loss(self, transformer, batch: dict, x0, text_embeds, generator, batch_index: int, text_dropout: float):
        """The micro-step's loss and its halves ({"loss_instance", "loss_class"}, detached); `x0`, `text_embeds`,
        `generator`: the instance half's, as the trainer made them."""
        class_x0 = batch["class"]["latents"].to(x0.device, torch.float32)
        class_embeds = batch["class"]["text_embeds"].to(x0.device, text_embeds.dtype)
        class_seed = derived_seed(self.seed, batch_index, _CLASS_NOISE_STREAM)
        class_generator = torch.Generator(x0.device).manual_seed(class_seed)
        return prior_preservation_loss(transformer, x0, text_embeds, generator, class_x0, class_embeds,
                                       class_generator, self.weight, text_dropout)


def setup(args, model, instance, accelerator) -> PriorPreservation | None:
    """The run's prior preservation (None without --class_prompt), with its class images ready."""
    if args.class_prompt is None:
        return None
    classes = prepare_class_data(args, model, instance, accelerator)
    if accelerator.is_main_process:
        logger.info("Prior preservation: %d class images (%s), prior loss weight %g", len(classes),
                    ", ".join(f"{k}: {n}" for k, n in sorted(Counter(classes.buckets).items())),
                    args.prior_loss_weight)
    return PriorPreservation(classes, args.prior_loss_weight, args.seed)
