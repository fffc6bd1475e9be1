"""raygd: gradient diversity and data-parallel SGD experiments on Ray, recorded in MLflow."""

__version__ = "0.1.0"
