"""DevFT federated LoRA fine-tuning on Flower 1.42: a ServerApp and a ClientApp over devft_py."""
