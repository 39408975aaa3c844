"""Drop-in adapters that plug wweight into other tools; each imports its host library itself, and
importing :mod:`wweight` imports none of them.

* :mod:`wweight.integrations.peft` -- ``install()`` / ``uninstall()`` for PEFT's ``merge_utils``.
* :mod:`wweight.integrations.fusion_bench` -- Iso-C / Iso-CTS / TSV-M / TIES as FusionBench algorithms.
"""
