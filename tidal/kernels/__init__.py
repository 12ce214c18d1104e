"""Triton kernels that do not belong to one model or attention backend (the lowest layer: they
import nothing from tidal). Each also runs on the CPU in Triton's interpreter (TRITON_INTERPRET=1),
where the tests check it against torch."""
