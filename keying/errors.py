"""Errors raised by the key builder.

Every error a caller can cause names the offending field (as a dotted path such as
``messages[2].content``) and says how to fix it, so the service can turn it into a 4xx.
"""

from __future__ import annotations


class KeyingError(Exception):
    """Base of every error raised by ``keying``."""


class InvalidRequestError(KeyingError, ValueError):
    """Raised when a request field has the wrong type, an invalid value or a bad shape.

    ``field`` is the dotted path of the offending field; ``fix`` says what would be accepted.
    """

    def __init__(self, field: str, problem: str, fix: str) -> None:
        self.field = field
        self.problem = problem
        self.fix = fix
        super().__init__(f"{field}: {problem}; {fix}")


class RequestTooLargeError(InvalidRequestError):
    """Raised when a request exceeds a configured size or nesting limit."""


class InvalidMaterialError(KeyingError, ValueError):
    """Raised when bytes read back as key material are not material of this version."""
