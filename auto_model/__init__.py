"""auto_model: make any LLM answer like an aligned assistant, without fine-tuning.

    >>> from auto_model import AutoModel
    >>> model = AutoModel("HuggingFaceTB/SmolLM2-135M-Instruct")  # doctest: +SKIP
    >>> model.generate("How do I brew good coffee?", temperature=0)  # doctest: +SKIP

Importing this package is light: torch, transformers, vLLM, FAISS, sentence-transformers and
openai are imported only by the component that needs them.
"""

from auto_model.errors import (
    ArtifactError,
    AuthenticationError,
    AutoModelError,
    BatchGenerationError,
    EngineConnectionError,
    EngineHTTPError,
    EngineOutageError,
    EngineTimeoutError,
    GenerationError,
    InvalidRequestError,
    MalformedResponseError,
    MissingDependencyError,
    ModelNotFoundError,
    UnknownBackendError,
)
from auto_model.model import (
    DEFAULT_EMBEDDING_MODEL,
    DEFAULT_MODEL,
    AutoModel,
    GenerationResult,
)
from auto_model.options import GenerationOptions

__version__ = "0.1.0"

__all__ = [
    "AutoModel",
    "GenerationOptions",
    "GenerationResult",
    "DEFAULT_MODEL",
    "DEFAULT_EMBEDDING_MODEL",
    "AutoModelError",
    "ArtifactError",
    "AuthenticationError",
    "BatchGenerationError",
    "EngineConnectionError",
    "EngineHTTPError",
    "EngineOutageError",
    "EngineTimeoutError",
    "GenerationError",
    "MalformedResponseError",
    "InvalidRequestError",
    "MissingDependencyError",
    "ModelNotFoundError",
    "UnknownBackendError",
    "__version__",
]
