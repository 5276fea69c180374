"""fxq: any PyTorch model to a fast, accurate int8 model, with no source changes.

Example::

    import fxq, torch, torchvision
    model = torchvision.models.resnet18().eval()
    batches = [torch.randn(8, 3, 224, 224) for _ in range(16)]
    qmodel = fxq.quantize(model, (batches[0][:1],), calibration_data=batches)
    print(fxq.report(qmodel))
"""
from fxq.api import QuantizedModel, quantize
from fxq.backends import (Backend, QuantSpec, get_backend, list_backends, reference_backend, register_backend,
                          simulation_of)
from fxq.calibrate import FxqWarning
from fxq.distributed import sync_observers
from fxq.errors import (BackendError, CalibrationError, DistributedError, FxqError, InvalidInputError,
                        QuantizationFailure, RewriteError, TraceFailure)
from fxq.qat import QATModel, convert, freeze_bn, freeze_observers, prepare_qat
from fxq.report import QuantizationReport, report
from fxq.compare import Comparison, compare
from fxq.fallback import FallbackRecord, Target
from fxq.sensitivity import Sensitivity, sensitivity
from fxq.serialize import export_torchscript, load, save
from fxq.viz import dump_graph, to_networkx

__version__ = "0.1.0"

__all__ = [
    "Comparison", "compare", "dump_graph", "export_torchscript", "load", "save", "to_networkx",
    "FallbackRecord", "Sensitivity", "Target", "sensitivity",
    "QATModel", "convert", "freeze_bn", "freeze_observers", "prepare_qat",
    "Backend", "BackendError", "CalibrationError", "DistributedError", "FxqError", "FxqWarning", "InvalidInputError",
    "QuantSpec", "QuantizationFailure", "QuantizationReport", "QuantizedModel", "RewriteError",
    "TraceFailure", "get_backend", "list_backends", "quantize", "reference_backend", "register_backend", "report",
    "simulation_of", "sync_observers",
]
