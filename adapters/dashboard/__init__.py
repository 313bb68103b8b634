"""The live dashboard in the browser: ``stm-agent dashboard`` or ``dashboard.enabled``.

Needs the ``dashboard`` extra (``pip install "stm-agent[dashboard]"``: FastAPI, uvicorn,
sse-starlette). :mod:`.data` reads the store, :mod:`.live` relays the agent's messages,
:mod:`.app` is the web application, :mod:`.server` runs it; the page is in ``static/``.
"""
