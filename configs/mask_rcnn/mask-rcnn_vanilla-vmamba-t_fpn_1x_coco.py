# Vanilla-VMamba-T Mask R-CNN, COCO 1x (official: 42M, 286G, box AP 46.5 / mask AP 42.1).
# The official vanilla det configs leave drop_path_rate to the Swin base config: 0.2 for T, S and B.
_base_ = "./mask-rcnn_vmamba-t_fpn_1x_coco.py"

model = dict(
    backbone=dict(
        arch="vanilla-tiny",
        drop_path_rate=0.2,
        init_cfg=dict(checkpoint="https://github.com/MzeroMiko/VMamba/releases/download/"
                                 "%23v0cls/vssmtiny_dp01_ckpt_epoch_292.pth")))
