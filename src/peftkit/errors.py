"""peftkit's error types: every failure a user can fix raises one of these, with a message saying how."""


class PeftkitError(Exception):
    """Base class for errors caused by user input (a config, a file, a model) rather than a bug."""


class ConfigError(PeftkitError, ValueError):
    """A configuration value is unknown, of the wrong type, or cannot work."""


class ModelLoadError(PeftkitError):
    """A base model or tokenizer could not be found or loaded."""


class AdapterLoadError(PeftkitError):
    """An adapter file is missing, corrupt, or does not fit the base model."""


class ExportError(PeftkitError):
    """An export cannot be written as asked (an architecture, tokenizer or template the target format lacks)."""


class TrainingInterrupted(PeftkitError):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint; `checkpoint` resumes it."""

    def __init__(self, message: str, checkpoint: str) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint
