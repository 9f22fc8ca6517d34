"""User-facing errors. Each carries the offending value and the fix; the CLI prints them in one line."""


class KvchatError(Exception):
    """Base of every error a user can cause and fix."""


class ProfileError(KvchatError):
    """A profile YAML (or a method parameter in it) is invalid."""


class ModelError(KvchatError):
    """A model cannot be found or loaded."""


class UnsupportedModel(ModelError):
    """The model's architecture is not one the generation loop runs."""


class PromptTooLong(KvchatError):
    """A prompt exceeds the model's context window."""
