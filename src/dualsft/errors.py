"""Typed, actionable errors. Each says what failed, the offending value, and what to do."""

from __future__ import annotations


class DualSFTError(Exception):
    """Base class of every error dualsft raises on purpose."""


class DataFormatError(DualSFTError, ValueError):
    """A data file cannot be read or an example does not fit a known schema."""


class EmptyResponseError(DataFormatError):
    """Examples that carry no response token after formatting and truncation.

    Attributes:
        indices: stable example indices (position in the source file) that have no loss tokens.
    """

    def __init__(self, message: str, indices: list[int]):
        super().__init__(message)
        self.indices = indices


class ModelLoadError(DualSFTError, RuntimeError):
    """A model cannot be loaded (missing wheel, not a causal LM, unreadable folder)."""


class MetadataMismatchError(DualSFTError, ValueError):
    """A run folder or artifact was produced under different settings.

    Attributes:
        field: dotted name of the first differing metadata field.
    """

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


class BudgetError(DualSFTError, ValueError):
    """A data or parameter budget (or quota) is out of range."""


class SelectionError(DualSFTError, ValueError):
    """A selection request cannot be satisfied (regex matching nothing, unknown parameter, ...)."""


class NonFiniteLossError(DualSFTError, FloatingPointError):
    """A loss or gradient became NaN/inf.

    Attributes:
        indices: stable example indices of the offending examples.
    """

    def __init__(self, message: str, indices: list[int]):
        super().__init__(message)
        self.indices = indices


class ArtifactError(DualSFTError, ValueError):
    """A required artifact is missing, unreadable or does not match what it is applied to."""


class ConfigError(DualSFTError, ValueError):
    """An option has a value that cannot be used."""


class ExportError(DualSFTError, ValueError):
    """A trained result cannot be expressed in the requested export format.

    Attributes:
        tensors: {parameter name: why the format cannot hold it}.
    """

    def __init__(self, message: str, tensors: dict[str, str] | None = None):
        super().__init__(message)
        self.tensors = dict(tensors or {})
