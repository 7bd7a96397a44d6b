from ._torch import DynamoPassthroughError


class PrivacyError(DynamoPassthroughError):
    """fxclip refused to produce a gradient that might not be differentially private.

    Raised instead of ever letting a trainable parameter receive an unclipped gradient, or a
    sample's data reach another sample's gradient. The message says what to change.
    """
