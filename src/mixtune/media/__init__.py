"""Decoding media: video and audio references into what processors take."""

from mixtune.errors import DataError


def import_av(what: str, field: str):
    """PyAV, or the one-line install hint as a bad sample of `field` (it is an optional extra)."""
    try:
        import av
    except ImportError:
        raise DataError(f"decoding {what} needs PyAV: pip install 'mixtune[video]'", field=field) from None
    return av
