"""Errors a user can act on. Each message is one line naming the file, row or field."""


class BackorderError(Exception):
    """Base class: the CLI prints the message on one line and exits non-zero."""

    exit_code = 1


class InputFileError(BackorderError):
    """A whole input file is unusable (missing, empty, unreadable, wrong shape)."""

    exit_code = 2


class ConfigError(BackorderError):
    """A setting or config file is invalid."""

    exit_code = 2


class ModelNotFoundError(BackorderError):
    """The requested model version or alias does not exist in the registry."""

    exit_code = 3


class ArtifactIntegrityError(ModelNotFoundError):
    """A registered model's file is not the one recorded at registration (its SHA-256 differs,
    or it is missing): the version is refused, never loaded."""


class OutputError(BackorderError):
    """An output cannot be written (store unreachable, permission denied, ...)."""

    exit_code = 4


class StateStoreError(BackorderError):
    """The product's state store (API keys, sessions) is unreachable, invalid or at a schema
    revision this version does not know. The message names the store without its password."""

    exit_code = 4


class ApiKeyError(BackorderError):
    """An API key cannot be made as asked: a bad name, role or token, or a name already taken."""

    exit_code = 2


class KeyExistsError(ApiKeyError):
    """An active API key already has the given name (names are unique among active keys)."""


class UnknownKeyError(ApiKeyError):
    """No active API key has the given name."""

    exit_code = 3


def first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
