"""Every script's command line: a user's mistake ends it with one `error: ...` line and exit code 2 (also under
`accelerate launch`), with the traceback only for --debug; and --help shows every option's default."""

import argparse
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from cli_helpers import parsers_of

from cosmos_t2i import user_errors

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["train_text2image", "infer_text2image", "export_checkpoint", "evaluate_text2image", "caption_dataset",
           "prepare_dataset", "embed_captions"]


def run_script(script: str, argv: list, monkeypatch) -> None:
    """The script as `python script.py argv` runs it (its __main__ block), in this process."""
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *map(str, argv)])
    runpy.run_path(str(ROOT / f"{script}.py"), run_name="__main__")


def mistakes(tmp_path) -> dict[str, tuple[list, str]]:
    """One user's mistake per script, and what its error line must say."""
    references = tmp_path / "references"
    references.mkdir()
    from PIL import Image

    Image.new("RGB", (8, 8)).save(references / "a.png")
    missing = tmp_path / "missing"
    return {
        "train_text2image": (["--model", "3B", "--dataset_dir", missing], "Unknown model '3B'"),
        "infer_text2image": (["--model", "tiny", "--prompt", "a robot", "--lora", "runs/no/lora"],
                             "LoRA runs/no/lora does not exist"),
        "export_checkpoint": (["nvidia", "--checkpoint", missing, "--output", tmp_path / "x.pt"],
                              f"Checkpoint {missing} does not exist"),
        "evaluate_text2image": (["--model", "models/no/pipeline", "--reference_dir", references, "--subject", "robot"],
                                "Model folder models/no/pipeline does not exist"),
        "caption_dataset": (["--dataset_dir", missing, "--caption_model", "tiny"], str(missing)),
        "prepare_dataset": (["--input_dataset_dir", missing, "--output_dataset_dir", tmp_path / "out"], str(missing)),
        "embed_captions": (["--dataset_dir", missing, "--model", "tiny"], str(missing)),
    }


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_mistake_is_one_error_line_and_exit_2(script, tiny_model_dir, tmp_path, monkeypatch, capsys):
    argv, message = mistakes(tmp_path)[script]
    with pytest.raises(SystemExit) as exit_:
        run_script(script, argv, monkeypatch)
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err


@pytest.mark.parametrize("script", ["train_text2image", "infer_text2image", "export_checkpoint"])
def test_debug_keeps_the_traceback(script, tiny_model_dir, tmp_path, monkeypatch):
    argv, message = mistakes(tmp_path)[script]
    if script == "export_checkpoint":
        argv = [*argv, "--debug"]  # a subcommand's flag
    else:
        argv = ["--debug", *argv]
    with pytest.raises(user_errors.UserError, match=message):
        run_script(script, argv, monkeypatch)


def test_a_bug_keeps_its_traceback(tiny_model_dir, tmp_path, monkeypatch):
    import cosmos_t2i.checkpoint_paths as checkpoint_paths

    def broken(*args, **kwargs):
        raise ValueError("a bug, not the user's")

    monkeypatch.setattr(checkpoint_paths, "resolve_lora", broken)
    with pytest.raises(ValueError, match="a bug"):
        run_script("infer_text2image", ["--model", "tiny", "--prompt", "a robot", "--lora", "x"], monkeypatch)


def test_under_accelerate_launch_the_error_line_is_the_only_message_of_the_script(tmp_path):
    """A real `accelerate launch`: the trainer prints its one line and exits 2. accelerate's launcher then adds its
    own report of the exit status (a CalledProcessError traceback and exit code 1, or with `-q` nothing and exit 1):
    that part is accelerate's, outside the script."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               str(ROOT / "train_text2image.py"), "--model", "3B", "--dataset_dir", str(tmp_path / "missing")]
    result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: Unknown model '3B': use 2B, 14B, tiny, a local pipeline folder, or a hub id."], \
        result.stderr
    assert 'train_text2image.py", line' not in result.stderr  # no traceback of the trainer's
    assert "returned non-zero exit status 2" in result.stderr and result.returncode != 0


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_shows_every_default(script):
    parsers = parsers_of(script)
    assert "--debug" in parsers[-1].format_help()  # export_checkpoint.py: each subcommand has it
    for parser in parsers:
        for action in parser._actions:
            default = action.default
            if not action.option_strings or default is None or default is argparse.SUPPRESS or action.nargs == 0:
                continue  # positional, unset, or a switch (store_true: off unless given)
            formatter = parser._get_formatter()
            formatter.add_argument(action)
            text = " ".join(formatter.format_help().split())
            shown = " ".join(map(str, default)) or "none" if isinstance(default, list) else \
                ("''" if default == "" else str(default))
            assert any(f"default: {form}" in text.lower() for form in (shown.lower(), repr(default).lower())), \
                f"{script} {action.option_strings}: {text}"
