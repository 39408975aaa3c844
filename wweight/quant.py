"""Quantization with outlier preservation. Placeholder until issue 6 lands."""


class QuantizedTensor:  # pragma: no cover
    pass


def _todo(*a, **k):  # pragma: no cover
    raise NotImplementedError("quantization is not implemented yet")


quantize = dequantize = quantize_state_dict = dequantize_state_dict = _todo
save_quantized = load_quantized = error_report = find_super_weights = _todo
