"""How close a quantized model's outputs are to the float model's."""

import math

import torch


def _paired_leaves(reference, actual):
    """Yield (reference, actual) tensor pairs from matching nested tuples, lists and dicts."""
    if isinstance(reference, torch.Tensor):
        yield reference, actual
    elif isinstance(reference, dict):
        for key, value in reference.items():
            yield from _paired_leaves(value, actual[key])
    elif isinstance(reference, (tuple, list)):
        if len(reference) != len(actual):
            raise ValueError(f"output lengths differ: {len(reference)} vs {len(actual)}")
        for ref_item, act_item in zip(reference, actual):
            yield from _paired_leaves(ref_item, act_item)


def _as_float(tensor: torch.Tensor) -> torch.Tensor:
    # A converted model may return a quantized tensor where the float one returned a float.
    if tensor.is_quantized:
        tensor = tensor.dequantize()
    return tensor.detach().double().flatten()


def sqnr_db(reference, actual) -> float:
    """Signal-to-quantization-noise ratio in dB over all output tensors taken together.

    Tuple, list and dict outputs (including namedtuples) are flattened and concatenated, so a
    model with several heads gets one number. Identical outputs give +inf.
    """
    pairs = list(_paired_leaves(reference, actual))
    if not pairs:
        raise ValueError(f"no tensors in output of type {type(reference).__name__}")
    for ref, act in pairs:
        if ref.shape != act.shape:
            raise ValueError(f"output shapes differ: {tuple(ref.shape)} vs {tuple(act.shape)}")
    ref = torch.cat([_as_float(ref) for ref, _ in pairs])
    act = torch.cat([_as_float(act) for _, act in pairs])
    signal = ref.pow(2).sum().item()
    noise = (ref - act).pow(2).sum().item()
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(signal / noise) if signal > 0.0 else -math.inf


def int8_sqnr_on_fresh_inputs(model, batches, fresh) -> float:
    """Output SQNR of ``fxq.quantize(model)`` (calibrated on ``batches``, fxq's warnings muted)
    against ``model`` on the ``fresh`` input tensor."""
    import warnings

    import fxq

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxq.FxqWarning)
        qmodel = fxq.quantize(model, batches[0], calibration_data=batches)
    with torch.no_grad():
        return sqnr_db(model(fresh), qmodel(fresh))
