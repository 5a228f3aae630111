"""Fine-tuning a supported model on crv's chain of thought (LoRA through ``peft``): ``crv finetune``."""
