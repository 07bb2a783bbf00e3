"""kfac-tune's version, in a module of its own: the package's ``__init__`` is its public face and lazily
reaches every layer, so a lower module that records the version (``record.versions``) reads it here."""
__version__ = "0.1.0"
