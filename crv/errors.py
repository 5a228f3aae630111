"""The errors a user causes and can fix (bad input, missing files, unusable models or sets): the CLI prints
them as one line naming the fix; anything else is a bug and keeps its traceback."""

from __future__ import annotations


def _user_errors() -> tuple[type[BaseException], ...]:
    from crv.lm.families import UnsupportedModelError
    from crv.lm.load import ModelLoadError
    from crv.tasks.schema import RecordError
    from crv.transcoders.formats import TranscoderFormatError
    from crv.transcoders.io import TranscoderLoadError
    from crv.transcoders.safetensors_file import SafetensorsError

    import httpx

    return (RecordError, ModelLoadError, UnsupportedModelError, TranscoderFormatError, TranscoderLoadError,
            SafetensorsError, FileNotFoundError, ValueError, ConnectionError, httpx.TransportError)


USER_ERRORS = _user_errors()
