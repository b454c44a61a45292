# VMamba-T[s1l8] Mask R-CNN, COCO 1x: the project's default config, also the base of every other
# 1x config in this folder (they change the arch, drop path rate, checkpoint and FPN widths only).
_base_ = "../maskrcnn_vmamba.py"
