"""Isotropic merging (Iso-C, Iso-CTS, TSV-M). Placeholder until issue 4 lands."""

ISO_METHODS = ("iso_c", "iso_cts", "tsv_m")


def iso_merge_state_dicts(*a, **k):  # pragma: no cover
    raise NotImplementedError("isotropic merging is not implemented yet")


def iso_merge_tensors(*a, **k):  # pragma: no cover
    raise NotImplementedError("isotropic merging is not implemented yet")
