"""Training steps and loops: segmenter pretraining (``pretrain``), the generator/classifier
step and the one loop every generator run uses (``generator``), and the exact multi-worker
synchronisation of that step (``distributed``). Plain PyTorch; Ray Train calls these."""
