"""Below the public functions: the road to a backend (route), reductions, and the autograd
Functions of the fused kernels (fused, fused_linear). Nothing here validates arguments: the public
functions (kdkernels.functional) have done that."""
