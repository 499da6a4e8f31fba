"""The error that the evaluation modules (inception, eval_images, eval_features, evaluation) raise."""


class EvaluationError(ValueError):
    """Inputs or weights that the evaluation cannot use; the message says how to fix them."""
