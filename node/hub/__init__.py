"""The Hub: what one node needs to serve many apps on many devices (substitution, API keys, the interceptor)."""
