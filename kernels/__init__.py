"""Triton kernels of bertfast, one op family per module (shipped as ``bertfast.kernels``).

Each module holds the forward and backward kernels, their launchers, the ``bertfast::`` custom ops that
run the launchers (``torch.library.triton_op``s, plain custom ops in the interpreter; see
``bertfast.common.library``) with their autograd registered once per op (``register_autograd``), and the
entry function and ``supports`` predicate that ``bertfast.ops`` dispatches to. The modules import only
``bertfast.common`` and each other; the plain-PyTorch reference is ``bertfast.ops.reference``.
"""
