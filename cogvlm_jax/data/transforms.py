"""The old home of the training example builder; its names now live in their own rooms.

    examples.ExampleBuilder      the one example builder (was SampleBuilder), render_turns
    bad_samples                  REASONS, BadSampleCounter, BadDataError, bad_reason_counts

Kept only so that training/input_pipeline.py and train.py keep importing while they move
to the new modules; delete this file once nothing imports it.
"""

from cogvlm_jax.data.bad_samples import (REASONS, BadDataError, BadSampleCounter,  # noqa: F401
                                         bad_reason_counts, classify_image_error)
from cogvlm_jax.data.examples import (DEFAULT_MAX_PIXELS, ExampleBuilder,  # noqa: F401
                                      render_turns)

SampleBuilder = ExampleBuilder  # the old name (same class, same arguments)
