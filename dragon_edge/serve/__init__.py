"""``dragon-edge serve``: the device as a local OpenAI-compatible server, with a chat page.

Any app that speaks the OpenAI API to ``localhost`` (chat UIs, editors, agents) gets DRAGON
answers over the user's private documents, with the cloud's help when one is configured.

* ``extras``: the DRAGON request fields (``mode``, ``k``, ``cloud_k``, ``aggregator``, ...);
* ``documents``: ingestion over HTTP (add a file or folder, list, delete);
* ``page``: the chat page at ``/`` (``chat.html``);
* ``app``: the aiohttp application (the shared routes of ``dragon_http`` over ``EdgeRuntime``);
* ``server``: start, log, stop gracefully.
"""

__all__ = ["extras", "documents", "page", "app", "server"]
