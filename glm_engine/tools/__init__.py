"""What the tools share: flags, logging and one-line errors, output files, accuracy
comparisons and the Hugging Face reference model."""
