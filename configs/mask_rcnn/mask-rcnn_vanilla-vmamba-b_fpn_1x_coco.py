# Vanilla-VMamba-B Mask R-CNN, COCO 1x (official: 96M, 540G, box AP 48.6 / mask AP 43.3).
# The official config points at an unreleased "dp05" ImageNet checkpoint; the released one is dp06.
_base_ = "./mask-rcnn_vmamba-t_fpn_1x_coco.py"

model = dict(
    backbone=dict(
        arch="vanilla-base",
        drop_path_rate=0.2,
        init_cfg=dict(checkpoint="https://github.com/MzeroMiko/VMamba/releases/download/"
                                 "%23v0cls/vssmbase_dp06_ckpt_epoch_241.pth")),
    neck=dict(in_channels=[128, 256, 512, 1024]))
