"""Turn the Hub's refusals into errors that say what to do (NVIDIA's repos are gated behind a licence)."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def explain_hub_errors(repo: str):
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        yield
    except GatedRepoError as error:
        raise PermissionError(
            f"{repo} is gated: accept the NVIDIA Open Model License on https://huggingface.co/{repo} with your "
            "account, then log in here with `hf auth login` (or set HF_TOKEN)."
        ) from error
    except RepositoryNotFoundError as error:
        raise FileNotFoundError(
            f"{repo} was not found on the Hub (or your token cannot see it). Check the id, or pass a local "
            "pipeline folder / --model 2B, 14B or tiny."
        ) from error
