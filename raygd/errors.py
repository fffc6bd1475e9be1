"""The errors raygd raises for its users' input, at the bottom of the import graph (it imports nothing), so that
every layer can raise them: ``raygd.config`` re-exports both, and the CLI turns each into exit code 2."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value is invalid; the message names the field and what is allowed."""


class ResumeError(RuntimeError):
    """A run or sweep cannot continue from its saved state; the message says what is kept and what to do."""
