"""The exceptions loraforge raises for expected failures; the CLI prints them as one line."""


class LoraforgeError(Exception):
    """Base class of every expected loraforge failure."""


class ConfigError(LoraforgeError):
    """A configuration value, option or environment variable is invalid."""


class UnresolvedReference(LoraforgeError):
    """A reference does not resolve to an artifact, file or model."""


class ArtifactNotFound(UnresolvedReference):
    """No registry artifact matches the reference."""


class FormatError(LoraforgeError):
    """A file is not in a format loraforge can read, or is damaged."""


class UnsafePickleError(FormatError):
    """A pickle contains objects other than tensors and plain containers."""


class IncompatibleBaseError(LoraforgeError):
    """An adapter does not fit the base model it is applied to."""


class IntegrityError(LoraforgeError):
    """Stored data does not match its recorded digest or size."""


class MergeError(LoraforgeError):
    """Inputs of a merge cannot be combined."""


class RecipeError(LoraforgeError):
    """A recipe file is invalid or cannot be planned."""


class TrainingError(LoraforgeError):
    """A training run cannot start or failed."""


class DatasetError(LoraforgeError):
    """A dataset folder is unusable."""


class HubError(LoraforgeError):
    """A Hugging Face Hub operation failed."""


class RewardError(LoraforgeError):
    """A reward model cannot score images."""


class PluginError(LoraforgeError):
    """A plugin is malformed, duplicated or missing."""
