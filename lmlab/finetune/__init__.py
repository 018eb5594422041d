"""Fine-tuning: sequence classification on encoders, supervised fine-tuning of decoders, LoRA adapters."""
