# Vanilla-VMamba-S Mask R-CNN, COCO 3x multi-scale (official: 64M, 400G, box AP 49.7 / mask AP 44.0).
_base_ = "./mask-rcnn_vmamba-t_fpn_ms-crop-3x_coco.py"

model = dict(
    backbone=dict(
        arch="vanilla-small",
        drop_path_rate=0.2,
        init_cfg=dict(checkpoint="https://github.com/MzeroMiko/VMamba/releases/download/"
                                 "%23v0cls/vssmsmall_dp03_ckpt_epoch_238.pth")))
