"""Deployment: ONNX and TensorRT engines with 2:4 weights, compressed checkpoints, sparse-kernel eligibility."""

from .compressed import CompressedReport, is_compressed_checkpoint, load_compressed, save_compressed
from .eligibility import EligibilityReport, LayerEligibility, eligibility
from .onnx_export import ExportReport, to_onnx
from .tensorrt_export import require_tensorrt, tensorrt_settings, to_tensorrt

__all__ = ["CompressedReport", "EligibilityReport", "ExportReport", "LayerEligibility", "eligibility",
           "is_compressed_checkpoint", "load_compressed", "require_tensorrt", "save_compressed", "tensorrt_settings",
           "to_onnx", "to_tensorrt"]
