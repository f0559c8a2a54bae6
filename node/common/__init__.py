"""What the node and the rendezvous share, one home each.

``errors`` (the error tree and the one OpenAI error-body builder), ``settings`` (the config
loader), ``b64`` (base64url), ``clock`` (unix ms), ``sse`` (the server-sent events codec),
``messages`` (signed protocol messages), ``device_ids``, ``tokenbucket``, ``ewma``, ``fsutil``,
``signals``.

Modules here import nothing else of ``node`` (``tests/test_layers.py`` checks it), so the
rendezvous can use them without loading the node.
"""
