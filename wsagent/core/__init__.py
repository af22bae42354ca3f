"""The core, without I/O: events and their wire encoding, the SSE decoder, the chunk interpreters (chat
completions and the Responses API), errors, tools, settings, metric types, renderers, the AI SDK's UI message
stream, what a run knows of a workflow. Bytes and events in, events and frames out; nothing here opens a socket.
"""
