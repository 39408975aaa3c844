"""Drop-in adapters that run other libraries' merge code on wweight's ops (imported on demand only).

* :mod:`wweight.integrations.peft` -- ``install()`` / ``uninstall()`` for PEFT's ``merge_utils``.
"""
