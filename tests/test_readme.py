"""Every README snippet works: each ```python block runs on the tiny model, and each shell command is accepted by its
script's argument parser (flags exist, values have the right types).

The python blocks are run as written, in a folder holding tiny stand-ins at the very paths they name (a full
fine-tune at checkpoints/posttraining/text2image/2b_robot, a LoRA run at .../2b_lora_robot, iteration 1000), with
these documented substitutions (SUBSTITUTIONS below; each must still occur in the README, so an edit of a snippet
cannot silently skip one):
- NVIDIA's hub id -> the tiny pipeline folder (nothing is downloaded);
- bfloat16 -> float32, NVIDIA's 768x1360 -> the tiny model's 48x96, 35 steps -> 2 (CPU seconds);
- NVIDIA's guardrail (cosmos_guardrail, Llama-Guard-3-8B) -> a pass-through, as for the tiny model everywhere.
Shell commands: python/accelerate lines of the indented blocks, continuation lines joined; commands with `...`
placeholders are left out.
"""

import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import parsers_of
from infer_helpers import PROMPT, make_full_checkpoint, make_lora_checkpoint
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
SUBSTITUTIONS = {
    "torch.bfloat16": "torch.float32",
    "height=768, width=1360": "height=48, width=96",
    "num_inference_steps=35": "num_inference_steps=2",
}
HUB_ID = "nvidia/Cosmos-Predict2-2B-Text2Image"
RUNS = "checkpoints/posttraining/text2image"


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README, flags=re.S | re.M)


def shell_commands() -> list[str]:
    """`python X.py ...` and `accelerate launch ... X.py ...` lines of the README's indented blocks."""
    joined = re.sub(r"\\\n\s*", " ", README)
    commands = []
    for line in joined.splitlines():
        if not line.startswith("    "):
            continue
        command = line.split("  #")[0].strip()
        if command.startswith(("python ", "accelerate launch ")) and "..." not in command:
            commands.append(command)
    return commands


def test_readme_has_snippets():
    assert python_blocks() and len(shell_commands()) > 20
    for original in [*SUBSTITUTIONS, HUB_ID]:
        assert any(original in block for block in python_blocks()), f"{original!r} is no longer in the README"


def test_python_blocks_run_on_the_tiny_model(tiny_model_dir, tmp_path, monkeypatch):
    from diffusers.pipelines.cosmos import pipeline_cosmos2_text2image

    import infer_text2image as infer
    from cosmos_t2i.pipeline import NoGuardrail

    make_full_checkpoint(tmp_path / RUNS / "2b_robot", iteration=1000)
    make_lora_checkpoint(tmp_path / RUNS / "2b_lora_robot", iteration=1000)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(pipeline_cosmos2_text2image, "CosmosSafetyChecker", NoGuardrail, raising=False)
    for block in python_blocks():
        code = block.replace(HUB_ID, str(tiny_model_dir))
        for original, tiny in SUBSTITUTIONS.items():
            code = code.replace(original, tiny)
        namespace = {}
        exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the README's own code

    # The LoRA block's image is the one the README says infer_text2image.py makes.
    assert namespace["pipe"].transformer.peft_config, "the LoRA was not loaded"
    infer.main(infer.parse_args(["--model", "tiny", "--lora", f"{RUNS}/2b_lora_robot/checkpoints/iter_000001000",
                                 "--seed", "0", "--no_batched_cfg", "--stock_vae", "--num_steps", "2", "--dtype",
                                 "float32", "--prompt", PROMPT, "--save_path", "infer.png"]))
    assert np.array_equal(np.asarray(namespace["image"]), np.asarray(Image.open("infer.png")))


@pytest.mark.parametrize("command", shell_commands())
def test_shell_commands_parse(command):
    words = shlex.split(command)
    script = next(w for w in words if w.endswith(".py"))
    argv = words[words.index(script) + 1:]
    parser = parsers_of(Path(script).stem)[0]
    try:
        parser.parse_args(argv)
    except SystemExit as exit_:
        assert exit_.code == 0, f"{script} refuses: {command}"
