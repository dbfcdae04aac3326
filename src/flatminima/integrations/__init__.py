"""Integrations with training frameworks (optional extras): ``.huggingface`` (``pip install
flatminima[huggingface]``) and ``.lightning`` (``pip install flatminima[lightning]``).

Each module imports its framework when imported itself, so ``import flatminima`` never needs either.
"""
