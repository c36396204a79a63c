"""Triton kernels of bertfast, one op family per module (shipped as ``bertfast.kernels``).

Each module holds the forward and backward kernels, the launcher, the
``torch.autograd.Function`` and the op function that ``bertfast.ops`` dispatches
to; the plain-PyTorch reference lives in ``bertfast.ops.reference``.
"""
