"""What a batch holds: the token types and the names of its per-token arrays.

Every producer of examples (the training pipeline, eval's prompts, chat) and every consumer
(the model's routing, the loss) takes these from here, so they cannot drift apart.
"""

# token_type_ids: which expert a token goes to. The image span (boi, image tokens, eoi) is
# VISION; everything else, padding included, is LANGUAGE (as in the original code).
LANGUAGE_TOKEN_TYPE = 0
VISION_TOKEN_TYPE = 1

# The per-token int32 arrays of an example, each [seq] (a batch: [batch, seq]). Padding pads
# exactly these; every other key (images [H, W, 3], flags) is one value per example.
SEQUENCE_KEYS = ("input_ids", "token_type_ids", "attention_mask", "loss_mask")

# Keys a built example carries for the host's bad-sample accounting only; they are never
# sent to the device.
HOST_ONLY_KEYS = ("bad_sample", "bad_reason")
