"""Wire format, validation, recorded streams and dataset-to-stream builders."""
