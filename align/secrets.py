"""Keeping secrets out of everything align writes or shows: saved recipes, logs, model cards,
error messages. Tokens come from the environment (`HF_TOKEN`) or the HF login, never from files."""

from __future__ import annotations

import re

# Keys whose values are secrets, wherever they appear in a recipe.
SECRET_KEYS = {"hub_token", "token", "hf_token", "api_key", "password"}
# A Hub access token: `hf_` and 20 or more letters/digits (real ones have 34).
_TOKEN_RE = re.compile(r"hf_[A-Za-z0-9]{20,}")


def redact_secrets(text: str) -> str:
    """`text` with every Hub-token-shaped run replaced by `hf_***`, also inside a longer value
    (`run_name: deploy-hf_...`). The replacement stays a plain YAML scalar."""
    return _TOKEN_RE.sub("hf_***", text)


def scrub(obj):
    """A copy of a recipe (nested dicts and lists) with secret keys blanked and tokens redacted."""
    if isinstance(obj, dict):
        return {k: ("***" if k in SECRET_KEYS and obj[k] else scrub(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [scrub(v) for v in obj]
    if isinstance(obj, str):
        return redact_secrets(obj)
    return obj
