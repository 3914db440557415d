"""The libraries' own per-load progress bars and notices off: our progress is what a user reads."""

from __future__ import annotations


def quiet_libraries() -> None:
    """Our own progress bars only: the libraries' per-load bars and cast warnings are noise here."""
    import diffusers
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
