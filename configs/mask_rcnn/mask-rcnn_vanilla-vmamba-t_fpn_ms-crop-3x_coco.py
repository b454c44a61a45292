# Vanilla-VMamba-T Mask R-CNN, COCO 3x multi-scale (official: 42M, 286G, box AP 48.5 / mask AP 43.2).
_base_ = "./mask-rcnn_vmamba-t_fpn_ms-crop-3x_coco.py"

model = dict(
    backbone=dict(
        arch="vanilla-tiny",
        drop_path_rate=0.2,
        init_cfg=dict(checkpoint="https://github.com/MzeroMiko/VMamba/releases/download/"
                                 "%23v0cls/vssmtiny_dp01_ckpt_epoch_292.pth")))
