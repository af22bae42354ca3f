"""The transport: a connection and its outbox (one writer per socket, backpressure), the connection manager,
compression settings, plain HTTP answers.
"""
