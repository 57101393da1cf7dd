"""Token-id conventions shared by the tokenizer (:mod:`specialists.data.tokenize`) and the text
models (:mod:`specialists.models.text`): one definition, so the padding the data writes is the
padding the models mask."""

PAD_ID = 0  # the padding id: token-id rows (N, L) are padded on the right with it; never a real token
