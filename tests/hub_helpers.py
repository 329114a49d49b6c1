"""What the tests of Hub refusals share: a loader that fails the way transformers does on a gated repository."""

from __future__ import annotations

import types


def refuse_as_gated(*args, **kwargs):
    """Stands in for a `from_pretrained`: the Hub's 401 for a gated repo, wrapped in the OSError transformers raises."""
    from huggingface_hub.errors import GatedRepoError

    response = types.SimpleNamespace(status_code=401, headers={}, request=None)
    try:
        raise GatedRepoError("401 Client Error: access to model is restricted", response=response)
    except GatedRepoError as error:  # what transformers does with it
        raise OSError("You are trying to access a gated repo.") from error
