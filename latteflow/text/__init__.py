"""The text side: the character tokenizer and the Qwen2-VL backbones (imports latteflow.core)."""
