"""Data: EBM records and profiles, chat prompts, video decoding and sampling, the sample dataset."""


class DataError(ValueError):
    """A record, profile file or video that cannot be used; the message names the file and the field."""
