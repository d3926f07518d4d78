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


class Stopped(LoraforgeError):
    """Work was stopped on request (SIGTERM); what it finished or checkpointed is kept for the next run."""


class DatasetError(LoraforgeError):
    """A dataset folder is unusable."""


class HubError(LoraforgeError):
    """A Hugging Face Hub operation failed."""


class RewardError(LoraforgeError):
    """A reward model cannot score images."""


class PluginError(LoraforgeError):
    """A plugin is malformed, duplicated or missing."""


class StorageError(LoraforgeError):
    """The disk refused a write: it is full, over a file-size limit, or read-only."""


class CatalogError(LoraforgeError):
    """The registry catalog (registry.db) is missing, damaged or cannot be opened."""


def storage_error(exc: OSError, path=None) -> StorageError | None:
    """The user-facing form of a write that failed for lack of space, a size limit or a read-only disk."""
    import errno

    where = exc.filename or (f"a file in {path}" if path else "a file")
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageError(f"no space left on the device writing {where}: free some space (or point "
                            "LORAFORGE_HOME at a larger disk) and retry")
    if exc.errno == errno.EFBIG:
        return StorageError(f"the file size limit (ulimit -f) stopped a write to {where}: raise the limit "
                            "(ulimit -f unlimited) and retry")
    if exc.errno == errno.EROFS:
        return StorageError(f"{where} is on a read-only filesystem: set LORAFORGE_HOME (or --home) to a "
                            "writable folder")
    return None
