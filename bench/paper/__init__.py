"""The paper's experiments with raygd: ``python -m bench.paper.run fig3a|dropconnect|batch-scaling|bound``."""
