"""placeholder: replaced by the Triton implementation."""
from . import reference

maxsim = reference.maxsim
maxsim_varlen = reference.maxsim_varlen
maxsim_topk = reference.maxsim_topk
