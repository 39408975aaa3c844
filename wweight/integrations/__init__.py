"""Drop-in adapters that plug wweight into other tools; each imports its host library itself, and
importing :mod:`wweight` imports none of them."""
