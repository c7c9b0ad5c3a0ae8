"""Run exported engines (ONNX Runtime, TensorRT, compressed checkpoints) and benchmark them against dense."""

from .bench import BenchResult, benchmark
from .engines import Engine, OnnxEngine, TorchEngine, choose_providers, load

__all__ = ["BenchResult", "Engine", "OnnxEngine", "TorchEngine", "benchmark", "choose_providers", "load"]
