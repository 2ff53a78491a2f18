"""The OpenAI-compatible HTTP server behind `kimivl-edge serve` (FastAPI on uvicorn).

One module per concern: ``config`` (the server's options and limits), ``errors`` (the OpenAI error shape),
``schemas`` (request validation -> the runtime's messages), ``media`` (where images may come from), ``stops``
(stop strings on streamed text), ``grammar`` (response_format -> GBNF), ``scheduler`` (the one worker thread that
owns the model, FIFO queue), ``completion`` (one chat turn on that thread -> events -> response objects) and
``app`` (routes, key check, body limit, request log).
"""
