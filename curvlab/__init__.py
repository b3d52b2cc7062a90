"""curvlab: curvature analysis of neural networks (Zhang et al. 2019, appendix).

K-FAC factor capture, HDF5 factor checkpoints, and (in later modules) eigenspectra, gradient covariance
in the Kronecker-factored eigenbasis and the noisy quadratic model.
"""

__version__ = "0.1.0"
