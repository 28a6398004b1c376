"""The built-in local engine: anonymizes on this machine's CPU, with no account and no network.

Importing this package is cheap; the media libraries (onnxruntime, OpenCV, PyAV from the extra
``blurd[local]``) are loaded by the pool processes, and by ``LocalEngine.check``.
"""

from blurd.engines.local.engine import LocalEngine

__all__ = ["LocalEngine"]
