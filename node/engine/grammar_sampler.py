"""Grammar-constrained sampling that checks the sampled token first (llama.cpp's common sampler).

A grammar sampler at the head of a chain is applied to every token of the vocabulary at every
step (262 144 for Gemma 3): slow. llama.cpp's own ``common_sampler`` instead samples from the
unconstrained chain, asks the grammar about that one token, and only when it is rejected applies
the grammar to the candidates and samples again. :class:`GrammarCheckedSampler` does that for
one sequence seat of the step loop (``node/engine/llama.py``), next to the seat's native sampler
chain (built without the grammar). After a rejection it first tries the ``SHORTLIST`` most likely
tokens (greedy decoding picks exactly what a full pass would; sampling differs only in the far
tail, which top-k and min-p cut anyway), and the whole vocabulary only when none of them is
allowed. The chain's penalty history also records the refused token (no effect at the default
penalties).
"""

from __future__ import annotations

import ctypes
import math
from typing import Any

__all__ = ["GrammarCheckedSampler"]

SHORTLIST = 64
"""most likely tokens tried first after a rejection (the chain's top-k, 40, keeps no more)."""


class GrammarCheckedSampler:
    """A compiled GBNF grammar (root rule ``root``) for one sequence.

    Raises ``ValueError`` when llama.cpp cannot compile the grammar. ``lib`` is the
    ``llama_cpp`` module, ``vocab`` the model's native vocabulary."""

    def __init__(self, lib: Any, vocab: Any, n_vocab: int, grammar: str) -> None:
        import numpy as np

        self._lib = lib
        self._grammar = lib.llama_sampler_init_grammar(vocab, grammar.encode("utf-8"), b"root")
        if not self._grammar:
            raise ValueError("llama.cpp could not compile the grammar")
        self._n_vocab = n_vocab
        dtype = np.dtype([("id", np.intc), ("logit", np.single), ("p", np.single)], align=True)
        self._buffer = np.zeros(n_vocab, dtype=dtype)
        self._one = (lib.llama_token_data * 1)()
        self.rejections = 0
        """sampled tokens the grammar refused (each cost a constrained pass)."""

    def sample(self, chain: Any, ctx: Any, idx: int) -> int:
        """The next token of output ``idx`` of ``ctx``: ``chain`` (a native sampler chain
        without grammar) samples as it would unconstrained; a token the grammar refuses is
        replaced by one sampled under the grammar. Both samplers record the token."""
        lib = self._lib
        token = int(lib.llama_sampler_sample(chain, ctx, idx))
        if not self._allowed(token):
            self.rejections += 1
            token = self._constrained(chain, ctx, idx)
            lib.llama_sampler_accept(chain, token)
        lib.llama_sampler_accept(self._grammar, token)
        return token

    def _constrained(self, chain: Any, ctx: Any, idx: int) -> int:
        """Sample under the grammar: among the most likely tokens when one of them is allowed
        (the chain's own top-k would keep no others), else over the whole vocabulary."""
        import numpy as np

        lib = self._lib
        logits = np.ctypeslib.as_array(lib.llama_get_logits_ith(ctx, idx), shape=(self._n_vocab,))
        top = np.argpartition(logits, -SHORTLIST)[-SHORTLIST:]
        for ids in (top, None):
            candidates = self._candidates(logits, ids)
            lib.llama_sampler_apply(self._grammar, ctypes.byref(candidates))
            size = candidates.size
            if ids is not None and all(math.isinf(candidates.data[i].logit) for i in range(size)):
                continue  # nothing allowed among the shortlist
            lib.llama_sampler_apply(chain, ctypes.byref(candidates))
            return int(candidates.data[candidates.selected].id)
        raise AssertionError("unreachable")

    def close(self) -> None:
        grammar, self._grammar = self._grammar, None
        if grammar:
            self._lib.llama_sampler_free(grammar)

    # -- helpers ---------------------------------------------------------------------
    def _candidates(self, logits: Any, ids: Any) -> Any:
        """A token data array over ``ids`` (all tokens when None), in a reused buffer."""
        import numpy as np

        lib = self._lib
        buffer = self._buffer
        if ids is None:
            size = self._n_vocab
            buffer["id"] = np.arange(size, dtype=np.intc)
            buffer["logit"] = logits
        else:
            size = len(ids)
            buffer["id"][:size] = ids
            buffer["logit"][:size] = logits[ids]
        buffer["p"][:size] = 0.0
        data = buffer.ctypes.data_as(ctypes.POINTER(lib.llama_token_data))
        return lib.llama_token_data_array(data, size, -1, False)

    def _allowed(self, token: int) -> bool:
        one: Any = self._one
        one[0].id, one[0].logit, one[0].p = token, 0.0, 0.0
        single = self._lib.llama_token_data_array(one, 1, -1, False)
        self._lib.llama_sampler_apply(self._grammar, ctypes.byref(single))
        return not math.isinf(one[0].logit)
