"""Reading token sequences back in tests."""


def masked_spans(ids, mask, tokenizer) -> list[str]:
    """Decoded text of each run of consecutive masked tokens (e.g. the assistant turns a loss trains on)."""
    spans, run = [], []
    for token, keep in zip(ids, mask):
        if keep:
            run.append(token)
        elif run:
            spans.append(tokenizer.decode(run))
            run = []
    if run:
        spans.append(tokenizer.decode(run))
    return spans
