"""Publishing a trained model on the Hugging Face Hub: the model card and the folder that gets uploaded."""

from __future__ import annotations

import shutil
from pathlib import Path

LICENSE_LINK = "https://www.nvidia.com/en-us/agreements/enterprise-software/nvidia-open-model-license/"


def require_token() -> None:
    """Fail before training, not after hours of it, when an upload could not happen."""
    from huggingface_hub import get_token

    if get_token() is None:
        raise PermissionError(
            "--push_to_hub needs a Hugging Face token: run `hf auth login` or set HF_TOKEN, then start again."
        )


def model_card(*, repo_id: str, base_model: str, method, instance_prompt: str | None, recipe: dict,
               images: list[tuple[str, str]]) -> str:
    """README.md for the Hub: YAML front matter, what was trained and how, samples, and how to load it.

    `method` is the training method (methods.py), which writes the loading section; `images` are (path inside the
    repo, prompt) pairs; `recipe` the values worth reporting (lr, steps, ...).
    """
    tags = ["text-to-image", "diffusers", "cosmos", "cosmos-predict2", "diffusers-training"]
    tags += ["lora"] if method.name == "lora" else []
    front = ["---", f"base_model: {base_model}", "library_name: diffusers", "license: other",
             "license_name: nvidia-open-model-license", f"license_link: {LICENSE_LINK}", "tags:"]
    front += [f"- {tag}" for tag in tags]
    if instance_prompt:
        front.append(f"instance_prompt: {_yaml_string(instance_prompt)}")
    if images:
        front.append("widget:")
        for path, prompt in images:
            front += [f"- text: {_yaml_string(prompt)}", "  output:", f"    url: {path}"]
    front.append("---")

    rows = "\n".join(f"| {key} | {value} |" for key, value in recipe.items())
    samples = "\n".join(f"![{prompt}]({path})" for path, prompt in images)
    prompt_line = f"\nTrained on images captioned `{instance_prompt}`; use that prompt.\n" if instance_prompt else ""
    load = method.card_usage(repo_id, base_model, instance_prompt or "your prompt")

    return f"""{chr(10).join(front)}

# {repo_id}

A {method.label} of [{base_model}](https://huggingface.co/{base_model}) trained with NVIDIA's Cosmos-Predict2
post-training recipe (cosmos-t2i-finetune, on diffusers).
{prompt_line}
{samples}

## Training

| setting | value |
| --- | --- |
{rows}

## Use with diffusers

{load}

The pipeline runs NVIDIA's Cosmos guardrail (`pip install cosmos_guardrail`).

## License

Derived from an NVIDIA Cosmos model and governed by the
[NVIDIA Open Model License Agreement]({LICENSE_LINK}).
"""


def _yaml_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def prepare_upload(model_dir: str | Path, folder: str | Path, card: str, images: dict[str, Path]) -> Path:
    """The folder to upload: the checkpoint's model/ (weights, EMA in ema/), README.md and the sample images
    (`images` maps the path inside the repo to the file)."""
    folder = Path(folder)
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(model_dir, folder)
    for name, source in images.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, folder / name)
    (folder / "README.md").write_text(card)
    return folder


def push(folder: str | Path, repo_id: str) -> str:
    from huggingface_hub import create_repo, upload_folder

    repo_id = create_repo(repo_id, exist_ok=True).repo_id
    upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="Upload Cosmos-Predict2 fine-tune")
    return repo_id
