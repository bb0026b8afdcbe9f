"""The one exception type users see for bad input: shape, dtype, device, stride, config key or
file problems. The CLI prints it as one line and exits non-zero, without a traceback."""


class TritonGPTError(ValueError):
    """Bad input to tritongpt, raised before any kernel launch or file write."""


def require(ok: bool, message: str) -> None:
    """Raise TritonGPTError(message) unless ok."""
    if not ok:
        raise TritonGPTError(message)
