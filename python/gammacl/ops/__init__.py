"""Autograd-level ops shared by every loss (one file per op, same name as kernels/ and csrc/)."""

from gammacl.ops.simlse import simlse

__all__ = ["simlse"]
