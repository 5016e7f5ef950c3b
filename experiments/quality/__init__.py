"""Quality of approximate KV reuse against full prefill and the model's own noise floor.

``python -m experiments.quality --help``; modules: ``texts``/``cases`` (chat-formatted
cases, dev and held-out), ``metrics``, ``plans``/``rules`` (what is reused, engine-free),
``hfsim``/``simrun`` (offline simulator), ``engine`` (vLLM arms), ``report``,
``kvdev`` (where the error comes from).
"""
