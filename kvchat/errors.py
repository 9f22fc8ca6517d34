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


class TemplateError(KvchatError):
    """A chat template refused a conversation, or cannot render it safely."""


class HomeError(KvchatError):
    """KVCHAT_HOME cannot hold kvchat's files (it is a file, or not writable)."""


class MessageError(KvchatError):
    """A conversation message (a batch line's, a loaded transcript's) that is not {role, text content}."""
