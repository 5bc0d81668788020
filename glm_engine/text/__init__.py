"""Text around the engine: the tokenizer, the incremental detokenizer, stop strings,
prompt files and chat formats, and the cnn_dailymail sample."""
