"""CoupledNet kernel equalization: training CNNs with alpha pairs of filters kept equal."""

__version__ = "0.1.0"
