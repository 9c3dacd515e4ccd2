"""Fused fake-quant kernels (CUDA, and float32 CPU) with an identical plain-PyTorch path, as
torch custom ops.

``fake_quant`` runs the CUDA extension on CUDA tensors and the CPU extension on float32 CPU
tensors when they can be built, PyTorch otherwise; ``active_backend`` and ``backend_report`` say which and why, and
``HMQ_DISABLE_KERNELS=1`` forces PyTorch.
"""

from hmqsearch.kernels.backend import active_backend, backend_report
from hmqsearch.kernels.ops import fake_quant

__all__ = ["active_backend", "backend_report", "fake_quant"]
