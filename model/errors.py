"""The one exception type users see: every message says what to change."""


class MoeforgeError(Exception):
    """An error meant for the user (bad config, bad data, corrupt checkpoint, impossible layout)."""


class ConfigError(MoeforgeError, ValueError):
    """A configuration value is invalid; the message names the key."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}")
