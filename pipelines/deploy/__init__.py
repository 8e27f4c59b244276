"""Deployment on a real int8 engine, one job per module:

- :mod:`.onnx`: torch -> ONNX export (dynamic batch).
- :mod:`.int8`: ONNX Runtime static QDQ int8 quantization that carries NNI's weight grid exactly.
- :mod:`.manifest`: the bundle's typed, integrity-checked ``manifest.json``.
- :mod:`.bundle`: writes a MoE as a bundle folder; torch-vs-engine agreement.
- :mod:`.engines`: one ONNX file on a CPU engine (ONNX Runtime or OpenVINO) behind one call.
- :mod:`.runtime`: runs a bundle with an engine and numpy alone (no torch), and times it.

Nothing is imported here, so ``pipelines.deploy.runtime`` and ``.engines`` load without torch.
"""
