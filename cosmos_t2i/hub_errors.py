"""Turn the Hub's refusals into errors that say what to do (NVIDIA's repos are gated behind a licence).

transformers and diffusers re-raise huggingface_hub's GatedRepoError as an OSError (diffusers even calls a gated
repo "not a valid model identifier"), so the cause chain is searched for the original error.
"""

from __future__ import annotations

import contextlib


def find_in_chain(error: BaseException | None, match):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if match(error):
            return error
        error = error.__cause__ or error.__context__
    return None


def refused_by_hub(error: BaseException) -> bool:
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError

    if isinstance(error, GatedRepoError):
        return True
    response = getattr(error, "response", None) if isinstance(error, HfHubHTTPError) else None
    return getattr(response, "status_code", None) in (401, 403)


@contextlib.contextmanager
def explain_hub_errors(repo: str):
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        yield
    except Exception as error:
        if find_in_chain(error, refused_by_hub) is not None:
            raise PermissionError(
                f"The Hugging Face Hub refused to give {repo}: NVIDIA's Cosmos-Predict2 repos are gated. Open "
                f"https://huggingface.co/{repo}, accept the NVIDIA Open Model License with your account, then run "
                "`hf auth login` (older huggingface_hub: `huggingface-cli login`) here or set HF_TOKEN, and re-run."
            ) from error
        if find_in_chain(error, lambda e: isinstance(e, RepositoryNotFoundError)) is not None:
            raise FileNotFoundError(
                f"{repo} was not found on the Hub (or your token cannot see it). Check the id, or pass a local "
                "pipeline folder / --model 2B, 14B or tiny."
            ) from error
        raise
