"""The trainer's one user-facing error."""


class LoadError(RuntimeError):
    """A model, dataset, reward or flag that cannot be used; the message is one line saying what to do."""
