"""hpcngd: SP-NGD (scalable and practical natural gradient descent) training of ResNets over MPI."""

__version__ = "0.1.0"
