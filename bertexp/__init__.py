"""bertexp: BERT pretraining (MLM + NSP) on Chinese text, one comparable experiment per run."""

__version__ = "0.1.0"
