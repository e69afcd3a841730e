"""User-facing errors: printed as one paragraph by the CLI, never as a traceback."""


class UserError(Exception):
    """A problem with the user's input (config, files, data, resume state)."""


class ConfigError(UserError):
    def __init__(self, key: str, problem: str, accepted: str | None = None):
        self.key = key
        message = f"config key '{key}': {problem}"
        if accepted:
            message += f" Accepted: {accepted}."
        super().__init__(message)


class DataError(UserError):
    pass
