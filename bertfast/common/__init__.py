"""The bottom layer of bertfast's ops: what every implementation shares, importing nothing else of bertfast.

* ``bertfast.common.library``: how the Python-defined custom ops are made (``torch.library``, namespace
  ``bertfast::``) and how the Triton launchers launch;
* ``bertfast.common.dropout``: the dropout seed and keep rule of every backend;
* ``bertfast.common.chunked_loss``: the chunked linear + cross-entropy algorithm that the CPU and Triton
  implementations of the masked-LM loss share;
* constants, such as :data:`IGNORE_INDEX`.

The layers above it, each importing only those below: the implementations (``bertfast.ops.reference``,
``bertfast.ops.native`` and ``bertfast.ops.chunked_cross_entropy`` for the CPU, ``bertfast.kernels`` for
Triton), then the front functions and the dispatch table (``bertfast.ops``). ``tests/test_layering.py``
checks it.
"""

IGNORE_INDEX = -100  # the label of positions that no loss is computed for, as in PyTorch and transformers
