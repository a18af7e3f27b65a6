"""The bplane codec framed as a ``tier.codecs.Codec``, registered for the tests until ``tier/codecs.py`` registers it.

``BplaneCodec`` is the class ``tier/codecs.py`` is to hold (its owner adds it to ``_CODECS``; see tier/bplane.py):
the body functions are ``tier.bplane``'s, the header, checks and lookup are the codecs module's own. While that has
not happened, ``bplane_registered()`` adds it to the codec tables for the duration of a test, so the tests parse
real headers with ``peek_header`` and encode with ``encode_page``; once it has, it changes nothing.
"""

from __future__ import annotations

import contextlib

from kvdrive_sglang.tier import bplane, codecs


class BplaneCodec(codecs.Codec):
    """Byte planes of a bf16 / fp16 page, high bytes coded per 4 KiB block for a GPU decode (tier/bplane.py)."""

    name, code, lossless = bplane.NAME, bplane.CODE, True

    def supports(self, dtype):
        return dtype in bplane.DTYPES

    def _encode(self, data_u8, dtype, row_len):
        return bplane.encode_parts(data_u8, dtype)

    def _decode(self, body, out_u8, dtype, row_len):
        bplane.decode_into(body, out_u8, dtype)


@contextlib.contextmanager
def bplane_registered():
    if bplane.CODE in codecs._BY_CODE:
        yield codecs._BY_CODE[bplane.CODE]
        return
    c = BplaneCodec()
    codecs._BY_CODE[c.code] = c
    codecs._BY_NAME[c.name] = c
    try:
        yield c
    finally:
        codecs._BY_CODE.pop(c.code, None)
        codecs._BY_NAME.pop(c.name, None)
