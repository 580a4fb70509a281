"""The network: config, the GPT body and heads (gpt.py), weights, tokenizer, known models, tiny checkpoints."""
