"""The model side: the aiohttp client for OpenAI-compatible streaming (``model``), the plain model path
(``completion``), the built-in agent and workflows (``agent``), producers of your own and the framework
adapters (``producers``, ``frameworks``), and the simulated model server (``simulator``). Imports only the core.
"""
