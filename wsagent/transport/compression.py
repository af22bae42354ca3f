"""permessage-deflate whose zlib contexts are made on first use, and which leaves tiny messages alone.

The websockets library allocates a compressor and a decompressor (about 40 KiB
together with its default settings) for every connection that negotiates
compression, at the handshake. Most of wsagent's connections sit idle for long
stretches (dashboards, waiting agents), so the contexts are created when the
first compressed message goes out or comes in instead; an idle connection then
costs none of that memory.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

from websockets.extensions.base import ServerExtensionFactory
from websockets.extensions.permessage_deflate import PerMessageDeflate, ServerPerMessageDeflateFactory
from websockets.frames import Frame, Opcode
from websockets.typing import ExtensionParameter

__all__ = ["LazyPerMessageDeflate", "lazy_deflate"]


#: Messages shorter than this go out uncompressed: a token of a few bytes does not shrink, and
#: deflating it costs both ends a compression call per token.
MIN_COMPRESSED = 48


class LazyPerMessageDeflate(PerMessageDeflate):
    def encode(self, frame: Frame) -> Frame:
        # A whole small message may skip compression (RFC 7692 sets RSV1 per message); the
        # shared compression context is untouched, so later messages still decode.
        if frame.fin and frame.opcode is not Opcode.CONT and len(frame.data) < MIN_COMPRESSED:
            return frame
        return super().encode(frame)

    def __getattr__(self, name: str) -> Any:
        # Only reached while the attribute does not exist yet.
        if name == "decoder":
            value: Any = zlib.decompressobj(wbits=-self.remote_max_window_bits)
        elif name == "encoder":
            value = zlib.compressobj(wbits=-self.local_max_window_bits, **self.compress_settings)
        else:
            raise AttributeError(name)
        setattr(self, name, value)
        return value


class _LazyFactory(ServerPerMessageDeflateFactory):
    def process_request_params(
        self, params: Sequence[ExtensionParameter], accepted_extensions: Sequence[Any]
    ) -> tuple[list[ExtensionParameter], PerMessageDeflate]:
        response, extension = super().process_request_params(params, accepted_extensions)
        extension.__class__ = LazyPerMessageDeflate
        extension.__dict__.pop("decoder", None)
        extension.__dict__.pop("encoder", None)
        return response, extension


def lazy_deflate() -> list[ServerExtensionFactory]:
    """The library's default server settings (12-bit windows, memLevel 5), with lazy contexts."""
    return [_LazyFactory(server_max_window_bits=12, client_max_window_bits=12, compress_settings={"memLevel": 5})]
