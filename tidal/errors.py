"""Errors every layer may raise: a leaf module, so that models and the loader report bad input
without importing the engine (`tidal.engine.messages` re-exports them)."""

from __future__ import annotations


class EngineError(RuntimeError):
    """A control operation or request failed inside the engine; the message says why."""


class EngineInvalidInput(EngineError, ValueError):
    """The caller's input can never be served as given (a 400 over HTTP): `field` names what was
    wrong, `value` what was sent, `expected` what would have been accepted."""

    def __init__(self, field: str, value: object, expected: str, message: str | None = None) -> None:
        self.field = field
        self.value = value
        self.expected = expected
        super().__init__(message or f"{field}={value!r} is invalid: expected {expected}")


class EngineNotServing(EngineError):
    """The engine rejects new requests while paused (reject_while_paused=True)."""


class EngineDead(EngineError):
    """The engine core loop has stopped; nothing more will be served."""
