"""The OpenAI-compatible HTTP front door, written once for both runtimes.

The cloud (``dragon-cloud serve``, vLLM) and the device (``dragon-edge serve``, llama.cpp) serve
the same routes with the same validation, errors, API keys and body guards. What differs is the
*answer backend* under them (``answer.AnswerBackend``: ``DragonCloud`` or ``EdgeRuntime``) and
the DRAGON fields a request may add (``request.RequestExtras``). Nothing here imports vLLM, so
the device can use it.

* ``errors``: OpenAI's error shape;
* ``guard``: body size/time caps, the client leaving, a reader that stops reading;
* ``auth``: API keys;
* ``answer``: the protocol a runtime implements;
* ``request``: parsing and validating an OpenAI request;
* ``openai_routes``: ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``;
* ``loopback``: keeping a loopback server local.
"""

__all__ = ["errors", "guard", "auth", "answer", "request", "openai_routes", "loopback"]
