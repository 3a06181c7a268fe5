"""``tokencake-gateway``: an OpenAI-compatible reverse proxy that learns agent events from traffic.

An agent app that speaks the OpenAI API to ``vllm serve`` gets TokenCake's treatment by
pointing its base URL at the gateway. The gateway tells conversations apart (``identity``),
reads the declared hints some apps send (``hints``), watches responses for tool calls
(``observe``), learns tool durations and the app's structure (``learn``), reports agent
events to tokencaked through the client library (``link``) and tags each forwarded request's
``kv_transfer_params`` so the vLLM connector links the KV to the agent (``tracker``).
``server`` is the aiohttp proxy; ``cli`` its command line. See docs/gateway.md.
"""
