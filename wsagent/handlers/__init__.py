"""The handlers: the application context (``app``) and one module per wire protocol (``chat``: JSON and text
mode; ``ai_sdk``: the Vercel AI SDK's UI message stream; ``tutorial``: the tutorial's routes; ``pages`` and
``status``: the page, ``/healthz``, ``/metrics``).
"""
