"""The error fxclip raises instead of producing a gradient that might not be private. A leaf module."""


class DynamoPassthroughError(RuntimeError):
    """Base for errors raised inside a compiler backend that must reach the user unwrapped.

    Dynamo wraps backend exceptions in BackendCompilerFailed, except subclasses of its
    ShortenTraceback, which it re-raises as they are. That class lives in torch._dynamo, which
    `import fxclip` does not load: the pass's entry points re-raise through `passthrough`, which
    gives the error a subclass that is also a ShortenTraceback.
    """


class PrivacyError(DynamoPassthroughError):
    """fxclip refused to produce a gradient that might not be differentially private.

    Raised instead of ever letting a trainable parameter receive an unclipped gradient, or a
    sample's data reach another sample's gradient. The message says what to change; `id` names
    the refusal (passes/refusals.py), stable across wordings.
    """

    id: str | None = None

    def __init__(self, *args, id: str | None = None):
        super().__init__(*args)
        self.id = id
