"""Ray token authentication for the Jobs API: find the token the way Ray's CLI does.

Ray 2.60 clusters started by `ray.init()`, by `ray start` with a token present, or by
KubeRay with `authOptions.mode: token` answer 401 (no token) or 403 (wrong token)
to the dashboard REST API. The token is sent as `Authorization: Bearer <token>`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
DEFAULT_TOKEN_PATH = Path("~/.ray/auth_token")

# Named in error messages, so users know every place the token may come from.
TOKEN_SOURCES = f"${TOKEN_ENV}, the file named by ${TOKEN_PATH_ENV}, or {DEFAULT_TOKEN_PATH}"


class TokenError(ValueError):
    """A token location was named but holds no token."""


@dataclass(frozen=True)
class AuthToken:
    value: str
    source: str  # where it came from, for error messages ("$RAY_AUTH_TOKEN", a file path)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.value}"}


def find_token(environ: dict[str, str] | None = None) -> AuthToken | None:
    """The token from $RAY_AUTH_TOKEN, else $RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token; None if none."""
    environ = os.environ if environ is None else environ
    if environ.get(TOKEN_ENV, "").strip():
        return AuthToken(environ[TOKEN_ENV].strip(), f"${TOKEN_ENV}")
    if environ.get(TOKEN_PATH_ENV):
        path = Path(environ[TOKEN_PATH_ENV]).expanduser()
        if not path.is_file():
            raise TokenError(f"${TOKEN_PATH_ENV} names {path}, which is not a file")
        return _read_token_file(path)
    default = DEFAULT_TOKEN_PATH.expanduser()
    return _read_token_file(default) if default.is_file() else None


def _read_token_file(path: Path) -> AuthToken:
    value = path.read_text().strip()
    if not value:
        raise TokenError(f"the token file {path} is empty")
    return AuthToken(value, str(path))
