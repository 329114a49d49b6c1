"""How much a fine-tune learned its subject, how well it follows prompts, how far it drifted: DreamBooth's metrics.

DreamBooth (Ruiz et al. 2022, section 4.1) measures
- DINO: subject fidelity, the mean cosine similarity of the ViT-S/16 DINO CLS embeddings of generated and real
  subject images, over all (generated, real) pairs;
- CLIP-I: the same with CLIP image embeddings;
- CLIP-T: prompt fidelity, the mean cosine similarity of the CLIP text embedding of the prompt and the CLIP image
  embedding of the image made from it.
CLIP-T here is that plain cosine, in [-1, 1], so it compares with the paper's 0.305. torchmetrics' CLIPScore is
100 * max(cos, 0) (Hessel et al.'s CLIPScore, without their w = 2.5), a rescaled and clipped form of the same
number; we compute the cosine with transformers' CLIPModel directly, which is what torchmetrics wraps, and avoid
a second library that would fetch its own copy of the weights.

Prior drift is ours (DreamBooth measures its prior preservation in another way, PRES): for a prompt without the
subject, one minus the similarity (DINO or CLIP-I) of a candidate's image to the base model's image from the same
prompt and seed. 0: the candidate makes the base model's image; a model that paints its subject into every scene
scores high.

The metric models are ordinary hub ids loaded with `from_pretrained`; `tiny` builds tiny random ones locally
(cached once, then loaded through the same code), so everything runs on a CPU without a download.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from pathlib import Path

import torch

DINO_MODEL = "facebook/dino-vits16"
CLIP_MODEL = "openai/clip-vit-large-patch14"
TINY = "tiny"
BATCH_SIZE = 16  # images per metric-model forward
# DreamBooth's Table 1 (real images against each other; DreamBooth on Stable Diffusion / on Imagen).
DREAMBOOTH_REFERENCE = {
    "real images against each other": {"dino": 0.774, "clip_i": 0.885, "clip_t": None},
    "DreamBooth on Stable Diffusion": {"dino": 0.668, "clip_i": 0.803, "clip_t": 0.305},
    "DreamBooth on Imagen": {"dino": 0.696, "clip_i": 0.812, "clip_t": 0.306},
}


# ----------------------------------------------------------------------------------------------------------------
# The tiny metric models


def tiny_metrics_dir() -> Path:
    """Beside the tiny pipeline (tiny_pipeline.default_tiny_dir), so a test session's tiny models stay in its folder."""
    from .tiny_pipeline import default_tiny_dir

    return default_tiny_dir().parent / "tiny-metrics"


def resolve_metric_model(model_id: str, kind: str) -> str:
    """A hub id or folder as given; `tiny` -> the tiny `kind` ("dino" or "clip") folder, built on first use."""
    if model_id != TINY:
        return model_id
    path = tiny_metrics_dir() / kind
    if not (path / "config.json").is_file():
        _save_aside(path, _build_tiny_dino if kind == "dino" else _build_tiny_clip)
    return str(path)


def default_metric_models(model, dino_model: str | None = None, clip_model: str | None = None) -> tuple[str, str]:
    """(DINO, CLIP) ids for evaluating `--model`: the ones given, else the tiny ones for the tiny model (random
    weights, nothing to download) and DreamBooth's for any other."""
    from .models import as_model

    tiny = as_model(model).is_tiny
    return dino_model or (TINY if tiny else DINO_MODEL), clip_model or (TINY if tiny else CLIP_MODEL)


def _save_aside(path: Path, build) -> None:
    """Build into a temporary sibling and rename into place (another process may have finished first)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        build(staging)
        if not path.exists():
            os.replace(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


TINY_DINO_SHAPE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       image_size=32, patch_size=8)
TINY_CLIP_SHAPE = dict(
    text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
    vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       image_size=32, patch_size=8),
    projection_dim=16,
)


def _build_tiny_dino(folder: Path) -> None:
    build_random_dino(folder, TINY_DINO_SHAPE)


def _build_tiny_clip(folder: Path) -> None:
    build_random_clip(folder, TINY_CLIP_SHAPE)


def build_random_dino(folder: Path, shape: dict) -> None:
    """A ViT of `shape` (ViTConfig fields) with seeded random weights and its image processor, saved to `folder`:
    the tiny DINO, or a full-size stand-in for GPU benchmarks."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    ViTModel(ViTConfig(**shape), add_pooling_layer=False).save_pretrained(folder)
    side = shape["image_size"]
    ViTImageProcessor(size={"height": side, "width": side}).save_pretrained(folder)


def build_tiny_clip_tokenizer():
    """CLIP's tokenizer (byte-level BPE, `</w>` word ends, lower case) with a vocabulary of single bytes and no
    merges: every string tokenizes, nothing is downloaded."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = ["<|startoftext|>", "<|endoftext|>"] + alphabet + [c + "</w>" for c in alphabet]
    vocab = {token: index for index, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def build_random_clip(folder: Path, shape: dict) -> None:
    """A CLIP of `shape` (CLIPConfig's text/vision sizes and projection_dim) with seeded random weights, the tiny
    CLIP tokenizer and an image processor, saved to `folder`."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    tokenizer = build_tiny_clip_tokenizer()
    torch.manual_seed(0)
    text = dict(shape["text_config"], vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=0,
                eos_token_id=1, pad_token_id=1)
    config = CLIPConfig(text_config=text, vision_config=shape["vision_config"], projection_dim=shape["projection_dim"])
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    side = shape["vision_config"]["image_size"]
    CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side}).save_pretrained(folder)


# ----------------------------------------------------------------------------------------------------------------
# Embeddings


def _batches(items: list, size: int = BATCH_SIZE):
    for start in range(0, len(items), size):
        yield items[start:start + size]


class DinoEmbedder:
    """ViT CLS-token embeddings (DINO's image representation: the last layer's normed CLS token)."""

    def __init__(self, model_id: str = DINO_MODEL, device="cpu"):
        from transformers import AutoImageProcessor, ViTModel

        from .hub_errors import explain_hub_errors

        path = resolve_metric_model(model_id, "dino")
        with explain_hub_errors(path):
            self.processor = AutoImageProcessor.from_pretrained(path)
            # The pooler is not part of DINO (and not in its checkpoint).
            self.model = ViTModel.from_pretrained(path, add_pooling_layer=False).eval().to(device)
        self.model_id = model_id

    def to(self, device):
        self.model.to(device)
        return self

    @torch.no_grad()
    def images(self, images: list) -> torch.Tensor:
        """[N, D] float32 embeddings of PIL images, on the CPU."""
        device = self.model.device
        out = []
        for batch in _batches(images):
            pixels = self.processor(images=[im.convert("RGB") for im in batch], return_tensors="pt").pixel_values
            out.append(self.model(pixel_values=pixels.to(device, self.model.dtype)).last_hidden_state[:, 0].float())
        return torch.cat(out).cpu()


class ClipEmbedder:
    """CLIP's projected image and text embeddings (the ones its contrastive loss compares)."""

    def __init__(self, model_id: str = CLIP_MODEL, device="cpu"):
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        from .hub_errors import explain_hub_errors

        path = resolve_metric_model(model_id, "clip")
        with explain_hub_errors(path):
            self.processor = AutoImageProcessor.from_pretrained(path)
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = CLIPModel.from_pretrained(path).eval().to(device)
        self.model_id = model_id

    def to(self, device):
        self.model.to(device)
        return self

    @torch.no_grad()
    def images(self, images: list) -> torch.Tensor:
        device = self.model.device
        out = []
        for batch in _batches(images):
            pixels = self.processor(images=[im.convert("RGB") for im in batch], return_tensors="pt").pixel_values
            out.append(self.model.get_image_features(pixel_values=pixels.to(device, self.model.dtype))
                       .pooler_output.float())
        return torch.cat(out).cpu()

    @torch.no_grad()
    def texts(self, texts: list[str]) -> torch.Tensor:
        device = self.model.device
        out = []
        for batch in _batches(texts):
            # CLIP reads 77 tokens; a longer prompt is cut as CLIP's own tokenizer would cut it.
            tokens = self.tokenizer(batch, padding=True, truncation=True, return_tensors="pt").to(device)
            out.append(self.model.get_text_features(**tokens).pooler_output.float())
        return torch.cat(out).cpu()


# ----------------------------------------------------------------------------------------------------------------
# The metrics


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[len(a), len(b)] cosine similarities of two sets of embeddings."""
    a = torch.nn.functional.normalize(a.double(), dim=-1)
    b = torch.nn.functional.normalize(b.double(), dim=-1)
    return a @ b.T


def mean_pairwise_similarity(generated: torch.Tensor, reference: torch.Tensor) -> float:
    """DINO / CLIP-I: the mean cosine over every (generated, reference) pair."""
    return cosine_matrix(generated, reference).mean().item()


def paired_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The cosine of a[i] and b[i] for each i (CLIP-T: image i and its prompt; drift: the same prompt and seed)."""
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


def clip_t(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> float:
    """DreamBooth's CLIP-T: the mean cosine of each image's CLIP embedding and its own prompt's."""
    return paired_similarity(image_embeddings, text_embeddings).mean().item()


def drift(candidate: torch.Tensor, base: torch.Tensor) -> float:
    """1 - the mean similarity of each candidate image to the base model's image of the same prompt and seed."""
    return 1.0 - paired_similarity(candidate, base).mean().item()


@dataclasses.dataclass
class MetricModels:
    """DINO and CLIP, loaded once, moved between devices as a pair."""

    dino: DinoEmbedder
    clip: ClipEmbedder

    @classmethod
    def load(cls, dino_model: str = DINO_MODEL, clip_model: str = CLIP_MODEL, device="cpu") -> "MetricModels":
        return cls(DinoEmbedder(dino_model, device), ClipEmbedder(clip_model, device))

    def to(self, device) -> "MetricModels":
        self.dino.to(device)
        self.clip.to(device)
        return self

    def embed(self, images: list) -> dict[str, torch.Tensor]:
        """{"dino": [N, D], "clip_i": [N, D']} for PIL images."""
        return {"dino": self.dino.images(images), "clip_i": self.clip.images(images)}


def subject_metrics(models: MetricModels, images: list, prompts: list[str],
                    reference: dict[str, torch.Tensor]) -> dict[str, float]:
    """DINO and CLIP-I of `images` against the reference embeddings (`MetricModels.embed` of the real subject
    images), and CLIP-T of each image with its prompt."""
    embedded = models.embed(images)
    return {
        "dino": mean_pairwise_similarity(embedded["dino"], reference["dino"]),
        "clip_i": mean_pairwise_similarity(embedded["clip_i"], reference["clip_i"]),
        "clip_t": clip_t(embedded["clip_i"], models.clip.texts(prompts)),
    }
