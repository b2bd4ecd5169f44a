"""From a trained model to scores: Mask2Former post-processing (``inference``), universal
prediction and COCO-format outputs (``predict``), and the GZSL metrics: PQ/SQ/RQ, mAP@0.5 and
Recall@100, mIoU with Seen/Unseen/HM (``metrics``)."""
