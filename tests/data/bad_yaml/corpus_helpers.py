"""Corpus helper: a module with a non-callable attribute and a real (never called) builder."""
VALUE = 42


def build(input_shape: tuple[int, ...], num_classes: int) -> None:
    """Never reached: the configs naming it fail validation first."""
    raise AssertionError("the corpus must be rejected before any model is built")


def explode(input_shape: tuple[int, ...], num_classes: int) -> None:
    """A model builder that imports fine and raises when called: reported as model.callable, not a traceback."""
    raise RuntimeError("this builder fails when called, on purpose")
