"""The bottom layer: helpers every other layer may use and that know nothing of models, data or training.

``io`` (atomic writes), ``hashing`` (content digests), ``seeds`` (derived seeds), ``tables`` (markdown), ``budget``
(the prompt-token budget readers apply),
``env`` (environment variables: data folder, cache, offline mode, debug) and ``dtypes`` (weight dtypes).
"""
