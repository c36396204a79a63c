"""Triton kernels of bertfast, one op family per module (shipped as ``bertfast.kernels``).

Each module holds the forward and backward kernels, the launcher, the
``torch.autograd.Function`` and the op function that ``bertfast.ops`` dispatches
to; the plain-PyTorch reference lives in ``bertfast.ops.reference``.
"""

# The op layer registers every kernel module's ops and backend entries; importing it first means a
# kernel module imported on its own (``from bertfast.kernels import attention``) finds them complete.
import bertfast.ops  # noqa: E402, F401
